"""A Slack thread (`conversations.replies` messages) read two ways, by one set of rules:
as conversation history for the model (`history_from_replies`) and as a plain
transcript for someone to summarize (`transcript`).

Which messages count and who wrote them is decided once (`_said`): a message counts
when it has text; it is the bot's own when its user is the bot user or its bot id the
bot's, another bot's when it has any other bot id, else a person's.

The two readers differ only where their purpose does, on other bots' messages: the
history leaves them out (their words are neither the user's nor the model's, and the
model must not take them for either), while a summary is of the whole conversation, so
the transcript keeps them, as the bot's own are kept: under "the assistant".
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from bot.slack.events import BotIdentity, strip_mention
from bot.storage.base import HistoryMessage

Author = Literal["me", "other bot", "person"]


def _said(replies: list[dict[str, Any]], me: BotIdentity) -> Iterator[tuple[dict[str, Any], Author, str]]:
    """Each message with text, oldest first: the message, who wrote it, its text."""
    for m in replies:
        text = m.get("text") or ""
        if not isinstance(text, str) or not text.strip():
            continue
        if m.get("user") == me.user_id or (me.bot_id and m.get("bot_id") == me.bot_id):
            yield m, "me", text
        elif m.get("bot_id"):
            yield m, "other bot", text
        else:
            yield m, "person", text


def history_from_replies(
    replies: list[dict[str, Any]], me: BotIdentity, *, exclude_ts: set[str]
) -> list[HistoryMessage]:
    """The bot's own messages as the assistant's (as written), people's as the user's
    (without the mention of the bot); other bots' and those in `exclude_ts` left out."""
    history: list[HistoryMessage] = []
    for m, author, text in _said(replies, me):
        ts = m.get("ts")
        if not isinstance(ts, str) or ts in exclude_ts:
            continue
        if author == "me":
            history.append(HistoryMessage("assistant", text, ts))
        elif author == "person":
            history.append(HistoryMessage("user", strip_mention(text, me.user_id), ts))
    return history


def transcript(replies: list[dict[str, Any]], me: BotIdentity) -> str:
    """The thread as plain lines — "<@U123>: text", or "the assistant: text" for the
    bot's and other bots' messages — oldest first, without the mention of the bot."""
    lines = []
    for m, author, text in _said(replies, me):
        who = f"<@{m.get('user')}>" if author == "person" else "the assistant"
        lines.append(f"{who}: {strip_mention(text, me.user_id)}")
    return "\n\n".join(lines)
