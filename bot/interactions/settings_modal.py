"""The settings modal as data: building it (slack_sdk Block Kit models) and reading a
submission back. Pure functions, no I/O.

`parse_submission` is pure and fast on purpose: the Socket Mode reader calls it (through
`SlackUX.ack_payload`) while acking a `view_submission`, so validation errors go back in
the ack itself (`response_action: errors`) and Slack shows them beside the fields, with
the modal still open. The handler that saves runs the same function again afterwards.

Which level a submission is saved at is the "Save for" choice: the user's own settings,
this thread only (when the modal was opened from a thread), or the workspace defaults
(only for ADMIN_USERS — checked here too, not only by hiding the option).

Nothing a user can type is rejected after submitting: numbers are `number_input`s with
the same bounds as the checks here (Slack refuses anything else in the modal itself), and
the language is a menu. The checks stay, for crafted payloads and for modals opened
before an upgrade, whose free-text fields (`plain_text_input`) are still read.

The workspace defaults (an admin, with "Save for" on the workspace) also hold the monthly
token budgets (`bot.usage`): per user and for the whole workspace, whole numbers, empty
or 0 for the environment's default. They are read only for that level.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from slack_sdk.models.blocks import (
    Block,
    CheckboxesElement,
    ContextBlock,
    InputBlock,
    MarkdownTextObject,
    NumberInputElement,
    Option,
    PlainTextInputElement,
    RadioButtonsElement,
    StaticSelectElement,
)
from slack_sdk.models.views import View

from bot.config import MAX_MONTHLY_TOKENS
from bot.interactions.languages import NAMES, canonical, language_choices
from bot.interactions.limits import MAX_OPTIONS, OPTION_TEXT, OPTION_VALUE, clip
from bot.preferences import (
    IMAGE_QUALITIES,
    IMAGE_SIZES,
    MAX_HISTORY_MESSAGES,
    MAX_INSTRUCTIONS,
    MAX_LANGUAGE,
    REASONING_EFFORTS,
    Preferences,
    is_reasoning_model,
)
from bot.storage.base import ThreadKey
from bot.usage import USER_BUDGET_KEY, WORKSPACE_BUDGET_KEY, Budgets

CALLBACK_ID = "settings_modal"
THREAD_SETTINGS = "thread_settings"  # the message shortcut that opens the modal for one thread
MODEL_ACTION = "model"  # a change of model rebuilds the modal (temperature ↔ reasoning effort)
TEMPERATURE_MIN, TEMPERATURE_MAX = 0, 2  # as bot.preferences accepts them
DEFAULT_EFFORT = "default"
SCOPE_LABELS = {
    "user": "Me, in every conversation",
    "thread": "This thread only",
    "workspace": "Everyone (workspace defaults)",
}


@dataclass(frozen=True)
class ModalContext:
    """What the modal needs to remember between opening and submitting (private_metadata)."""

    thread: ThreadKey | None = None
    origin: str = "command"  # "command" | "home" | "shortcut"

    def encode(self) -> str:
        return json.dumps({"thread": str(self.thread) if self.thread else "", "origin": self.origin})

    @staticmethod
    def decode(text: object) -> ModalContext:
        try:
            data = json.loads(text) if isinstance(text, str) and text else {}
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        thread = None
        raw = data.get("thread")
        if isinstance(raw, str) and "/" in raw:
            channel, thread_ts = raw.split("/", 1)
            if channel and thread_ts:
                thread = ThreadKey(channel, thread_ts)
        origin = data.get("origin")
        if not isinstance(origin, str) or origin not in ("command", "home", "shortcut"):
            origin = "command"
        return ModalContext(thread, origin)


@dataclass(frozen=True)
class Submission:
    scope: str
    thread: ThreadKey | None
    reset: bool
    form: dict[str, object] = field(default_factory=dict)  # field -> value, for the fields the modal showed
    errors: dict[str, str] = field(default_factory=dict)  # block_id -> message; empty when valid


@dataclass(frozen=True)
class BudgetInputs:
    """What the budget fields show: the workspace defaults' own budgets (their initial
    values) and the environment's (what empty means)."""

    stored: Budgets
    defaults: Budgets


BUDGET_LABELS = {
    USER_BUDGET_KEY: ("Monthly token budget per user", "each user's tokens in + out"),
    WORKSPACE_BUDGET_KEY: ("Monthly token budget for the workspace", "everyone's tokens in + out together"),
}
BUDGET_ERROR = f"Enter a whole number of tokens up to {MAX_MONTHLY_TOKENS:,}, or leave it empty (or 0) for the default."


