"""SQLite as a `Database` for `SQLStore`: one file, one connection, one writer at a time.

Why it looks the way it does:

* One connection, owned by the store, used by one worker call at a time (a
  `CapacityLimiter(1)`). SQLite serialises writers anyway; a single connection keeps
  the transaction boundaries obvious and the code free of pooling.
* Every public method is exactly one worker call that runs one complete transaction
  (`BEGIN` … `COMMIT`, `ROLLBACK` on any exception). The worker call is not abandoned
  on cancellation (`abandon_on_cancel=False`), so once a transaction has started it
  finishes, and the caller sees the cancellation only afterwards: a cancelled request
  can never leave half an exchange behind.
* `inline=True` runs the same synchronous function directly in the event-loop thread.
  A deterministic simulation under Trio's `MockClock` needs this: while a worker thread
  runs, the loop looks idle and virtual time jumps ahead. The limiter is still taken,
  so the semantics (one transaction at a time, all or nothing) are identical.
* `PRAGMA user_version` numbers the schema; `MIGRATIONS[i]` moves it from `i` to `i+1`.
  Pending migrations are applied in one transaction on open, so a crash mid-migration
  leaves the previous schema intact.
* Errors from `sqlite3` are re-raised as `StorageError` naming the operation (for
  example "finish_request failed: database is locked"), so callers need not know the
  driver. Using the store after `aclose()` raises `StoreClosed`.
* Several processes may share the file (replicas on one machine): `BEGIN IMMEDIATE`
  serialises their writers, `busy_timeout` makes one wait for another, and the
  clock that leases and heartbeats read (`bot_now()`, registered on the connection)
  is the machine's, the same for all of them. `clock` replaces it in simulations.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar, cast

import anyio
import anyio.to_thread

from bot.storage.base import StorageError, StoreClosed
from bot.storage.queued import Job, run_queued
from bot.storage.sql_store import Connection, SQLStore

T = TypeVar("T")

# Each entry is one SQL script; entry i upgrades the schema from user_version i to i+1.
# Never edit an entry that has shipped: append a new one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE events (
        key        TEXT PRIMARY KEY,
        claimed_at REAL NOT NULL
    );
    CREATE INDEX events_claimed_at ON events (claimed_at);

    CREATE TABLE threads (
        channel    TEXT NOT NULL,
        thread_ts  TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (channel, thread_ts)
    );

    CREATE TABLE requests (
        request_id     TEXT PRIMARY KEY,
        channel        TEXT NOT NULL,
        thread_ts      TEXT NOT NULL,
        user_ts        TEXT NOT NULL,
        placeholder_ts TEXT NOT NULL,
        -- 'in_flight' until finished, then the Outcome
        status         TEXT NOT NULL
            CHECK (status IN ('in_flight', 'answered', 'timeout', 'error', 'interrupted')),
        started_at     REAL NOT NULL,
        finished_at    REAL,
        detail         TEXT NOT NULL DEFAULT '',
        FOREIGN KEY (channel, thread_ts) REFERENCES threads (channel, thread_ts)
    );
    CREATE INDEX requests_in_flight ON requests (started_at) WHERE status = 'in_flight';

    CREATE TABLE messages (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        channel    TEXT NOT NULL,
        thread_ts  TEXT NOT NULL,
        role       TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content    TEXT NOT NULL,
        ts         TEXT NOT NULL DEFAULT '',
        request_id TEXT REFERENCES requests (request_id),
        -- 1: part of the conversation the model sees; 0: kept for the record only
        in_context INTEGER NOT NULL DEFAULT 1,
        FOREIGN KEY (channel, thread_ts) REFERENCES threads (channel, thread_ts)
    );
    CREATE INDEX messages_thread ON messages (channel, thread_ts, id);
    """,
    # User settings and Slack UX: preferences per workspace/user/thread, feedback on
    # answers, and things said once (welcome, refusal). Only these tables; no others touched.
    """
    CREATE TABLE ux_preferences (
        scope      TEXT NOT NULL CHECK (scope IN ('workspace', 'user', 'thread')),
        scope_key  TEXT NOT NULL,
        prefs      TEXT NOT NULL,  -- a JSON object: only the fields set at this level
        updated_by TEXT NOT NULL DEFAULT '',
        updated_at REAL NOT NULL,
        PRIMARY KEY (scope, scope_key)
    );

    CREATE TABLE ux_feedback (
        channel     TEXT NOT NULL,
        message_ts  TEXT NOT NULL,
        user_id     TEXT NOT NULL,
        rating      TEXT NOT NULL CHECK (rating IN ('good', 'bad')),
        recorded_at REAL NOT NULL,
        PRIMARY KEY (channel, message_ts, user_id)
    );

    CREATE TABLE ux_once (
        kind       TEXT NOT NULL,
        once_key   TEXT NOT NULL,
        claimed_at REAL NOT NULL,
        PRIMARY KEY (kind, once_key)
    );
    """,
    # Images and documents: the images in each thread's conversation, downscaled (a few
    # hundred KB each, at most MAX_CONTEXT_IMAGES per thread). Only this table.
    """
    CREATE TABLE media_thread_images (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        channel    TEXT NOT NULL,
        thread_ts  TEXT NOT NULL,
        ts         TEXT NOT NULL DEFAULT '',
        name       TEXT NOT NULL,
        mime       TEXT NOT NULL,
        width      INTEGER NOT NULL,
        height     INTEGER NOT NULL,
        source     TEXT NOT NULL CHECK (source IN ('user', 'bot')),
        label      TEXT NOT NULL DEFAULT '',
        data       BLOB NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX media_thread_images_thread ON media_thread_images (channel, thread_ts, id);
    """,
    # Replicas: names that say what the tables hold, thread leases with fencing tokens,
    # heartbeats, and the owner and fence of each request.
    """
    ALTER TABLE ux_preferences RENAME TO preferences;
    ALTER TABLE ux_feedback RENAME TO feedback;
    ALTER TABLE ux_once RENAME TO said_once;
    ALTER TABLE media_thread_images RENAME TO thread_images;
    DROP INDEX media_thread_images_thread;
    CREATE INDEX thread_images_thread ON thread_images (channel, thread_ts, id);

    ALTER TABLE requests ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    ALTER TABLE requests ADD COLUMN fence INTEGER NOT NULL DEFAULT 0;

    CREATE TABLE thread_leases (
        channel    TEXT NOT NULL,
        thread_ts  TEXT NOT NULL,
        owner      TEXT NOT NULL,  -- '' once released
        token      INTEGER NOT NULL,  -- grows with every grant; the row is never deleted
        expires_at REAL NOT NULL,  -- by bot_now()
        PRIMARY KEY (channel, thread_ts)
    );

    CREATE TABLE replicas (
        replica_id   TEXT PRIMARY KEY,
        started_at   REAL NOT NULL,
        heartbeat_at REAL NOT NULL
    );
    """,
    # Usage and budgets: requests and tokens per UTC day, user, model and outcome, each
    # request added by one upsert. Only this table.
    """
    CREATE TABLE usage_daily (
        day        TEXT NOT NULL,  -- the UTC date, YYYY-MM-DD
        user_id    TEXT NOT NULL,
        model      TEXT NOT NULL,
        outcome    TEXT NOT NULL,
        requests   INTEGER NOT NULL,
        tokens_in  INTEGER NOT NULL,
        tokens_out INTEGER NOT NULL,
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


def _statements(script: str) -> list[str]:
    """Split a script into statements. `executescript` cannot be used: it commits any
    open transaction first, which would break the one-transaction migration."""
    statements: list[str] = []
    buffer = ""
    for piece in script.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            if buffer.strip(" \t\r\n;"):
                statements.append(buffer.strip())
            buffer = ""
    return statements


def _connect(path: str, clock: Callable[[], float] = time.time) -> sqlite3.Connection:
    """Open the connection, set it up and bring the schema up to date (blocking)."""
    if path != ":memory:":
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
    try:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    except sqlite3.Error as exc:
        raise StorageError(f"opening {path!r} failed: {exc}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if path != ":memory:":
            _use_wal(conn)
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.create_function("bot_now", 0, clock)
        _migrate(conn)
    except BaseException as exc:
        conn.close()
        if isinstance(exc, sqlite3.Error):
            raise StorageError(f"opening {path!r} failed: {exc}") from exc
        raise
    return conn


BUSY_TIMEOUT_MS = 5000  # how long a transaction waits for another process's writer
WAL_RETRY_SECONDS = 0.02


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL (it stays so: later opens find it done). On a fresh file
    opened by several processes at once, SQLite can refuse the switch at once with
    "database is locked", without waiting out the busy timeout (seen in 1 start in 3 of
    six processes together): retry it for as long as that timeout, on this worker thread."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(WAL_RETRY_SECONDS)


def _migrate(conn: sqlite3.Connection) -> None:
    """Apply every migration above the current `user_version`, in one transaction. The
    version is read inside the transaction so two processes opening a fresh database
    together cannot both apply the same migration."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > len(MIGRATIONS):
            raise StorageError(
                f"the database schema (version {version}) is newer than this bot "
                f"understands (version {len(MIGRATIONS)}); upgrade the bot"
            )
        for number in range(version, len(MIGRATIONS)):
            for statement in _statements(MIGRATIONS[number]):
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version={len(MIGRATIONS)}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


