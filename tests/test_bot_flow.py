"""The whole text-chat path in-process, on Trio and asyncio, against the fakes."""

from __future__ import annotations

import json

import anyio
import pytest

from bot.processing.failures import BUSY_NOTICE, INTERRUPTED_NOTICE
from bot.storage import ThreadKey, open_store
from tests.fakes.openai import Behaviour
from tests.harness import eventually, running_bot, send_dm, wait_reply

pytestmark = pytest.mark.anyio


async def test_dm_is_answered_in_its_thread_and_remembered(slack, ai):
    async with running_bot(slack, ai):
        eid, ev = await send_dm(slack, "hello there")
        await wait_reply(slack, "D1", ev["ts"], "Echo: hello there")
        assert eid in slack.acks
        # A follow-up in the same thread carries the history to the model.
        _, _ev2 = await send_dm(slack, "second", thread_ts=ev["ts"])
        await wait_reply(slack, "D1", ev["ts"], "Echo: second")
    last = ai.requests[-1]["messages"]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "user"]
    assert last[1]["content"] == "hello there" and last[2]["content"] == "Echo: hello there"
    assert ai.open_streams == 0


async def test_mention_answered_once_despite_its_message_twin(slack, ai):
    async with running_bot(slack, ai):
        mention = slack.app_mention_event("C1", "U1", "what is up")
        twin = slack.message_event("C1", "U1", mention["text"], ts=mention["ts"], channel_type="channel")
        await slack.send_event(mention)
        await slack.send_event(twin)
        await wait_reply(slack, "C1", mention["ts"], "Echo: what is up")
        await anyio.sleep(0.3)
    assert len(ai.requests) == 1
    assert len(slack.bot_replies("C1", mention["ts"])) == 1


async def test_channel_followup_needs_no_mention_only_in_known_threads(slack, ai):
    async with running_bot(slack, ai):
        mention = slack.app_mention_event("C1", "U1", "start")
        await slack.send_event(mention)
        await wait_reply(slack, "C1", mention["ts"], "Echo: start")
        follow = slack.message_event("C1", "U1", "more please", thread_ts=mention["ts"], channel_type="channel")
        await slack.send_event(follow)
        await wait_reply(slack, "C1", mention["ts"], "Echo: more please")
        stranger = slack.message_event("C1", "U2", "unrelated", thread_ts="999.000", channel_type="channel")
        eid = await slack.send_event(stranger)
        await slack.wait_acked(eid)
        await anyio.sleep(0.3)
    assert len(ai.requests) == 2


async def test_second_message_in_a_busy_thread_gets_a_busy_reply(slack, ai):
    ai.enqueue(Behaviour(text="slow answer", latency=1.0))
    async with running_bot(slack, ai) as nursery:
        _, ev = await send_dm(slack, "first")
        await ai.wait_until(lambda: len(ai.requests) == 1)
        await send_dm(slack, "second", thread_ts=ev["ts"])
        await wait_reply(slack, "D1", ev["ts"], BUSY_NOTICE)
        await wait_reply(slack, "D1", ev["ts"], "slow answer")
        await eventually(lambda: nursery.outcomes.get("answered") == 1)
        assert nursery.outcomes.get("busy") == 1
    assert len(ai.requests) == 1


async def test_timeout_updates_placeholder_and_frees_the_thread(slack, ai):
    ai.enqueue(Behaviour(hang=True))
    async with running_bot(slack, ai, async_timeout_seconds=0.5) as nursery:
        _, ev = await send_dm(slack, "will hang")
        replies = await wait_reply(slack, "D1", ev["ts"], "did not finish within 0.5 seconds")
        assert len(replies) == 1
        await ai.wait_until(lambda: ai.open_streams == 0, timeout=5)
        _, _ev2 = await send_dm(slack, "again", thread_ts=ev["ts"])
        await wait_reply(slack, "D1", ev["ts"], "Echo: again")
        await eventually(lambda: nursery.gates.held == 0 and not nursery.active)
        assert nursery.outcomes["timeout"] == 1


