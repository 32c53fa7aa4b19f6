"""Receipts: finding a request's final write in its thread (conversations.replies with
include_all_metadata), and what it shows."""

from __future__ import annotations

from bot.processing.surface import Receipt
from bot.slack.receipts import (
    find_delivered,
    find_opening,
    receipt_metadata,
    receipt_payload,
    reply_payload,
    shown_text,
    ts_order,
)

BOT = {"bot_id": "B1", "user": "UBOT"}


def thread(*messages: dict) -> list[dict]:
    return [{"ts": "100.000001", "user": "U1", "text": "<@UBOT> what is up?"}, *messages]


def test_a_final_edit_with_a_receipt_is_found_with_what_it_shows():
    replies = thread(
        {
            **BOT,
            "ts": "100.000002",
            "text": "short fallback",
            "blocks": [{"type": "markdown", "text": "the whole answer"}, {"type": "context_actions"}],
            "metadata": receipt_metadata(Receipt("r1", "answered")),
        }
    )
    found = find_delivered(replies, "r1", placeholder_ts="100.000002", user_ts="100.000001")
    assert found is not None
    assert (found.outcome, found.shown, found.asked) == ("answered", "the whole answer", "what is up?")


def test_no_receipt_or_another_requests_is_not_delivered():
    replies = thread(
        {
            **BOT,
            "ts": "100.000002",
            "text": "_Thinking…_",
            "metadata": {"event_type": "slackbot_post", "event_payload": {"post_id": "x"}},
        },
        {**BOT, "ts": "100.000003", "text": "other", "metadata": receipt_metadata(Receipt("r2", "answered"))},
    )
    assert find_delivered(replies, "r1", placeholder_ts="100.000002", user_ts="100.000001") is None


def test_an_answer_over_several_messages_is_joined_up_to_the_posted_receipt():
    replies = thread(
        {**BOT, "ts": "100.000002", "text": "part one, "},
        {"ts": "100.000003", "user": "U2", "text": "someone else meanwhile"},
        {
            **BOT,
            "ts": "100.000004",
            "text": "part two",
            # a posted final part: the post's marker and the receipt in one payload
            "metadata": {
                "event_type": "slackbot_post",
                "event_payload": {"post_id": "p", **receipt_payload(Receipt("r1", "timeout"))},
            },
        },
        {**BOT, "ts": "100.000005", "text": "a later answer"},
    )
    found = find_delivered(replies, "r1", placeholder_ts="100.000002", user_ts="100.000001")
    assert found is not None and found.outcome == "timeout"
    assert found.shown == "part one, part two"


def test_without_a_placeholder_the_answer_starts_after_the_question():
    replies = thread(
        {**BOT, "ts": "100.000000", "text": "an earlier answer"},
        {
            **BOT,
            "ts": "100.000009",
            "text": "posted when done",
            "metadata": receipt_metadata(Receipt("r1", "answered")),
        },
    )
    found = find_delivered(replies, "r1", placeholder_ts="", user_ts="100.000001")
    assert found is not None and found.shown == "posted when done"


def test_an_unknown_outcome_counts_as_delivered():
    replies = thread({**BOT, "ts": "100.000002", "text": "x", "metadata": receipt_metadata(Receipt("r1", "new-kind"))})
    found = find_delivered(replies, "r1", placeholder_ts="100.000002", user_ts="100.000001")
    assert found is not None and found.outcome == "answered"


def test_shown_text_prefers_markdown_blocks_and_ts_order_is_numeric():
    assert shown_text({"text": "fallback", "blocks": [{"type": "markdown", "text": "full"}]}) == "full"
    assert shown_text({"text": "plain"}) == "plain"
    assert ts_order("1700000000.000100") < ts_order("1700000000.000200") < ts_order("1700000001.000001")
    assert ts_order("garbage") == (0, 0)


def _posted(payload: dict) -> dict:
    return {"event_type": "slackbot_post", "event_payload": {**payload, "post_id": "x"}}


def test_an_unfinished_placeholder_is_found_by_its_request():
    replies = thread(
        {**BOT, "ts": "100.000002", "text": "busy", "metadata": _posted(reply_payload("100.000001"))},
        {**BOT, "ts": "100.000003", "text": "_Thinking…_", "metadata": _posted(reply_payload("100.000001", "r1"))},
        {"bot_id": "B2", "ts": "100.000004", "text": "another bot"},
    )
    assert find_opening(replies, "r1", user_ts="100.000001", bot_id="B1") == "100.000003"
    # Not another request's, nor a notice that answers the same message (a busy reply).
    assert find_opening(replies[:3], "r2", user_ts="100.000001", bot_id="B1") == ""
    assert find_opening(replies[:2], "r1", user_ts="100.000001", bot_id="B1") == ""


def test_a_finished_placeholder_is_no_opening_to_fix():
    replies = thread(
        {
            **BOT,
            "ts": "100.000002",
            "text": "done",
            "metadata": receipt_metadata(Receipt("r1", "answered", "100.000001")),
        }
    )
    assert find_opening(replies, "r1", user_ts="100.000001", bot_id="B1") == ""


def test_an_unrecorded_stream_is_the_bots_one_message_without_metadata_after_the_last_answer():
    earlier = [
        {**BOT, "ts": "100.000002", "text": "an old stream, given up"},  # before the last answer
        {**BOT, "ts": "100.000003", "text": "old", "metadata": receipt_metadata(Receipt("r0", "answered"))},
        {"user": "U1", "ts": "100.000004", "text": "again"},
    ]
    replies = thread(
        *earlier,
        {**BOT, "ts": "100.000005", "text": "", "files": [{"id": "F1"}]},  # a file of it: not the stream
        {**BOT, "ts": "100.000006", "text": "streaming so far"},
        {**BOT, "ts": "100.000007", "text": "busy", "metadata": _posted(reply_payload("100.000008"))},
        {"bot_id": "B2", "ts": "100.000009", "text": "another bot"},
    )
    assert find_opening(replies, "r1", user_ts="100.000004", bot_id="B1") == "100.000006"
    assert find_opening(thread(*earlier), "r1", user_ts="100.000004", bot_id="B1") == ""
    assert find_opening(replies, "r1", user_ts="100.000004", bot_id="") == ""  # whose messages: unknown
