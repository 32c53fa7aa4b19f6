"""Thumbs up / down on answers: the buttons under each answer, and recording a click.

The buttons are built in `bot.slack.feedback_blocks` (they go out with the answer's
final write). A click arrives as a `block_actions`
interaction; the rating is stored per (answer, user), a second click replacing the first.
"""

from __future__ import annotations

import logging
from typing import Any

from bot.slack.feedback_blocks import RATINGS
from bot.storage.base import Store

log = logging.getLogger(__name__)


async def record_click(store: Store, payload: dict[str, Any], action: dict[str, Any]) -> bool:
    """Store the rating of one feedback click; False (with a log line) if the payload is
    not a usable click."""
    rating = action.get("value")
    user = (payload.get("user") or {}).get("id")
    container = payload.get("container") or {}
    channel = container.get("channel_id") or (payload.get("channel") or {}).get("id")
    message_ts = container.get("message_ts") or (payload.get("message") or {}).get("ts")
    if (
        rating not in RATINGS
        or not isinstance(user, str)
        or not user
        or not isinstance(channel, str)
        or not channel
        or not isinstance(message_ts, str)
        or not message_ts
    ):
        log.warning("feedback click without a rating, user, channel or message; ignored")
        return False
    await store.record_feedback(channel, message_ts, user, rating)
    log.info("feedback %s on %s/%s from %s", rating, channel, message_ts, user)
    return True