async def test_silent_stream_is_cut_by_the_idle_deadline(slack, ai):
    ai.enqueue(Behaviour(text="partial answer that stalls", chunks=4, stall_after=2))
    async with running_bot(slack, ai, stream_idle_timeout_seconds=0.3, async_timeout_seconds=30):
        _, ev = await send_dm(slack, "stall")
        replies = await wait_reply(slack, "D1", ev["ts"], "stopped sending its answer")
        assert replies[0].startswith("partial")  # the text that did arrive stays
        await ai.wait_until(lambda: ai.open_streams == 0, timeout=5)


@pytest.mark.parametrize(
    "behaviour, expected",
    [
        (Behaviour(status=429), "rate-limiting"),
        (Behaviour(status=429, error_code="insufficient_quota"), "out of quota"),
        (Behaviour(status=400, error_code="context_length_exceeded"), "too long for the model"),
        (Behaviour(status=401), "OPENAI_API_KEY"),
        (Behaviour(status=404), "OPENAI_MODEL"),
        (Behaviour(status=500), "internal error"),
        (Behaviour(text="abc def ghi", cut_after=1), "could not reach OpenAI"),
    ],
)
async def test_openai_failures_become_clear_lines(slack, ai, behaviour, expected):
    ai.script = lambda request: behaviour  # every attempt (the SDK retries some) fails alike
    async with running_bot(slack, ai, async_timeout_seconds=30):
        _, ev = await send_dm(slack, "hi")
        replies = await wait_reply(slack, "D1", ev["ts"], expected, timeout=20)
    assert "Traceback" not in replies[0]


async def test_slack_rate_limit_on_update_is_honoured(slack, ai):
    slack.fail_next("chat.update", status=429, retry_after=0.2, times=2)
    async with running_bot(slack, ai):
        _, ev = await send_dm(slack, "rate me")
        await wait_reply(slack, "D1", ev["ts"], "Echo: rate me")


async def test_redelivered_envelope_is_acked_and_answered_once(slack, ai):
    async with running_bot(slack, ai):
        ev = slack.message_event("D1", "U1", "once only", channel_type="im")
        await slack.send_event(ev, event_id="EvSame")
        await slack.send_event(ev, event_id="EvSame", retry_attempt=1)
        await wait_reply(slack, "D1", ev["ts"], "Echo: once only")
        await anyio.sleep(0.3)
        assert all(e in slack.acks for e in slack.deliveries)
    assert len(ai.requests) == 1


async def test_bad_input_is_acked_logged_and_survived(slack, ai, caplog):
    async with running_bot(slack, ai):
        await slack.send_raw("{not json")
        await slack.send_raw(json.dumps([1, 2]))
        await slack.send_raw(json.dumps({"type": "mystery"}))
        bad_ids = [
            await slack.send_envelope("events_api", {"event": "nope"}),
            await slack.send_envelope("events_api", {"event": {"type": "message"}}),
            await slack.send_envelope("weird_type", {"x": 1}),
            await slack.send_event({"type": "reaction_added", "user": "U1"}),
        ]
        big = "word " * 20_000  # 100 kB
        _, ev = await send_dm(slack, big)
        await wait_reply(slack, "D1", ev["ts"], "Echo: word")
        assert all(e in slack.acks for e in bad_ids)
        _, ev2 = await send_dm(slack, "still alive?")
        await wait_reply(slack, "D1", ev2["ts"], "Echo: still alive?")
    assert "not JSON" in caplog.text


async def test_disconnect_and_drop_lose_nothing(slack, ai):
    async with running_bot(slack, ai) as nursery:
        _, ev = await send_dm(slack, "before")
        await wait_reply(slack, "D1", ev["ts"], "Echo: before")
        await slack.disconnect("refresh_requested")
        await slack.wait_until(lambda: slack.connections_opened >= 2 and len(slack.live_connections) == 1)
        _, ev2 = await send_dm(slack, "after refresh")
        await wait_reply(slack, "D1", ev2["ts"], "Echo: after refresh")
        await slack.drop()
        await slack.wait_until(lambda: slack.connections_opened >= 3 and len(slack.live_connections) == 1)
        _, ev3 = await send_dm(slack, "after drop")
        await wait_reply(slack, "D1", ev3["ts"], "Echo: after drop")
        assert nursery.reader.reconnects.get("refresh_requested") == 1
        assert nursery.reader.reconnects.get("dropped") == 1
    assert len(ai.requests) == 3


