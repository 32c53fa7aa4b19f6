"""The PostgreSQL engine's worker calls: transactions that queue while every connection
is busy are run by the worker calls already running, each its own transaction; one
cancelled while queued never runs; a failing one rolls back alone; callers queued while
the store closes are told so. On a fresh database per test, Trio and asyncio."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import anyio.to_thread
import psycopg
import pytest

from bot.storage import SQLStore, StoreClosed
from bot.storage.postgres import open_postgres
from tests.postgres import fresh_database
from tests.storage.conftest import WorkerCalls, failing_transaction

pytestmark = pytest.mark.anyio

POOL = 2


@pytest.fixture
def url() -> Iterator[str]:
    databases = fresh_database()
    yield next(databases)
    databases.close()


@pytest.fixture
async def store(url: str):
    s = await open_postgres(url, pool_size=POOL)
    yield s
    await s.aclose()


@contextmanager
def events_locked(url: str) -> Iterator[psycopg.Connection]:
    """Another client holds a lock on `events` that every claim waits for (shorter than
    the store's lock_timeout); `ROLLBACK` on the connection yielded lets them go."""
    other = psycopg.connect(url)
    try:
        other.execute("LOCK TABLE events IN EXCLUSIVE MODE")
        yield other
    finally:
        other.rollback()
        other.close()


async def busy(store: SQLStore, n: int) -> None:
    """Until `n` worker calls run (each on a connection)."""
    limiter = store.database._limiter  # type: ignore[attr-defined]
    with anyio.fail_after(5):
        while limiter.borrowed_tokens < n:
            await anyio.sleep(0.005)


async def queue_behind_busy_connections(tg, store: SQLStore, claim, queued: int) -> None:
    """A claim on every connection (each held by the lock), then `queued` more behind them."""
    for n in range(POOL):
        tg.start_soon(claim, f"first-{n}")
    await busy(store, POOL)
    for n in range(queued):
        tg.start_soon(claim, f"queued-{n}")


async def keys(url: str) -> list[str]:
    def read() -> list[str]:
        with psycopg.connect(url) as conn:
            return [row[0] for row in conn.execute("SELECT key FROM events ORDER BY key").fetchall()]

    return await anyio.to_thread.run_sync(read)


async def test_transactions_queued_behind_busy_connections_share_their_worker_calls(url, store, monkeypatch):
    results: dict[str, bool] = {}

    async def claim(key: str) -> None:
        results[key] = await store.claim_event(key)

    with events_locked(url) as other:
        calls = WorkerCalls(monkeypatch)
        async with anyio.create_task_group() as tg:
            await queue_behind_busy_connections(tg, store, claim, 20)
            await anyio.sleep(0.05)
            assert results == {}  # all wait behind the lock
            other.rollback()
        monkeypatch.undo()
    assert calls.count < 22 // 2  # a few worker calls ran all 22, each its own transaction (one each before)
    assert results == {**{f"first-{n}": True for n in range(POOL)}, **{f"queued-{n}": True for n in range(20)}}
    assert len(await keys(url)) == 22


async def test_a_transaction_cancelled_while_queued_never_runs(url, store):
    scope = anyio.CancelScope()

    async def queued() -> None:
        with scope:
            await store.claim_event("never")

    with events_locked(url) as other:
        async with anyio.create_task_group() as tg:
            for n in range(POOL):
                tg.start_soon(store.claim_event, f"first-{n}")
            await busy(store, POOL)
            tg.start_soon(queued)
            await anyio.sleep(0.02)
            scope.cancel()
            with anyio.fail_after(1):  # the caller leaves at once, the lock still held
                while not scope.cancelled_caught:
                    await anyio.sleep(0.005)
            other.rollback()
    assert await keys(url) == [f"first-{n}" for n in range(POOL)]


async def test_a_failing_transaction_in_a_batch_rolls_back_alone(url, store):
    with events_locked(url) as other:
        async with anyio.create_task_group() as tg:
            for n in range(POOL):
                tg.start_soon(store.claim_event, f"first-{n}")
            await busy(store, POOL)
            tg.start_soon(store.claim_event, "before")
            tg.start_soon(failing_transaction, store)
            tg.start_soon(store.claim_event, "after")
            await anyio.sleep(0.05)
            other.rollback()
    assert await keys(url) == ["after", "before", "first-0", "first-1"]


async def test_transactions_queued_while_the_store_closes_are_told_so(url, store, monkeypatch):
    """Queued behind the two busy connections as the store closes; the worker calls,
    held by the lock past their time for more, run only the transactions they took
    first: the queued ones are told the store is closed, none is left waiting for a
    worker call that never comes."""
    monkeypatch.setattr("bot.storage.postgres.MAX_BATCH_SECONDS", 0.01)
    outcomes: dict[str, str] = {}

    async def claim(key: str) -> None:
        try:
            await store.claim_event(key)
            outcomes[key] = "claimed"
        except StoreClosed:
            outcomes[key] = "closed"

    with events_locked(url) as other, anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await queue_behind_busy_connections(tg, store, claim, 3)
            await anyio.sleep(0.02)
            tg.start_soon(store.aclose)  # it waits for the two running worker calls
            await anyio.sleep(0.02)
            other.rollback()
    assert outcomes == {
        **{f"first-{n}": "claimed" for n in range(POOL)},
        **{f"queued-{n}": "closed" for n in range(3)},
    }
