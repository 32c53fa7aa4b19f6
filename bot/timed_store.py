"""`TimedStore`: any `Store`, with each call's latency recorded in the metrics.

A decorator object rather than an edit to each store: `TimedStore(store, metrics)` has
the same methods as `store` (every coroutine method is wrapped, including ones added to
the interface later) and observes `slackbot_storage_call_seconds{method=...}` for each
call, whether it returns, raises or is cancelled. Attributes that are not coroutine
methods pass straight through.
"""

from __future__ import annotations

import inspect
import time
from functools import wraps
from typing import Any

from bot.metrics import Metrics
from bot.storage.base import Store


class TimedStore:
    def __init__(self, store: Store, metrics: Metrics) -> None:
        self.inner = store
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(attr):
            return attr
        histogram = self._metrics.storage_latency.labels(method=name)

        @wraps(attr)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await attr(*args, **kwargs)
            finally:
                histogram.observe(time.perf_counter() - started)

        setattr(self, name, timed)  # built once per method; later lookups skip __getattr__
        return timed
