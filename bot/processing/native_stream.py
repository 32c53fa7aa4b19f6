"""The answer in Slack, as Slack's AI apps show it: native streaming, status, title, feedback.

`SlackAnswerWriter` is the Slack `ReplySurface`. It runs in one of three modes, chosen
per request by `slack_surface` from the user's settings and NATIVE_STREAMING:

- "native" (DMs): `chat.startStream` → `chat.appendStream` → `chat.stopStream`. Appends are
  coalesced and sent at most once per `interval` (appendStream is rate-limited), never
  more than Slack's 12,000 characters per call. On `message_not_in_streaming_state` —
  or any other streaming error, or an answer too long for one message — it stops using
  the stream and carries on with `ReplyWriter` (paced `chat.update`) in the same message.
- "update": `ReplyWriter` as is (placeholder, paced `chat.update`). Channels always use
  it: there the thread status cannot show progress, only the placeholder can.
- "final": the placeholder shows the status; the answer appears once, when finished.

In every mode a finished answer gets thumbs up/down buttons, and in a DM (the App's
Messages tab, where assistant threads live) the thread shows "is thinking…" through
`assistant.threads.setStatus` and gets a title from its first message. Those extras
are best-effort and bounded: they are logged and skipped when Slack refuses them,
never allowed to cost the answer.
"""

from __future__ import annotations

import logging

import anyio

from bot.interactions.feedback import answer_blocks, feedback_block
from bot.processing.context import Services
from bot.processing.markdown import SLACK_MARKDOWN_LIMIT, split_markdown
from bot.processing.options import RequestOptions
from bot.processing.reply import PLACEHOLDER, POST_TIMEOUT, ReplyWriter
from bot.slack_api import SlackAPIError, SlackWebAPI
from bot.slack_events import IncomingMessage
from bot.storage import StorageError

log = logging.getLogger(__name__)

EXTRA_TIMEOUT = 5.0  # bound on each best-effort call (status, title, feedback buttons)
TITLE_CHARS = 60


def assistant_status(status: str) -> str:
    """"_Thinking…_" → "is thinking…": Slack shows the status after the app's name."""
    text = status.strip().strip("_*").strip()
    if not text:
        return ""
    text = text[0].lower() + text[1:]
    return text if text.startswith("is ") else f"is {text}"


