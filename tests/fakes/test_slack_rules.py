"""The rules FakeSlack enforces because Slack documents them (docs.slack.dev method
reference; shared/docs/protocols.md C2, C4, C5, C6): workspace-wide rate limits per
method, streaming state, text and block caps, the assistant status lifetime, streaming
chunks (their shapes, one streaming mode per stream, the task states kept per message).

These drive the fake directly over HTTP (no bot code), so a failure here is a bug in the
fake, not in the bot. Tests that wait a few seconds run on real time on both backends;
those that need minutes run on a Trio MockClock (virtual time), the fake's only clock
being anyio.current_time().
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import anyio
import httpx2
import pytest

from tests.fakes.slack import (
    CHUNK_TEXT_LIMIT,
    METHOD_TIERS,
    POST_MESSAGE_BURST,
    POST_MESSAGE_PER_SECOND,
    STATUS_TTL,
    TIER_PER_MINUTE,
    FakeSlack,
    SlackError,
    burst_for,
    check_chunks,
    default_limit,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


def _mock_clock():
    import trio.testing

    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


virtual_time = pytest.mark.parametrize("anyio_backend", [_mock_clock()], ids=["trio-mockclock"])


@asynccontextmanager
async def slack_client(fake: FakeSlack):
    """One caller of the Web API (a process, a worker): its own HTTP client."""
    async with httpx2.AsyncClient(
        transport=httpx2.MockTransport(fake.handle),
        base_url="http://slack.test/api/",
        headers={"Authorization": "Bearer xoxb-test-token"},
    ) as http:
        yield http


async def call(http: httpx2.AsyncClient, method: str, **args) -> tuple[int, dict, httpx2.Headers]:
    response = await http.post(method, json=args)
    return response.status_code, response.json(), response.headers


async def ok(http: httpx2.AsyncClient, method: str, **args) -> dict:
    status, body, _ = await call(http, method, **args)
    assert status == 200 and body["ok"], (method, status, body)
    return body


async def error(http: httpx2.AsyncClient, method: str, **args) -> str:
    status, body, _ = await call(http, method, **args)
    assert status == 200 and not body["ok"], (method, status, body)
    return body["error"]


# ---------------------------------------------------------------- rate limits: figures


def test_tier_figures_are_slacks():
    assert TIER_PER_MINUTE == {2: 20, 3: 50, 4: 100}
    assert [burst_for(TIER_PER_MINUTE[t]) for t in (2, 3, 4)] == [4, 10, 20]
    assert {m for m, t in METHOD_TIERS.items() if t == 2} == {"chat.startStream", "chat.stopStream"}
    assert {
        "chat.update",
        "chat.delete",
        "conversations.replies",
        "conversations.history",
        "apps.connections.open",
    } <= {m for m, t in METHOD_TIERS.items() if t == 3}
    assert {
        "chat.appendStream",
        "chat.postEphemeral",
        "views.open",
        "views.update",
        "views.push",
        "views.publish",
        "assistant.threads.setTitle",
        "assistant.threads.setSuggestedPrompts",
        "assistant.threads.setStatus",
        "users.info",
        "files.info",
        "files.getUploadURLExternal",
        "files.completeUploadExternal",
    } <= {m for m, t in METHOD_TIERS.items() if t == 4}
    assert default_limit("auth.test") is None and "chat.postMessage" not in METHOD_TIERS
    assert default_limit("chat.postMessage") == (POST_MESSAGE_PER_SECOND * 60, POST_MESSAGE_BURST) == (60, 5)


# ---------------------------------------------------------------- rate limits: buckets


@pytest.mark.parametrize(("method", "tier"), [("chat.stopStream", 2), ("chat.update", 3), ("users.info", 4)])
async def test_bucket_tolerates_a_burst_then_answers_429(method, tier):
    """A burst of rate//5 calls goes through (even calls the method refuses count), the
    next one is answered 429 `ratelimited` with Retry-After = whole seconds to one token."""
    fake = FakeSlack()
    burst = burst_for(TIER_PER_MINUTE[tier])
    async with slack_client(fake) as http:
        for _ in range(burst):
            status, _, _ = await call(http, method, channel="D1", ts="1.000000", user="U1")
            assert status == 200
        status, body, headers = await call(http, method, channel="D1", ts="1.000000", user="U1")
    assert (status, body) == (429, {"ok": False, "error": "ratelimited"})
    assert headers["Retry-After"] == str(-(-60 // TIER_PER_MINUTE[tier]))  # T2 3 s, T3 2 s, T4 1 s
    assert fake.rate_limited == {method: 1}
    assert len(fake.calls) == burst + 1 and fake.accepted(method) == burst == len(fake.accepted_calls)


async def test_bucket_is_shared_by_every_caller_and_kept_per_method():
    """Slack limits per method per workspace: a second client meets the first one's 429;
    another method has its own bucket."""
    fake = FakeSlack()
    async with slack_client(fake) as first, slack_client(fake) as second:
        for _ in range(burst_for(50)):
            await call(first, "chat.update", channel="D1", ts="1.000000", text="x")
        status, body, _ = await call(second, "chat.update", channel="C9", ts="2.000000", text="y")
        assert status == 429 and body["error"] == "ratelimited"
        await ok(second, "users.info", user="U1")
        await ok(second, "auth.test")


async def test_post_message_is_limited_per_channel_only():
    """chat.postMessage: about 1/s per channel with a burst of 5; other channels are not
    affected, and there is no workspace-wide bucket."""
    fake = FakeSlack()
    async with slack_client(fake) as http:
        for _ in range(POST_MESSAGE_BURST):
            await ok(http, "chat.postMessage", channel="C1", text="hi")
        status, body, headers = await call(http, "chat.postMessage", channel="C1", text="one too many")
        assert (status, body["error"], headers["Retry-After"]) == (429, "ratelimited", "1")
        for n in range(30):  # 150 posts spread over 30 channels
            for _ in range(POST_MESSAGE_BURST):
                await ok(http, "chat.postMessage", channel=f"C{n + 2}", text="hi")
    assert fake.rate_limited == {"chat.postMessage": 1}
    assert len(fake.messages["C1"]) == POST_MESSAGE_BURST


async def test_auth_test_is_not_limited():
    fake = FakeSlack()
    async with slack_client(fake) as http:
        for _ in range(300):
            await ok(http, "auth.test")
    assert fake.rate_limited == {}


async def test_calls_inside_the_announced_window_are_refused_and_logged():
    """After a 429 Slack keeps limiting until its Retry-After is over: a call arriving
    earlier is refused (and logged in calls_in_retry_after); one after it goes through."""
    fake = FakeSlack()
    async with slack_client(fake) as http:
        for _ in range(burst_for(100)):
            await ok(http, "users.info", user="U1")
        status, _, headers = await call(http, "users.info", user="U1")
        assert status == 429 and headers["Retry-After"] == "1"
        start = anyio.current_time()
        await anyio.sleep(0.5)
        status, body, headers = await call(http, "users.info", user="U1")
        assert (status, body["error"], headers["Retry-After"]) == (429, "ratelimited", "1")
        assert [(m, c) for m, c, _ in fake.calls_in_retry_after] == [("users.info", None)]
        assert fake.calls_in_retry_after[0][2] >= start + 0.5
        await anyio.sleep(0.6)
        await ok(http, "users.info", user="U1")
    assert fake.rate_limited == {"users.info": 2} and len(fake.calls_in_retry_after) == 1


async def test_post_message_window_is_per_channel():
    fake = FakeSlack()
    async with slack_client(fake) as http:
        for _ in range(POST_MESSAGE_BURST + 1):
            await call(http, "chat.postMessage", channel="C1", text="x")
        assert (await call(http, "chat.postMessage", channel="C1", text="x"))[0] == 429
        await ok(http, "chat.postMessage", channel="C2", text="x")
    assert [(m, c) for m, c, _ in fake.calls_in_retry_after] == [("chat.postMessage", "C1")]


@virtual_time
async def test_buckets_refill_continuously_at_the_tier_rate():
    fake = FakeSlack()
    async with slack_client(fake) as http:
        for _ in range(20):
            await ok(http, "users.info", user="U1")
        assert (await call(http, "users.info", user="U1"))[0] == 429
        await anyio.sleep(6)  # 100/min: 10 tokens back in 6 s
        for _ in range(10):
            await ok(http, "users.info", user="U1")
        status, _, headers = await call(http, "users.info", user="U1")
        assert status == 429 and headers["Retry-After"] == "1"
        await anyio.sleep(60)  # never more than the burst
        for _ in range(20):
            await ok(http, "users.info", user="U1")
        assert (await call(http, "users.info", user="U1"))[0] == 429
        await anyio.sleep(1)
        for _ in range(POST_MESSAGE_BURST):
            await ok(http, "chat.postMessage", channel="C1", text="x")
        await anyio.sleep(2)  # chat.postMessage: 1/s per channel
        for _ in range(2):
            await ok(http, "chat.postMessage", channel="C1", text="x")
        assert (await call(http, "chat.postMessage", channel="C1", text="x"))[0] == 429


@virtual_time
async def test_steady_rate_within_the_tier_is_never_limited():
    """50 chat.update calls a minute, evenly spaced, for ten minutes: no 429."""
    fake = FakeSlack()
    async with slack_client(fake) as http:
        ts = (await ok(http, "chat.postMessage", channel="D1", text="x"))["ts"]
        for n in range(500):
            await ok(http, "chat.update", channel="D1", ts=ts, text=f"v{n}")
            await anyio.sleep(60 / 50)
    assert fake.rate_limited == {}


async def test_rate_overrides_and_turning_limits_off():
    fake = FakeSlack(rate_overrides={"chat.update": 5, "users.info": None, "auth.test": 10})
    assert fake.limit_of("chat.update") == (5, 1) and fake.limit_of("users.info") is None
    async with slack_client(fake) as http:
        ts = (await ok(http, "chat.postMessage", channel="D1", text="x"))["ts"]
        await ok(http, "chat.update", channel="D1", ts=ts, text="y")
        status, _, headers = await call(http, "chat.update", channel="D1", ts=ts, text="z")
        assert status == 429 and headers["Retry-After"] == "12"  # 5/min: a token every 12 s
        for _ in range(200):
            await ok(http, "users.info", user="U1")
        for _ in range(burst_for(10)):
            await ok(http, "auth.test")
        assert (await call(http, "auth.test"))[0] == 429

    # rate_limits=False is what this test is about: the flag must switch buckets off.
    unlimited = FakeSlack(rate_limits=False)
    async with slack_client(unlimited) as http:
        for _ in range(200):
            await ok(http, "users.info", user="U1")
        for _ in range(20):
            await ok(http, "chat.postMessage", channel="C1", text="x")
    assert unlimited.rate_limited == {}


async def test_injected_429_announces_a_window_too():
    """fail_next(status=429) is a fault, not a bucket, but Slack behaves the same after
    it: calls before its Retry-After ends are refused and logged."""
    fake = FakeSlack()
    fake.fail_next("chat.update", status=429, retry_after=5)
    async with slack_client(fake) as http:
        status, body, headers = await call(http, "chat.update", channel="D1", ts="1.000000", text="x")
        assert (status, body["error"], headers["Retry-After"]) == (429, "ratelimited", "5")
        status, _, headers = await call(http, "chat.update", channel="D1", ts="1.000000", text="x")
        assert status == 429 and 1 <= int(headers["Retry-After"]) <= 5
        await ok(http, "users.info", user="U1")  # other methods are not affected
    assert [(m, c) for m, c, _ in fake.calls_in_retry_after] == [("chat.update", "D1")]
    assert fake.rate_limited == {"chat.update": 2} and fake.accepted("chat.update") == 0
    assert [m for m, _ in fake.calls].count("chat.update") == 2


async def test_short_injected_429_can_be_retried_after_it():
    fake = FakeSlack()
    fake.fail_next("chat.postMessage", status=429, retry_after=0.05)
    async with slack_client(fake) as http:
        assert (await call(http, "chat.postMessage", channel="C1", text="x"))[0] == 429
        await anyio.sleep(0.05)
        await ok(http, "chat.postMessage", channel="C1", text="x")
    assert fake.calls_in_retry_after == [] and fake.accepted("chat.postMessage") == 1


# ---------------------------------------------------------------- streaming state


async def test_streaming_message_cannot_be_updated_or_deleted_until_stopped():
    fake = FakeSlack()
    parent = fake.add_user_message("D1", "U1", "question")
    async with slack_client(fake) as http:
        ts = (await ok(http, "chat.startStream", channel="D1", thread_ts=parent, markdown_text="Hel"))["ts"]
        assert fake.is_streaming("D1", ts)
        await ok(http, "chat.appendStream", channel="D1", ts=ts, markdown_text="lo")
        assert fake.visible_text("D1", ts) == "Hello"
        assert await error(http, "chat.update", channel="D1", ts=ts, text="edited") == "streaming_state_conflict"
        assert await error(http, "chat.delete", channel="D1", ts=ts) == "streaming_state_conflict"
        await ok(http, "chat.stopStream", channel="D1", ts=ts, markdown_text="!")
        assert not fake.is_streaming("D1", ts)
        assert (
            await error(http, "chat.appendStream", channel="D1", ts=ts, markdown_text="late")
            == "message_not_in_streaming_state"
        )
        assert await error(http, "chat.stopStream", channel="D1", ts=ts) == "message_not_in_streaming_state"
        await ok(http, "chat.update", channel="D1", ts=ts, markdown_text="Hello, edited")
        assert fake.visible_text("D1", ts) == "Hello, edited"

        other = (await ok(http, "chat.startStream", channel="D1", thread_ts=parent, markdown_text="x"))["ts"]
        fake.end_stream("D1", other)  # Slack ends a stream nobody stops
        assert not fake.is_streaming("D1", other)
        await ok(http, "chat.delete", channel="D1", ts=other)
    assert fake.visible_text("D1", other) == ""
    with pytest.raises(KeyError):
        fake.visible_text("D1", "9.999999")


async def test_visible_text_shows_blocks_and_stop_stream_blocks():
    fake = FakeSlack()
    parent = fake.add_user_message("D1", "U1", "question")
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "in the block"}}]
    async with slack_client(fake) as http:
        posted = (await ok(http, "chat.postMessage", channel="D1", text="fallback", blocks=blocks))["ts"]
        ts = (await ok(http, "chat.startStream", channel="D1", thread_ts=parent, markdown_text="answer"))["ts"]
        await ok(
            http,
            "chat.stopStream",
            channel="D1",
            ts=ts,
            blocks=[{"type": "context", "elements": [{"type": "mrkdwn", "text": "sources"}]}],
        )
    assert fake.visible_text("D1", posted) == "in the block"
    assert fake.visible_text("D1", ts) == "answer\nsources"


# ---------------------------------------------------------------- text caps


@pytest.mark.parametrize(
    ("method", "field", "limit"),
    [
        ("chat.update", "text", 4_000),
        ("chat.update", "markdown_text", 12_000),
        ("chat.postMessage", "text", 40_000),
        ("chat.postMessage", "markdown_text", 12_000),
        ("chat.startStream", "markdown_text", 12_000),
        ("chat.appendStream", "markdown_text", 12_000),
        ("chat.stopStream", "markdown_text", 12_000),
    ],
)
async def test_text_caps_per_method_and_field(method, field, limit):
    fake = FakeSlack()
    parent = fake.add_user_message("D1", "U1", "question")
    async with slack_client(fake) as http:

        async def target() -> dict:
            if method == "chat.update":
                return {"ts": (await ok(http, "chat.postMessage", channel="D1", text="x"))["ts"]}
            if method in ("chat.appendStream", "chat.stopStream"):
                return {"ts": (await ok(http, "chat.startStream", channel="D1", thread_ts=parent))["ts"]}
            return {"thread_ts": parent}

        await ok(http, method, channel="D1", **await target(), **{field: "a" * limit})
        status, body, _ = await call(http, method, channel="D1", **await target(), **{field: "a" * (limit + 1)})
    assert (status, body["ok"], body["error"]) == (200, False, "msg_too_long")


def _section(text: str) -> dict:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def _button(text: str, n: int = 0) -> dict:
    return {"type": "button", "action_id": f"a{n}", "text": {"type": "plain_text", "text": text}}


@pytest.mark.parametrize(
    ("ok_blocks", "bad_blocks"),
    [
        ([_section("x")] * 50, [_section("x")] * 51),
        ([_section("a" * 3_000)], [_section("a" * 3_001)]),
        (
            [{"type": "markdown", "text": "a" * 6_000}] * 2,
            [{"type": "markdown", "text": "a" * 6_000}, {"type": "markdown", "text": "a" * 6_001}],
        ),
        (
            [{"type": "context", "elements": [{"type": "mrkdwn", "text": "c"}] * 10}],
            [{"type": "context", "elements": [{"type": "mrkdwn", "text": "c"}] * 11}],
        ),
        (
            [{"type": "actions", "elements": [_button("b", n) for n in range(25)]}],
            [{"type": "actions", "elements": [_button("b", n) for n in range(26)]}],
        ),
        (
            [{"type": "actions", "elements": [_button("b" * 75)]}],
            [{"type": "actions", "elements": [_button("b" * 76)]}],
        ),
        ([{**_section("s"), "accessory": _button("b" * 75)}], [{**_section("s"), "accessory": _button("b" * 76)}]),
        (
            [{"type": "header", "text": {"type": "plain_text", "text": "h" * 150}}],
            [{"type": "header", "text": {"type": "plain_text", "text": "h" * 151}}],
        ),
    ],
    ids=[
        "50-blocks",
        "section-text",
        "markdown-cumulative",
        "context-elements",
        "actions-elements",
        "button-text",
        "accessory-button",
        "header-text",
    ],
)
@pytest.mark.parametrize("method", ["chat.postMessage", "chat.update", "chat.postEphemeral", "chat.stopStream"])
async def test_block_limits(method, ok_blocks, bad_blocks):
    fake = FakeSlack()
    parent = fake.add_user_message("C1", "U1", "question")
    async with slack_client(fake) as http:

        async def write(blocks: list) -> tuple[int, dict, httpx2.Headers]:
            args: dict = {"channel": "C1", "blocks": blocks}
            if method == "chat.update":
                args["ts"] = (await ok(http, "chat.postMessage", channel="C1", text="x"))["ts"]
            elif method == "chat.stopStream":
                args["ts"] = (
                    await ok(
                        http,
                        "chat.startStream",
                        channel="C1",
                        thread_ts=parent,
                        recipient_user_id="U1",
                        recipient_team_id="T1",
                    )
                )["ts"]
            elif method == "chat.postEphemeral":
                args["user"] = "U1"
            if method != "chat.stopStream":
                args["text"] = "fallback"
            return await call(http, method, **args)

        status, body, _ = await write(ok_blocks)
        assert status == 200 and body["ok"], body
        status, body, _ = await write(bad_blocks)
    assert (status, body["ok"], body["error"]) == (200, False, "invalid_blocks")
    assert body["response_metadata"]["messages"][0].startswith("[ERROR]")


async def test_views_keep_their_limits():
    fake = FakeSlack()
    async with slack_client(fake) as http:
        home = {"type": "home", "blocks": [_section("x")] * 100}
        await ok(http, "views.publish", user_id="U1", view=home)
        assert (
            await error(http, "views.publish", user_id="U1", view={**home, "blocks": [_section("x")] * 101})
            == "invalid_arguments"
        )
        assert (
            await error(http, "views.publish", user_id="U1", view={"type": "home", "blocks": [_section("a" * 3_001)]})
            == "invalid_blocks"
        )


# ---------------------------------------------------------------- assistant status


async def test_set_status_works_in_channel_threads_and_clears_on_reply():
    fake = FakeSlack()
    async with slack_client(fake) as http:
        await ok(http, "assistant.threads.setStatus", channel_id="C1", thread_ts="1.000001", status="is thinking…")
        await ok(http, "assistant.threads.setStatus", channel_id="D1", thread_ts="1.000002", status="is reading…")
        await ok(http, "assistant.threads.setStatus", channel_id="D1", thread_ts="1.000003", status="is writing…")
        assert fake.visible_status("C1", "1.000001") == "is thinking…"
        assert fake.visible_status("D1", "1.000002") == "is reading…"
        await ok(http, "chat.postMessage", channel="C1", thread_ts="1.000009", text="another thread")
        assert fake.visible_status("C1", "1.000001") == "is thinking…"
        await ok(http, "chat.postMessage", channel="C1", thread_ts="1.000001", text="the answer")
        assert fake.visible_status("C1", "1.000001") == ""
        await ok(http, "chat.startStream", channel="D1", thread_ts="1.000002", markdown_text="streaming")
        assert fake.visible_status("D1", "1.000002") == ""
        await ok(http, "assistant.threads.setStatus", channel_id="D1", thread_ts="1.000003", status="")
        assert fake.visible_status("D1", "1.000003") == ""
    assert fake.statuses == [
        ("C1", "1.000001", "is thinking…"),
        ("D1", "1.000002", "is reading…"),
        ("D1", "1.000003", "is writing…"),
        ("D1", "1.000003", ""),
    ]
    assert [entry[:3] for entry in fake.status_log] == fake.statuses
    assert fake.visible_status("C9", "1.000000") == ""


@virtual_time
async def test_status_expires_after_two_minutes_without_a_message():
    fake = FakeSlack()
    async with slack_client(fake) as http:
        await ok(http, "assistant.threads.setStatus", channel_id="D1", thread_ts="1.000001", status="is thinking…")
        set_at = fake.status_log[-1][3]
        await anyio.sleep(STATUS_TTL - 1)
        assert fake.visible_status("D1", "1.000001") == "is thinking…"
        await anyio.sleep(1)
        assert fake.visible_status("D1", "1.000001") == ""
        await ok(http, "assistant.threads.setStatus", channel_id="D1", thread_ts="1.000001", status="still going")
        assert fake.visible_status("D1", "1.000001") == "still going"
    assert fake.status_log[-1][3] - set_at == pytest.approx(STATUS_TTL)


# ---------------------------------------------------------------- streaming chunks


def _task(task_id: str = "t1", status: str = "in_progress", **extra) -> dict:
    return {"type": "task_update", "id": task_id, "title": "Reading report.pdf", "status": status, **extra}


async def test_task_chunks_update_one_card_per_id_and_text_chunks_add_text():
    """As Slack's assistant template streams them: a card per task id, changed in place by
    later updates of the same id; markdown_text chunks are the message's text."""
    fake = FakeSlack()
    parent = fake.add_user_message("D1", "U1", "question")
    async with slack_client(fake) as http:
        ts = (
            await ok(
                http,
                "chat.startStream",
                channel="D1",
                thread_ts=parent,
                task_display_mode="plan",
                chunks=[{"type": "plan_update", "title": "Reading the files"}, _task()],
            )
        )["ts"]
        await ok(http, "chat.appendStream", channel="D1", ts=ts, chunks=[_task(status="complete", output="3 pages")])
        await ok(http, "chat.appendStream", channel="D1", ts=ts, chunks=[{"type": "markdown_text", "text": "Hel"}])
        await ok(
            http,
            "chat.stopStream",
            channel="D1",
            ts=ts,
            chunks=[_task("t2", "error"), {"type": "markdown_text", "text": "lo"}],
            blocks=[{"type": "context", "elements": [{"type": "mrkdwn", "text": "sources"}]}],
        )
    assert fake.visible_text("D1", ts) == "Hello\nsources"
    assert fake.stream_tasks[("D1", ts)] == {
        "t1": {"title": "Reading report.pdf", "status": "complete", "output": "3 pages"},
        "t2": {"title": "Reading report.pdf", "status": "error"},
    }
    assert [u[2:] for u in fake.task_updates] == [("t1", "in_progress"), ("t1", "complete"), ("t2", "error")]
    assert [c["type"] for c in fake.stream_chunks[("D1", ts)]] == [
        "plan_update",
        "task_update",
        "task_update",
        "markdown_text",
        "task_update",
        "markdown_text",
    ]
    message = fake.messages["D1"][-1]
    assert (message["plan_title"], message["task_display_mode"]) == ("Reading the files", "plan")
    assert fake.stream_appends[("D1", ts)] == ["Hel", "lo"]


