"""The answer as the user sees it: a placeholder that fills in while the model streams.

`ReplyWriter` posts the placeholder, then `run()` (a task inside the request's own task
group) pushes the growing text with `chat.update` at most once per `interval` per
message — deltas are coalesced, never queued — and `finish()` writes the final text
and any notice. Answers longer than one Slack message continue in further messages,
split without breaking code blocks.

Slack's rate limits are per method for the whole workspace (`slack/rate_limits.py`):
- the placeholder is posted only while `chat.update` has room for its final edit beside
  the final edits already promised; otherwise nothing is posted until the answer is
  done, and the answer is then posted with `chat.postMessage` (limited per channel, not
  per workspace) — the thread status shows progress meanwhile;
- interim updates are skipped while the budget is low (the next tick or the final
  write carries the same text); the final write waits for its turn.
Slack errors while streaming are logged and skipped (the final write repairs the view).
Broadcast mentions in the model's text (`<!channel>`, `<!here>`, user groups) are
made inert before anything is shown.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import anyio

from bot.processing.surface import PLACEHOLDER, Receipt
from bot.retrying import retry
from bot.slack.feedback_blocks import answer_blocks
from bot.slack.markdown import SLACK_MARKDOWN_LIMIT, neutralize_broadcasts, split_markdown
from bot.slack.receipts import receipt_metadata, receipt_payload, reply_payload
from bot.slack.web_api import SlackAPIError, SlackRateLimited, SlackSkipped, SlackWebAPI

log = logging.getLogger(__name__)

POST_TIMEOUT = 15.0
FINAL_ATTEMPTS = 3  # the final text matters most: a transient refusal gets two more tries
PERMANENT_ERRORS = frozenset(
    {
        "message_not_found",
        "channel_not_found",
        "cant_update_message",
        "is_archived",
        "not_in_channel",
        "invalid_auth",
        "token_revoked",
        "account_inactive",
        "msg_too_long",
        "invalid_blocks",
        "streaming_state_conflict",
    }
)
FALLBACK_TEXT_CHARS = 300  # the notification text beside blocks (chat.update's `text` takes 4,000 at most)


def fallback_text(part: str) -> str:
    """The short plain `text` that goes with blocks: notifications and old clients."""
    line = " ".join(part.split())
    return line if len(line) <= FALLBACK_TEXT_CHARS else line[: FALLBACK_TEXT_CHARS - 1].rstrip() + "…"


async def pace(interval: float, *, text_sent: bool, text_came: anyio.Event) -> None:
    """The pause after a flush of a streaming answer: `interval`, except after a flush
    that showed only a status while no text had come yet. The answer's first text then
    ends the pause, so it goes out at once; pacing applies to the text after it."""
    if text_sent or text_came.is_set():
        await anyio.sleep(interval)
        return
    with anyio.move_on_after(interval):
        await text_came.wait()


class ReplyWriter:
    def __init__(
        self,
        slack: SlackWebAPI,
        channel: str,
        thread_ts: str,
        *,
        interval: float = 1.0,
        limit: int = SLACK_MARKDOWN_LIMIT,
        feedback: bool = False,
        reply_to: str = "",
        request_id: str = "",
        may_write: Callable[[], bool] = lambda: True,
    ) -> None:
        self._slack = slack
        self._may_write = may_write  # False: interim edits wait (see SlackAnswerWriter)
        self._reply_to = reply_to  # the message answered (in the placeholder's metadata)
        self._request_id = request_id  # the request answering it (there too)
        self.channel = channel
        self.thread_ts = thread_ts
        self._interval = interval
        self._limit = limit
        self._feedback = feedback  # thumbs up/down under a finished answer
        self._pieces: list[str] = []
        self._status = PLACEHOLDER
        self._dirty = anyio.Event()
        self._text_came = anyio.Event()  # the answer's first text (it is not held back)
        self.message_ts: list[str] = []  # the placeholder first, then continuation messages
        self._shown: list[str] = []
        self._committed = False  # a final chat.update promised in the workspace budget

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    @property
    def placeholder_ts(self) -> str:
        return self.message_ts[0] if self.message_ts else ""

    @property
    def placeholder_streams(self) -> bool:
        return False

    @property
    def opening_marked(self) -> bool:
        """The placeholder's metadata says which request's answer it opens (`reply_payload`)."""
        return bool(self._request_id)

    async def start(self, status: str = PLACEHOLDER) -> str:
        """Post the placeholder in the thread; returns its ts, or "" when the workspace's
        chat.update budget has no room for one more final edit (the answer is then posted
        when it is done). Raises SlackAPIError.

        Call it shielded and bounded (processing's `answer._start` does): a cancellation
        that lands while Slack is creating the message would otherwise leave a "Thinking…"
        message whose ts we never learnt and so could never finalize."""
        self._status = status
        limits = self._slack.limits
        if not limits.has_room_for("chat.update", calls=2):
            log.info("chat.update budget low: the answer in %s/%s is posted when done", self.channel, self.thread_ts)
            return ""
        limits.commit("chat.update")
        self._committed = True
        ts = ""
        try:
            ts = await self._slack.post_message(
                self.channel,
                self.thread_ts,
                markdown_text=status,
                payload=reply_payload(self._reply_to, self._request_id),
            )
        finally:
            if not ts:
                self.release()
        self.message_ts.append(ts)
        self._shown.append(status)
        return ts

    def adopt(self, ts: str, shown: str) -> None:
        """Carry on in a message posted by other means (a native stream that had to be
        given up), which currently shows `shown`: it becomes this writer's first message."""
        if self.message_ts:
            raise RuntimeError("adopt() must come before the writer posted anything")
        self.message_ts.append(ts)
        self._shown.append(shown)
        if not self._committed:
            self._slack.limits.commit("chat.update")
            self._committed = True

    def forget_shown(self, ts: str) -> None:
        """Take nothing as shown in message `ts` (its next write is always sent)."""
        for i, mine in enumerate(self.message_ts):
            if mine == ts:
                self._shown[i] = "\x00unknown"

    def set_status(self, status: str) -> None:
        """Show `status` in the placeholder until the answer starts arriving."""
        self._status = status
        self._dirty.set()

    def append(self, delta: str) -> None:
        self._pieces.append(delta)
        self._dirty.set()
        self._text_came.set()

    def _render(self, extra: str = "") -> list[str]:
        body = neutralize_broadcasts(self.text)
        if extra:
            body = f"{body}\n\n{extra}" if body else extra
        return split_markdown(body or self._status, self._limit)

    async def run(self) -> None:
        """Flush changes, at most once per interval, until cancelled. Without a message
        (posted when done) there is nothing to flush."""
        while True:
            await self._dirty.wait()
            self._dirty = anyio.Event()
            with_text = bool(self._pieces)
            if self.message_ts and not self._may_write():
                self._dirty.set()  # held back: at the next tick
            elif self.message_ts:
                try:
                    await self._show(self._render(), interim=True)
                except (SlackSkipped, SlackRateLimited):
                    self._dirty.set()  # the budget is low: try again at the next tick
                except SlackAPIError as exc:
                    log.warning("streaming update failed in %s/%s: %s", self.channel, self.thread_ts, exc.error)
            await pace(self._interval, text_sent=with_text, text_came=self._text_came)

    async def finish(self, notice: str = "", receipt: Receipt | None = None) -> bool:
        """Write the final answer (plus `notice`), waiting for the budget as long as the
        caller's bound allows; the last message written carries `receipt` in its
        metadata. Call it shielded and time-bounded. Returns False if Slack refused; the
        error is logged."""
        parts = self._render(notice)
        try:
            await retry(
                # parts already shown are skipped
                partial(self._show, parts, interim=False, final=True, receipt=receipt),
                errors=SlackAPIError,
                attempts=FINAL_ATTEMPTS,
                pause=self._final_retry_pause,
                retry_if=lambda exc: exc.error not in PERMANENT_ERRORS,
            )
            return True
        except SlackAPIError as exc:
            log.error("final update failed in %s/%s: %s", self.channel, self.thread_ts, exc.error)
            return False
        finally:
            self.release()

    def _final_retry_pause(self, n: int, exc: SlackAPIError) -> float:
        """0.2 s, then 0.4 s: short, since the final write already waits for its budget."""
        log.warning("final update failed in %s/%s (%s); retrying", self.channel, self.thread_ts, exc.error)
        return 0.2 * n

    def release(self) -> None:
        """Give back the final edit promised in the workspace's budget (once)."""
        if self._committed:
            self._committed = False
            self._slack.limits.uncommit("chat.update")

    async def _show(
        self, parts: list[str], *, interim: bool, final: bool = False, receipt: Receipt | None = None
    ) -> None:
        for i, part in enumerate(parts):
            last = final and i == len(parts) - 1
            stamp = receipt if last else None  # the receipt goes with the last write
            feedback = last and self._feedback and bool(self.text)
            again = stamp.reply_to if stamp is not None and stamp.try_again else ""
            blocks = answer_blocks(part, feedback=feedback, try_again=again) if feedback or again else None
            shown = part if blocks is None else f"{part}\x00{feedback}\x00{again}"
            if stamp is not None:
                shown = f"{shown}\x00{stamp.request_id}"  # written even if the text is already shown
            if i < len(self.message_ts):
                if self._shown[i] != shown:
                    metadata = receipt_metadata(stamp) if stamp is not None else None
                    if blocks is None:
                        await self._slack.update_message(
                            self.channel, self.message_ts[i], markdown_text=part, metadata=metadata, interim=interim
                        )
                    else:
                        await self._slack.update_message(
                            self.channel,
                            self.message_ts[i],
                            blocks=blocks,
                            text=fallback_text(part),
                            metadata=metadata,
                            interim=interim,
                        )
                    self._shown[i] = shown
            else:
                # A continuation says, as the placeholder does, which request's answer it
                # is part of: a takeover of an unfinished answer finds it, and removes it.
                payload = (
                    receipt_payload(stamp) if stamp is not None else reply_payload(self._reply_to, self._request_id)
                )
                if blocks is None:
                    ts = await self._slack.post_message(
                        self.channel, self.thread_ts, markdown_text=part, payload=payload
                    )
                else:
                    ts = await self._slack.post_message(
                        self.channel, self.thread_ts, blocks=blocks, text=fallback_text(part), payload=payload
                    )
                self.message_ts.append(ts)
                self._shown.append(shown)
