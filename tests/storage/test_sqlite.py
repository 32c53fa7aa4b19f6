"""What only the SQLite engine has: the file, its schema version, its locks, its URLs."""

from __future__ import annotations

import contextlib
import multiprocessing
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from bot.storage import HistoryMessage, SQLStore, StorageError, StoreClosed, open_store
from bot.storage.sqlite import MIGRATIONS, _connect, open_sqlite
from tests.storage.conftest import WorkerCalls, failing_transaction, lease
from tests.storage.test_sql_store import THREAD, finish, start

pytestmark = pytest.mark.anyio


@pytest.fixture(params=[False, True], ids=["thread", "inline"])
def inline(request: pytest.FixtureRequest) -> bool:
    return request.param


@pytest.fixture
def db_path(tmp_path) -> str:
    return str(tmp_path / "data" / "bot.db")


@pytest.fixture
async def store(db_path: str, inline: bool):
    s = await open_sqlite(db_path, inline=inline)
    yield s
    await s.aclose()


def raw(db_path: str, sql: str, params: tuple = ()) -> list[tuple]:
    """Look at the file with a separate connection, as another process would."""
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def exchange_state(db_path: str) -> tuple[str, int]:
    """(status of r1, number of its messages) straight from the file."""
    [(status,)] = raw(db_path, "SELECT status FROM requests WHERE request_id = 'r1'")
    [(count,)] = raw(db_path, "SELECT COUNT(*) FROM messages WHERE request_id = 'r1'")
    return status, count


def assert_whole_or_nothing(db_path: str) -> tuple[str, int]:
    state = exchange_state(db_path)
    assert state in {("in_flight", 0), ("answered", 2)}, f"half-done exchange: {state}"
    return state


async def wait_until_busy(store: SQLStore) -> None:
    """Wait until a worker call holds the store's limiter (its transaction has begun)."""
    with anyio.fail_after(5):
        while store.database._limiter.borrowed_tokens == 0:
            await anyio.sleep(0.001)


# -- schema, lifecycle, errors -----------------------------------------------------------

OPENERS = 6  # processes opening one fresh file together (replicas started at once)


def _open_when_all_are_ready(path: str, barrier: Any) -> str:
    """In a process of its own: open `path` with the bot's set-up, as a replica starts."""
    barrier.wait()
    try:
        _connect(path).close()
    except StorageError as exc:
        return str(exc)
    return "ok"


def test_processes_opening_a_fresh_file_together_all_open_it(tmp_path) -> None:
    """Replicas started together on one SQLite file each switch it to WAL: on a fresh
    file SQLite refused some of them at once ("database is locked", in 1 trial in 3 of
    six processes), not waiting out the busy timeout. Each trial is a new file."""
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(OPENERS) as pool:
        for trial in range(8):
            barrier = manager.Barrier(OPENERS)
            path = str(tmp_path / f"{trial}.db")
            results = pool.starmap(_open_when_all_are_ready, [(path, barrier)] * OPENERS)
            assert results == ["ok"] * OPENERS, f"trial {trial}: {results}"
            assert raw(path, "PRAGMA journal_mode") == [("wal",)]


