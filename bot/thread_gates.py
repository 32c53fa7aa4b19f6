"""One message per Slack thread at a time — in this process and across replicas.

Two gates, both taken without waiting, so a message that finds its thread busy is
told so at once instead of queueing behind a request that may run for minutes:

1. An `anyio.CapacityLimiter(1)` per thread: the cheap in-process gate.
2. A lease in storage (`Store.acquire_lease`): one owner per thread across every
   replica sharing the database. Its fencing token goes with the request, so that
   storage refuses the writes of a replica that lost the lease. One task for the whole
   process (`renew_forever`, run by the nursery) renews every held lease each third of
   its time to live, all in one storage call; requests themselves never wait on it.

Both are released only by leaving `try_enter`'s `async with` — by the task that took
them, as its stack unwinds — so nothing can ever release a gate twice or release one
it does not hold (the watchdog of the design we replace did both). A lease that cannot
be renewed is never taken back by force: it expires, and storage fences its holder off.
If the lease passes to someone else (this process was paused or cut off from the
database past its time to live), the request is told through `Hold.lost` and its
`on_lost` callback, so it can stop writing. It is told before the lease can pass, too:
a holder that could not renew it and would next try only after the lease may have
expired (by its own clock, counted from before its last successful renewal, so never
later than the database's) gives it up itself. A replica cut off from storage thus
stops writing a third of a lease before another can take the thread over.

`prune()` drops limiters nobody holds, so memory stays flat however many threads the
bot has seen.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from bot.storage.base import StorageError, Store, ThreadKey

log = logging.getLogger(__name__)

LEASE_SECONDS = 30.0  # a lease's time to live; renewed every third of it


@dataclass
class Hold:
    """A thread held by one request: the lease's fencing token, and whether it was lost."""

    thread: ThreadKey
    fence: int
    owner: str
    lost: bool = False
    on_lost: Callable[[], None] | None = None
    behind: bool = False  # `surely_held` said no and no renewal has answered since (logged once)
    # Until when (anyio.current_time()) the lease is surely still ours: the moment its last
    # grant or renewal was asked for, plus its time to live.
    valid_until: float = math.inf


