"""Usage and monthly budgets (`bot/usage.py`) on a real store, with the clock injected: the
month's bounds, the refusal at and over a budget with its one line, the reset at the
month's first instant, the workspace budget, unlimited, and storage that fails or hangs
(the request is allowed). Also the settings that set the defaults, and the budgets a
request resolves with its options."""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta, timezone

import anyio
import pytest

from bot import usage
from bot.config import ConfigError, load_settings
from bot.processing.context import Services
from bot.processing.options import options_for
from bot.storage import StorageError, UsageSummary, open_store
from bot.usage import (
    BudgetRefusal,
    Budgets,
    budgets_from,
    check_budget,
    month_bounds,
    month_usage,
    per_model,
    per_user,
    record_usage,
)
from tests.harness import test_settings

pytestmark = pytest.mark.anyio

BASE_ENV = {"SLACK_BOT_TOKEN": "xoxb-1-abc", "SLACK_APP_TOKEN": "xapp-1-abc", "OPENAI_API_KEY": "sk-abcdef123"}
LAST_SECOND_OF_2026 = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)
NEW_YEAR = datetime(2027, 1, 1, tzinfo=UTC)


@pytest.fixture
async def store():
    s = await open_store("sqlite:///:memory:")
    yield s
    await s.aclose()


async def spend(store, user: str, tokens_in: int, tokens_out: int = 0, *, at=LAST_SECOND_OF_2026, model="gpt-5-mini"):
    assert await record_usage(
        store, user=user, model=model, outcome="answered", tokens_in=tokens_in, tokens_out=tokens_out, now=at
    )