async def test_migrations_are_applied_once_and_reopen_is_idempotent(db_path: str, inline: bool) -> None:
    store = await open_sqlite(db_path, inline=inline)
    await start(store, "r1")
    await store.aclose()
    assert raw(db_path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    assert raw(db_path, "PRAGMA journal_mode") == [("wal",)]

    for _ in range(2):
        store = await open_sqlite(db_path, inline=inline)
        assert [r.request_id for r in await store.in_flight()] == ["r1"]  # data kept
        await store.aclose()
    assert raw(db_path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    tables = {name for (name,) in raw(db_path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"events", "threads", "requests", "messages"} <= tables


async def test_newer_schema_is_refused(db_path: str, inline: bool) -> None:
    store = await open_sqlite(db_path, inline=inline)
    await store.aclose()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StorageError, match="newer"):
        await open_sqlite(db_path, inline=inline)


async def test_corrupt_file_raises_storage_error(tmp_path, inline: bool) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database, just some bytes" * 100)
    with pytest.raises(StorageError, match="not a database"):
        await open_sqlite(str(path), inline=inline)


async def test_locked_database_raises_storage_error_and_store_recovers(store: SQLStore, db_path: str) -> None:
    store.database._conn.execute("PRAGMA busy_timeout=50")  # don't wait the default 5 s in a test
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with pytest.raises(StorageError, match="claim_event failed: database is locked") as info:
            await store.claim_event("Ev1")
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert await store.claim_event("Ev1") is True


async def test_aclose_waits_for_the_running_transaction(db_path: str) -> None:
    # Worker-thread mode only: inline calls never yield mid-transaction, so never overlap.
    store = await open_sqlite(db_path)
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.claim_event, "Ev1")
        await wait_until_busy(store)
        tg.start_soon(store.aclose)
        await anyio.sleep(0.05)
        other.execute("ROLLBACK")  # let the claim through; aclose runs after it
    other.close()
    assert raw(db_path, "SELECT key FROM events") == [("Ev1",)]
    with pytest.raises(StoreClosed):
        await store.claim_event("Ev2")


async def test_cancel_during_transaction_lets_it_complete(db_path: str) -> None:
    # Worker-thread mode only: an inline transaction never yields, so it cannot be
    # cancelled midway (the tests above cover cancelling it before it starts).
    store = await open_sqlite(db_path)
    await start(store, "r1")
    fence = await lease(store, THREAD)
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # the worker's BEGIN IMMEDIATE now waits on the lock
    scope = anyio.CancelScope()

    async def finish_in_scope() -> None:
        with scope:
            await finish(store, "r1", fence=fence)

    async with anyio.create_task_group() as tg:
        tg.start_soon(finish_in_scope)
        await wait_until_busy(store)
        scope.cancel()
        await anyio.sleep(0.05)
        assert exchange_state(db_path) == ("in_flight", 0)  # still waiting for the lock
        other.execute("ROLLBACK")
    other.close()
    assert scope.cancel_called
    # The cancellation reached the caller only after the whole transaction committed.
    assert assert_whole_or_nothing(db_path) == ("answered", 2)
    await store.aclose()


@contextlib.contextmanager
def write_lock_held(db_path: str) -> Iterator[sqlite3.Connection]:
    """Another connection holds the write lock, so the store's worker waits in BEGIN."""
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield other
    finally:
        if other.in_transaction:
            other.execute("ROLLBACK")
        other.close()


async def test_transactions_queued_behind_a_running_one_share_its_worker_call(db_path: str, monkeypatch) -> None:
    store = await open_sqlite(db_path)
    results: dict[str, bool] = {}

    async def claim(key: str) -> None:
        results[key] = await store.claim_event(key)

    with write_lock_held(db_path) as other:
        calls = WorkerCalls(monkeypatch)
        async with anyio.create_task_group() as tg:
            tg.start_soon(claim, "first")
            await wait_until_busy(store)
            for n in range(20):
                tg.start_soon(claim, f"queued-{n}")
            await anyio.sleep(0.05)
            assert results == {}  # all wait behind the lock
            other.execute("ROLLBACK")
    assert calls.count == 1  # one worker call ran all 21, each its own transaction
    assert results == {"first": True, **{f"queued-{n}": True for n in range(20)}}
    assert len(raw(db_path, "SELECT key FROM events")) == 21
    await store.aclose()


async def test_a_transaction_cancelled_while_queued_never_runs(db_path: str) -> None:
    store = await open_sqlite(db_path)
    scope = anyio.CancelScope()

    async def queued() -> None:
        with scope:
            await store.claim_event("never")

    with write_lock_held(db_path) as other:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.claim_event, "first")
            await wait_until_busy(store)
            tg.start_soon(queued)
            await anyio.sleep(0.02)
            scope.cancel()
            with anyio.fail_after(1):  # the caller leaves at once, the lock still held
                while not scope.cancelled_caught:
                    await anyio.sleep(0.005)
            other.execute("ROLLBACK")
    assert raw(db_path, "SELECT key FROM events") == [("first",)]
    await store.aclose()


