"""The thumbs up / down under each answer: Slack's `feedback_buttons` element in a
`context_actions` block, built with slack_sdk's models (which validate lengths). A click
comes back as a `block_actions` interaction (`bot.interactions.feedback`)."""

from __future__ import annotations

from typing import Any

from slack_sdk.models.blocks import ContextActionsBlock, FeedbackButtonsElement, MarkdownBlock

FEEDBACK_ACTION = "answer_feedback"
RATINGS = ("good", "bad")
MARKDOWN_LIMIT = 12_000  # characters in all of a message's markdown blocks together


def feedback_block() -> dict[str, Any]:
    return ContextActionsBlock(
        elements=[
            FeedbackButtonsElement(
                action_id=FEEDBACK_ACTION,
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


def answer_blocks(text: str) -> list[dict[str, Any]]:
    """An answer part as blocks: the Markdown itself, then the feedback buttons.
    (`markdown_text` cannot be combined with blocks, so the text goes in a markdown block.)
    The caller splits answers to fit one message; a longer `text` is cut (with an
    ellipsis) rather than refused by Slack, and an empty one leaves only the buttons."""
    if not text.strip():
        return [feedback_block()]
    if len(text) > MARKDOWN_LIMIT:
        text = text[: MARKDOWN_LIMIT - 1].rstrip() + "…"
    return [MarkdownBlock(text=text).to_dict(), feedback_block()]
