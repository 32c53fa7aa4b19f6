"""`bot.slack.try_again`: reading a "Try again" click (defensively: a malformed payload
is never an exception), and the notice's blocks before and after it."""

from __future__ import annotations

from bot.slack.try_again import (
    TRY_AGAIN_ACTION,
    TRY_AGAIN_BLOCK,
    after_click,
    find_question,
    notice_blocks,
    parse_try_again,
    try_again_block,
)

ASKED = "1700000000.000100"
NOTICE = "1700000000.000200"


def click(**changes) -> dict:
    """A `block_actions` payload as Slack sends it for a button in a message."""
    payload = {
        "type": "block_actions",
        "user": {"id": "U1"},
        "channel": {"id": "D1"},
        "container": {"type": "message", "message_ts": NOTICE, "channel_id": "D1"},
        "message": {
            "ts": NOTICE,
            "thread_ts": ASKED,
            "text": "Sorry",
            "blocks": notice_blocks("Sorry", ASKED),
        },
        "actions": [{"type": "button", "action_id": TRY_AGAIN_ACTION, "block_id": TRY_AGAIN_BLOCK, "value": ASKED}],
    }
    payload.update(changes)
    return payload


def test_a_click_is_read_with_its_thread_notice_question_and_user():
    found = parse_try_again("interactive", click())
    assert found is not None
    assert (found.channel, found.thread_ts, found.notice_ts, found.asked_ts, found.user) == (
        "D1",
        ASKED,
        NOTICE,
        ASKED,
        "U1",
    )
    assert found.claim_key == f"D1:{NOTICE}" and found.text == "Sorry"
    assert found.blocks == tuple(notice_blocks("Sorry", ASKED))


def test_other_payloads_are_not_clicks():
    assert parse_try_again("events_api", click()) is None
    assert parse_try_again("interactive", click(type="view_submission")) is None
    assert parse_try_again("interactive", click(actions=[{"action_id": "answer_feedback", "value": "good"}])) is None
    assert parse_try_again("interactive", click(actions="nonsense")) is None
    assert parse_try_again("interactive", ["not", "a", "dict"]) is None


def test_a_malformed_click_comes_back_without_its_question():
    for broken in (
        click(user=None),
        click(channel=None, container={}),
        click(message={"blocks": "x"}, container={}),
        click(actions=[{"action_id": TRY_AGAIN_ACTION}]),
        click(actions=[{"action_id": TRY_AGAIN_ACTION, "value": "x" * 3000}]),
        click(actions=[{"action_id": TRY_AGAIN_ACTION, "value": 12}]),
    ):
        found = parse_try_again("interactive", broken)
        assert found is not None and found.asked_ts == "", broken


def test_the_channel_and_notice_may_come_from_the_container():
    found = parse_try_again(
        "interactive",
        click(channel=None, message={"thread_ts": ASKED}, container={"message_ts": NOTICE, "channel_id": "C9"}),
    )
    assert found is not None and (found.channel, found.notice_ts, found.asked_ts) == ("C9", NOTICE, ASKED)


def test_after_a_click_the_button_gives_way_to_who_asked():
    blocks = after_click(tuple(notice_blocks("Sorry", ASKED)), "U1")
    assert blocks is not None
    assert all(b.get("block_id") != TRY_AGAIN_BLOCK for b in blocks)
    assert blocks[0] == {"type": "markdown", "text": "Sorry"}
    assert "<@U1> asked to try again" in blocks[-1]["elements"][0]["text"]


def test_a_message_whose_text_is_outside_its_blocks_is_not_edited():
    # A stopped stream: its text is the stream's, its blocks only the buttons.
    assert after_click((try_again_block(ASKED),), "U1") is None


def test_the_question_is_found_unless_deleted():
    replies = [{"ts": ASKED, "user": "U1", "text": "hi"}, {"ts": NOTICE, "bot_id": "B1"}]
    assert find_question(replies, ASKED) == replies[0]
    assert find_question(replies, "1.0") is None
    assert find_question([{"ts": ASKED, "subtype": "tombstone"}], ASKED) is None
