"""`slackbot check`: try every outside thing the bot depends on, for real, and say what to fix.

Each check is one real call — `auth.test` for the bot token, `apps.connections.open`
for the app token (the URL it returns is not used), `models.list` for the OpenAI key
and endpoint, then whether OPENAI_MODEL is among the models, then a write to the
database — bounded in time, run one after another so the output reads top to bottom.
The result is a table of what is right and what is wrong, with the fix for each wrong
one; the exit code is non-zero if anything is wrong. Tokens are never printed.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import anyio
import httpx2
import openai

from bot.config import OpenAISettings, Settings, SlackSettings, StorageSettings
from bot.openai_client import openai_client
from bot.slack.web_api import SlackAPIError, SlackWebAPI
from bot.storage import StorageError, ThreadKey, open_store
from bot.storage.location import locate, redact

CHECK_TIMEOUT = 15.0
BAD_TOKEN = frozenset(
    {"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired", "not_allowed_token_type"}
)


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _slack_unreachable(config: SlackSettings, error: str) -> str:
    if error.startswith("http_error") or error.startswith("bad_response"):
        return f"Slack did not answer at {config.api_url}: check the network (and SLACK_API_URL if you set it)."
    return ""


async def check_bot_token(config: SlackSettings, slack: SlackWebAPI) -> CheckResult:
    name = "Slack bot token"
    if not config.bot_token:
        return CheckResult(
            name,
            False,
            "SLACK_BOT_TOKEN is not set",
            "Install the app (Install App → Install to Workspace), then copy the Bot User OAuth "
            "Token (xoxb-…) into .env as SLACK_BOT_TOKEN.",
        )
    try:
        body = await slack.call("auth.test")
    except SlackAPIError as exc:
        fix = _slack_unreachable(config, exc.error) or (
            "The token is wrong or revoked: copy the Bot User OAuth Token (xoxb-…) again from Install App "
            "(reinstall the app if it was removed)."
            if exc.error in BAD_TOKEN
            else "Slack refused the token; see https://docs.slack.dev/reference/methods/auth.test for the error."
        )
        return CheckResult(name, False, f"auth.test: {exc.error}", fix)
    return CheckResult(
        name, True, f"bot user {body.get('user_id', '?')} in {body.get('team') or body.get('team_id', '?')}"
    )


async def check_app_token(config: SlackSettings, slack: SlackWebAPI) -> CheckResult:
    name = "Slack app token"
    if not config.app_token:
        return CheckResult(
            name,
            False,
            "SLACK_APP_TOKEN is not set",
            "Basic Information → App-Level Tokens → Generate, with the connections:write scope; "
            "copy it (xapp-…) into .env as SLACK_APP_TOKEN.",
        )
    try:
        await slack.call("apps.connections.open", app_token=True)
    except SlackAPIError as exc:
        fix = _slack_unreachable(config, exc.error) or (
            "The app-level token is wrong or lacks connections:write: generate a new one under Basic "
            "Information → App-Level Tokens."
            if exc.error in BAD_TOKEN
            else "Turn on Socket Mode (Settings → Socket Mode); creating the app from `slackbot manifest` does this."
        )
        return CheckResult(name, False, f"apps.connections.open: {exc.error}", fix)
    return CheckResult(name, True, "Socket Mode connection allowed")


async def check_openai(config: OpenAISettings, client: openai.AsyncOpenAI) -> tuple[CheckResult, list[str] | None]:
    name = "OpenAI endpoint"
    where = config.base_url or "api.openai.com"
    if not config.api_key and not config.base_url:
        return CheckResult(
            name,
            False,
            "OPENAI_API_KEY is not set",
            "Create a key at https://platform.openai.com/api-keys and put it in .env as "
            "OPENAI_API_KEY (or set OPENAI_BASE_URL to your OpenAI-compatible server).",
        ), None
    try:
        models = [m.id async for m in client.models.list()]
    except openai.AuthenticationError:
        return CheckResult(
            name,
            False,
            f"{where} rejected the key (401)",
            "OPENAI_API_KEY is wrong or revoked: create a new key and put it in .env.",
        ), None
    except openai.PermissionDeniedError:
        return CheckResult(
            name,
            False,
            f"{where} refused access (403)",
            "The key's project may not have access to models, or your region is not supported.",
        ), None
    except openai.NotFoundError:
        return CheckResult(
            name,
            False,
            f"{where} has no /models endpoint (404)",
            "OPENAI_BASE_URL must point at the API root, usually ending in /v1/.",
        ), None
    except openai.APIConnectionError as exc:
        return CheckResult(
            name,
            False,
            f"cannot reach {where} ({type(exc).__name__})",
            "Check OPENAI_BASE_URL (is the server running?) and the network.",
        ), None
    except openai.APIStatusError as exc:
        return CheckResult(
            name,
            False,
            f"{where} answered HTTP {exc.status_code}",
            "The endpoint is failing; try again later or check its status page.",
        ), None
    return CheckResult(name, True, f"{len(models)} models at {where}"), models


def check_model(config: OpenAISettings, models: list[str] | None) -> CheckResult:
    name = "OpenAI model"
    if models is None:
        return CheckResult(
            name, False, f"{config.model}: not checked (the endpoint check failed)", "Fix the endpoint first."
        )
    if config.model in models:
        return CheckResult(name, True, f"{config.model} is available")
    shown = ", ".join(sorted(models)[:10]) + (" …" if len(models) > 10 else "")
    return CheckResult(
        name,
        False,
        f"{config.model} is not offered by the endpoint",
        f"Set OPENAI_MODEL to one of: {shown or '(the endpoint lists no models)'}.",
    )


async def check_database(config: StorageSettings) -> CheckResult:
    """For real: connect (which applies any pending migration, so the schema is current,
    or says it is newer than this bot), write, and take and give back a thread lease."""
    name = "Database"
    where = redact(config.database_url)
    postgres = locate(config.database_url).engine == "postgresql"
    try:
        store = await open_store(config.database_url)
    except Exception as exc:
        fix = (
            "Check the host, port, database name, user and password in DATABASE_URL, and that the "
            "server accepts connections from this machine (pg_hba.conf)."
            if postgres
            else "Make sure the directory in DATABASE_URL exists or can be created, is writable by "
            "this user, and the disk is not full."
        )
        return CheckResult(name, False, f"cannot open {where}: {exc}", fix)
    try:
        await store.claim_event(f"check:{uuid.uuid4().hex}")  # a real write, pruned like any event key
        for attempt in ("taken", "taken again after its release"):
            token = await store.acquire_lease(CHECK_THREAD, f"check-{uuid.uuid4().hex[:8]}", ttl=5.0)
            if token is None:
                raise StorageError(f"a thread lease could not be {attempt} (another check running?)")
            await store.release_lease(CHECK_THREAD, token)
    except Exception as exc:
        fix = (
            "Grant this user CREATE, SELECT, INSERT, UPDATE and DELETE on the database's tables."
            if postgres
            else "Check the file's permissions and free disk space; stop other programs locking it."
        )
        return CheckResult(name, False, f"{where} is not usable: {exc}", fix)
    finally:
        with anyio.CancelScope(shield=True):
            await store.aclose()
    return CheckResult(name, True, f"{where}: schema current, writable, thread leases work")


CHECK_THREAD = ThreadKey("slackbot-check", "0")  # no Slack thread has this key
T = TypeVar("T")


async def _bounded(name: str, check: Awaitable[T]) -> T | CheckResult:
    with anyio.move_on_after(CHECK_TIMEOUT):
        return await check
    return CheckResult(
        name, False, f"no answer within {CHECK_TIMEOUT:g}s", "Check the network, proxies and the URL settings."
    )


async def run_checks(
    settings: Settings,
    *,
    slack_transport: httpx2.AsyncBaseTransport | None = None,
    openai_transport: httpx2.AsyncBaseTransport | None = None,
) -> list[CheckResult]:
    results = [CheckResult("Configuration", True, "read from .env and the environment")]
    async with httpx2.AsyncClient(transport=slack_transport, timeout=httpx2.Timeout(10.0)) as http:
        slack = SlackWebAPI(
            bot_token=settings.slack.bot_token,
            app_token=settings.slack.app_token,
            base_url=settings.slack.api_url,
            client=http,
            max_rate_limit_retries=1,
        )
        results.append(await _bounded("Slack bot token", check_bot_token(settings.slack, slack)))
        results.append(await _bounded("Slack app token", check_app_token(settings.slack, slack)))
    async with openai_client(settings.openai, transport=openai_transport, max_retries=0) as client:
        outcome = await _bounded("OpenAI endpoint", check_openai(settings.openai, client))
    endpoint, models = outcome if isinstance(outcome, tuple) else (outcome, None)
    results += [endpoint, check_model(settings.openai, models)]
    results.append(await _bounded("Database", check_database(settings.storage)))
    return results


def render(results: list[CheckResult]) -> str:
    width = max(len(r.name) for r in results)
    lines = []
    for r in results:
        lines.append(f"  {'ok  ' if r.ok else 'FAIL'}  {r.name:<{width}}  {r.detail}")
        if not r.ok and r.fix:
            lines.append(f"  {'':4}  {'':<{width}}  fix: {r.fix}")
    failed = sum(not r.ok for r in results)
    lines.append("")
    lines.append("All checks passed." if not failed else f"{failed} check(s) failed.")
    return "\n".join(lines)