@pytest.mark.parametrize(
    ("chunks", "why"),
    [
        ({"type": "markdown_text", "text": "x"}, "an array"),
        (["text"], "object"),
        ([{"type": "card", "title": "x"}], "unknown chunk type"),
        ([{"text": "no type"}], "unknown chunk type"),
        ([{"type": "markdown_text", "text": 7}], "string `text`"),
        ([{"type": "task_update", "title": "x", "status": "complete"}], "`id`"),
        ([{"type": "task_update", "id": "t1", "status": "complete"}], "`title`"),
        ([_task(title=" ")], "`title`"),
        ([_task(status="done")], "status must be one of"),
        ([{k: v for k, v in _task().items() if k != "status"}], "status must be one of"),
        ([_task(title="t" * (CHUNK_TEXT_LIMIT + 1))], "longer than 256"),
        ([_task(details="d" * (CHUNK_TEXT_LIMIT + 1))], "longer than 256"),
        ([_task(output="o" * (CHUNK_TEXT_LIMIT + 1))], "longer than 256"),
        ([_task(sources=[{"type": "url", "url": "https://example.com"}])], "sources"),
        ([{"type": "plan_update"}], "`title`"),
        ([{"type": "plan_update", "title": "p" * (CHUNK_TEXT_LIMIT + 1)}], "longer than 256"),
        ([{"type": "blocks", "blocks": [{"type": "header", "text": {"type": "plain_text", "text": "h" * 151}}]}], ""),
    ],
)
@pytest.mark.parametrize("method", ["chat.startStream", "chat.appendStream", "chat.stopStream"])
async def test_bad_chunks_are_refused_and_change_nothing(method, chunks, why):
    fake = FakeSlack()
    parent = fake.add_user_message("D1", "U1", "question")
    async with slack_client(fake) as http:
        args: dict = {"channel": "D1", "chunks": chunks}
        if method == "chat.startStream":
            args["thread_ts"] = parent
        else:
            args["ts"] = (await ok(http, "chat.startStream", channel="D1", thread_ts=parent))["ts"]
        status, body, _ = await call(http, method, **args)
    assert status == 200 and body["error"] in ("invalid_chunks", "invalid_blocks"), body
    assert why in " ".join(body.get("response_metadata", {}).get("messages", []))
    assert fake.stream_tasks == {} and fake.stream_chunks == {}
    if method == "chat.startStream":
        assert [m["ts"] for m in fake.messages["D1"]] == [parent]  # nothing was posted
    else:
        assert fake.is_streaming("D1", args["ts"])  # a refused stop leaves the stream open


