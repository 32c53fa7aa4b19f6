"""Run the real bot in-process against the fakes, swapped in at the transports.

`running_bot(slack, ai, ...)` starts `bot.startup.run_bot` with httpx2 mock transports
for the Slack Web API and OpenAI and the fake's in-memory Socket Mode connector, waits
until the first socket said hello, yields the `Nursery`, and stops it gracefully on exit.
Used by the integration tests (both backends) and the virtual-clock simulation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import anyio
import httpx2

from bot.config import Settings
from bot.nursery import Nursery
from bot.startup import run_bot
from bot.storage import Store, open_store
from tests.fakes.openai import FakeOpenAI
from tests.fakes.slack import FakeSlack


def test_settings(**overrides) -> Settings:
    base = Settings(
        slack_bot_token="xoxb-test-token",
        slack_app_token="xapp-test-token",
        openai_api_key="sk-test",
        slack_api_url="http://slack.test/api/",
        openai_base_url="http://openai.test/v1/",
        openai_model="gpt-5-mini",
        database_url="sqlite:///:memory:",
        async_timeout_seconds=5.0,
        stream_idle_timeout_seconds=3.0,
        update_interval_seconds=0.05,
        shutdown_grace_seconds=0.5,
        socket_ping_interval_seconds=1.0,
        # The core tests watch the placeholder being edited (chat.update) and count the
        # bot's messages; native streaming and the first-DM welcome (both on in
        # production) have their own tests in tests/slack/ and tests/interactions/.
        native_streaming=False,
        welcome=False,
    )
    return base.replace(**overrides)


test_settings.__test__ = False  # not a pytest test


@asynccontextmanager
async def running_bot(
    slack: FakeSlack,
    ai: FakeOpenAI,
    *,
    store: Store | None = None,
    inline_store: bool = False,
    ready_timeout: float = 10.0,
    slack_handler=None,  # instead of slack.handle (to delay or freeze one replica's calls)
    **overrides,
) -> AsyncIterator[Nursery]:
    settings = test_settings(**overrides)
    own_store = store is None
    if store is None:
        store = await open_store(settings.database_url, inline=inline_store)
    holder: list[Nursery] = []
    ready = anyio.Event()

    def on_ready(nursery: Nursery) -> None:
        holder.append(nursery)
        ready.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                partial(
                    run_bot,
                    settings,
                    slack_transport=httpx2.MockTransport(slack_handler or slack.handle),
                    openai_transport=httpx2.MockTransport(ai.handle),
                    connector=slack.connector,
                    store=store,
                    handle_signals=False,
                    on_ready=on_ready,
                )
            )
            with anyio.fail_after(ready_timeout):
                await ready.wait()
                await holder[0].reader.connected.wait()
            try:
                yield holder[0]
            finally:
                holder[0].stop()
    finally:
        if own_store:
            with anyio.CancelScope(shield=True):
                await store.aclose()


async def send_dm(
    slack: FakeSlack, text: str, *, channel: str = "D1", user: str = "U1", thread_ts: str | None = None
) -> tuple[str, dict]:
    """Post a DM as a user and deliver its event; returns (envelope_id, event)."""
    event = slack.message_event(channel, user, text, thread_ts=thread_ts, channel_type="im")
    envelope_id = await slack.send_event(event)
    return envelope_id, event


async def wait_reply(
    slack: FakeSlack, channel: str, thread_ts: str, contains: str, *, timeout: float = 10.0
) -> list[str]:
    """Wait until a bot reply in the thread contains `contains`; returns the replies."""
    await slack.wait_until(lambda: any(contains in r for r in slack.bot_replies(channel, thread_ts)), timeout)
    return slack.bot_replies(channel, thread_ts)


async def eventually(predicate, *, timeout: float = 5.0, interval: float = 0.01) -> None:
    """Poll `predicate` until it holds (for state outside the fakes, such as the nursery's)."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(interval)
