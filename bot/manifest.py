"""`slackbot manifest`: the Slack app manifest this bot needs, ready to paste.

With it, setting up Slack is: *Create New App → From a manifest*, paste, *Install*,
copy two tokens into `.env`. Everything the bot relies on is declared here, so the
app and the code cannot drift apart: Socket Mode, the bot scopes, the events, the
slash command, the message shortcuts, App Home with the Messages tab (without it
Slack silently blocks DMs to the app) and the agent view with its suggested prompts.
"""

from __future__ import annotations

from typing import Any

from bot.interactions.settings_modal import THREAD_SETTINGS
from bot.interactions.shortcuts import SUMMARIZE, TRANSLATE
from bot.interactions.welcome import SUGGESTED_PROMPTS

BOT_SCOPES = (
    "app_mentions:read",  # @mentions in channels
    "assistant:write",  # thread status, titles, suggested prompts
    "channels:history",  # follow-ups in public channel threads, "Summarize thread"
    "chat:write",  # answers, native streaming
    "commands",  # the settings slash command
    "files:read",  # attached files (files.info, downloads)
    "files:write",  # posting the images it draws
    "groups:history",  # the same in private channels
    "im:history",  # DMs
    "im:write",
    "mpim:history",  # group DMs
    "users:read",  # the user's Slack locale, the settings modal's first language (users.info)
)
BOT_EVENTS = (
    "app_mention",
    "message.im",
    "message.channels",
    "message.groups",
    "message.mpim",
    "app_home_opened",  # Home tab; the Messages tab in the agent view
    "app_context_changed",  # agent view
    "assistant_thread_started",  # legacy assistant view (existing apps)
    "assistant_thread_context_changed",
    "agent_session_stopped",  # the agent view's Stop button (its docs name no scope of its own)
)
DESCRIPTION = "An AI assistant backed by OpenAI: answers in DMs and threads, summarizes and translates."


def build_manifest(*, name: str = "AI Assistant", command: str = "/settings") -> dict[str, Any]:
    """The manifest as a dict (JSON-ready). `name` is the app and bot name Slack shows."""
    name = name.strip()[:35] or "AI Assistant"  # Slack's limit on the app name
    bot_name = name[:80]
    return {
        "_metadata": {"major_version": 1, "minor_version": 1},
        "display_information": {
            "name": name,
            "description": DESCRIPTION[:139],
            "long_description": (
                "Talk to it in a direct message, mention it in a channel, or keep talking in a thread it is "
                "part of. Answers stream in as they are written. Use the settings command or the Home tab to "
                "choose the model, standing instructions and more; the message menu has Summarize thread and "
                "Translate message. Each thread is one conversation, remembered between messages."
            ),
            "background_color": "#2c2d30",
        },
        "features": {
            "app_home": {
                "home_tab_enabled": True,
                "messages_tab_enabled": True,
                "messages_tab_read_only_enabled": False,  # read-only would block DMs to the app
            },
            "bot_user": {"display_name": bot_name, "always_online": True},
            "agent_view": {
                "agent_description": DESCRIPTION[:300],
                "suggested_prompts": [dict(p) for p in SUGGESTED_PROMPTS[:4]],
            },
            "slash_commands": [
                {
                    "command": command,
                    "description": "Choose the model, instructions and more",
                    "usage_hint": "(opens your settings)",
                    "should_escape": False,
                }
            ],
            "shortcuts": [
                {
                    "name": "Summarize thread",
                    "type": "message",
                    "callback_id": SUMMARIZE,
                    "description": "A short summary of this thread, just for you",
                },
                {
                    "name": "Translate message",
                    "type": "message",
                    "callback_id": TRANSLATE,
                    "description": "This message in your language, just for you",
                },
                {
                    "name": "Thread settings",
                    "type": "message",
                    "callback_id": THREAD_SETTINGS,
                    "description": "Assistant settings for this thread only",
                },
            ],
        },
        "oauth_config": {"scopes": {"bot": list(BOT_SCOPES)}},
        "settings": {
            "event_subscriptions": {"bot_events": list(BOT_EVENTS)},
            "interactivity": {"is_enabled": True},
            "org_deploy_enabled": False,
            "socket_mode_enabled": True,
            "token_rotation_enabled": False,
        },
    }
