"""An `AsyncOpenAI` client for the tools beside the bot (`slackbot check`, `slackbot shell`).

The bot builds its own in `bot.startup`; these need the same thing outside it, plus one
rule: a local OpenAI-compatible server (OPENAI_BASE_URL) may need no key at all, but the
SDK insists on one, so a placeholder is sent there — never to OpenAI itself, where
`load_settings` requires a real key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx2
import openai

from bot.config import Settings

NO_KEY = "no-key-needed"


@asynccontextmanager
async def openai_client(
    settings: Settings, *, transport: httpx2.AsyncBaseTransport | None = None, max_retries: int = 2
) -> AsyncIterator[openai.AsyncOpenAI]:
    http = (
        openai.DefaultAsyncHttpx2Client(transport=transport)
        if transport is not None
        else openai.DefaultAsyncHttpx2Client()
    )
    async with (
        http,
        openai.AsyncOpenAI(
            api_key=settings.openai_api_key or NO_KEY,
            base_url=settings.openai_base_url,
            http_client=http,
            max_retries=max_retries,
        ) as client,
    ):
        yield client