async def test_silent_socket_is_replaced(slack, ai):
    async with running_bot(slack, ai, socket_ping_interval_seconds=0.1):
        slack.silence()
        await slack.wait_until(lambda: slack.connections_opened >= 2 and len(slack.live_connections) == 1, timeout=5)
        _, ev = await send_dm(slack, "new socket")
        await wait_reply(slack, "D1", ev["ts"], "Echo: new socket")


async def test_mention_in_unknown_thread_rebuilds_history_from_slack(slack, ai):
    parent = slack.add_user_message("C1", "U2", "the plan is to ship friday")
    slack.add_user_message("C1", "U3", "agreed", thread_ts=parent)
    async with running_bot(slack, ai):
        mention = slack.app_mention_event("C1", "U1", "summarise", thread_ts=parent)
        await slack.send_event(mention)
        await wait_reply(slack, "C1", parent, "Echo: summarise")
    contents = [m["content"] for m in ai.requests[-1]["messages"]]
    assert contents[1:] == ["the plan is to ship friday", "agreed", "summarise"]


async def test_shutdown_interrupts_requests_in_flight(slack, ai, tmp_path):
    ai.enqueue(Behaviour(hang=True))
    url = f"sqlite:///{tmp_path}/bot.db"
    store = await open_store(url)
    try:
        async with running_bot(slack, ai, store=store, async_timeout_seconds=60) as nursery:
            _, ev = await send_dm(slack, "long one")
            await ai.wait_until(lambda: ai.open_streams == 1)
        assert slack.bot_replies("D1", ev["ts"]) == [INTERRUPTED_NOTICE]
        assert ai.open_streams == 0
        assert nursery.gates.held == 0 and not nursery.active
        assert await store.in_flight() == []
        assert await store.thread_known(ThreadKey("D1", ev["ts"]))
    finally:
        await store.aclose()


async def test_restart_marks_requests_left_in_flight_interrupted(slack, ai, tmp_path):
    url = f"sqlite:///{tmp_path}/bot.db"
    store = await open_store(url)
    placeholder = slack.add_user_message("D1", "UBOT", "_Thinking…_")  # what the dead process left
    thread = ThreadKey("D1", "1.0")
    fence = await store.acquire_lease(thread, "local", ttl=600)  # "local": the test settings' REPLICA_ID
    assert fence is not None
    assert await store.start_request(
        "dead1", thread, user_ts="1.0", placeholder_ts=placeholder, started_at=0.0, owner="local", fence=fence
    )
    await store.aclose()
    store = await open_store(url)
    try:
        async with running_bot(slack, ai, store=store):
            await slack.wait_until(
                lambda: any(
                    m.get("ts") == placeholder and INTERRUPTED_NOTICE in (m.get("markdown_text") or m.get("text") or "")
                    for m in slack.messages["D1"]
                )
            )
        assert await store.in_flight() == []
    finally:
        await store.aclose()


async def test_long_answer_is_split_without_breaking_code(slack, ai):
    code = "\n".join(f"line_{i} = {i}" for i in range(1500))
    ai.enqueue(Behaviour(text="Here:\n\n```python\n" + code + "\n```\nDone.", chunks=30))
    async with running_bot(slack, ai):
        _, ev = await send_dm(slack, "long code")
        replies = await wait_reply(slack, "D1", ev["ts"], "Done.")
    assert len(replies) >= 2
    assert all(len(r) <= 12_000 for r in replies)
    for r in replies:
        assert sum(1 for line in r.splitlines() if line.startswith("```")) % 2 == 0


async def test_queued_requests_say_they_are_waiting(slack, ai):
    ai.script = lambda request: Behaviour(text="ok " + request["messages"][-1]["content"], latency=0.5)
    async with running_bot(slack, ai, async_max_concurrent_requests=1):
        _, a = await send_dm(slack, "a", channel="D1")
        _, b = await send_dm(slack, "b", channel="D2")
        await slack.wait_until(
            lambda: any("Waiting for a free slot" in t for texts in slack.updates.values() for t in texts)
        )
        await wait_reply(slack, "D1", a["ts"], "ok a")
        await wait_reply(slack, "D2", b["ts"], "ok b")
    assert ai.max_open_streams == 1


