"""Slack surfaces besides the answer, on Trio and asyncio: assistant threads and the agent
view, the first-DM welcome, access control, message shortcuts, and the ack hook."""

from __future__ import annotations

import json

import anyio
import httpx2
import pytest

from bot.config import load_settings
from bot.interactions.access import REFUSAL_CHANNEL, REFUSAL_USER, refusal
from bot.slack.socket_mode import SocketModeReader
from bot.slack.web_api import SlackWebAPI
from tests.fakes.openai import Behaviour
from tests.harness import running_bot, send_dm, test_settings, wait_reply

pytestmark = pytest.mark.anyio


# ---- assistant threads and the agent view ---------------------------------------------


async def test_assistant_thread_started_sets_suggested_prompts(slack, ai):
    async with running_bot(slack, ai):
        eid = await slack.send_app_event(
            {
                "type": "assistant_thread_started",
                "assistant_thread": {
                    "user_id": "U1",
                    "channel_id": "D1",
                    "thread_ts": "1700000001.000100",
                    "context": {"channel_id": "C9", "team_id": "T1"},
                },
            }
        )
        await slack.wait_acked(eid)
        await slack.wait_until(lambda: slack.suggested_prompts)
    prompts = slack.suggested_prompts[0]
    assert prompts["channel_id"] == "D1" and prompts["thread_ts"] == "1700000001.000100"
    assert 1 <= len(prompts["prompts"]) <= 4
    assert all(p["title"] and p["message"] for p in prompts["prompts"])


async def test_assistant_thread_context_changed_and_malformed_events(slack, ai):
    async with running_bot(slack, ai):
        await slack.send_app_event({"type": "assistant_thread_started"})  # no assistant_thread: logged, ignored
        await slack.send_app_event(
            {
                "type": "assistant_thread_context_changed",
                "assistant_thread": {
                    "user_id": "U1",
                    "channel_id": "D1",
                    "thread_ts": "1700000001.000100",
                    "context": {"channel_id": "C2"},
                },
            }
        )
        await slack.wait_until(lambda: slack.suggested_prompts)
        # The bot is still fine afterwards.
        _, ev = await send_dm(slack, "still here?")
        await wait_reply(slack, "D1", ev["ts"], "Echo: still here?")
    assert len(slack.suggested_prompts) == 1


async def test_agent_view_messages_tab_and_context_change(slack, ai):
    async with running_bot(slack, ai):
        await slack.send_app_event({"type": "app_home_opened", "user": "U1", "channel": "D1", "tab": "messages"})
        await slack.wait_until(lambda: len(slack.suggested_prompts) == 1)
        await slack.send_app_event(
            {
                "type": "app_context_changed",
                "user": "U1",
                "channel": "D1",
                "context": {"entities": [{"type": "slack#/types/channel_id", "value": "C0123", "team_id": "T1"}]},
            }
        )
        await slack.wait_until(lambda: len(slack.suggested_prompts) == 2)
    assert all(p["channel_id"] == "D1" and "thread_ts" not in p for p in slack.suggested_prompts)
    assert "U1" not in slack.home_views  # the Messages tab is not the Home tab


# ---- welcome ---------------------------------------------------------------------------


async def test_first_dm_gets_a_welcome_once(tmp_path, slack, ai):
    async with running_bot(slack, ai, welcome=True, database_url=f"sqlite:///{tmp_path}/a.db"):
        _, first = await send_dm(slack, "hi")
        await wait_reply(slack, "D1", first["ts"], "Echo: hi")
        _, second = await send_dm(slack, "hi again")
        await wait_reply(slack, "D1", second["ts"], "Echo: hi again")
        mention = slack.app_mention_event("C1", "U2", "a channel mention is not a DM")
        await slack.send_event(mention)
        await wait_reply(slack, "C1", mention["ts"], "Echo:")
    welcomes = [m for m in slack.messages["D1"] if m.get("bot_id") and "I'm an AI assistant" in m["text"]]
    assert len(welcomes) == 1 and "thread_ts" not in welcomes[0]  # its own message, not in the thread
    assert "/settings" in welcomes[0]["text"] and "<@U1>" in welcomes[0]["text"]
    assert slack.bot_replies("D1", first["ts"]) == ["Echo: hi"]  # the conversation stays clean
    assert not any("I'm an AI assistant" in m["text"] for m in slack.messages["C1"])


