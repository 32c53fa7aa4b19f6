"""Block Kit, checked twice: by slack_sdk's models and by Slack's documented limits.

`check_view(view)` and `check_message(blocks)` raise AssertionError (naming the path of
the offending part, e.g. `blocks[3].element.options[0].text`) for anything Slack would
refuse with `invalid_blocks` / `invalid_arguments`:

1. slack_sdk: the JSON is parsed into `slack_sdk.models` objects (`View(**view)`,
   `Block.parse`), every object's `validate_json()` runs (it raises
   `SlackObjectFormationError`), and the objects must serialise back to exactly the JSON
   that was checked — so a field slack_sdk does not know (a typo, a wrong nesting) fails
   too, instead of being dropped with a warning.
2. LIMITS below, walked over the JSON itself: slack_sdk checks some of them, not all
   (not `initial_option` ∈ `options`, a number input's bounds, the markdown blocks'
   total, unique block_ids, or a modal with inputs but no submit button).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, NamedTuple

from slack_sdk.errors import SlackObjectFormationError
from slack_sdk.models.blocks import Block
from slack_sdk.models.views import View


class Limit(NamedTuple):
    value: int
    source: str  # where Slack documents it


_BLOCKS = "https://docs.slack.dev/reference/block-kit/blocks"
_MODAL = "https://docs.slack.dev/reference/views/modal-views"
_ELEMENTS = "https://docs.slack.dev/reference/block-kit/block-elements"
_OBJECTS = "https://docs.slack.dev/reference/block-kit/composition-objects"

# Slack's documented limits, in characters unless the name says items. Each was read on
# the page cited (docs.slack.dev, 2026), except where the comment says otherwise.
LIMITS: dict[str, Limit] = {
    # surfaces
    "message.blocks": Limit(50, _BLOCKS),  # "up to 50 blocks in each message"
    "view.blocks": Limit(100, _BLOCKS),  # "and 100 blocks in modals or Home tabs"; also the modal page
    "modal.title": Limit(24, _MODAL),
    "modal.submit": Limit(24, _MODAL),
    "modal.close": Limit(24, _MODAL),
    "view.private_metadata": Limit(3000, _MODAL),
    "view.callback_id": Limit(255, _MODAL),
    # blocks
    "block_id": Limit(255, _BLOCKS + "/section-block"),  # the same on every block's page
    "section.text": Limit(3000, _BLOCKS + "/section-block"),
    "section.fields": Limit(10, _BLOCKS + "/section-block"),  # items
    "section.field_text": Limit(2000, _BLOCKS + "/section-block"),
    "header.text": Limit(150, _BLOCKS + "/header-block"),
    "context.elements": Limit(10, _BLOCKS + "/context-block"),  # items
    "context_actions.elements": Limit(5, _BLOCKS + "/context-actions-block"),  # items
    "actions.elements": Limit(25, _BLOCKS + "/actions-block"),  # items
    "input.label": Limit(2000, _BLOCKS + "/input-block"),
    "input.hint": Limit(2000, _BLOCKS + "/input-block"),
    # "The cumulative limit for all markdown blocks in a single payload is 12,000 characters."
    "markdown.total": Limit(12000, _BLOCKS + "/markdown-block"),
    # text objects: "Maximum length for this field is 3000 characters" (text object page)
    "text": Limit(3000, _OBJECTS + "/text-object"),
    # elements
    "action_id": Limit(255, _ELEMENTS + "/button-element"),  # the same on every element's page
    "button.text": Limit(75, _ELEMENTS + "/button-element"),
    "button.value": Limit(2000, _ELEMENTS + "/button-element"),
    "button.url": Limit(3000, _ELEMENTS + "/button-element"),
    "button.accessibility_label": Limit(75, _ELEMENTS + "/button-element"),
    "feedback_button.text": Limit(75, _ELEMENTS + "/feedback-buttons-element"),
    "feedback_button.value": Limit(2000, _ELEMENTS + "/feedback-buttons-element"),
    "feedback_button.accessibility_label": Limit(75, _ELEMENTS + "/feedback-buttons-element"),
    "placeholder": Limit(150, _ELEMENTS + "/number-input-element"),  # also plain-text input, selects
    "plain_text_input.max_length": Limit(3000, _ELEMENTS + "/plain-text-input-element"),  # 1…3000
    # "Maximum number of options is 100" (select menu element); the option group object
    # page says the same ("a maximum of 100 options"), and slack_sdk checks 100.
    "static_select.options": Limit(100, _ELEMENTS + "/select-menu-element"),  # items
    # radio buttons and checkboxes: "A maximum of 10 options are allowed" (the element
    # pages; quoted from slack_sdk's docstrings and the older api.slack.com reference)
    "radio_buttons.options": Limit(10, _ELEMENTS + "/radio-button-group-element"),  # items
    "checkboxes.options": Limit(10, _ELEMENTS + "/checkboxes-element"),  # items
    "option.text": Limit(75, _OBJECTS + "/option-object"),
    "option.description": Limit(75, _OBJECTS + "/option-object"),
    # 150 on the option object page and in slack_sdk (`Option.value_max_length`); the
    # older @slack/types docs still say 75. The bot's own values are short, except model ids.
    "option.value": Limit(150, _OBJECTS + "/option-object"),
}

_SURFACE_BLOCKS = {
    "message": {"section", "header", "divider", "context", "context_actions", "actions", "markdown", "rich_text"},
    "modal": {"section", "header", "divider", "context", "actions", "input", "rich_text"},
    "home": {"section", "header", "divider", "context", "actions", "input", "rich_text"},
}


def limit(name: str) -> int:
    return LIMITS[name].value


def check_view(view: dict[str, Any]) -> None:
    """A modal or Home tab as sent to views.open / views.update / views.publish."""
    assert isinstance(view, dict), "a view is an object"
    kind = view.get("type")
    assert kind in ("modal", "home"), f"view type {kind!r}"
    _sdk_view(view)
    blocks = view.get("blocks")
    assert isinstance(blocks, list) and blocks, "a view needs at least one block"
    _at_most(len(blocks), "view.blocks", "blocks")
    if kind == "modal":
        title = _plain(view.get("title"), "title")
        assert title, "a modal needs a title"
        _at_most(len(title), "modal.title", "title")
        for key in ("submit", "close"):
            if key in view:
                _at_most(len(_plain(view[key], key)), f"modal.{key}", key)
        if any(b.get("type") == "input" for b in blocks):
            assert "submit" in view, "a modal with input blocks needs a submit button"
    else:
        assert not {"title", "submit", "close"} & set(view), "a Home tab has no title, submit or close"
    _at_most(len(view.get("private_metadata") or ""), "view.private_metadata", "private_metadata")
    _at_most(len(view.get("callback_id") or ""), "view.callback_id", "callback_id")
    _check_blocks(blocks, kind)


def check_message(blocks: list[dict[str, Any]]) -> None:
    """A message's `blocks`, as sent to chat.postMessage / chat.update / chat.stopStream."""
    assert isinstance(blocks, list) and blocks, "message blocks are a non-empty array"
    _sdk_blocks(blocks)
    _at_most(len(blocks), "message.blocks", "blocks")
    total = sum(len(b.get("text") or "") for b in blocks if b.get("type") == "markdown")
    _at_most(total, "markdown.total", "blocks (markdown, together)")
    _check_blocks(blocks, "message")


