"""`SlackServices`: what the Slack side of the bot (the nursery, the interactions, the
answer surfaces) uses — processing's `Services` plus the Slack Web API client and the
bot's identity. Built once at start-up (`bot.startup`); processing is given the same
object typed as `Services`, and so never sees the Slack fields."""

from __future__ import annotations

from dataclasses import dataclass

from bot.processing.context import Services
from bot.slack.events import BotIdentity
from bot.slack.web_api import SlackWebAPI


@dataclass(frozen=True, kw_only=True)
class SlackServices(Services):
    slack: SlackWebAPI
    me: BotIdentity
