""" "Try again" under failure notices, end to end against the fakes (Trio and asyncio):
every failure's notice shows the button (chat.update mode, native streaming, the busy
and storage notices, interrupted by a restart); pressing it runs the same question again
in the same thread, once per notice, only for its asker, through the thread's gate."""

from __future__ import annotations

import pytest

from bot.processing.failures import BUSY_NOTICE, INTERRUPTED_NOTICE
from bot.slack.try_again import TRY_AGAIN_ACTION
from bot.storage import open_store
from bot.storage.base import ThreadKey
from tests.block_kit import check_calls
from tests.fakes.openai import Behaviour, last_user_text
from tests.harness import eventually, running_bot, send_dm, wait_reply

pytestmark = pytest.mark.anyio

TIMEOUT_LINE = "did not finish within"


def try_again_buttons(slack, channel: str, thread_ts: str) -> list[tuple[str, str]]:
    """(message ts, button value) of every "Try again" the bot's messages in the thread show."""
    return [
        (m["ts"], b.get("value", ""))
        for m in slack.thread_messages(channel, thread_ts)
        for b in slack.buttons(channel, m["ts"])
        if b.get("action_id") == TRY_AGAIN_ACTION
    ]


def asked(ai) -> list[str]:
    return [last_user_text(r) for r in ai.requests]


async def test_a_timeout_notice_offers_try_again_which_answers_the_same_question_once(slack, ai):
    ai.enqueue(Behaviour(hang=True))
    async with running_bot(slack, ai, async_timeout_seconds=0.5) as nursery:
        _, ev = await send_dm(slack, "what is the capital of France?")
        await wait_reply(slack, "D1", ev["ts"], TIMEOUT_LINE)
        [(notice_ts, value)] = try_again_buttons(slack, "D1", ev["ts"])
        assert value == ev["ts"]  # the button names the question it answers

        await slack.wait_acked(await slack.press("D1", notice_ts, TRY_AGAIN_ACTION))
        await wait_reply(slack, "D1", ev["ts"], "Echo: what is the capital of France?")
        assert asked(ai) == ["what is the capital of France?"] * 2
        # The notice says who asked, and its button is gone: it works once.
        assert try_again_buttons(slack, "D1", ev["ts"]) == []
        assert "<@U1> asked to try again" in slack.visible_text("D1", notice_ts)
        assert TIMEOUT_LINE in slack.visible_text("D1", notice_ts)

        # A second click that was on its way (a double click, a redelivery) does nothing
        # but say so.
        stale = {"type": "button", "action_id": TRY_AGAIN_ACTION, "block_id": "try_again", "value": ev["ts"]}
        await slack.wait_acked(await slack.click(stale, message=("D1", notice_ts)))
        await slack.wait_until(lambda: len(slack.ephemerals) == 1)
        assert "tried again already" in slack.ephemerals[0]["text"]
        await eventually(lambda: not nursery.active)
        assert len(ai.requests) == 2
        assert nursery.outcomes == {"timeout": 1, "answered": 1}
    assert check_calls(slack.calls) > 0  # every message built is valid Block Kit


async def test_a_native_stream_that_failed_keeps_its_text_and_offers_try_again(slack, ai):
    ai.enqueue(Behaviour(text="The first part of an answer that", chunks=4, error_after=2))
    async with running_bot(slack, ai, native_streaming=True) as nursery:
        _, ev = await send_dm(slack, "explain streams")
        await wait_reply(slack, "D1", ev["ts"], "OpenAI")
        [(stream_ts, value)] = try_again_buttons(slack, "D1", ev["ts"])
        assert value == ev["ts"]
        partial = slack.visible_text("D1", stream_ts)
        assert partial.startswith("The first")

        await slack.wait_acked(await slack.press("D1", stream_ts, TRY_AGAIN_ACTION))
        await wait_reply(slack, "D1", ev["ts"], "Echo: explain streams")
        assert asked(ai) == ["explain streams"] * 2
        # The streamed text lives outside the blocks: the message is not edited (that
        # would lose it), so the button stays, and a second press only says so.
        assert slack.visible_text("D1", stream_ts) == partial
        await slack.wait_acked(await slack.press("D1", stream_ts, TRY_AGAIN_ACTION))
        await slack.wait_until(lambda: len(slack.ephemerals) == 1)
        await eventually(lambda: not nursery.active)
        assert len(ai.requests) == 2
    assert check_calls(slack.calls) > 0


