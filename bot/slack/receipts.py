"""Receipts: an answer's final write says, in the message's own metadata, which request
it ends and how.

Storage is where a request is closed, but storage can be out of reach at the moment
the answer reaches Slack (a replica cut off from its database). The request then looks
abandoned, and the replica that takes it over would edit what the user already reads
into the interrupted notice. So the final write (`chat.update`, `chat.stopStream` or
`chat.postMessage`, which all take `metadata`) carries a receipt, and a takeover first
reads the thread (`conversations.replies` with `include_all_metadata`): a delivered
answer is left as it is and recorded from what Slack shows.

A post already carries the marker that makes `chat.postMessage` exactly-once
(`web_api.POST_MARKER`); a posted final part keeps that event type and adds the
receipt's fields to its payload, so one message never needs two metadata objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, get_args

from bot.processing.surface import Receipt
from bot.storage.base import Outcome

RECEIPT_EVENT = "slackbot_answer"  # metadata event_type of an edited or stopped final message


def receipt_metadata(receipt: Receipt) -> dict[str, Any]:
    return {"event_type": RECEIPT_EVENT, "event_payload": receipt_payload(receipt)}


def receipt_payload(receipt: Receipt) -> dict[str, str]:
    return {"request_id": receipt.request_id, "outcome": receipt.outcome, "reply_to": receipt.reply_to}


def reply_payload(reply_to: str, request_id: str = "") -> dict[str, str]:
    """What a message of the bot that answers another says about itself before it is
    finished (a busy reply, a notice; an answer's placeholder): the message it answers,
    and for a placeholder the request whose answer it opens (a takeover finds it by
    that: `find_opening`). No outcome: that makes a receipt."""
    payload = {"reply_to": reply_to} if reply_to else {}
    return payload | {"request_id": request_id} if request_id else payload


def answers_message(message: dict[str, Any], ts: str, bot_id: str) -> bool:
    """Whether `message` (read with `include_all_metadata`) is the bot's answer, finished
    or not, to the message `ts`: its placeholder or its final write."""
    meta = message.get("metadata")
    payload = meta.get("event_payload") if isinstance(meta, dict) else None
    return isinstance(payload, dict) and payload.get("reply_to") == ts and message.get("bot_id") == bot_id


@dataclass(frozen=True)
class Delivered:
    """A request's final write, as found in its thread."""

    outcome: Outcome  # as the writer would have stored it
    shown: str  # what the answer's messages show, joined (answer and notices)
    asked: str  # the user's message, without a leading mention ("" if not found)


def find_delivered(
    replies: list[dict[str, Any]], request_id: str, *, placeholder_ts: str, user_ts: str
) -> Delivered | None:
    """The final write of `request_id` among a thread's messages (read with
    `include_all_metadata`), or None if it never reached Slack."""
    last = next((m for m in reversed(replies) if _receipt_of(m) == request_id), None)
    if last is None:
        return None
    payload = (last.get("metadata") or {}).get("event_payload") or {}
    end = _ts(last)
    start = placeholder_ts or user_ts
    # The answer's messages: from its placeholder (or after the question) to the receipt,
    # written by the bot that wrote the receipt.
    parts = [
        m
        for m in replies
        if m.get("bot_id") == last.get("bot_id")
        and (_ts(m) >= ts_order(placeholder_ts) if placeholder_ts else _ts(m) > ts_order(start))
        and _ts(m) <= end
    ]
    question = next((m for m in replies if m.get("ts") == user_ts), None)
    asked = _LEADING_MENTION.sub("", str(question.get("text") or "")).strip() if question else ""
    return Delivered(
        outcome=_outcome(payload.get("outcome")),
        shown="".join(shown_text(m) for m in parts),
        asked=asked,
    )


def find_opening(replies: list[dict[str, Any]], request_id: str, *, user_ts: str, bot_id: str) -> str:
    """The first message of the answer of `request_id` (to the message `user_ts`), still
    in progress, among a thread's messages (read with `include_all_metadata`), for a
    request storage knows without it (its process died between posting it and
    recording it); "" if there is none.

    - A placeholder says in its metadata which request's answer it opens (until a final
      write replaces that with a receipt).
    - A native stream says nothing (chat.startStream takes no metadata), but it is then
      the only kind of message of the bot without metadata (every post carries the
      exactly-once marker, every final write its receipt) bar a file's: the bot's newest
      such message after the question and after the thread's last receipt (the end of
      the answer before it)."""
    after = ts_order(user_ts)
    mine = [m for m in replies if bot_id and m.get("bot_id") == bot_id and _ts(m) > after]
    placeholders = [m for m in mine if _payload(m).get("request_id") == request_id and not _receipt_of(m)]
    if placeholders:
        return str(placeholders[0].get("ts") or "")
    last_end = max((_ts(m) for m in replies if _receipt_of(m)), default=(0, 0))
    streams = [m for m in mine if not m.get("metadata") and not m.get("files") and _ts(m) > last_end]
    return str(streams[-1].get("ts") or "") if streams else ""


def find_continuations(replies: list[dict[str, Any]], request_id: str, *, opening_ts: str, bot_id: str) -> list[str]:
    """The further messages of the unfinished answer of `request_id` (an answer longer
    than one message continues in more, each saying in its metadata which request's
    answer it is part of, as the placeholder does), its opening `opening_ts` left out."""
    return [
        str(m.get("ts"))
        for m in replies
        if bot_id
        and m.get("bot_id") == bot_id
        and m.get("ts") != opening_ts
        and _payload(m).get("request_id") == request_id
        and not _receipt_of(m)
    ]


def _payload(message: dict[str, Any]) -> dict[str, Any]:
    meta = message.get("metadata")
    payload = meta.get("event_payload") if isinstance(meta, dict) else None
    return payload if isinstance(payload, dict) else {}


def _outcome(value: object) -> Outcome:
    """A receipt's outcome; one this version does not know was delivered, at least."""
    for known in get_args(Outcome):
        if value == known:
            return known  # type: ignore[no-any-return]
    return "answered"


def shown_text(message: dict[str, Any]) -> str:
    """The text a message shows: its markdown blocks when it has them (its `text` is
    then only the notification fallback), else its text."""
    blocks = [b for b in message.get("blocks") or [] if isinstance(b, dict) and b.get("type") == "markdown"]
    if blocks:
        return "".join(str(b.get("text") or "") for b in blocks)
    return str(message.get("text") or "")


_LEADING_MENTION = re.compile(r"^\s*<@[A-Z0-9]+(\|[^>]*)?>")


def _receipt_of(message: dict[str, Any]) -> str:
    meta = message.get("metadata")
    if not isinstance(meta, dict):
        return ""
    payload = meta.get("event_payload")
    if not isinstance(payload, dict) or "outcome" not in payload:
        return ""
    return str(payload.get("request_id") or "")


def _ts(message: dict[str, Any]) -> tuple[int, int]:
    return ts_order(str(message.get("ts") or ""))


def ts_order(ts: str) -> tuple[int, int]:
    """Slack's "seconds.micros" as numbers, so that ts compare in time order."""
    seconds, _, fraction = ts.partition(".")
    try:
        return int(seconds or 0), int(fraction or 0)
    except ValueError:
        return 0, 0
