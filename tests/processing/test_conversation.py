"""Fitting a thread into the context budget."""

from bot.processing.conversation import TRUNCATION_NOTE, build_prompt
from bot.processing.tokens import count_tokens, estimate_tokens, message_tokens
from bot.storage.base import HistoryMessage


def test_everything_fits():
    history = [HistoryMessage("user", "hi"), HistoryMessage("assistant", "hello")]
    prompt = build_prompt("sys", history, "next", budget_tokens=10_000, reserve_for_answer=1000)
    assert [m["role"] for m in prompt.messages] == ["system", "user", "assistant", "user"]
    assert prompt.messages[-1]["content"] == "next"
    assert prompt.dropped_history == 0 and not prompt.truncated_user_message


def test_oldest_history_is_dropped_first_and_budget_holds():
    history = [HistoryMessage("user" if i % 2 == 0 else "assistant", f"message {i} " + "x" * 300) for i in range(40)]
    prompt = build_prompt("sys", history, "latest", budget_tokens=2_000, reserve_for_answer=500)
    assert prompt.dropped_history > 0
    assert sum(message_tokens(m) for m in prompt.messages) <= 1_500
    kept = [m["content"] for m in prompt.messages[1:-1]]
    assert kept == [h.content for h in history[-len(kept) :]]  # a contiguous, newest suffix


def test_huge_user_message_is_truncated_with_a_note():
    text = "a" * 100_000
    prompt = build_prompt("sys", [], text, budget_tokens=5_000, reserve_for_answer=1_000)
    content = prompt.messages[-1]["content"]
    assert prompt.truncated_user_message
    assert content.endswith(TRUNCATION_NOTE)
    assert sum(message_tokens(m) for m in prompt.messages) <= 4_000


def test_token_estimate_counts_something_for_any_text():
    assert estimate_tokens("") == 0
    assert estimate_tokens("hello world, how are you") >= 5
    assert estimate_tokens("漢字" * 100) >= 100  # non-Latin text is not under-counted
    assert count_tokens("some words") > 0
