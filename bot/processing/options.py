"""The options one request runs with: which model, which instructions, how to sample.

`resolve_options` is the one place that consults the process settings and the stored
preferences (workspace defaults, the user's own, a thread's override — see
`bot.preferences`), so the rest of processing never needs to know where an option
came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bot.config import Settings
from bot.preferences import Preferences, baseline, is_reasoning_model, load_layers, merge
from bot.processing.context import Services
from bot.processing.message import IncomingMessage
from bot.storage.base import ThreadKey
from bot.usage import Budgets, budgets_from


@dataclass(frozen=True)
class RequestOptions:
    model: str
    system_prompt: str
    max_answer_tokens: int
    temperature: float | None = None  # None: the model's default
    reasoning_effort: str | None = None  # for reasoning models: "low" | "medium" | "high"
    stream: bool = True  # False: one final message instead of live updates
    history_messages: int | None = None  # None: as much as fits the context budget
    image_size: str = "auto"  # for image generation: "auto" | "1024x1024" | "1536x1024" | "1024x1536"
    image_quality: str = "auto"  # "auto" | "low" | "medium" | "high"
    language: str = "English"  # the user's language (translations)
    budgets: Budgets = field(default_factory=Budgets)  # monthly token budgets in force (bot.usage.check_budget)


async def resolve_options(services: Services, msg: IncomingMessage) -> RequestOptions:
    """The options for answering `msg`: process settings, then workspace defaults, the
    user's own settings and the thread's override (the settings modal)."""
    return await options_for(services, msg.user, msg.thread)


async def options_for(services: Services, user: str, thread: ThreadKey | None) -> RequestOptions:
    """`resolve_options` for any caller that has a user and maybe a thread (shortcuts).
    The budgets come from the same read: the workspace defaults hold them."""
    settings = services.settings
    layers = await load_layers(services.store, user, thread)
    prefs = merge(baseline(settings), layers.workspace, layers.user, layers.thread)
    return options_from(settings, prefs, budgets_from(settings.budgets, layers.workspace))


def options_from(settings: Settings, prefs: Preferences, budgets: Budgets | None = None) -> RequestOptions:
    """Pure: a temperature only for models that take one, an effort only for reasoning models."""
    reasoning = is_reasoning_model(prefs.model)
    system_prompt = settings.openai.system_prompt
    if prefs.instructions.strip():
        system_prompt = (
            f"{system_prompt}\n\nStanding instructions from the user "
            f"(follow them unless they conflict with the above):\n{prefs.instructions.strip()}"
        )
    return RequestOptions(
        model=prefs.model,
        system_prompt=system_prompt,
        max_answer_tokens=settings.openai.max_answer_tokens,
        temperature=None if reasoning else prefs.temperature,
        reasoning_effort=prefs.reasoning_effort if reasoning else None,
        stream=prefs.stream,
        history_messages=prefs.history_messages,
        image_size=prefs.image_size,
        image_quality=prefs.image_quality,
        language=prefs.language,
        budgets=budgets_from(settings.budgets, {}) if budgets is None else budgets,
    )
