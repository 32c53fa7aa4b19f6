"""The SQLite store, on both Trio and asyncio (AnyIO's pytest plugin runs every test on
each backend), in worker-thread and inline mode."""

from __future__ import annotations

import sqlite3
import time

import anyio
import pytest

from bot.storage import (
    HistoryMessage,
    InFlightRequest,
    SQLiteStore,
    StorageError,
    StoreClosed,
    ThreadKey,
    open_store,
)
from bot.storage.sqlite import MIGRATIONS

pytestmark = pytest.mark.anyio

THREAD = ThreadKey("C1", "1700000000.000100")
OTHER = ThreadKey("C2", "1700000000.000200")


@pytest.fixture(params=[False, True], ids=["thread", "inline"])
def inline(request: pytest.FixtureRequest) -> bool:
    return request.param


@pytest.fixture
def db_path(tmp_path) -> str:
    return str(tmp_path / "data" / "bot.db")  # the "data" directory does not exist yet


@pytest.fixture
async def store(db_path: str, inline: bool):
    s = await SQLiteStore.open(db_path, inline=inline)
    yield s
    await s.aclose()


def raw(db_path: str, sql: str, params: tuple = ()) -> list[tuple]:
    """Look at the file with a separate connection, as another process would."""
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


async def start(store: SQLiteStore, request_id: str, thread: ThreadKey = THREAD, started_at: float = 1.0) -> None:
    await store.start_request(
        request_id, thread, user_ts=f"u-{request_id}", placeholder_ts=f"p-{request_id}", started_at=started_at
    )


async def finish(store: SQLiteStore, request_id: str, outcome: str = "answered", reply: str = "answer") -> None:
    await store.finish_request(
        request_id,
        outcome=outcome,
        user_text=f"question {request_id}",
        user_ts=f"u-{request_id}",
        reply_text=reply,
        finished_at=2.0,
        detail="" if outcome == "answered" else f"{outcome} detail",
    )


# -- events ----------------------------------------------------------------------------


async def test_claim_event_is_idempotent_and_survives_reopen(db_path: str, inline: bool) -> None:
    store = await SQLiteStore.open(db_path, inline=inline)
    assert await store.claim_event("Ev1") is True
    assert await store.claim_event("Ev1") is False
    assert await store.claim_event("C1:1700000000.000100") is True
    await store.aclose()

    reopened = await SQLiteStore.open(db_path, inline=inline)
    try:
        assert await reopened.claim_event("Ev1") is False  # dedupe survives a restart
        assert await reopened.claim_event("C1:1700000000.000100") is False
        assert await reopened.claim_event("Ev2") is True
    finally:
        await reopened.aclose()


async def test_concurrent_claims_of_one_key_have_exactly_one_winner(store: SQLiteStore) -> None:
    results: list[bool] = []

    async def claim() -> None:
        results.append(await store.claim_event("EvRace"))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(claim)
    assert sorted(results) == [False] * 9 + [True]


async def test_prune_events_forgets_only_old_claims(store: SQLiteStore, db_path: str) -> None:
    before = time.time()
    assert await store.claim_event("old")
    # Backdate one claim with a second connection, as if it were a day old.
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute("UPDATE events SET claimed_at = ? WHERE key = 'old'", (before - 86400,))
    conn.close()
    assert await store.claim_event("new")

    assert await store.prune_events(before - 3600) == 1
    assert await store.prune_events(before - 3600) == 0
    assert await store.claim_event("old") is True  # forgotten, so claimable again
    assert await store.claim_event("new") is False  # kept


# -- threads and history ---------------------------------------------------------------


async def test_start_request_marks_thread_known(store: SQLiteStore) -> None:
    assert await store.thread_known(THREAD) is False
    await start(store, "r1")
    assert await store.thread_known(THREAD) is True
    assert await store.thread_known(OTHER) is False


async def test_history_is_oldest_first_and_only_answered_exchanges_are_in_context(
    store: SQLiteStore, db_path: str
) -> None:
    for n, outcome in enumerate(["answered", "timeout", "answered", "error", "interrupted"]):
        await start(store, f"r{n}", started_at=float(n))
        await finish(store, f"r{n}", outcome=outcome, reply=f"reply {n}")

    assert await store.load_history(THREAD) == [
        HistoryMessage("user", "question r0", "u-r0"),
        HistoryMessage("assistant", "reply 0", "p-r0"),
        HistoryMessage("user", "question r2", "u-r2"),
        HistoryMessage("assistant", "reply 2", "p-r2"),
    ]
    assert await store.load_history(OTHER) == []
    # The failed exchanges are kept for the record, out of context, with their outcome.
    assert raw(
        db_path,
        "SELECT m.role, m.content, m.in_context, r.status, r.detail FROM messages m"
        " JOIN requests r USING (request_id) WHERE r.status != 'answered' ORDER BY m.id",
    ) == [
        ("user", "question r1", 0, "timeout", "timeout detail"),
        ("assistant", "reply 1", 0, "timeout", "timeout detail"),
        ("user", "question r3", 0, "error", "error detail"),
        ("assistant", "reply 3", 0, "error", "error detail"),
        ("user", "question r4", 0, "interrupted", "interrupted detail"),
        ("assistant", "reply 4", 0, "interrupted", "interrupted detail"),
    ]


