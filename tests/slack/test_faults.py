"""Slack-side faults during answers, on both backends: bursts of 5xx and 429, a post that
Slack made although it answered 5xx, a short outage of the whole Web API, a slow Web API,
a stream that Slack ended on its own. Every message is answered once, or told clearly
why not; nothing is shown twice; nothing is stored as answered that Slack does not show."""

from __future__ import annotations

import anyio
import pytest

from bot.storage import ThreadKey, open_store
from tests.fakes.openai import Behaviour
from tests.harness import eventually, running_bot, send_dm, wait_reply

pytestmark = pytest.mark.anyio


def _bot_messages(slack, channel: str, thread_ts: str) -> list[dict]:
    return [
        m for m in slack.thread_messages(channel, thread_ts) if m.get("bot_id") == slack.bot_id and m["ts"] != thread_ts
    ]


async def test_a_post_that_slack_made_before_answering_5xx_is_shown_once(slack, ai):
    slack.fail_next("chat.postMessage", status=503, error="internal_error", after=True)
    async with running_bot(slack, ai) as nursery:
        _, ev = await send_dm(slack, "hello")
        await wait_reply(slack, "D1", ev["ts"], "Echo: hello")
        await eventually(lambda: nursery.outcomes.get("answered") == 1)
    assert slack.bot_replies("D1", ev["ts"]) == ["Echo: hello"]  # one message, the placeholder edited
    assert [m for m, _ in slack.calls].count("conversations.replies") == 1  # looked before posting again
    assert [m for m, _ in slack.calls].count("chat.postMessage") == 1  # never posted a second time


async def test_bursts_of_5xx_and_429_during_answers_lose_nothing(slack, ai):
    ai.script = lambda request: Behaviour(latency=0.2, chunks=6, chunk_delay=0.05)
    slack.fail_next("chat.postMessage", status=500, times=3)  # not posted: posted again after a look
    slack.fail_next("chat.update", status=502, body="<html>Bad Gateway</html>", times=4)
    slack.fail_next("chat.update", status=429, retry_after=0.5, times=2)
    async with running_bot(slack, ai) as nursery:
        events = []
        for i in range(6):
            channel = f"D{i}"
            _, ev = await send_dm(slack, f"q{i}", channel=channel, user=f"U{i}")
            events.append((channel, ev["ts"], i))
        for channel, ts, i in events:
            await wait_reply(slack, channel, ts, f"Echo: q{i}", timeout=15)
        await eventually(lambda: sum(nursery.outcomes.values()) == 6, timeout=15)
        assert nursery.outcomes == {"answered": 6}
    for channel, ts, i in events:
        assert slack.bot_replies(channel, ts) == [f"Echo: q{i}"]
    assert slack.calls_in_retry_after == []


async def test_a_short_outage_of_the_whole_web_api_still_answers_everyone(slack, ai):
    ai.script = lambda request: Behaviour(latency=0.3, chunks=3, chunk_delay=0.05)
    async with running_bot(slack, ai, async_timeout_seconds=20) as nursery:
        slack.outage(1.5)
        events = []
        for i in range(4):
            _, ev = await send_dm(slack, f"q{i}", channel=f"D{i}", user=f"U{i}")
            events.append((f"D{i}", ev["ts"], i))
        for channel, ts, i in events:
            await wait_reply(slack, channel, ts, f"Echo: q{i}", timeout=25)
        await eventually(lambda: sum(nursery.outcomes.values()) == 4, timeout=10)
        assert nursery.outcomes == {"answered": 4}
    for channel, ts, i in events:
        assert slack.bot_replies(channel, ts) == [f"Echo: q{i}"]  # once each


async def test_a_slow_web_api_delays_answers_but_loses_none(slack, ai):
    slack.latency["*"] = 0.4
    async with running_bot(slack, ai, native_streaming=True, async_timeout_seconds=20) as nursery:
        events = []
        for i in range(4):
            _, ev = await send_dm(slack, f"slow {i}", channel=f"D{i}", user=f"U{i}")
            events.append((f"D{i}", ev["ts"], i))
        for channel, ts, i in events:
            await wait_reply(slack, channel, ts, f"Echo: slow {i}", timeout=20)
        await eventually(lambda: sum(nursery.outcomes.values()) == 4, timeout=20)
        assert nursery.outcomes == {"answered": 4}
    for channel, ts, _ in events:
        assert not any(slack.is_streaming(channel, m["ts"]) for m in _bot_messages(slack, channel, ts))


async def test_a_stream_that_slack_cannot_stop_is_never_stored_as_answered(slack, ai, tmp_path):
    """chat.stopStream keeps failing and the message stays in streaming state, so its
    final text cannot be written (Slack refuses edits while streaming): the request must
    not be recorded as answered."""
    ai.enqueue(Behaviour(text="A streamed answer.", chunks=3, chunk_delay=0.05))
    slack.fail_next("chat.stopStream", error="internal_error", times=50)  # refused, not a 5xx: no retries
    store = await open_store(f"sqlite:///{tmp_path}/bot.db")
    try:
        async with running_bot(slack, ai, store=store, native_streaming=True) as nursery:
            _, ev = await send_dm(slack, "stream it")
            await eventually(lambda: sum(nursery.outcomes.values()) == 1, timeout=15)
            assert nursery.outcomes == {"error": 1}
            assert await store.load_history(ThreadKey("D1", ev["ts"])) == []
            assert await store.in_flight() == []
    finally:
        with anyio.CancelScope(shield=True):
            await store.aclose()


async def test_a_long_answer_keeps_its_feedback_buttons_with_a_short_fallback_text(slack, ai):
    """chat.update's `text` takes at most 4,000 characters: the buttons go out in the final
    write with the answer in a markdown block and a short notification text beside it."""
    long_answer = ("A long paragraph of an answer that goes on. " * 200).strip()  # ~9,000 characters
    ai.enqueue(Behaviour(text=long_answer, chunks=4))
    async with running_bot(slack, ai) as nursery:
        _, ev = await send_dm(slack, "tell me everything")
        await wait_reply(slack, "D1", ev["ts"], long_answer[-40:])
        await eventually(lambda: nursery.outcomes.get("answered") == 1)
    (message,) = _bot_messages(slack, "D1", ev["ts"])
    assert message["blocks"][0] == {"type": "markdown", "text": long_answer}
    assert message["blocks"][-1]["elements"][0]["type"] == "feedback_buttons"
    assert len(message["text"]) <= 300 and long_answer.startswith(message["text"].rstrip("…"))
    assert slack.visible_text("D1", message["ts"]).startswith(long_answer)


async def test_model_output_cannot_ping_the_channel(slack, ai):
    ai.enqueue(Behaviour(text="Heads up <!channel> and <!subteam^S1|@devs>, ask <@U7>.", chunks=6))
    async with running_bot(slack, ai) as nursery:
        _, ev = await send_dm(slack, "announce")
        await eventually(lambda: nursery.outcomes.get("answered") == 1)
    shown = " ".join(slack.bot_replies("D1", ev["ts"]))
    every_text = " ".join(str(args) for method, args in slack.calls if method.startswith("chat."))
    assert "<!channel>" not in every_text and "<!subteam" not in every_text
    assert "@\u2060channel" in shown and "@\u2060devs" in shown and "<@U7>" in shown
