"""Counting tokens to fit a conversation into the model's context budget.

tiktoken is used when it is installed *and* its encoding table is already cached on
disk (tiktoken downloads its tables on first use, which fails — or worse, stalls —
on an offline server). Otherwise a conservative estimate is used: about 3 characters
per token for text, which over-counts English (≈4) so trimming errs on the safe side,
and never under-counts badly for code or non-Latin scripts (counted per UTF-8 byte / 3).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import tempfile
from collections.abc import Callable, Mapping

PER_MESSAGE_OVERHEAD = 4  # role and separators, as OpenAI's own counting guide does


def estimate_tokens(text: str) -> int:
    if not text:
        return 0
    return max(1, math.ceil(max(len(text), len(text.encode("utf-8")) / 1.5) / 3))


@functools.cache
def _tiktoken_counter() -> Callable[[str], int] | None:
    try:
        import tiktoken
        from tiktoken_ext.openai_public import ENCODING_CONSTRUCTORS  # noqa: F401
    except ImportError:
        return None
    url = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not os.path.exists(os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())):
        return None  # would need a download: stay offline
    try:
        enc = tiktoken.get_encoding("o200k_base")
    except Exception:
        return None
    return lambda text: len(enc.encode(text, disallowed_special=()))


def count_tokens(text: str) -> int:
    counter = _tiktoken_counter()
    return counter(text) if counter else estimate_tokens(text)


def cut_to_tokens(text: str, budget: int) -> str:
    """The longest prefix of `text` within `budget` tokens (binary search on length)."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(text[:mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def message_tokens(message: Mapping[str, object]) -> int:
    content = message.get("content", "")
    if isinstance(content, list):
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return count_tokens(str(content)) + PER_MESSAGE_OVERHEAD