async def test_empty_reply_stores_only_the_user_message(store: SQLiteStore, db_path: str) -> None:
    await start(store, "r1")
    await finish(store, "r1", outcome="error", reply="")
    assert raw(db_path, "SELECT role, content FROM messages") == [("user", "question r1")]


async def test_finish_request_twice_is_a_no_op(store: SQLiteStore, db_path: str) -> None:
    await start(store, "r1")
    await finish(store, "r1", outcome="answered", reply="first")
    await finish(store, "r1", outcome="error", reply="second")

    assert await store.load_history(THREAD) == [
        HistoryMessage("user", "question r1", "u-r1"),
        HistoryMessage("assistant", "first", "p-r1"),
    ]
    assert raw(db_path, "SELECT COUNT(*) FROM messages") == [(2,)]
    assert raw(db_path, "SELECT status, finished_at FROM requests") == [("answered", 2.0)]


async def test_finish_unknown_request_changes_nothing(store: SQLiteStore, db_path: str) -> None:
    await finish(store, "nope")
    assert raw(db_path, "SELECT COUNT(*) FROM messages") == [(0,)]
    assert raw(db_path, "SELECT COUNT(*) FROM requests") == [(0,)]


async def test_finish_request_rejects_an_unknown_outcome(store: SQLiteStore) -> None:
    await start(store, "r1")
    with pytest.raises(ValueError, match="outcome"):
        await finish(store, "r1", outcome="exploded")
    assert [r.request_id for r in await store.in_flight()] == ["r1"]


async def test_import_history_seeds_unknown_thread_once(store: SQLiteStore) -> None:
    imported = [HistoryMessage("user", "hi", "1.1"), HistoryMessage("assistant", "hello", "1.2")]
    await store.import_history(THREAD, imported)
    assert await store.thread_known(THREAD) is True
    assert await store.load_history(THREAD) == imported

    # A second import (e.g. a concurrent rebuild) must not duplicate anything.
    await store.import_history(THREAD, [HistoryMessage("user", "other", "9.9")])
    assert await store.load_history(THREAD) == imported

    # New exchanges append after the imported history.
    await start(store, "r1")
    await finish(store, "r1")
    assert [m.content for m in await store.load_history(THREAD)] == ["hi", "hello", "question r1", "answer"]


async def test_import_history_is_a_no_op_when_the_thread_has_history(store: SQLiteStore) -> None:
    await start(store, "r1")
    await finish(store, "r1")
    await store.import_history(THREAD, [HistoryMessage("user", "from slack", "0.1")])
    assert [m.content for m in await store.load_history(THREAD)] == ["question r1", "answer"]


async def test_import_empty_history_marks_thread_known(store: SQLiteStore) -> None:
    await store.import_history(OTHER, [])
    assert await store.thread_known(OTHER) is True
    assert await store.load_history(OTHER) == []


# -- in-flight requests ----------------------------------------------------------------


async def test_in_flight_lists_unfinished_requests_oldest_first(store: SQLiteStore) -> None:
    await start(store, "late", started_at=20.0)
    await start(store, "early", thread=OTHER, started_at=10.0)
    await start(store, "done", started_at=5.0)
    await finish(store, "done")

    assert await store.in_flight() == [
        InFlightRequest("early", OTHER, "p-early", 10.0),
        InFlightRequest("late", THREAD, "p-late", 20.0),
    ]
    await finish(store, "early", outcome="interrupted")
    assert [r.request_id for r in await store.in_flight()] == ["late"]


async def test_in_flight_survives_a_crash(db_path: str, inline: bool) -> None:
    store = await SQLiteStore.open(db_path, inline=inline)
    await start(store, "r1", started_at=3.0)
    await store.aclose()  # the process "dies" without finishing r1

    reopened = await SQLiteStore.open(db_path, inline=inline)
    try:
        assert await reopened.in_flight() == [InFlightRequest("r1", THREAD, "p-r1", 3.0)]
        assert await reopened.thread_known(THREAD) is True
        await finish(reopened, "r1", outcome="interrupted", reply="")
        assert await reopened.in_flight() == []
        assert await reopened.load_history(THREAD) == []  # not answered: out of context
    finally:
        await reopened.aclose()


async def test_duplicate_start_request_raises_storage_error(store: SQLiteStore) -> None:
    await start(store, "r1")
    with pytest.raises(StorageError, match="start_request failed"):
        await start(store, "r1")
    assert len(await store.in_flight()) == 1  # the store is still usable


# -- schema, lifecycle, errors -----------------------------------------------------------


