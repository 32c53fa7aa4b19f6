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


# ---- broadcast mentions ------------------------------------------------------------------
#
# Model output is posted as is, so `<!channel>`, `<!here>`, `<!everyone>` or a user group
# (`<!subteam^S123|@team>`) in it would ping a whole channel. `neutralize_broadcasts`
# rewrites them into readable, inert text: "@" + WORD JOINER (U+2060) + the name. Bare
# `@channel`, `@here` and `@everyone` words get the joiner too (whether `markdown_text`
# turns them into mentions is undocumented: the safe choice). User mentions (`<@U123>`),
# links and dates (`<!date^…>`) are left alone. Code is not exempt: a ping from a code
# span is still a ping, if Slack parses one there.
#
# Streaming: each rewrite depends only on the text up to its own end (at most
# _ENTITY_WINDOW characters past its start), so the text can be neutralized piecewise.
# `stable_length(text)` is where the first rewrite still undecided starts (a trailing
# `<!chan…` without its `>`, a trailing `@` or `@her`); for any continuation `more`,
# `neutralize_broadcasts(text[:k])` (k = stable_length(text)) is a prefix of
# `neutralize_broadcasts(text + more)`, and `stable_length` never moves back as text grows.

WORD_JOINER = "\u2060"
_ENTITY_WINDOW = 256  # a `<!channel|…` without its `>` this far on is defused, not rewritten
_SPECIAL_WORDS = ("channel", "here", "everyone", "group")  # `<!group>`: the old name of `<!channel>`
_OPENER_WORDS = (*_SPECIAL_WORDS, "subteam")
_BARE_WORDS = ("channel", "here", "everyone")
_ENTITY = re.compile(
    r"<!(?:(channel|here|everyone|group)(?:\|[^<>\n]*)?"
    r"|subteam\^([A-Za-z0-9]+)(?:\|([^<>\n]*))?)>",
    re.IGNORECASE,
)
_INTERESTING = re.compile(r"[<@]")
_DEFUSED = "<" + WORD_JOINER + "!"


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


def _starts_word(text: str, at: int, words: tuple[str, ...]) -> tuple[str, bool]:
    """(the word of `words` that `text` has at `at`, case-insensitively, or "";
    whether the text ends inside what could still become one of them)."""
    rest = text[at : at + max(map(len, words))].lower()
    for word in words:
        if rest.startswith(word):
            return word, False
    return "", any(word.startswith(rest) for word in words) and at + len(rest) == len(text)


def _at_angle(text: str, i: int, final: bool) -> tuple[str, int] | None:
    """The rewrite of the `<…` at `i`: (output, where the input resumes), None if undecided."""
    n = len(text)
    if i + 1 >= n:
        return None if not final else ("<", i + 1)
    if text[i + 1] != "!":
        return "<", i + 1
    word, partial = _starts_word(text, i + 2, _OPENER_WORDS)
    if not word:
        return None if partial and not final else ("<", i + 1)
    close = text.find(">", i + 2, i + 2 + _ENTITY_WINDOW)
    if close < 0:
        if not final and n < i + 2 + _ENTITY_WINDOW:
            return None  # the `>` may still come
        return _DEFUSED, i + 2  # never closed (in reach): keep the text, break the `<!`
    m = _ENTITY.fullmatch(text, i, close + 1)
    if m is None:
        return _DEFUSED, i + 2  # `<!channel foo>` and the like: not Slack's syntax, still defused
    if m.group(1):
        name = "channel" if m.group(1).lower() == "group" else m.group(1).lower()
    else:
        label = (m.group(3) or "").strip().lstrip("@").strip()
        name = _neutralize(label, final=True)[0] if label else m.group(2)
    return "@" + WORD_JOINER + name, close + 1


def _at_sign(text: str, i: int, final: bool) -> tuple[str, int] | None:
    """The rewrite of the `@` at `i` (not preceded by a word character), or None if undecided."""
    word, partial = _starts_word(text, i + 1, _BARE_WORDS)
    if not word:
        return None if partial and not final else ("@", i + 1)
    end = i + 1 + len(word)
    if end >= len(text):
        if not final:
            return None  # "@here" may yet become "@heresy"
    elif _is_word_char(text[end]):
        return "@", i + 1  # "@channels", "@here_x": another word
    return "@" + WORD_JOINER + text[i + 1 : end], end


def _neutralize(text: str, *, final: bool) -> tuple[str, int]:
    """(the rewritten text, how much of the input it covers): all of it when `final`, else
    up to the first rewrite that more text could still change."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        m = _INTERESTING.search(text, i)
        if m is None:
            out.append(text[i:])
            return "".join(out), n
        j = m.start()
        out.append(text[i:j])
        if text[j] == "<":
            step = _at_angle(text, j, final)
        elif j > 0 and _is_word_char(text[j - 1]):
            step = "@", j + 1  # name@here.com: not a mention
        else:
            step = _at_sign(text, j, final)
        if step is None:
            return "".join(out), j
        out.append(step[0])
        i = step[1]
    return "".join(out), n


def neutralize_broadcasts(text: str) -> str:
    """`text` with every channel-wide or group mention made inert and kept readable:
    `<!channel>` → "@⁠channel", `<!subteam^S1|@devs>` → "@⁠devs", `@here` → "@⁠here" (a
    U+2060 WORD JOINER after the "@"). `<@U123>` and everything else stay as they are."""
    return _neutralize(text, final=True)[0]


def stable_length(text: str) -> int:
    """The length of the longest prefix of `text` whose neutralized form no later text can
    change: `neutralize_broadcasts(text[:k])` is a prefix of `neutralize_broadcasts(text + more)`
    for every `more` (k = stable_length(text)), and k never shrinks as `text` grows. What it
    holds back is a trailing, still open `<!…` (up to 256 characters) or `@`-word."""
    return _neutralize(text, final=False)[1]
