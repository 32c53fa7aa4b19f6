"""Settings inputs that cannot be mistyped, through the fake Slack's Socket Mode on Trio
and asyncio: numbers are `number_input`s with the server's own bounds, the language is a
menu that starts from the user's Slack locale (users.info with include_locale), and the
server still checks everything — a crafted payload, and a modal opened before the
upgrade (free-text fields) is still read and saved."""

from __future__ import annotations

import anyio
import pytest

from bot.interactions.languages import LANGUAGES, NAMES, canonical, language_choices, language_for_locale
from bot.interactions.locales import UserLocales
from bot.interactions.settings_modal import TEMPERATURE_MAX, TEMPERATURE_MIN, ModalContext, parse_submission
from bot.preferences import MAX_HISTORY_MESSAGES, Preferences, merge
from tests.block_kit import check_view
from tests.fakes.openai import FakeOpenAI
from tests.harness import running_bot
from tests.interactions.test_settings import form, open_modal

pytestmark = pytest.mark.anyio

# A chat model (temperature, not reasoning effort) as the configured one, so the modal shows
# both numbers.
MODEL = "gpt-4o-mini"


@pytest.fixture
def ai():
    return FakeOpenAI(models=("gpt-4o-mini", "gpt-4o", "o3-mini"))


def block(view: dict, block_id: str) -> dict:
    return next(b for b in view["blocks"] if b.get("block_id") == block_id)


def element(view: dict, block_id: str) -> dict:
    return block(view, block_id)["element"]


def model_choice(model: str) -> dict:
    """The block action of choosing `model` in the modal's model menu."""
    return {"action_id": "model", "block_id": "model", "type": "static_select", "selected_option": {"value": model}}


def locale_calls(slack) -> list[dict]:
    return [args for method, args in slack.calls if method == "users.info"]


# ---- the modal's inputs ------------------------------------------------------------------


async def test_numbers_are_number_inputs_and_the_language_a_menu(slack, ai):
    async with running_bot(slack, ai, openai_model=MODEL):
        _, view = await open_modal(slack)
    check_view(view)
    temperature = element(view, "temperature")
    assert temperature["type"] == "number_input" and temperature["is_decimal_allowed"] is True
    assert (temperature["min_value"], temperature["max_value"]) == ("0", "2")
    assert "initial_value" not in temperature  # the model's default: empty
    history = element(view, "history_messages")
    assert history["type"] == "number_input" and history["is_decimal_allowed"] is False
    assert (history["min_value"], history["max_value"]) == ("0", str(MAX_HISTORY_MESSAGES))
    language = element(view, "language")
    assert language["type"] == "static_select"
    offered = [o["value"] for o in language["options"]]
    assert 15 <= len(offered) <= 25 and {"English", "Spanish", "Japanese", "Ukrainian"} <= set(offered)
    assert language["initial_option"]["value"] == "English"  # no locale from Slack, nothing saved
    assert not block(view, "language").get("optional")  # a menu always has a value
    free_text = [b["block_id"] for b in view["blocks"] if b.get("element", {}).get("type") == "plain_text_input"]
    assert free_text == ["instructions"]  # the only field left to type into


def test_the_modals_bounds_are_the_servers():
    """The number inputs' min/max are exactly what storage and parse_submission accept."""
    base = Preferences(model=MODEL)
    assert merge(base, {"temperature": TEMPERATURE_MAX}).temperature == TEMPERATURE_MAX
    assert merge(base, {"temperature": TEMPERATURE_MAX + 0.01}).temperature is None
    assert merge(base, {"temperature": TEMPERATURE_MIN - 0.01}).temperature is None
    assert merge(base, {"history_messages": MAX_HISTORY_MESSAGES}).history_messages == MAX_HISTORY_MESSAGES
    assert merge(base, {"history_messages": MAX_HISTORY_MESSAGES + 1}).history_messages is None

    def parsed(**fields) -> dict:
        view = {"callback_id": "settings_modal", "state": {"values": form(**fields)}}
        submission = parse_submission(view, user="U1", admins=frozenset())
        return {**submission.form, **{f"error:{k}": v for k, v in submission.errors.items()}}

    assert parsed(temperature=str(TEMPERATURE_MAX))["temperature"] == TEMPERATURE_MAX
    assert parsed(temperature=str(TEMPERATURE_MIN))["temperature"] == TEMPERATURE_MIN
    assert "error:temperature" in parsed(temperature="2.01")
    assert parsed(history=str(MAX_HISTORY_MESSAGES))["history_messages"] == MAX_HISTORY_MESSAGES
    assert "error:history_messages" in parsed(history=str(MAX_HISTORY_MESSAGES + 1))


