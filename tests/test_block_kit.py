"""Every message and view the bot builds, checked against slack_sdk's models and Slack's
documented limits (`tests/block_kit.py`), with realistic and worst-case inputs: the
settings modal, the App Home tab, notices, the shortcuts' result modal, the answer's
feedback blocks, the welcome and the suggested prompts — each builder directly, and then
every `view` and `blocks` the running bot sent to the fake Slack in a tour of its surfaces.
"""

from __future__ import annotations

import random

import pytest
from slack_sdk.models.blocks import ContextActionsBlock, FeedbackButtonsElement, MarkdownBlock

from bot.interactions.app_home import home_view
from bot.interactions.dispatch import notice_view
from bot.interactions.settings_modal import ModalContext, errors_ack, settings_view
from bot.interactions.shortcuts import MAX_SECTIONS, NOTHING_TO_SHOW, SUMMARIZE, TITLES, TRANSLATE, result_view
from bot.interactions.welcome import SUGGESTED_PROMPTS, welcome_text
from bot.preferences import IMAGE_QUALITIES, IMAGE_SIZES, MAX_HISTORY_MESSAGES, MAX_INSTRUCTIONS, Preferences
from bot.slack.feedback_blocks import answer_blocks, feedback_block
from bot.storage.base import ThreadKey
from tests.block_kit import LIMITS, check_calls, check_message, check_view, limit
from tests.fakes.openai import Behaviour, FakeOpenAI
from tests.harness import running_bot, send_dm, wait_reply

LONG_MODEL = "org-with-a-long-name/" + "m" * 129  # 150 characters: the longest an option value may be
assert len(LONG_MODEL) == 150


def modal(prefs: Preferences, models: list[str], **kwargs) -> dict:
    options = {"configured_model": "gpt-4o-mini", "scope": "user", "context": ModalContext(), "is_admin": False}
    return settings_view(prefs, models, **{**options, **kwargs})


def options_of(view: dict, block_id: str) -> list[dict]:
    return next(b for b in view["blocks"] if b.get("block_id") == block_id)["element"]["options"]


# ---- the checker itself: it must refuse what Slack refuses ----------------------------------


def _section(text: str = "hi", **extra) -> dict:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}, **extra}


def _modal(*blocks: dict, **extra) -> dict:
    return {"type": "modal", "title": {"type": "plain_text", "text": "Title"}, "blocks": list(blocks), **extra}


def _input(element: dict, block_id: str = "b", label: str = "Label") -> dict:
    return {"type": "input", "block_id": block_id, "label": {"type": "plain_text", "text": label}, "element": element}


def _button(text: str = "Go", **extra) -> dict:
    return {"type": "button", "text": {"type": "plain_text", "text": text}, "action_id": "a", **extra}


def _option(value: str, text: str | None = None) -> dict:
    return {"text": {"type": "plain_text", "text": text or value}, "value": value}


def _select(options: list[dict], **extra) -> dict:
    return {"type": "static_select", "action_id": "s", "options": options, **extra}


def _number(**extra) -> dict:
    return {"type": "number_input", "action_id": "n", "is_decimal_allowed": False, **extra}


SUBMIT = {"submit": {"type": "plain_text", "text": "Save"}}

