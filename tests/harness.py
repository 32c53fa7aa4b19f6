"""Run the real bot in-process against the fakes, swapped in at the transports.

`running_bot(slack, ai, ...)` starts `bot.startup.run_bot` with httpx2 mock transports
for the Slack Web API and OpenAI and the fake's in-memory Socket Mode connector, waits
until the first socket said hello, yields the `Nursery`, and stops it gracefully on exit.
Used by the integration tests (both backends) and the virtual-clock simulation.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import anyio
import httpx2

from bot.config import OpenAISettings, ReplicaSettings, Settings, SlackSettings, StorageSettings, SurfaceSettings
from bot.nursery import Nursery
from bot.startup import run_bot
from bot.storage import Store, open_store
from tests.fakes.openai import FakeOpenAI
from tests.fakes.slack import FakeSlack

# The tests name settings flat, as they were before `Settings` had groups
# (`openai_model=`, `max_file_mb=`, `replica_id=`): each flat name is one group's field,
# by the field's own name except these.
_RENAMED = {
    "slack_bot_token": ("slack", "bot_token"),
    "slack_app_token": ("slack", "app_token"),
    "slack_api_url": ("slack", "api_url"),
    "openai_api_key": ("openai", "api_key"),
    "openai_base_url": ("openai", "base_url"),
    "openai_model": ("openai", "model"),
    "replica_id": ("replica", "id"),
    "replica_timeout_seconds": ("replica", "timeout_seconds"),
}


def _flat_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """Flat name → (group, the group's field); group "" for a field of `Settings` itself."""
    flat: dict[str, tuple[str, dataclasses.Field]] = {}
    where = {place: name for name, place in _RENAMED.items()}
    types = typing.get_type_hints(Settings)
    for group in dataclasses.fields(Settings):
        kind = types[group.name]
        places = (
            [(group.name, f) for f in dataclasses.fields(kind)] if dataclasses.is_dataclass(kind) else [("", group)]
        )
        for group_name, f in places:
            name = where.pop((group_name, f.name), f.name)
            assert name not in flat, f"two settings would both be {name!r}"
            flat[name] = (group_name, f)
    assert not where, f"renamed settings that no group has: {where}"
    return flat


FLAT_SETTINGS = _flat_fields()
# Each setting's default (`dataclasses.MISSING` for the tokens and the key), by flat name.
SETTING_DEFAULTS = {name: f.default for name, (_, f) in FLAT_SETTINGS.items()}


def with_overrides(settings: Settings, **overrides: object) -> Settings:
    """`settings` with flat overrides applied to their groups; an unknown name is a TypeError."""
    groups: dict[str, dict[str, object]] = {}
    top: dict[str, object] = {}
    for name, value in overrides.items():
        if name not in FLAT_SETTINGS:
            raise TypeError(f"no setting is called {name!r} (the flat names: tests/harness.py)")
        group, f = FLAT_SETTINGS[name]
        if group:
            groups.setdefault(group, {})[f.name] = value
        else:
            top[f.name] = value
    replaced = {group: dataclasses.replace(getattr(settings, group), **changes) for group, changes in groups.items()}
    return dataclasses.replace(settings, **replaced, **top)


def test_settings(**overrides) -> Settings:
    base = Settings(
        slack=SlackSettings(
            bot_token="xoxb-test-token",
            app_token="xapp-test-token",
            api_url="http://slack.test/api/",
            socket_ping_interval_seconds=1.0,
        ),
        openai=OpenAISettings(
            api_key="sk-test",
            base_url="http://openai.test/v1/",
            model="gpt-5-mini",
            async_timeout_seconds=5.0,
            stream_idle_timeout_seconds=3.0,
        ),
        storage=StorageSettings(database_url="sqlite:///:memory:"),
        replica=ReplicaSettings(shutdown_grace_seconds=0.5),
        # The core tests watch the placeholder being edited (chat.update) and count the
        # bot's messages; native streaming and the first-DM welcome (both on in
        # production) have their own tests in tests/slack/ and tests/interactions/.
        surfaces=SurfaceSettings(update_interval_seconds=0.05, native_streaming=False, welcome=False),
    )
    return with_overrides(base, **overrides)


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
        store = await open_store(settings.storage.database_url, inline=inline_store)
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