# ---- round trip through Socket Mode ----------------------------------------------------------


async def test_number_and_menu_values_round_trip_and_are_used(slack, ai):
    async with running_bot(slack, ai, openai_model=MODEL) as nursery:
        view_id, _ = await open_modal(slack)
        eid = await slack.submit_view(view_id, form(model=MODEL, temperature="0.35", history="12", language="Japanese"))
        await slack.wait_acked(eid)
        assert slack.ack_payloads[eid] is None  # valid: the modal closes
        await slack.wait_until(lambda: "U1" in slack.home_views)
        layers = await nursery.services.store.load_preferences("U1", None)
        assert layers.user == {"temperature": 0.35, "history_messages": 12, "language": "Japanese"}
        # Opened again, the modal shows what was saved.
        _, again = await open_modal(slack)
        assert element(again, "temperature")["initial_value"] == "0.35"
        assert element(again, "history_messages")["initial_value"] == "12"
        assert element(again, "language")["initial_option"]["value"] == "Japanese"
        check_view(again)
        # And Translate message translates into it.
        ts = slack.add_user_message("C1", "U2", "Good morning, team!")
        await slack.message_shortcut("translate_message", "C1", ts)
        await slack.wait_until(lambda: any("Echo: Good morning" in str(v["blocks"]) for v in slack.views.values()))
    system = ai.requests[-1]["messages"][0]["content"]
    assert "into Japanese" in system and ai.requests[-1]["temperature"] == 0.35


async def test_a_modal_opened_before_the_upgrade_is_still_saved(slack, ai):
    """During a deploy a user may submit the old modal: free-text temperature, history and
    language (`plain_text_input`). Its values are read, checked and stored as before."""
    async with running_bot(slack, ai, openai_model=MODEL) as nursery:
        view_id, _ = await open_modal(slack)
        bad = await slack.submit_view(view_id, form(model=MODEL, temperature="warm", history="5", legacy=True))
        await slack.wait_acked(bad)
        assert set(slack.ack_payloads[bad]["errors"]) == {"temperature"}
        old = form(model=MODEL, temperature="1,5", history="7", language="Klingon", legacy=True)
        eid = await slack.submit_view(view_id, old)
        await slack.wait_acked(eid)
        assert slack.ack_payloads[eid] is None
        await slack.wait_until(lambda: "U1" in slack.home_views)
        layers = await nursery.services.store.load_preferences("U1", None)
        assert layers.user == {"temperature": 1.5, "history_messages": 7, "language": "Klingon"}
        # The new modal keeps a language that is not on the list, selected.
        _, view = await open_modal(slack)
    language = element(view, "language")
    assert language["initial_option"]["value"] == "Klingon" and language["options"][0]["value"] == "Klingon"
    check_view(view)


async def test_crafted_payloads_still_get_clear_errors_in_the_modal(slack, ai):
    """Slack's number inputs and menus stop a user from typing nonsense; a crafted payload
    does not get past the server either, and the modal stays open with the reasons."""
    async with running_bot(slack, ai, openai_model=MODEL) as nursery:
        view_id, _ = await open_modal(slack)
        cases = [
            (form(model=MODEL, temperature="high"), {"temperature"}),
            (form(model=MODEL, temperature="inf", history="3.5"), {"temperature", "history_messages"}),
            (form(model=MODEL, history="-1"), {"history_messages"}),
            (form(model=MODEL, history="²"), {"history_messages"}),  # str.isdigit() says yes
            (form(model=MODEL, history="9" * 5000), {"history_messages"}),  # int() would raise
            (form(model=MODEL, language="Klingon"), {"language"}),  # not offered by this modal
            (form(model=MODEL, language="x" * 41, legacy=True), {"language"}),
        ]
        acks = []
        for values, expected in cases:
            eid = await slack.submit_view(view_id, values)
            await slack.wait_acked(eid)
            acks.append(slack.ack_payloads[eid])
            assert acks[-1]["response_action"] == "errors" and set(acks[-1]["errors"]) == expected, values
        await anyio.sleep(0.2)  # the handlers that run after each ack have nothing to save
        layers = await nursery.services.store.load_preferences("U1", None)
    assert acks[0]["errors"]["temperature"] == "Enter a number from 0 to 2, or leave it empty for the model's default."
    assert acks[3]["errors"]["history_messages"].startswith("Enter a whole number from 0 to 500")
    assert acks[5]["errors"]["language"] == "Choose one of the listed languages."
    assert layers.user == {}  # nothing was saved
    assert "U1" not in slack.home_views  # nor the Home tab republished