@pytest.mark.parametrize(
    "behaviours",
    [
        [Behaviour(status=500)] * 3,  # the SDK's two retries, too
        [Behaviour(status=429, error_code="rate_limit_exceeded", retry_after=0)] * 3,
        [Behaviour(text="some words then nothing", chunks=5, stall_after=1)],
    ],
    ids=["server-error", "rate-limited", "stalled"],
)
async def test_every_failure_notice_offers_try_again(slack, ai, behaviours):
    ai.enqueue(*behaviours)
    async with running_bot(slack, ai, stream_idle_timeout_seconds=0.3) as nursery:
        _, ev = await send_dm(slack, "hello")
        await eventually(lambda: nursery.outcomes.get("error", 0) == 1, timeout=10)
        await slack.wait_until(lambda: try_again_buttons(slack, "D1", ev["ts"]) != [])
        assert [value for _, value in try_again_buttons(slack, "D1", ev["ts"])] == [ev["ts"]]


async def test_an_answer_and_the_failures_a_retry_cannot_mend_show_no_try_again(slack, ai):
    ai.enqueue("A fine answer.", Behaviour(status=400, error_code="context_length_exceeded"))
    async with running_bot(slack, ai) as nursery:
        _, ok = await send_dm(slack, "first")
        await wait_reply(slack, "D1", ok["ts"], "A fine answer.")
        _, long = await send_dm(slack, "second")
        await wait_reply(slack, "D1", long["ts"], "too long for the model")
        await eventually(lambda: not nursery.active)
        assert try_again_buttons(slack, "D1", ok["ts"]) == []
        assert try_again_buttons(slack, "D1", long["ts"]) == []


async def test_only_the_asker_can_try_again(slack, ai):
    ai.enqueue(Behaviour(hang=True))
    async with running_bot(slack, ai, async_timeout_seconds=0.5) as nursery:
        event = slack.message_event("C1", "U1", f"<@{slack.bot_user_id}> summarise this", channel_type="channel")
        event["type"] = "app_mention"
        await slack.send_event(event)
        await wait_reply(slack, "C1", event["ts"], TIMEOUT_LINE)
        [(notice_ts, _)] = try_again_buttons(slack, "C1", event["ts"])
        await slack.wait_acked(await slack.press("C1", notice_ts, TRY_AGAIN_ACTION, user="U2"))
        await slack.wait_until(lambda: len(slack.ephemerals) == 1)
        assert slack.ephemerals[0]["user"] == "U2" and "<@U1>" in slack.ephemerals[0]["text"]
        assert len(ai.requests) == 1 and try_again_buttons(slack, "C1", event["ts"]) != []

        # The asker's own click still works afterwards.
        await slack.wait_acked(await slack.press("C1", notice_ts, TRY_AGAIN_ACTION, user="U1"))
        await wait_reply(slack, "C1", event["ts"], "Echo: summarise this")
        await eventually(lambda: not nursery.active)
        assert len(ai.requests) == 2


async def test_try_again_waits_its_turn_at_the_threads_gate(slack, ai):
    ai.enqueue(Behaviour(hang=True), Behaviour(text="slow follow-up answer", latency=1.5))
    async with running_bot(slack, ai, async_timeout_seconds=2.0) as nursery:
        _, ev = await send_dm(slack, "question one")
        await wait_reply(slack, "D1", ev["ts"], TIMEOUT_LINE)
        [(notice_ts, _)] = try_again_buttons(slack, "D1", ev["ts"])
        await eventually(lambda: not nursery.active and nursery.gates.held == 0)
        await send_dm(slack, "question two", thread_ts=ev["ts"])
        await ai.wait_until(lambda: ai.open_streams == 1)  # question two is being answered
        await slack.wait_acked(await slack.press("D1", notice_ts, TRY_AGAIN_ACTION))
        # The thread is busy with question two: the retry gets the busy reply (which
        # offers "Try again" itself), and no second model call runs in the thread.
        await wait_reply(slack, "D1", ev["ts"], BUSY_NOTICE)
        assert ai.max_open_streams == 1
        assert nursery.outcomes.get("busy") == 1
        busy = [ts for ts, value in try_again_buttons(slack, "D1", ev["ts"]) if value == ev["ts"]]
        assert len(busy) == 1 and busy[0] != notice_ts


