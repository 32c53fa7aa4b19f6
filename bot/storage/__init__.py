"""Storage: the `Store` interface, and `open_store`, the one place DATABASE_URL picks
the implementation (SQLite today). Nothing here imports the rest of the bot: the bot
depends on storage, never the other way round (timing lives in `bot.timed_store`)."""

from __future__ import annotations

from bot.storage.base import HistoryMessage, InFlightRequest, Outcome, StorageError, Store, StoreClosed, ThreadKey
from bot.storage.location import sqlite_file
from bot.storage.sqlite import SQLiteStore

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
    return await SQLiteStore.open(sqlite_file(database_url), inline=inline)
