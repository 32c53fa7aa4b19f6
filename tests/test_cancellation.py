"""Cancellation safety: cancel a request at each of its checkpoints, and check that
nothing is ever left behind.

After every cancellation: the thread gate and the model slot are free, no message in
the thread is left showing a placeholder or half an answer, storage has nothing in
flight, and no OpenAI stream is open.

Two forms:
- Trio: an instrument counts the request task's scheduling steps and cancels the
  request's own scope (as shutdown does) at step k, for k = 1, 2, … until the request
  finishes before reaching k — every checkpoint, in turn.
- Both backends: cancel at each external interaction (placeholder post, history read,
  waiting for a model slot, mid-stream, final update), by holding the fake there.
"""

from __future__ import annotations

import tempfile

import anyio
import pytest

from bot.processing.failures import INTERRUPTED_NOTICE
from bot.slack.reply import PLACEHOLDER
from tests.fakes.openai import Behaviour, FakeOpenAI
from tests.fakes.slack import FakeSlack
from tests.harness import eventually, running_bot, send_dm
from tests.media_samples import pdf_with_pages

pytestmark = pytest.mark.anyio

ANSWER = "Echo: check me"
PDF_3000_PAGES = pdf_with_pages([f"page {i} of a long report" for i in range(3000)])


def assert_clean(nursery, slack: FakeSlack, ai: FakeOpenAI, channel: str, thread_ts: str) -> str:
    """The invariants after a request ended (finished or cancelled); returns its outcome."""
    assert nursery.gates.held == 0, "thread gate still held"
    assert nursery.services.model_slots.borrowed_tokens == 0, "model slot still held"
    assert ai.open_streams == 0, "an OpenAI stream was left open"
    replies = slack.bot_replies(channel, thread_ts)
    for text in replies:
        assert text == ANSWER or INTERRUPTED_NOTICE in text, f"unfinished message left in Slack: {text!r}"
        assert text != PLACEHOLDER
    return "answered" if ANSWER in replies else ("interrupted" if replies else "nothing posted")


async def assert_storage_agrees(store, outcome: str) -> None:
    assert await store.in_flight() == [], "storage still has a request in flight"


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.parametrize("inline_store", [True, False], ids=["inline-store", "thread-store"])
async def test_cancel_at_every_step_trio(anyio_backend, inline_store):
    import trio
    import trio.lowlevel

    slack, ai = FakeSlack(), FakeOpenAI()
    ai.script = lambda request: Behaviour(text=ANSWER, chunks=4)

    class CancelAtStep(trio.abc.Instrument):
        def __init__(self, nursery) -> None:
            self.nursery = nursery
            self.target = 0
            self.steps = 0
            self.fired = False

        def arm(self, k: int) -> None:
            self.target, self.steps, self.fired = k, 0, False

        def before_task_step(self, task) -> None:
            if self.fired or not self.target or not task.name.startswith("envelope "):
                return
            if not self.nursery.active:
                return  # the request has no scope of its own yet
            self.steps += 1
            if self.steps == self.target:
                self.fired = True
                next(iter(self.nursery.active.values())).scope.cancel()

    outcomes: dict[str, int] = {}
    async with running_bot(slack, ai, inline_store=inline_store, async_timeout_seconds=30) as nursery:
        instrument = CancelAtStep(nursery)
        trio.lowlevel.add_instrument(instrument)
        try:
            k = 0
            while True:
                k += 1
                assert k < 3000, "the request never finished uncancelled"
                instrument.arm(k)
                channel = f"D{k}"
                _, ev = await send_dm(slack, "check me", channel=channel)
                done = k  # each iteration ends with exactly one counted outcome
                await eventually(lambda done=done: sum(nursery.outcomes.values()) == done, timeout=10)
                await anyio.sleep(0.01)  # let the request task finish unwinding
                outcome = assert_clean(nursery, slack, ai, channel, ev["ts"])
                await assert_storage_agrees(nursery.services.store, outcome)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if not instrument.fired:
                    assert outcome == "answered"
                    break
        finally:
            trio.lowlevel.remove_instrument(instrument)
    # Every step was tried: the early ones cut the request before or after the placeholder,
    # the late ones let it finish.
    assert k > 5, outcomes
    assert outcomes.get("interrupted", 0) >= 3, outcomes
    assert outcomes.get("answered", 0) >= 1


STAGES = [
    "chat.postMessage",
    "conversations.replies",
    "model slot",
    "mid-stream",
    "final chat.update",
    # images and documents: a file on its way in, a document being parsed (in a worker
    # thread), an image being drawn, and a drawn image on its way up to Slack.
    "file download",
    "document parsing",
    "image generation",
    "file upload",
]
MEDIA_STAGES = STAGES[-4:]