BAD_VIEWS = {
    "101 blocks": _modal(*[_section() for _ in range(101)]),
    "a 25-character title": {**_modal(_section()), "title": {"type": "plain_text", "text": "t" * 25}},
    "a 25-character close": _modal(_section(), close={"type": "plain_text", "text": "c" * 25}),
    "inputs but no submit": _modal(_input(_number())),
    "private_metadata of 3,001": _modal(_section(), private_metadata="x" * 3001),
    "callback_id of 256": _modal(_section(), callback_id="c" * 256),
    "section text of 3,001": _modal(_section("x" * 3001)),
    "header of 151": _modal({"type": "header", "text": {"type": "plain_text", "text": "h" * 151}}),
    "block_id of 256": _modal(_section(block_id="b" * 256)),
    "a repeated block_id": _modal(_section(block_id="x"), _section(block_id="x")),
    "11 context elements": _modal({"type": "context", "elements": [{"type": "mrkdwn", "text": "c"}] * 11}),
    "26 actions": _modal({"type": "actions", "elements": [_button(action_id=f"a{i}") for i in range(26)]}),
    "button text of 76": _modal({"type": "actions", "elements": [_button("b" * 76)]}),
    "button value of 2,001": _modal({"type": "actions", "elements": [_button(value="v" * 2001)]}),
    "action_id of 256": _modal({"type": "actions", "elements": [_button(action_id="a" * 256)]}),
    "input label of 2,001": _modal(_input(_number(), label="l" * 2001), **SUBMIT),
    "101 options": _modal(_input(_select([_option(f"o{i}") for i in range(101)])), **SUBMIT),
    "option text of 76": _modal(_input(_select([_option("v", "t" * 76)])), **SUBMIT),
    "option value of 151": _modal(_input(_select([_option("v" * 151, "t")])), **SUBMIT),
    "initial option not offered": _modal(_input(_select([_option("a")], initial_option=_option("b"))), **SUBMIT),
    "number outside its bounds": _modal(_input(_number(min_value="0", max_value="2", initial_value="3")), **SUBMIT),
    "a decimal in a whole-number input": _modal(_input(_number(initial_value="1.5")), **SUBMIT),
    "min above max": _modal(_input(_number(min_value="3", max_value="2")), **SUBMIT),
    "max_length of 3,001": _modal(_input({"type": "plain_text_input", "action_id": "t", "max_length": 3001}), **SUBMIT),
    "a misspelt field": _modal({"type": "section", "txt": {"type": "mrkdwn", "text": "typo"}}),
    "an element the checker does not know": _modal({"type": "actions", "elements": [{"type": "mystery_box"}]}),
    "a markdown block in a view": _modal({"type": "markdown", "text": "only for messages"}),
    "a title on a Home tab": {"type": "home", "title": {"type": "plain_text", "text": "t"}, "blocks": [_section()]},
}


@pytest.mark.parametrize("name", sorted(BAD_VIEWS))
def test_the_checker_refuses_views_slack_refuses(name):
    with pytest.raises(AssertionError):
        check_view(BAD_VIEWS[name])


def test_the_checker_refuses_messages_slack_refuses():
    with pytest.raises(AssertionError, match=r"message\.blocks"):
        check_message([_section() for _ in range(51)])
    with pytest.raises(AssertionError, match=r"markdown\.total"):
        check_message([{"type": "markdown", "text": "x" * 6000}, {"type": "markdown", "text": "x" * 6001}])
    with pytest.raises(AssertionError):
        check_message([{"type": "input", "label": {"type": "plain_text", "text": "no"}, "element": _number()}])
    with pytest.raises(AssertionError):
        check_message([])


def test_the_checker_accepts_a_valid_view_and_message():
    check_view(
        _modal(
            _section(block_id="s", accessory=_button("Open")),
            _input(_number(min_value="0", max_value="10", initial_value="3"), block_id="n"),
            _input(_select([_option("a"), _option("b")], initial_option=_option("b")), block_id="m"),
            **SUBMIT,
        )
    )
    check_message([{"type": "markdown", "text": "x" * 12_000}, feedback_block()])


def test_the_limits_table_cites_slacks_reference():
    assert all(item.source.startswith("https://docs.slack.dev/reference/") for item in LIMITS.values())
    assert (limit("message.blocks"), limit("view.blocks"), limit("section.text"), limit("header.text")) == (
        50,
        100,
        3000,
        150,
    )
    assert (limit("button.text"), limit("button.value"), limit("action_id"), limit("actions.elements")) == (
        75,
        2000,
        255,
        25,
    )
    assert (limit("static_select.options"), limit("option.text"), limit("modal.title"), limit("modal.submit")) == (
        100,
        75,
        24,
        24,
    )
    assert (limit("view.private_metadata"), limit("view.callback_id"), limit("block_id")) == (3000, 255, 255)
    assert (limit("context.elements"), limit("input.label"), limit("plain_text_input.max_length")) == (10, 2000, 3000)


