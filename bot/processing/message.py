"""The message to answer, as processing sees it (the Slack reader's `parse_event` makes
it from an event; the shell makes its own)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bot.storage.base import ThreadKey


@dataclass(frozen=True)
class IncomingMessage:
    event_id: str
    kind: str  # "dm" | "mention" | "thread_followup"
    channel: str
    user: str
    text: str
    ts: str
    thread_ts: str  # the thread the reply goes in (the message's own ts when it starts one)
    in_existing_thread: bool  # the message was posted inside a thread that existed before it
    files: tuple[dict[str, Any], ...] = ()  # Slack file objects attached to the message (as the event gives them)

    @property
    def thread(self) -> ThreadKey:
        return ThreadKey(self.channel, self.thread_ts)

    @property
    def dedupe_keys(self) -> tuple[str, str]:
        return (f"event:{self.event_id}", f"msg:{self.channel}:{self.ts}")
