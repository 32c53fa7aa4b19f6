"""Transactions queued for worker calls, shared by both engines (`sqlite`, `postgres`).

Handing one transaction to a worker thread and back costs more than the transaction,
so each engine lets the transactions that queue while its worker calls are busy be run
by those calls. What a caller does is the same for both, and lives here: it queues its
`Job`, waits for some worker call to run it, and if cancelled while the job is still
queued takes it out (it never runs); once a worker has it, the caller waits for it to
finish and sees the cancellation after. (`deque.remove` and a worker's `popleft` are
each atomic under the GIL: exactly one of them gets the job.)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

import anyio

T = TypeVar("T")


@dataclass(eq=False)
class Job(Generic[T]):
    """One transaction waiting for, or run by, a worker call."""

    operation: str
    body: Callable[[Any], T]
    write: bool = True
    taken: bool = False  # a worker call has it (set just after it left the queue)
    done: anyio.Event = field(default_factory=anyio.Event)
    result: T | None = None
    error: BaseException | None = None


async def run_queued(queue: deque[Job[Any]], job: Job[T], run_queue: Callable[[Job[Any]], Awaitable[None]]) -> T:
    """Queue `job`, wait (`run_queue`) until a worker call has run it, and return its
    result or raise its error."""
    queue.append(job)
    try:
        await run_queue(job)
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            try:
                queue.remove(job)  # not taken yet: it never runs
            except ValueError:
                await job.done.wait()  # running or run: let it finish first
        raise
    if job.error is not None:
        raise job.error
    return cast(T, job.result)
