"""The settings modal end to end, through the fake Slack's Socket Mode, on Trio and asyncio.

`/settings` → `views.open`; a submission → validated in the ack (`response_action:
errors`) or saved; the next request then runs with the new model, temperature or
instructions (the fake OpenAI records them). Also: thread overrides, workspace defaults
(admins only), rebuilding the modal when the model changes, and the App Home tab.
"""

from __future__ import annotations

import pytest

from bot.preferences import baseline
from bot.storage import ThreadKey, open_store
from tests.fakes.openai import FakeOpenAI
from tests.fakes.slack import FakeSlack
from tests.harness import eventually, running_bot, send_dm, test_settings, wait_reply

pytestmark = pytest.mark.anyio


@pytest.fixture
def ai():
    return FakeOpenAI(models=("gpt-5-mini", "gpt-4o-mini", "o3-mini", "text-embedding-3-small"))


# What the modal shows for images when nothing is saved: the process settings.
DEFAULT_SIZE = baseline(test_settings()).image_size
DEFAULT_QUALITY = baseline(test_settings()).image_quality


def form(
    *,
    scope="user",
    model="gpt-4o-mini",
    temperature: str | None = "",
    effort: str | None = None,
    instructions="",
    stream="on",
    history="",
    image_size=DEFAULT_SIZE,
    image_quality=DEFAULT_QUALITY,
    language: str | None = None,
    reset=False,
    legacy=False,
) -> dict:
    """A submitted modal's `state.values`, shaped as Slack sends them for each element:
    `number_input` and `plain_text_input` give `value` (a string, None when empty), menus
    and radio buttons `selected_option`. `legacy`: the free-text fields of a modal opened
    before the upgrade (temperature, history and language as `plain_text_input`).
    `language` None: what the modal starts with when nothing is saved (English, or typed
    nothing in the old field)."""

    def text(value):
        return {"type": "plain_text_input", "value": value or None}

    def number(value):
        return {"type": "plain_text_input" if legacy else "number_input", "value": value or None}

    def select(value, kind="static_select"):
        return {"type": kind, "selected_option": {"value": value, "text": {"type": "plain_text", "text": value}}}

    language_value = text(language or "") if legacy else select("English" if language is None else language)
    values = {
        "scope": {"scope": select(scope, "radio_buttons")},
        "model": {"model": select(model)},
        "instructions": {"instructions": text(instructions)},
        "stream": {"stream": select(stream, "radio_buttons")},
        "history_messages": {"history_messages": number(history)},
        "image_size": {"image_size": select(image_size)},
        "image_quality": {"image_quality": select(image_quality)},
        "language": {"language": language_value},
        "reset": {"reset": {"type": "checkboxes", "selected_options": [{"value": "reset"}] if reset else []}},
    }
    if temperature is not None:
        values["temperature"] = {"temperature": number(temperature)}
    if effort is not None:
        values["reasoning_effort"] = {"reasoning_effort": select(effort)}
    return values


async def open_modal(slack: FakeSlack, user: str = "U1") -> tuple[str, dict]:
    """Run /settings and return (view_id, view) of the modal the bot opened."""
    before = set(slack.views)
    eid, _ = await slack.send_slash_command("/settings", user=user)
    await slack.wait_acked(eid)
    await slack.wait_until(lambda: set(slack.views) - before)
    view_id = (set(slack.views) - before).pop()
    return view_id, slack.views[view_id]


def block_ids(view: dict) -> list[str]:
    return [b.get("block_id") for b in view["blocks"] if b.get("block_id")]


async def test_slash_command_opens_the_modal_with_the_endpoints_models(slack, ai):
    async with running_bot(slack, ai):
        _view_id, view = await open_modal(slack)
    assert view["type"] == "modal" and view["callback_id"] == "settings_modal"
    model_block = next(b for b in view["blocks"] if b.get("block_id") == "model")
    offered = [o["value"] for o in model_block["element"]["options"]]
    assert offered[0] == "gpt-5-mini"  # the current model first
    assert set(offered) == {"gpt-5-mini", "gpt-4o-mini", "o3-mini"}  # embeddings are not chat models
    # gpt-5-mini is a reasoning model: effort, not temperature
    assert "reasoning_effort" in block_ids(view) and "temperature" not in block_ids(view)
    scopes = [o["value"] for o in view["blocks"][0]["element"]["options"]]
    assert scopes == ["user"]  # not an admin, not opened from a thread
    assert slack.ack_payloads[next(iter(slack.acks))] is None  # the command's ack carries nothing


