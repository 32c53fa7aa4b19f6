"""The bot's side of Slack's rate limits: one budget per method for the whole process,
one Retry-After honoured by every caller, interim calls skipped while the budget is low,
and chat.postMessage retried on a 5xx without ever posting twice."""

import itertools
import json
from urllib.parse import parse_qsl

import anyio
import anyio.lowlevel
import httpx2
import pytest

from bot.slack.rate_limits import METHOD_TIERS, TIER_PER_MINUTE, Bucket, SlackRateLimits
from bot.slack.web_api import SlackAPIError, SlackRateLimited, SlackSkipped, SlackWebAPI


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_one_slot_per_interval_in_order():
    clock = Clock()
    limits = SlackRateLimits(clock=clock)
    bucket = limits.bucket("chat.update")
    burst = bucket.burst
    assert burst >= 2 and bucket.available() == burst
    waits = [bucket.reserve() for _ in range(burst + 3)]
    assert waits[:burst] == [0.0] * burst
    interval = 60 / TIER_PER_MINUTE[METHOD_TIERS["chat.update"]]
    assert waits[burst:] == pytest.approx([interval, 2 * interval, 3 * interval])
    clock.now += 10 * interval + bucket.tolerance
    assert bucket.available() == burst


def test_replicas_share_each_budget_so_that_together_they_keep_slacks_rate():
    clock = Clock()
    limits = SlackRateLimits(clock=clock)
    before = limits.bucket("chat.update")  # exists before the share changes: rescaled too
    alone = before.interval
    limits.share(2)
    later = limits.bucket("chat.stopStream")  # created after: at the shared rate at once
    assert before.interval == pytest.approx(2 * alone)
    assert later.interval == pytest.approx(2 * 60 / TIER_PER_MINUTE[METHOD_TIERS["chat.stopStream"]])
    assert limits.bucket("chat.postMessage", "C1").interval == pytest.approx(1.0)  # per channel: not split
    assert before.burst >= 1 and later.burst >= 1
    # Two replicas, each using its whole share for a minute, stay within Slack's tier.
    calls = 0
    for _ in range(2):
        clock.now = 5000.0
        bucket = SlackRateLimits(clock=clock)
        bucket.share(2)
        b = bucket.bucket("chat.update")
        calls += sum(1 for _ in range(200) if b.reserve() <= 60.0)
    assert calls <= TIER_PER_MINUTE[3] + 2 * b.burst
    limits.share(1)
    assert before.interval == pytest.approx(alone)
    assert limits.bucket("auth.test").interval == pytest.approx(1 / 1000)  # not budgeted: left so
    limits.share(0)
    assert limits.shared_by == 1


def test_retry_after_closes_the_method_for_everyone_and_empties_the_bucket():
    clock = Clock()
    limits = SlackRateLimits(clock=clock)
    limits.retry_after("chat.update", None, 7.0)
    assert limits.wait_time("chat.update") == pytest.approx(7.0)
    assert not limits.try_acquire("chat.update")
    assert limits.wait_time("chat.stopStream") == 0  # other methods are not affected
    clock.now += 7.0
    assert limits.bucket("chat.update").available() == 1


def test_a_new_share_neither_opens_a_retry_after_window_early_nor_prolongs_it():
    clock = Clock()
    limits = SlackRateLimits(clock=clock)
    limits.retry_after("chat.stopStream", None, 3.0)
    limits.share(3)  # a smaller burst: the window still ends in 3 s
    assert limits.wait_time("chat.stopStream") == pytest.approx(3.0)
    limits.retry_after("chat.update", None, 3.0)
    limits.share(1)  # a larger burst: no call inside the window all the same
    assert limits.wait_time("chat.update") == pytest.approx(3.0)
    assert limits.wait_time("chat.stopStream") == pytest.approx(3.0)
    clock.now += 3.0
    assert limits.wait_time("chat.update") == 0 and limits.wait_time("chat.stopStream") == 0


