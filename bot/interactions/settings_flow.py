"""The settings modal's life: open it, rebuild it when the model changes, save a submission.

Opening must beat Slack's 3-second trigger window, so the model list (cached), the
stored settings and — when no language is saved at any level — the user's Slack locale
(cached; the modal's first guess at their language) are read with short bounds, the model
list alongside the other two, and the modal opens with what is at hand.
A submission is validated in the ack (see `settings_modal.parse_submission`); by the time
`save` runs the modal has closed, so a storage failure is told to the user in a DM
rather than lost.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, cast

import anyio

from bot.interactions.access import refusal
from bot.interactions.app_home import home_view, publish_home
from bot.interactions.languages import language_for_locale
from bot.interactions.locales import UserLocales
from bot.interactions.model_catalog import ModelCatalog
from bot.interactions.settings_modal import (
    BudgetInputs,
    ModalContext,
    Submission,
    parse_submission,
    settings_view,
)
from bot.preferences import baseline, below, changes, load_layers, merge, thread_key
from bot.services import SlackServices
from bot.slack.web_api import SlackAPIError
from bot.storage.base import PreferenceLayers, PreferenceScope
from bot.usage import (
    BUDGET_KEYS,
    USER_BUDGET_KEY,
    WORKSPACE_BUDGET_KEY,
    Budgets,
    budgets_from,
    default_budgets,
    month_usage,
    stored_budget,
)

log = logging.getLogger(__name__)

MODELS_TIMEOUT = 1.2  # of the 3 s a trigger_id lives
LAYERS_TIMEOUT = 1.0
SAVE_FAILED = ":warning: Sorry, I could not save your settings ({why}). Nothing changed; please try again in a moment."


def _level(layers: PreferenceLayers, scope: str) -> dict[str, object]:
    return {"workspace": layers.workspace, "user": layers.user, "thread": layers.thread}[scope]


def _budget_inputs(services: SlackServices, stored: dict[str, object]) -> BudgetInputs:
    """The budget fields of the workspace defaults: what `stored` (that level, or the form
    being rebuilt) holds, over the environment's defaults."""
    return BudgetInputs(
        stored=Budgets(
            user=stored_budget(stored.get(USER_BUDGET_KEY)), workspace=stored_budget(stored.get(WORKSPACE_BUDGET_KEY))
        ),
        defaults=default_budgets(services.settings.budgets),
    )


def with_budgets(stored: dict[str, object], form: dict[str, object], level: dict[str, object]) -> dict[str, object]:
    """What the workspace level stores: `stored` (its preferences) plus the budgets — as
    the form set them, or, for a field the modal did not show, as `level` held them
    (so saving the defaults from a modal without the budget fields keeps them)."""
    result = dict(stored)
    for key in BUDGET_KEYS:
        value = stored_budget(form[key] if key in form else level.get(key))
        if value is not None:
            result[key] = value
    return result


def _no_language_saved(layers: PreferenceLayers, scope: str) -> bool:
    """Whether the modal may start from the user's Slack locale: nobody chose a language at
    any level that applies (a workspace default counts; the defaults themselves never
    start from one admin's locale)."""
    if scope == "workspace":
        return False
    levels = [layers.workspace, layers.user] + ([layers.thread] if scope == "thread" else [])
    return not any("language" in level for level in levels)


async def open_settings(
    services: SlackServices,
    catalog: ModelCatalog,
    *,
    user: str,
    trigger_id: str,
    context: ModalContext,
    scope: str | None = None,
    locales: UserLocales | None = None,
) -> bool:
    """Open the modal on `trigger_id`, showing the settings saved at `scope` (with what
    lies beneath them). False (logged) when Slack refused."""
    settings = services.settings
    is_admin = user in settings.surfaces.admin_users
    if scope is None or (scope == "workspace" and not is_admin) or (scope == "thread" and not context.thread):
        scope = "thread" if context.thread else "user"
    models: list[str] = []

    async def fetch_models() -> None:
        models.extend(await catalog.models(services.openai, timeout=MODELS_TIMEOUT))

    async with anyio.create_task_group() as tg:
        tg.start_soon(fetch_models)
        layers = await load_layers(services.store, user, context.thread, timeout=LAYERS_TIMEOUT)
        shown = merge(below(layers, settings, scope), _level(layers, scope))
        if locales is not None and _no_language_saved(layers, scope):
            language = language_for_locale(await locales.locale(services.slack, user))
            if language:
                shown = dataclasses.replace(shown, language=language)
    view = settings_view(
        shown,
        models,
        configured_model=settings.openai.model,
        scope=scope,
        context=context,
        is_admin=is_admin,
        budgets=_budget_inputs(services, layers.workspace) if scope == "workspace" else None,
    )
    try:
        await services.slack.call("views.open", trigger_id=trigger_id, view=view)
        return True
    except SlackAPIError as exc:
        log.warning("could not open the settings modal for %s: %s", user, exc.error)
        return False