MAX_BATCH = 64  # transactions one worker call runs back to back, at most


class SQLiteDatabase:
    """One SQLite connection behind a `CapacityLimiter(1)`: the engine of an `SQLStore`.

    Handing a transaction to a worker thread and its result back costs several times the
    transaction itself (about 0.2 ms of CPU against 0.04 ms for a claim, measured), so
    transactions that queue while one worker call runs are run by that same call, back to
    back, each its own `BEGIN` … `COMMIT` (up to `MAX_BATCH` per call). Under load a
    burst of calls then costs one hop per batch; a lone call costs what it did.

    A caller cancelled while its transaction waits in the queue takes it out (it never
    runs); once the worker has taken it, the caller waits for it to finish and sees the
    cancellation after, as with any uncancellable worker call. (`deque.remove` and the
    worker's `popleft` are each atomic under the GIL: exactly one of them gets the job.)
    """

    def __init__(self, conn: sqlite3.Connection, *, inline: bool = False) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._inline = inline
        self._limiter = anyio.CapacityLimiter(1)
        self._queue: deque[Job[Any]] = deque()
        self._batch_over = anyio.Event()  # set (and replaced) each time a worker call ends

    async def transaction(self, operation: str, body: Callable[[Connection], T], *, write: bool = True) -> T:
        """Run `body` inside one transaction, in a worker call (or inline)."""
        if self._conn is None:
            raise StoreClosed(f"{operation}: the store is closed")
        job: Job[T] = Job(operation, body, write)
        if self._inline:
            async with self._limiter:
                self._run(job)
            if job.error is not None:
                raise job.error
            return cast(T, job.result)
        return await run_queued(self._queue, job, self._run_queue)

    async def _run_queue(self, job: Job[Any]) -> None:
        """Wait for `job` to be run: by this caller's own worker call when none is
        running, else by the one that is (or, if it ends first, a later one)."""
        while not job.done.is_set():
            if self._limiter.borrowed_tokens:
                await self._batch_over.wait()
                continue
            async with self._limiter:
                if job.done.is_set():  # run by the call that held the limiter just before
                    return
                ran: list[Job[Any]] = []
                try:
                    await anyio.to_thread.run_sync(self._run_batch, ran)
                finally:
                    for done in ran:
                        done.done.set()
                    # The callers still waiting look again (once the limiter is given back,
                    # before they run): one of them runs the rest.
                    over, self._batch_over = self._batch_over, anyio.Event()
                    over.set()

    def _run_batch(self, ran: list[Job[Any]]) -> None:
        """In the worker thread: run queued transactions until the queue is empty."""
        while len(ran) < MAX_BATCH:
            try:
                job = self._queue.popleft()
            except IndexError:
                return
            ran.append(job)
            self._run(job)

    def _run(self, job: Job[Any]) -> None:
        """One transaction; its result or error is kept in the job (blocking)."""
        conn = self._conn  # read again here: aclose() may have run
        try:
            if conn is None:
                raise StoreClosed(f"{job.operation}: the store is closed")
            try:
                # Writers take the write lock up front (no lock upgrade, so no deadlock
                # between processes); readers get a consistent snapshot without it.
                conn.execute("BEGIN IMMEDIATE" if job.write else "BEGIN")
                try:
                    job.result = job.body(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):  # the original error is the one to report
                            conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StorageError(f"{job.operation} failed: {exc}") from exc
        except Exception as exc:  # re-raised in the caller's task
            job.error = exc

    async def aclose(self) -> None:
        """Close the connection once no transaction is running. Idempotent, and shielded
        so a cancelled shutdown still closes the file cleanly."""
        with anyio.CancelScope(shield=True):

            def close() -> None:
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.close()

            if self._inline:
                async with self._limiter:
                    close()
            else:
                async with self._limiter:
                    await anyio.to_thread.run_sync(close)
                over, self._batch_over = self._batch_over, anyio.Event()
                over.set()  # callers queued behind it look again (and find the store closed)


async def open_sqlite(path: str, *, inline: bool = False, clock: Callable[[], float] = time.time) -> SQLStore:
    """Open (creating parent directories) the database at `path` (or ":memory:") and
    apply pending migrations — in a worker thread unless `inline`. `clock` is what
    `bot_now()` reads (epoch seconds; a simulation passes its virtual clock)."""
    if inline:
        conn = _connect(path, clock)
    else:
        conn = await anyio.to_thread.run_sync(_connect, path, clock)
    return SQLStore(SQLiteDatabase(conn, inline=inline))