# ---- the settings modal -------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["user", "thread", "workspace"])
@pytest.mark.parametrize("model", ["gpt-4o-mini", "o3-mini", "gpt-5"])
def test_settings_modal_every_shape(scope, model):
    view = modal(
        Preferences(model=model, temperature=0.7, reasoning_effort="high", history_messages=12, language="German"),
        ["gpt-4o-mini", "gpt-4o", "o3-mini", "gpt-5"],
        scope=scope,
        context=ModalContext(ThreadKey("C0123456789", "1700000000.000100"), "shortcut"),
        is_admin=True,
    )
    check_view(view)
    scopes = [o["value"] for o in view["blocks"][0]["element"]["options"]]
    assert scopes == ["user", "thread", "workspace"]


def test_settings_modal_worst_case():
    """300 models from the endpoint, names up to 150 characters (and longer ones, which an
    option cannot carry), the largest values, 3,000 characters of instructions, a thread
    key as long as Slack's, a language typed into the old free-text field."""
    endpoint = [f"vendor/very-long-model-name-{i:03d}-" + "x" * 110 for i in range(300)] + ["z" * 151]
    prefs = Preferences(
        model=LONG_MODEL,
        temperature=2.0,
        instructions="Answer in full sentences. " * 115,  # 2,990 characters
        stream=False,
        image_size=IMAGE_SIZES[-1],
        image_quality=IMAGE_QUALITIES[-1],
        history_messages=MAX_HISTORY_MESSAGES,
        language="L" * 40,
    )
    assert len(prefs.instructions) <= MAX_INSTRUCTIONS
    view = modal(
        prefs,
        endpoint,
        configured_model="c" * 150,
        scope="thread",
        context=ModalContext(ThreadKey("C" + "0" * 20, "1700000000.000100"), "shortcut"),
        is_admin=True,
    )
    check_view(view)
    models = options_of(view, "model")
    assert len(models) == 100 and models[0]["value"] == LONG_MODEL  # Slack's cap, the current model first
    assert all(len(o["value"]) <= 150 for o in models) and "z" * 151 not in [o["value"] for o in models]
    assert models[0]["text"]["text"].endswith("…") and len(models[0]["text"]["text"]) == 75  # cut, and says so
    assert options_of(view, "language")[0]["value"] == "L" * 40  # the saved value stays selectable


def test_settings_modal_with_no_models_from_the_endpoint():
    view = modal(Preferences(model="gpt-4o-mini"), [])
    check_view(view)
    assert [o["value"] for o in options_of(view, "model")] == ["gpt-4o-mini"]


def test_validation_errors_name_blocks_of_the_modal():
    """`response_action: errors` keys must be block_ids of the modal's input blocks."""
    from bot.interactions.settings_modal import parse_submission
    from tests.interactions.test_settings import form

    view = modal(Preferences(model="gpt-4o-mini"), [], is_admin=False)
    view["state"] = {"values": form(temperature="hot", history="x", scope="workspace", language="Klingon")}
    errors = parse_submission(view, user="U1", admins=frozenset()).errors
    inputs = {b["block_id"] for b in view["blocks"] if b["type"] == "input"}
    assert set(errors) == {"temperature", "history_messages", "scope", "language"} and set(errors) <= inputs
    assert errors_ack(errors) == {"response_action": "errors", "errors": errors}


# ---- the App Home tab ---------------------------------------------------------------------


@pytest.mark.parametrize("is_admin", [False, True])
@pytest.mark.parametrize("allowed", [True, False])
def test_home_tab(is_admin, allowed):
    view = home_view(Preferences(model="gpt-4o-mini"), command="/settings", is_admin=is_admin, allowed=allowed)
    check_view(view)


def test_home_tab_worst_case():
    prefs = Preferences(
        model="m" * 200,  # the longest a stored model may be
        reasoning_effort="minimal",
        instructions="Be *very* careful with `code` and <links|here>. " * 60,
        history_messages=MAX_HISTORY_MESSAGES,
        language="L" * 40,
    )
    view = home_view(prefs, command="/" + "c" * 31, is_admin=True)
    check_view(view)
    assert max(len(b["text"]["text"]) for b in view["blocks"] if b["type"] == "section") < 3000


