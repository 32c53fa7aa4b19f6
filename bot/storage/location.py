"""DATABASE_URL → which engine and where: the one place that reads the URL.

`bot.config` calls it to refuse a bad value at start-up (one line naming the variable),
`open_store` to pick the engine, so the two can never disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

SQLITE_PREFIX = "sqlite:///"
POSTGRES_SCHEMES = ("postgresql", "postgres")
FORMS = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db, sqlite:///:memory:"
    " or postgresql://user:password@host:5432/database"
)


@dataclass(frozen=True)
class Location:
    engine: Literal["sqlite", "postgresql"]
    target: str  # the SQLite file (or ":memory:"), or the PostgreSQL URL as given


def locate(database_url: str) -> Location:
    """Parse DATABASE_URL. Raises ValueError (saying what is wrong, never the password)."""
    scheme = database_url.split("://", 1)[0].lower() if "://" in database_url else ""
    if scheme in POSTGRES_SCHEMES:
        parts = urlsplit(database_url)
        if not parts.hostname and "host=" not in parts.query:
            raise ValueError(f"DATABASE_URL names no PostgreSQL host (expected {FORMS})")
        if not parts.path.strip("/"):
            raise ValueError(f"DATABASE_URL names no PostgreSQL database (expected {FORMS})")
        return Location("postgresql", database_url)
    return Location("sqlite", sqlite_file(database_url))


def sqlite_file(database_url: str) -> str:
    """`sqlite:///data/bot.db` → `data/bot.db`; `sqlite:////abs/x.db` → `/abs/x.db`;
    `sqlite:///:memory:` → `:memory:`. Raises ValueError (saying what is wrong) for
    anything else."""
    if not database_url.startswith(SQLITE_PREFIX):
        shown = database_url if "@" not in database_url else database_url.split("://", 1)[0] + "://…"
        raise ValueError(f"unsupported DATABASE_URL {shown!r}: expected {FORMS}")
    path = database_url.removeprefix(SQLITE_PREFIX)
    if not path or path.endswith("/"):
        raise ValueError(f"DATABASE_URL {database_url!r} names no database file (expected {FORMS})")
    return path


def redact(database_url: str) -> str:
    """The URL with any password replaced, for messages and logs."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", database_url)