def _budget_blocks(budgets: BudgetInputs) -> list[Block]:
    blocks: list[Block] = []
    for key, stored, default in (
        (USER_BUDGET_KEY, budgets.stored.user, budgets.defaults.user),
        (WORKSPACE_BUDGET_KEY, budgets.stored.workspace, budgets.defaults.workspace),
    ):
        label, counts = BUDGET_LABELS[key]
        fallback = "unlimited" if default is None else f"{default:,} tokens"
        blocks.append(
            InputBlock(
                block_id=key,
                label=label,
                optional=True,
                hint=f"Per calendar month (UTC), {counts}; a request over it gets one line and no answer. "
                f"Empty or 0: the default ({fallback}). Saved with the workspace defaults only.",
                element=NumberInputElement(
                    action_id=key,
                    is_decimal_allowed=False,
                    min_value="0",
                    max_value=str(MAX_MONTHLY_TOKENS),
                    placeholder=f"Default: {fallback}",
                    initial_value=None if stored is None else str(stored),
                ),
            )
        )
    return blocks


def _option(value: str, text: str) -> Option:
    return Option(value=value, text=clip(text, OPTION_TEXT))


def _select(action_id: str, choices: list[tuple[str, str]], current: str) -> StaticSelectElement:
    options = [_option(value, text) for value, text in choices]
    initial = next((o for o in options if o.value == current), options[0])
    return StaticSelectElement(action_id=action_id, options=options, initial_option=initial)


def model_choices(models: list[str], current: str, configured: str) -> list[str]:
    """The model menu: the current and configured models always, then the endpoint's
    (at most Slack's 100 options; an id longer than an option's value can be is left out)."""
    ordered = [current] + ([configured] if configured != current else [])
    ordered += [m for m in models if m not in ordered]
    return [m for m in ordered if m and len(m) <= OPTION_VALUE][:MAX_OPTIONS]


