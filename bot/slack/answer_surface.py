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
from typing import Any

import anyio

from bot.config import Settings
from bot.processing.message import IncomingMessage
from bot.processing.options import RequestOptions
from bot.processing.surface import AttachedFile, Receipt, SurfaceError
from bot.retrying import retry
from bot.slack.events import BotIdentity, is_dm_channel
from bot.slack.feedback_blocks import feedback_block
from bot.slack.files import SlackFile, download_file, resolve_file, upload_to_thread
from bot.slack.markdown import SLACK_MARKDOWN_LIMIT, neutralize_broadcasts, stable_length
from bot.slack.receipts import receipt_metadata
from bot.slack.reply import PLACEHOLDER, POST_TIMEOUT, ReplyWriter
from bot.slack.transcripts import history_from_replies
from bot.slack.web_api import SlackAPIError, SlackRateLimited, SlackSkipped, SlackWebAPI
from bot.storage import StorageError
from bot.storage.base import HistoryMessage, Store

log = logging.getLogger(__name__)

EXTRA_TIMEOUT = 5.0  # bound on each best-effort call (status, title)
TITLE_CHARS = 60
STATUS_REFRESH_SECONDS = 90.0  # Slack drops a status after 120 s without a message
STOP_ATTEMPTS = 3  # chat.stopStream tries before the message is taken as stuck in streaming state


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
            slack, channel, thread_ts, interval=interval, limit=limit, feedback=feedback, reply_to=reply_to
        )
        self._pieces: list[str] = []
        self._stream_ts = ""
        self._sent = 0  # characters of the (neutralized) text already in the native stream
        self._status = PLACEHOLDER
        self._status_shown = ""
        self._status_at = -STATUS_REFRESH_SECONDS  # when the status was last sent
        self._stop_committed = False
        self._stream_stopped = False  # the stream's message is out of streaming state
        self._stop_failed = False  # chat.stopStream was tried to the end and refused
        self._dirty = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self.fell_back = ""  # why native streaming was given up ("" while it was not)
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

    async def start(self, status: str = PLACEHOLDER) -> str:
        """Open the answer message: a native stream, else a placeholder, else nothing yet
        (the budget is low: the answer is posted when done). Raises SlackAPIError only
        when Slack refused to post."""
        self._status = status
        if self.mode == "native":
            limits = self._slack.limits
            if not (limits.has_room_for("chat.startStream") and limits.has_room_for("chat.stopStream")):
                self._give_up_stream("chat.startStream budget is low")
            else:
                ts = await self._start_stream()
                if ts:
                    self._stream_ts = ts
                    self._dirty.set()  # the status goes out from run()
                    return ts
        try:
            ts = await self._fallback.start(status)
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
        if self.mode != "native":
            self._fallback.set_status(status)
        self._dirty.set()

    def append(self, delta: str) -> None:
        self._pieces.append(delta)
        if self.mode == "update":
            self._fallback.append(delta)
        self._dirty.set()

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
                    if not self._answer_visible():
                        await self._show_status()
                    if self.mode == "native" and len(self.text) > self._sent:
                        await self._append_native()
                    await anyio.sleep(self._interval)
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
        if self.mode == "native":
            shown = neutralize_broadcasts(text)
            final = shown[self._sent :]
            if notice:
                final = f"{final}\n\n{notice}" if text else notice
            if len(shown) + len(notice) + 2 > self._limit:
                await self._stop_stream()
                self._give_up_stream("the answer is longer than one message")
            else:
                try:
                    await self._slack.call(
                        "chat.stopStream",
                        channel=self.channel,
                        ts=self._stream_ts,
                        markdown_text=final or None,
                        blocks=[feedback_block()] if text and self._feedback else None,
                        metadata=receipt_metadata(receipt) if receipt is not None else None,
                    )
                    self._release_stop()
                    await self._clear_status()
                    return True
                except SlackAPIError as exc:
                    # Did the stream stop? Slack refuses edits to a message still streaming.
                    if exc.error == "message_not_in_streaming_state":
                        self._stream_stopped = True
                    else:
                        await self._stop_stream()
                    self._give_up_stream(f"chat.stopStream failed: {exc.error}")
        if self._stream_ts and not self._stream_stopped and not self._stop_failed and self.mode != "native":
            await self._stop_stream()  # given up mid-answer and not stopped yet: Slack refuses edits till then
        if self.mode == "final":
            self._fallback.append(text)
        posted = len(self._fallback.message_ts)
        ok = await self._fallback.finish(notice, receipt)
        if len(self._fallback.message_ts) == posted:  # (a new message: Slack cleared the status itself)
            await self._clear_status()
        return ok

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

    async def _append_native(self) -> None:
        text = self.text
        if len(text) > self._limit:
            await self._stop_stream()
            self._give_up_stream("the answer is longer than one message")
            return
        # Only the part that can no longer change: a `<!chan` cut mid-mention is held back.
        shown = neutralize_broadcasts(text[: stable_length(text)])
        chunk = shown[self._sent :]
        if not chunk:
            return
        # Shielded (and bounded): unlike chat.update, an append is not idempotent. If this
        # task were cancelled after Slack took the chunk but before `_sent` moved on,
        # finish() would send the chunk again and the answer would show it twice.
        failed = ""
        with anyio.CancelScope(shield=True), anyio.move_on_after(POST_TIMEOUT) as bound:
            try:
                await self._slack.call(
                    "chat.appendStream", channel=self.channel, ts=self._stream_ts, markdown_text=chunk, interim=True
                )
                self._sent += len(chunk)
                self.appends_sent += 1
            except (SlackSkipped, SlackRateLimited):
                self._dirty.set()  # Slack took nothing: the next tick sends the text so far
            except SlackAPIError as exc:
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
        """One chat.stopStream, bounded by POST_TIMEOUT (TimeoutError). A message that is
        no longer streaming, or gone, counts as stopped."""
        with anyio.fail_after(POST_TIMEOUT):
            try:
                await self._slack.call("chat.stopStream", channel=self.channel, ts=self._stream_ts)
            except SlackAPIError as exc:
                if exc.error not in ("message_not_in_streaming_state", "message_not_found"):
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
        if self._stream_ts:
            self._fallback.adopt(self._stream_ts, neutralize_broadcasts(self.text)[: self._sent])
        if self.text:  # what the model sent so far (it may come before the answer is open)
            self._fallback.append(self.text)
        if self._stream_ts and self._tg is not None:
            self._tg.start_soon(self._fallback.run)

    # ---- best-effort extras ----------------------------------------------------------

    async def _show_status(self) -> None:
        status = assistant_status(self._status)
        if not self._assistant or not status:
            return
        fresh = anyio.current_time() - self._status_at < STATUS_REFRESH_SECONDS
        if status == self._status_shown and fresh:
            return
        await self._set_assistant_status(status)

    async def _clear_status(self) -> None:
        if self._assistant and self._status_shown:
            await self._set_assistant_status("", interim=True)

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


def thread_title(text: str) -> str:
    """The first line of the first message, shortened on a word boundary."""
    line = " ".join(text.strip().splitlines()[0].split()) if text.strip() else ""
    if len(line) <= TITLE_CHARS:
        return line
    return line[:TITLE_CHARS].rsplit(" ", 1)[0].rstrip(",.;:") + "…"


async def slack_surface(
    slack: SlackWebAPI, me: BotIdentity, settings: Settings, store: Store, msg: IncomingMessage, options: RequestOptions
) -> SlackAnswerWriter:
    """The Slack surface for one request (the nursery binds all but `options`). Never raises."""
    in_dm = is_dm_channel(msg.channel)
    if not options.stream:
        mode = "final"
    elif settings.native_streaming and in_dm:
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
        interval=settings.update_interval_seconds,
        recipient_user=msg.user,
        recipient_team=me.team_id,
        assistant_thread=in_dm,
        title=title,
        me=me,
        reply_to=msg.ts,
    )
