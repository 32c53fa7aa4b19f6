"""What a user can tune, how the levels combine, and which knobs a model accepts.

Levels, lowest priority first: the process settings (environment) → workspace defaults
(only ADMIN_USERS change them) → the user's own → an override for one thread. Each
stored level keeps only the fields set *at that level* (`changes`), so an admin's later
change to a default still reaches every user who never touched that field.

Pure data work except `load_effective`, which reads storage and never raises: a
database problem costs the user their preferences for one request, never the answer.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from bot.config import Settings
from bot.storage.base import PreferenceLayers, Store, ThreadKey

log = logging.getLogger(__name__)

FIELDS = (
    "model",
    "temperature",
    "reasoning_effort",
    "instructions",
    "stream",
    "image_size",
    "image_quality",
    "history_messages",
    "language",
)
REASONING_EFFORTS = ("minimal", "low", "medium", "high")
IMAGE_SIZES = ("auto", "1024x1024", "1536x1024", "1024x1536")
IMAGE_QUALITIES = ("auto", "low", "medium", "high")
MAX_INSTRUCTIONS = 3000
MAX_HISTORY_MESSAGES = 500
MAX_LANGUAGE = 40
LOAD_TIMEOUT = 3.0  # a stuck database must not hold up the answer

# OpenAI's reasoning models take `reasoning_effort` and reject a non-default temperature.
_REASONING = re.compile(r"^(o\d|gpt-5|gpt-oss)(?!.*-chat)", re.IGNORECASE)


def is_reasoning_model(model: str) -> bool:
    """o1/o3/o4…, gpt-5* (not the -chat variants), gpt-oss: reasoning effort, no temperature."""
    return bool(_REASONING.match(model.rsplit("/", 1)[-1]))


@dataclass(frozen=True)
class Preferences:
    model: str
    temperature: float | None = None  # None: the model's default
    reasoning_effort: str | None = None  # None: the model's default
    instructions: str = ""  # the user's standing instructions, added to the system prompt
    stream: bool = True  # False: one finished message instead of live updates
    image_size: str = "auto"
    image_quality: str = "auto"
    history_messages: int | None = None  # None: as much as fits the context budget
    language: str = "English"  # for "Translate message"

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def baseline(settings: Settings) -> Preferences:
    """The level below everything stored: what the environment configures."""
    size, quality = settings.media.image_size, settings.media.image_quality  # IMAGE_SIZE / IMAGE_QUALITY
    return Preferences(
        model=settings.openai.model,
        image_size=size if size in IMAGE_SIZES else "auto",
        image_quality=quality if quality in IMAGE_QUALITIES else "auto",
    )


def _valid(field: str, value: object) -> bool:
    """Whether a stored value is usable (old or hand-edited rows must not break requests)."""
    if field in ("temperature",):
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 2)
    if field == "reasoning_effort":
        return value is None or value in REASONING_EFFORTS
    if field == "history_messages":
        return value is None or (
            isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_HISTORY_MESSAGES
        )
    if field == "stream":
        return isinstance(value, bool)
    if field == "image_size":
        return value in IMAGE_SIZES
    if field == "image_quality":
        return value in IMAGE_QUALITIES
    if field == "model":
        return isinstance(value, str) and 0 < len(value) <= 200
    if field == "instructions":
        return isinstance(value, str) and len(value) <= MAX_INSTRUCTIONS
    if field == "language":
        return isinstance(value, str) and 0 < len(value) <= MAX_LANGUAGE
    return False


def merge(base: Preferences, *levels: Mapping[str, object]) -> Preferences:
    """`base` with each level's fields applied in order; unusable stored values are skipped."""
    # Any: Preferences(**values) below; every value is one of its own fields or passed `_valid`.
    values: dict[str, Any] = base.as_dict()
    for level in levels:
        for field, value in level.items():
            if field not in FIELDS:
                continue
            if _valid(field, value):
                values[field] = value
            else:
                log.warning("ignoring a stored preference %s=%r: not a valid value", field, value)
    return Preferences(**values)


def changes(base: Preferences, chosen: Preferences) -> dict[str, object]:
    """The fields where `chosen` differs from `base`: what a level stores."""
    below, mine = base.as_dict(), chosen.as_dict()
    return {field: mine[field] for field in FIELDS if mine[field] != below[field]}


def thread_key(thread: ThreadKey) -> str:
    """The storage key of a thread override."""
    return str(thread)


def below(layers: PreferenceLayers, settings: Settings, scope: str) -> Preferences:
    """What a level is compared against when it is saved: everything beneath it."""
    base = baseline(settings)
    if scope == "workspace":
        return base
    if scope == "user":
        return merge(base, layers.workspace)
    return merge(base, layers.workspace, layers.user)


async def load_layers(
    store: Store, user: str, thread: ThreadKey | None, *, timeout: float = LOAD_TIMEOUT
) -> PreferenceLayers:
    """The stored levels; empty ones (with a log line) when storage fails or is slow."""
    layers, failed = None, False
    try:
        with anyio.move_on_after(timeout):
            layers = await store.load_preferences(user, thread)
    except Exception as exc:
        failed = True
        log.warning("could not load preferences for %s (%s); using the defaults", user, exc)
    if layers is None:
        if not failed:
            log.warning("preferences for %s took over %gs to load; using the defaults", user, timeout)
        return PreferenceLayers({}, {}, {})
    return layers


async def load_effective(store: Store, settings: Settings, user: str, thread: ThreadKey | None) -> Preferences:
    """The preferences that apply to `user` in `thread` right now."""
    layers = await load_layers(store, user, thread)
    return merge(baseline(settings), layers.workspace, layers.user, layers.thread)
