"""Answers the way Slack's AI apps show them, on Trio and asyncio: native chat streaming
(and its fallback to paced chat.update), thread status and title, feedback buttons."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx2
import pytest

from bot.processing.surface import SurfaceError
from bot.slack.answer_surface import SlackAnswerWriter, assistant_status, thread_title
from bot.slack.web_api import SlackWebAPI
from tests.fakes.openai import Behaviour
from tests.fakes.slack import FakeSlack
from tests.harness import eventually, running_bot, send_dm, wait_reply

pytestmark = pytest.mark.anyio

ANSWER = "The quick brown fox jumps over the lazy dog, twice over and again."


@asynccontextmanager
async def web_api(slack: FakeSlack) -> AsyncIterator[SlackWebAPI]:
    """The bot's Web API client, over the fake without a socket (for a writer alone)."""
    async with httpx2.AsyncClient(transport=httpx2.MockTransport(slack.handle)) as http:
        yield SlackWebAPI(
            bot_token=slack.bot_token, app_token=slack.app_token, base_url="http://slack.test/api/", client=http
        )


def methods(slack: FakeSlack) -> list[str]:
    return [m for m, _ in slack.calls]


async def test_dm_answer_streams_natively_with_status_title_and_feedback(slack, ai):
    ai.enqueue(Behaviour(text=ANSWER, chunks=8, chunk_delay=0.03))
    async with running_bot(slack, ai, native_streaming=True, update_interval_seconds=0.05):
        _, ev = await send_dm(slack, "Tell me about the fox\nand more")
        replies = await wait_reply(slack, "D1", ev["ts"], ANSWER)
        await slack.wait_until(lambda: not slack.messages["D1"][-1].get("streaming"))
    assert replies == [ANSWER]
    called = methods(slack)
    assert called.count("chat.startStream") == 1 and "chat.postMessage" not in called
    assert called.count("chat.stopStream") == 1
    appends = slack.stream_appends[("D1", slack.messages["D1"][-1]["ts"])]
    assert "".join(appends) == ANSWER
    assert 1 <= called.count("chat.appendStream") < 8  # coalesced, not one call per chunk
    message = slack.messages["D1"][-1]
    assert message["thread_ts"] == ev["ts"]
    assert message["blocks"][-1]["type"] == "context_actions"
    assert message["blocks"][-1]["elements"][0]["type"] == "feedback_buttons"
    assert ("D1", ev["ts"], "is thinking…") in slack.statuses
    assert slack.statuses[-1] == ("D1", ev["ts"], "")  # cleared at the end
    assert slack.titles[("D1", ev["ts"])] == "Tell me about the fox"
    assert "chat.update" not in called


async def test_an_answer_posted_when_done_leaves_the_status_for_slack_to_clear(slack, ai):
    """With chat.update's budget spent, the answer is posted when done: that reply clears
    the thread status on Slack's side, so the bot does not spend a call clearing it."""
    ai.enqueue(Behaviour(text="Echo: budget is low", latency=0.5))  # long enough for a status to show
    async with running_bot(slack, ai, native_streaming=False) as bot:
        bucket = bot.services.slack.limits.bucket("chat.update")
        while bucket.available():
            bucket.reserve()
        _, ev = await send_dm(slack, "budget is low")
        replies = await wait_reply(slack, "D1", ev["ts"], "Echo: budget is low")
    assert replies == ["Echo: budget is low"]
    assert ("D1", ev["ts"], "is thinking…") in slack.statuses
    assert ("D1", ev["ts"], "") not in slack.statuses  # not cleared by hand
    assert slack.visible_status("D1", ev["ts"]) == ""  # Slack cleared it when the answer was posted
    assert "chat.update" not in methods(slack)


async def test_message_not_in_streaming_state_falls_back_to_chat_update(slack, ai):
    ai.enqueue(Behaviour(text=ANSWER, chunks=10, chunk_delay=0.05))
    async with running_bot(slack, ai, native_streaming=True, update_interval_seconds=0.05):
        _, ev = await send_dm(slack, "fox")
        await slack.wait_until(lambda: "chat.appendStream" in methods(slack))
        stream_ts = slack.messages["D1"][-1]["ts"]
        slack.end_stream("D1", stream_ts)  # Slack expired the stream
        replies = await wait_reply(slack, "D1", ev["ts"], ANSWER)
        await eventually(lambda: any(m == "chat.update" and a.get("blocks") for m, a in slack.calls))
    assert replies == [ANSWER]  # the same message carries on; nothing duplicated
    called = methods(slack)
    assert "chat.update" in called and "chat.postMessage" not in called
    final = slack.messages["D1"][-1]
    assert final["ts"] == stream_ts
    assert final["blocks"][-1]["type"] == "context_actions"  # feedback buttons through chat.update


