"""Usage and budgets on the Slack surfaces, through the fake Slack's Socket Mode on Trio and
asyncio: the workspace defaults' two budget inputs (admins only, checked by the server),
their round trip into storage and back into the modal, the Home tab's usage (the user's
own; an admin's also the workspace's and its top users), and the message shortcuts,
which count against a budget like answers: refused with one line and no model call."""

from __future__ import annotations

import time

import anyio
import pytest

from bot.interactions.app_home import home_view
from bot.interactions.settings_modal import BudgetInputs, ModalContext, parse_submission, settings_view
from bot.preferences import Preferences
from bot.processing.options import options_for
from bot.storage import StorageError, UsageSummary
from bot.usage import Budgets, MonthUsage, UserUsage, month_bounds, month_days
from tests.block_kit import check_view
from tests.fakes.openai import FakeOpenAI
from tests.harness import running_bot
from tests.interactions.test_settings import form, open_modal

pytestmark = pytest.mark.anyio

MODEL = "gpt-4o-mini"
ADMIN = "UADMIN"
WORKSPACE_BUTTON = {"action_id": "open_settings_workspace", "type": "button", "value": "workspace"}


@pytest.fixture
def ai():
    return FakeOpenAI(models=("gpt-4o-mini", "gpt-4o", "o3-mini"))


def block_ids(view: dict) -> list[str]:
    return [b.get("block_id") for b in view["blocks"] if b.get("block_id")]


def element(view: dict, block_id: str) -> dict:
    return next(b for b in view["blocks"] if b.get("block_id") == block_id)["element"]


def budget_values(per_user: str | None = "", workspace: str | None = "") -> dict:
    """The budget inputs as Slack sends a `number_input` back (None when left empty)."""
    values = {}
    for key, value in (("user_monthly_tokens", per_user), ("workspace_monthly_tokens", workspace)):
        if value is not None:
            values[key] = {key: {"type": "number_input", "value": value or None}}
    return values


async def open_workspace_defaults(slack, user: str = ADMIN) -> tuple[str, dict]:
    """The Home tab's "Workspace defaults" button, as an admin clicks it."""
    before = set(slack.views)
    await slack.click(WORKSPACE_BUTTON, user=user)
    await slack.wait_until(lambda: set(slack.views) - before)
    view_id = (set(slack.views) - before).pop()
    return view_id, slack.views[view_id]


async def this_month(store, user: str) -> UsageSummary:
    return await store.user_usage(user, *month_days(*month_bounds(time.time())))


# ---- the workspace defaults' budget inputs ---------------------------------------------------


async def test_budget_inputs_are_whole_number_inputs_for_admins_only(slack, ai):
    async with running_bot(slack, ai, openai_model=MODEL, admin_users=frozenset({ADMIN}), user_monthly_tokens=5000):
        _, defaults = await open_workspace_defaults(slack)
        _, admins_own = await open_modal(slack, user=ADMIN)  # /settings: the admin's own level
        _, users = await open_modal(slack, user="U1")
    check_view(defaults)
    assert defaults["blocks"][0]["element"]["initial_option"]["value"] == "workspace"
    for key in ("user_monthly_tokens", "workspace_monthly_tokens"):
        budget = element(defaults, key)
        assert budget["type"] == "number_input" and budget["is_decimal_allowed"] is False
        assert budget["min_value"] == "0" and "initial_value" not in budget  # nothing stored yet
    assert element(defaults, "user_monthly_tokens")["placeholder"]["text"] == "Default: 5,000 tokens"  # from the env
    assert element(defaults, "workspace_monthly_tokens")["placeholder"]["text"] == "Default: unlimited"
    for view in (admins_own, users):
        assert not {"user_monthly_tokens", "workspace_monthly_tokens"} & set(block_ids(view))


