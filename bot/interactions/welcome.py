"""The welcome a user gets with the answer to their first DM, and the suggested prompts
shown in assistant threads and the agent view (Slack shows at most four)."""

from __future__ import annotations

SUGGESTED_PROMPTS_TITLE = "Try one of these"
SUGGESTED_PROMPTS: tuple[dict[str, str], ...] = (
    {"title": "Explain a concept", "message": "Explain how public-key cryptography works, in plain words."},
    {"title": "Draft a message", "message": "Help me write a friendly reminder to my team about Friday's deadline."},
    {"title": "Summarize a text", "message": "Summarize the following text in five bullet points:\n\n"},
    {"title": "Brainstorm", "message": "Brainstorm ten names for a new internal tool that tracks expenses."},
)


def welcome_text(user: str, command: str) -> str:
    """Posted as `markdown_text` (standard Markdown): bold is `**…**` there, `*…*` is italic."""
    return (
        f":wave: Hi <@{user}>! I'm an AI assistant. Here's what I can do:\n"
        "• Answer here: each thread is one conversation, and I remember it. Start a new message for a new topic.\n"
        "• In channels, mention me and I'll answer in the thread; keep talking there, no mention needed.\n"
        "• On any message, the ⋮ menu has **Summarize thread** and **Translate message**.\n"
        f"• `{command}` (or my **Home** tab) chooses the model, custom instructions, streaming and more.\n"
        "• :thumbsup: / :thumbsdown: under an answer tells us how it went."
    )
