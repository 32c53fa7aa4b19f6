"""The options one request runs with: which model, which instructions, how to sample.

Today they come from the process settings. `resolve_options` is the one place that
will also consult per-user and per-thread preferences (the settings modal), so the
rest of processing never needs to know where an option came from.
"""

from __future__ import annotations

from dataclasses import dataclass

from bot.processing.context import Services
from bot.slack_events import IncomingMessage


@dataclass(frozen=True)
class RequestOptions:
    model: str
    system_prompt: str
    max_answer_tokens: int
    temperature: float | None = None  # None: the model's default
    reasoning_effort: str | None = None  # for reasoning models: "low" | "medium" | "high"
    stream: bool = True  # False: one final message instead of live updates
    history_messages: int | None = None  # None: as much as fits the context budget


async def resolve_options(services: Services, msg: IncomingMessage) -> RequestOptions:
    settings = services.settings
    return RequestOptions(
        model=settings.openai_model,
        system_prompt=settings.system_prompt,
        max_answer_tokens=settings.max_answer_tokens,
    )