async def test_budgets_round_trip_and_reach_the_next_requests_options(slack, ai):
    async with running_bot(slack, ai, openai_model=MODEL, admin_users=frozenset({ADMIN})) as nursery:
        store = nursery.services.store
        view_id, _ = await open_workspace_defaults(slack)
        values = {**form(scope="workspace", model=MODEL, temperature="0.3"), **budget_values("1000", "250000")}
        eid = await slack.submit_view(view_id, values, user=ADMIN)
        await slack.wait_acked(eid)
        assert slack.ack_payloads[eid] is None
        await slack.wait_until(lambda: ADMIN in slack.home_views)
        layers = await store.load_preferences("U2", None)
        assert layers.workspace == {"temperature": 0.3, "user_monthly_tokens": 1000, "workspace_monthly_tokens": 250000}
        # What check_budget gets for the next request (RequestOptions.budgets), for anyone.
        options = await options_for(nursery.services, "U2", None)
        assert options.budgets == Budgets(user=1000, workspace=250000) and options.temperature == 0.3
        # Opened again, the inputs show what is stored.
        _, again = await open_workspace_defaults(slack)
        check_view(again)
        assert element(again, "user_monthly_tokens")["initial_value"] == "1000"
        assert element(again, "workspace_monthly_tokens")["initial_value"] == "250000"
        # The workspace defaults saved from a modal without the inputs (/settings, "Save
        # for" switched to everyone) keep the budgets.
        view_id, plain = await open_modal(slack, user=ADMIN)
        assert "user_monthly_tokens" not in block_ids(plain)
        eid = await slack.submit_view(view_id, form(scope="workspace", model=MODEL, temperature="0.5"), user=ADMIN)
        await slack.wait_acked(eid)
        await _eventually_workspace(
            store, {"temperature": 0.5, "user_monthly_tokens": 1000, "workspace_monthly_tokens": 250000}
        )
        # A budget emptied (or 0) is gone: the environment's default (unlimited) applies.
        view_id, _ = await open_workspace_defaults(slack)
        values = {**form(scope="workspace", model=MODEL, temperature="0.5"), **budget_values("0", "")}
        eid = await slack.submit_view(view_id, values, user=ADMIN)
        await slack.wait_acked(eid)
        await _eventually_workspace(store, {"temperature": 0.5})
        # Forgetting the workspace defaults forgets the budgets with them.
        view_id, _ = await open_workspace_defaults(slack)
        values = {**form(scope="workspace", model=MODEL, temperature="0.5"), **budget_values("500", "")}
        eid = await slack.submit_view(view_id, values, user=ADMIN)
        await slack.wait_acked(eid)
        await _eventually_workspace(store, {"temperature": 0.5, "user_monthly_tokens": 500})
        view_id, _ = await open_workspace_defaults(slack)
        values = {**form(scope="workspace", model=MODEL, reset=True), **budget_values("500", "")}
        eid = await slack.submit_view(view_id, values, user=ADMIN)
        await slack.wait_acked(eid)
        await _eventually_workspace(store, {})


async def _eventually_workspace(store, expected: dict) -> None:
    """Wait until the workspace level holds exactly `expected` (saving runs after the ack)."""
    with anyio.fail_after(5):
        while (await store.load_preferences("U1", None)).workspace != expected:
            await anyio.sleep(0.01)


async def test_only_admins_can_set_budgets_and_crafted_values_are_refused(slack, ai):
    async with running_bot(slack, ai, openai_model=MODEL, admin_users=frozenset({ADMIN})) as nursery:
        # A user's crafted submission for the workspace, with budgets: the scope is refused.
        view_id, _ = await open_modal(slack, user="U1")
        crafted = {**form(scope="workspace", model=MODEL), **budget_values("1", "1")}
        eid = await slack.submit_view(view_id, crafted, user="U1")
        await slack.wait_acked(eid)
        assert set(slack.ack_payloads[eid]["errors"]) == {"scope"}
        # An admin's crafted numbers are refused beside the field.
        view_id, _ = await open_workspace_defaults(slack)
        for per_user, workspace, expected in (
            ("-5", "", {"user_monthly_tokens"}),
            ("1.5", "many", {"user_monthly_tokens", "workspace_monthly_tokens"}),
            ("", "9" * 14, {"workspace_monthly_tokens"}),
        ):
            eid = await slack.submit_view(
                view_id, {**form(scope="workspace", model=MODEL), **budget_values(per_user, workspace)}, user=ADMIN
            )
            await slack.wait_acked(eid)
            ack = slack.ack_payloads[eid]
            assert ack["response_action"] == "errors" and set(ack["errors"]) == expected, (per_user, workspace)
        assert ack["errors"]["workspace_monthly_tokens"].startswith("Enter a whole number of tokens")
        # Budget fields sent with the user's own level are not read (they belong to the workspace).
        view_id, _ = await open_modal(slack, user=ADMIN)
        eid = await slack.submit_view(view_id, {**form(model=MODEL), **budget_values("7", "7")}, user=ADMIN)
        await slack.wait_acked(eid)
        assert slack.ack_payloads[eid] is None
        await slack.wait_until(lambda: ADMIN in slack.home_views)
        layers = await nursery.services.store.load_preferences(ADMIN, None)
    assert layers.workspace == {} and layers.user == {}