async def test_changing_the_model_keeps_the_chosen_numbers_and_language(slack, ai):
    async with running_bot(slack, ai, openai_model=MODEL):
        view_id, view = await open_modal(slack)
        old_hash = view["hash"]
        await slack.click(
            model_choice("o3-mini"),
            view_id=view_id,
            values=form(model="o3-mini", temperature="0.5", history="9", language="Korean"),
        )
        await slack.wait_until(lambda: slack.views[view_id]["hash"] != old_hash)
        await slack.click(
            model_choice(MODEL),
            view_id=view_id,
            values=form(model=MODEL, temperature=None, effort="low", history="9", language="Korean"),
        )
        await slack.wait_until(lambda: "temperature" in str(slack.views[view_id]["blocks"]))
    updates = [args["view"] for method, args in slack.calls if method == "views.update"]
    assert len(updates) == 2
    reasoning, chat = updates
    assert "temperature" not in [b.get("block_id") for b in reasoning["blocks"]]
    for rebuilt in updates:
        check_view(rebuilt)
        assert element(rebuilt, "history_messages")["initial_value"] == "9"
        assert element(rebuilt, "language")["initial_option"]["value"] == "Korean"
    assert element(chat, "temperature")["type"] == "number_input"


# ---- the user's Slack locale -----------------------------------------------------------


async def test_the_slack_locale_is_the_first_choice(slack, ai):
    slack.users["U1"] = {"locale": "pt-BR"}
    async with running_bot(slack, ai, openai_model=MODEL) as nursery:
        view_id, view = await open_modal(slack)
        assert element(view, "language")["initial_option"]["value"] == "Portuguese"
        assert locale_calls(slack) == [{"user": "U1", "include_locale": "true"}]  # Slack sends it only then
        # Saved as it was shown: the user's level now holds the language.
        eid = await slack.submit_view(view_id, form(model=MODEL, language="Portuguese"))
        await slack.wait_acked(eid)
        await slack.wait_until(lambda: "U1" in slack.home_views)
        assert (await nursery.services.store.load_preferences("U1", None)).user == {"language": "Portuguese"}
        # Once a language is saved, the locale is not asked for (nor needed) again.
        slack.users["U1"] = {"locale": "ja-JP"}
        _, again = await open_modal(slack)
        assert element(again, "language")["initial_option"]["value"] == "Portuguese"
    assert len(locale_calls(slack)) == 1


async def test_the_locale_is_cached_and_never_overrides_a_saved_default(slack, ai):
    slack.users["U1"] = {"locale": "de-DE"}
    slack.users["UADMIN"] = {"locale": "fr-FR"}
    async with running_bot(slack, ai, openai_model=MODEL, admin_users=frozenset({"UADMIN"})) as nursery:
        _, first = await open_modal(slack)
        _, second = await open_modal(slack)
        assert [element(v, "language")["initial_option"]["value"] for v in (first, second)] == ["German", "German"]
        assert len(locale_calls(slack)) == 1  # cached for an hour
        # The workspace defaults never start from one admin's locale ...
        before = set(slack.views)
        button = {"action_id": "open_settings_workspace", "type": "button", "value": "workspace"}
        await slack.click(button, user="UADMIN")
        await slack.wait_until(lambda: set(slack.views) - before)
        defaults = slack.views[(set(slack.views) - before).pop()]
        assert element(defaults, "language")["initial_option"]["value"] == "English"
        # ... and once an admin set a default language, users start from it, not from their locale.
        await nursery.services.store.save_preferences("workspace", "", {"language": "Spanish"}, updated_by="UADMIN")
        slack.users["U3"] = {"locale": "ko-KR"}
        _, third = await open_modal(slack, user="U3")
    assert element(third, "language")["initial_option"]["value"] == "Spanish"
    assert [c["user"] for c in locale_calls(slack)] == ["U1"]