@pytest.mark.parametrize("stage", STAGES)
async def test_cancel_at_each_interaction(stage, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # any temporary file would land here
    slack, ai = FakeSlack(), FakeOpenAI()
    hold = anyio.Event()
    reached = anyio.Event()
    ai.script = lambda request: Behaviour(
        text=ANSWER, chunks=4, chunk_delay=0.05, stall_after=2 if stage == "mid-stream" else None
    )

    original = slack.handle

    async def handle(request):
        method = request.url.path.rsplit("/", 1)[-1]
        body = request.content.decode(errors="replace")
        holding = (
            (stage == "chat.postMessage" and method == "chat.postMessage" and "Thinking" in body)
            or (stage == "conversations.replies" and method == "conversations.replies")
            or (stage == "final chat.update" and method == "chat.update" and ANSWER in body)
            or (stage == "file download" and request.url.path.startswith("/files-pri/"))
            or (stage == "file upload" and request.url.path.startswith("/upload/"))
        )
        if holding and not reached.is_set():
            reached.set()
            await hold.wait()
        return await original(request)

    slack.handle = handle
    original_ai = ai.handle

    async def ai_handle(request):
        if stage == "image generation" and request.url.path.endswith("/images/generations") and not reached.is_set():
            reached.set()
            await hold.wait()
        return await original_ai(request)

    ai.handle = ai_handle
    if stage in ("image generation", "file upload"):
        ai.enqueue(Behaviour(tool_calls=[("generate_image", {"prompt": "a fox"})]))
    files = {
        "file download": [slack.add_file("scores.csv", b"name,score\nada,91\n")],
        "document parsing": [slack.add_file("huge.pdf", PDF_3000_PAGES)],
    }.get(stage, [])
    parent = slack.add_user_message("C1", "U2", "earlier talk")
    # A long update interval makes the final text go out in the (shielded) finalize step.
    interval = 10.0 if stage == "final chat.update" else 0.05
    async with running_bot(
        slack, ai, async_max_concurrent_requests=1, async_timeout_seconds=30, update_interval_seconds=interval
    ) as nursery:
        slot_holder = None
        if stage == "model slot":
            slot_holder = object()
            await nursery.services.model_slots.acquire_on_behalf_of(slot_holder)
        if stage == "conversations.replies":
            mention = slack.app_mention_event("C1", "U1", "check me", thread_ts=parent)
            await slack.send_event(mention)
            channel, thread_ts = "C1", parent
        elif files:
            ev = slack.message_event("D1", "U1", "check me", channel_type="im", subtype="file_share", files=files)
            await slack.send_event(ev)
            channel, thread_ts = "D1", ev["ts"]
        else:
            _, ev = await send_dm(slack, "check me")
            channel, thread_ts = "D1", ev["ts"]
        if stage == "model slot":
            await eventually(lambda: any(s.stage == "waiting for a model slot" for s in nursery.active.values()))
        elif stage == "document parsing":
            await eventually(lambda: any(s.stage.startswith("parsing") for s in nursery.active.values()))
            await anyio.sleep(0.1)  # well inside the parse: 3,000 pages take seconds
        elif stage == "mid-stream":
            await ai.wait_until(lambda: ai.open_streams == 1)
            await anyio.sleep(0.2)  # two chunks arrive, then the stream stalls
        else:
            with anyio.fail_after(5):
                await reached.wait()
        assert len(nursery.active) == 1
        next(iter(nursery.active.values())).scope.cancel()
        hold.set()
        # (`active` empties as the request ends; its thread gate goes a moment later, as the
        # nursery's `async with` gives the lease back)
        await eventually(lambda: not nursery.active and nursery.gates.held == 0)
        if slot_holder is not None:
            nursery.services.model_slots.release_on_behalf_of(slot_holder)
        outcome = assert_clean(nursery, slack, ai, channel, thread_ts)
        await assert_storage_agrees(nursery.services.store, outcome)
        expected = "answered" if stage == "final chat.update" else "interrupted"  # finalize is shielded
        assert outcome == expected
        assert nursery.outcomes.get(expected) == 1
        if stage in MEDIA_STAGES:
            assert slack.uploads == [], "a file was posted by a cancelled request"
            assert "files.completeUploadExternal" not in [m for m, _ in slack.calls]
            assert list(tmp_path.iterdir()) == [], "a temporary file was left behind"
            if stage == "file upload":
                # cancelled while the bytes were going up: step 1 done, step 3 never sent
                assert "files.getUploadURLExternal" in [m for m, _ in slack.calls]