async def test_models_list_is_cached_between_openings(slack, ai):
    async with running_bot(slack, ai) as nursery:
        await open_modal(slack)
        await open_modal(slack)
        assert nursery.ux.catalog.fetches == 1


async def test_submission_changes_the_next_request(slack, ai):
    async with running_bot(slack, ai):
        view_id, _ = await open_modal(slack)
        eid = await slack.submit_view(
            view_id, form(model="gpt-4o-mini", temperature="0.3", instructions="Always answer in French.")
        )
        await slack.wait_acked(eid)
        assert slack.ack_payloads[eid] is None  # valid: a plain ack closes the modal
        await slack.wait_until(lambda: "U1" in slack.home_views)  # saved, then the Home tab refreshed
        _, ev = await send_dm(slack, "hello")
        await wait_reply(slack, "D1", ev["ts"], "Echo: hello")
    request = ai.requests[-1]
    assert request["model"] == "gpt-4o-mini"
    assert request["temperature"] == 0.3
    assert "Always answer in French." in request["messages"][0]["content"]
    assert "reasoning_effort" not in request


async def test_invalid_values_come_back_as_errors_in_the_ack(slack, ai):
    async with running_bot(slack, ai) as nursery:
        view_id, _ = await open_modal(slack)
        eid = await slack.submit_view(view_id, form(temperature="hot", history="-3", scope="workspace"))
        await slack.wait_acked(eid)
        ack = slack.ack_payloads[eid]
        assert ack["response_action"] == "errors"
        assert set(ack["errors"]) == {"temperature", "history_messages", "scope"}
        assert "0 to 2" in ack["errors"]["temperature"]
        assert "admins" in ack["errors"]["scope"]
        _, ev = await send_dm(slack, "still default?")
        await wait_reply(slack, "D1", ev["ts"], "Echo: still default?")
        layers = await nursery.services.store.load_preferences("U1", None)
    assert layers.user == {} and layers.workspace == {}  # nothing was saved
    assert ai.requests[-1]["model"] == "gpt-5-mini"


async def test_reasoning_model_gets_an_effort_and_no_temperature(slack, ai):
    async with running_bot(slack, ai):
        view_id, _ = await open_modal(slack)
        eid = await slack.submit_view(view_id, form(model="o3-mini", temperature=None, effort="high"))
        await slack.wait_acked(eid)
        await slack.wait_until(lambda: "U1" in slack.home_views)
        _, ev = await send_dm(slack, "think hard")
        await wait_reply(slack, "D1", ev["ts"], "Echo: think hard")
    request = ai.requests[-1]
    assert request["model"] == "o3-mini" and request["reasoning_effort"] == "high"
    assert "temperature" not in request


async def test_changing_the_model_rebuilds_the_modal(slack, ai):
    async with running_bot(slack, ai):
        view_id, view = await open_modal(slack)
        old_hash = view["hash"]
        await slack.click(
            {
                "action_id": "model",
                "block_id": "model",
                "type": "static_select",
                "selected_option": {"value": "gpt-4o-mini"},
            },
            view_id=view_id,
            values=form(model="gpt-4o-mini", temperature=None, effort="low"),
        )
        await slack.wait_until(lambda: slack.views[view_id]["hash"] != old_hash)
    rebuilt = slack.views[view_id]
    assert "temperature" in block_ids(rebuilt) and "reasoning_effort" not in block_ids(rebuilt)
    assert any(c[0] == "views.update" and c[1]["hash"] == old_hash for c in slack.calls)


async def test_thread_override_wins_in_its_thread_only(slack, ai):
    async with running_bot(slack, ai):
        _, first = await send_dm(slack, "first thread")
        await wait_reply(slack, "D1", first["ts"], "Echo: first thread")
        # Thread settings: the message shortcut on a message in that thread.
        before = set(slack.views)
        await slack.message_shortcut("thread_settings", "D1", first["ts"])
        await slack.wait_until(lambda: set(slack.views) - before)
        view_id = (set(slack.views) - before).pop()
        scopes = [o["value"] for o in slack.views[view_id]["blocks"][0]["element"]["options"]]
        assert scopes == ["user", "thread"]
        eid = await slack.submit_view(view_id, form(scope="thread", model="gpt-4o-mini", temperature="1.5"))
        await slack.wait_acked(eid)
        assert slack.ack_payloads[eid] is None
        await slack.wait_until(lambda: "U1" in slack.home_views)
        _, _again = await send_dm(slack, "in the thread", thread_ts=first["ts"])
        await wait_reply(slack, "D1", first["ts"], "Echo: in the thread")
        in_thread = ai.requests[-1]
        _, other = await send_dm(slack, "elsewhere")
        await wait_reply(slack, "D1", other["ts"], "Echo: elsewhere")
        elsewhere = ai.requests[-1]
    assert in_thread["model"] == "gpt-4o-mini" and in_thread["temperature"] == 1.5
    assert elsewhere["model"] == "gpt-5-mini" and "temperature" not in elsewhere