class SlowToClose:
    """The store's connection, with a close() that takes a while (in the worker thread)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def close(self) -> None:
        time.sleep(0.2)
        self._conn.close()

    def __getattr__(self, name: str):
        return getattr(self._conn, name)


async def test_transactions_that_queue_while_the_store_closes_are_told_so(db_path: str) -> None:
    store = await open_sqlite(db_path)
    store.database._conn = SlowToClose(store.database._conn)
    outcomes: list[str] = []

    async def queued(key: str) -> None:
        try:
            await store.claim_event(key)
            outcomes.append("claimed")
        except StoreClosed:
            outcomes.append("closed")

    with anyio.fail_after(5):  # none is left waiting for a worker call that never comes
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.aclose)
            await wait_until_busy(store)  # closing, in the worker thread
            for n in range(3):
                tg.start_soon(queued, f"queued-{n}")
    assert outcomes == ["closed"] * 3


async def test_a_failing_transaction_in_a_batch_rolls_back_alone(db_path: str) -> None:
    store = await open_sqlite(db_path)

    with write_lock_held(db_path) as other:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.claim_event, "before")
            await wait_until_busy(store)
            tg.start_soon(failing_transaction, store)
            tg.start_soon(store.claim_event, "after")
            await anyio.sleep(0.02)
            other.execute("ROLLBACK")
    assert sorted(raw(db_path, "SELECT key FROM events")) == [("after",), ("before",)]
    await store.aclose()


# -- open_store ---------------------------------------------------------------------------


async def test_open_store_relative_path(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = await open_store("sqlite:///data/bot.db")
    try:
        assert isinstance(store, SQLStore)
        assert await store.claim_event("Ev1") is True
    finally:
        await store.aclose()
    assert raw(str(tmp_path / "data" / "bot.db"), "SELECT key FROM events") == [("Ev1",)]


async def test_open_store_absolute_path(tmp_path) -> None:
    path = tmp_path / "abs" / "bot.db"
    assert str(path).startswith("/")
    store = await open_store(f"sqlite:///{path}", inline=True)  # sqlite:////tmp/...
    try:
        await store.import_history(THREAD, [HistoryMessage("user", "hi", "1.0")])
    finally:
        await store.aclose()
    assert raw(str(path), "SELECT content FROM messages") == [("hi",)]


async def test_open_store_memory() -> None:
    store = await open_store("sqlite:///:memory:")
    try:
        await start(store, "r1")
        await finish(store, "r1")
        assert len(await store.load_history(THREAD)) == 2
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "mysql://localhost/bot",
        "sqlite://relative.db",
        "bot.db",
        "sqlite:///",
        "postgresql://user:pw@localhost",  # no database
        "postgresql:///bot",  # no host
    ],
)
async def test_open_store_rejects_other_urls(url: str) -> None:
    with pytest.raises(ValueError, match="DATABASE_URL"):
        await open_store(url)


def test_a_rejected_url_never_shows_its_password() -> None:
    from bot.storage.location import locate

    for url in ("postgresql://user:s3cret@localhost", "mysql://user:s3cret@db/bot"):
        with pytest.raises(ValueError) as info:
            locate(url)
        assert "s3cret" not in str(info.value)


async def test_a_database_from_before_replicas_is_upgraded_in_place(db_path: str) -> None:
    """A file at schema 3 (the last one before replicas) keeps its data under the new names."""
    import os

    os.makedirs(os.path.dirname(db_path), exist_ok=True)
    conn = sqlite3.connect(db_path)
    for script in MIGRATIONS[:3]:
        conn.executescript(script)
    conn.execute(
        "INSERT INTO ux_preferences (scope, scope_key, prefs, updated_at) VALUES ('user', 'U1', '{\"a\": 1}', 0)"
    )
    conn.execute("INSERT INTO ux_once (kind, once_key, claimed_at) VALUES ('welcome', 'U1', 0)")
    conn.execute("INSERT INTO threads VALUES ('C1', '1.0', 0)")
    conn.execute(
        "INSERT INTO requests (request_id, channel, thread_ts, user_ts, placeholder_ts, status, started_at)"
        " VALUES ('old', 'C1', '1.0', '1.0', '2.0', 'in_flight', 5)"
    )
    conn.execute("PRAGMA user_version=3")
    conn.commit()
    conn.close()
    store = await open_sqlite(db_path)
    try:
        assert (await store.load_preferences("U1", None)).user == {"a": 1}
        assert await store.claim_once("welcome", "U1") is False
        # A request from before replicas has no owner and no lease: abandoned, so recovered.
        assert [r.request_id for r in await store.abandoned_requests(replica_timeout=30)] == ["old"]
    finally:
        await store.aclose()
    assert raw(db_path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
