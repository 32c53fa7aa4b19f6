"""Build the model's input from a thread's history, trimmed to the context budget.

Keeps, in order of priority: the system prompt, the new user message (cut down with a
visible note if it alone is too big), then as much recent history as fits, newest first.
Older turns are dropped whole, never cut mid-message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from openai.types.chat import (
    ChatCompletionContentPartParam,
    ChatCompletionMessageParam,
    ChatCompletionSystemMessageParam,
    ChatCompletionUserMessageParam,
)

from bot.processing.tokens import PER_MESSAGE_OVERHEAD, count_tokens, cut_to_tokens, message_tokens
from bot.storage.base import HistoryMessage

TRUNCATION_NOTE = "\n\n[… message truncated: it was too long for the model's context …]"


@dataclass(frozen=True)
class Prompt:
    messages: list[ChatCompletionMessageParam]
    dropped_history: int  # older messages left out to fit the budget
    truncated_user_message: bool


def _truncate_to(text: str, budget: int) -> str:
    """Cut `text` so that it and the note fit `budget` tokens (binary search on length)."""
    return cut_to_tokens(text, budget - count_tokens(TRUNCATION_NOTE)) + TRUNCATION_NOTE


def build_prompt(
    system_prompt: str,
    history: list[HistoryMessage],
    user_text: str,
    *,
    budget_tokens: int,
    reserve_for_answer: int,
    user_parts: Sequence[ChatCompletionContentPartParam] = (),
    parts_tokens: int = 0,
) -> Prompt:
    """`user_parts` (image parts) go after the text in the user message, whose content
    then becomes a list of parts; `parts_tokens` is what they cost in the budget."""
    budget = budget_tokens - reserve_for_answer
    system: ChatCompletionSystemMessageParam = {"role": "system", "content": system_prompt}
    used = message_tokens(system) + parts_tokens
    truncated = False
    user_content = user_text
    user: ChatCompletionUserMessageParam = {"role": "user", "content": user_content}
    user_cost = message_tokens(user)
    if used + user_cost > budget:
        room = max(budget - used - PER_MESSAGE_OVERHEAD, 50)
        user_content = _truncate_to(user_text, room)
        user = {"role": "user", "content": user_content}
        user_cost = message_tokens(user)
        truncated = True
    used += user_cost
    if user_parts:
        user = {"role": "user", "content": [{"type": "text", "text": user_content}, *user_parts]}

    kept: list[ChatCompletionMessageParam] = []
    for item in reversed(history):
        msg: ChatCompletionMessageParam
        if item.role == "user":  # the same dict either way: the branches tell the type checker the role
            msg = {"role": item.role, "content": item.content}
        else:
            msg = {"role": item.role, "content": item.content}
        cost = message_tokens(msg)
        if used + cost > budget:
            break
        kept.append(msg)
        used += cost
    kept.reverse()
    return Prompt(
        messages=[system, *kept, user],
        dropped_history=len(history) - len(kept),
        truncated_user_message=truncated,
    )
