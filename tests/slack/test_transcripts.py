"""One thread read both ways (`bot.slack.transcripts`): the model's history and the
summary's transcript share their rules and differ only on other bots' messages."""

from bot.slack.events import BotIdentity
from bot.slack.transcripts import history_from_replies, transcript
from bot.storage.base import HistoryMessage

ME = BotIdentity(user_id="UBOT", bot_id="BBOT", team_id="T1")
THREAD = [
    {"ts": "1.0", "user": "U1", "text": "<@UBOT> Shall we ship on Friday?"},
    {"ts": "2.0", "user": "UBOT", "bot_id": "BBOT", "text": "Friday works."},
    {"ts": "3.0", "bot_id": "BOTHER", "text": "Deploy bot: build 42 is green"},
    {"ts": "4.0", "user": "U2", "text": "   "},  # no text: not a message to either reader
    {"ts": "5.0", "bot_id": "BBOT", "text": "Posted by the app, not the bot user"},
    {"ts": "6.0", "user": "U2", "text": "Yes <@UBOT|bot>, ship it"},
    {"user": "U3", "text": "no ts"},
]


def test_history_keeps_the_bot_and_people_and_leaves_other_bots_out():
    assert history_from_replies(THREAD, ME, exclude_ts={"6.0"}) == [
        HistoryMessage("user", "Shall we ship on Friday?", "1.0"),
        HistoryMessage("assistant", "Friday works.", "2.0"),
        HistoryMessage("assistant", "Posted by the app, not the bot user", "5.0"),
    ]


def test_transcript_keeps_every_message_with_text_and_labels_bots_the_assistant():
    assert transcript(THREAD, ME) == "\n\n".join(
        [
            "<@U1>: Shall we ship on Friday?",
            "the assistant: Friday works.",
            "the assistant: Deploy bot: build 42 is green",
            "the assistant: Posted by the app, not the bot user",
            "<@U2>: Yes , ship it",
            "<@U3>: no ts",
        ]
    )
