"""The thumbs up / down under each answer: Slack's `feedback_buttons` element in a
`context_actions` block, built with slack_sdk's models (which validate lengths). A click
comes back as a `block_actions` interaction (`bot.interactions.feedback`)."""

from __future__ import annotations

from typing import Any

from slack_sdk.models.blocks import ContextActionsBlock, FeedbackButtonsElement, MarkdownBlock

from bot.slack.try_again import try_again_block

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
    return [MarkdownBlock(text=text).to_dict(), *buttons]
