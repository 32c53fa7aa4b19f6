"""The explicit objects processing works with: what it may use, and what it reports.

`Services` is built once by the nursery and passed in; nothing in processing reaches
for a global. `RequestState` is one request's visible progress: the nursery's watchdog
reads `stage` and `started_at`; nothing else touches it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
import openai

from bot.config import Settings
from bot.slack_api import SlackWebAPI
from bot.slack_events import BotIdentity, IncomingMessage
from bot.storage.base import Store


@dataclass(frozen=True)
class Services:
    settings: Settings
    slack: SlackWebAPI
    openai: openai.AsyncOpenAI
    store: Store
    me: BotIdentity
    model_slots: anyio.CapacityLimiter  # bounds concurrent OpenAI calls (ASYNC_MAX_CONCURRENT_REQUESTS)


@dataclass
class RequestState:
    request_id: str
    message: IncomingMessage
    started_at: float  # anyio.current_time()
    stage: str = "starting"
    outcome: str = ""
    placeholder_ts: str = ""
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