# ---- access control ----------------------------------------------------------------------


def test_access_rules():
    s = test_settings(
        allowed_users=frozenset({"U1"}), allowed_channels=frozenset({"C1"}), admin_users=frozenset({"UADMIN"})
    )
    assert refusal(s.surfaces, "U1", "D1") == ""  # DMs follow ALLOWED_USERS only
    assert refusal(s.surfaces, "U1", "C1") == ""
    assert refusal(s.surfaces, "U1", "C2") == REFUSAL_CHANNEL
    assert refusal(s.surfaces, "U2", "D2") == REFUSAL_USER
    assert refusal(s.surfaces, "UADMIN", "C2") == ""  # admins everywhere
    assert refusal(test_settings().surfaces, "Uanyone", "Canywhere") == ""  # no lists: everyone


def test_access_settings_are_parsed_and_checked():
    base = {"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xapp-1", "OPENAI_API_KEY": "k"}
    s = load_settings(
        {
            **base,
            "ALLOWED_USERS": "U1, U2 W3",
            "ALLOWED_CHANNELS": "C1,G2",
            "ADMIN_USERS": "UA",
            "NATIVE_STREAMING": "off",
            "SETTINGS_COMMAND": "ai",
        },
        dotenv_path=None,
    )
    assert s.surfaces.allowed_users == {"U1", "U2", "W3"} and s.surfaces.allowed_channels == {"C1", "G2"}
    assert (
        s.surfaces.admin_users == {"UA"}
        and s.surfaces.native_streaming is False
        and s.surfaces.settings_command == "/ai"
    )
    for bad in (
        {"ALLOWED_USERS": "bob"},
        {"ALLOWED_CHANNELS": "U1"},
        {"NATIVE_STREAMING": "maybe"},
        {"SETTINGS_COMMAND": "/has space"},
    ):
        with pytest.raises(Exception) as info:
            load_settings({**base, **bad}, dotenv_path=None)
        assert next(iter(bad)) in str(info.value)


async def test_users_outside_the_allow_list_are_refused_once_per_thread(slack, ai):
    async with running_bot(slack, ai, allowed_users=frozenset({"U1"})):
        _, ev = await send_dm(slack, "let me in", user="U2", channel="D2")
        await wait_reply(slack, "D2", ev["ts"], "only available to some people")
        await send_dm(slack, "please", user="U2", channel="D2", thread_ts=ev["ts"])
        _, other = await send_dm(slack, "allowed", user="U1", channel="D1")
        await wait_reply(slack, "D1", other["ts"], "Echo: allowed")
        await anyio.sleep(0.2)
    assert slack.bot_replies("D2", ev["ts"]) == [REFUSAL_USER]  # once, though asked twice
    assert [r["messages"][-1]["content"] for r in ai.requests] == ["allowed"]


async def test_channels_outside_the_allow_list_are_refused(slack, ai):
    async with running_bot(slack, ai, allowed_channels=frozenset({"C1"})):
        refused = slack.app_mention_event("C2", "U1", "answer me")
        await slack.send_event(refused)
        await wait_reply(slack, "C2", refused["ts"], "not enabled in this channel")
        allowed = slack.app_mention_event("C1", "U1", "answer me here")
        await slack.send_event(allowed)
        await wait_reply(slack, "C1", allowed["ts"], "Echo: answer me here")
        _, dm = await send_dm(slack, "and in a DM")
        await wait_reply(slack, "D1", dm["ts"], "Echo: and in a DM")


async def test_refused_slash_command_is_answered_in_its_ack(slack, ai):
    async with running_bot(slack, ai, allowed_users=frozenset({"U1"})):
        eid, _ = await slack.send_slash_command("/settings", user="U2")
        await slack.wait_acked(eid)
        await anyio.sleep(0.2)
    assert slack.ack_payloads[eid] == {"response_type": "ephemeral", "text": REFUSAL_USER}
    assert not slack.views


# ---- message shortcuts ----------------------------------------------------------------------


