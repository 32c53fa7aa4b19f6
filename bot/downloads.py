"""`read_capped`: an HTTP response body, read up to a byte cap — the one way the bot
reads a download (Slack files, pasted image links).

The declared Content-Length is checked first (nothing is read of a body that says it is
too big), then the bytes are counted as they stream in, since a body may be longer than
it said: reading stops at the first chunk past the cap, so a huge or endless body costs
at most one chunk more than the cap.
"""

from __future__ import annotations

import httpx2

from bot.file_problem import FileProblem

MB = 1024 * 1024


async def read_capped(response: httpx2.Response, max_bytes: int) -> bytes:
    """The body of a streamed `response`, at most `max_bytes`. Raises FileProblem
    ("too_large") past the cap; the caller closes the response."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise FileProblem(f"is {int(declared) / MB:,.1f} MB, over the {max_bytes / MB:g} MB limit", "too_large")
    buffer = bytearray()
    async for chunk in response.aiter_bytes():
        buffer += chunk
        if len(buffer) > max_bytes:
            raise FileProblem(f"is over the {max_bytes / MB:g} MB limit, so I stopped downloading it", "too_large")
    return bytes(buffer)