async def test_workspace_defaults_apply_to_everyone_and_users_override_them(slack, ai):
    async with running_bot(slack, ai, admin_users=frozenset({"UADMIN"})):
        view_id, view = await open_modal(slack, user="UADMIN")
        assert [o["value"] for o in view["blocks"][0]["element"]["options"]] == ["user", "workspace"]
        eid = await slack.submit_view(
            view_id,
            form(scope="workspace", model="gpt-4o-mini", temperature="0.2", instructions="Be brief."),
            user="UADMIN",
        )
        await slack.wait_acked(eid)
        assert slack.ack_payloads[eid] is None
        await slack.wait_until(lambda: "UADMIN" in slack.home_views)
        _, ev = await send_dm(slack, "from U2", user="U2", channel="D2")
        await wait_reply(slack, "D2", ev["ts"], "Echo: from U2")
        u2 = ai.requests[-1]
        # U3 keeps the defaults but changes only the temperature.
        view_id, view = await open_modal(slack, user="U3")
        temperature = next(b for b in view["blocks"] if b.get("block_id") == "temperature")
        assert temperature["element"]["initial_value"] == "0.2"  # the modal shows the defaults
        eid = await slack.submit_view(
            view_id, form(model="gpt-4o-mini", temperature="0.9", instructions="Be brief."), user="U3"
        )
        await slack.wait_acked(eid)
        await slack.wait_until(lambda: "U3" in slack.home_views)
        _, ev = await send_dm(slack, "from U3", user="U3", channel="D3")
        await wait_reply(slack, "D3", ev["ts"], "Echo: from U3")
        u3 = ai.requests[-1]
    assert u2["model"] == "gpt-4o-mini" and u2["temperature"] == 0.2
    assert "Be brief." in u2["messages"][0]["content"]
    assert u3["temperature"] == 0.9 and "Be brief." in u3["messages"][0]["content"]


async def test_users_store_only_what_differs_from_the_defaults(slack, ai):
    async with running_bot(slack, ai, admin_users=frozenset({"UADMIN"})) as nursery:
        view_id, _ = await open_modal(slack, user="UADMIN")
        eid = await slack.submit_view(
            view_id, form(scope="workspace", model="gpt-4o-mini", temperature="0.2"), user="UADMIN"
        )
        await slack.wait_acked(eid)
        await slack.wait_until(lambda: "UADMIN" in slack.home_views)
        view_id, _ = await open_modal(slack, user="U3")
        eid = await slack.submit_view(
            view_id, form(model="gpt-4o-mini", temperature="0.2", language="German"), user="U3"
        )
        await slack.wait_acked(eid)
        await slack.wait_until(lambda: "U3" in slack.home_views)
        layers = await nursery.services.store.load_preferences("U3", None)
    assert layers.workspace == {"model": "gpt-4o-mini", "temperature": 0.2}
    assert layers.user == {"language": "German"}  # the rest follows the defaults


async def test_reset_forgets_a_level(slack, ai):
    async with running_bot(slack, ai) as nursery:
        view_id, _ = await open_modal(slack)
        eid = await slack.submit_view(view_id, form(model="gpt-4o-mini", temperature="1"))
        await slack.wait_acked(eid)
        await eventually(lambda: len([c for c in slack.calls if c[0] == "views.publish"]) == 1)
        view_id, _ = await open_modal(slack)
        eid = await slack.submit_view(view_id, form(model="gpt-4o-mini", temperature="1", reset=True))
        await slack.wait_acked(eid)
        await eventually(lambda: len([c for c in slack.calls if c[0] == "views.publish"]) == 2)
        layers = await nursery.services.store.load_preferences("U1", None)
    assert layers.user == {}


