"""Every store test runs on each engine: SQLite in worker-thread mode, SQLite inline
(as the simulation uses it) and PostgreSQL (a fresh database per test), each on both
Trio and asyncio."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

import pytest

from bot.storage import SQLStore, ThreadKey
from bot.storage.sqlite import open_sqlite
from tests.postgres import fresh_database

Opener = Callable[[], Awaitable[SQLStore]]


@pytest.fixture(params=["sqlite", "sqlite-inline", "postgres"])
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def db_path(tmp_path) -> str:
    return str(tmp_path / "data" / "bot.db")  # the "data" directory does not exist yet


@pytest.fixture
def reopen(engine: str, db_path: str) -> Iterator[Opener]:
    """Opens the test's database (again): what a restarted process or another replica does."""
    if engine == "postgres":
        from bot.storage.postgres import open_postgres

        databases = fresh_database()
        url = next(databases)

        async def open_pg() -> SQLStore:
            return await open_postgres(url, pool_size=4)

        yield open_pg
        databases.close()
        return

    async def open_file() -> SQLStore:
        return await open_sqlite(db_path, inline=engine == "sqlite-inline")

    yield open_file


@pytest.fixture
async def store(reopen: Opener):
    s = await reopen()
    yield s
    await s.aclose()


async def raw(store: SQLStore, sql: str, params: tuple = ()) -> list[tuple]:
    """Look at the tables directly, in the store's own engine."""
    return await store.database.transaction(
        "raw", lambda conn: [tuple(r) for r in conn.execute(sql, params).fetchall()]
    )


async def lease(store: SQLStore, thread: ThreadKey, owner: str = "replica-a") -> int:
    """The thread's lease for `owner`: the one it holds, or one taken now."""
    held = await raw(
        store,
        "SELECT token FROM thread_leases WHERE channel = ? AND thread_ts = ? AND owner = ? AND expires_at > bot_now()",
        (thread.channel, thread.thread_ts, owner),
    )
    if held:
        return int(held[0][0])
    token = await store.acquire_lease(thread, owner, ttl=600)
    assert token is not None, f"{thread} is leased to someone else"
    return token


class WorkerCalls:
    """Counts `anyio.to_thread.run_sync` calls while installed (`monkeypatch`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import anyio.to_thread

        self.count = 0
        real = anyio.to_thread.run_sync

        async def counted(*args, **kwargs):
            self.count += 1
            return await real(*args, **kwargs)

        monkeypatch.setattr(anyio.to_thread, "run_sync", counted)


async def failing_transaction(store: SQLStore) -> None:
    """A transaction that inserts a row, then fails: nothing of it may stay."""

    def insert_then_fail(conn) -> None:
        conn.execute("INSERT INTO events (key, claimed_at) VALUES ('half', 0)")
        raise ValueError("the body failed")

    with pytest.raises(ValueError, match="the body failed"):
        await store.database.transaction("failing", insert_then_fail)
