"""Storage: the `Store` interface, one SQL implementation of it (`SQLStore`) on two
engines, and `open_store`, the one place DATABASE_URL picks the engine. Nothing here
imports the rest of the bot: the bot depends on storage, never the other way round
(timing lives in `bot.timed_store`)."""

from __future__ import annotations

from bot.storage.base import (
    HistoryMessage,
    InFlightRequest,
    Outcome,
    RequestRecord,
    StorageError,
    Store,
    StoreClosed,
    ThreadKey,
    UsageSummary,
    UsageTotal,
)
from bot.storage.location import locate
from bot.storage.sql_store import SQLStore
from bot.storage.sqlite import open_sqlite

__all__ = [
    "HistoryMessage",
    "InFlightRequest",
    "Outcome",
    "RequestRecord",
    "SQLStore",
    "StorageError",
    "Store",
    "StoreClosed",
    "ThreadKey",
    "UsageSummary",
    "UsageTotal",
    "open_store",
]


async def open_store(database_url: str, *, inline: bool = False) -> Store:
    """Open the store named by `database_url`:

    * `sqlite:///relative/path.db` (relative to the working directory),
    * `sqlite:////absolute/path.db`,
    * `sqlite:///:memory:` (gone when closed; for tests),
    * `postgresql://user:password@host:port/database` (several replicas may share it).

    Anything else raises `ValueError`. `inline=True` runs SQLite calls in the event
    loop thread (for deterministic simulations under a mock clock).
    """
    location = locate(database_url)
    if location.engine == "postgresql":
        if inline:
            raise ValueError("inline storage is SQLite only")
        from bot.storage.postgres import open_postgres  # psycopg loads only when PostgreSQL is used

        return await open_postgres(location.target)
    return await open_sqlite(location.target, inline=inline)
