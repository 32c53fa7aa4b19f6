"""A Slack thread (`conversations.replies` messages) as conversation history: the bot's
own messages are the assistant's, other people's the user's (without the mention of the
bot), other bots' are left out."""

from __future__ import annotations

from typing import Any

from bot.slack.events import BotIdentity, strip_mention
from bot.storage.base import HistoryMessage


def history_from_replies(
    replies: list[dict[str, Any]], me: BotIdentity, *, exclude_ts: set[str]
) -> list[HistoryMessage]:
    history: list[HistoryMessage] = []
    for m in replies:
        ts = m.get("ts")
        text = m.get("text") or ""
        if not isinstance(ts, str) or ts in exclude_ts or not isinstance(text, str) or not text.strip():
            continue
        mine = m.get("user") == me.user_id or (me.bot_id and m.get("bot_id") == me.bot_id)
        if mine:
            history.append(HistoryMessage("assistant", text, ts))
        elif not m.get("bot_id"):
            history.append(HistoryMessage("user", strip_mention(text, me.user_id), ts))
    return history
