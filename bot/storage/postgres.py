"""PostgreSQL as a `Database` for `SQLStore`: several replicas, one database.

Why it looks the way it does:

* psycopg 3's *synchronous* connections from a `psycopg_pool.ConnectionPool`, each
  store call one transaction, run in an AnyIO worker-thread call behind a
  `CapacityLimiter` as large as the pool, so a worker never waits for a connection
  while holding a thread. Transactions that queue while every connection is busy are
  run by the worker calls already running, one after another (`PostgresDatabase`).
  This is the one model that runs on Trio and asyncio alike: psycopg's async
  connection and asyncpg both await asyncio futures.
* A worker thread cannot be cancelled, and the call is not abandoned once started (a
  transaction always finishes or rolls back before the caller sees a cancellation).
  What bounds it is the server: `statement_timeout` and `lock_timeout` are set on every
  connection, well inside any request's deadline.
* Migrations are numbered rows in `schema_migrations`, applied at open in one
  transaction under an advisory lock: two replicas starting together apply each
  migration once, and a crash mid-migration leaves the previous schema.
* `bot_now()` is a SQL function reading the server's clock (`clock_timestamp()`), so
  every replica measures leases and heartbeats by the same clock.
* Driver errors (including a pool that cannot hand out a connection in time) become
  `StorageError` naming the operation; the URL's password never appears in one.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import psycopg
import psycopg_pool

from bot.storage.base import StorageError, StoreClosed
from bot.storage.location import redact
from bot.storage.queued import Job, run_queued
from bot.storage.sql_store import Connection, Cursor, SQLStore

T = TypeVar("T")

STATEMENT_TIMEOUT_MS = 5_000  # no single statement of the store needs more; a request's deadline is minutes
LOCK_TIMEOUT_MS = 2_000
CONNECT_TIMEOUT_S = 10  # the pool's wait for a connection, and each connection attempt
POOL_SIZE = 8  # connections per replica; the limiter keeps worker calls to this many
ADVISORY_LOCK = 0x51AC_B07  # "slack bot": serialises migrations across replicas

# Entry i is migration i+1. Never edit an entry that has shipped: append a new one.
MIGRATIONS: list[str] = [
    """
    CREATE FUNCTION bot_now() RETURNS double precision
        LANGUAGE sql VOLATILE AS $$ SELECT extract(epoch FROM clock_timestamp())::double precision $$;

    CREATE TABLE events (
        key        TEXT PRIMARY KEY,
        claimed_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX events_claimed_at ON events (claimed_at);

    CREATE TABLE threads (
        channel    TEXT NOT NULL,
        thread_ts  TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (channel, thread_ts)
    );

    CREATE TABLE requests (
        request_id     TEXT PRIMARY KEY,
        channel        TEXT NOT NULL,
        thread_ts      TEXT NOT NULL,
        user_ts        TEXT NOT NULL,
        placeholder_ts TEXT NOT NULL,
        status         TEXT NOT NULL
            CHECK (status IN ('in_flight', 'answered', 'timeout', 'error', 'interrupted')),
        started_at     DOUBLE PRECISION NOT NULL,
        finished_at    DOUBLE PRECISION,
        detail         TEXT NOT NULL DEFAULT '',
        owner          TEXT NOT NULL DEFAULT '',
        fence          BIGINT NOT NULL DEFAULT 0,
        FOREIGN KEY (channel, thread_ts) REFERENCES threads (channel, thread_ts)
    );
    CREATE INDEX requests_in_flight ON requests (started_at) WHERE status = 'in_flight';

    CREATE TABLE messages (
        id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        channel    TEXT NOT NULL,
        thread_ts  TEXT NOT NULL,
        role       TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content    TEXT NOT NULL,
        ts         TEXT NOT NULL DEFAULT '',
        request_id TEXT REFERENCES requests (request_id),
        in_context INTEGER NOT NULL DEFAULT 1,
        FOREIGN KEY (channel, thread_ts) REFERENCES threads (channel, thread_ts)
    );
    CREATE INDEX messages_thread ON messages (channel, thread_ts, id);

    CREATE TABLE preferences (
        scope      TEXT NOT NULL CHECK (scope IN ('workspace', 'user', 'thread')),
        scope_key  TEXT NOT NULL,
        prefs      TEXT NOT NULL,
        updated_by TEXT NOT NULL DEFAULT '',
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (scope, scope_key)
    );

    CREATE TABLE feedback (
        channel     TEXT NOT NULL,
        message_ts  TEXT NOT NULL,
        user_id     TEXT NOT NULL,
        rating      TEXT NOT NULL CHECK (rating IN ('good', 'bad')),
        recorded_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (channel, message_ts, user_id)
    );

    CREATE TABLE said_once (
        kind       TEXT NOT NULL,
        once_key   TEXT NOT NULL,
        claimed_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (kind, once_key)
    );

    CREATE TABLE thread_images (
        id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        channel    TEXT NOT NULL,
        thread_ts  TEXT NOT NULL,
        ts         TEXT NOT NULL DEFAULT '',
        name       TEXT NOT NULL,
        mime       TEXT NOT NULL,
        width      INTEGER NOT NULL,
        height     INTEGER NOT NULL,
        source     TEXT NOT NULL CHECK (source IN ('user', 'bot')),
        label      TEXT NOT NULL DEFAULT '',
        data       BYTEA NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX thread_images_thread ON thread_images (channel, thread_ts, id);

    CREATE TABLE thread_leases (
        channel    TEXT NOT NULL,
        thread_ts  TEXT NOT NULL,
        owner      TEXT NOT NULL,
        token      BIGINT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (channel, thread_ts)
    );

    CREATE TABLE replicas (
        replica_id   TEXT PRIMARY KEY,
        started_at   DOUBLE PRECISION NOT NULL,
        heartbeat_at DOUBLE PRECISION NOT NULL
    );
    """,
    # Usage and budgets: requests and tokens per UTC day, user, model and outcome.
    """
    CREATE TABLE usage_daily (
        day        TEXT NOT NULL,
        user_id    TEXT NOT NULL,
        model      TEXT NOT NULL,
        outcome    TEXT NOT NULL,
        requests   BIGINT NOT NULL,
        tokens_in  BIGINT NOT NULL,
        tokens_out BIGINT NOT NULL,
        PRIMARY KEY (day, user_id, model, outcome)
    );
    CREATE INDEX usage_daily_user ON usage_daily (user_id, day);
    """,
    # Whether a request's placeholder is a native stream (chat.startStream): a takeover
    # stops it first, and reads the thread only if it was no longer streaming.
    """
    ALTER TABLE requests ADD COLUMN streamed INTEGER NOT NULL DEFAULT 0;
    """,
]


def _translate(sql: str) -> str:
    """The store's `?` placeholders in psycopg's style (no query contains `%` or a `?` literal)."""
    return sql.replace("?", "%s")


class _PgConnection:
    """A psycopg connection with the `Connection` shape the queries are written for."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Sequence[object] = (), /) -> Cursor:
        return self._conn.execute(_translate(sql), tuple(parameters))

    def executemany(self, sql: str, parameters: Iterable[Sequence[object]], /) -> object:
        with self._conn.cursor() as cursor:
            cursor.executemany(_translate(sql), [tuple(p) for p in parameters])
        return None


def _migrate(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
        version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            raise StorageError(
                f"the database schema (version {version}) is newer than this bot "
                f"understands (version {len(MIGRATIONS)}); upgrade the bot"
            )
        for number in range(version, len(MIGRATIONS)):
            conn.execute(MIGRATIONS[number])
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (number + 1,))


def _open_pool(url: str, size: int) -> psycopg_pool.ConnectionPool:
    """Open the pool, wait for its first connection and migrate (blocking)."""
    pool = psycopg_pool.ConnectionPool(
        url,
        min_size=1,
        max_size=size,
        open=False,
        timeout=CONNECT_TIMEOUT_S,
        kwargs={
            "connect_timeout": CONNECT_TIMEOUT_S,
            "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c lock_timeout={LOCK_TIMEOUT_MS}",
            "application_name": "slackbot",
        },
    )
    try:
        pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        with pool.connection() as conn:
            conn.autocommit = True  # _migrate opens its own transaction block
            try:
                _migrate(conn)
            finally:
                conn.autocommit = False
    except BaseException as exc:
        pool.close()
        if isinstance(exc, psycopg.Error | psycopg_pool.PoolTimeout):
            raise StorageError(f"opening {redact(url)} failed: {_reason(exc)}") from exc
        raise
    return pool


def _reason(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _run(conn: psycopg.Connection[Any], wrapped: Connection, job: Job[Any]) -> None:
    """One transaction on `conn`; its result or error is kept in the job (blocking).
    The transaction block commits when `body` returns and rolls back when it raises, so
    the connection is clean for the next job of the batch."""
    try:
        try:
            with conn.transaction():
                job.result = job.body(wrapped)
        except psycopg.Error as exc:
            raise StorageError(f"{job.operation} failed: {_reason(exc)}") from exc
    except Exception as exc:  # re-raised in the caller's task
        job.error = exc


MAX_BATCH = 64  # transactions one worker call runs back to back on its connection, at most
MAX_BATCH_SECONDS = 0.02  # ... and for this long at most once its caller's own has run


class PostgresDatabase:
    """A psycopg connection pool behind a `CapacityLimiter` of the same size.

    As in the SQLite store, handing each transaction to a worker thread and back costs
    more than its statements (0.44 ms of CPU per claim with 100 callers, against 0.06 ms
    for SQLite's shared worker calls), so transactions that queue while every connection
    is busy are run by the worker calls already running, back to back on their
    connection, each its own transaction (up to `MAX_BATCH` per call). A caller that
    finds a connection free starts a worker call of its own: a lone call costs what it
    did. A caller cancelled while its transaction is still queued takes it out (it never
    runs); once a worker has it, the caller waits for it to finish.
    """

    def __init__(self, pool: psycopg_pool.ConnectionPool, size: int) -> None:
        self._pool: psycopg_pool.ConnectionPool | None = pool
        self._limiter = anyio.CapacityLimiter(size)
        self._queue: deque[Job[Any]] = deque()
        self._batch_over = anyio.Event()  # set (and replaced) each time a worker call ends

    async def transaction(self, operation: str, body: Callable[[Connection], T], *, write: bool = True) -> T:
        """`write` is not needed here: PostgreSQL's row locks order the writers."""
        if self._pool is None:
            raise StoreClosed(f"{operation}: the store is closed")
        return await run_queued(self._queue, Job(operation, body), self._run_queue)

    async def _run_queue(self, job: Job[Any]) -> None:
        """Wait for `job` to be run: by a worker call of this caller's own when a
        connection is free, else by one of those running (or a later one)."""
        while not job.done.is_set():
            if job.taken:
                await job.done.wait()
                return
            if self._limiter.available_tokens < 1:
                await self._batch_over.wait()
                continue
            async with self._limiter:
                if job.done.is_set() or job.taken:
                    continue
                ran: list[Job[Any]] = []
                try:
                    await anyio.to_thread.run_sync(self._run_batch, job, ran)
                finally:
                    for done in ran:
                        done.done.set()
                    over, self._batch_over = self._batch_over, anyio.Event()
                    over.set()

    def _run_batch(self, mine: Job[Any], ran: list[Job[Any]]) -> None:
        """In the worker thread: on one connection, run queued transactions until the
        queue is empty. No connection (the store closed, or the pool cannot hand one
        out in time): the caller's own transaction fails with the reason, if still queued."""
        pool = self._pool
        try:
            if pool is None:
                raise StoreClosed(f"{mine.operation}: the store is closed")
            with pool.connection() as conn:
                wrapped = _PgConnection(conn)
                started = time.monotonic()
                # Its caller waits for the whole batch: once its own transaction is run,
                # only a few milliseconds more of the others' (a slow server stays the
                # bound of one transaction, not of sixty-four).
                while len(ran) < MAX_BATCH and not (mine.taken and time.monotonic() - started > MAX_BATCH_SECONDS):
                    try:
                        job = self._queue.popleft()
                    except IndexError:
                        return
                    job.taken = True
                    ran.append(job)
                    _run(conn, wrapped, job)
        except (psycopg.Error, psycopg_pool.PoolTimeout, StoreClosed) as exc:
            error = exc if isinstance(exc, StoreClosed) else StorageError(f"{mine.operation} failed: {_reason(exc)}")
            try:
                self._queue.remove(mine)
            except ValueError:
                return  # a worker has it, or had it: its outcome stands
            mine.taken = True
            mine.error = error
            ran.append(mine)

    async def aclose(self) -> None:
        """Close the pool once every running transaction has ended. Idempotent and shielded."""
        with anyio.CancelScope(shield=True):
            pool, self._pool = self._pool, None
            if pool is None:
                return
            # Taking every token waits for the transactions still running.
            borrowers = [object() for _ in range(int(self._limiter.total_tokens))]
            for borrower in borrowers:
                await self._limiter.acquire_on_behalf_of(borrower)
            try:
                await anyio.to_thread.run_sync(pool.close)
            finally:
                for borrower in borrowers:
                    self._limiter.release_on_behalf_of(borrower)
                over, self._batch_over = self._batch_over, anyio.Event()
                over.set()  # callers queued behind it look again (and find the store closed)


async def open_postgres(url: str, *, pool_size: int = POOL_SIZE) -> SQLStore:
    """Connect to the database at `url` (postgresql://user:pass@host:port/db), apply
    pending migrations, and return the store."""
    pool = await anyio.to_thread.run_sync(_open_pool, url, pool_size)
    return SQLStore(PostgresDatabase(pool, pool_size))