def test_chunk_limits_are_inclusive():
    at_limit = "x" * CHUNK_TEXT_LIMIT
    chunks = [_task(title=at_limit, details=at_limit, output=at_limit), {"type": "plan_update", "title": at_limit}]
    assert check_chunks(chunks) is chunks
    with pytest.raises(SlackError):
        check_chunks([_task(title=at_limit + "x")])


async def test_text_in_chunks_shares_the_markdown_text_cap():
    fake = FakeSlack()
    parent = fake.add_user_message("D1", "U1", "question")
    text = {"type": "markdown_text", "text": "a" * 6_000}
    async with slack_client(fake) as http:
        ts = (await ok(http, "chat.startStream", channel="D1", thread_ts=parent))["ts"]
        await ok(http, "chat.appendStream", channel="D1", ts=ts, chunks=[text, text, _task()])  # 12,000 in all
        status, body, _ = await call(
            http, "chat.appendStream", channel="D1", ts=ts, chunks=[text, {**text, "text": "a" * 6_001}, _task("t2")]
        )
    assert (status, body["error"]) == (200, "msg_too_long")
    assert list(fake.stream_tasks[("D1", ts)]) == ["t1"]  # the refused call changed nothing
    assert len(fake.visible_text("D1", ts)) == 12_000


async def test_one_streaming_mode_per_stream():
    """A stream started with markdown_text takes markdown_text only, one started with
    chunks takes chunks only (chat.stopStream's text too); an empty start leaves the mode
    to the first call that carries content. Blocks and metadata are not content."""
    fake = FakeSlack()
    parent = fake.add_user_message("D1", "U1", "question")
    text = {"type": "markdown_text", "text": "more"}
    async with slack_client(fake) as http:
        by_text = (await ok(http, "chat.startStream", channel="D1", thread_ts=parent, markdown_text="Hi"))["ts"]
        assert await error(http, "chat.appendStream", channel="D1", ts=by_text, chunks=[_task()]) == (
            "streaming_mode_mismatch"
        )
        await ok(http, "chat.appendStream", channel="D1", ts=by_text, markdown_text=" there")
        by_chunks = (await ok(http, "chat.startStream", channel="D1", thread_ts=parent, chunks=[_task()]))["ts"]
        assert await error(http, "chat.appendStream", channel="D1", ts=by_chunks, markdown_text="x") == (
            "streaming_mode_mismatch"
        )
        assert await error(http, "chat.stopStream", channel="D1", ts=by_chunks, markdown_text="x") == (
            "streaming_mode_mismatch"
        )
        await ok(http, "chat.appendStream", channel="D1", ts=by_chunks, chunks=[text])
        empty = (await ok(http, "chat.startStream", channel="D1", thread_ts=parent))["ts"]
        assert await error(http, "chat.appendStream", channel="D1", ts=empty, markdown_text="x", chunks=[text]) == (
            "streaming_mode_mismatch"
        )
        await ok(http, "chat.appendStream", channel="D1", ts=empty, chunks=[_task()])
        assert await error(http, "chat.appendStream", channel="D1", ts=empty, markdown_text="x") == (
            "streaming_mode_mismatch"
        )
        blocks = [{"type": "context", "elements": [{"type": "mrkdwn", "text": "done"}]}]
        await ok(http, "chat.stopStream", channel="D1", ts=empty, blocks=blocks, chunks=[])
        await ok(http, "chat.stopStream", channel="D1", ts=by_text, markdown_text="!")
    assert fake.visible_text("D1", by_text) == "Hi there!"
    assert fake.visible_text("D1", by_chunks) == "more"
    assert fake.visible_text("D1", empty) == "done"


