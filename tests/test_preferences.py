"""Preferences as data and in storage: levels, what a level stores, model kinds, the
modal's parsing, and the Store methods behind them (on Trio and asyncio)."""

from __future__ import annotations

import sqlite3

import pytest

from bot.interactions.settings_modal import ModalContext, parse_submission, settings_view
from bot.preferences import Preferences, baseline, below, changes, is_reasoning_model, merge
from bot.processing.options import options_from
from bot.storage import ThreadKey, open_store
from bot.storage.base import PreferenceLayers
from bot.storage.sqlite import MIGRATIONS
from tests.harness import test_settings


def test_reasoning_models_are_recognised():
    for name in ("o1", "o3-mini", "o4-mini", "gpt-5", "gpt-5-mini", "gpt-oss-20b", "openai/gpt-oss-120b"):
        assert is_reasoning_model(name), name
    for name in ("gpt-4o-mini", "gpt-4.1", "gpt-5-chat-latest", "llama3.1", "mistral"):
        assert not is_reasoning_model(name), name


def test_levels_apply_in_order_and_bad_stored_values_are_skipped():
    settings = test_settings(openai_model="gpt-4o-mini")
    prefs = merge(
        baseline(settings),
        {"temperature": 0.2, "instructions": "Be brief."},
        {"temperature": 0.9, "bogus": 1},
        {"temperature": "hot", "stream": False},
    )
    assert prefs.temperature == 0.9 and prefs.instructions == "Be brief." and prefs.stream is False
    # An explicit None in a higher level means "back to the model's default".
    assert merge(baseline(settings), {"temperature": 0.2}, {"temperature": None}).temperature is None


def test_a_level_stores_only_what_differs_from_below():
    settings = test_settings(openai_model="gpt-4o-mini")
    layers = PreferenceLayers(workspace={"temperature": 0.2}, user={"language": "German"}, thread={})
    base = below(layers, settings, "user")
    assert base.temperature == 0.2 and base.language == "English"
    chosen = merge(base, {"temperature": 0.2, "language": "French", "model": "gpt-4o-mini"})
    assert changes(base, chosen) == {"language": "French"}
    assert below(layers, settings, "thread").language == "German"
    assert below(layers, settings, "workspace") == baseline(settings)


def test_options_follow_the_model_kind():
    settings = test_settings(system_prompt="Base prompt.")
    chat = options_from(
        settings,
        Preferences(
            model="gpt-4o-mini",
            temperature=0.4,
            reasoning_effort="high",
            instructions="  Use metric units. ",
            history_messages=6,
        ),
    )
    assert chat.temperature == 0.4 and chat.reasoning_effort is None and chat.history_messages == 6
    assert chat.system_prompt.startswith("Base prompt.") and chat.system_prompt.endswith("Use metric units.")
    assert chat.image_size == "auto" and chat.language == "English"
    drawn = options_from(
        settings, Preferences(model="gpt-4o-mini", image_size="1536x1024", image_quality="high", language="Polish")
    )
    assert (drawn.image_size, drawn.image_quality, drawn.language) == ("1536x1024", "high", "Polish")
    reasoning = options_from(settings, Preferences(model="o3-mini", temperature=0.4, reasoning_effort="high"))
    assert reasoning.temperature is None and reasoning.reasoning_effort == "high"
    assert reasoning.system_prompt == "Base prompt."