async def test_streaming_off_posts_the_finished_answer_only(slack, ai):
    from tests.fakes.openai import Behaviour

    async with running_bot(slack, ai, update_interval_seconds=0.01):
        view_id, _ = await open_modal(slack)
        eid = await slack.submit_view(view_id, form(model="gpt-4o-mini", stream="off"))
        await slack.wait_acked(eid)
        await slack.wait_until(lambda: "U1" in slack.home_views)
        ai.enqueue(Behaviour(text="one two three four five six", chunks=6, chunk_delay=0.05))
        _, ev = await send_dm(slack, "go")
        await wait_reply(slack, "D1", ev["ts"], "one two three four five six")
    placeholder = slack.bot_replies("D1", ev["ts"])
    assert len(placeholder) == 1
    texts = next(t for (ch, ts), t in slack.updates.items() if ch == "D1" and ts != ev["ts"] and len(t) > 1)
    partial = [t for t in texts if t.startswith("one") and t != "one two three four five six"]
    assert partial == []  # never shown half-written


async def test_unknown_slash_command_is_answered_in_the_ack(slack, ai):
    async with running_bot(slack, ai):
        eid, _ = await slack.send_slash_command("/other")
        await slack.wait_acked(eid)
    assert "/settings" in slack.ack_payloads[eid]["text"]
    assert not slack.views


async def test_configured_command_name(slack, ai):
    async with running_bot(slack, ai, settings_command="/ai-settings"):
        before = set(slack.views)
        eid, _ = await slack.send_slash_command("/ai-settings")
        await slack.wait_acked(eid)
        await slack.wait_until(lambda: set(slack.views) - before)
    assert slack.ack_payloads[eid] is None


async def test_app_home_shows_settings_and_opens_the_modal(slack, ai):
    async with running_bot(slack, ai, admin_users=frozenset({"U1"})):
        await slack.send_app_event({"type": "app_home_opened", "user": "U1", "channel": "D1", "tab": "home"})
        await slack.wait_until(lambda: "U1" in slack.home_views)
        home = slack.home_views["U1"]
        text = str(home["blocks"])
        assert "gpt-5-mini" in text and "Reasoning effort" in text
        actions = next(b for b in home["blocks"] if b["type"] == "actions")
        ids = [e["action_id"] for e in actions["elements"]]
        assert ids == ["open_settings", "open_settings_workspace"]  # an admin gets both
        before = set(slack.views) - {home["id"]}
        await slack.click({"action_id": "open_settings_workspace", "type": "button", "value": "workspace"})
        await slack.wait_until(lambda: set(slack.views) - before - {home["id"]})
    modal = slack.views[(set(slack.views) - before - {home["id"]}).pop()]
    assert modal["callback_id"] == "settings_modal"
    assert modal["blocks"][0]["element"]["initial_option"]["value"] == "workspace"


async def test_a_storage_failure_on_save_is_told_not_lost(slack, ai):
    from bot.storage import StorageError

    store = await open_store("sqlite:///:memory:")

    class FailingSaves:
        def __getattr__(self, name):
            return getattr(store, name)

        async def save_preferences(self, *args, **kwargs):
            raise StorageError("save_preferences failed: database is locked")

    try:
        async with running_bot(slack, ai, store=FailingSaves()):
            view_id, _ = await open_modal(slack)
            eid = await slack.submit_view(view_id, form(model="gpt-4o-mini"))
            await slack.wait_acked(eid)
            await slack.wait_until(
                lambda: any("could not save your settings" in m.get("text", "") for m in slack.messages.get("U1", []))
            )
    finally:
        await store.aclose()


async def test_preferences_survive_a_restart(tmp_path, slack, ai):
    url = f"sqlite:///{tmp_path}/bot.db"
    store = await open_store(url)
    try:
        async with running_bot(slack, ai, store=store):
            view_id, _ = await open_modal(slack)
            eid = await slack.submit_view(view_id, form(model="gpt-4o-mini", temperature="0.7"))
            await slack.wait_acked(eid)
            await slack.wait_until(lambda: "U1" in slack.home_views)
    finally:
        await store.aclose()
    store = await open_store(url)
    try:
        layers = await store.load_preferences("U1", ThreadKey("D1", "1.0"))
    finally:
        await store.aclose()
    assert layers.user == {"model": "gpt-4o-mini", "temperature": 0.7}