def test_post_message_budget_is_per_channel_and_unlimited_methods_pass():
    clock = Clock()
    limits = SlackRateLimits(clock=clock)
    a, b = limits.bucket("chat.postMessage", "C1"), limits.bucket("chat.postMessage", "C2")
    assert a is not b
    for _ in range(a.burst):
        a.reserve()
    assert a.available() == 0 and b.available() == b.burst
    assert all(limits.try_acquire("auth.test") for _ in range(100))  # no tier: not budgeted
    limits.retry_after("auth.test", None, 5.0)  # ... but a Retry-After still closes it
    assert not limits.try_acquire("auth.test") and limits.wait_time("auth.test") == pytest.approx(5.0)


def test_interim_calls_leave_room_for_promised_final_writes():
    clock = Clock()
    limits = SlackRateLimits(clock=clock)
    bucket = limits.bucket("chat.update")
    for _ in range(bucket.burst - 1):
        limits.commit("chat.update")
    assert not limits.try_acquire("chat.update")  # the rest is promised to final writes
    assert limits.has_room_for("chat.update", calls=1)
    for _ in range(bucket.burst - 1):
        limits.uncommit("chat.update")
    assert limits.try_acquire("chat.update")


class Recorder:
    """A Web API that answers from a script and records when each call arrived."""

    def __init__(self, script) -> None:
        self.script = script
        self.calls: list[tuple[str, float, dict]] = []
        self.posted: list[dict] = []

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        method = request.url.path.rsplit("/", 1)[-1]
        if request.headers.get("content-type", "").startswith("application/json"):
            args = json.loads(request.content)
        else:
            args = dict(parse_qsl(request.content.decode()))
        self.calls.append((method, anyio.current_time(), args))
        return self.script(self, method, args)


def _api(recorder: Recorder) -> tuple[httpx2.AsyncClient, SlackWebAPI]:
    client = httpx2.AsyncClient(transport=httpx2.MockTransport(recorder.handle))
    return client, SlackWebAPI(bot_token="xoxb-1", app_token="xapp-1", base_url="http://slack.test/api/", client=client)


def _ok(**body) -> httpx2.Response:
    return httpx2.Response(200, json={"ok": True, **body})


@pytest.mark.anyio
async def test_one_retry_after_is_honoured_by_every_caller():
    def script(rec, method, args):
        if len(rec.calls) == 1:
            return httpx2.Response(429, json={"ok": False, "error": "ratelimited"}, headers={"Retry-After": "1"})
        return _ok(ts="1.1")

    rec = Recorder(script)
    client, slack = _api(rec)
    async with client:
        t0 = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: slack.call("chat.update", channel="C1", ts="1.0", text="a"))
            await anyio.sleep(0.05)  # the second caller arrives inside the announced window
            tg.start_soon(lambda: slack.call("chat.update", channel="C1", ts="1.0", text="b"))
    assert len(rec.calls) == 3
    first_429 = rec.calls[0][1]
    assert all(at >= first_429 + 1.0 - 0.01 for _, at, _ in rec.calls[1:]), "a call went inside Retry-After"
    assert anyio.current_time() - t0 >= 1.0


@pytest.mark.anyio
async def test_interim_call_is_skipped_without_a_request_while_the_budget_is_low():
    rec = Recorder(lambda rec, method, args: _ok())
    client, slack = _api(rec)
    async with client:
        for _ in range(slack.limits.bucket("chat.update").burst):
            slack.limits.commit("chat.update")
        with pytest.raises(SlackSkipped):
            await slack.update_message("C1", "1.0", markdown_text="partial", interim=True)
        assert rec.calls == []


@pytest.mark.anyio
async def test_interim_call_is_not_retried_after_a_429():
    rec = Recorder(
        lambda rec, method, args: httpx2.Response(
            429, json={"ok": False, "error": "ratelimited"}, headers={"Retry-After": "30"}
        )
    )
    client, slack = _api(rec)
    async with client:
        with anyio.fail_after(2):
            with pytest.raises(SlackRateLimited):
                await slack.update_message("C1", "1.0", markdown_text="partial", interim=True)
    assert len(rec.calls) == 1
    assert slack.limits.wait_time("chat.update") > 25