class ThreadGates:
    def __init__(self, store: Store, *, owner: str, lease_seconds: float = LEASE_SECONDS) -> None:
        self._store = store
        self.owner = owner  # this replica's id
        self.lease_seconds = lease_seconds
        self._limiters: dict[ThreadKey, anyio.CapacityLimiter] = {}
        self._holds: dict[ThreadKey, Hold] = {}
        self._renew_now = anyio.Event()  # set: a holder is unsure of its lease; renew without waiting

    @asynccontextmanager
    async def try_enter(self, thread: ThreadKey) -> AsyncIterator[Hold | None]:
        """Yields a `Hold` on the thread, or None (immediately) if it is busy here or on
        another replica. A storage failure taking the lease raises `StorageError`: the
        bot cannot know who holds the thread, so it does not answer."""
        limiter = self._limiters.get(thread)
        if limiter is None:
            limiter = self._limiters[thread] = anyio.CapacityLimiter(1)
        holder = object()  # one borrower per entry, whichever task it runs in
        try:
            limiter.acquire_on_behalf_of_nowait(holder)
        except anyio.WouldBlock:
            yield None
            return
        try:
            asked = anyio.current_time()
            token = await self._store.acquire_lease(thread, self.owner, ttl=self.lease_seconds)
            if token is None:
                log.info("thread %s is held by another replica", thread)
                yield None
                return
            hold = self._holds[thread] = Hold(thread, token, self.owner, valid_until=asked + self.lease_seconds)
            try:
                yield hold
            finally:
                del self._holds[thread]
                await self._release(hold)
        finally:
            limiter.release_on_behalf_of(holder)

    async def renew_forever(self) -> None:
        """Renew every held lease each third of its time to live, until cancelled. A
        failed renewal is tried again at the next tick (a lease lasts three of them); a
        refused one means the lease passed to someone else."""
        while True:
            with anyio.move_on_after(self.lease_seconds / 3):
                await self._renew_now.wait()
            self._renew_now = anyio.Event()
            await self.renew_all()

    def surely_held(self, hold: Hold) -> bool:
        """Whether the lease is surely still `hold`'s, by this process's clock alone (no
        storage call): True while more than a renewal tick of it is left, as it always
        is when renewals keep their pace. False once it is lost, or when this process
        fell behind — it was paused (SIGSTOP, a stalled VM) or could not renew — and the
        lease may have passed on meanwhile: the request's writes to Slack then wait
        (they could land on a takeover's notice), and a renewal is asked for at once,
        which says whether the lease is still ours (`confirm`)."""
        if hold.lost:
            return False
        if anyio.current_time() < hold.valid_until - self.lease_seconds / 3:
            return True
        if not hold.behind:
            hold.behind = True
            log.warning(
                "fell behind the lease on thread %s (%.1fs of it left by this clock): its writes wait for a renewal",
                hold.thread,
                hold.valid_until - anyio.current_time(),
            )
        self._renew_now.set()
        return False

    async def confirm(self, hold: Hold) -> bool:
        """Before a write that must not land once the lease passed on (a request's final
        text): True at once if it is surely held (`surely_held`), else after one renewal
        says so. Refused, or storage out of reach: the lease is lost (`on_lost` runs),
        and False."""
        if self.surely_held(hold):
            return True
        if hold.lost:
            return False
        asked = anyio.current_time()
        try:
            renewed = hold.thread in await self._store.renew_leases([(hold.thread, hold.fence)], ttl=self.lease_seconds)
        except StorageError as exc:
            self._lose(hold, f"could not confirm it after falling behind ({exc})")
            return False
        if not renewed:
            if not hold.lost:
                self._lose(hold, "another replica has it")
            return False
        hold.valid_until = max(hold.valid_until, asked + self.lease_seconds)
        hold.behind = False
        return True

    async def renew_all(self) -> None:
        """Renew every lease held, in one storage call (one transaction), so a tick
        costs one round trip however many requests run: renewed one by one, 400 holds
        at 30 ms each would take longer than the tick itself."""
        holds = [hold for hold in self._holds.values() if not hold.lost]
        if not holds:
            return
        asked = anyio.current_time()
        try:
            renewed = await self._store.renew_leases([(h.thread, h.fence) for h in holds], ttl=self.lease_seconds)
        except StorageError as exc:
            kept = 0
            for hold in holds:
                if hold.lost or self._holds.get(hold.thread) is not hold:  # (released meanwhile)
                    continue
                if anyio.current_time() + self.lease_seconds / 3 >= hold.valid_until:
                    # The next try would come after the lease may have passed on.
                    self._lose(hold, f"could not renew it before it may expire ({exc})")
                else:
                    kept += 1
            if kept:
                log.warning("could not renew %d thread lease(s), tried again at the next tick: %s", kept, exc)
            return
        for hold in holds:
            if hold.thread in renewed:
                hold.valid_until = max(hold.valid_until, asked + self.lease_seconds)
                hold.behind = False
            elif self._holds.get(hold.thread) is hold and not hold.lost:  # (else released, or told, meanwhile)
                self._lose(hold, "another replica has it")

    def _lose(self, hold: Hold, why: str) -> None:
        log.warning("lost the lease on thread %s: %s; stopping its request", hold.thread, why)
        hold.lost = True
        if hold.on_lost is not None:
            hold.on_lost()

    async def _release(self, hold: Hold) -> None:
        """Shielded and bounded: a cancelled request still gives its thread back, and a
        database that does not answer only delays the thread by the lease's expiry."""
        if hold.lost:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            try:
                await self._store.release_lease(hold.thread, hold.fence)
            except StorageError as exc:
                log.warning("could not release the lease on thread %s (it expires by itself): %s", hold.thread, exc)

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
