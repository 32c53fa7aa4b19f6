"""`slackbot usage [--month YYYY-MM] [--csv]` as a user runs it: a real process on a
database the bot wrote usage to (SQLite, and PostgreSQL when a server is available), no
Slack tokens and no OpenAI key in its environment."""

from __future__ import annotations

import csv
import io
import time
from datetime import UTC, datetime

import pytest

from bot.cli import main
from bot.storage import open_store
from bot.usage import month_bounds, month_text
from tests.postgres import fresh_database
from tests.test_cli_tools import env_for, run_cli

pytestmark = pytest.mark.anyio

IN_MARCH = datetime(2026, 3, 14, 9, 30, tzinfo=UTC).timestamp()
IN_APRIL = datetime(2026, 4, 1, 0, 0, tzinfo=UTC).timestamp()


async def seed(url: str) -> None:
    store = await open_store(url)
    try:
        for user, model, outcome, tokens_in, tokens_out, at in (
            ("U1", "gpt-5-mini", "answered", 1200, 300, IN_MARCH),
            ("U1", "gpt-5-mini", "timeout", 800, 0, IN_MARCH),
            ("U1", "gpt-4o", "answered", 100, 50, IN_MARCH),
            ("U2", "gpt-5-mini", "answered", 5000, 2000, IN_MARCH),
            ("U3", "gpt-4o", "answered", 9, 9, IN_APRIL),  # another month
        ):
            await store.record_usage(user, model, outcome, tokens_in, tokens_out, at=at)
    finally:
        await store.aclose()


def rows(table: str, heading: str) -> dict[str, list[str]]:
    """A section of the table ("By user", "By model") as name -> its cells."""
    lines = table.splitlines()
    start = lines.index(heading) + 2  # the heading, then the column names
    section = []
    for line in lines[start:]:
        if not line.strip():
            break
        section.append(line.split())
    return {cells[0]: cells[1:] for cells in section}


async def test_the_table_has_totals_per_user_and_per_model(tmp_path):
    env = env_for(tmp_path, USER_MONTHLY_TOKENS="3000")  # no Slack tokens, no OpenAI key
    await seed(env["DATABASE_URL"])
    code, out, err = await run_cli(tmp_path, ["usage", "--month", "2026-03"], env)
    assert code == 0, err
    assert out.startswith("Usage in March 2026 (UTC)\n")
    assert "Total: 4 requests, 9,450 tokens (7,100 in, 2,350 out)" in out
    assert "Budgets: 3,000 tokens per user, unlimited for the workspace" in out
    # requests, tokens in, tokens out, tokens: every outcome and model added up per user
    assert rows(out, "By user") == {
        "U2": ["1", "5,000", "2,000", "7,000", "over", "budget"],
        "U1": ["3", "2,100", "350", "2,450"],
    }
    assert rows(out, "By model") == {
        "gpt-5-mini": ["3", "7,000", "2,300", "9,300"],
        "gpt-4o": ["1", "100", "50", "150"],
    }
    assert "U3" not in out  # April's usage is April's
    assert err == ""


async def test_csv_has_a_header_and_one_row_per_user_and_model(tmp_path):
    env = env_for(tmp_path)
    await seed(env["DATABASE_URL"])
    code, out, err = await run_cli(tmp_path, ["usage", "--month", "2026-03", "--csv"], env)
    assert code == 0, err
    table = list(csv.reader(io.StringIO(out)))
    assert table == [
        ["month", "user", "model", "requests", "tokens_in", "tokens_out", "tokens"],
        ["2026-03", "U1", "gpt-4o", "1", "100", "50", "150"],
        ["2026-03", "U1", "gpt-5-mini", "2", "2000", "300", "2300"],
        ["2026-03", "U2", "gpt-5-mini", "1", "5000", "2000", "7000"],
    ]
    code, out, _ = await run_cli(tmp_path, ["usage", "--month", "2026-05", "--csv"], env)
    assert code == 0 and out == "month,user,model,requests,tokens_in,tokens_out,tokens\n"  # an empty month


async def test_the_default_month_is_this_month_in_utc(tmp_path):
    env = env_for(tmp_path)
    store = await open_store(env["DATABASE_URL"])
    try:
        await store.record_usage("U7", "gpt-5-mini", "answered", 40, 2, at=time.time())
    finally:
        await store.aclose()
    code, out, err = await run_cli(tmp_path, ["usage"], env)
    assert code == 0, err
    start, _ = month_bounds(time.time())
    assert out.startswith(f"Usage in {month_text(start)} (UTC)\n")
    assert rows(out, "By user") == {"U7": ["1", "40", "2", "42"]}


def test_help_lists_the_command(capsys):
    assert main(["usage", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--month YYYY-MM" in out and "--csv" in out


@pytest.mark.parametrize("month", ["2026-13", "March", "2026-3", "26-03", "2026-00"])
async def test_a_bad_month_is_one_clear_line_and_exit_2(tmp_path, month):
    code, out, err = await run_cli(tmp_path, ["usage", "--month", month], env_for(tmp_path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "--month must be a month as YYYY-MM" in err and repr(month) in err


async def test_a_missing_database_is_said_and_not_created(tmp_path):
    code, out, err = await run_cli(tmp_path, ["usage"], env_for(tmp_path))
    assert code == 1 and out == ""
    assert "no database at" in err and err.count("\n") == 1
    assert not (tmp_path / "data").exists()


async def test_an_empty_month_says_so(tmp_path):
    env = env_for(tmp_path)
    await seed(env["DATABASE_URL"])
    code, out, _ = await run_cli(tmp_path, ["usage", "--month", "2025-12"], env)
    assert code == 0 and "Usage in December 2025 (UTC)" in out and "No usage recorded in this month." in out


@pytest.fixture
def postgres_url():
    yield from fresh_database()


async def test_usage_from_postgresql(tmp_path, postgres_url):
    await seed(postgres_url)
    code, out, err = await run_cli(
        tmp_path, ["usage", "--month", "2026-04"], env_for(tmp_path, DATABASE_URL=postgres_url)
    )
    assert code == 0, err
    assert rows(out, "By user") == {"U3": ["1", "9", "9", "18"]}
