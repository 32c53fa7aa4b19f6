"""The answer in Slack, as Slack's AI apps show it: native streaming, status, title, feedback.

`SlackAnswerWriter` is the Slack `ReplySurface`. It runs in one of three modes, chosen
per request by `slack_surface` from the user's settings and NATIVE_STREAMING:

- "native" (DMs): `chat.startStream` → `chat.appendStream` → `chat.stopStream`. Appends are
  coalesced and sent at most once per `interval` (appendStream is rate-limited), never
  more than Slack's 12,000 characters per call. start/stop are Tier 2 (about 20 a
  minute for the workspace): a stream is started only while both have room, otherwise
  the answer starts as `ReplyWriter` would. On a streaming error, or an answer too long
  for one message, the stream is *stopped* (Slack refuses to edit a message still
  streaming: `streaming_state_conflict`) and the answer carries on with `ReplyWriter`
  (paced `chat.update`) in the same message.
- "update": `ReplyWriter` as is (placeholder, paced `chat.update`). Channels always use
  it: there the thread status cannot show progress, only the placeholder can.
- "final": the placeholder shows the status; the answer appears once, when finished.

Progress (processing's tasks: "Reading report.pdf", "Drawing"…) shows in the native
stream as Slack's task cards — `task_update` chunks in `chat.appendStream`, the same id
going from "in_progress" to "complete" or "error", as Slack's assistant template does
(docs.slack.dev chat.appendStream "chunks"; slack_sdk.models.messages.chunk.TaskUpdateChunk;
the default `task_display_mode`, "timeline", puts each card between the text around it).
Task chunks share appendStream's Tier-4 budget as interim calls: skipped, not queued,
when it is low — the thread status shows the task meanwhile and the next tick sends its
latest state; the final states go out in `chat.stopStream` itself. Slack wants one
streaming mode per stream ("markdown_text" or "chunks"): once a chunk is in, the text
goes as `markdown_text` chunks too; once text went as plain `markdown_text`, no chunk is
tried in that stream. Anywhere chunks cannot go — not native, the stream given up, text
already streamed as markdown_text, or Slack refused a chunk (`invalid_chunks`, an unknown
argument, a mode mismatch: any refusal of a call that carried them) — tasks fall back to
the status line ("is reading report.pdf…"), today's behaviour, for the rest of the
answer; the text is sent again without them, never lost. Tasks that begin before the
stream is open wait for it: the first append carries them.

In every mode a finished answer gets thumbs up/down buttons (in the same final write),
and in a DM (the App's Messages tab, where assistant threads live) — or in a channel
thread while no message shows the answer yet — the thread shows "is thinking…" through
`assistant.threads.setStatus`, sent again before Slack's two-minute expiry while
nothing else is visible, and a DM thread gets a title from its first message. Those
extras are best-effort and bounded: they are logged and skipped when Slack refuses
them, never allowed to cost the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio

from bot.config import SurfaceSettings
from bot.processing.message import IncomingMessage
from bot.processing.options import RequestOptions
from bot.processing.surface import AttachedFile, Receipt, SurfaceError, task_status
from bot.retrying import retry
from bot.slack.events import BotIdentity, is_dm_channel
from bot.slack.feedback_blocks import feedback_block
from bot.slack.files import SlackFile, download_file, resolve_file, upload_to_thread
from bot.slack.markdown import SLACK_MARKDOWN_LIMIT, neutralize_broadcasts, stable_length
from bot.slack.receipts import receipt_metadata
from bot.slack.reply import PLACEHOLDER, POST_TIMEOUT, ReplyWriter, pace
from bot.slack.transcripts import history_from_replies
from bot.slack.try_again import try_again_block
from bot.slack.web_api import SlackAPIError, SlackRateLimited, SlackSkipped, SlackWebAPI
from bot.storage import StorageError
from bot.storage.base import HistoryMessage, Store

log = logging.getLogger(__name__)

EXTRA_TIMEOUT = 5.0  # bound on each best-effort call (status, title)
TITLE_CHARS = 60
STATUS_REFRESH_SECONDS = 90.0  # Slack drops a status after 120 s without a message
STOP_ATTEMPTS = 3  # chat.stopStream tries before the message is taken as stuck in streaming state
# A task card's title: Slack documents no limit for it; 256 is the limit documented for the
# chunks' other texts (a plan_update title, a task's details and output), kept here too.
TASK_TITLE_CHARS = 256
# Refusals that are about the stream or the token, not about chunks (a call carrying task
# chunks that fails with anything else is taken as a refusal of the chunks).
STREAM_ERRORS = frozenset(
    {
        "message_not_in_streaming_state",
        "message_not_found",
        "channel_not_found",
        "is_archived",
        "msg_too_long",
        "not_authed",
        "invalid_auth",
        "token_revoked",
        "account_inactive",
    }
)


@dataclass
class _Task:
    """One of processing's tasks, as the stream shows it."""

    title: str
    at: int  # characters of the answer's text when it began: its card goes there
    order: int  # when it began, counted with set_status calls (the newest of either is the status line)
    state: str = "in_progress"  # "in_progress", then "complete" or "error"
    sent: str = ""  # the state Slack has for its card ("": no card yet)
    skipped: bool = False  # its last update was skipped (budget low): the status shows it meanwhile


