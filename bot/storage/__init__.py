"""Storage: the `Store` interface, and `open_store`, the one place DATABASE_URL picks
the implementation (SQLite today)."""

from __future__ import annotations

from bot.config import sqlite_path
from bot.storage.base import HistoryMessage, InFlightRequest, Outcome, Store, ThreadKey
from bot.storage.sqlite import SQLiteStore, StorageError, StoreClosed

__all__ = [
    "HistoryMessage",
    "InFlightRequest",
    "Outcome",
    "SQLiteStore",
    "StorageError",
    "Store",
    "StoreClosed",
    "ThreadKey",
    "open_store",
]


async def open_store(database_url: str, *, inline: bool = False) -> Store:
    """Open the store named by `database_url`:

    * `sqlite:///relative/path.db` (relative to the working directory),
    * `sqlite:////absolute/path.db`,
    * `sqlite:///:memory:` (gone when closed; for tests).

    Anything else raises `ValueError`. `inline=True` runs database calls in the event
    loop thread (for deterministic simulations under a mock clock).
    """
    if not database_url.startswith("sqlite:///"):
        raise ValueError(
            f"unsupported DATABASE_URL {database_url!r}: only SQLite is supported, "
            "written sqlite:///relative/path.db, sqlite:////absolute/path.db or sqlite:///:memory:"
        )
    path = sqlite_path(database_url)
    if not path or path.endswith("/"):
        raise ValueError(
            f"DATABASE_URL {database_url!r} names no database file (expected sqlite:///path/to/bot.db)"
        )
    return await SQLiteStore.open(path, inline=inline)
