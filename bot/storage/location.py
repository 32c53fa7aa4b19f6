"""DATABASE_URL → where the database is: the one place that reads the URL.

`bot.config` calls it to refuse a bad value at start-up (one line naming the variable),
`open_store` to pick the implementation, so the two can never disagree.
"""

from __future__ import annotations

SQLITE_PREFIX = "sqlite:///"
FORMS = "sqlite:///relative/path.db, sqlite:////absolute/path.db or sqlite:///:memory:"


def sqlite_file(database_url: str) -> str:
    """`sqlite:///data/bot.db` → `data/bot.db`; `sqlite:////abs/x.db` → `/abs/x.db`;
    `sqlite:///:memory:` → `:memory:`. Raises ValueError (saying what is wrong) for
    anything else."""
    if not database_url.startswith(SQLITE_PREFIX):
        raise ValueError(f"unsupported DATABASE_URL {database_url!r}: only SQLite is supported, written {FORMS}")
    path = database_url.removeprefix(SQLITE_PREFIX)
    if not path or path.endswith("/"):
        raise ValueError(f"DATABASE_URL {database_url!r} names no database file (expected {FORMS})")
    return path