def _thread_with(rec: Recorder) -> httpx2.Response:
    return _ok(messages=[{"ts": "1.0", "text": "question"}, *rec.posted], has_more=False)


@pytest.mark.anyio
async def test_post_message_5xx_after_slack_posted_is_not_posted_twice():
    def script(rec, method, args):
        if method == "chat.postMessage":
            rec.posted.append(
                {"ts": f"2.{len(rec.posted)}", "text": args.get("markdown_text"), "metadata": args.get("metadata")}
            )
            return httpx2.Response(503, text="<html>Service Unavailable</html>")  # posted, then failed
        assert method == "conversations.replies" and args.get("include_all_metadata") == "true"
        return _thread_with(rec)

    rec = Recorder(script)
    client, slack = _api(rec)
    async with client:
        ts = await slack.post_message("C1", "1.0", markdown_text="the answer")
    assert ts == "2.0" and len(rec.posted) == 1
    assert [m for m, _, _ in rec.calls] == ["chat.postMessage", "conversations.replies"]


@pytest.mark.anyio
async def test_post_message_5xx_before_slack_posted_is_posted_again_once():
    def script(rec, method, args):
        if method == "chat.postMessage":
            if sum(1 for m, _, _ in rec.calls if m == "chat.postMessage") == 1:
                return httpx2.Response(500, json={"ok": False, "error": "internal_error"})
            rec.posted.append({"ts": "2.0", "text": args.get("markdown_text"), "metadata": args.get("metadata")})
            return _ok(ts="2.0", channel="C1")
        return _thread_with(rec)

    rec = Recorder(script)
    client, slack = _api(rec)
    async with client:
        ts = await slack.post_message("C1", "1.0", markdown_text="the answer")
    assert ts == "2.0" and len(rec.posted) == 1
    assert [m for m, _, _ in rec.calls] == ["chat.postMessage", "conversations.replies", "chat.postMessage"]


@pytest.mark.anyio
async def test_post_message_is_not_repeated_when_the_look_up_fails():
    def script(rec, method, args):
        if method == "chat.postMessage":
            return httpx2.Response(502, text="bad gateway")
        return httpx2.Response(200, json={"ok": False, "error": "missing_scope"})

    rec = Recorder(script)
    client, slack = _api(rec)
    async with client:
        with pytest.raises(SlackAPIError) as info:
            await slack.post_message("C1", "1.0", markdown_text="the answer")
    assert info.value.transient
    assert [m for m, _, _ in rec.calls] == ["chat.postMessage", "conversations.replies"]


# ---------------------------------------------------------------- priority (a takeover's calls)

FAST_RATE = 5.0  # calls a second: a 200 ms interval (short waits; room for a slow box to queue every caller)


async def _queued(bucket: Bucket, n: int) -> None:
    """Until `n` callers wait in the bucket's queue."""
    with anyio.fail_after(5):
        while bucket.waiting != n:
            await anyio.lowlevel.checkpoint()


@pytest.mark.anyio
async def test_a_priority_caller_goes_ahead_of_those_already_waiting_and_the_rate_holds():
    bucket = Bucket(FAST_RATE, 1, anyio.current_time)
    bucket.reserve()
    bucket.reserve()  # empty, and the one call a priority caller may borrow beyond it taken too
    order: list[str] = []
    times: list[float] = []

    async def caller(name: str, priority: bool) -> None:
        await bucket.acquire(priority=priority)
        order.append(name)
        times.append(anyio.current_time())

    async with anyio.create_task_group() as tg:
        for n in range(3):
            tg.start_soon(caller, f"normal-{n}", False)
            await _queued(bucket, n + 1)
        tg.start_soon(caller, "takeover-0", True)  # the first normal one is already asleep on its slot
        await _queued(bucket, 4)
        tg.start_soon(caller, "takeover-1", True)
        await _queued(bucket, 5)
        assert bucket.available() == 0
    assert order == ["takeover-0", "takeover-1", "normal-0", "normal-1", "normal-2"]
    # One slot per interval for all of them together, priority or not: the rate is kept.
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= bucket.interval - 1e-3 for gap in gaps), gaps
    assert bucket.waiting == 0


