"""Markdown for Slack: split long answers into messages, and the little mrkdwn we still need.

Model output goes to Slack as native Markdown (`markdown_text`, ≤12,000 characters per
message), so no hand conversion is needed there. A longer answer is split into several
messages; a split inside a fenced code block closes the fence at the end of one part
and reopens it (same info string) at the start of the next, so both halves render as code.
"""

from __future__ import annotations

import re

SLACK_MARKDOWN_LIMIT = 12_000
_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})(.*)$")


def _fence_state(lines: list[str], state: tuple[str, str] | None) -> tuple[str, str] | None:
    """Track whether we are inside a fence after `lines`; state = (fence, info) or None."""
    for line in lines:
        m = _FENCE.match(line)
        if not m:
            continue
        fence = m.group(1)
        if state is None:
            state = (fence, m.group(2).strip())
        elif fence[0] == state[0][0] and len(fence) >= len(state[0]) and not m.group(2).strip():
            state = None
    return state


def split_markdown(text: str, limit: int = SLACK_MARKDOWN_LIMIT) -> list[str]:
    """Split `text` into parts of at most `limit` characters, preferring paragraph,
    then line, then word boundaries, and never leaving a code fence broken."""
    if len(text) <= limit:
        return [text]
    if limit < 100:
        raise ValueError("limit too small to split Markdown safely")
    parts: list[str] = []
    state: tuple[str, str] | None = None
    rest = text
    while rest:
        prefix = f"{state[0]}{state[1]}\n" if state else ""
        room = limit - len(prefix) - 8  # keep space for a closing fence
        if len(prefix) + len(rest) <= limit:
            parts.append(prefix + rest)
            break
        window = rest[:room]
        cut = max(window.rfind("\n\n"), -1)
        if cut < room // 2:
            cut = window.rfind("\n")
        if cut < room // 2:
            cut = window.rfind(" ")
        if cut <= 0:
            cut = room
        chunk, rest = rest[:cut], rest[cut:].lstrip("\n")
        new_state = _fence_state((prefix + chunk).splitlines(), None)
        body = prefix + chunk
        if new_state is not None:
            body = body.rstrip("\n") + "\n" + new_state[0]
        parts.append(body)
        state = new_state
    return parts


def markdown_to_mrkdwn(text: str) -> str:
    """The small conversion for places that only take mrkdwn (fallback `text`,
    notifications): escape &<>, **bold** → *bold*, [label](url) → <url|label>,
    headings → bold lines. Code spans and blocks are left alone."""
    out: list[str] = []
    in_fence = False
    for line in text.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
            out.append(line)
            continue
        if in_fence:
            out.append(line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))
            continue
        quote = ""
        if line.startswith(">"):
            quote, line = ">", line[1:]
        pieces = re.split(r"(`[^`]*`)", line)
        for i, piece in enumerate(pieces):
            if i % 2:
                continue  # inline code
            piece = piece.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            piece = re.sub(r"\[([^\]]+)\]\((https?://[^)\s]+)\)", r"<\2|\1>", piece)
            piece = re.sub(r"\*\*(.+?)\*\*", r"*\1*", piece)
            piece = re.sub(r"__(.+?)__", r"*\1*", piece)
            pieces[i] = piece
        line = quote + "".join(pieces)
        heading = re.match(r"^#{1,6}\s+(.*)$", line)
        if heading:
            line = f"*{heading.group(1).strip()}*"
        out.append(line)
    return "\n".join(out)
