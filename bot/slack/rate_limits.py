"""Slack's rate limits, kept on our side: one budget per Web API method for the whole
process, shared by every request, and one `Retry-After` per method honoured by all callers.

Why here and not per call: Slack limits each method per workspace (Tier 2 ≈ 20 calls a
minute, Tier 3 ≈ 50, Tier 4 ≈ 100; `chat.postMessage` about one a second per channel).
A bot that paces each answer on its own, and retries its own 429s, spends most of its
calls inside windows Slack has already announced, and its final writes lose the race.

Each budget is a GCRA ("virtual scheduling") bucket: `_tat` is the time at which the
bucket would be full again after every call let out so far. Callers that must wait queue
in order; only the first sleeps (until the bucket lets one more call out), and each call
let out wakes the next, so nobody polls. A slot is handed out when the call goes, never
promised ahead, so every call of the bucket — in whatever order — passes the one GCRA
test and the method's rate is never exceeded. A 429 moves `_tat` past the announced
window: nobody calls that method again before it ends. The bursts we allow are smaller
than the ones Slack tolerates, at the same rate, so a lone process never meets a 429 it
caused itself; restarts and other apps' calls still can, and are handled.

Three ways to draw on a budget:
- `acquire` (final writes, notices, everything that must get through): wait for a slot,
  inside the caller's cancel scope, so the request's deadline still wins;
- `acquire(priority=True)` (the takeover of a dead replica's requests, whose users see
  "Thinking…" until it is done): the same, but ahead of every waiter without priority,
  so it waits for the next slot, not for the queue; and it may go one call beyond our
  burst (Slack tolerates larger bursts than ours; never inside a Retry-After window), so
  a takeover's first call of a method does not wait out the slot this replica's own
  answers just used — on a Tier 2 method split between replicas, that is 6–9 s. The
  call borrowed is never given back while priority callers keep coming: they stay one
  call ahead of the others, who wait one slot longer each, and the rate is the same;
- `try_acquire` (interim updates of a streaming answer): take a slot only while the
  bucket is at least half full, otherwise skip. As the workspace gets busier, interim
  updates thin out on their own and the final writes keep the rest.
`commit`/`uncommit` count final writes that in-flight answers will need, so a new
answer starts with a placeholder only while there is room for its final edit.

Slack's budgets are the workspace's, and replicas share them: `share(n)` runs every
budget at 1/n of Slack's rate (n = replicas with a fresh heartbeat, set by
`bot.replica.keep_alive`), so that together they stay under the tiers (chat.postMessage's
per-channel budget excepted: a channel's threads are mostly on one replica). An exact shared
budget would need a round trip to the database per Slack call; the split is the cheap
approximation, and a 429 is still honoured if the others' share of the work is uneven.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import anyio

# Calls per minute, from Slack's method reference (docs.slack.dev, "Rate limits").
TIER_PER_MINUTE = {2: 20, 3: 50, 4: 100}
METHOD_TIERS: dict[str, int] = {
    "chat.startStream": 2,
    "chat.stopStream": 2,
    "chat.update": 3,
    "chat.delete": 3,
    "conversations.replies": 3,
    "conversations.history": 3,
    "apps.connections.open": 3,
    "reactions.add": 3,
    "chat.appendStream": 4,
    "chat.postEphemeral": 4,
    "views.open": 4,
    "views.update": 4,
    "views.push": 4,
    "views.publish": 4,
    "users.info": 4,
    "files.info": 4,
    "files.getUploadURLExternal": 4,
    "files.completeUploadExternal": 4,
    "assistant.threads.setTitle": 4,
    "assistant.threads.setSuggestedPrompts": 4,
    # Slack calls setStatus "Special" and gives no figure; we budget it as Tier 4.
    "assistant.threads.setStatus": 4,
}
POST_MESSAGE_PER_SECOND = 1.0  # chat.postMessage: about one a second per channel
OUR_BURST_SECONDS = 6.0  # our bursts: the calls of this many seconds (Slack tolerates more)
POST_MESSAGE_BURST = 3
UNLIMITED_PER_SECOND, UNLIMITED_BURST = 1000.0, 1000  # methods without a tier (auth.test, …)
MAX_CHANNEL_BUCKETS = 2000  # per-channel postMessage budgets kept; full ones are dropped first


class _Waiter:
    """A caller queued for a slot; `turn` is set when it may look again (it is first now,
    or the head it was behind changed)."""

    __slots__ = ("priority", "turn")

    def __init__(self, priority: bool) -> None:
        self.priority = priority
        self.turn = anyio.Event()


class Bucket:
    """One method's budget (or one channel's, for chat.postMessage)."""

    def __init__(self, per_second: float, burst: int, clock: Callable[[], float]) -> None:
        self.interval = 1.0 / per_second
        self.tolerance = (max(1, burst) - 1) * self.interval
        self._clock = clock
        self._tat = -math.inf
        self._queue: list[_Waiter] = []  # callers waiting for a slot: priority first, then in order
        self._closed_until = -math.inf  # the end of Slack's last Retry-After window
        self.committed = 0  # final writes promised to answers in flight (see module doc)

    def available(self) -> int:
        """How many calls could go out right now (the queued callers' first)."""
        now = self._clock()
        room = now + self.tolerance - max(self._tat, now)
        free = 0 if room < -1e-6 else int(room / self.interval + 1e-6) + 1
        return max(0, free - len(self._queue))

    @property
    def burst(self) -> int:
        return round(self.tolerance / self.interval) + 1

    @property
    def waiting(self) -> int:
        """Callers queued for a slot."""
        return len(self._queue)

    def reserve(self) -> float:
        """Take the next slot; returns how long to wait for it (0: go now). (`acquire`
        takes its slot only when it may go; `try_acquire` only when there is room.)"""
        now = self._clock()
        tat = max(self._tat, now)
        self._tat = tat + self.interval
        wait = tat - self.tolerance - now
        return wait if wait > 1e-6 else 0.0

    def _due(self, priority: bool = False) -> float:
        """Seconds until one more call may go out (0: now); for a priority caller, one
        call beyond our burst, but never before a Retry-After window ends."""
        now = self._clock()
        wait = max(self._tat, now) - self.tolerance - now
        if priority:
            wait = max(wait - self.interval, self._closed_until - now)
        return wait if wait > 1e-6 else 0.0

    def wait_time(self) -> float:
        """Seconds a new caller without priority would wait (behind those queued)."""
        now = self._clock()
        wait = max(self._tat, now) + len(self._queue) * self.interval - self.tolerance - now
        return wait if wait > 1e-6 else 0.0

    async def acquire(self, *, priority: bool = False) -> None:
        """Wait for a slot, behind the callers queued before (with `priority`: behind the
        queued priority callers only). Cancelled, it leaves the queue having taken nothing."""
        if not self._queue and self._due(priority) <= 0:
            self.reserve()
            return
        waiter = _Waiter(priority)
        self._enqueue(waiter)
        try:
            while True:
                if self._queue[0] is waiter:
                    wait = self._due(priority)
                    if wait <= 0:
                        break
                    with anyio.move_on_after(wait):  # (woken sooner if a priority caller goes first)
                        await waiter.turn.wait()
                else:
                    await waiter.turn.wait()
                waiter.turn = anyio.Event()
        except BaseException:
            self._leave(waiter)
            raise
        self._queue.pop(0)
        self.reserve()
        self._wake_first()

    def _enqueue(self, waiter: _Waiter) -> None:
        if not waiter.priority:
            self._queue.append(waiter)
            return
        at = next((i for i, w in enumerate(self._queue) if not w.priority), len(self._queue))
        self._queue.insert(at, waiter)
        if at == 0 and len(self._queue) > 1:
            self._queue[1].turn.set()  # the one it displaced stops sleeping on the clock

    def _leave(self, waiter: _Waiter) -> None:
        first = bool(self._queue) and self._queue[0] is waiter
        self._queue.remove(waiter)
        if first:
            self._wake_first()

    def _wake_first(self) -> None:
        if self._queue:
            self._queue[0].turn.set()

    def block(self, seconds: float) -> None:
        """Slack said `Retry-After: seconds`: no slot before then, and the bucket is empty."""
        self._closed_until = max(self._closed_until, self._clock() + seconds)
        self._tat = max(self._tat, self._closed_until + self.tolerance)

    def set_rate(self, per_second: float, burst: int) -> None:
        """A new rate and burst from now on (the calls already out stay counted). A bucket
        empty now (or closed by a Retry-After) lets its next call out when it would have:
        a larger burst must not open a Retry-After window early, nor a smaller one push
        the window's end later."""
        next_call = self._tat - self.tolerance
        self.interval = 1.0 / per_second
        self.tolerance = (max(1, burst) - 1) * self.interval
        if next_call > self._clock():
            self._tat = next_call + self.tolerance
        self._wake_first()  # the first in the queue may go sooner (or later) now

    def full(self) -> bool:
        return self._tat <= self._clock() and not self.committed and not self._queue


class SlackRateLimits:
    """The budgets of one process, by method (and by channel for chat.postMessage)."""

    def __init__(self, *, clock: Callable[[], float] = anyio.current_time) -> None:
        self._clock = clock
        self._methods: dict[str, Bucket] = {}
        self._channels: dict[str, Bucket] = {}
        self.shared_by = 1  # replicas drawing on the workspace's budgets (see `share`)

    def share(self, replicas: int) -> None:
        """From now on, this process takes 1/`replicas` of each of Slack's budgets."""
        replicas = max(1, replicas)
        if replicas == self.shared_by:
            return
        self.shared_by = replicas
        for method, bucket in self._methods.items():
            bucket.set_rate(*self._pace(method))

    def _pace(self, method: str) -> tuple[float, int]:
        """(calls per second, burst) of this process's share of `method`'s budget."""
        n = self.shared_by
        if method == "chat.postMessage":
            # Per channel, and a channel's threads are mostly on one replica at a time:
            # not split (splitting it would hold back the placeholder after a welcome).
            return POST_MESSAGE_PER_SECOND, POST_MESSAGE_BURST
        tier = METHOD_TIERS.get(method)
        if tier is None:  # not budgeted, but a Retry-After still closes it to every caller
            return UNLIMITED_PER_SECOND, UNLIMITED_BURST
        per_minute = TIER_PER_MINUTE[tier]
        burst = max(2, int(per_minute * OUR_BURST_SECONDS / 60))
        return per_minute / 60.0 / n, max(1, burst // n)

    def bucket(self, method: str, channel: str | None = None) -> Bucket | None:
        """The budget a call to `method` draws on; None for methods we do not limit."""
        if method == "chat.postMessage":
            key = channel or ""
            found = self._channels.get(key)
            if found is None:
                if len(self._channels) >= MAX_CHANNEL_BUCKETS:
                    self._channels = {k: b for k, b in self._channels.items() if not b.full()}
                found = self._channels[key] = Bucket(*self._pace(method), self._clock)
            return found
        found = self._methods.get(method)
        if found is None:
            found = self._methods[method] = Bucket(*self._pace(method), self._clock)
        return found

    async def acquire(self, method: str, channel: str | None = None, *, priority: bool = False) -> None:
        """Wait for a slot (inside the caller's cancel scope); with `priority`, ahead of
        every caller without it."""
        bucket = self.bucket(method, channel)
        if bucket is not None:
            await bucket.acquire(priority=priority)

    def try_acquire(self, method: str, channel: str | None = None) -> bool:
        """Take a slot now if the budget is at least half full after the promised final
        writes; else False and nothing is taken (an interim update is skipped)."""
        bucket = self.bucket(method, channel)
        if bucket is None:
            return True
        if bucket.available() - bucket.committed < max(1, (bucket.burst + 1) // 2):
            return False
        bucket.reserve()
        return True

    def has_room_for(self, method: str, channel: str | None = None, *, calls: int = 1) -> bool:
        """Whether `calls` more calls (beyond the final writes already promised) could go
        out now, without taking any."""
        bucket = self.bucket(method, channel)
        return bucket is None or bucket.available() - bucket.committed >= calls

    def commit(self, method: str) -> None:
        """An answer in flight will need one final call of `method`."""
        bucket = self.bucket(method)
        if bucket is not None:
            bucket.committed += 1

    def uncommit(self, method: str) -> None:
        bucket = self.bucket(method)
        if bucket is not None and bucket.committed > 0:
            bucket.committed -= 1

    def retry_after(self, method: str, channel: str | None, seconds: float) -> None:
        """Slack answered 429 with `Retry-After: seconds`: every caller waits it out."""
        bucket = self.bucket(method, channel)
        if bucket is not None:
            bucket.block(seconds)

    def wait_time(self, method: str, channel: str | None = None) -> float:
        """Seconds until a new caller's slot (0 when one is free now); takes nothing."""
        bucket = self.bucket(method, channel)
        return 0.0 if bucket is None else bucket.wait_time()
