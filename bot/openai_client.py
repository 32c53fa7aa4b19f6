"""The `AsyncOpenAI` client, as every part of the bot builds it: the bot (`bot.startup`),
`slackbot check` and `slackbot shell`. One place, so they all talk to the endpoint the
same way (the SDK's own httpx2 client, OPENAI_BASE_URL, the retries each asks for).

One rule beyond the settings: a local OpenAI-compatible server (OPENAI_BASE_URL) may
need no key at all, but the SDK insists on one, so a placeholder is sent there — never
to OpenAI itself, where `load_settings` requires a real key (and always for the bot).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx2
import openai

from bot.config import OpenAISettings

NO_KEY = "no-key-needed"


@asynccontextmanager
async def openai_client(
    config: OpenAISettings,
    *,
    transport: httpx2.AsyncBaseTransport | None = None,
    max_retries: int = 2,
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[openai.AsyncOpenAI]:
    """The client and its HTTP client, both closed on exit. `transport` replaces the
    network (tests, the simulation); `tls` is the TLS context to verify servers with
    (default: one of its own, as httpx2 builds it)."""
    # The SDK's default pool allows 1000 connections and keeps 100 idle; the pool's
    # bookkeeping walks every pooled connection on each request and each response close,
    # so a pool sized to what the bot runs at once (its model slots) costs less CPU.
    slots = max(1, config.async_max_concurrent_requests)
    limits = httpx2.Limits(max_connections=slots + 10, max_keepalive_connections=min(slots, 20))
    verify: ssl.SSLContext | bool = tls if tls is not None else True
    http = (
        openai.DefaultAsyncHttpx2Client(transport=transport, limits=limits, verify=verify)
        if transport is not None
        else openai.DefaultAsyncHttpx2Client(limits=limits, verify=verify)
    )
    async with (
        http,
        openai.AsyncOpenAI(
            api_key=config.api_key or NO_KEY,
            base_url=config.base_url,
            http_client=http,
            max_retries=max_retries,
        ) as client,
    ):
        yield client
