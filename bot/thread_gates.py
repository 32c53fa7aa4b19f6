"""One message per Slack thread at a time.

Each thread gets an `anyio.CapacityLimiter(1)`, taken without waiting: a message that
finds it taken is told "busy" at once instead of queueing behind a request that may run
for minutes. The token is released only by leaving `try_enter`'s `async with` — by the
task that took it, as its stack unwinds — so nothing can ever release it twice or
release a lock it does not hold (the watchdog of the design we replace did both).

`prune()` drops limiters nobody holds, so memory stays flat however many threads the
bot has seen. With several replicas this becomes a lease in the database; callers only
see `try_enter`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from bot.storage.base import ThreadKey


class ThreadGates:
    def __init__(self) -> None:
        self._limiters: dict[ThreadKey, anyio.CapacityLimiter] = {}

    @asynccontextmanager
    async def try_enter(self, thread: ThreadKey) -> AsyncIterator[bool]:
        """Yields True holding the thread, or False (immediately) if it is busy."""
        limiter = self._limiters.get(thread)
        if limiter is None:
            limiter = self._limiters[thread] = anyio.CapacityLimiter(1)
        holder = object()  # one borrower per entry, whichever task it runs in
        try:
            limiter.acquire_on_behalf_of_nowait(holder)
        except anyio.WouldBlock:
            yield False
            return
        try:
            yield True
        finally:
            limiter.release_on_behalf_of(holder)

    def busy(self, thread: ThreadKey) -> bool:
        limiter = self._limiters.get(thread)
        return limiter is not None and limiter.borrowed_tokens > 0

    @property
    def held(self) -> int:
        return sum(1 for lim in self._limiters.values() if lim.borrowed_tokens)

    def __len__(self) -> int:
        return len(self._limiters)

    def prune(self) -> int:
        """Forget idle limiters; returns how many were dropped."""
        idle = [key for key, lim in self._limiters.items() if lim.borrowed_tokens == 0]
        for key in idle:
            del self._limiters[key]
        return len(idle)
