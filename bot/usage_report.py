"""`slackbot usage [--month YYYY-MM] [--csv]`: a month's tokens per user and per model.

Reads the database named by DATABASE_URL (opening it applies pending migrations, as the
bot does) and needs nothing else: no Slack tokens, no OpenAI key. The month is a
calendar month in UTC, the one budgets count. The table is for people; `--csv` gives one
row per user and model (every outcome added up) with a header row, for a spreadsheet.
"""

from __future__ import annotations

import csv
import io
import re
from datetime import UTC, datetime

import anyio

from bot.config import Settings
from bot.storage import StorageError, UsageSummary, UsageTotal, open_store
from bot.storage.location import locate
from bot.usage import Budgets, budgets_from, month_bounds, month_days, month_text, overall, per_model, per_user

CSV_HEADER = ("month", "user", "model", "requests", "tokens_in", "tokens_out", "tokens")


class MonthError(ValueError):
    """`--month` is not a month."""


def parse_month(text: str | None, *, now: datetime | None = None) -> datetime:
    """The first instant (UTC) of the month `text` names (YYYY-MM); None: this month."""
    if text is None:
        return month_bounds(now or datetime.now(UTC))[0]
    match = re.fullmatch(r"(\d{4})-(\d{2})", text.strip())
    if not match or not 1 <= int(match[2]) <= 12 or int(match[1]) < 1970:
        example = month_bounds(now or datetime.now(UTC))[0].strftime("%Y-%m")
        raise MonthError(f"--month must be a month as YYYY-MM (for example {example}), got {text!r}")
    return datetime(int(match[1]), int(match[2]), 1, tzinfo=UTC)


async def usage_report(settings: Settings, start: datetime, as_csv: bool) -> tuple[int, str]:
    """(exit code, text): 0 and the report, or 1 and one line saying why the database
    could not be read. A SQLite file that does not exist is not created."""
    location = locate(settings.storage.database_url)
    if location.engine == "sqlite" and location.target != ":memory:" and not await anyio.Path(location.target).exists():
        return 1, f"slackbot: no database at {location.target} (DATABASE_URL): no usage recorded there yet\n"
    start, end = month_bounds(start)
    since, until = month_days(start, end)
    try:
        store = await open_store(settings.storage.database_url)
    except StorageError as exc:
        return 1, f"slackbot: cannot read usage: {exc}\n"  # the error names the database, password hidden
    try:
        totals = await store.usage_totals(since, until)
        workspace = (await store.load_preferences("", None)).workspace
    except StorageError as exc:
        return 1, f"slackbot: cannot read usage: {exc}\n"
    finally:
        await store.aclose()
    if as_csv:
        return 0, render_csv(totals, start)
    return 0, render_table(totals, start, budgets_from(settings.budgets, workspace))


def render_csv(totals: list[UsageTotal], start: datetime) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    month = start.strftime("%Y-%m")
    for t in sorted(totals, key=lambda t: (t.user, t.model)):
        writer.writerow((month, t.user, t.model, t.requests, t.tokens_in, t.tokens_out, t.tokens))
    return out.getvalue()


def _budget(budget: int | None) -> str:
    return "unlimited" if budget is None else f"{budget:,} tokens"


def render_table(totals: list[UsageTotal], start: datetime, budgets: Budgets) -> str:
    month = month_text(start)
    lines = [f"Usage in {month} (UTC)"]
    budget_line = f"Budgets: {_budget(budgets.user)} per user, {_budget(budgets.workspace)} for the workspace"
    if not totals:
        return "\n".join([*lines, "No usage recorded in this month.", budget_line]) + "\n"
    total = overall(totals)
    lines += [
        f"Total: {_summary_text(total)}",
        budget_line,
        "",
        "By user",
        *_table("user", [(u.user, u.usage) for u in per_user(totals)], budgets.user),
        "",
        "By model",
        *_table("model", [(m.model, m.usage) for m in per_model(totals)], None),
    ]
    return "\n".join(lines) + "\n"


def _summary_text(s: UsageSummary) -> str:
    requests = "1 request" if s.requests == 1 else f"{s.requests:,} requests"
    return f"{requests}, {s.tokens:,} tokens ({s.tokens_in:,} in, {s.tokens_out:,} out)"


def _table(first: str, rows: list[tuple[str, UsageSummary]], budget: int | None) -> list[str]:
    """Aligned columns; with a budget, a user at or over it is marked."""
    header = (first, "requests", "tokens in", "tokens out", "tokens")
    cells = [header] + [
        (name, f"{s.requests:,}", f"{s.tokens_in:,}", f"{s.tokens_out:,}", f"{s.tokens:,}") for name, s in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        line = "  ".join(
            [row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))]
        )
        if n and budget is not None and rows[n - 1][1].tokens >= budget:
            line += "  over budget"
        lines.append("  " + line.rstrip())
    return lines