async def test_a_request_interrupted_by_a_restart_can_be_tried_again_after_it(slack, ai, tmp_path):
    url = f"sqlite:///{tmp_path}/bot.db"
    ai.enqueue(Behaviour(hang=True))
    store = await open_store(url)
    try:
        async with running_bot(slack, ai, store=store, shutdown_grace_seconds=0.1):
            _, ev = await send_dm(slack, "are you there?")
            await ai.wait_until(lambda: ai.open_streams == 1)
        assert slack.bot_replies("D1", ev["ts"]) == [INTERRUPTED_NOTICE]
        [(notice_ts, value)] = try_again_buttons(slack, "D1", ev["ts"])
        assert value == ev["ts"]
        async with running_bot(slack, ai, store=store) as nursery:
            await slack.wait_acked(await slack.press("D1", notice_ts, TRY_AGAIN_ACTION))
            await wait_reply(slack, "D1", ev["ts"], "Echo: are you there?")
            await eventually(lambda: not nursery.active)
        assert await store.in_flight() == []
    finally:
        await store.aclose()


async def test_the_notice_of_a_request_a_dead_process_left_offers_try_again(slack, ai, tmp_path):
    url = f"sqlite:///{tmp_path}/bot.db"
    question = slack.add_user_message("D1", "U1", "still there?")
    placeholder = slack.add_user_message("D1", "UBOT", "_Thinking…_", question)  # what the dead process left
    store = await open_store(url)
    try:
        thread = ThreadKey("D1", question)
        fence = await store.acquire_lease(thread, "local", ttl=600)  # "local": the test settings' REPLICA_ID
        assert fence is not None
        assert await store.start_request(
            "dead1", thread, user_ts=question, placeholder_ts=placeholder, started_at=0.0, owner="local", fence=fence
        )
        async with running_bot(slack, ai, store=store) as nursery:
            await slack.wait_until(lambda: try_again_buttons(slack, "D1", question) != [])
            assert try_again_buttons(slack, "D1", question) == [(placeholder, question)]
            await slack.wait_acked(await slack.press("D1", placeholder, TRY_AGAIN_ACTION))
            await wait_reply(slack, "D1", question, "Echo: still there?")
            await eventually(lambda: not nursery.active)
    finally:
        await store.aclose()


async def test_try_again_reads_the_questions_files_again(slack, ai):
    notes = slack.add_file("notes.txt", b"The launch code is PINEAPPLE.", mimetype="text/plain", filetype="text")
    ai.enqueue(Behaviour(hang=True))
    async with running_bot(slack, ai, async_timeout_seconds=1.0) as nursery:
        event = slack.message_event("D1", "U1", "what is the code?", subtype="file_share", files=[notes])
        await slack.send_event(event)
        await wait_reply(slack, "D1", event["ts"], TIMEOUT_LINE)
        [(notice_ts, _)] = try_again_buttons(slack, "D1", event["ts"])
        await slack.wait_acked(await slack.press("D1", notice_ts, TRY_AGAIN_ACTION))
        await wait_reply(slack, "D1", event["ts"], "Echo:")
        await eventually(lambda: not nursery.active)
    assert len(ai.requests) == 2
    assert "PINEAPPLE" in str(ai.requests[1]["messages"])


async def test_a_question_deleted_before_the_click_is_said_to_be_gone(slack, ai):
    ai.enqueue(Behaviour(hang=True))
    async with running_bot(slack, ai, async_timeout_seconds=0.5) as nursery:
        _, ev = await send_dm(slack, "short-lived", thread_ts=None)
        await wait_reply(slack, "D1", ev["ts"], TIMEOUT_LINE)
        [(notice_ts, _)] = try_again_buttons(slack, "D1", ev["ts"])
        # The user deletes the question: a thread's parent stays as Slack's tombstone.
        parent = slack._find("D1", ev["ts"])
        parent.update(user="USLACKBOT", text="This message was deleted.", subtype="tombstone")
        await slack.wait_acked(await slack.press("D1", notice_ts, TRY_AGAIN_ACTION))
        await slack.wait_until(lambda: len(slack.ephemerals) == 1)
        await eventually(lambda: not nursery.active)
    assert len(ai.requests) == 1
