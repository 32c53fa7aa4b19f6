"""Bring the bot up and take it down: clients, storage, identity, crash recovery.

`run_bot` opens everything with `async with` (so everything is closed however the run
ends), learns who the bot is (`auth.test`), joins the replicas (`bot.replica`: a
heartbeat, and requests a killed run left in flight marked interrupted), then hands
over to the nursery.

The transports and the socket connector are parameters: production uses real
sockets; the simulation passes httpx2 mock transports and an in-memory socket.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from contextlib import AsyncExitStack
from functools import partial

import anyio
import httpx2

from bot.config import Settings
from bot.metrics import Metrics
from bot.nursery import Nursery
from bot.openai_client import openai_client
from bot.processing.context import MediaServices
from bot.replica import start_replica
from bot.retrying import doubling, retry
from bot.services import SlackServices
from bot.slack.events import BotIdentity
from bot.slack.web_api import SlackAPIError, SlackWebAPI
from bot.slack.websocket import Connector, connect_websocket
from bot.storage import Store, open_store
from bot.timed_store import TimedStore

log = logging.getLogger(__name__)

AUTH_ERRORS = frozenset({"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired"})
IDENTIFY_PAUSES = doubling(1.0, cap=30.0)  # between auth.test tries while Slack is unreachable


class StartupError(Exception):
    """The bot cannot start (for example Slack rejects the bot token). One clear line."""


async def identify(slack: SlackWebAPI) -> BotIdentity:
    """`auth.test` with retries for transient failures (1 s, 2 s, 4 s … at most 30 s
    apart, until it answers or the caller gives up); auth failures are fatal."""

    def pause(n: int, exc: SlackAPIError) -> float:
        delay = IDENTIFY_PAUSES(n, exc)
        log.warning("auth.test failed (%s); retrying in %.0fs", exc.error, delay)
        return delay

    try:
        body = await retry(
            partial(slack.call, "auth.test"),
            errors=SlackAPIError,
            attempts=None,
            pause=pause,
            retry_if=lambda exc: exc.error not in AUTH_ERRORS,
        )
    except SlackAPIError as exc:  # only an auth failure ends the retries
        raise StartupError(f"Slack rejected SLACK_BOT_TOKEN ({exc.error}); check the token") from None
    return BotIdentity(
        user_id=str(body.get("user_id", "")),
        bot_id=str(body.get("bot_id", "")),
        team_id=str(body.get("team_id", "")),
    )


async def run_bot(
    settings: Settings,
    *,
    slack_transport: httpx2.AsyncBaseTransport | None = None,
    openai_transport: httpx2.AsyncBaseTransport | None = None,
    url_transport: httpx2.AsyncBaseTransport | None = None,
    connector: Connector = connect_websocket,
    store: Store | None = None,
    handle_signals: bool = True,
    on_ready: Callable[[Nursery], object] | None = None,
) -> None:
    """Run until stopped (signal, or `nursery.stop()` via `on_ready(nursery)`)."""
    metrics = Metrics()
    # One TLS context for every HTTP client: each would load the whole CA bundle (it
    # reads files: a worker thread). None when Slack's and OpenAI's networks are replaced
    # (tests, the virtual-clock simulation, which allows no worker thread).
    real_network = slack_transport is None or openai_transport is None
    tls = await anyio.to_thread.run_sync(httpx2.create_ssl_context) if real_network else None
    verify: ssl.SSLContext | bool = tls if tls is not None else True
    async with AsyncExitStack() as stack:
        slack_http = await stack.enter_async_context(
            httpx2.AsyncClient(
                transport=slack_transport,
                verify=verify,
                timeout=httpx2.Timeout(30.0, connect=10.0),
                limits=httpx2.Limits(max_connections=200, max_keepalive_connections=50),
            )
        )
        # Pasted image URLs: a client of its own that carries no token, ignores proxy
        # variables and never follows redirects by itself (url_fetch checks each hop).
        url_http = await stack.enter_async_context(
            httpx2.AsyncClient(
                transport=url_transport,
                verify=verify,
                trust_env=False,
                follow_redirects=False,
                timeout=httpx2.Timeout(settings.media.url_fetch_timeout_seconds, connect=5.0),
                limits=httpx2.Limits(max_connections=20, max_keepalive_connections=0),
            )
        )
        ai = await stack.enter_async_context(
            openai_client(settings.openai, transport=openai_transport, max_retries=2, tls=tls)
        )
        if store is None:
            store = await open_store(settings.storage.database_url)
            stack.push_async_callback(_close_store, store)
        store = TimedStore(store, metrics)
        slack = SlackWebAPI(
            bot_token=settings.slack.bot_token,
            app_token=settings.slack.app_token,
            base_url=settings.slack.api_url,
            client=slack_http,
            metrics=metrics,
        )
        me = await identify(slack)
        log.info("connected to Slack as bot user %s", me.user_id)
        services = SlackServices(
            settings=settings,
            slack=slack,
            openai=ai,
            store=store,
            me=me,
            model_slots=anyio.CapacityLimiter(settings.openai.async_max_concurrent_requests),
            metrics=metrics,
            media=MediaServices(url_client=url_http, workers=anyio.CapacityLimiter(settings.media.media_workers)),
        )
        nursery = Nursery(services, connector, handle_signals=handle_signals)
        await start_replica(
            slack, store, nursery.gates, replica_timeout=settings.replica.timeout_seconds, bot_id=me.bot_id
        )
        if on_ready is not None:
            on_ready(nursery)
        await nursery.run()


async def _close_store(store: Store) -> None:
    with anyio.CancelScope(shield=True):
        await store.aclose()
