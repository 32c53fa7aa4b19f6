"""`SQLStore`: the `Store` interface written once, in SQL that SQLite and PostgreSQL both run.

Why one implementation for two engines:

* The rules that matter (one transaction per method, exactly-once claims, leases with
  fencing, history that can never get an exchange twice) live in the queries. Written
  twice they would drift; written once, the same contract tests hold both engines to them.
* The dialects are close enough: both have `INSERT … ON CONFLICT … RETURNING`, partial
  upserts and correlated subqueries. The differences stay in the engine modules:
  placeholders (`?` here, translated to `%s` for psycopg), column types, the migration
  bookkeeping, and the clock (`bot_now()`: a Python function registered on each SQLite
  connection, a SQL function on PostgreSQL that reads the server's clock).

An engine (`sqlite.SQLiteDatabase`, `postgres.PostgresDatabase`) provides `transaction`:
run one synchronous body inside one transaction, in a worker thread behind a limiter,
never abandoned once started, with driver errors mapped to `StorageError`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, date, datetime
from typing import Any, Protocol, TypeVar

from bot.storage.base import (
    HistoryMessage,
    InFlightRequest,
    Outcome,
    PreferenceLayers,
    PreferenceScope,
    Rating,
    RequestRecord,
    ThreadImage,
    ThreadKey,
    UsageSummary,
    UsageTotal,
)

T = TypeVar("T")

RENEW_BATCH = 300  # leases per UPDATE in renew_leases: 901 parameters (SQLite's old default cap is 999)
OUTCOMES = ("answered", "timeout", "error", "interrupted")
MAX_USAGE_OUTCOME = 40  # a usage outcome is a short word ("answered", "stopped"…), not free text

log = logging.getLogger(__name__)


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """What the queries need of a driver connection (sqlite3's has it as is)."""

    def execute(self, sql: str, parameters: Sequence[object] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[object]], /) -> object: ...


class Database(Protocol):
    async def transaction(self, operation: str, body: Callable[[Connection], T], *, write: bool = True) -> T:
        """Run `body` in one transaction; `operation` names it in errors."""

    async def aclose(self) -> None: ...


# A lease is valid while it has an owner and has not expired by the database's clock.
VALID_LEASE = "l.owner <> '' AND l.expires_at > bot_now()"
CURRENT_FENCE = (
    "EXISTS (SELECT 1 FROM thread_leases l WHERE l.channel = ? AND l.thread_ts = ? AND l.token = ? AND "
    + VALID_LEASE
    + ")"
)

# The same, for a write to a row of `requests`: its thread's lease holds the token (`?`).
_REQUEST_FENCE = (
    "EXISTS (SELECT 1 FROM thread_leases l WHERE l.channel = requests.channel AND l.thread_ts = requests.thread_ts"
    " AND l.token = ? AND " + VALID_LEASE + ")"
)


