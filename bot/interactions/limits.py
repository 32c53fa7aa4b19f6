"""Slack's Block Kit limits the builders here must respect, and `clip` to respect them.

The figures are Slack's documented ones (docs.slack.dev, Block Kit reference); the tests
check every builder against the full table in `tests/block_kit.py`.
"""

from __future__ import annotations

MODAL_TITLE = 24  # characters of a modal's title (and of its submit / close buttons)
SECTION_TEXT = 3000  # characters of a section's text, and of any text object
MAX_OPTIONS = 100  # options of a static select
OPTION_TEXT = 75  # characters of an option's text
OPTION_VALUE = 150  # characters of an option's value


def clip(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, ending with an ellipsis when it was longer."""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
