"""A minute of ordinary workspace load under Slack's real rate-limit tiers, in virtual time.

The fake Slack enforces Slack's documented tiers (chat.startStream/stopStream ≈ 20 a
minute for the whole workspace, chat.update ≈ 50, appendStream/setStatus ≈ 100,
postMessage ≈ 1 a second per channel). 100 DMs and 100 channel mentions arrive within
one minute, each answered by a model with 2 s of latency. Every answer's final text
must become visible, no call may go inside a Retry-After window Slack already gave for
that method, and storage must call nothing "answered" that Slack does not show.

Trio-only, on `MockClock(autojump_threshold=0)` like tests/test_simulation.py: the
production timings (and the minute of load) cost virtual seconds only.
"""

from __future__ import annotations

import logging
import re

import anyio
import pytest
import trio.testing

from bot.storage import ThreadKey
from tests.fakes.openai import Behaviour, FakeOpenAI, last_user_text
from tests.fakes.slack import FakeSlack
from tests.simulation_support import LONG, assert_released, forbid_worker_threads, settle, sim_bot

pytestmark = pytest.mark.anyio

DMS = 100
MENTIONS = 100
CHANNELS = 5  # the mentions are spread over five channels
MODEL_LATENCY = 2.0


@pytest.fixture
def anyio_backend():
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


@pytest.fixture
def no_threads(monkeypatch):
    offenders = forbid_worker_threads(monkeypatch)
    yield
    assert offenders == [], f"worker threads used: {offenders}"


def answer_for(text: str) -> str:
    return f"Here is a considered answer to {text}, in a few sentences so that it streams in pieces."


async def _send_load(slack: FakeSlack) -> list[tuple[str, str, str]]:
    """200 messages over 60 virtual seconds; returns (channel, thread_ts, question) each."""
    sent = []
    for i in range(DMS + MENTIONS):
        question = f"question {i}"
        if i % 2 == 0:
            channel = f"D{i:04d}"
            event = slack.message_event(channel, f"U{i:04d}", question, channel_type="im")
        else:
            channel = f"C{i % CHANNELS}"
            event = slack.app_mention_event(channel, f"U{i:04d}", question)
        await slack.send_event(event)
        sent.append((channel, event["ts"], question))
        await anyio.sleep(60.0 / (DMS + MENTIONS))
    return sent


async def test_a_minute_of_dms_and_mentions_under_slacks_tiers_loses_no_answer(no_threads, caplog):
    caplog.set_level(logging.WARNING)
    slack = FakeSlack()  # Slack's tiers are on by default
    ai = FakeOpenAI(
        script=lambda request: Behaviour(
            text=answer_for(re.search(r"question \d+", last_user_text(request)).group()),
            latency=MODEL_LATENCY,
            chunks=8,
            chunk_delay=0.1,
        )
    )
    async with sim_bot(slack, ai, native_streaming=True) as nursery:
        t0 = anyio.current_time()
        sent = await _send_load(slack)
        with anyio.fail_after(LONG):
            await settle(nursery, ai)
        assert_released(nursery, ai)
        outcomes = dict(nursery.outcomes)
        history_ok = []
        for channel, thread_ts, question in sent:
            history = await nursery.services.store.load_history(ThreadKey(channel, thread_ts))
            history_ok.append(any(answer_for(question) in h.content for h in history if h.role == "assistant"))

    methods = [m for m, _ in slack.accepted_calls]
    print(
        f"\n{DMS} DMs + {MENTIONS} mentions in 60 s: {methods.count('chat.startStream')} native streams, "
        f"{methods.count('chat.postMessage')} posts, {methods.count('chat.update')} edits, "
        f"{methods.count('chat.appendStream')} appends, {methods.count('assistant.threads.setStatus')} statuses; "
        f"429s: {sum(slack.rate_limited.values())}; all settled at t={anyio.current_time() - t0:.1f}s"
    )
    assert outcomes.get("answered") == DMS + MENTIONS, outcomes
    missing = []
    for channel, thread_ts, question in sent:
        expected = answer_for(question)
        if not any(
            expected in slack.visible_text(channel, m["ts"])
            for m in slack.thread_messages(channel, thread_ts)
            if m.get("bot_id") == slack.bot_id
        ):
            missing.append((channel, thread_ts, question))
        assert not any(slack.is_streaming(channel, m["ts"]) for m in slack.thread_messages(channel, thread_ts))
        assert "Thinking" not in " ".join(
            slack.visible_text(channel, m["ts"]) for m in slack.thread_messages(channel, thread_ts)
        )
    assert missing == [], f"{len(missing)} answers never became visible, e.g. {missing[:3]}"
    assert slack.calls_in_retry_after == [], "calls went inside a Retry-After window Slack had given"
    assert slack.rate_limited == {}, "the bot's own budgets should keep a lone process under Slack's"
    assert all(history_ok), "an answer Slack shows is missing from storage"


async def test_a_slow_native_answer_keeps_its_status_visible_past_slacks_two_minutes(no_threads):
    """Nothing is visible in a native stream before its first text: the thread status is
    all the user has, and Slack drops it after 120 s without a message. It is sent again
    in time, for as long as the model thinks."""
    slack = FakeSlack()
    ai = FakeOpenAI(script=lambda request: Behaviour(text="Finally, an answer.", latency=250.0, chunks=2))
    async with sim_bot(slack, ai, native_streaming=True, stream_idle_timeout_seconds=300.0) as nursery:
        event = slack.message_event("D1", "U1", "think hard", channel_type="im")
        await slack.send_event(event)
        t0 = anyio.current_time()
        gaps = []
        while anyio.current_time() - t0 < 245:
            await anyio.sleep(1.0)
            if not slack.visible_status("D1", event["ts"]):
                gaps.append(round(anyio.current_time() - t0))
        with anyio.fail_after(LONG):
            await settle(nursery, ai)
        assert nursery.outcomes == {"answered": 1}
    assert gaps == [], f"no status visible at {gaps[:5]} s"
    assert "Finally, an answer." in slack.bot_replies("D1", event["ts"])[-1]