# ---- notices and the shortcuts' result modal --------------------------------------------------


def test_notice_view_cuts_what_does_not_fit():
    check_view(notice_view("Not available", "Sorry, not here."))
    view = notice_view("A title far longer than a modal allows", "word " * 1000)
    check_view(view)
    assert view["title"]["text"] == "A title far longer than…" and len(view["title"]["text"]) == 24
    assert view["blocks"][0]["text"]["text"].endswith("…") and len(view["blocks"][0]["text"]["text"]) == 3000


@pytest.mark.parametrize("kind", [SUMMARIZE, TRANSLATE])
def test_result_view_realistic(kind):
    text = "**Summary:** the team agreed on <@U02ABCDEF>'s plan.\n\n- ship Friday\n- `make test` first"
    view = result_view(kind, text, "Written by `gpt-4o-mini`. Only you can see this.")
    check_view(view)
    assert view["title"]["text"] == TITLES[kind]


def test_result_view_worst_cases():
    rng = random.Random(13)
    words = ["word", "**bold**", "_it_", "`code`", "<@U0123>", "&", "<", ">", "[link](https://example.com/x)", "😀"]
    texts = {
        "empty": "   ",
        "nothing left after conversion": "\u200b",
        "one 9,000-character word": "x" * 9000,
        "9,000 characters": " ".join(rng.choice(words) for _ in range(1500))[:9000],
        "200,000 characters": "\n\n".join(" ".join(rng.choice(words) for _ in range(80)) for _ in range(400)),
        "long code blocks": "```python\n" + ("print('x' * 5000)  # " + "y" * 4000 + "\n") * 30 + "```",
        "mentions and escapes": ("<@U0123ABC> & <#C0123|general> <!here> " * 400),
    }
    for name, text in texts.items():
        view = result_view(TRANSLATE, text, "Written by `" + "m" * 200 + "`. Only you can see this.")
        try:
            check_view(view)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
        assert len(view["blocks"]) <= MAX_SECTIONS + 1, name
    assert result_view(TRANSLATE, "   ")["blocks"][0]["text"]["text"] == NOTHING_TO_SHOW
    cut = result_view(TRANSLATE, texts["200,000 characters"])
    assert "cut short" in cut["blocks"][-1]["text"]["text"]


# ---- the answer's blocks, the welcome, the suggested prompts --------------------------------------


@pytest.mark.parametrize("size", [1, 2_000, 9_000, 12_000])
def test_answer_blocks_up_to_a_messages_markdown(size):
    text = ("An answer with **Markdown**, `code` and a [link](https://example.com). " * 200)[:size]
    blocks = answer_blocks(text)
    check_message(blocks)
    assert blocks[0]["text"] == text and blocks[1] == feedback_block()


def test_answer_blocks_cut_what_one_message_cannot_hold():
    blocks = answer_blocks("y" * 13_000)
    check_message(blocks)
    assert len(blocks[0]["text"]) == 12_000 and blocks[0]["text"].endswith("…")
    assert answer_blocks(" \n") == [feedback_block()]  # nothing to show: only the buttons
    check_message(answer_blocks(" \n"))


def test_feedback_block():
    block = feedback_block()
    check_message([block])
    # The plain dict is what slack_sdk's models build (the bot skips them for speed).
    assert (
        block
        == ContextActionsBlock(
            elements=[
                FeedbackButtonsElement(
                    action_id="answer_feedback",
                    positive_button={
                        "text": "Good answer",
                        "accessibility_label": "This answer was helpful",
                        "value": "good",
                    },
                    negative_button={
                        "text": "Bad answer",
                        "accessibility_label": "This answer was not helpful",
                        "value": "bad",
                    },
                )
            ],
        ).to_dict()
    )
    assert answer_blocks("*hi*", feedback=False) == [MarkdownBlock(text="*hi*").to_dict()]
    buttons = block["elements"][0]
    assert {buttons["positive_button"]["value"], buttons["negative_button"]["value"]} == {"good", "bad"}


