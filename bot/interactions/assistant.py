"""Slack's AI-app surface: suggested prompts where a conversation starts.

Two generations of it, both handled:
- the agent view (`features.agent_view`, new apps): conversations live in the Messages
  tab; opening it sends `app_home_opened` with `tab == "messages"`, and moving around
  Slack with it open sends `app_context_changed`;
- the legacy assistant view (existing apps): `assistant_thread_started` when a user opens
  an assistant thread, `assistant_thread_context_changed` when they switch channel.

Either way the answer is the same: offer the suggested prompts (at most four) in that
conversation. Status ("is thinking…") and titles belong to answering; see
`bot.slack.answer_surface`. Every call here is best-effort: a refusal is logged.
"""

from __future__ import annotations

import logging
from typing import Any

from bot.interactions.welcome import SUGGESTED_PROMPTS, SUGGESTED_PROMPTS_TITLE
from bot.slack.web_api import SlackAPIError, SlackWebAPI

log = logging.getLogger(__name__)


async def suggest_prompts(slack: SlackWebAPI, channel: str, thread_ts: str | None = None) -> bool:
    try:
        await slack.call(
            "assistant.threads.setSuggestedPrompts",
            channel_id=channel,
            thread_ts=thread_ts,
            title=SUGGESTED_PROMPTS_TITLE,
            prompts=[dict(p) for p in SUGGESTED_PROMPTS[:4]],
        )
        return True
    except SlackAPIError as exc:
        log.info("could not set suggested prompts in %s: %s", channel, exc.error)
        return False


def context_entities(event: dict[str, Any]) -> list[str]:
    """What the user is looking at, for the log (`app_context_changed` entities, or the
    legacy `assistant_thread.context`)."""
    found: list[str] = []
    context = event.get("context")
    if isinstance(context, dict):
        for entity in context.get("entities") or ():
            if isinstance(entity, dict):
                found.append(f"{entity.get('type', '?')}={entity.get('value')}")
    thread = event.get("assistant_thread")
    if isinstance(thread, dict) and isinstance(thread.get("context"), dict):
        channel = thread["context"].get("channel_id")
        if channel:
            found.append(f"channel={channel}")
    return found


async def on_assistant_event(slack: SlackWebAPI, event: dict[str, Any]) -> None:
    """`assistant_thread_started` / `assistant_thread_context_changed` (legacy view) and
    `app_context_changed` (agent view)."""
    event_type = event.get("type")
    if event_type == "app_context_changed":
        channel = event.get("channel")
        log.info("agent view context for %s: %s", event.get("user"), context_entities(event) or "none")
        if isinstance(channel, str) and channel:
            await suggest_prompts(slack, channel)
        return
    thread = event.get("assistant_thread")
    if not isinstance(thread, dict):
        log.warning("%s event without an assistant_thread; ignored", event_type)
        return
    channel, thread_ts = thread.get("channel_id"), thread.get("thread_ts")
    if not isinstance(channel, str) or not channel or not isinstance(thread_ts, str) or not thread_ts:
        log.warning("%s event without channel_id or thread_ts; ignored", event_type)
        return
    log.info("%s in %s/%s (context: %s)", event_type, channel, thread_ts, context_entities(event) or "none")
    await suggest_prompts(slack, channel, thread_ts)
