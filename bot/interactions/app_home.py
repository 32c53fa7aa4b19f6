"""The App Home tab: what the assistant does, the user's current settings, their usage
this month (and budget), and a button that opens the settings modal (admins get a second
one for the workspace defaults, and also see the workspace's usage and its top users).

Published with `views.publish` when the user opens the Home tab and again after they
save settings, so it always shows what the next answer will use.
"""

from __future__ import annotations

import logging
from typing import Any

from slack_sdk.models.blocks import (
    ActionsBlock,
    ButtonElement,
    ContextBlock,
    DividerBlock,
    HeaderBlock,
    MarkdownTextObject,
    SectionBlock,
)
from slack_sdk.models.views import View

from bot.preferences import Preferences, is_reasoning_model
from bot.slack.web_api import SlackAPIError, SlackWebAPI
from bot.storage.base import UsageSummary
from bot.usage import MonthUsage, day_text, month_text

log = logging.getLogger(__name__)

OPEN_SETTINGS_ACTION = "open_settings"


def _excerpt(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + "…"


def settings_summary(prefs: Preferences) -> list[str]:
    """One mrkdwn line per setting, as the Home tab lists them."""
    if is_reasoning_model(prefs.model):
        sampling = f"*Reasoning effort:* {prefs.reasoning_effort or 'model default'}"
    else:
        sampling = f"*Temperature:* {'model default' if prefs.temperature is None else f'{prefs.temperature:g}'}"
    history = "as many as fit" if prefs.history_messages is None else str(prefs.history_messages)
    return [
        f"*Model:* `{prefs.model}`",
        sampling,
        f"*Answers:* {'streamed as they are written' if prefs.stream else 'posted when finished'}",
        f"*Earlier messages included:* {history}",
        f"*Images:* size {prefs.image_size}, quality {prefs.image_quality}",
        f"*Language:* {prefs.language}",
    ]


def _count(n: int, one: str, many: str) -> str:
    return f"{n:,} {one if n == 1 else many}"


def _spent(summary: UsageSummary) -> str:
    return (
        f"{_count(summary.tokens, 'token', 'tokens')} ({summary.tokens_in:,} in, {summary.tokens_out:,} out) "
        f"in {_count(summary.requests, 'request', 'requests')}"
    )


def _budget_line(whose: str, used: int, budget: int | None, resets: str) -> str:
    if budget is None:
        return f"{whose}: unlimited."
    if used >= budget:
        return f"{whose}: {budget:,} tokens a month, *all used*; new questions wait until {resets} (UTC)."
    return f"{whose}: {budget:,} tokens a month, {used * 100 // budget}% used; it resets on {resets} (UTC)."


def usage_summary(usage: MonthUsage | None, *, is_admin: bool) -> list[str]:
    """The Home tab's usage sections (mrkdwn), one string per section."""
    if usage is None:
        return ["*Your usage this month*\n_Not available right now; open this tab again in a moment._"]
    month, resets = month_text(usage.start), day_text(usage.resets_at)
    sections = [
        f"*Your usage in {month}* (UTC)\n{_spent(usage.mine)}.\n"
        + _budget_line("Your budget", usage.mine.tokens, usage.budgets.user, resets)
    ]
    if is_admin and usage.workspace is not None:
        lines = [
            f"*Workspace usage in {month}*",
            f"{_spent(usage.workspace)}.",
            _budget_line("Workspace budget", usage.workspace.tokens, usage.budgets.workspace, resets),
        ]
        if usage.top_users:
            lines.append("*Top users*")
            lines += [
                f"{n}. <@{u.user}> — {_count(u.usage.tokens, 'token', 'tokens')}, "
                f"{_count(u.usage.requests, 'request', 'requests')}"
                for n, u in enumerate(usage.top_users, 1)
            ]
        sections.append("\n".join(lines))
    return sections


def home_view(
    prefs: Preferences,
    *,
    command: str,
    is_admin: bool,
    allowed: bool = True,
    usage: MonthUsage | None = None,
) -> dict[str, Any]:
    """The Home tab. `usage`: this month's (`bot.usage.month_usage`; None: not available,
    which the tab says)."""
    if not allowed:
        return View(
            type="home",
            blocks=[
                HeaderBlock(text="AI assistant"),
                SectionBlock(
                    text=MarkdownTextObject(
                        text="This assistant is limited to some people in this workspace. Ask a workspace admin "
                        "if you should have access."
                    )
                ),
            ],
        ).to_dict()
    buttons = [ButtonElement(text="Change my settings", action_id=OPEN_SETTINGS_ACTION, value="user", style="primary")]
    if is_admin:
        buttons.append(
            ButtonElement(text="Workspace defaults", action_id=f"{OPEN_SETTINGS_ACTION}_workspace", value="workspace")
        )
    instructions = _excerpt(prefs.instructions) if prefs.instructions.strip() else "_none_"
    blocks = [
        HeaderBlock(text="AI assistant"),
        SectionBlock(
            text=MarkdownTextObject(
                text=(
                    "Ask me anything in the *Messages* tab, mention me in a channel, or keep talking in a thread I'm "
                    "in — each thread is one conversation. On any message, the ⋮ menu has *Summarize thread* and "
                    "*Translate message*."
                )
            )
        ),
        DividerBlock(),
        SectionBlock(text=MarkdownTextObject(text="*Your settings*\n" + "\n".join(settings_summary(prefs)))),
        SectionBlock(text=MarkdownTextObject(text=f"*Custom instructions:* {instructions}")),
        ActionsBlock(elements=buttons),
        ContextBlock(
            elements=[
                MarkdownTextObject(
                    text=f"`{command}` opens the settings anywhere. For one thread only, use *Thread settings* "
                    "in the ⋮ menu of a message in that thread."
                )
            ]
        ),
        DividerBlock(),
    ]
    blocks += [SectionBlock(text=MarkdownTextObject(text=text)) for text in usage_summary(usage, is_admin=is_admin)]
    return View(type="home", blocks=blocks).to_dict()


async def publish_home(slack: SlackWebAPI, user: str, view: dict[str, Any]) -> bool:
    """Publish the Home tab for `user`; False (logged) when Slack refuses."""
    try:
        await slack.call("views.publish", user_id=user, view=view)
        return True
    except SlackAPIError as exc:
        log.warning("could not publish the Home tab for %s: %s", user, exc.error)
        return False