def test_parse_submission_reads_budgets_for_the_workspace_level_only():
    def parsed(scope: str, user: str = ADMIN, **budgets):
        view = {"state": {"values": {**form(scope=scope, model=MODEL), **budget_values(**budgets)}}}
        return parse_submission(view, user=user, admins=frozenset({ADMIN}))

    ok = parsed("workspace", per_user="1000", workspace="0")
    assert ok.errors == {} and ok.form["user_monthly_tokens"] == 1000 and ok.form["workspace_monthly_tokens"] is None
    assert parsed("workspace", per_user="", workspace=None).form["user_monthly_tokens"] is None
    assert "workspace_monthly_tokens" not in parsed("workspace", per_user="", workspace=None).form
    assert "user_monthly_tokens" not in parsed("user", per_user="5").form
    assert parsed("workspace", per_user="²").errors == {
        "user_monthly_tokens": parsed("workspace", per_user="x").errors["user_monthly_tokens"]
    }


async def test_changing_the_model_keeps_the_typed_budgets(slack, ai):
    async with running_bot(slack, ai, openai_model=MODEL, admin_users=frozenset({ADMIN})):
        view_id, view = await open_workspace_defaults(slack)
        old_hash = view["hash"]
        choice = {
            "action_id": "model",
            "block_id": "model",
            "type": "static_select",
            "selected_option": {"value": "o3-mini"},
        }
        values = {**form(scope="workspace", model="o3-mini", temperature="0.5"), **budget_values("1234", "")}
        await slack.click(choice, user=ADMIN, view_id=view_id, values=values)
        await slack.wait_until(lambda: slack.views[view_id]["hash"] != old_hash)
        rebuilt = slack.views[view_id]
    check_view(rebuilt)
    assert element(rebuilt, "user_monthly_tokens")["initial_value"] == "1234"
    assert "initial_value" not in element(rebuilt, "workspace_monthly_tokens")


# ---- the Home tab ------------------------------------------------------------------------


async def test_the_home_tab_shows_the_users_usage_and_budget(slack, ai):
    async with running_bot(slack, ai, user_monthly_tokens=1000) as nursery:
        store = nursery.services.store
        now = time.time()
        await store.record_usage("U1", MODEL, "answered", 120, 30, at=now)
        await store.record_usage("U1", "gpt-4o", "timeout", 100, 0, at=now)
        await store.record_usage("U2", MODEL, "answered", 9000, 9000, at=now)
        await slack.send_app_event({"type": "app_home_opened", "user": "U1", "channel": "D1", "tab": "home"})
        await slack.wait_until(lambda: "U1" in slack.home_views)
        home = slack.home_views["U1"]
    check_view(home)
    text = str(home["blocks"])
    start, end = month_bounds(now)
    assert f"Your usage in {start:%B %Y}" in text
    assert "250 tokens (220 in, 30 out) in 2 requests" in text
    assert f"Your budget: 1,000 tokens a month, 25% used; it resets on 1 {end:%B} (UTC)." in text
    assert "Workspace usage" not in text and "U2" not in text  # others' usage is for admins