def task_title(title: str) -> str:
    """A task card's title: one line, at most TASK_TITLE_CHARS."""
    line = " ".join(title.split()) or "Working"
    return line if len(line) <= TASK_TITLE_CHARS else line[: TASK_TITLE_CHARS - 1] + "…"


def task_chunk(task_id: str, title: str, status: str) -> dict[str, Any]:
    """A `task_update` chunk (docs.slack.dev chat.appendStream "chunks"; slack_sdk's
    TaskUpdateChunk): the id ties the updates of one card together."""
    return {"type": "task_update", "id": task_id, "title": title, "status": status}


def text_chunk(text: str) -> dict[str, Any]:
    """A `markdown_text` chunk: text, in a stream that takes chunks."""
    return {"type": "markdown_text", "text": text}


def refuses_chunks(exc: SlackAPIError) -> bool:
    """Did Slack answer, and refuse the call (so it did nothing), for a reason other than
    the stream's state? For a call that carried task chunks, that is taken as a refusal of
    the chunks: `invalid_chunks`, an unknown argument, `streaming_mode_mismatch`, …"""
    if isinstance(exc, (SlackRateLimited, SlackSkipped)) or exc.transient:
        return False
    return exc.error not in STREAM_ERRORS and not exc.error.startswith(("http_error", "bad_response"))


def assistant_status(status: str) -> str:
    """ "_Thinking…_" → "is thinking…": Slack shows the status after the app's name."""
    text = status.strip().strip("_*").strip()
    if not text:
        return ""
    text = text[0].lower() + text[1:]
    return text if text.startswith("is ") else f"is {text}"