def test_welcome_and_suggested_prompts_fit():
    text = welcome_text("U" + "0" * 20, "/" + "c" * 31)
    assert 0 < len(text) <= 12_000  # markdown_text
    assert 1 <= len(SUGGESTED_PROMPTS) <= 4  # "up to four suggested prompts"
    assert all(p["title"].strip() and p["message"].strip() for p in SUGGESTED_PROMPTS)


# ---- everything the running bot sends ------------------------------------------------------------


@pytest.mark.anyio
async def test_every_view_and_message_the_running_bot_sends(slack):
    """A tour: answers (short, split over several messages, failed), native streaming,
    the settings modal (opened, rebuilt, refused values), the Home tab, both shortcuts,
    notices. Every `view` and `blocks` argument sent to Slack passes both checks."""
    from tests.interactions.test_settings import form

    ai = FakeOpenAI(models=("gpt-4o-mini", "o3-mini", "vendor/" + "m" * 143))
    settings = {"openai_model": "gpt-4o-mini", "admin_users": frozenset({"U1"}), "native_streaming": True}
    async with running_bot(slack, ai, **settings):
        _, ev = await send_dm(slack, "hello")
        await wait_reply(slack, "D1", ev["ts"], "Echo: hello")
        ai.enqueue(Behaviour(text="A long answer. " * 2500))  # 37,500 characters: several messages
        _, ev = await send_dm(slack, "a long one please")
        await wait_reply(slack, "D1", ev["ts"], "A long answer.")
        ai.enqueue(Behaviour(status=401))
        _, ev = await send_dm(slack, "this one fails")
        await wait_reply(slack, "D1", ev["ts"], "API key")
        # settings: open, rebuild (model change), submit a bad then a good form, Home tab
        before = set(slack.views)
        await slack.send_slash_command("/settings")
        await slack.wait_until(lambda: set(slack.views) - before)
        view_id = (set(slack.views) - before).pop()
        choice = {"action_id": "model", "block_id": "model", "type": "static_select", "selected_option": {}}
        choice["selected_option"] = {"value": "o3-mini"}
        await slack.click(
            choice,
            view_id=view_id,
            values=form(model="o3-mini", temperature="0.5"),
        )
        await slack.wait_until(lambda: any(m == "views.update" for m, _ in slack.calls))
        bad = await slack.submit_view(view_id, form(model="gpt-4o-mini", temperature="hot"))
        await slack.wait_acked(bad)
        good = await slack.submit_view(view_id, form(model="gpt-4o-mini", temperature="0.4", language="French"))
        await slack.wait_acked(good)
        await slack.wait_until(lambda: "U1" in slack.home_views)
        await slack.send_app_event({"type": "app_home_opened", "user": "U1", "channel": "D1", "tab": "home"})
        # shortcuts and a notice
        root = slack.add_user_message("C1", "U2", "Shall we ship on Friday?")
        await slack.message_shortcut("summarize_thread", "C1", root)
        await slack.message_shortcut("translate_message", "C1", root)
        await slack.message_shortcut("no_such_shortcut", "C1", root)
        await slack.wait_until(lambda: sum(m in ("views.update", "views.open") for m, _ in slack.calls) >= 7)
        await slack.wait_until(lambda: any("not supported" in str(a.get("view")) for _, a in slack.calls))
    checked = check_calls(slack.calls)
    sent = [m for m, a in slack.calls if a.get("view") or a.get("blocks")]
    assert checked == len(sent) and checked >= 10
    assert {"views.open", "views.update", "views.publish", "chat.stopStream"} <= set(sent)


def test_try_again_blocks_fit():
    from bot.slack.try_again import after_click, notice_blocks, try_again_block

    ts = "1700000000.000100"
    check_message([try_again_block(ts)])
    notice = notice_blocks("n" * 12_000, ts)
    check_message(notice)
    check_message(answer_blocks("An answer cut short", try_again=ts))
    check_message(answer_blocks(" ", feedback=False, try_again=ts))
    used = after_click(tuple(notice), "U" + "0" * 20)
    assert used is not None
    check_message(used)
