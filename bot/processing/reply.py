"""The answer as the user sees it: a placeholder that fills in while the model streams.

`ReplyWriter` posts the placeholder, then `run()` (a task inside the request's own task
group) pushes the growing text with `chat.update` at most once per `interval` per
message — deltas are coalesced, never queued — and `finish()` writes the final text
and any notice. Answers longer than one Slack message continue in further messages,
split without breaking code blocks.

Slack errors while streaming are logged and skipped (the final write repairs the view);
the Web API client already honours `Retry-After` on 429.
"""

from __future__ import annotations

import logging
from typing import Protocol

import anyio

from bot.processing.markdown import SLACK_MARKDOWN_LIMIT, split_markdown
from bot.slack_api import SlackAPIError, SlackWebAPI

log = logging.getLogger(__name__)

PLACEHOLDER = "_Thinking…_"
POST_TIMEOUT = 15.0
FINAL_ATTEMPTS = 3  # the final text matters most: a transient refusal gets two more tries
PERMANENT_ERRORS = frozenset({"message_not_found", "channel_not_found", "cant_update_message", "is_archived",
                              "not_in_channel", "invalid_auth", "token_revoked", "account_inactive"})


class ReplySurface(Protocol):
    """Where an answer appears. `ReplyWriter` is Slack; the shell has a terminal one."""

    message_ts: list[str]

    @property
    def text(self) -> str: ...

    @property
    def placeholder_ts(self) -> str: ...

    async def start(self, status: str = PLACEHOLDER) -> str: ...

    def set_status(self, status: str) -> None: ...

    def append(self, delta: str) -> None: ...

    async def run(self) -> None: ...

    async def finish(self, notice: str = "") -> bool: ...

    async def post_notice(self, notice: str) -> None: ...


class ReplyWriter:
    def __init__(self, slack: SlackWebAPI, channel: str, thread_ts: str, *, interval: float = 1.0,
                 limit: int = SLACK_MARKDOWN_LIMIT) -> None:
        self._slack = slack
        self.channel = channel
        self.thread_ts = thread_ts
        self._interval = interval
        self._limit = limit
        self._pieces: list[str] = []
        self._status = PLACEHOLDER
        self._dirty = anyio.Event()
        self.message_ts: list[str] = []  # the placeholder first, then continuation messages
        self._shown: list[str] = []
        self.updates_sent = 0

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    @property
    def placeholder_ts(self) -> str:
        return self.message_ts[0] if self.message_ts else ""

    async def start(self, status: str = PLACEHOLDER) -> str:
        """Post the placeholder in the thread; returns its ts. Raises SlackAPIError.

        Shielded (and bounded): a cancellation that lands while Slack is creating the
        message would otherwise leave a "Thinking…" message whose ts we never learnt
        and so could never finalize. Cancellation takes effect right after."""
        self._status = status
        ts = None
        with anyio.CancelScope(shield=True), anyio.move_on_after(POST_TIMEOUT):
            ts = await self._slack.post_message(self.channel, self.thread_ts, markdown_text=status)
        if ts is None:
            raise SlackAPIError("chat.postMessage", "timeout")
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

    def set_status(self, status: str) -> None:
        """Show `status` in the placeholder until the answer starts arriving."""
        self._status = status
        self._dirty.set()

    def append(self, delta: str) -> None:
        self._pieces.append(delta)
        self._dirty.set()

    def _render(self, extra: str = "") -> list[str]:
        body = self.text
        if extra:
            body = f"{body}\n\n{extra}" if body else extra
        return split_markdown(body or self._status, self._limit)

    async def run(self) -> None:
        """Flush changes, at most once per interval, until cancelled."""
        while True:
            await self._dirty.wait()
            self._dirty = anyio.Event()
            try:
                await self._show(self._render())
            except SlackAPIError as exc:
                log.warning("streaming update failed in %s/%s: %s", self.channel, self.thread_ts, exc.error)
            await anyio.sleep(self._interval)

    async def finish(self, notice: str = "") -> bool:
        """Write the final answer (plus `notice`). Call it shielded and time-bounded.
        Returns False if Slack refused; the error is logged."""
        if not self.message_ts:
            return False
        parts = self._render(notice)
        for attempt in range(1, FINAL_ATTEMPTS + 1):
            try:
                await self._show(parts)  # idempotent: parts already shown are skipped
                return True
            except SlackAPIError as exc:
                if exc.error in PERMANENT_ERRORS or attempt == FINAL_ATTEMPTS:
                    log.error("final update failed in %s/%s: %s", self.channel, self.thread_ts, exc.error)
                    return False
                log.warning("final update failed in %s/%s (%s); retrying", self.channel, self.thread_ts, exc.error)
                await anyio.sleep(0.2 * attempt)
        return False

    async def post_notice(self, notice: str) -> None:
        """A standalone message in the thread (when the placeholder could not be posted)."""
        await self._slack.post_message(self.channel, self.thread_ts, markdown_text=notice)

    async def _show(self, parts: list[str]) -> None:
        for i, part in enumerate(parts):
            if i < len(self.message_ts):
                if self._shown[i] != part:
                    await self._slack.update_message(self.channel, self.message_ts[i], markdown_text=part)
                    self._shown[i] = part
                    self.updates_sent += 1
            else:
                ts = await self._slack.post_message(self.channel, self.thread_ts, markdown_text=part)
                self.message_ts.append(ts)
                self._shown.append(part)
