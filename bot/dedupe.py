"""Recently seen event keys, in memory: the fast half of "handle each event once".

Bounded by count and age, so it cannot grow without limit. Storage's `claim_event` is
the durable half (it survives restarts and, later, spans replicas).
"""

from __future__ import annotations

from collections import OrderedDict


class RecentKeys:
    def __init__(self, *, max_keys: int = 50_000, max_age: float = 3600.0) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._max_keys = max_keys
        self._max_age = max_age

    def add_all(self, keys: tuple[str, ...] | list[str], now: float) -> bool:
        """Record `keys`; True only if none of them was seen before."""
        fresh = not any(k in self._seen for k in keys)
        for k in keys:
            self._seen[k] = now
            self._seen.move_to_end(k)
        while len(self._seen) > self._max_keys:
            self._seen.popitem(last=False)
        return fresh

    def prune(self, now: float) -> int:
        dropped = 0
        while self._seen:
            key, seen_at = next(iter(self._seen.items()))
            if now - seen_at < self._max_age:
                break
            del self._seen[key]
            dropped += 1
        return dropped

    def __len__(self) -> int:
        return len(self._seen)
