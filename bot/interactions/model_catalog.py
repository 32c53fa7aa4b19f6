"""The models the settings modal offers: the endpoint's `models.list`, cached.

A modal must open within Slack's 3-second trigger window, so the list is fetched with a
short bound and kept for `ttl` seconds; when the endpoint is slow or fails, the modal
still opens, offering the configured model and the user's current one. Concurrent
openers share one fetch (an AnyIO lock, never a thread lock).
"""

from __future__ import annotations

import logging

import anyio
import openai

log = logging.getLogger(__name__)

CACHE_SECONDS = 600.0
MAX_MODELS = 1000  # enough for any endpoint; the modal shows at most 100
# Model families that cannot hold a chat conversation.
NOT_CHAT = (
    "embedding",
    "whisper",
    "tts",
    "dall-e",
    "davinci",
    "babbage",
    "moderation",
    "transcribe",
    "audio",
    "realtime",
    "image",
    "search",
    "sora",
    "computer-use",
)


def chat_models(ids: list[str]) -> list[str]:
    """Drop models that are not for chat, sorted and without duplicates."""
    return sorted({m for m in ids if not any(word in m.lower() for word in NOT_CHAT)})


class ModelCatalog:
    def __init__(self, *, ttl: float = CACHE_SECONDS) -> None:
        self._ttl = ttl
        self._ids: list[str] | None = None
        self._fetched_at = float("-inf")
        self._lock = anyio.Lock()
        self.fetches = 0
        self.last_error = ""

    @property
    def cached(self) -> list[str] | None:
        return self._ids

    async def models(self, client: openai.AsyncOpenAI, *, timeout: float = 1.5) -> list[str]:
        """The chat models, from the cache when it is fresh; [] when they cannot be had in
        `timeout` seconds (the last good list, if any, is kept and returned instead)."""
        if self._fresh():
            return list(self._ids or [])
        with anyio.move_on_after(timeout):
            async with self._lock:
                if not self._fresh():  # another opener may have fetched while we waited
                    await self._fetch(client)
        return list(self._ids or [])

    def _fresh(self) -> bool:
        return self._ids is not None and anyio.current_time() - self._fetched_at < self._ttl

    async def _fetch(self, client: openai.AsyncOpenAI) -> None:
        self.fetches += 1
        try:
            ids: list[str] = []
            async for model in client.models.list():
                ids.append(model.id)
                if len(ids) >= MAX_MODELS:
                    break
        except openai.OpenAIError as exc:
            self.last_error = type(exc).__name__
            log.warning(
                "could not list the endpoint's models (%s); the settings modal offers the configured model only",
                type(exc).__name__,
            )
            return
        self._ids = chat_models(ids)
        self._fetched_at = anyio.current_time()
        self.last_error = ""
        log.info("the endpoint offers %d chat models", len(self._ids))
