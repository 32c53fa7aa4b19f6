"""A fresh PostgreSQL database per test, on the throwaway server `.ci/run` starts.

`TEST_POSTGRES_URL` names a database on that server (`.ci/postgres start` prints one).
Without it the PostgreSQL tests are skipped — unless `REQUIRE_POSTGRES=1` (set by
`.ci/run`), when a missing server fails them instead of hiding them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest


def server_url() -> str:
    url = os.environ.get("TEST_POSTGRES_URL", "").strip()
    if not url:
        if os.environ.get("REQUIRE_POSTGRES") == "1":
            pytest.fail("REQUIRE_POSTGRES=1 but TEST_POSTGRES_URL is not set: start one with .ci/postgres")
        pytest.skip("no PostgreSQL: set TEST_POSTGRES_URL (see .ci/postgres)")
    return url


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def fresh_database() -> Iterator[str]:
    """Create an empty database, yield its URL, drop it afterwards."""
    import psycopg

    url = server_url()
    name = "t_" + uuid.uuid4().hex[:16]
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(url, name)
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