class SlackAnswerWriter:
    def __init__(self, slack: SlackWebAPI, channel: str, thread_ts: str, *, mode: str = "update",
                 interval: float = 1.0, recipient_user: str = "", recipient_team: str = "",
                 assistant_thread: bool = False, title: str = "", feedback: bool = True,
                 limit: int = SLACK_MARKDOWN_LIMIT) -> None:
        if mode not in ("native", "update", "final"):
            raise ValueError(f"mode must be native, update or final, got {mode!r}")
        self._slack = slack
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
        self._fallback = ReplyWriter(slack, channel, thread_ts, interval=interval, limit=limit)
        self._pieces: list[str] = []
        self._stream_ts = ""
        self._sent = 0  # characters of the text already in the native stream
        self._status = PLACEHOLDER
        self._status_shown = ""
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
        """Open the answer message: a native stream, else a placeholder. Raises SlackAPIError
        only when no message could be posted at all."""
        self._status = status
        if self.mode == "native":
            ts = None
            try:
                # Shielded like ReplyWriter.start: a ts Slack created must never be lost.
                with anyio.CancelScope(shield=True), anyio.move_on_after(POST_TIMEOUT):
                    body = await self._slack.call(
                        "chat.startStream", channel=self.channel, thread_ts=self.thread_ts,
                        recipient_user_id=self._recipient_user or None,
                        recipient_team_id=self._recipient_team or None,
                    )
                    ts = str(body.get("ts") or "")
            except SlackAPIError as exc:
                self._give_up_stream(f"chat.startStream failed: {exc.error}")
            if ts:
                self._stream_ts = ts
                self._dirty.set()  # the status goes out from run()
                return ts
            if self.mode == "native":
                self._give_up_stream("chat.startStream did not answer")
        return await self._fallback.start(status)

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
                    await self._dirty.wait()
                    self._dirty = anyio.Event()
                    if not self.text:
                        await self._show_status()
                    if self.mode == "native" and len(self.text) > self._sent:
                        await self._append_native()
                    await anyio.sleep(self._interval)
        finally:
            self._tg = None  # finish() runs after this; it must not start tasks in a closed group

    async def finish(self, notice: str = "") -> bool:
        """Write the final answer plus `notice`, with feedback buttons when there is an
        answer. Call it shielded and time-bounded. False if Slack refused (logged)."""
        if not self.message_ts:
            return False
        text = self.text
        if self.mode == "native":
            final = text[self._sent:]
            if notice:
                final = f"{final}\n\n{notice}" if text else notice
            if len(text) + len(notice) + 2 > self._limit:
                await self._stop_stream_quietly()
                self._give_up_stream("the answer is longer than one message")
            else:
                try:
                    await self._slack.call(
                        "chat.stopStream", channel=self.channel, ts=self._stream_ts,
                        markdown_text=final or None, blocks=[feedback_block()] if text and self._feedback else None,
                    )
                    await self._clear_status()
                    return True
                except SlackAPIError as exc:
                    self._give_up_stream(f"chat.stopStream failed: {exc.error}")
        if self.mode == "final":
            self._fallback.append(text)
        ok = await self._fallback.finish(notice)
        if ok and text and self._feedback:
            await self._add_feedback(text, notice)
        await self._clear_status()
        return ok

    async def post_notice(self, notice: str) -> None:
        await self._fallback.post_notice(notice)

    # ---- native streaming --------------------------------------------------------------

    async def _append_native(self) -> None:
        text = self.text
        if len(text) > self._limit:
            await self._stop_stream_quietly()
            self._give_up_stream("the answer is longer than one message")
            return
        chunk = text[self._sent:]
        # Shielded (and bounded): unlike chat.update, an append is not idempotent. If this
        # task were cancelled after Slack took the chunk but before `_sent` moved on,
        # finish() would send the chunk again and the answer would show it twice.
        with anyio.CancelScope(shield=True), anyio.move_on_after(POST_TIMEOUT) as bound:
            try:
                await self._slack.call("chat.appendStream", channel=self.channel, ts=self._stream_ts,
                                       markdown_text=chunk)
                self._sent += len(chunk)
                self.appends_sent += 1
            except SlackAPIError as exc:
                self._give_up_stream(f"chat.appendStream failed: {exc.error}")
        if bound.cancelled_caught:
            # Unknown whether Slack took it: chat.update rewrites the whole text, so it is safe.
            self._give_up_stream("chat.appendStream did not answer")

    async def _stop_stream_quietly(self) -> None:
        with anyio.move_on_after(EXTRA_TIMEOUT):
            try:
                await self._slack.call("chat.stopStream", channel=self.channel, ts=self._stream_ts)
            except SlackAPIError as exc:
                log.debug("chat.stopStream before falling back: %s", exc.error)

    def _give_up_stream(self, why: str) -> None:
        """Carry on with paced chat.update: in the stream's message when there is one."""
        if self.mode != "native":
            return
        log.info("native streaming in %s/%s given up (%s); continuing with chat.update",
                 self.channel, self.thread_ts, why)
        self.fell_back = why
        self.mode = "update"
        if self._stream_ts:
            self._fallback.adopt(self._stream_ts, self.text[:self._sent])
            if self.text:
                self._fallback.append(self.text)
            if self._tg is not None:
                self._tg.start_soon(self._fallback.run)

    # ---- best-effort extras ----------------------------------------------------------

    async def _add_feedback(self, text: str, notice: str) -> None:
        body = f"{text}\n\n{notice}" if notice else text
        last = split_markdown(body, self._limit)[-1]
        ts = self.message_ts[-1]
        with anyio.move_on_after(EXTRA_TIMEOUT):
            try:
                await self._slack.call("chat.update", channel=self.channel, ts=ts, text=last,
                                       blocks=answer_blocks(last))
            except SlackAPIError as exc:
                log.info("could not add feedback buttons to %s/%s: %s", self.channel, ts, exc.error)

    async def _show_status(self) -> None:
        status = assistant_status(self._status)
        if not self._assistant or not status or status == self._status_shown:
            return
        await self._set_assistant_status(status)

    async def _clear_status(self) -> None:
        if self._assistant and self._status_shown:
            await self._set_assistant_status("")

    async def _set_assistant_status(self, status: str) -> None:
        with anyio.move_on_after(EXTRA_TIMEOUT):
            try:
                await self._slack.call("assistant.threads.setStatus", channel_id=self.channel,
                                       thread_ts=self.thread_ts, status=status)
                self._status_shown = status
            except SlackAPIError as exc:
                # Not an assistant thread (or an app without the feature): stop trying.
                log.debug("assistant.threads.setStatus in %s: %s", self.channel, exc.error)
                self._assistant = False

    async def _set_title(self, title: str) -> None:
        with anyio.move_on_after(EXTRA_TIMEOUT):
            try:
                await self._slack.call("assistant.threads.setTitle", channel_id=self.channel,
                                       thread_ts=self.thread_ts, title=title)
            except SlackAPIError as exc:
                log.debug("assistant.threads.setTitle in %s: %s", self.channel, exc.error)


def thread_title(text: str) -> str:
    """The first line of the first message, shortened on a word boundary."""
    line = " ".join(text.strip().splitlines()[0].split()) if text.strip() else ""
    if len(line) <= TITLE_CHARS:
        return line
    return line[:TITLE_CHARS].rsplit(" ", 1)[0].rstrip(",.;:") + "…"


async def slack_surface(services: Services, msg: IncomingMessage, options: RequestOptions) -> SlackAnswerWriter:
    """The Slack surface for one request. Never raises."""
    settings = services.settings
    in_dm = msg.channel.startswith("D")
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
                first = not await services.store.thread_known(msg.thread)
            except (StorageError, RuntimeError) as exc:
                log.debug("cannot tell whether %s is new (%s); no title", msg.thread, exc)
        title = thread_title(msg.text) if first else ""
    return SlackAnswerWriter(
        services.slack, msg.channel, msg.thread_ts, mode=mode, interval=settings.update_interval_seconds,
        recipient_user=msg.user, recipient_team=services.me.team_id, assistant_thread=in_dm, title=title,
    )
