"""The thumbs up / down under each answer: Slack's `feedback_buttons` element in a
`context_actions` block. A click comes back as a `block_actions` interaction
(`bot.interactions.feedback`).

The blocks are plain dicts, built fresh for each answer: slack_sdk's models cost about
45 µs an answer to build and validate what is constant here. tests/test_block_kit.py
checks them against those models and Slack's limits."""

from __future__ import annotations

from typing import Any

from bot.slack.try_again import try_again_block

FEEDBACK_ACTION = "answer_feedback"
RATINGS = ("good", "bad")
MARKDOWN_LIMIT = 12_000  # characters in all of a message's markdown blocks together


def feedback_block() -> dict[str, Any]:
    return {
        "type": "context_actions",
        "elements": [
            {
                "type": "feedback_buttons",
                "action_id": FEEDBACK_ACTION,
                "positive_button": {
                    "text": {"type": "plain_text", "text": "Good answer", "emoji": True},
                    "accessibility_label": "This answer was helpful",
                    "value": "good",
                },
                "negative_button": {
                    "text": {"type": "plain_text", "text": "Bad answer", "emoji": True},
                    "accessibility_label": "This answer was not helpful",
                    "value": "bad",
                },
            }
        ],
    }


def answer_blocks(text: str, *, feedback: bool = True, try_again: str = "") -> list[dict[str, Any]]:
    """An answer part as blocks: the Markdown itself, then the feedback buttons, then
    "Try again" for the message `try_again` when it is given (a failure notice).
    (`markdown_text` cannot be combined with blocks, so the text goes in a markdown block.)
    The caller splits answers to fit one message; a longer `text` is cut (with an
    ellipsis) rather than refused by Slack, and an empty one leaves only the buttons."""
    buttons = [feedback_block()] if feedback else []
    if try_again:
        buttons.append(try_again_block(try_again))
    if not text.strip():
        return buttons
    if len(text) > MARKDOWN_LIMIT:
        text = text[: MARKDOWN_LIMIT - 1].rstrip() + "…"
    return [{"type": "markdown", "text": text}, *buttons]