@pytest.mark.parametrize("code", ["invalid_chunks", "invalid_arguments"])
async def test_chunks_can_be_refused_altogether(code):
    fake = FakeSlack()
    fake.refuse_chunks = code
    parent = fake.add_user_message("D1", "U1", "question")
    async with slack_client(fake) as http:
        assert await error(http, "chat.startStream", channel="D1", thread_ts=parent, chunks=[_task()]) == code
        ts = (await ok(http, "chat.startStream", channel="D1", thread_ts=parent))["ts"]
        assert await error(http, "chat.appendStream", channel="D1", ts=ts, chunks=[_task()]) == code
        await ok(http, "chat.appendStream", channel="D1", ts=ts, markdown_text="text still streams")
        assert await error(http, "chat.stopStream", channel="D1", ts=ts, chunks=[]) == code
        await ok(http, "chat.stopStream", channel="D1", ts=ts)
    assert fake.visible_text("D1", ts) == "text still streams"
    assert fake.stream_tasks == {}


async def test_task_display_mode_is_timeline_or_plan():
    fake = FakeSlack()
    parent = fake.add_user_message("D1", "U1", "question")
    async with slack_client(fake) as http:
        assert (
            await error(http, "chat.startStream", channel="D1", thread_ts=parent, task_display_mode="grid")
            == "invalid_arguments"
        )
        await ok(http, "chat.startStream", channel="D1", thread_ts=parent)
        await ok(http, "chat.startStream", channel="D1", thread_ts=parent, task_display_mode="timeline")
    assert [m.get("task_display_mode") for m in fake.messages["D1"][1:]] == ["timeline", "timeline"]


def test_the_chunks_slack_sdk_builds_pass_and_ours_are_its_models():
    """slack_sdk's own chunk models (what Bolt apps send) are accepted as they serialize,
    and the fake's notion of a chunk matches theirs field for field."""
    chunk_models = pytest.importorskip("slack_sdk.models.messages.chunk")
    built = [
        chunk_models.MarkdownTextChunk(text="Hello").to_dict(),
        chunk_models.PlanUpdateChunk(title="Thinking").to_dict(),
        chunk_models.TaskUpdateChunk(
            id="t1",
            title="Reading report.pdf",
            status="complete",
            details="3 pages",
            output="done",
            sources=[{"type": "url", "url": "https://example.com", "text": "example"}],
        ).to_dict(),
    ]
    assert check_chunks(built) == built
    for chunk in [_task(), _task(status="error"), {"type": "markdown_text", "text": "x"}]:
        assert chunk_models.Chunk.parse(chunk).to_dict() == chunk