async def test_an_admin_also_sees_the_workspace_and_the_top_five_users(slack, ai):
    async with running_bot(slack, ai, admin_users=frozenset({ADMIN}), workspace_monthly_tokens=10_000) as nursery:
        store = nursery.services.store
        now = time.time()
        for n in range(1, 8):
            await store.record_usage(f"U{n}", MODEL, "answered", n * 100, 0, at=now)
        await slack.send_app_event({"type": "app_home_opened", "user": ADMIN, "channel": "D9", "tab": "home"})
        await slack.wait_until(lambda: ADMIN in slack.home_views)
        home = slack.home_views[ADMIN]
    check_view(home)
    text = "\n".join(b["text"]["text"] for b in home["blocks"] if b["type"] == "section")
    assert "0 tokens (0 in, 0 out) in 0 requests" in text  # the admin's own
    assert "2,800 tokens (2,800 in, 0 out) in 7 requests" in text
    assert "Workspace budget: 10,000 tokens a month, 28% used" in text
    top = [line for line in text.splitlines() if line[:2] in {f"{n}." for n in range(1, 10)}]
    assert top == [
        "1. <@U7> — 700 tokens, 1 request",
        "2. <@U6> — 600 tokens, 1 request",
        "3. <@U5> — 500 tokens, 1 request",
        "4. <@U4> — 400 tokens, 1 request",
        "5. <@U3> — 300 tokens, 1 request",
    ]


async def test_the_home_tab_opens_when_usage_cannot_be_read(slack, ai):
    from bot.storage import open_store

    store = await open_store("sqlite:///:memory:")

    class NoUsage:
        def __getattr__(self, name):
            return getattr(store, name)

        async def user_usage(self, *args, **kwargs):
            raise StorageError("user_usage failed: database is locked")

    try:
        async with running_bot(slack, ai, store=NoUsage()):
            await slack.send_app_event({"type": "app_home_opened", "user": "U1", "channel": "D1", "tab": "home"})
            await slack.wait_until(lambda: "U1" in slack.home_views)
            home = slack.home_views["U1"]
    finally:
        await store.aclose()
    check_view(home)
    assert "Not available right now" in str(home["blocks"]) and "Your settings" in str(home["blocks"])


def test_home_and_modal_builders_stay_valid_at_their_largest():
    start, end = month_bounds(time.time())
    huge = UsageSummary(10**12, 10**12, 10**12)
    usage = MonthUsage(
        start,
        end,
        huge,
        Budgets(user=1, workspace=10**12),
        workspace=huge,
        top_users=[UserUsage("W" + "X" * 20 + str(n), huge) for n in range(5)],
    )
    for is_admin in (False, True):
        view = home_view(Preferences(model=MODEL), command="/settings", is_admin=is_admin, usage=usage)
        check_view(view)
        assert ("Top users" in str(view)) is is_admin and "*all used*" in str(view)
    modal = settings_view(
        Preferences(model=MODEL),
        [],
        configured_model=MODEL,
        scope="workspace",
        context=ModalContext(),
        is_admin=True,
        budgets=BudgetInputs(stored=Budgets(user=10**12, workspace=1), defaults=Budgets(user=10**12, workspace=10**12)),
    )
    check_view(modal)
    assert element(modal, "user_monthly_tokens")["initial_value"] == str(10**12)


# ---- the message shortcuts count against budgets --------------------------------------------


async def test_a_shortcut_over_budget_gets_the_line_and_no_model_call(slack, ai):
    async with running_bot(slack, ai, openai_model=MODEL, user_monthly_tokens=100) as nursery:
        store = nursery.services.store
        ts = slack.add_user_message("C1", "U2", "Good morning, team!")
        # Under budget: translated, and its tokens recorded.
        await slack.message_shortcut("translate_message", "C1", ts)
        await slack.wait_until(lambda: any("Echo: Good morning" in str(v["blocks"]) for v in slack.views.values()))
        used = await this_month(store, "U1")
        assert used.requests == 1 and used.tokens_out > 0 and used.tokens_in > 0
        calls = len(ai.requests)
        await store.record_usage("U1", MODEL, "answered", 100, 0, at=time.time())  # now over
        await slack.message_shortcut("translate_message", "C1", ts)
        await slack.wait_until(lambda: any("You have used" in str(v["blocks"]) for v in slack.views.values()))
        refused = next(v for v in slack.views.values() if "You have used" in str(v["blocks"]))
        assert len(ai.requests) == calls  # no model call
        assert (await this_month(store, "U1")).requests == 2  # and nothing recorded for the refusal
        # Another user is not over their own budget.
        await slack.message_shortcut("translate_message", "C1", ts, user="U3")
        await slack.wait_until(lambda: len(ai.requests) == calls + 1)
    check_view(refused)
    text = refused["blocks"][0]["text"]["text"]
    assert text.startswith(f"You have used {100 + used.tokens:,} of your 100 tokens this month")
    assert "your budget resets on 1 " in text and "(UTC)" in text