async def test_slack_refusing_the_placeholder_is_explained_once_possible(slack, ai):
    slack.fail_next("chat.postMessage", error="channel_not_found")
    async with running_bot(slack, ai):
        _, ev = await send_dm(slack, "hello")
        replies = await wait_reply(slack, "D1", ev["ts"], "channel_not_found")
    assert len(replies) == 1 and "Slack returned an error" in replies[0]
    # The model is asked beside the opening, not after it: the refused post cut that
    # request short (the request ended with it, its one line the only reply).
    assert len(ai.requests) <= 1


async def test_unexpected_web_api_errors_while_streaming_do_not_lose_the_answer(slack, ai):
    slack.fail_next("chat.update", status=502, body="<html>Bad gateway</html>")
    slack.fail_next("chat.update", error="internal_error")
    ai.enqueue(Behaviour(text="a complete answer in pieces", chunks=6, chunk_delay=0.05))
    async with running_bot(slack, ai):
        _, ev = await send_dm(slack, "go")
        replies = await wait_reply(slack, "D1", ev["ts"], "a complete answer in pieces")
    assert replies == ["a complete answer in pieces"]


async def test_storage_failure_is_a_clear_line(slack, ai):
    from bot.storage import StorageError

    store = await open_store("sqlite:///:memory:")

    class FailingStore:
        def __getattr__(self, name):
            return getattr(store, name)

        async def start_request(self, *args, **kwargs):
            raise StorageError("start_request failed: database or disk is full")

    try:
        async with running_bot(slack, ai, store=FailingStore()):
            _, ev = await send_dm(slack, "save me")
            replies = await wait_reply(slack, "D1", ev["ts"], "could not save this conversation")
        assert len(replies) == 1
    finally:
        await store.aclose()


@pytest.mark.parametrize("native", [True, False])
async def test_the_model_request_does_not_wait_for_the_placeholder(slack, ai, native):
    """The answer is opened (recorded, then posted) beside the model request: with Slack
    slow to post, the model is asked first, and its answer still lands in that message."""
    opened_at: list[float] = []

    async def slow_to_open(request):
        method = request.url.path.rsplit("/", 1)[-1]
        if method in ("chat.startStream", "chat.postMessage") and not opened_at:
            await anyio.sleep(0.5)
            opened_at.append(anyio.current_time())
        return await slack.handle(request)

    ai.enqueue(Behaviour(text="answered while Slack was slow", latency=0.8))
    async with running_bot(slack, ai, slack_handler=slow_to_open, native_streaming=native) as bot:
        _, ev = await send_dm(slack, "are you quick?")
        asked = anyio.current_time()
        await eventually(lambda: bool(ai.requests), timeout=5)
        assert not opened_at, "the model was asked only after the answer was opened"
        asked = anyio.current_time() - asked
        replies = await wait_reply(slack, "D1", ev["ts"], "answered while Slack was slow")
        await eventually(lambda: bot.outcomes.get("answered") == 1)
    assert asked < 0.5
    assert replies == ["answered while Slack was slow"]  # one message: the opened one


async def test_a_follow_up_sent_as_the_answer_shows_waits_for_the_request_to_close(slack, ai):
    """The answer shows before its request lets the thread go (the thread's status is
    cleared after the final edit, then the outcome is recorded): a follow-up sent in that
    moment is answered, not told "busy"."""
    slack.latency["assistant.threads.setStatus"] = 1.0  # the clear after the answer: 1 s
    ai.enqueue(Behaviour(text="Echo: first", latency=1.5))  # slow: the thread's status shows
    async with running_bot(slack, ai, native_streaming=True) as nursery:
        _, ev = await send_dm(slack, "first")
        await wait_reply(slack, "D1", ev["ts"], "Echo: first")
        assert nursery.active  # still closing: the status clear is under way
        await send_dm(slack, "second", thread_ts=ev["ts"])
        await wait_reply(slack, "D1", ev["ts"], "Echo: second")
        await eventually(lambda: not nursery.active)
    assert BUSY_NOTICE not in slack.bot_replies("D1", ev["ts"])
    assert nursery.outcomes == {"answered": 2}