async def test_slack_without_streaming_gets_a_placeholder(slack, ai):
    slack.streaming_supported = False
    async with running_bot(slack, ai, native_streaming=True):
        _, ev = await send_dm(slack, "old slack")
        replies = await wait_reply(slack, "D1", ev["ts"], "Echo: old slack")
    assert replies == ["Echo: old slack"]
    called = methods(slack)
    assert called.index("chat.startStream") < called.index("chat.postMessage")


async def test_channels_use_chat_update(slack, ai):
    async with running_bot(slack, ai, native_streaming=True):
        mention = slack.app_mention_event("C1", "U1", "in a channel")
        await slack.send_event(mention)
        await wait_reply(slack, "C1", mention["ts"], "Echo: in a channel")
    called = methods(slack)
    assert "chat.startStream" not in called and "assistant.threads.setStatus" not in called


async def test_long_answers_leave_the_stream_and_continue_in_more_messages(slack, ai):
    code = "\n".join(f"line_{i} = {i}" for i in range(1500))
    text = "Here:\n\n```python\n" + code + "\n```\nDone."
    ai.enqueue(Behaviour(text=text, chunks=30))
    async with running_bot(slack, ai, native_streaming=True):
        _, ev = await send_dm(slack, "long code")
        replies = await wait_reply(slack, "D1", ev["ts"], "Done.")
    assert len(replies) >= 2 and all(len(r) <= 12_000 for r in replies)
    assert "".join(replies).count("line_1499 = 1499") == 1


async def test_timeout_in_a_native_stream_is_said_in_the_message(slack, ai):
    ai.enqueue(Behaviour(hang=True))
    async with running_bot(slack, ai, native_streaming=True, async_timeout_seconds=0.5):
        _, ev = await send_dm(slack, "will hang")
        replies = await wait_reply(slack, "D1", ev["ts"], "did not finish within 0.5 seconds")
    assert len(replies) == 1
    assert "feedback_buttons" not in str(slack.messages["D1"][-1].get("blocks"))  # nothing to rate


async def test_feedback_click_is_recorded(slack, ai):
    async with running_bot(slack, ai, native_streaming=True) as nursery:
        _, ev = await send_dm(slack, "rate me")
        await wait_reply(slack, "D1", ev["ts"], "Echo: rate me")
        answer_ts = slack.messages["D1"][-1]["ts"]
        await slack.wait_until(lambda: slack.messages["D1"][-1].get("blocks"))
        block = slack.messages["D1"][-1]["blocks"][-1]
        action = {
            "action_id": "answer_feedback",
            "type": "feedback_buttons",
            "block_id": block.get("block_id", "f"),
            "value": "bad",
        }
        eid = await slack.click(action, user="U1", message=("D1", answer_ts))
        await slack.wait_acked(eid)
        store = nursery.services.store
        await _wait_feedback(store, "D1", answer_ts, {"U1": "bad"})
        await slack.click({**action, "value": "good"}, user="U1", message=("D1", answer_ts))
        await slack.click({**action, "value": "good"}, user="U2", message=("D1", answer_ts))
        await _wait_feedback(store, "D1", answer_ts, {"U1": "good", "U2": "good"})


async def _wait_feedback(store, channel, ts, expected):
    with anyio.fail_after(5):
        while await store.feedback_for(channel, ts) != expected:
            await anyio.sleep(0.02)


@pytest.mark.parametrize("mode", ["native", "update"])
async def test_withdraw_deletes_the_answers_first_message_a_stream_stopped_first(mode):
    """An answer whose request passed to another replica that did not know of its first
    message: that message is deleted. Slack refuses to delete a message still streaming,
    so a native stream is stopped first; the final writes promised in the budgets are
    given back (none will come)."""
    slack = FakeSlack()
    async with web_api(slack) as api:
        ts = slack.add_user_message("D1", "U1", "hi")
        writer = SlackAnswerWriter(api, "D1", ts, mode=mode, reply_to=ts, request_id="r1")
        opened = await writer.start()
        assert slack.is_streaming("D1", opened) == (mode == "native")
        assert api.limits.bucket("chat.update").committed + api.limits.bucket("chat.stopStream").committed == 1
        await writer.withdraw()
        assert ("D1", opened) in slack.deleted and slack.bot_replies("D1", ts) == []
        on_it = [m for m, args in slack.calls if args.get("ts") == opened]
        assert on_it == (["chat.stopStream", "chat.delete"] if mode == "native" else ["chat.delete"])
        assert api.limits.bucket("chat.update").committed == api.limits.bucket("chat.stopStream").committed == 0
        await writer.withdraw()  # already gone: withdrawn all the same


async def test_withdraw_says_when_slack_refuses():
    slack = FakeSlack()
    async with web_api(slack) as api:
        ts = slack.add_user_message("D1", "U1", "hi")
        writer = SlackAnswerWriter(api, "D1", ts, mode="update", reply_to=ts, request_id="r1")
        opened = await writer.start()
        slack.fail_next("chat.delete", status=200, error="cant_delete_message")
        with pytest.raises(SurfaceError) as refused:
            await writer.withdraw()
        assert refused.value.code == "cant_delete_message"
        assert slack.visible_text("D1", opened)  # still there