def test_modal_round_trip_and_validation():
    context = ModalContext(ThreadKey("C1", "1700000000.000100"), "shortcut")
    view = settings_view(
        Preferences(model="gpt-4o-mini", temperature=0.5, history_messages=4),
        ["m"] * 300,
        configured_model="gpt-5-mini",
        scope="thread",
        context=context,
        is_admin=False,
    )
    model = next(b for b in view["blocks"] if b.get("block_id") == "model")
    assert len(model["element"]["options"]) <= 100  # Slack's cap, whatever the endpoint lists
    assert ModalContext.decode(view["private_metadata"]) == context
    view["state"] = {
        "values": {
            "scope": {"scope": {"selected_option": {"value": "thread"}}},
            "model": {"model": {"selected_option": {"value": "gpt-4o-mini"}}},
            "temperature": {"temperature": {"value": "1,25"}},
            "history_messages": {"history_messages": {"value": ""}},
            "language": {"language": {"value": "Deutsch"}},
        }
    }
    parsed = parse_submission(view, user="U1", admins=frozenset())
    assert parsed.errors == {} and parsed.scope == "thread" and parsed.thread == context.thread
    assert parsed.form == {"model": "gpt-4o-mini", "temperature": 1.25, "history_messages": None, "language": "Deutsch"}
    for field, value, block in (
        ("temperature", "3", "temperature"),
        ("temperature", "nan", "temperature"),
        ("history_messages", "12x", "history_messages"),
        ("language", "x" * 41, "language"),
    ):
        view["state"]["values"][field] = {field: {"value": value}}
        assert block in parse_submission(view, user="U1", admins=frozenset()).errors
        view["state"]["values"][field] = {field: {"value": ""}}
    assert "model" in parse_submission("not a view", user="U1", admins=frozenset()).errors
    del view["private_metadata"]  # a thread scope needs the thread it was opened from
    assert "scope" in parse_submission(view, user="U1", admins=frozenset()).errors


@pytest.mark.anyio
async def test_store_preferences_feedback_and_once(tmp_path):
    store = await open_store(f"sqlite:///{tmp_path}/p.db")
    thread = ThreadKey("D1", "1.5")
    try:
        await store.save_preferences("workspace", "", {"model": "gpt-4o-mini"}, updated_by="UADMIN")
        await store.save_preferences("user", "U1", {"temperature": None, "language": "German"}, updated_by="U1")
        await store.save_preferences("thread", str(thread), {"stream": False}, updated_by="U1")
        layers = await store.load_preferences("U1", thread)
        assert layers == PreferenceLayers(
            {"model": "gpt-4o-mini"}, {"temperature": None, "language": "German"}, {"stream": False}
        )
        assert (await store.load_preferences("U2", None)).user == {}
        await store.save_preferences("user", "U1", {}, updated_by="U1")  # empty: forget the level
        assert (await store.load_preferences("U1", thread)).user == {}
        with pytest.raises(ValueError):
            await store.save_preferences("team", "x", {"a": 1}, updated_by="U1")

        await store.record_feedback("D1", "2.0", "U1", "good")
        await store.record_feedback("D1", "2.0", "U1", "bad")  # a second click replaces the first
        await store.record_feedback("D1", "2.0", "U2", "good")
        assert await store.feedback_for("D1", "2.0") == {"U1": "bad", "U2": "good"}
        with pytest.raises(ValueError):
            await store.record_feedback("D1", "2.0", "U1", "meh")

        assert await store.claim_once("welcome", "U1") is True
        assert await store.claim_once("welcome", "U1") is False
        assert await store.claim_once("refusal", "U1") is True
    finally:
        await store.aclose()
    store = await open_store(f"sqlite:///{tmp_path}/p.db")  # all of it survives a restart
    try:
        assert await store.claim_once("welcome", "U1") is False
        assert await store.feedback_for("D1", "2.0") == {"U1": "bad", "U2": "good"}
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_a_database_from_before_the_ux_tables_is_upgraded(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0])
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    store = await open_store(f"sqlite:///{path}")
    try:
        assert await store.claim_once("welcome", "U9") is True
        assert (await store.load_preferences("U9", None)).workspace == {}
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_a_damaged_preferences_row_reads_as_defaults(tmp_path):
    path = tmp_path / "d.db"
    store = await open_store(f"sqlite:///{path}")
    await store.aclose()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO preferences (scope, scope_key, prefs, updated_at) VALUES ('user', 'U1', 'nope', 0)")
    conn.commit()
    conn.close()
    store = await open_store(f"sqlite:///{path}")
    try:
        assert (await store.load_preferences("U1", None)).user == {}
    finally:
        await store.aclose()
