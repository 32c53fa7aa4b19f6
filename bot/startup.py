"""Bring the bot up and take it down: clients, storage, identity, crash recovery.

`run_bot` opens everything with `async with` (so everything is closed however the run
ends), learns who the bot is (`auth.test`), marks requests a killed process left in
flight as interrupted, then hands over to the nursery.

The transports and the socket connector are parameters: production uses real
sockets; the simulation passes httpx2 mock transports and an in-memory socket.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AsyncExitStack

import anyio
import httpx2
import openai

from bot.config import Settings
from bot.metrics import Metrics
from bot.nursery import Nursery
from bot.processing.context import MediaServices
from bot.processing.failures import INTERRUPTED_NOTICE
from bot.services import SlackServices
from bot.slack.events import BotIdentity
from bot.slack.reply import fallback_text
from bot.slack.web_api import SlackAPIError, SlackWebAPI
from bot.slack.websocket import Connector, connect_websocket
from bot.storage import Store, open_store
from bot.timed_store import TimedStore

log = logging.getLogger(__name__)

AUTH_ERRORS = frozenset({"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired"})


class StartupError(Exception):
    """The bot cannot start (for example Slack rejects the bot token). One clear line."""


async def identify(slack: SlackWebAPI) -> BotIdentity:
    """`auth.test` with retries for transient failures; auth failures are fatal."""
    delay = 1.0
    while True:
        try:
            body = await slack.call("auth.test")
            return BotIdentity(
                user_id=str(body.get("user_id", "")),
                bot_id=str(body.get("bot_id", "")),
                team_id=str(body.get("team_id", "")),
            )
        except SlackAPIError as exc:
            if exc.error in AUTH_ERRORS:
                raise StartupError(f"Slack rejected SLACK_BOT_TOKEN ({exc.error}); check the token") from None
            log.warning("auth.test failed (%s); retrying in %.0fs", exc.error, delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, 30.0)


async def recover_interrupted(slack: SlackWebAPI, store: Store) -> int:
    """Fix up answers that a killed process left saying "Thinking…" (or half-streamed).

    The message may still be in native streaming state, and Slack refuses to edit such
    a message (`streaming_state_conflict`): it is stopped first. A request that had not
    posted anything yet gets the notice as a new message in its thread."""
    stale = await store.in_flight()
    for req in stale:
        channel = req.thread.channel
        with anyio.move_on_after(10):
            try:
                if req.placeholder_ts:
                    await _mark_interrupted(slack, channel, req.placeholder_ts)
                else:
                    await slack.post_message(channel, req.thread.thread_ts, markdown_text=INTERRUPTED_NOTICE)
            except SlackAPIError as exc:
                log.warning("could not mark request %s in %s interrupted: %s", req.request_id, req.thread, exc.error)
        await store.finish_request(
            req.request_id,
            outcome="interrupted",
            user_text="",
            user_ts="",
            reply_text="",
            finished_at=time.time(),
            detail="process stopped",
        )
    if stale:
        log.info("marked %d request(s) from a previous run as interrupted", len(stale))
    return len(stale)


async def _mark_interrupted(slack: SlackWebAPI, channel: str, ts: str) -> None:
    """Edit the message into the notice; a message still streaming is stopped first
    (only then: chat.stopStream's budget is small). The notice goes in a markdown block,
    so it replaces blocks a final write may already have left there (an edit without
    blocks keeps a message's blocks, and they are what Slack shows)."""
    try:
        await _edit_to_notice(slack, channel, ts)
        return
    except SlackAPIError as exc:
        if exc.error != "streaming_state_conflict":
            raise
    try:
        await slack.call("chat.stopStream", channel=channel, ts=ts)
    except SlackAPIError as exc:
        log.debug("chat.stopStream on %s before marking it interrupted: %s", ts, exc.error)
    await _edit_to_notice(slack, channel, ts)


async def _edit_to_notice(slack: SlackWebAPI, channel: str, ts: str) -> None:
    await slack.update_message(
        channel, ts, blocks=[{"type": "markdown", "text": INTERRUPTED_NOTICE}], text=fallback_text(INTERRUPTED_NOTICE)
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
    async with AsyncExitStack() as stack:
        slack_http = await stack.enter_async_context(
            httpx2.AsyncClient(
                transport=slack_transport,
                timeout=httpx2.Timeout(30.0, connect=10.0),
                limits=httpx2.Limits(max_connections=200, max_keepalive_connections=50),
            )
        )
        openai_http = await stack.enter_async_context(
            openai.DefaultAsyncHttpx2Client(transport=openai_transport)
            if openai_transport is not None
            else openai.DefaultAsyncHttpx2Client()
        )
        # Pasted image URLs: a client of its own that carries no token, ignores proxy
        # variables and never follows redirects by itself (url_fetch checks each hop).
        url_http = await stack.enter_async_context(
            httpx2.AsyncClient(
                transport=url_transport,
                trust_env=False,
                follow_redirects=False,
                timeout=httpx2.Timeout(settings.url_fetch_timeout_seconds, connect=5.0),
                limits=httpx2.Limits(max_connections=20, max_keepalive_connections=0),
            )
        )
        ai = await stack.enter_async_context(
            openai.AsyncOpenAI(
                api_key=settings.openai_api_key,
                base_url=settings.openai_base_url,
                http_client=openai_http,
                max_retries=2,
            )
        )
        if store is None:
            store = await open_store(settings.database_url)
            stack.push_async_callback(_close_store, store)
        store = TimedStore(store, metrics)
        slack = SlackWebAPI(
            bot_token=settings.slack_bot_token,
            app_token=settings.slack_app_token,
            base_url=settings.slack_api_url,
            client=slack_http,
            metrics=metrics,
        )
        me = await identify(slack)
        log.info("connected to Slack as bot user %s", me.user_id)
        await recover_interrupted(slack, store)
        services = SlackServices(
            settings=settings,
            slack=slack,
            openai=ai,
            store=store,
            me=me,
            model_slots=anyio.CapacityLimiter(settings.async_max_concurrent_requests),
            metrics=metrics,
            media=MediaServices(url_client=url_http, workers=anyio.CapacityLimiter(settings.media_workers)),
        )
        nursery = Nursery(services, connector, handle_signals=handle_signals)
        if on_ready is not None:
            on_ready(nursery)
        await nursery.run()


async def _close_store(store: Store) -> None:
    with anyio.CancelScope(shield=True):
        await store.aclose()