def settings_view(
    shown: Preferences,
    models: list[str],
    *,
    configured_model: str,
    scope: str,
    context: ModalContext,
    is_admin: bool,
    budgets: BudgetInputs | None = None,
) -> dict[str, Any]:
    """The modal, showing `shown`. `models` come from the endpoint (may be empty).
    `budgets`: the budget fields, shown to an admin opening the workspace defaults."""
    scopes = ["user"] + (["thread"] if context.thread else []) + (["workspace"] if is_admin else [])
    if scope not in scopes:
        scope = scopes[0]
    blocks: list[Block] = [
        InputBlock(
            block_id="scope",
            label="Save these settings for",
            element=RadioButtonsElement(
                action_id="scope",
                options=[_option(s, SCOPE_LABELS[s]) for s in scopes],
                initial_option=_option(scope, SCOPE_LABELS[scope]),
            ),
        ),
        InputBlock(
            block_id="model",
            label="Model",
            dispatch_action=True,
            element=_select(
                MODEL_ACTION, [(m, m) for m in model_choices(models, shown.model, configured_model)], shown.model
            ),
        ),
    ]
    if is_reasoning_model(shown.model):
        efforts = [(DEFAULT_EFFORT, "Model default")] + [(e, e.capitalize()) for e in REASONING_EFFORTS]
        blocks.append(
            InputBlock(
                block_id="reasoning_effort",
                label="Reasoning effort",
                hint="More effort: slower, more careful answers.",
                element=_select("reasoning_effort", efforts, shown.reasoning_effort or DEFAULT_EFFORT),
            )
        )
    else:
        blocks.append(
            InputBlock(
                block_id="temperature",
                label="Temperature",
                optional=True,
                hint=f"{TEMPERATURE_MIN} = focused and repeatable, {TEMPERATURE_MAX} = most varied. "
                "Empty: the model's default.",
                element=NumberInputElement(
                    action_id="temperature",
                    is_decimal_allowed=True,
                    min_value=str(TEMPERATURE_MIN),
                    max_value=str(TEMPERATURE_MAX),
                    placeholder="Model default",
                    initial_value=_number_text(shown.temperature),
                ),
            )
        )
    blocks += [
        InputBlock(
            block_id="instructions",
            label="Custom instructions",
            optional=True,
            hint='Standing instructions added to every conversation, e.g. "Answer in British English."',
            element=PlainTextInputElement(
                action_id="instructions",
                multiline=True,
                max_length=MAX_INSTRUCTIONS,
                initial_value=shown.instructions or None,
            ),
        ),
        InputBlock(
            block_id="stream",
            label="Show answers",
            element=RadioButtonsElement(
                action_id="stream",
                options=[_option("on", "As they are written (streaming)"), _option("off", "When finished")],
                initial_option=_option("on", "As they are written (streaming)")
                if shown.stream
                else _option("off", "When finished"),
            ),
        ),
        InputBlock(
            block_id="history_messages",
            label="Earlier messages to include",
            optional=True,
            hint=f"How many earlier messages of the thread the model sees (0–{MAX_HISTORY_MESSAGES}). "
            "Empty: as many as fit.",
            element=NumberInputElement(
                action_id="history_messages",
                is_decimal_allowed=False,
                min_value="0",
                max_value=str(MAX_HISTORY_MESSAGES),
                placeholder="As many as fit",
                initial_value=None if shown.history_messages is None else str(shown.history_messages),
            ),
        ),
        InputBlock(
            block_id="image_size",
            label="Image size",
            element=_select(
                "image_size",
                [(s, "Automatic" if s == "auto" else s.replace("x", " × ")) for s in IMAGE_SIZES],
                shown.image_size,
            ),
        ),
        InputBlock(
            block_id="image_quality",
            label="Image quality",
            element=_select(
                "image_quality",
                [(q, "Automatic" if q == "auto" else q.capitalize()) for q in IMAGE_QUALITIES],
                shown.image_quality,
            ),
        ),
        InputBlock(
            block_id="language",
            label="Your language",
            hint='"Translate message" translates into this language.',
            element=_select("language", language_choices(shown.language), canonical(shown.language)),
        ),
    ]
    if budgets is not None and is_admin and scope == "workspace":
        blocks += _budget_blocks(budgets)
    blocks += [
        InputBlock(
            block_id="reset",
            label="Start over",
            optional=True,
            element=CheckboxesElement(
                action_id="reset", options=[_option("reset", "Forget the settings saved at this level")]
            ),
        ),
        ContextBlock(
            elements=[MarkdownTextObject(text="Thread settings win over yours, and yours over the workspace defaults.")]
        ),
    ]
    return View(
        type="modal",
        callback_id=CALLBACK_ID,
        title="Assistant settings",
        submit="Save",
        close="Cancel",
        private_metadata=context.encode(),
        blocks=blocks,
    ).to_dict()