async def test_summarize_thread_shows_the_summary_in_a_modal(slack, ai):
    ai.script = lambda request: Behaviour(text="**Summary:** they agreed on <@U2>'s plan.")
    root = slack.add_user_message("C1", "U2", "Shall we ship on Friday?")
    slack.add_user_message("C1", "U3", "Yes, <@U2>'s plan works.", thread_ts=root)
    async with running_bot(slack, ai):
        eid = await slack.message_shortcut("summarize_thread", "C1", root)
        await slack.wait_acked(eid)
        await slack.wait_until(lambda: any("agreed" in str(v["blocks"]) for v in slack.views.values()))
    request = ai.requests[-1]
    transcript = request["messages"][-1]["content"]
    assert "<@U2>: Shall we ship on Friday?" in transcript and "<@U3>: Yes" in transcript
    view = next(v for v in slack.views.values() if "agreed" in str(v["blocks"]))
    text = view["blocks"][0]["text"]["text"]
    assert text.startswith("*Summary:*") and "<@U2>" in text  # mrkdwn, mentions kept
    assert view["title"]["text"] == "Thread summary"
    assert slack.bot_replies("C1", root) == []  # private: nothing posted in the thread


async def test_summarize_a_thread_the_bot_cannot_read(slack, ai):
    async with running_bot(slack, ai):
        slack.add_user_message("C7", "U2", "secret")
        root = slack.messages["C7"][0]["ts"]
        slack.fail_next("conversations.replies", error="not_in_channel")
        await slack.message_shortcut("summarize_thread", "C7", root)
        await slack.wait_until(lambda: any("invite me" in str(v["blocks"]) for v in slack.views.values()))
    assert ai.requests == []


async def test_translate_message_uses_the_users_language(slack, ai):
    async with running_bot(slack, ai) as nursery:
        await nursery.services.store.save_preferences("user", "U1", {"language": "German"}, updated_by="U1")
        ts = slack.add_user_message("C1", "U2", "Good morning, team!")
        await slack.message_shortcut("translate_message", "C1", ts)
        await slack.wait_until(lambda: any("Echo: Good morning" in str(v["blocks"]) for v in slack.views.values()))
    request = ai.requests[-1]
    assert "German" in request["messages"][0]["content"]
    assert request["messages"][-1]["content"] == "Good morning, team!"


async def test_shortcut_failures_are_a_clear_line_in_the_modal(slack, ai):
    ai.enqueue(Behaviour(status=401))
    async with running_bot(slack, ai):
        ts = slack.add_user_message("C1", "U2", "Bonjour")
        await slack.message_shortcut("translate_message", "C1", ts)
        await slack.wait_until(lambda: any("API key" in str(v["blocks"]) for v in slack.views.values()))


async def test_shortcuts_respect_access_control(slack, ai):
    async with running_bot(slack, ai, allowed_channels=frozenset({"C1"})):
        ts = slack.add_user_message("C2", "U2", "Bonjour")
        await slack.message_shortcut("translate_message", "C2", ts)
        await slack.wait_until(
            lambda: any("not enabled in this channel" in str(v["blocks"]) for v in slack.views.values())
        )
    assert ai.requests == []


# ---- the ack hook -------------------------------------------------------------------------


async def test_a_failing_ack_hook_still_acks(slack):
    def broken(kind: str, payload: dict) -> dict | None:
        raise RuntimeError("bug")

    seen = []
    async with httpx2.AsyncClient(transport=httpx2.MockTransport(slack.handle)) as http:
        api = SlackWebAPI(
            bot_token=slack.bot_token, app_token=slack.app_token, base_url="http://slack.test/api/", client=http
        )
        reader = SocketModeReader(api, slack.connector, seen.append, ack_payload=broken)
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader.run)
            await reader.connected.wait()
            eid, _ = await slack.send_slash_command("/settings")
            await slack.wait_acked(eid)
            tg.cancel_scope.cancel()
    assert slack.ack_payloads[eid] is None and len(seen) == 1
    frame = json.loads(next(text for _, text in slack.client_frames if eid in text))
    assert frame == {"envelope_id": eid}


async def test_acks_with_payloads_still_go_out_together(slack, ai):
    """A burst of interactions: every one acked, each with its own payload, none waiting."""
    async with running_bot(slack, ai, allowed_users=frozenset({"U1"})):
        eids = [(await slack.send_slash_command("/settings", user=f"U{i}"))[0] for i in range(2, 12)]
        for eid in eids:
            await slack.wait_acked(eid)
    assert all(slack.ack_payloads[e]["text"] == REFUSAL_USER for e in eids)