class SlackAnswerWriter:
    def __init__(
        self,
        slack: SlackWebAPI,
        channel: str,
        thread_ts: str,
        *,
        mode: str = "update",
        interval: float = 1.0,
        recipient_user: str = "",
        recipient_team: str = "",
        assistant_thread: bool = False,
        title: str = "",
        feedback: bool = True,
        limit: int = SLACK_MARKDOWN_LIMIT,
        me: BotIdentity | None = None,
        reply_to: str = "",
        request_id: str = "",
        may_write: Callable[[], bool] = lambda: True,
    ) -> None:
        if mode not in ("native", "update", "final"):
            raise ValueError(f"mode must be native, update or final, got {mode!r}")
        self._slack = slack
        self._me = me or BotIdentity(user_id="", bot_id="")
        self.channel = channel
        self.thread_ts = thread_ts
        self.mode = mode
        self._interval = interval
        self._recipient_user = recipient_user
        self._recipient_team = recipient_team
        self._assistant = assistant_thread
        self._title = title
        self._feedback = feedback
        self._limit = limit
        self._fallback = ReplyWriter(
            slack,
            channel,
            thread_ts,
            interval=interval,
            limit=limit,
            feedback=feedback,
            reply_to=reply_to,
            request_id=request_id,
            may_write=may_write,
        )
        # Whether the request may write to Slack now (the thread's lease surely still
        # its own, `ThreadGates.surely_held`): while not, the status, the stream's appends
        # and the placeholder's edits wait, so that a process that was paused past its
        # lease does not write over a takeover's notice before it learns of it.
        self._may_write = may_write
        self._pieces: list[str] = []
        self._stream_ts = ""
        self._sent = 0  # characters of the (neutralized) text already in the native stream
        self._status = PLACEHOLDER  # set by set_status; a task begun later that no card shows replaces it
        self._status_order = 0  # when it was set (counted with the tasks' beginnings)
        self._changes = 0
        self._tasks: dict[str, _Task] = {}  # by id, oldest first
        self._task_count = 0
        self._task_cards = mode == "native"  # task chunks are still tried in this answer's stream
        self._text_mode = ""  # how the stream took text: "" (none yet), "markdown" or "chunks"
        self._status_shown = ""
        self._status_at = -STATUS_REFRESH_SECONDS  # when the status was last sent
        self._stop_committed = False
        self._stream_stopped = False  # the stream's message is out of streaming state
        self._stop_failed = False  # chat.stopStream was tried to the end and refused
        self._dirty = anyio.Event()
        self._text_came = anyio.Event()  # the answer's first text (it is not held back)
        self._tg: anyio.abc.TaskGroup | None = None
        self.fell_back = ""  # why native streaming was given up ("" while it was not)
        self.cards_fell_back = ""  # why task cards were given up ("" while they were not)
        self.appends_sent = 0

    # ---- ReplySurface ---------------------------------------------------------------

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    @property
    def message_ts(self) -> list[str]:
        if self._fallback.message_ts:
            return self._fallback.message_ts
        return [self._stream_ts] if self._stream_ts else []

    @property
    def placeholder_ts(self) -> str:
        return self.message_ts[0] if self.message_ts else ""

    @property
    def placeholder_streams(self) -> bool:
        """The answer opened as a native stream (given up since or not: the message was one)."""
        return bool(self._stream_ts)

    @property
    def opening_marked(self) -> bool:
        """A placeholder is (its metadata says which message it answers); a native
        stream is not: chat.startStream takes no metadata."""
        return not self._stream_ts and self._fallback.opening_marked

    async def start(self, status: str = PLACEHOLDER) -> str:
        """Open the answer message: a native stream, else a placeholder, else nothing yet
        (the budget is low: the answer is posted when done). Raises SlackAPIError only
        when Slack refused to post."""
        self._status = status  # (tasks begun before it still show: they are newer)
        if self.mode == "native":
            limits = self._slack.limits
            if not (limits.has_room_for("chat.startStream") and limits.has_room_for("chat.stopStream")):
                self._give_up_stream("chat.startStream budget is low")
            else:
                ts = await self._start_stream()
                if ts:
                    self._stream_ts = ts
                    self._dirty.set()  # the status (and tasks begun meanwhile) go out from run()
                    return ts
        try:
            ts = await self._fallback.start(self._shown_status())
        except SlackAPIError as exc:
            raise SurfaceError("posting the answer", exc.error) from None
        if not ts:
            self._assistant = True  # nothing shows progress but the thread status
            self._dirty.set()
        return ts

    async def _start_stream(self) -> str:
        self._slack.limits.commit("chat.stopStream")
        self._stop_committed = True
        ts = ""
        try:
            # The caller shields start() (a ts Slack created must never be lost); bounded here
            # so a silent startStream still leaves time to post instead.
            with anyio.move_on_after(POST_TIMEOUT):
                body = await self._slack.call(
                    "chat.startStream",
                    channel=self.channel,
                    thread_ts=self.thread_ts,
                    recipient_user_id=self._recipient_user or None,
                    recipient_team_id=self._recipient_team or None,
                )
                ts = str(body.get("ts") or "")
        except SlackAPIError as exc:
            self._give_up_stream(f"chat.startStream failed: {exc.error}")
        if not ts:
            self._release_stop()
            self._give_up_stream("chat.startStream did not answer")
        return ts

    def set_status(self, status: str) -> None:
        self._status = status
        self._changes += 1
        self._status_order = self._changes
        self._status_changed()

    def begin_task(self, title: str) -> str:
        """A task card in the native stream (sent by run(), with the text around it), else
        the status line."""
        self._task_count += 1
        self._changes += 1
        task_id = f"task-{self._task_count}"
        self._tasks[task_id] = _Task(task_title(title), at=len(self.text), order=self._changes)
        self._status_changed()
        return task_id

    def end_task(self, task_id: str, *, ok: bool = True) -> None:
        task = self._tasks.get(task_id)
        if task is None or task.state != "in_progress":
            return
        task.state = "complete" if ok else "error"
        self._status_changed()

    def _status_changed(self) -> None:
        if self.mode != "native":
            self._fallback.set_status(self._shown_status())
        self._dirty.set()

    def _cards_on(self) -> bool:
        """Tasks show as cards in the stream (else as the status line)."""
        return self.mode == "native" and self._task_cards and self._text_mode != "markdown"

    def _shown_status(self) -> str:
        """The status line. Without cards, as set_status calls always made it: the newest
        of the status and the tasks' lines ("_Reading report.pdf…_" from its beginning
        until something newer). With cards, a task is in it only while it runs and its
        card's update is held back (budget low)."""
        cards = self._cards_on()
        for task in reversed(self._tasks.values()):
            if task.order < self._status_order:
                break
            if not cards or (task.skipped and task.state == "in_progress"):
                return task_status(task.title)
        return self._status

    def append(self, delta: str) -> None:
        self._pieces.append(delta)
        if self.mode == "update":
            self._fallback.append(delta)
        self._dirty.set()
        self._text_came.set()

    async def run(self) -> None:
        """Until cancelled: thread status and title, and the native stream's appends (the
        fallback writer's own loop runs beside it)."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if self.mode != "native" and self._fallback.message_ts:
                    tg.start_soon(self._fallback.run)
                if self._title:
                    tg.start_soon(self._set_title, self._title)
                    self._title = ""  # once, though run() may be started again (attachments, then answer)
                while True:
                    with anyio.move_on_after(STATUS_REFRESH_SECONDS):
                        await self._dirty.wait()
                    self._dirty = anyio.Event()
                    sent = self._sent
                    if not self._may_write():
                        self._dirty.set()  # (held back: at the next tick)
                    else:
                        if not self._answer_visible():
                            await self._show_status()
                        if self.mode == "native" and (len(self.text) > self._sent or self._task_updates()):
                            await self._append_native()
                    await pace(self._interval, text_sent=self._sent > sent, text_came=self._text_came)
        finally:
            self._tg = None  # finish() runs after this; it must not start tasks in a closed group

    def _answer_visible(self) -> bool:
        if self.mode == "native":
            return self._sent > 0
        return bool(self._fallback.message_ts) and bool(self.text)

    async def finish(self, notice: str = "", receipt: Receipt | None = None) -> bool:
        """Write the final answer plus `notice`, with feedback buttons when there is an
        answer, and `receipt` in the metadata of the last message written. Call it
        shielded and time-bounded. False if Slack refused (logged)."""
        text = self.text
        if self.mode == "native" and not self._stream_ts:
            # Never opened (the request ended before: storage refused to record it, say):
            # there is no stream to stop; the answer is posted as one message.
            self._give_up_stream("the answer was never opened")
        if self.mode == "native":
            shown = neutralize_broadcasts(text)
            if len(shown) + len(notice) + 2 > self._limit:
                await self._stop_stream()
                self._give_up_stream("the answer is longer than one message")
            elif await self._stop_native(text, notice, receipt):
                self._release_stop()
                await self._clear_status()
                return True
        if self._stream_ts and not self._stream_stopped and not self._stop_failed and self.mode != "native":
            await self._stop_stream()  # given up mid-answer and not stopped yet: Slack refuses edits till then
        if self.mode == "final":
            self._fallback.append(text)
        if self._stream_ts and self._stop_failed:
            # A message still streaming refuses edits: the final write must not skip it as
            # already shown and post the rest of the answer (with the receipt) after it.
            # Every final write thus comes after its stream is closed, which is what lets a
            # takeover that finds the stream still open know there is no receipt to look for.
            self._fallback.forget_shown(self._stream_ts)
        posted = len(self._fallback.message_ts)
        ok = await self._fallback.finish(notice, receipt)
        if len(self._fallback.message_ts) == posted:  # (a new message: Slack cleared the status itself)
            await self._clear_status()
        return ok

    async def withdraw(self) -> None:
        """chat.delete of the answer's first message. Slack refuses to delete a message
        still streaming (`streaming_state_conflict`, as for chat.update), so a native
        stream not yet out of streaming state is stopped first. The budgets promised for
        a final write that will not come are given back."""
        ts = self.placeholder_ts
        try:
            if not ts:
                return
            if self._stream_ts == ts and not self._stream_stopped and not await self._stop_stream():
                raise SurfaceError("withdrawing the answer", "streaming_state_conflict")
            try:
                await self._slack.call("chat.delete", channel=self.channel, ts=ts)
            except SlackAPIError as exc:
                if exc.error != "message_not_found":
                    raise SurfaceError("withdrawing the answer", exc.error) from None
        finally:
            self._release_stop()
            self._fallback.release()

    # ---- what the thread holds: earlier messages, files; images the bot posts ----------

    async def read_thread(self, exclude_ts: set[str]) -> list[HistoryMessage]:
        try:
            replies = await self._slack.thread_replies(self.channel, self.thread_ts)
        except SlackAPIError as exc:
            raise SurfaceError("reading the thread", exc.error) from None
        return history_from_replies(replies, self._me, exclude_ts=exclude_ts)

    async def resolve_file(self, obj: dict[str, Any]) -> SlackFile:
        return await resolve_file(self._slack, obj)

    async def download_file(self, file: AttachedFile, *, max_bytes: int) -> bytes:
        if not isinstance(file, SlackFile):
            raise TypeError("download_file takes the file resolve_file returned")
        return await download_file(self._slack, file, max_bytes=max_bytes)

    async def post_image(self, data: bytes, *, filename: str, title: str, comment: str, alt_text: str) -> None:
        try:
            await upload_to_thread(
                self._slack,
                channel=self.channel,
                thread_ts=self.thread_ts,
                filename=filename,
                data=data,
                title=title,
                comment=comment,
                alt_text=alt_text,
            )
        except SlackAPIError as exc:
            raise SurfaceError("posting the image", exc.error) from None

    # ---- native streaming --------------------------------------------------------------

    def _task_updates(self, *, closing: bool = False) -> list[tuple[str, _Task, str]]:
        """(id, task, state) for each card whose state Slack does not have yet. `closing`:
        the stream ends, so a task still running ends as "error"; once the stream has been
        given up (no longer native) only the cards Slack already shows are closed, the
        other tasks being in the status line by then."""
        if not closing and not self._cards_on():
            return []
        if not (self._task_cards and self._text_mode != "markdown" and self._stream_ts):
            return []
        updates = []
        for task_id, task in self._tasks.items():
            state = "error" if closing and task.state == "in_progress" else task.state
            if state != task.sent and (task.sent or not closing or self.mode == "native"):
                updates.append((task_id, task, state))
        return updates

    def _chunks(
        self, text: str, upto: int, updates: list[tuple[str, _Task, str]], tail: str = ""
    ) -> tuple[list[dict[str, Any]], int]:
        """The stream's next chunks: the text not sent yet (`text[:upto]`, neutralized,
        then `tail`) as markdown_text chunks, with each new card where its task began in
        that text (an update of a card Slack shows goes first: it changes the card in
        place). Also returns the length of the neutralized text covered."""
        shown = neutralize_broadcasts(text[:upto])
        chunks: list[dict[str, Any]] = []
        pos = self._sent
        for task_id, task, state in updates:
            if not task.sent:
                # Where it began, in the shown text (a prefix no later text can change).
                began = min(task.at, upto)
                cut = min(max(len(neutralize_broadcasts(text[: stable_length(text[:began])])), pos), len(shown))
                if cut > pos:
                    chunks.append(text_chunk(shown[pos:cut]))
                    pos = cut
            chunks.append(task_chunk(task_id, task.title, state))
        rest = shown[pos:] + tail
        if rest:
            chunks.append(text_chunk(rest))
        return chunks, len(shown)

    def _cards_sent(self, updates: list[tuple[str, _Task, str]]) -> None:
        for _, task, state in updates:
            task.sent, task.skipped = state, False

    def _give_up_cards(self, why: str) -> None:
        """No more task chunks in this answer: its tasks show in the status line."""
        if self._task_cards:
            log.info("task cards in %s/%s given up (%s); tasks show in the status", self.channel, self.thread_ts, why)
            self._task_cards = False
            self.cards_fell_back = why
        self._status_changed()

    async def _append_native(self) -> None:
        text = self.text
        if len(text) > self._limit:
            await self._stop_stream()
            self._give_up_stream("the answer is longer than one message")
            return
        # Only the part that can no longer change: a `<!chan` cut mid-mention is held back.
        stable = stable_length(text)
        updates = self._task_updates()
        content: dict[str, Any]
        if updates or self._text_mode == "chunks":  # a stream that takes chunks takes its text as chunks too
            chunks, covered = self._chunks(text, stable, updates)
            if not chunks:
                return
            content = {"chunks": chunks}
        else:
            shown = neutralize_broadcasts(text[:stable])
            covered = len(shown)
            if covered <= self._sent:
                return
            content = {"markdown_text": shown[self._sent :]}
        # Shielded (and bounded): unlike chat.update, an append is not idempotent. If this
        # task were cancelled after Slack took the chunk but before `_sent` moved on,
        # finish() would send the chunk again and the answer would show it twice.
        failed = ""
        with anyio.CancelScope(shield=True), anyio.move_on_after(POST_TIMEOUT) as bound:
            try:
                await self._slack.call(
                    "chat.appendStream", channel=self.channel, ts=self._stream_ts, interim=True, **content
                )
                if "chunks" in content:
                    self._text_mode = "chunks"
                    self._cards_sent(updates)
                elif covered > self._sent:
                    self._text_mode = "markdown"  # Slack keeps this stream to markdown_text now
                self._sent = max(self._sent, covered)
                self.appends_sent += 1
            except (SlackSkipped, SlackRateLimited):
                for _, task, _ in updates:
                    task.skipped = True  # the status shows it until a tick gets it through
                self._dirty.set()  # Slack took nothing: the next tick sends the text (and tasks) so far
            except SlackAPIError as exc:
                if updates and refuses_chunks(exc):
                    # Slack took nothing: the next tick sends the text again, without tasks.
                    self._give_up_cards(f"chat.appendStream refused them: {exc.error}")
                else:
                    failed = exc.error
        if bound.cancelled_caught:
            failed = "no answer"  # unknown whether Slack took it: chat.update rewrites it all
        if failed:
            # Outside the shield: a shutdown may cut the stop short; finish() tries again.
            self._give_up_stream(f"chat.appendStream failed: {failed}")
            if failed == "message_not_in_streaming_state":
                self._stream_stopped = True
            else:
                await self._stop_stream()

    async def _stop_native(self, text: str, notice: str, receipt: Receipt | None) -> bool:
        """The final chat.stopStream: the rest of the text, `notice`, the feedback buttons,
        the receipt and the tasks' final states (once more without those if Slack refuses
        the chunks). False when the stream was given up: the caller carries on with
        chat.update in the same message."""
        tail = (f"\n\n{notice}" if text else notice) if notice else ""
        while True:
            updates = self._task_updates(closing=True)
            content: dict[str, Any]
            if updates or self._text_mode == "chunks":
                chunks, _ = self._chunks(text, len(text), updates, tail)
                content = {"chunks": chunks or None}
            else:
                content = {"markdown_text": (neutralize_broadcasts(text)[self._sent :] + tail) or None}
            try:
                await self._slack.call(
                    "chat.stopStream",
                    channel=self.channel,
                    ts=self._stream_ts,
                    blocks=_closing_blocks(feedback=bool(text) and self._feedback, receipt=receipt),
                    metadata=receipt_metadata(receipt) if receipt is not None else None,
                    **content,
                )
            except SlackAPIError as exc:
                if updates and refuses_chunks(exc):
                    self._give_up_cards(f"chat.stopStream refused them: {exc.error}")
                    continue  # the same stop, without the task chunks
                # Did the stream stop? Slack refuses edits to a message still streaming.
                if exc.error == "message_not_in_streaming_state":
                    self._stream_stopped = True
                else:
                    await self._stop_stream()
                self._give_up_stream(f"chat.stopStream failed: {exc.error}")
                return False
            self._cards_sent(updates)
            return True

    async def _stop_stream(self) -> bool:
        """Take the message out of streaming state (before anything edits it); True once
        Slack says it is no longer streaming. STOP_ATTEMPTS tries, back to back."""

        def logged(n: int, exc: Exception) -> float:
            if isinstance(exc, SlackAPIError):  # a try that got no answer in time is not logged
                log.warning("chat.stopStream in %s (attempt %d): %s", self.channel, n, exc.error)
            return 0.0

        try:
            await retry(self._stop_once, errors=(SlackAPIError, TimeoutError), attempts=STOP_ATTEMPTS, pause=logged)
        except (SlackAPIError, TimeoutError) as exc:
            logged(STOP_ATTEMPTS, exc)
            self._stop_failed = True
            return False
        else:
            self._stream_stopped = True
            return True
        finally:
            self._release_stop()

    async def _stop_once(self) -> None:
        """One chat.stopStream, bounded by POST_TIMEOUT (TimeoutError), closing the cards
        the stream shows (a task still running as "error": the stream is left before it
        ends). A message that is no longer streaming, or gone, counts as stopped."""
        updates = self._task_updates(closing=True)
        chunks = [task_chunk(task_id, task.title, state) for task_id, task, state in updates]
        with anyio.fail_after(POST_TIMEOUT):
            try:
                await self._slack.call(
                    "chat.stopStream", channel=self.channel, ts=self._stream_ts, chunks=chunks or None
                )
                self._cards_sent(updates)
            except SlackAPIError as exc:
                if exc.error in ("message_not_in_streaming_state", "message_not_found"):
                    return
                if updates and refuses_chunks(exc):
                    self._give_up_cards(f"chat.stopStream refused them: {exc.error}")  # the next try goes without
                raise

    def _release_stop(self) -> None:
        if self._stop_committed:
            self._stop_committed = False
            self._slack.limits.uncommit("chat.stopStream")

    def _give_up_stream(self, why: str) -> None:
        """Carry on with paced chat.update: in the stream's message when there is one."""
        if self.mode != "native":
            return
        log.info(
            "native streaming in %s/%s given up (%s); continuing with chat.update", self.channel, self.thread_ts, why
        )
        self.fell_back = why
        self.mode = "update"
        self._fallback.set_status(self._shown_status())  # tasks show in the status from now on
        if self._stream_ts:
            self._fallback.adopt(self._stream_ts, neutralize_broadcasts(self.text)[: self._sent])
        if self.text:  # what the model sent so far (it may come before the answer is open)
            self._fallback.append(self.text)
        if self._stream_ts and self._tg is not None:
            self._tg.start_soon(self._fallback.run)

    # ---- best-effort extras ----------------------------------------------------------

    async def _show_status(self) -> None:
        status = assistant_status(self._shown_status())
        if not self._assistant or not status:
            return
        fresh = anyio.current_time() - self._status_at < STATUS_REFRESH_SECONDS
        if status == self._status_shown and fresh:
            return
        await self._set_assistant_status(status)

    async def _clear_status(self) -> None:
        # Not an interim call: skipped when the budget is low, it would leave "is
        # thinking…" under the finished answer for Slack's two minutes.
        if self._assistant and self._status_shown:
            await self._set_assistant_status("")

    async def _set_assistant_status(self, status: str, *, interim: bool = False) -> None:
        with anyio.move_on_after(EXTRA_TIMEOUT):
            try:
                await self._slack.call(
                    "assistant.threads.setStatus",
                    channel_id=self.channel,
                    thread_ts=self.thread_ts,
                    status=status,
                    interim=interim,
                )
                self._status_shown = status
                self._status_at = anyio.current_time()
            except (SlackSkipped, SlackRateLimited):
                log.debug("assistant.threads.setStatus in %s skipped: budget low", self.channel)
            except SlackAPIError as exc:
                # Not an assistant thread (or an app without the feature): stop trying.
                log.debug("assistant.threads.setStatus in %s: %s", self.channel, exc.error)
                self._assistant = False

    async def _set_title(self, title: str) -> None:
        with anyio.move_on_after(EXTRA_TIMEOUT):
            try:
                await self._slack.call(
                    "assistant.threads.setTitle", channel_id=self.channel, thread_ts=self.thread_ts, title=title
                )
            except SlackAPIError as exc:
                log.debug("assistant.threads.setTitle in %s: %s", self.channel, exc.error)