def check_calls(calls: Iterable[tuple[str, dict[str, Any]]]) -> int:
    """Check every view and message blocks in recorded Web API calls (FakeSlack.calls);
    returns how many were checked."""
    checked = 0
    for method, args in calls:
        if method.startswith("views.") and "view" in args:
            _with_method(method, check_view, args["view"])
            checked += 1
        if args.get("blocks"):
            _with_method(method, check_message, args["blocks"])
            checked += 1
    return checked


def _with_method(method: str, check: Any, value: Any) -> None:
    try:
        check(value)
    except AssertionError as exc:
        raise AssertionError(f"{method}: {exc}") from None


# ---- slack_sdk ------------------------------------------------------------------------


def _sdk_view(view: dict[str, Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unknown key is a warning in slack_sdk: fail on it
        try:
            model = View(**view)
            model.validate_json()
            again = model.to_dict()  # validates every nested object on the way
        except (SlackObjectFormationError, UserWarning, TypeError) as exc:
            raise AssertionError(f"slack_sdk rejects the view: {exc}") from None
    assert again == view, f"slack_sdk reads the view differently:\n{again}\n!=\n{view}"


def _sdk_blocks(blocks: list[dict[str, Any]]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i, block in enumerate(blocks):
            try:
                model = Block.parse(block)
                known = model is not None and type(model) is not Block
                assert known, f"blocks[{i}]: slack_sdk has no {block.get('type')} block"
                model.validate_json()
                again = model.to_dict()
            except (SlackObjectFormationError, UserWarning, TypeError) as exc:
                raise AssertionError(f"blocks[{i}]: slack_sdk rejects it: {exc}") from None
            assert again == block, f"blocks[{i}]: slack_sdk reads it differently:\n{again}\n!=\n{block}"


# ---- the documented limits ------------------------------------------------------------


def _at_most(value: int, name: str, where: str) -> None:
    cap = LIMITS[name]
    assert value <= cap.value, f"{where}: {value} > {cap.value} ({name}, {cap.source})"


def _plain(obj: Any, where: str) -> str:
    assert isinstance(obj, dict) and obj.get("type") == "plain_text", f"{where}: must be a plain_text object"
    return _text(obj, where)


def _text(obj: Any, where: str) -> str:
    assert isinstance(obj, dict) and obj.get("type") in ("plain_text", "mrkdwn"), f"{where}: not a text object"
    text = obj.get("text")
    assert isinstance(text, str) and text, f"{where}: text objects need 1 character at least"
    _at_most(len(text), "text", where)
    return text


def _check_blocks(blocks: list[dict[str, Any]], surface: str) -> None:
    ids = [b["block_id"] for b in blocks if b.get("block_id")]
    assert len(ids) == len(set(ids)), f"block_ids repeat: {ids}"
    for i, block in enumerate(blocks):
        where = f"blocks[{i}]"
        kind = block.get("type")
        assert kind in _SURFACE_BLOCKS[surface], f"{where}: no {kind!r} blocks in a {surface}"
        if "block_id" in block:
            _at_most(len(block["block_id"]), "block_id", f"{where}.block_id")
        if kind == "section":
            assert "text" in block or "fields" in block, f"{where}: a section needs text or fields"
            if "text" in block:
                _at_most(len(_text(block["text"], f"{where}.text")), "section.text", f"{where}.text")
            fields = block.get("fields") or []
            _at_most(len(fields), "section.fields", f"{where}.fields")
            for j, item in enumerate(fields):
                _at_most(len(_text(item, f"{where}.fields[{j}]")), "section.field_text", f"{where}.fields[{j}]")
            if "accessory" in block:
                _check_element(block["accessory"], f"{where}.accessory")
        elif kind == "header":
            _at_most(len(_plain(block.get("text"), f"{where}.text")), "header.text", f"{where}.text")
        elif kind == "context":
            elements = block.get("elements") or []
            assert elements, f"{where}: a context needs elements"
            _at_most(len(elements), "context.elements", f"{where}.elements")
            for j, element in enumerate(elements):
                if element.get("type") != "image":
                    _text(element, f"{where}.elements[{j}]")
        elif kind in ("actions", "context_actions"):
            elements = block.get("elements") or []
            assert elements, f"{where}: {kind} needs elements"
            _at_most(len(elements), f"{kind}.elements", f"{where}.elements")
            for j, element in enumerate(elements):
                _check_element(element, f"{where}.elements[{j}]")
            _unique_action_ids(elements, where)
        elif kind == "input":
            _at_most(len(_plain(block.get("label"), f"{where}.label")), "input.label", f"{where}.label")
            if "hint" in block:
                _at_most(len(_plain(block["hint"], f"{where}.hint")), "input.hint", f"{where}.hint")
            assert isinstance(block.get("element"), dict), f"{where}: an input needs an element"
            _check_element(block["element"], f"{where}.element")
        elif kind == "markdown":
            assert isinstance(block.get("text"), str) and block["text"], f"{where}: markdown needs text"


def _unique_action_ids(elements: list[dict[str, Any]], where: str) -> None:
    ids = [e["action_id"] for e in elements if e.get("action_id")]
    assert len(ids) == len(set(ids)), f"{where}: action_ids repeat: {ids}"


def _check_element(element: Any, where: str) -> None:
    assert isinstance(element, dict), f"{where}: an element is an object"
    kind = element.get("type")
    if "action_id" in element:
        _at_most(len(element["action_id"]), "action_id", f"{where}.action_id")
    if "placeholder" in element:
        _at_most(len(_plain(element["placeholder"], f"{where}.placeholder")), "placeholder", f"{where}.placeholder")
    if kind == "button":
        _at_most(len(_plain(element.get("text"), f"{where}.text")), "button.text", f"{where}.text")
        for key in ("value", "url", "accessibility_label"):
            if key in element:
                _at_most(len(element[key]), f"button.{key}", f"{where}.{key}")
        assert element.get("style") in (None, "primary", "danger"), f"{where}.style"
    elif kind == "feedback_buttons":
        for side in ("positive_button", "negative_button"):
            button = element.get(side)
            assert isinstance(button, dict), f"{where}.{side} is required"
            _at_most(len(_plain(button.get("text"), f"{where}.{side}.text")), "feedback_button.text", where)
            value = button.get("value")
            assert isinstance(value, str) and value, f"{where}.{side}.value is required"
            _at_most(len(value), "feedback_button.value", f"{where}.{side}.value")
            if "accessibility_label" in button:
                _at_most(len(button["accessibility_label"]), "feedback_button.accessibility_label", where)
    elif kind in ("static_select", "radio_buttons", "checkboxes"):
        options = element.get("options")
        assert isinstance(options, list) and options, f"{where}: options are required"
        _at_most(len(options), f"{kind}.options", f"{where}.options")
        for j, option in enumerate(options):
            _check_option(option, f"{where}.options[{j}]", plain_only=kind == "static_select")
        values = [o.get("value") for o in options]
        assert len(values) == len(set(values)), f"{where}: option values repeat"
        initial = [element["initial_option"]] if "initial_option" in element else element.get("initial_options", [])
        for option in initial:
            # Slack: "must exactly match one of the options"
            assert option in options, f"{where}: initial option {option} is not one of the options"
    elif kind == "plain_text_input":
        cap = limit("plain_text_input.max_length")
        max_length = element.get("max_length", cap)
        assert 1 <= max_length <= cap, f"{where}.max_length: {max_length} outside 1…{cap}"
        assert 0 <= element.get("min_length", 0) <= min(max_length, cap), f"{where}.min_length"
        initial = element.get("initial_value")
        if initial is not None:
            assert len(initial) <= max_length, f"{where}.initial_value is longer than max_length"
    elif kind == "number_input":
        decimal = element.get("is_decimal_allowed")
        assert isinstance(decimal, bool), f"{where}.is_decimal_allowed is required"
        bounds = {}
        for key in ("min_value", "max_value", "initial_value"):
            if key in element:
                raw = element[key]
                assert isinstance(raw, str), f"{where}.{key} is a string"
                bounds[key] = float(raw)
                if not decimal:
                    assert raw.lstrip("-").isdigit(), f"{where}.{key}: {raw!r} is not a whole number"
        low, high = bounds.get("min_value", float("-inf")), bounds.get("max_value", float("inf"))
        assert low <= high, f"{where}: min_value > max_value"
        if "initial_value" in bounds:
            assert low <= bounds["initial_value"] <= high, f"{where}.initial_value is outside min…max"
    else:
        raise AssertionError(f"{where}: element {kind!r} is not known to this checker; add its limits")


def _check_option(option: Any, where: str, *, plain_only: bool) -> None:
    assert isinstance(option, dict), f"{where}: an option is an object"
    text = _plain(option.get("text"), f"{where}.text") if plain_only else _text(option.get("text"), f"{where}.text")
    _at_most(len(text), "option.text", f"{where}.text")
    value = option.get("value")
    assert isinstance(value, str) and value, f"{where}.value is required"
    _at_most(len(value), "option.value", f"{where}.value")
    if "description" in option:
        _at_most(len(_text(option["description"], f"{where}.description")), "option.description", where)
