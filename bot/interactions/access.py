"""Who may use the bot, and where: ALLOWED_USERS / ALLOWED_CHANNELS (both optional).

Pure rules, so they are tested directly and can run inside the Socket Mode ack (a
refused slash command is answered in the ack itself). Admins are always allowed.
ALLOWED_CHANNELS restricts channels only; a DM with the bot is governed by
ALLOWED_USERS alone. Refusals are polite and said once per thread (storage remembers).
"""

from __future__ import annotations

from bot.config import SurfaceSettings
from bot.slack.events import is_dm_channel

REFUSAL_USER = (
    "Sorry, I'm only available to some people in this workspace. "
    "If you think you should have access, ask a workspace admin."
)
REFUSAL_CHANNEL = (
    "Sorry, I'm not enabled in this channel. You can talk to me in a direct message, "
    "or ask a workspace admin to enable me here."
)


def refusal(surfaces: SurfaceSettings, user: str, channel: str | None) -> str:
    """ "" when `user` may use the bot in `channel` (None: no channel involved, e.g. the
    settings modal); otherwise the polite line to show them."""
    if user in surfaces.admin_users:
        return ""
    if surfaces.allowed_users and user not in surfaces.allowed_users:
        return REFUSAL_USER
    if (
        channel
        and surfaces.allowed_channels
        and not is_dm_channel(channel)
        and channel not in surfaces.allowed_channels
    ):
        return REFUSAL_CHANNEL
    return ""