async def test_appends_are_paced_and_coalesced():
    slack = FakeSlack()
    async with web_api(slack) as api:
        ts = slack.add_user_message("D1", "U1", "hi")
        writer = SlackAnswerWriter(api, "D1", ts, mode="native", interval=0.2)
        await writer.start()
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            for i in range(20):
                writer.append(f"word{i} ")
                await anyio.sleep(0.02)
            await anyio.sleep(0.3)
            tg.cancel_scope.cancel()
        assert await writer.finish("")
    # 20 deltas over ~0.4 s with a 0.2 s interval: a handful of appends, not 20
    assert 1 <= writer.appends_sent <= 4
    assert slack.messages["D1"][-1]["text"] == "".join(f"word{i} " for i in range(20))


@pytest.mark.parametrize("mode", ["native", "update"])
async def test_the_first_text_is_not_held_back_by_a_status_shown_just_before(mode):
    """A status flush (the model slot taken, a file read) starts the pacing interval;
    the answer's first words arriving right after must still go out at once: pacing
    applies to the text after them."""
    slack = FakeSlack()
    async with web_api(slack) as api:
        ts = slack.add_user_message("D1", "U1", "hi")
        writer = SlackAnswerWriter(api, "D1", ts, mode=mode, interval=5.0)
        answer_ts = await writer.start()
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            writer.set_status("_Reading a file…_")
            await anyio.sleep(0.1)  # the status is flushed; the 5 s pause begins
            writer.append("First words")
            with anyio.fail_after(2):  # well inside the interval
                while "First words" not in (slack._find("D1", answer_ts) or {}).get("text", ""):
                    await anyio.sleep(0.01)
            writer.append(", then more")
            await anyio.sleep(0.3)
            assert ", then more" not in slack._find("D1", answer_ts)["text"]  # the rest is paced
            tg.cancel_scope.cancel()
        assert await writer.finish("")


@pytest.mark.parametrize("mode", ["native", "update"])
async def test_writes_wait_while_the_request_may_not_write(mode):
    """While `may_write` says no (the thread's lease not surely the request's: its
    process fell behind, say after a pause), no status, append or edit goes out; once
    it says yes again, what came meanwhile is written."""
    slack = FakeSlack()
    allowed = True
    async with web_api(slack) as api:
        ts = slack.add_user_message("D1", "U1", "hi")
        writer = SlackAnswerWriter(api, "D1", ts, mode=mode, interval=0.05, may_write=lambda: allowed)
        answer_ts = await writer.start()
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            writer.append("First words")
            await eventually(lambda: "First words" in (slack._find("D1", answer_ts) or {}).get("text", ""), timeout=2)
            allowed = False
            await anyio.sleep(0.1)  # (a write already under way finishes)
            before = len(slack.calls)
            writer.set_status("_Reading a file…_")
            writer.append(", then more")
            await anyio.sleep(0.5)  # ten ticks
            assert slack.calls[before:] == []
            allowed = True
            await eventually(lambda: ", then more" in (slack._find("D1", answer_ts) or {}).get("text", ""), timeout=2)
            tg.cancel_scope.cancel()
        assert await writer.finish("")


async def test_a_native_answer_never_opened_is_posted_as_one_message():
    """The request ended before its answer was opened (storage refused to record it):
    its one line is posted; there is no stream to stop."""
    slack = FakeSlack()
    async with web_api(slack) as api:
        ts = slack.add_user_message("D1", "U1", "hi")
        writer = SlackAnswerWriter(api, "D1", ts, mode="native", reply_to=ts, request_id="r1")
        assert await writer.finish("the notice")
    assert "chat.stopStream" not in methods(slack)
    assert slack.bot_replies("D1", ts) == ["the notice"]


async def test_only_a_native_stream_is_an_unmarked_opening():
    slack = FakeSlack()
    async with web_api(slack) as api:
        ts = slack.add_user_message("D1", "U1", "hi")
        for mode, marked in (("native", False), ("update", True), ("final", True)):
            writer = SlackAnswerWriter(api, "D1", ts, mode=mode, reply_to=ts, request_id=f"r-{mode}")
            assert await writer.start()
            assert writer.opening_marked is marked, mode
            assert await writer.finish("")
        placeholder = [m for m in slack.thread_messages("D1", ts) if m.get("bot_id")][1]
        # (finished: its receipt replaced what it said while open)
        assert placeholder["metadata"]["event_payload"]["request_id"] == "r-update"


def test_status_and_title_wording():
    assert assistant_status("_Thinking…_") == "is thinking…"
    assert assistant_status("_Reading report.pdf…_") == "is reading report.pdf…"
    assert assistant_status("is busy") == "is busy"
    assert thread_title("How do I\nconfigure this?") == "How do I"
    long = thread_title("word " * 40)
    assert len(long) <= 61 and long.endswith("…")
