"""SQLite behind the `Store` interface.

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
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

from bot.storage.base import (
    HistoryMessage,
    InFlightRequest,
    Outcome,
    PreferenceLayers,
    PreferenceScope,
    Rating,
    StorageError,
    StoreClosed,
    ThreadImage,
    ThreadKey,
)

T = TypeVar("T")

OUTCOMES = ("answered", "timeout", "error", "interrupted")

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


def _connect(path: str) -> sqlite3.Connection:
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
        if path != ":memory:":
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=NORMAL")
        _migrate(conn)
    except BaseException as exc:
        conn.close()
        if isinstance(exc, sqlite3.Error):
            raise StorageError(f"opening {path!r} failed: {exc}") from exc
        raise
    return conn


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


class SQLiteStore:
    """`Store` on one SQLite connection. Create it with `await SQLiteStore.open(path)`."""

    def __init__(self, conn: sqlite3.Connection, *, inline: bool = False) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._inline = inline
        self._limiter = anyio.CapacityLimiter(1)

    @classmethod
    async def open(cls, path: str, *, inline: bool = False) -> SQLiteStore:
        """Open (creating parent directories) the database at `path` (or ":memory:")
        and apply pending migrations — in a worker thread unless `inline`."""
        if inline:
            conn = _connect(path)
        else:
            conn = await anyio.to_thread.run_sync(_connect, path)
        return cls(conn, inline=inline)

    # -- the one way in: one call, one transaction ---------------------------------

    async def _transaction(self, operation: str, body: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        """Run `body` inside one transaction, as one worker call (or inline)."""
        if self._conn is None:
            raise StoreClosed(f"{operation}: the store is closed")

        def run() -> T:
            conn = self._conn  # read again under the limiter: aclose() may have run
            if conn is None:
                raise StoreClosed(f"{operation}: the store is closed")
            try:
                # Writers take the write lock up front (no lock upgrade, so no deadlock
                # between processes); readers get a consistent snapshot without it.
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    result = body(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):  # the original error is the one to report
                            conn.execute("ROLLBACK")
                    raise
                return result
            except sqlite3.Error as exc:
                raise StorageError(f"{operation} failed: {exc}") from exc

        if self._inline:
            async with self._limiter:
                return run()
        return await anyio.to_thread.run_sync(run, limiter=self._limiter)

    # -- Store ---------------------------------------------------------------------

    async def claim_event(self, key: str) -> bool:
        """True the first time `key` is claimed, False ever after (survives restarts;
        across processes sharing the file only one INSERT wins)."""

        def body(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute("INSERT OR IGNORE INTO events (key, claimed_at) VALUES (?, ?)", (key, time.time()))
            return cursor.rowcount == 1

        return await self._transaction("claim_event", body)

    async def thread_known(self, thread: ThreadKey) -> bool:
        def body(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT 1 FROM threads WHERE channel = ? AND thread_ts = ?",
                (thread.channel, thread.thread_ts),
            ).fetchone()
            return row is not None

        return await self._transaction("thread_known", body, write=False)

    async def load_history(self, thread: ThreadKey) -> list[HistoryMessage]:
        """The in-context messages (answered exchanges and imported history), oldest first."""

        def body(conn: sqlite3.Connection) -> list[HistoryMessage]:
            rows = conn.execute(
                "SELECT role, content, ts FROM messages"
                " WHERE channel = ? AND thread_ts = ? AND in_context = 1 ORDER BY id",
                (thread.channel, thread.thread_ts),
            ).fetchall()
            return [HistoryMessage(role=role, content=content, ts=ts) for role, content, ts in rows]

        return await self._transaction("load_history", body, write=False)

    async def import_history(self, thread: ThreadKey, messages: list[HistoryMessage]) -> None:
        """Mark the thread known and seed its history, unless it already has some
        (so a rebuild from Slack can never duplicate what is stored)."""

        def body(conn: sqlite3.Connection) -> None:
            _ensure_thread(conn, thread)
            existing = conn.execute(
                "SELECT 1 FROM messages WHERE channel = ? AND thread_ts = ? LIMIT 1",
                (thread.channel, thread.thread_ts),
            ).fetchone()
            if existing is not None:
                return
            conn.executemany(
                "INSERT INTO messages (channel, thread_ts, role, content, ts, in_context) VALUES (?, ?, ?, ?, ?, 1)",
                [(thread.channel, thread.thread_ts, m.role, m.content, m.ts) for m in messages],
            )

        await self._transaction("import_history", body)

    async def start_request(
        self, request_id: str, thread: ThreadKey, *, user_ts: str, placeholder_ts: str, started_at: float
    ) -> None:
        """Record the request as in flight and the thread as known. A repeated
        `request_id` is a bug in the caller and raises `StorageError`."""

        def body(conn: sqlite3.Connection) -> None:
            _ensure_thread(conn, thread, created_at=started_at)
            conn.execute(
                "INSERT INTO requests"
                " (request_id, channel, thread_ts, user_ts, placeholder_ts, status, started_at)"
                " VALUES (?, ?, ?, ?, ?, 'in_flight', ?)",
                (request_id, thread.channel, thread.thread_ts, user_ts, placeholder_ts, started_at),
            )

        await self._transaction("start_request", body)

    async def finish_request(
        self,
        request_id: str,
        *,
        outcome: Outcome,
        user_text: str,
        user_ts: str,
        reply_text: str,
        finished_at: float,
        detail: str = "",
    ) -> None:
        """Close the request and append the exchange, in one transaction. Only a request
        still in flight is finished: a second call (or an unknown id) changes nothing,
        so the history can never get the exchange twice. Each of the user message and
        the reply is stored only if non-empty (recovery after a crash knows neither); both
        enter the model's context only when the outcome is 'answered'."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")

        def body(conn: sqlite3.Connection) -> None:
            row = conn.execute(
                "SELECT channel, thread_ts, placeholder_ts FROM requests WHERE request_id = ? AND status = 'in_flight'",
                (request_id,),
            ).fetchone()
            if row is None:
                return
            channel, thread_ts, placeholder_ts = row
            conn.execute(
                "UPDATE requests SET status = ?, finished_at = ?, detail = ? WHERE request_id = ?",
                (outcome, finished_at, detail, request_id),
            )
            in_context = 1 if outcome == "answered" else 0
            exchange = [("user", user_text, user_ts)] if user_text else []
            if reply_text:
                # The placeholder message is edited into the reply, so it carries its ts.
                exchange.append(("assistant", reply_text, placeholder_ts))
            conn.executemany(
                "INSERT INTO messages (channel, thread_ts, role, content, ts, request_id, in_context)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(channel, thread_ts, role, text, ts, request_id, in_context) for role, text, ts in exchange],
            )

        await self._transaction("finish_request", body)

    async def in_flight(self) -> list[InFlightRequest]:
        """Requests started and never finished, oldest first."""

        def body(conn: sqlite3.Connection) -> list[InFlightRequest]:
            rows = conn.execute(
                "SELECT request_id, channel, thread_ts, placeholder_ts, started_at FROM requests"
                " WHERE status = 'in_flight' ORDER BY started_at, rowid"
            ).fetchall()
            return [
                InFlightRequest(
                    request_id=request_id,
                    thread=ThreadKey(channel, thread_ts),
                    placeholder_ts=placeholder_ts,
                    started_at=started_at,
                )
                for request_id, channel, thread_ts, placeholder_ts, started_at in rows
            ]

        return await self._transaction("in_flight", body, write=False)

    async def prune_events(self, older_than: float) -> int:
        """Delete event keys claimed before `older_than`; returns how many."""

        def body(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM events WHERE claimed_at < ?", (older_than,)).rowcount

        return await self._transaction("prune_events", body)

    # -- user settings, feedback, one-time notices ---------------------------------

    async def load_preferences(self, user: str, thread: ThreadKey | None) -> PreferenceLayers:
        """All three layers in one read transaction, so they are mutually consistent."""
        wanted = [("workspace", ""), ("user", user)]
        if thread is not None:
            wanted.append(("thread", str(thread)))

        def body(conn: sqlite3.Connection) -> PreferenceLayers:
            found: dict[str, dict[str, object]] = {"workspace": {}, "user": {}, "thread": {}}
            for scope, key in wanted:
                row = conn.execute(
                    "SELECT prefs FROM ux_preferences WHERE scope = ? AND scope_key = ?", (scope, key)
                ).fetchone()
                if row is not None:
                    found[scope] = _json_object(row[0])
            return PreferenceLayers(**found)

        return await self._transaction("load_preferences", body, write=False)

    async def save_preferences(
        self, scope: PreferenceScope, key: str, prefs: dict[str, object], *, updated_by: str
    ) -> None:
        if scope not in ("workspace", "user", "thread"):
            raise ValueError(f"scope must be workspace, user or thread, got {scope!r}")
        encoded = json.dumps(prefs, sort_keys=True)  # before the transaction: a bad value raises here

        def body(conn: sqlite3.Connection) -> None:
            if not prefs:
                conn.execute("DELETE FROM ux_preferences WHERE scope = ? AND scope_key = ?", (scope, key))
                return
            conn.execute(
                "INSERT INTO ux_preferences (scope, scope_key, prefs, updated_by, updated_at)"
                " VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (scope, scope_key) DO UPDATE SET"
                " prefs = excluded.prefs, updated_by = excluded.updated_by, updated_at = excluded.updated_at",
                (scope, key, encoded, updated_by, time.time()),
            )

        await self._transaction("save_preferences", body)

    async def record_feedback(self, channel: str, message_ts: str, user: str, rating: Rating) -> None:
        if rating not in ("good", "bad"):
            raise ValueError(f"rating must be good or bad, got {rating!r}")

        def body(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO ux_feedback (channel, message_ts, user_id, rating, recorded_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (channel, message_ts, user_id) DO UPDATE SET"
                " rating = excluded.rating, recorded_at = excluded.recorded_at",
                (channel, message_ts, user, rating, time.time()),
            )

        await self._transaction("record_feedback", body)

    async def feedback_for(self, channel: str, message_ts: str) -> dict[str, Rating]:
        def body(conn: sqlite3.Connection) -> dict[str, Rating]:
            rows = conn.execute(
                "SELECT user_id, rating FROM ux_feedback WHERE channel = ? AND message_ts = ?", (channel, message_ts)
            ).fetchall()
            return {user: rating for user, rating in rows}

        return await self._transaction("feedback_for", body, write=False)

    async def claim_once(self, kind: str, key: str) -> bool:
        def body(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO ux_once (kind, once_key, claimed_at) VALUES (?, ?, ?)", (kind, key, time.time())
            )
            return cursor.rowcount == 1

        return await self._transaction("claim_once", body)

    # -- images in a thread's conversation ---------------------------------------

    async def add_thread_images(self, thread: ThreadKey, images: list[ThreadImage], *, keep: int) -> None:
        """Insert the images and trim the thread to its newest `keep`, in one transaction."""
        if not images:
            return

        def body(conn: sqlite3.Connection) -> None:
            now = time.time()
            conn.executemany(
                "INSERT INTO media_thread_images"
                " (channel, thread_ts, ts, name, mime, width, height, source, label, data, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        thread.channel,
                        thread.thread_ts,
                        i.ts,
                        i.name,
                        i.mime,
                        i.width,
                        i.height,
                        i.source,
                        i.label,
                        sqlite3.Binary(i.data),
                        now,
                    )
                    for i in images
                ],
            )
            conn.execute(
                "DELETE FROM media_thread_images WHERE channel = ? AND thread_ts = ? AND id NOT IN"
                " (SELECT id FROM media_thread_images WHERE channel = ? AND thread_ts = ? ORDER BY id DESC LIMIT ?)",
                (thread.channel, thread.thread_ts, thread.channel, thread.thread_ts, max(keep, 0)),
            )

        await self._transaction("add_thread_images", body)

    async def thread_images(self, thread: ThreadKey, *, limit: int) -> list[ThreadImage]:
        if limit <= 0:
            return []

        def body(conn: sqlite3.Connection) -> list[ThreadImage]:
            rows = conn.execute(
                "SELECT name, mime, data, width, height, source, label, ts FROM media_thread_images"
                " WHERE channel = ? AND thread_ts = ? ORDER BY id DESC LIMIT ?",
                (thread.channel, thread.thread_ts, limit),
            ).fetchall()
            return [
                ThreadImage(
                    name=name,
                    mime=mime,
                    data=bytes(data),
                    width=width,
                    height=height,
                    source=source,
                    label=label,
                    ts=ts,
                )
                for name, mime, data, width, height, source, label, ts in reversed(rows)
            ]

        return await self._transaction("thread_images", body, write=False)

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
                await anyio.to_thread.run_sync(close, limiter=self._limiter)


def _ensure_thread(conn: sqlite3.Connection, thread: ThreadKey, created_at: float | None = None) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO threads (channel, thread_ts, created_at) VALUES (?, ?, ?)",
        (thread.channel, thread.thread_ts, time.time() if created_at is None else created_at),
    )


def _json_object(text: str) -> dict[str, object]:
    """A stored preferences blob; a damaged one reads as empty rather than failing every request."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        logging.getLogger(__name__).warning("stored preferences are not a JSON object; using the defaults")
        return {}
    return value