class BrokenStore:
    """Every call fails as a locked or lost database does."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name):
        async def fail(*args, **kwargs):
            self.calls.append(name)
            raise StorageError(f"{name} failed: database is locked")

        return fail


class HangingStore:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name):
        async def hang(*args, **kwargs):
            self.calls.append(name)
            await anyio.sleep_forever()

        return hang


# ---- the month ---------------------------------------------------------------------------


def test_month_bounds_are_the_calendar_month_in_utc():
    assert month_bounds(datetime(2026, 3, 15, 12, tzinfo=UTC)) == (
        datetime(2026, 3, 1, tzinfo=UTC),
        datetime(2026, 4, 1, tzinfo=UTC),
    )
    assert month_bounds(LAST_SECOND_OF_2026) == (datetime(2026, 12, 1, tzinfo=UTC), NEW_YEAR)
    assert month_bounds(NEW_YEAR) == (NEW_YEAR, datetime(2027, 2, 1, tzinfo=UTC))
    assert month_bounds(NEW_YEAR.timestamp()) == month_bounds(NEW_YEAR)  # epoch seconds
    assert month_bounds(datetime(2026, 2, 28, 23, 0)) == (  # naive: read as UTC
        datetime(2026, 2, 1, tzinfo=UTC),
        datetime(2026, 3, 1, tzinfo=UTC),
    )
    # 1 April 01:00 in UTC+2 is still 31 March in UTC.
    plus_two = timezone(timedelta(hours=2))
    assert month_bounds(datetime(2026, 4, 1, 1, 0, tzinfo=plus_two))[0] == datetime(2026, 3, 1, tzinfo=UTC)


# ---- budgets in force --------------------------------------------------------------------


def test_budgets_come_from_the_workspace_defaults_then_the_environment():
    settings = test_settings(user_monthly_tokens=1000, workspace_monthly_tokens=None)
    assert budgets_from(settings.budgets, {}) == Budgets(user=1000, workspace=None)
    stored = {"user_monthly_tokens": 50, "workspace_monthly_tokens": 9000}
    assert budgets_from(settings.budgets, stored) == Budgets(user=50, workspace=9000)
    # 0, absent or damaged: the environment's default applies.
    for damaged in (0, None, "50", True, -5, 2.5, 10**13):
        assert budgets_from(settings.budgets, {"user_monthly_tokens": damaged}) == Budgets(user=1000), damaged
    assert budgets_from(test_settings().budgets, {}).unlimited


def test_budget_settings_parse_and_default_to_unlimited():
    s = load_settings(BASE_ENV, dotenv_path=None)
    assert s.budgets.user_monthly_tokens is None and s.budgets.workspace_monthly_tokens is None
    s = load_settings(
        {**BASE_ENV, "USER_MONTHLY_TOKENS": "1,000,000", "WORKSPACE_MONTHLY_TOKENS": "50_000_000"}, dotenv_path=None
    )
    assert (s.budgets.user_monthly_tokens, s.budgets.workspace_monthly_tokens) == (1_000_000, 50_000_000)
    for unlimited in ("0", "", "  "):
        assert (
            load_settings({**BASE_ENV, "USER_MONTHLY_TOKENS": unlimited}, dotenv_path=None).budgets.user_monthly_tokens
            is None
        )
    for bad in ("lots", "-5", "1.5", "²", "9" * 14):
        with pytest.raises(ConfigError, match="USER_MONTHLY_TOKENS must be a whole number"):
            load_settings({**BASE_ENV, "USER_MONTHLY_TOKENS": bad}, dotenv_path=None)
    with pytest.raises(ConfigError, match="WORKSPACE_MONTHLY_TOKENS"):
        load_settings({**BASE_ENV, "WORKSPACE_MONTHLY_TOKENS": "many"}, dotenv_path=None)


async def test_a_request_resolves_its_budgets_with_its_options(store):
    services = Services(
        settings=test_settings(user_monthly_tokens=1000),
        openai=None,
        store=store,
        model_slots=anyio.CapacityLimiter(1),
    )
    assert (await options_for(services, "U1", None)).budgets == Budgets(user=1000)
    await store.save_preferences(
        "workspace", "", {"model": "gpt-4o", "workspace_monthly_tokens": 5000}, updated_by="UADMIN"
    )
    # A user's (or thread's) level cannot lift a budget: only the workspace defaults hold one.
    await store.save_preferences("user", "U1", {"user_monthly_tokens": 10**9}, updated_by="U1")
    options = await options_for(services, "U1", None)
    assert options.budgets == Budgets(user=1000, workspace=5000) and options.model == "gpt-4o"


# ---- the check -----------------------------------------------------------------------------


async def test_unlimited_never_reads_storage():
    broken = BrokenStore()
    assert await check_budget(broken, Budgets(), "U1", now=NEW_YEAR) is None
    assert broken.calls == []


async def test_refused_at_and_over_the_users_budget_with_one_clear_line(store):
    budgets = Budgets(user=1_000_000)
    await spend(store, "U1", 999_000, 999)
    assert await check_budget(store, budgets, "U1", now=LAST_SECOND_OF_2026) is None  # 1 token left
    await spend(store, "U1", 1)
    at_budget = await check_budget(store, budgets, "U1", now=LAST_SECOND_OF_2026)
    assert at_budget == BudgetRefusal("user", 1_000_000, 1_000_000, NEW_YEAR)
    await spend(store, "U1", 200_000, 34_567)
    over = await check_budget(store, budgets, "U1", now=LAST_SECOND_OF_2026)
    assert over is not None and over.kind == "user" and over.used == 1_234_567
    assert over.message == (
        "You have used 1,234,567 of your 1,000,000 tokens this month; your budget resets on 1 January (UTC)."
    )
    # The budget is each user's own: another user goes on.
    assert await check_budget(store, budgets, "U2", now=LAST_SECOND_OF_2026) is None


async def test_the_budget_resets_at_the_months_first_instant(store):
    budgets = Budgets(user=100)
    await spend(store, "U1", 150, at=LAST_SECOND_OF_2026)
    assert await check_budget(store, budgets, "U1", now=LAST_SECOND_OF_2026) is not None
    assert await check_budget(store, budgets, "U1", now=NEW_YEAR) is None  # a new month
    await spend(store, "U1", 60, 40, at=NEW_YEAR + timedelta(days=3))
    january = await check_budget(store, budgets, "U1", now=NEW_YEAR + timedelta(days=3))
    assert january is not None and january.used == 100 and january.resets_at == datetime(2027, 2, 1, tzinfo=UTC)
    assert "resets on 1 February (UTC)" in january.message


async def test_the_workspace_budget_counts_everyone(store):
    budgets = Budgets(user=1000, workspace=1500)
    await spend(store, "U1", 700)
    await spend(store, "U2", 700)
    assert await check_budget(store, budgets, "U3", now=LAST_SECOND_OF_2026) is None  # 1,400 of 1,500
    await spend(store, "U2", 100, 100, model="gpt-4o")
    refusal = await check_budget(store, budgets, "U3", now=LAST_SECOND_OF_2026)  # U3 used nothing
    assert refusal == BudgetRefusal("workspace", 1600, 1500, NEW_YEAR)
    assert refusal.message == (
        "This workspace has used 1,600 of its 1,500 tokens this month; the budget resets on 1 January (UTC)."
    )
    # A user over their own budget hears about their own first.
    await spend(store, "U3", 1000)
    assert (await check_budget(store, budgets, "U3", now=LAST_SECOND_OF_2026)).kind == "user"
    assert await check_budget(store, Budgets(workspace=10_000), "U3", now=LAST_SECOND_OF_2026) is None


async def test_a_storage_error_allows_the_request(caplog):
    broken = BrokenStore()
    with caplog.at_level(logging.WARNING, logger="bot.usage"):
        assert await check_budget(broken, Budgets(user=1, workspace=1), "U1", now=NEW_YEAR) is None
    assert broken.calls == ["user_usage"]
    assert "budget check for U1 failed" in caplog.text and "allowing the request" in caplog.text


async def test_a_hanging_store_allows_the_request_in_bounded_time(monkeypatch, caplog):
    monkeypatch.setattr(usage, "CHECK_SECONDS", 0.05)
    hanging = HangingStore()
    with caplog.at_level(logging.WARNING, logger="bot.usage"), anyio.fail_after(2):
        assert await check_budget(hanging, Budgets(workspace=1), "U1", now=NEW_YEAR) is None
    assert hanging.calls == ["workspace_usage"] and "took over" in caplog.text


# ---- recording -------------------------------------------------------------------------


async def test_record_usage_adds_up_and_never_raises(store, caplog):
    for outcome, tokens in (("answered", (10, 5)), ("timeout", (7, 0)), ("answered", (1, 1))):
        assert await record_usage(
            store,
            user="U1",
            model="gpt-5-mini",
            outcome=outcome,
            tokens_in=tokens[0],
            tokens_out=tokens[1],
            now=NEW_YEAR,
        )
    assert await store.user_usage("U1", date(2027, 1, 1), date(2027, 2, 1)) == UsageSummary(3, 18, 6)
    with caplog.at_level(logging.WARNING, logger="bot.usage"):
        assert not await record_usage(
            BrokenStore(), user="U1", model="m", outcome="answered", tokens_in=1, tokens_out=1, now=NEW_YEAR
        )
        assert not await record_usage(store, user="U1", model="m", outcome="", tokens_in=1, tokens_out=1, now=NEW_YEAR)
    assert caplog.text.count("not recorded") == 2 and "database is locked" in caplog.text
    assert await store.user_usage("U1", date(2027, 1, 1), date(2027, 2, 1)) == UsageSummary(3, 18, 6)  # unchanged


async def test_record_usage_gives_up_on_a_hanging_store():
    started = anyio.current_time()
    with anyio.fail_after(2):
        assert not await record_usage(
            HangingStore(),
            user="U1",
            model="m",
            outcome="answered",
            tokens_in=1,
            tokens_out=1,
            now=NEW_YEAR,
            timeout=0.05,
        )
    assert anyio.current_time() - started < 1


# ---- reading back -------------------------------------------------------------------------


async def test_month_usage_for_a_user_and_for_an_admin(store):
    for n in range(1, 8):  # U1 … U7, U7 the heaviest
        await spend(store, f"U{n}", n * 100, n)
    await spend(store, "U1", 5, 5, model="gpt-4o")
    mine = await month_usage(store, "U1", Budgets(user=1000), now=LAST_SECOND_OF_2026, admin=False)
    assert mine is not None and mine.mine == UsageSummary(2, 105, 6) and mine.workspace is None and mine.top_users == []
    assert mine.resets_at == NEW_YEAR and mine.budgets == Budgets(user=1000)
    admin = await month_usage(store, "U1", Budgets(), now=LAST_SECOND_OF_2026, admin=True)
    assert admin is not None and admin.workspace == UsageSummary(8, 2805, 33)
    assert [u.user for u in admin.top_users] == ["U7", "U6", "U5", "U4", "U3"]
    assert admin.top_users[0].usage == UsageSummary(1, 700, 7)
    assert await month_usage(store, "U1", Budgets(), now=NEW_YEAR, admin=True) == usage.MonthUsage(
        NEW_YEAR, datetime(2027, 2, 1, tzinfo=UTC), UsageSummary(), Budgets(), UsageSummary(), []
    )
    assert await month_usage(BrokenStore(), "U1", Budgets(), now=NEW_YEAR, admin=True) is None


async def test_totals_per_user_and_per_model(store):
    await spend(store, "U1", 10, 1, model="a")
    await spend(store, "U1", 20, 2, model="b")
    await spend(store, "U2", 50, 5, model="a")
    totals = await store.usage_totals(date(2026, 12, 1), date(2027, 1, 1))
    assert [(u.user, u.usage) for u in per_user(totals)] == [
        ("U2", UsageSummary(1, 50, 5)),
        ("U1", UsageSummary(2, 30, 3)),
    ]
    assert [(m.model, m.usage) for m in per_model(totals)] == [
        ("a", UsageSummary(2, 60, 6)),
        ("b", UsageSummary(1, 20, 2)),
    ]


def test_a_refused_request_ends_with_the_refusals_line():
    """A request that `check_budget` refused raises OverBudget; `describe` makes it the one
    line in the thread (kind over_budget, for logs and metrics)."""
    from bot.processing.failures import describe
    from bot.usage import OverBudget

    refusal = BudgetRefusal("user", 1_234_567, 1_000_000, NEW_YEAR)
    failure = describe(OverBudget(refusal))
    assert failure.kind == "over_budget"
    assert failure.message == (
        ":no_entry_sign: You have used 1,234,567 of your 1,000,000 tokens this month; "
        "your budget resets on 1 January (UTC)."
    )