@pytest.mark.anyio
async def test_a_priority_caller_may_go_one_call_beyond_the_burst_but_never_inside_a_retry_after():
    """A takeover's first call of a method does not wait out the slot this replica's own
    answer just used (on Tier 2 split three ways, 9 s): it borrows one call beyond our
    burst. Only one: the next waits a full interval, and the others wait one slot longer
    (the rate over time is the same). A Retry-After window holds it as it holds everyone."""
    bucket = Bucket(FAST_RATE, 1, anyio.current_time)
    bucket.reserve()  # the replica's own answer took the only slot: the next is an interval away
    started = anyio.current_time()
    await bucket.acquire(priority=True)
    first = anyio.current_time() - started
    await bucket.acquire(priority=True)
    second = anyio.current_time() - started
    assert first < bucket.interval / 2 and second >= bucket.interval - 1e-3
    assert bucket.wait_time() > 1.5 * bucket.interval  # an answer's call: behind the borrowed one too (2 intervals)
    await anyio.sleep(4 * bucket.interval)  # (the bucket full again)
    bucket.block(0.3)
    blocked_at = anyio.current_time()
    await bucket.acquire(priority=True)
    assert anyio.current_time() >= blocked_at + 0.3 - 1e-3


@pytest.mark.anyio
async def test_a_cancelled_waiter_leaves_the_queue_having_taken_nothing():
    bucket = Bucket(FAST_RATE, 1, anyio.current_time)
    bucket.reserve()
    went: list[str] = []

    async def caller(name: str) -> None:
        await bucket.acquire()
        went.append(name)

    async with anyio.create_task_group() as tg:
        first = anyio.CancelScope()
        tg.start_soon(_in, first, caller, "first")
        await _queued(bucket, 1)
        tg.start_soon(caller, "second")
        await _queued(bucket, 2)
        first.cancel()  # the head of the queue gives up: the next one takes its slot
        await _queued(bucket, 0)
    assert went == ["second"]
    assert bucket.waiting == 0
    assert bucket.wait_time() <= bucket.interval  # one slot taken since the bucket was emptied, not two


async def _in(scope: anyio.CancelScope, func, *args) -> None:
    with scope:
        await func(*args)


@pytest.mark.anyio
async def test_waiters_are_counted_by_available_and_wait_time_and_a_retry_after_holds_them():
    clock_start = anyio.current_time()
    bucket = Bucket(FAST_RATE, 2, anyio.current_time)
    bucket.reserve()
    bucket.reserve()
    went: list[float] = []

    async def caller() -> None:
        await bucket.acquire()
        went.append(anyio.current_time())

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller)
        tg.start_soon(caller)
        await _queued(bucket, 2)
        assert bucket.available() == 0
        # A new caller would wait behind both: three intervals at most from the start.
        assert bucket.wait_time() == pytest.approx(3 * bucket.interval, abs=0.02)
        bucket.block(0.2)  # Slack's Retry-After while they wait: nobody goes before its end
        blocked_at = anyio.current_time()
    assert len(went) == 2 and min(went) >= blocked_at + 0.2 - 1e-3
    assert anyio.current_time() - clock_start < 5


@pytest.mark.anyio
async def test_a_takeovers_call_goes_ahead_of_an_answers_queued_final_write():
    rec = Recorder(lambda rec, method, args: _ok(ts="1.1"))
    client, slack = _api(rec)
    bucket = slack.limits.bucket("chat.update")
    assert bucket is not None
    bucket.set_rate(FAST_RATE, 1)
    bucket.reserve()
    bucket.reserve()  # (so that the takeover's call too has to queue: see the test below)
    async with client, anyio.create_task_group() as tg:
        tg.start_soon(lambda: slack.update_message("C1", "1.0", markdown_text="an answer"))
        await _queued(bucket, 1)
        tg.start_soon(lambda: slack.update_message("C2", "2.0", markdown_text="notice", priority=True))
        await _queued(bucket, 2)
    assert [args["channel"] for _, _, args in rec.calls] == ["C2", "C1"]