async def test_without_the_users_read_scope_the_modal_opens_as_before(slack, ai):
    slack.users["U1"] = {"locale": "de-DE"}
    slack.fail_next("users.info", error="missing_scope")
    async with running_bot(slack, ai, openai_model=MODEL) as nursery:
        _, view = await open_modal(slack)
        _, other = await open_modal(slack, user="U2")
        assert nursery.ux.locales.enabled is False
    assert element(view, "language")["initial_option"]["value"] == "English"
    assert element(other, "language")["initial_option"]["value"] == "English"
    assert len(locale_calls(slack)) == 1  # refused once: not asked again


async def test_a_slow_locale_does_not_cost_the_trigger(slack, ai):
    """users.info hanging: the modal opens well within the trigger's 3 seconds, in English."""
    slack.users["U1"] = {"locale": "de-DE"}
    slack.latency["users.info"] = 30.0
    async with running_bot(slack, ai, openai_model=MODEL):
        started = anyio.current_time()
        _, view = await open_modal(slack)
        took = anyio.current_time() - started
    assert element(view, "language")["initial_option"]["value"] == "English"
    assert took < 2.5


async def test_locale_look_ups_are_bounded_and_cached_per_user():
    class Slack:
        def __init__(self, answers):
            self.answers, self.calls = list(answers), []

        async def call(self, method, **args):
            self.calls.append((method, args))
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    from bot.slack.web_api import SlackAPIError

    slack = Slack(
        [
            {"user": {"id": "U1", "locale": "es-LA"}},
            SlackAPIError("users.info", "internal_error", transient=True),
            {"user": {"id": "U2"}},  # no locale in the answer
            SlackAPIError("users.info", "user_not_found"),
        ]
    )
    locales = UserLocales()
    assert await locales.locale(slack, "U1") == "es-LA"
    assert await locales.locale(slack, "U1") == "es-LA"  # cached
    assert await locales.locale(slack, "U2") is None  # a transient failure is not remembered
    assert await locales.locale(slack, "U2") is None
    assert await locales.locale(slack, "U9") is None  # user_not_found is remembered
    assert await locales.locale(slack, "U9") is None
    assert await locales.locale(slack, "") is None
    assert [args["user"] for _, args in slack.calls] == ["U1", "U2", "U2", "U9"]
    assert all(args["include_locale"] is True for _, args in slack.calls)


# ---- the language list --------------------------------------------------------------------


def test_locales_map_to_listed_languages():
    assert language_for_locale("de-DE") == "German"
    assert language_for_locale("pt-BR") == "Portuguese"
    assert language_for_locale("es-LA") == "Spanish"
    assert language_for_locale("en-GB") == "English"
    assert language_for_locale("fr_CA") == "French"
    assert language_for_locale("zh-CN") == "Chinese (Simplified)"
    assert language_for_locale("zh-TW") == "Chinese (Traditional)"
    assert language_for_locale("zh-Hant-HK") == "Chinese (Traditional)"
    assert language_for_locale("iw-IL") == "Hebrew"
    assert all(language_for_locale(x) is None for x in ("xx-YY", "", None, 42, "  "))
    assert {language_for_locale(f"{code}-XX") for code in ("ja", "ko", "ru", "uk", "pl", "tr")} <= NAMES


def test_the_language_menu():
    assert 15 <= len(LANGUAGES) <= 25 and len(NAMES) == len(LANGUAGES)
    assert all(len(label) <= 75 and len(name) <= 40 for name, label in LANGUAGES)  # option text; storage
    assert language_choices("German") == list(LANGUAGES)
    assert language_choices("deutsch") == list(LANGUAGES)  # a native name typed into the old field
    assert language_choices("British English")[0] == ("British English", "British English")
    assert canonical(" german ") == "German" and canonical("日本語") == "Japanese" and canonical("Klingon") == "Klingon"


def test_an_unknown_shape_or_missing_language_is_not_an_error():
    values = form(model=MODEL)
    del values["language"]
    view = {"state": {"values": values}, "private_metadata": ModalContext().encode()}
    submission = parse_submission(view, user="U1", admins=frozenset())
    assert submission.errors == {} and "language" not in submission.form