class SQLStore:
    """`Store` over any `Database`. Open one with `bot.storage.open_store`."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def _run(self, operation: str, body: Callable[[Connection], T], *, write: bool = True) -> T:
        return await self.database.transaction(operation, body, write=write)

    # -- events ------------------------------------------------------------------------

    async def claim_event(self, *keys: str) -> bool:
        """True the first time the keys are claimed, False ever after: one INSERT per key,
        in one transaction, that only one caller wins, whichever process or replica it
        runs in."""
        if not keys:
            raise ValueError("claim_event needs at least one key")

        def body(conn: Connection) -> bool:
            now = time.time()
            won = True
            for key in keys:  # every key is claimed, even after one that was not new
                row = conn.execute(
                    "INSERT INTO events (key, claimed_at) VALUES (?, ?) ON CONFLICT DO NOTHING RETURNING key",
                    (key, now),
                ).fetchone()
                won = won and row is not None
            return won

        return await self._run("claim_event", body)

    async def prune_events(self, older_than: float) -> int:
        def body(conn: Connection) -> int:
            return conn.execute("DELETE FROM events WHERE claimed_at < ?", (older_than,)).rowcount

        return await self._run("prune_events", body)

    # -- threads and history -----------------------------------------------------------

    async def thread_known(self, thread: ThreadKey) -> bool:
        def body(conn: Connection) -> bool:
            row = conn.execute(
                "SELECT 1 FROM threads WHERE channel = ? AND thread_ts = ?", (thread.channel, thread.thread_ts)
            ).fetchone()
            return row is not None

        return await self._run("thread_known", body, write=False)

    async def load_history(self, thread: ThreadKey) -> list[HistoryMessage]:
        """The in-context messages (answered exchanges and imported history), oldest first."""

        def body(conn: Connection) -> list[HistoryMessage]:
            rows = conn.execute(
                "SELECT role, content, ts FROM messages"
                " WHERE channel = ? AND thread_ts = ? AND in_context = 1 ORDER BY id",
                (thread.channel, thread.thread_ts),
            ).fetchall()
            return [HistoryMessage(role=role, content=content, ts=ts) for role, content, ts in rows]

        return await self._run("load_history", body, write=False)

    async def import_history(self, thread: ThreadKey, messages: list[HistoryMessage]) -> None:
        """Mark the thread known and seed its history, unless it already has some
        (so a rebuild from Slack can never duplicate what is stored)."""

        def body(conn: Connection) -> None:
            _ensure_thread(conn, thread, time.time())
            existing = conn.execute(
                "SELECT 1 FROM messages WHERE channel = ? AND thread_ts = ? LIMIT 1", (thread.channel, thread.thread_ts)
            ).fetchone()
            if existing is not None or not messages:
                return
            conn.executemany(
                "INSERT INTO messages (channel, thread_ts, role, content, ts, in_context) VALUES (?, ?, ?, ?, ?, 1)",
                [(thread.channel, thread.thread_ts, m.role, m.content, m.ts) for m in messages],
            )

        await self._run("import_history", body)

    # -- requests ----------------------------------------------------------------------

    async def start_request(
        self,
        request_id: str,
        thread: ThreadKey,
        *,
        user_ts: str,
        placeholder_ts: str,
        started_at: float,
        owner: str,
        fence: int,
        streamed: bool = False,
    ) -> bool:
        """Record the request as in flight and the thread as known, if `fence` is the
        thread's current lease. A repeated `request_id` is a bug in the caller and
        raises `StorageError`."""

        def body(conn: Connection) -> bool:
            held = conn.execute("SELECT " + CURRENT_FENCE, (thread.channel, thread.thread_ts, fence)).fetchone()
            if not held or not held[0]:
                return False
            _ensure_thread(conn, thread, started_at)
            conn.execute(
                "INSERT INTO requests"
                " (request_id, channel, thread_ts, user_ts, placeholder_ts, status, started_at, owner, fence, streamed)"
                " VALUES (?, ?, ?, ?, ?, 'in_flight', ?, ?, ?, ?)",
                (
                    request_id,
                    thread.channel,
                    thread.thread_ts,
                    user_ts,
                    placeholder_ts,
                    started_at,
                    owner,
                    fence,
                    int(streamed),
                ),
            )
            return True

        return await self._run("start_request", body)

    async def record_placeholder(
        self, request_id: str, placeholder_ts: str, *, fence: int, streamed: bool = False
    ) -> bool:
        """One UPDATE, fenced like `finish_request`; write-once (a takeover may rely on it)."""

        def body(conn: Connection) -> bool:
            cursor = conn.execute(
                "UPDATE requests SET placeholder_ts = ?, streamed = ?"
                " WHERE request_id = ? AND status = 'in_flight' AND placeholder_ts = '' AND " + _REQUEST_FENCE,
                (placeholder_ts, int(streamed), request_id, fence),
            )
            return cursor.rowcount == 1

        return await self._run("record_placeholder", body)

    async def finish_request(
        self,
        request_id: str,
        *,
        fence: int,
        outcome: Outcome,
        user_text: str,
        user_ts: str,
        reply_text: str,
        finished_at: float,
        detail: str = "",
        placeholder_ts: str = "",
    ) -> bool:
        """Close the request and append the exchange, in one transaction. Only a request
        still in flight, under the thread's current lease, is finished: a second call, an
        unknown id or a lost lease changes nothing, so the history can never get the
        exchange twice. Each of the user message and the reply is stored only if
        non-empty (recovery after a crash knows neither); both enter the model's context
        only when the outcome is 'answered'."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")

        def body(conn: Connection) -> bool:
            # One statement checks and closes: two replicas finishing the same request
            # (the owner, late, and the one taking it over) cannot both win.
            row = conn.execute(
                "UPDATE requests SET status = ?, finished_at = ?, detail = ?,"
                " placeholder_ts = CASE WHEN placeholder_ts = '' THEN ? ELSE placeholder_ts END"
                " WHERE request_id = ? AND status = 'in_flight' AND "
                + _REQUEST_FENCE
                + " RETURNING channel, thread_ts, placeholder_ts",
                (outcome, finished_at, detail, placeholder_ts, request_id, fence),
            ).fetchone()
            if row is None:
                return False
            channel, thread_ts, first_ts = row
            in_context = 1 if outcome == "answered" else 0
            exchange = [("user", user_text, user_ts)] if user_text else []
            if reply_text:
                # The placeholder message is edited into the reply, so it carries its ts.
                exchange.append(("assistant", reply_text, first_ts))
            if exchange:
                conn.executemany(
                    "INSERT INTO messages (channel, thread_ts, role, content, ts, request_id, in_context)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(channel, thread_ts, role, text, ts, request_id, in_context) for role, text, ts in exchange],
                )
            return True

        return await self._run("finish_request", body)

    async def request_record(self, request_id: str) -> RequestRecord | None:
        def body(conn: Connection) -> RequestRecord | None:
            row = conn.execute(
                "SELECT status, placeholder_ts FROM requests WHERE request_id = ?", (request_id,)
            ).fetchone()
            return RequestRecord(status=row[0], placeholder_ts=row[1]) if row is not None else None

        return await self._run("request_record", body, write=False)

    async def in_flight(self) -> list[InFlightRequest]:
        def body(conn: Connection) -> list[InFlightRequest]:
            rows = conn.execute(
                "SELECT request_id, channel, thread_ts, placeholder_ts, started_at, owner, user_ts, streamed"
                " FROM requests WHERE status = 'in_flight' ORDER BY started_at, request_id"
            ).fetchall()
            return [_in_flight(row) for row in rows]

        return await self._run("in_flight", body, write=False)

    async def abandoned_requests(self, *, replica_timeout: float) -> list[InFlightRequest]:
        def body(conn: Connection) -> list[InFlightRequest]:
            rows = conn.execute(
                "SELECT r.request_id, r.channel, r.thread_ts, r.placeholder_ts, r.started_at, r.owner, r.user_ts,"
                " r.streamed"
                " FROM requests r WHERE r.status = 'in_flight' AND ("
                " NOT EXISTS (SELECT 1 FROM replicas p WHERE p.replica_id = r.owner AND p.heartbeat_at > bot_now() - ?)"
                " OR NOT EXISTS (SELECT 1 FROM thread_leases l WHERE l.channel = r.channel"
                " AND l.thread_ts = r.thread_ts AND l.token = r.fence AND " + VALID_LEASE + "))"
                " ORDER BY r.started_at, r.request_id",
                (replica_timeout,),
            ).fetchall()
            return [_in_flight(row) for row in rows]

        return await self._run("abandoned_requests", body, write=False)

    # -- leases and heartbeats ---------------------------------------------------------

    async def acquire_lease(self, thread: ThreadKey, owner: str, *, ttl: float) -> int | None:
        """One upsert: a thread never leased gets token 1; a released or expired lease
        passes to `owner` with the next token; a valid one is left alone (no row back),
        unless `owner` holds it already: then it is a previous run of this replica that
        died holding it (a live one never asks twice, its in-process gate comes first).
        The row is kept after release so that tokens only ever grow."""

        def body(conn: Connection) -> int | None:
            row = conn.execute(
                "INSERT INTO thread_leases (channel, thread_ts, owner, token, expires_at)"
                " VALUES (?, ?, ?, 1, bot_now() + ?)"
                " ON CONFLICT (channel, thread_ts) DO UPDATE SET"
                " owner = excluded.owner, token = thread_leases.token + 1, expires_at = excluded.expires_at"
                " WHERE thread_leases.owner IN ('', excluded.owner) OR thread_leases.expires_at <= bot_now()"
                " RETURNING token",
                (thread.channel, thread.thread_ts, owner, ttl),
            ).fetchone()
            return None if row is None else int(row[0])

        return await self._run("acquire_lease", body)

    async def renew_leases(self, leases: Sequence[tuple[ThreadKey, int]], *, ttl: float) -> set[ThreadKey]:
        """Renewing after expiry is allowed while nobody took the thread meanwhile (the
        token would have changed): nobody else can have written under it. One UPDATE per
        `RENEW_BATCH` leases, a row-value IN list (SQLite ≥ 3.15, PostgreSQL), so the
        statement stays under either engine's limit on parameters."""
        leases = list(leases)
        if not leases:
            return set()

        def body(conn: Connection) -> set[ThreadKey]:
            renewed: set[ThreadKey] = set()
            for start in range(0, len(leases), RENEW_BATCH):
                chunk = leases[start : start + RENEW_BATCH]
                rows = conn.execute(
                    "UPDATE thread_leases SET expires_at = bot_now() + ?"
                    " WHERE owner <> '' AND (channel, thread_ts, token) IN (VALUES "
                    + ", ".join(["(?, ?, ?)"] * len(chunk))
                    + ") RETURNING channel, thread_ts",
                    (ttl, *(v for thread, token in chunk for v in (thread.channel, thread.thread_ts, token))),
                ).fetchall()
                renewed.update(ThreadKey(row[0], row[1]) for row in rows)
            return renewed

        return await self._run("renew_leases", body)

    async def release_lease(self, thread: ThreadKey, token: int) -> None:
        def body(conn: Connection) -> None:
            conn.execute(
                "UPDATE thread_leases SET owner = '', expires_at = 0 WHERE channel = ? AND thread_ts = ? AND token = ?",
                (thread.channel, thread.thread_ts, token),
            )

        await self._run("release_lease", body)

    async def heartbeat(self, replica: str) -> None:
        def body(conn: Connection) -> None:
            conn.execute(
                "INSERT INTO replicas (replica_id, started_at, heartbeat_at) VALUES (?, bot_now(), bot_now())"
                " ON CONFLICT (replica_id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                (replica,),
            )

        await self._run("heartbeat", body)

    async def forget_replica(self, replica: str) -> None:
        def body(conn: Connection) -> None:
            conn.execute("DELETE FROM replicas WHERE replica_id = ?", (replica,))

        await self._run("forget_replica", body)

    async def replicas(self) -> dict[str, float]:
        def body(conn: Connection) -> dict[str, float]:
            rows = conn.execute(
                "SELECT replica_id, bot_now() - heartbeat_at FROM replicas ORDER BY replica_id"
            ).fetchall()
            return {replica: float(age) for replica, age in rows}

        return await self._run("replicas", body, write=False)

    # -- user settings, feedback, one-time notices -------------------------------------

    async def load_preferences(self, user: str, thread: ThreadKey | None) -> PreferenceLayers:
        """All three layers in one read transaction, so they are mutually consistent."""
        wanted = [("workspace", ""), ("user", user)]
        if thread is not None:
            wanted.append(("thread", str(thread)))

        def body(conn: Connection) -> PreferenceLayers:
            found: dict[str, dict[str, object]] = {"workspace": {}, "user": {}, "thread": {}}
            for scope, key in wanted:
                row = conn.execute(
                    "SELECT prefs FROM preferences WHERE scope = ? AND scope_key = ?", (scope, key)
                ).fetchone()
                if row is not None:
                    found[scope] = _json_object(row[0])
            return PreferenceLayers(**found)

        return await self._run("load_preferences", body, write=False)

    async def save_preferences(
        self, scope: PreferenceScope, key: str, prefs: dict[str, object], *, updated_by: str
    ) -> None:
        if scope not in ("workspace", "user", "thread"):
            raise ValueError(f"scope must be workspace, user or thread, got {scope!r}")
        encoded = json.dumps(prefs, sort_keys=True)  # before the transaction: a bad value raises here

        def body(conn: Connection) -> None:
            if not prefs:
                conn.execute("DELETE FROM preferences WHERE scope = ? AND scope_key = ?", (scope, key))
                return
            conn.execute(
                "INSERT INTO preferences (scope, scope_key, prefs, updated_by, updated_at)"
                " VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (scope, scope_key) DO UPDATE SET"
                " prefs = excluded.prefs, updated_by = excluded.updated_by, updated_at = excluded.updated_at",
                (scope, key, encoded, updated_by, time.time()),
            )

        await self._run("save_preferences", body)

    async def record_feedback(self, channel: str, message_ts: str, user: str, rating: Rating) -> None:
        if rating not in ("good", "bad"):
            raise ValueError(f"rating must be good or bad, got {rating!r}")

        def body(conn: Connection) -> None:
            conn.execute(
                "INSERT INTO feedback (channel, message_ts, user_id, rating, recorded_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (channel, message_ts, user_id) DO UPDATE SET"
                " rating = excluded.rating, recorded_at = excluded.recorded_at",
                (channel, message_ts, user, rating, time.time()),
            )

        await self._run("record_feedback", body)

    async def feedback_for(self, channel: str, message_ts: str) -> dict[str, Rating]:
        def body(conn: Connection) -> dict[str, Rating]:
            rows = conn.execute(
                "SELECT user_id, rating FROM feedback WHERE channel = ? AND message_ts = ?", (channel, message_ts)
            ).fetchall()
            return {user: rating for user, rating in rows}

        return await self._run("feedback_for", body, write=False)

    async def claim_once(self, kind: str, key: str) -> bool:
        def body(conn: Connection) -> bool:
            row = conn.execute(
                "INSERT INTO said_once (kind, once_key, claimed_at) VALUES (?, ?, ?)"
                " ON CONFLICT DO NOTHING RETURNING kind",
                (kind, key, time.time()),
            ).fetchone()
            return row is not None

        return await self._run("claim_once", body)

    # -- images in a thread's conversation ---------------------------------------------

    async def add_thread_images(self, thread: ThreadKey, images: list[ThreadImage], *, keep: int) -> None:
        """Insert the images and trim the thread to its newest `keep`, in one transaction."""
        if not images:
            return

        def body(conn: Connection) -> None:
            now = time.time()
            conn.executemany(
                "INSERT INTO thread_images"
                " (channel, thread_ts, ts, name, mime, width, height, source, label, data, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [_image_row(thread, i, now) for i in images],
            )
            conn.execute(
                "DELETE FROM thread_images WHERE channel = ? AND thread_ts = ? AND id NOT IN"
                " (SELECT id FROM thread_images WHERE channel = ? AND thread_ts = ? ORDER BY id DESC LIMIT ?)",
                (thread.channel, thread.thread_ts, thread.channel, thread.thread_ts, max(keep, 0)),
            )

        await self._run("add_thread_images", body)

    async def thread_images(self, thread: ThreadKey, *, limit: int) -> list[ThreadImage]:
        if limit <= 0:
            return []

        def body(conn: Connection) -> list[ThreadImage]:
            rows = conn.execute(
                "SELECT name, mime, data, width, height, source, label, ts FROM thread_images"
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

        return await self._run("thread_images", body, write=False)

    # -- usage -------------------------------------------------------------------------

    async def record_usage(
        self, user: str, model: str, outcome: str, tokens_in: int, tokens_out: int, *, at: float, requests: int = 1
    ) -> None:
        """One upsert that adds to the day's row: concurrent requests (on any replica)
        each add their own, and nothing is read first that another could change."""
        if not isinstance(outcome, str) or not 0 < len(outcome) <= MAX_USAGE_OUTCOME:
            raise ValueError(f"outcome must be a short non-empty word, got {outcome!r}")
        for name, value in (("tokens_in", tokens_in), ("tokens_out", tokens_out), ("requests", requests)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a whole number ≥ 0, got {value!r}")
        day = datetime.fromtimestamp(at, UTC).date().isoformat()

        def body(conn: Connection) -> None:
            conn.execute(
                "INSERT INTO usage_daily (day, user_id, model, outcome, requests, tokens_in, tokens_out)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (day, user_id, model, outcome) DO UPDATE SET"
                " requests = usage_daily.requests + excluded.requests,"
                " tokens_in = usage_daily.tokens_in + excluded.tokens_in,"
                " tokens_out = usage_daily.tokens_out + excluded.tokens_out",
                (day, user, model, outcome, requests, tokens_in, tokens_out),
            )

        await self._run("record_usage", body)

    async def usage_totals(self, since: date, until: date) -> list[UsageTotal]:
        def body(conn: Connection) -> list[UsageTotal]:
            rows = conn.execute(
                "SELECT user_id, model, SUM(requests), SUM(tokens_in), SUM(tokens_out) FROM usage_daily"
                " WHERE day >= ? AND day < ? GROUP BY user_id, model"
                " ORDER BY SUM(tokens_in) + SUM(tokens_out) DESC, user_id, model",
                (since.isoformat(), until.isoformat()),
            ).fetchall()
            return [
                UsageTotal(user=user, model=model, requests=int(n), tokens_in=int(t_in), tokens_out=int(t_out))
                for user, model, n, t_in, t_out in rows
            ]

        return await self._run("usage_totals", body, write=False)

    async def user_usage(self, user: str, since: date, until: date) -> UsageSummary:
        def body(conn: Connection) -> UsageSummary:
            row = conn.execute(
                "SELECT SUM(requests), SUM(tokens_in), SUM(tokens_out) FROM usage_daily"
                " WHERE user_id = ? AND day >= ? AND day < ?",
                (user, since.isoformat(), until.isoformat()),
            ).fetchone()
            return _summary(row)

        return await self._run("user_usage", body, write=False)

    async def workspace_usage(self, since: date, until: date) -> UsageSummary:
        def body(conn: Connection) -> UsageSummary:
            row = conn.execute(
                "SELECT SUM(requests), SUM(tokens_in), SUM(tokens_out) FROM usage_daily WHERE day >= ? AND day < ?",
                (since.isoformat(), until.isoformat()),
            ).fetchone()
            return _summary(row)

        return await self._run("workspace_usage", body, write=False)

    async def aclose(self) -> None:
        await self.database.aclose()


def _ensure_thread(conn: Connection, thread: ThreadKey, created_at: float) -> None:
    conn.execute(
        "INSERT INTO threads (channel, thread_ts, created_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
        (thread.channel, thread.thread_ts, created_at),
    )


def _image_row(thread: ThreadKey, i: ThreadImage, now: float) -> tuple[object, ...]:
    return (thread.channel, thread.thread_ts, i.ts, i.name, i.mime, i.width, i.height, i.source, i.label, i.data, now)


def _in_flight(row: Sequence[Any]) -> InFlightRequest:
    request_id, channel, thread_ts, placeholder_ts, started_at, owner, user_ts, streamed = row
    return InFlightRequest(
        request_id=request_id,
        thread=ThreadKey(channel, thread_ts),
        placeholder_ts=placeholder_ts,
        started_at=float(started_at),
        owner=owner,
        user_ts=user_ts,
        streamed=bool(streamed),
    )


def _summary(row: Sequence[Any] | None) -> UsageSummary:
    """A SUM row (NULLs when no row matched; PostgreSQL sums BIGINTs as NUMERIC)."""
    requests, tokens_in, tokens_out = row if row is not None else (None, None, None)
    return UsageSummary(requests=int(requests or 0), tokens_in=int(tokens_in or 0), tokens_out=int(tokens_out or 0))


def _json_object(text: str) -> dict[str, object]:
    """A stored preferences blob; a damaged one reads as empty rather than failing every request."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        log.warning("stored preferences are not a JSON object; using the defaults")
        return {}
    return value
