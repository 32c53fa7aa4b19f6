"""Usage and monthly token budgets: what each request cost, and whether the next may run.

Every request adds its tokens (in and out, from the stream's usage), its model, its user
and its outcome to storage, per UTC day (`record_usage`; one upsert that adds, so
replicas recording at once lose nothing). Budgets count tokens in + out over the
calendar month in UTC (`month_bounds`):

* `USER_MONTHLY_TOKENS` / `WORKSPACE_MONTHLY_TOKENS` are the defaults (unset, empty or
  0: unlimited);
* an admin's workspace defaults (the settings modal) may set either instead; they are
  stored with the workspace defaults under `BUDGET_KEYS` — keys that only that level
  holds (`bot.preferences.merge` ignores them at every level), so no user or thread
  setting can lift a budget. Empty or 0 there falls back to the environment's.

`check_budget` runs before a request takes a model slot: a user at or over their
budget, or a workspace at or over its own, gets one line (`BudgetRefusal.message`) and no
model call. It never blocks on storage: an error or a slow read allows the request (and
is logged). A request that passed is never cut later, so a month can end a little over
budget by what the requests running at the crossing used. Nothing here raises into a
request, and nothing imports Slack or processing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Literal

import anyio

from bot.config import MAX_MONTHLY_TOKENS, BudgetSettings
from bot.storage.base import Store, UsageSummary, UsageTotal

log = logging.getLogger(__name__)

# The workspace-defaults keys budgets are stored under (whole numbers of tokens; absent: the environment's).
USER_BUDGET_KEY = "user_monthly_tokens"
WORKSPACE_BUDGET_KEY = "workspace_monthly_tokens"
BUDGET_KEYS = (USER_BUDGET_KEY, WORKSPACE_BUDGET_KEY)
CHECK_SECONDS = 2.0  # a budget check slower than this allows the request: storage must not hold up answers
RECORD_SECONDS = 5.0  # bound on waiting to record one request's usage
READ_SECONDS = 2.0  # bound on the reads behind the Home tab's usage section
TOP_USERS = 5  # the Home tab shows admins this many of the heaviest users
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)


@dataclass(frozen=True)
class Budgets:
    """Monthly token budgets (tokens in + out); None: unlimited."""

    user: int | None = None  # each user's own
    workspace: int | None = None  # everyone's together

    @property
    def unlimited(self) -> bool:
        return self.user is None and self.workspace is None


def stored_budget(value: object) -> int | None:
    """A budget as the workspace defaults hold it: a positive whole number, else None
    (0, absent, or a damaged value: the environment's default applies)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_MONTHLY_TOKENS:
        return value
    return None


def default_budgets(config: BudgetSettings) -> Budgets:
    """The environment's budgets (USER_MONTHLY_TOKENS, WORKSPACE_MONTHLY_TOKENS)."""
    return Budgets(user=config.user_monthly_tokens or None, workspace=config.workspace_monthly_tokens or None)


def budgets_from(config: BudgetSettings, workspace: Mapping[str, object]) -> Budgets:
    """The budgets in force: the workspace defaults' (`PreferenceLayers.workspace`), each
    falling back to the environment's where none is stored."""
    defaults = default_budgets(config)
    return Budgets(
        user=stored_budget(workspace.get(USER_BUDGET_KEY)) or defaults.user,
        workspace=stored_budget(workspace.get(WORKSPACE_BUDGET_KEY)) or defaults.workspace,
    )


def _utc(now: datetime | float) -> datetime:
    if isinstance(now, datetime):
        return now.astimezone(UTC) if now.tzinfo else now.replace(tzinfo=UTC)
    return datetime.fromtimestamp(now, UTC)


def month_bounds(now: datetime | float) -> tuple[datetime, datetime]:
    """The calendar month (UTC) holding `now` (a datetime, naive read as UTC, or epoch
    seconds): its first instant and the next month's first instant."""
    moment = _utc(now)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    end = datetime(moment.year + 1, 1, 1, tzinfo=UTC) if moment.month == 12 else start.replace(month=moment.month + 1)
    return start, end


def month_days(start: datetime, end: datetime) -> tuple[date, date]:
    """`month_bounds` as the day range storage takes (`since` ≤ day < `until`)."""
    return start.date(), end.date()


def day_text(moment: datetime) -> str:
    """How a reset date is written: "1 January"."""
    return f"{moment.day} {MONTHS[moment.month - 1]}"


def month_text(start: datetime) -> str:
    """A month as the Home tab and `slackbot usage` name it: "March 2026"."""
    return f"{MONTHS[start.month - 1]} {start.year}"


@dataclass(frozen=True)
class BudgetRefusal:
    """A request refused before its model call: whose budget, how much of it was used,
    and when it resets. `message` is the one line the user reads."""

    kind: Literal["user", "workspace"]
    used: int  # tokens in + out this month
    budget: int
    resets_at: datetime  # the next month's first instant, UTC

    @property
    def message(self) -> str:
        if self.kind == "user":
            return (
                f"You have used {self.used:,} of your {self.budget:,} tokens this month; "
                f"your budget resets on {day_text(self.resets_at)} (UTC)."
            )
        return (
            f"This workspace has used {self.used:,} of its {self.budget:,} tokens this month; "
            f"the budget resets on {day_text(self.resets_at)} (UTC)."
        )


class OverBudget(Exception):
    """Raised by a request refused by `check_budget`, so it ends through the failure path
    with the refusal's line (`bot.processing.failures.describe` gives kind "over_budget")."""

    def __init__(self, refusal: BudgetRefusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


async def check_budget(store: Store, budgets: Budgets, user: str, *, now: datetime | float) -> BudgetRefusal | None:
    """None: `user` may go on; else why not (their own budget first, then the workspace's).

    Reads storage only for budgets that are set (unlimited costs nothing). A storage error
    or a read slower than CHECK_SECONDS allows the request, with a log line."""
    if budgets.unlimited:
        return None
    start, end = month_bounds(now)
    since, until = month_days(start, end)
    try:
        with anyio.move_on_after(CHECK_SECONDS) as scope:
            if budgets.user is not None:
                mine = await store.user_usage(user, since, until)
                if mine.tokens >= budgets.user:
                    return BudgetRefusal("user", mine.tokens, budgets.user, end)
            if budgets.workspace is not None:
                everyone = await store.workspace_usage(since, until)
                if everyone.tokens >= budgets.workspace:
                    return BudgetRefusal("workspace", everyone.tokens, budgets.workspace, end)
        if scope.cancelled_caught:
            log.warning("budget check for %s took over %gs; allowing the request", user, CHECK_SECONDS)
    except Exception as exc:  # StorageError above all; nothing here may cost the answer
        log.warning("budget check for %s failed (%s); allowing the request", user, exc)
    return None


async def record_usage(
    store: Store,
    *,
    user: str,
    model: str,
    outcome: str,
    tokens_in: int,
    tokens_out: int,
    now: datetime | float,
    timeout: float = RECORD_SECONDS,
    requests: int = 1,
) -> bool:
    """Add one request (`requests`: 0 for the tokens of a second model the request
    used) to the usage of `user` and `model` for the UTC day of `now`.
    Never raises (a cancellation still propagates): a storage error, a bad value or a
    wait longer than `timeout` seconds is logged and returns False."""
    at = _utc(now).timestamp()
    try:
        with anyio.move_on_after(timeout):
            await store.record_usage(
                user, model, outcome, max(0, tokens_in), max(0, tokens_out), at=at, requests=requests
            )
            return True
        log.warning("usage of %s (%s, %s) not recorded: storage took over %gs", user, model, outcome, timeout)
    except Exception as exc:
        log.warning("usage of %s (%s, %s) not recorded: %s", user, model, outcome, exc)
    return False


# ---- reading usage back: the Home tab and `slackbot usage` -------------------------------------


@dataclass(frozen=True)
class UserUsage:
    """One user's month, every model together."""

    user: str
    usage: UsageSummary


@dataclass(frozen=True)
class MonthUsage:
    """What the Home tab shows of the month: the user's own usage and budget; for admins
    also the workspace's total and budget and its heaviest users."""

    start: datetime
    resets_at: datetime
    mine: UsageSummary
    budgets: Budgets
    workspace: UsageSummary | None = None  # admins only
    top_users: list[UserUsage] = field(default_factory=list)  # admins only, the most tokens first


def _sums(totals: list[UsageTotal], by: Literal["user", "model"]) -> list[tuple[str, UsageSummary]]:
    sums: dict[str, UsageSummary] = {}
    for t in totals:
        name = t.user if by == "user" else t.model
        was = sums.get(name, UsageSummary())
        sums[name] = UsageSummary(was.requests + t.requests, was.tokens_in + t.tokens_in, was.tokens_out + t.tokens_out)
    return sorted(sums.items(), key=lambda item: (-item[1].tokens, item[0]))


def per_user(totals: list[UsageTotal]) -> list[UserUsage]:
    """Totals per user and model → per user, the most tokens first (then by user id)."""
    return [UserUsage(user, usage) for user, usage in _sums(totals, "user")]


@dataclass(frozen=True)
class ModelUsage:
    model: str
    usage: UsageSummary


def per_model(totals: list[UsageTotal]) -> list[ModelUsage]:
    """Totals per user and model → per model, the most tokens first (then by name)."""
    return [ModelUsage(model, usage) for model, usage in _sums(totals, "model")]


def overall(totals: list[UsageTotal]) -> UsageSummary:
    return UsageSummary(
        requests=sum(t.requests for t in totals),
        tokens_in=sum(t.tokens_in for t in totals),
        tokens_out=sum(t.tokens_out for t in totals),
    )


async def month_usage(
    store: Store, user: str, budgets: Budgets, *, now: datetime | float, admin: bool
) -> MonthUsage | None:
    """The Home tab's usage for `user` this month; None (logged) when storage fails or is slow."""
    start, end = month_bounds(now)
    since, until = month_days(start, end)
    try:
        with anyio.move_on_after(READ_SECONDS):
            mine = await store.user_usage(user, since, until)
            if not admin:
                return MonthUsage(start, end, mine, budgets)
            totals = await store.usage_totals(since, until)
            return MonthUsage(start, end, mine, budgets, overall(totals), per_user(totals)[:TOP_USERS])
        log.warning("usage for %s's Home tab took over %gs to read; left out", user, READ_SECONDS)
    except Exception as exc:
        log.warning("could not read usage for %s's Home tab (%s); left out", user, exc)
    return None