def _number_text(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"


def _whole_number(text: str) -> bool:
    """ASCII digits only, and few of them ("²".isdigit() is true, int() of 5,000 digits raises)."""
    return text.isascii() and text.isdigit() and len(text) <= 9


def _value(values: dict[str, Any], block: str) -> dict[str, Any] | None:
    entry = values.get(block)
    if not isinstance(entry, dict):
        return None
    item = entry.get(block)
    if not isinstance(item, dict):  # tolerate another action_id in the block
        item = next((v for v in entry.values() if isinstance(v, dict)), None)
    return item


def _text(values: dict[str, Any], block: str) -> str | None:
    """The typed text (None when the field is absent from the modal, "" when left empty)."""
    item = _value(values, block)
    if item is None:
        return None
    text = item.get("value")
    return text.strip() if isinstance(text, str) else ""


def _offered(view: dict[str, Any], block_id: str) -> set[str]:
    """The option values the modal's menu `block_id` offered (as Slack sent the view back)."""
    for block in view.get("blocks") or ():
        if isinstance(block, dict) and block.get("block_id") == block_id:
            element = block.get("element")
            options = element.get("options") if isinstance(element, dict) else None
            return {o["value"] for o in options or () if isinstance(o, dict) and isinstance(o.get("value"), str)}
    return set()


def _selected(values: dict[str, Any], block: str) -> str | None:
    item = _value(values, block)
    if item is None:
        return None
    option = item.get("selected_option")
    return option.get("value") if isinstance(option, dict) and isinstance(option.get("value"), str) else None


def parse_submission(view: object, *, user: str, admins: frozenset[str]) -> Submission:
    """Read and validate a submitted settings modal. Never raises; errors are per block."""
    if not isinstance(view, dict):
        return Submission("user", None, False, errors={"model": "The form arrived damaged; please try again."})
    context = ModalContext.decode(view.get("private_metadata"))
    raw_state = view.get("state")
    state: dict[str, Any] = raw_state if isinstance(raw_state, dict) else {}
    raw_values = state.get("values")
    values: dict[str, Any] = raw_values if isinstance(raw_values, dict) else {}
    errors: dict[str, str] = {}
    form: dict[str, object] = {}

    scope = _selected(values, "scope") or "user"
    if scope not in SCOPE_LABELS:
        errors["scope"] = "Choose who these settings are for."
    elif scope == "workspace" and user not in admins:
        errors["scope"] = "Only workspace admins can change the defaults for everyone."
    elif scope == "thread" and context.thread is None:
        errors["scope"] = "Open the settings from a thread (message shortcut) to save them for that thread."

    model = _selected(values, "model")
    if model is not None:
        form["model"] = model
    elif "model" in values:
        errors["model"] = "Choose a model."

    temperature = _text(values, "temperature")
    if temperature is not None:
        if not temperature:
            form["temperature"] = None
        else:
            try:
                number = float(temperature.replace(",", "."))
            except ValueError:
                number = math.nan
            if not math.isfinite(number) or not TEMPERATURE_MIN <= number <= TEMPERATURE_MAX:
                errors["temperature"] = (
                    f"Enter a number from {TEMPERATURE_MIN} to {TEMPERATURE_MAX}, "
                    "or leave it empty for the model's default."
                )
            else:
                form["temperature"] = round(number, 2)

    effort = _selected(values, "reasoning_effort")
    if effort is not None:
        if effort == DEFAULT_EFFORT:
            form["reasoning_effort"] = None
        elif effort in REASONING_EFFORTS:
            form["reasoning_effort"] = effort
        else:
            errors["reasoning_effort"] = "Choose one of the listed efforts."

    instructions = _text(values, "instructions")
    if instructions is not None:
        if len(instructions) > MAX_INSTRUCTIONS:
            errors["instructions"] = f"Keep the instructions under {MAX_INSTRUCTIONS} characters."
        else:
            form["instructions"] = instructions

    stream = _selected(values, "stream")
    if stream in ("on", "off"):
        form["stream"] = stream == "on"

    history = _text(values, "history_messages")
    if history is not None:
        if not history:
            form["history_messages"] = None
        elif not _whole_number(history) or int(history) > MAX_HISTORY_MESSAGES:
            errors["history_messages"] = (
                f"Enter a whole number from 0 to {MAX_HISTORY_MESSAGES}, or leave it empty for as many as fit."
            )
        else:
            form["history_messages"] = int(history)

    for block, allowed in (("image_size", IMAGE_SIZES), ("image_quality", IMAGE_QUALITIES)):
        chosen = _selected(values, block)
        if chosen is None:
            continue
        if chosen in allowed:
            form[block] = chosen
        else:
            errors[block] = "Choose one of the listed options."

    item = _value(values, "language")
    if item is not None and "selected_option" in item:  # the menu
        language = _selected(values, "language") or ""
        offered = language in NAMES or language in _offered(view, "language")
        if not offered or len(language) > MAX_LANGUAGE:
            errors["language"] = "Choose one of the listed languages."
        else:
            form["language"] = language
    elif item is not None:  # the free-text field of a modal opened before the menu existed
        language = _text(values, "language") or ""
        if len(language) > MAX_LANGUAGE or "\n" in language:
            errors["language"] = f"Name one language, in at most {MAX_LANGUAGE} characters."
        elif language:
            form["language"] = language

    if scope == "workspace" and not errors.get("scope"):  # budgets belong to the workspace defaults only
        for key in (USER_BUDGET_KEY, WORKSPACE_BUDGET_KEY):
            budget = _text(values, key)
            if budget is None:
                continue
            digits = budget.replace(",", "").replace("_", "")
            if not digits:
                form[key] = None
            elif not (digits.isascii() and digits.isdigit()) or len(digits) > 13 or int(digits) > MAX_MONTHLY_TOKENS:
                errors[key] = BUDGET_ERROR
            else:
                form[key] = int(digits) or None  # 0: the default, as empty

    item = _value(values, "reset")
    reset = bool(
        item and any(isinstance(o, dict) and o.get("value") == "reset" for o in item.get("selected_options") or ())
    )
    return Submission(scope, context.thread, reset, form, errors)


def errors_ack(errors: dict[str, str]) -> dict[str, Any]:
    """The ack payload that keeps the modal open and shows `errors` beside the fields."""
    return {"response_action": "errors", "errors": errors}
