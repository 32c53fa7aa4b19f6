"""Which Slack events the bot answers, and how they are keyed for dedupe."""

import pytest

from bot.slack.events import BotIdentity, IncomingMessage, Skip, parse_event, strip_mention

ME = BotIdentity(user_id="UBOT", bot_id="BBOT", app_id="A1")


def payload(event, event_id="Ev1"):
    return {"type": "event_callback", "event_id": event_id, "event": event}


def test_dm_is_answered_in_its_own_thread():
    msg = parse_event(
        payload(
            {"type": "message", "channel": "D1", "channel_type": "im", "user": "U1", "text": "hello", "ts": "10.1"}
        ),
        ME,
    )
    assert isinstance(msg, IncomingMessage)
    assert (msg.kind, msg.thread_ts, msg.in_existing_thread) == ("dm", "10.1", False)
    assert msg.dedupe_keys == ("event:Ev1", "msg:D1:10.1")


def test_mention_in_channel_thread_replies_in_that_thread_without_the_mention():
    msg = parse_event(
        payload(
            {
                "type": "app_mention",
                "channel": "C1",
                "user": "U1",
                "text": "<@UBOT> sum it up",
                "ts": "11.5",
                "thread_ts": "11.0",
            }
        ),
        ME,
    )
    assert isinstance(msg, IncomingMessage)
    assert (msg.kind, msg.text, msg.thread_ts, msg.in_existing_thread) == ("mention", "sum it up", "11.0", True)


def test_mention_twins_share_the_channel_ts_key():
    a = parse_event(
        payload({"type": "app_mention", "channel": "C1", "user": "U1", "text": "<@UBOT> hi", "ts": "12.0"}, "EvA"), ME
    )
    b = parse_event(
        payload(
            {
                "type": "message",
                "channel": "C1",
                "channel_type": "channel",
                "user": "U1",
                "text": "<@UBOT> hi",
                "ts": "12.0",
            },
            "EvB",
        ),
        ME,
    )
    assert a.dedupe_keys[1] == b.dedupe_keys[1]
    assert a.dedupe_keys[0] != b.dedupe_keys[0]


def test_channel_thread_reply_is_a_followup_candidate():
    msg = parse_event(
        payload(
            {
                "type": "message",
                "channel": "C1",
                "channel_type": "channel",
                "user": "U1",
                "text": "and then?",
                "ts": "13.2",
                "thread_ts": "13.0",
            }
        ),
        ME,
    )
    assert isinstance(msg, IncomingMessage) and msg.kind == "thread_followup"


@pytest.mark.parametrize(
    "event, reason",
    [
        ({"type": "message", "channel": "D1", "user": "UBOT", "text": "x", "ts": "1.0"}, "own"),
        ({"type": "message", "channel": "D1", "user": "U2", "bot_id": "B9", "text": "x", "ts": "1.0"}, "bot"),
        ({"type": "message", "subtype": "message_changed", "channel": "D1", "ts": "1.0"}, "subtype"),
        ({"type": "message", "subtype": "bot_message", "channel": "D1", "ts": "1.0"}, "subtype"),
        (
            {"type": "message", "channel": "C1", "channel_type": "channel", "user": "U1", "text": "x", "ts": "1.0"},
            "outside a thread",
        ),
        ({"type": "reaction_added", "user": "U1"}, "not handled"),
        ({"type": "message", "channel": "D1", "user": "U1", "text": "   ", "ts": "1.0"}, "empty"),
        ({"type": "message", "user": "U1", "text": "x"}, "missing"),
        ({"type": "message", "channel": "D1", "text": "x", "ts": "1.0"}, "no user"),
    ],
)
def test_skipped_events_say_why(event, reason):
    result = parse_event(payload(event), ME)
    assert isinstance(result, Skip)
    assert reason in result.reason


@pytest.mark.parametrize("bad", [None, "text", [], {"event": "x"}, {"event": None}, {}])
def test_malformed_payloads_never_raise(bad):
    assert isinstance(parse_event(bad, ME), Skip)


def test_file_share_subtype_is_answered():
    msg = parse_event(
        payload(
            {
                "type": "message",
                "subtype": "file_share",
                "channel": "D1",
                "user": "U1",
                "text": "",
                "ts": "3.0",
                "files": [{"id": "F1"}],
            }
        ),
        ME,
    )
    assert isinstance(msg, IncomingMessage)


def test_strip_mention_handles_labelled_mentions():
    assert strip_mention("<@UBOT|bot> hi <@U2>", "UBOT") == "hi <@U2>"