def _closing_blocks(*, feedback: bool, receipt: Receipt | None) -> list[dict[str, Any]] | None:
    """The blocks chat.stopStream renders under the streamed text: the feedback buttons
    under an answer, "Try again" under a failure."""
    blocks = [feedback_block()] if feedback else []
    if receipt is not None and receipt.try_again:
        blocks.append(try_again_block(receipt.reply_to))
    return blocks or None


def thread_title(text: str) -> str:
    """The first line of the first message, shortened on a word boundary."""
    line = " ".join(text.strip().splitlines()[0].split()) if text.strip() else ""
    if len(line) <= TITLE_CHARS:
        return line
    return line[:TITLE_CHARS].rsplit(" ", 1)[0].rstrip(",.;:") + "…"


async def slack_surface(
    slack: SlackWebAPI,
    me: BotIdentity,
    surfaces: SurfaceSettings,
    store: Store,
    msg: IncomingMessage,
    options: RequestOptions,
    *,
    request_id: str = "",
    may_write: Callable[[], bool] = lambda: True,
) -> SlackAnswerWriter:
    """The Slack surface for one request `request_id` (the nursery binds all but
    `options`; `may_write`: see `SlackAnswerWriter`). Never raises."""
    in_dm = is_dm_channel(msg.channel)
    if not options.stream:
        mode = "final"
    elif surfaces.native_streaming and in_dm:
        # In a DM the thread status ("is thinking…") shows progress before the first
        # words; in a channel only the placeholder can, so channels keep chat.update.
        mode = "native"
    else:
        mode = "update"
    title = ""
    if in_dm:
        first = not msg.in_existing_thread
        if not first:
            try:
                first = not await store.thread_known(msg.thread)
            except (StorageError, RuntimeError) as exc:
                log.debug("cannot tell whether %s is new (%s); no title", msg.thread, exc)
        title = thread_title(msg.text) if first else ""
    return SlackAnswerWriter(
        slack,
        msg.channel,
        msg.thread_ts,
        mode=mode,
        interval=surfaces.update_interval_seconds,
        recipient_user=msg.user,
        recipient_team=me.team_id,
        assistant_thread=in_dm,
        title=title,
        me=me,
        reply_to=msg.ts,
        request_id=request_id,
        may_write=may_write,
    )
