"""Turn a Socket Mode envelope's payload into an `IncomingMessage`, or say why not.

This is pure data work (no I/O), so every rule about which Slack events the bot
answers lives here and is tested directly:

- DMs (`message` in an `im` channel) are answered;
- `app_mention`s in channels are answered;
- a plain `message` in a channel thread is a *candidate follow-up*: it is answered only
  if the bot already takes part in that thread (the nursery asks storage);
- the bot's own messages, other bots, and subtypes other than `file_share` are ignored.

A mention arrives twice (as `app_mention` and as `message`); `dedupe_keys` gives both
the event id and `channel:ts`, so whichever comes second is dropped.

`parse_stop` reads the agent view's Stop button (`agent_session_stopped`): which
thread's request to stop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bot.processing.message import IncomingMessage

ANSWERED_SUBTYPES = frozenset({None, "file_share", "thread_broadcast"})
MAX_TEXT_CHARS = 40_000  # Slack's own cap on a message's text


@dataclass(frozen=True)
class BotIdentity:
    user_id: str
    bot_id: str
    app_id: str = ""
    team_id: str = ""  # from auth.test; chat.startStream needs it to stream into a channel


@dataclass(frozen=True)
class Skip:
    """The event is not answered. `reason` goes to the log: at DEBUG for the ordinary
    cases (bots, edits, chatter), at WARNING when the event was `malformed`."""

    reason: str
    malformed: bool = False


@dataclass(frozen=True)
class StopRequest:
    """The user pressed Stop on an agent session (`agent_session_stopped`): stop the
    request answering in `channel`/`thread_ts`, or the one writing a message in `message_ts`."""

    channel: str
    thread_ts: str  # "" when the event named no thread
    message_ts: tuple[str, ...]  # the streaming messages Slack stopped (may be empty)
    user: str = ""


def parse_stop(payload: object) -> StopRequest | None:
    """The `agent_session_stopped` event in an `events_api` payload, or None for any other
    payload. Never raises.

    Slack's documented shape (docs.slack.dev/reference/events/agent_session_stopped; the
    same fields in @slack/types `AgentSessionStoppedEvent`):
        {"type": "agent_session_stopped", "channel": "C…", "thread_ts": "…",
         "streaming_message_ts": ["…"], "user": "U…", "event_ts": "…"}
    `streaming_message_ts` lists the app's streams Slack stopped; it is empty when none
    was active. Read defensively beyond that: `channel_id` for `channel`, and a single
    `message_ts` (or a string `streaming_message_ts`) for the list — assumptions, not
    documented. A stop that names no channel, or neither thread nor message, is malformed
    and comes back with an empty `channel` so the caller can log it."""
    if not isinstance(payload, dict):
        return None
    event = payload.get("event")
    if not isinstance(event, dict) or event.get("type") != "agent_session_stopped":
        return None
    channel = event.get("channel") or event.get("channel_id")
    thread_ts = event.get("thread_ts")
    streams = event.get("streaming_message_ts")
    if isinstance(streams, str):
        streams = [streams]
    message_ts = [ts for ts in streams if isinstance(ts, str) and ts] if isinstance(streams, list) else []
    if isinstance(event.get("message_ts"), str) and event["message_ts"]:
        message_ts.append(event["message_ts"])
    user = event.get("user")
    thread = thread_ts if isinstance(thread_ts, str) else ""
    if not isinstance(channel, str) or not (thread or message_ts):
        channel = ""
    return StopRequest(channel, thread, tuple(message_ts), user if isinstance(user, str) else "")


def is_dm_channel(channel: str) -> bool:
    """Slack's direct-message channel ids start with "D" (the one DM rule of the bot)."""
    return channel.startswith("D")


def strip_mention(text: str, bot_user_id: str) -> str:
    """Remove `<@UBOT>` (and `<@UBOT|name>`) from the text the model sees."""
    return re.sub(rf"<@{re.escape(bot_user_id)}(\|[^>]*)?>", "", text).strip()


def parse_event(payload: object, me: BotIdentity) -> IncomingMessage | Skip:
    """Classify an `events_api` payload. Never raises on malformed input."""
    if not isinstance(payload, dict):
        return Skip("payload is not an object", malformed=True)
    event = payload.get("event")
    if not isinstance(event, dict):
        return Skip("payload has no event object", malformed=True)
    event_type = event.get("type")
    if event_type not in ("message", "app_mention"):
        return Skip(f"event type {event_type!r} is not handled")

    subtype = event.get("subtype")
    if subtype not in ANSWERED_SUBTYPES:
        return Skip(f"message subtype {subtype!r} is ignored")
    if event.get("bot_id") or event.get("bot_profile") or (me.app_id and event.get("app_id") == me.app_id):
        return Skip("message from a bot")
    user = event.get("user")
    if user == me.user_id:
        return Skip("the bot's own message")

    channel, ts, text = event.get("channel"), event.get("ts"), event.get("text", "")
    if not isinstance(user, str) or not user:
        return Skip("event has no user")
    if not isinstance(channel, str) or not channel or not isinstance(ts, str) or not ts:
        return Skip("event is missing channel or ts", malformed=True)
    if not isinstance(text, str):
        text = ""
    event_id = payload.get("event_id")
    if not isinstance(event_id, str) or not event_id:
        event_id = f"{channel}:{ts}"
    raw_thread_ts = event.get("thread_ts")
    thread_ts = raw_thread_ts if isinstance(raw_thread_ts, str) else ""
    in_thread = bool(thread_ts) and thread_ts != ts
    reply_thread = thread_ts if in_thread else ts

    is_dm = event.get("channel_type") == "im" or (event_type == "message" and is_dm_channel(channel))
    if event_type == "app_mention":
        kind = "dm" if is_dm else "mention"
    elif is_dm:
        kind = "dm"
    elif f"<@{me.user_id}" in text:
        # Its `app_mention` twin carries the answer; without that subscription the
        # channel+ts dedupe would still let only one of them through.
        kind = "mention"
    elif in_thread:
        kind = "thread_followup"
    else:
        return Skip("channel message outside a thread, without a mention")

    clean = strip_mention(text, me.user_id)
    if not clean and not event.get("files"):
        return Skip("empty message")
    return IncomingMessage(
        event_id=event_id,
        kind=kind,
        channel=channel,
        user=user,
        text=clean,
        ts=ts,
        thread_ts=reply_thread,
        in_existing_thread=in_thread,
        files=tuple(f for f in event.get("files") or () if isinstance(f, dict)),
    )