async def test_migrations_are_applied_once_and_reopen_is_idempotent(db_path: str, inline: bool) -> None:
    store = await SQLiteStore.open(db_path, inline=inline)
    await start(store, "r1")
    await store.aclose()
    assert raw(db_path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    assert raw(db_path, "PRAGMA journal_mode") == [("wal",)]

    for _ in range(2):
        store = await SQLiteStore.open(db_path, inline=inline)
        assert [r.request_id for r in await store.in_flight()] == ["r1"]  # data kept
        await store.aclose()
    assert raw(db_path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    tables = {name for (name,) in raw(db_path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"events", "threads", "requests", "messages"} <= tables


async def test_newer_schema_is_refused(db_path: str, inline: bool) -> None:
    store = await SQLiteStore.open(db_path, inline=inline)
    await store.aclose()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StorageError, match="newer"):
        await SQLiteStore.open(db_path, inline=inline)


async def test_corrupt_file_raises_storage_error(tmp_path, inline: bool) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database, just some bytes" * 100)
    with pytest.raises(StorageError, match="not a database"):
        await SQLiteStore.open(str(path), inline=inline)


async def test_locked_database_raises_storage_error_and_store_recovers(store: SQLiteStore, db_path: str) -> None:
    store._conn.execute("PRAGMA busy_timeout=50")  # don't wait the default 5 s in a test
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


async def test_calls_after_aclose_raise_store_closed(db_path: str, inline: bool) -> None:
    store = await SQLiteStore.open(db_path, inline=inline)
    await store.aclose()
    await store.aclose()  # idempotent
    with pytest.raises(StoreClosed):
        await store.claim_event("Ev1")
    with pytest.raises(StoreClosed):
        await store.load_history(THREAD)
    with pytest.raises(StoreClosed):
        await store.in_flight()
    assert issubclass(StoreClosed, RuntimeError) and issubclass(StorageError, RuntimeError)


async def test_aclose_waits_for_the_running_transaction(db_path: str) -> None:
    # Worker-thread mode only: inline calls never yield mid-transaction, so never overlap.
    store = await SQLiteStore.open(db_path)
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


# -- cancellation: all or nothing --------------------------------------------------------


def exchange_state(db_path: str) -> tuple[str, int]:
    """(status of r1, number of its messages) straight from the file."""
    [(status,)] = raw(db_path, "SELECT status FROM requests WHERE request_id = 'r1'")
    [(count,)] = raw(db_path, "SELECT COUNT(*) FROM messages WHERE request_id = 'r1'")
    return status, count


def assert_whole_or_nothing(db_path: str) -> tuple[str, int]:
    state = exchange_state(db_path)
    assert state in {("in_flight", 0), ("answered", 2)}, f"half-done exchange: {state}"
    return state


async def wait_until_busy(store: SQLiteStore) -> None:
    """Wait until a worker call holds the store's limiter (its transaction has begun)."""
    with anyio.fail_after(5):
        while store._limiter.borrowed_tokens == 0:
            await anyio.sleep(0.001)


async def test_cancel_before_finish_runs_leaves_nothing_half_done(store: SQLiteStore, db_path: str) -> None:
    await start(store, "r1")
    with anyio.CancelScope() as scope:
        scope.cancel()
        await finish(store, "r1")
    assert scope.cancelled_caught
    assert assert_whole_or_nothing(db_path) == ("in_flight", 0)
    # The request can still be finished afterwards, exactly once.
    await finish(store, "r1")
    assert assert_whole_or_nothing(db_path) == ("answered", 2)


async def test_move_on_after_zero_leaves_nothing_half_done(store: SQLiteStore, db_path: str) -> None:
    await start(store, "r1")
    with anyio.move_on_after(0):
        await finish(store, "r1")
    assert_whole_or_nothing(db_path)
    await finish(store, "r1")  # whichever way it went, finishing again completes it once
    assert exchange_state(db_path) == ("answered", 2)
    assert len(await store.load_history(THREAD)) == 2


async def test_cancel_during_transaction_lets_it_complete(db_path: str) -> None:
    # Worker-thread mode only: an inline transaction never yields, so it cannot be
    # cancelled midway (the tests above cover cancelling it before it starts).
    store = await SQLiteStore.open(db_path)
    await start(store, "r1")
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # the worker's BEGIN IMMEDIATE now waits on the lock
    scope = anyio.CancelScope()

    async def finish_in_scope() -> None:
        with scope:
            await finish(store, "r1")

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


# -- open_store ---------------------------------------------------------------------------


async def test_open_store_relative_path(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = await open_store("sqlite:///data/bot.db")
    try:
        assert isinstance(store, SQLiteStore)
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
    ["postgres://user:pw@localhost/bot", "mysql://localhost/bot", "sqlite://relative.db", "bot.db", "sqlite:///"],
)
async def test_open_store_rejects_other_urls(url: str) -> None:
    with pytest.raises(ValueError, match="DATABASE_URL"):
        await open_store(url)