async def model_changed(services: SlackServices, catalog: ModelCatalog, payload: dict[str, Any]) -> None:
    """The model menu changed: rebuild the modal so it asks for a temperature or a
    reasoning effort, whichever the new model takes; other fields keep what was typed."""
    view = payload.get("view") or {}
    user = (payload.get("user") or {}).get("id", "")
    submission = parse_submission(view, user=user, admins=services.settings.surfaces.admin_users)
    settings = services.settings
    layers = await load_layers(services.store, user, submission.thread)
    scope = submission.scope if submission.scope in ("user", "thread", "workspace") else "user"
    base = merge(below(layers, settings, scope), _level(layers, scope))
    valid = {k: v for k, v in submission.form.items() if k not in submission.errors}
    shown = merge(base, valid)
    models = await catalog.models(services.openai, timeout=MODELS_TIMEOUT)
    # The budget fields keep what was typed (or what is stored, for one not typed validly).
    budgets = _budget_inputs(services, {**layers.workspace, **valid}) if scope == "workspace" else None
    new_view = settings_view(
        shown,
        models,
        configured_model=settings.openai.model,
        scope=scope,
        context=ModalContext.decode(view.get("private_metadata")),
        is_admin=user in settings.surfaces.admin_users,
        budgets=budgets,
    )
    try:
        await services.slack.call("views.update", view_id=view.get("id"), hash=view.get("hash"), view=new_view)
    except SlackAPIError as exc:
        # hash_conflict: the user changed something else meanwhile; their next change retries.
        log.info("could not rebuild the settings modal for %s: %s", user, exc.error)


async def save(services: SlackServices, payload: dict[str, Any]) -> Submission | None:
    """Store a submitted modal at the chosen level and refresh the user's Home tab.
    Returns what was saved, or None (with the reason told to the user) if nothing was."""
    settings = services.settings
    user = (payload.get("user") or {}).get("id")
    if not isinstance(user, str) or not user:
        log.warning("settings submission without a user; ignored")
        return None
    submission = parse_submission(payload.get("view"), user=user, admins=settings.surfaces.admin_users)
    if submission.errors:
        # Already shown in the modal through the ack; the modal stayed open.
        log.info("settings from %s not saved: %s", user, ", ".join(sorted(submission.errors)))
        return None
    if submission.scope == "thread" and submission.thread is not None:
        key = thread_key(submission.thread)
    else:
        key = "" if submission.scope == "workspace" else user
    try:
        layers = await services.store.load_preferences(user, submission.thread)
        base = below(layers, settings, submission.scope)
        stored = {} if submission.reset else changes(base, merge(base, submission.form))
        if submission.scope == "workspace" and not submission.reset:
            stored = with_budgets(stored, submission.form, layers.workspace)
        # Without errors the scope is one of SCOPE_LABELS (user, thread, workspace): parse_submission
        # reports any other as an error.
        scope = cast(PreferenceScope, submission.scope)
        await services.store.save_preferences(scope, key, stored, updated_by=user)
    except Exception as exc:
        log.error("could not save settings for %s (%s): %s", user, submission.scope, exc)
        await _tell(services, user, SAVE_FAILED.format(why="the database is not available"))
        return None
    log.info("settings saved for %s at %s level: %s", user, submission.scope, sorted(stored) or "reset")
    await refresh_home(services, user)
    return submission


async def refresh_home(services: SlackServices, user: str) -> None:
    """Publish the Home tab with the user's settings (theirs over the workspace defaults)
    and their usage this month (an admin's also shows the workspace's)."""
    settings = services.settings
    is_admin = user in settings.surfaces.admin_users
    allowed = not refusal(settings.surfaces, user, None)
    layers = await load_layers(services.store, user, None)
    prefs = merge(baseline(settings), layers.workspace, layers.user)
    usage = None
    if allowed:
        budgets = budgets_from(settings.budgets, layers.workspace)
        usage = await month_usage(services.store, user, budgets, now=time.time(), admin=is_admin)
    view = home_view(
        prefs,
        command=settings.surfaces.settings_command,
        is_admin=is_admin,
        allowed=allowed,
        usage=usage,
    )
    await publish_home(services.slack, user, view)


async def _tell(services: SlackServices, user: str, text: str) -> None:
    try:
        await services.slack.call("chat.postMessage", channel=user, markdown_text=text)
    except SlackAPIError as exc:
        log.error("could not tell %s either: %s", user, exc.error)
