"""Helpers for the virtual-clock simulation (tests/test_simulation.py).

- `PRODUCTION`: the real timing settings (ASYNC_TIMEOUT_SECONDS=305, a 60 s stream idle
  deadline, 1 s update pacing, 10 s pings, ...), taken from `Settings`' own defaults so
  the simulation cannot drift from what ships. The harness's fast test defaults are
  overridden with them.
- `RecordingSlack`: a FakeSlack that also records, with the virtual time, every message
  text the bot writes (`chat.postMessage` / `chat.update`), so a test can tell when each
  reply reached its final text without polling.
- `sim_bot`: `running_bot` with the inline store and production timings, plus the
  openai SDK's platform lookup done up front (see `_prewarm_openai`).
- `forbid_worker_threads`: makes any worker-thread hop fail loudly. Under
  `MockClock(autojump_threshold=0)` the clock jumps whenever every task is blocked, and
  a task waiting for a thread *is* blocked, so one thread hop silently skews virtual
  time (a 5 s answer was measured at 125 s before the prewarm existed).
- `assert_clean_logs`: WARNING+ records checked against an allow-list; nothing that
  looks like a limiter/lock error or a traceback may appear.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import anyio.to_thread
import httpx2

from bot.nursery import Nursery
from bot.processing.failures import BUSY_NOTICE, INTERRUPTED_NOTICE
from tests.fakes.openai import Behaviour, FakeOpenAI
from tests.fakes.slack import FakeSlack
from tests.harness import SETTING_DEFAULTS, running_bot

PRODUCTION = {
    name: SETTING_DEFAULTS[name]
    for name in (
        "async_timeout_seconds",
        "async_max_concurrent_requests",
        "stream_idle_timeout_seconds",
        "update_interval_seconds",
        "shutdown_grace_seconds",
        "socket_ping_interval_seconds",
        "watchdog_interval_seconds",
        "watchdog_threshold_seconds",
    )
}
assert PRODUCTION["async_timeout_seconds"] == 305 and PRODUCTION["stream_idle_timeout_seconds"] == 60

TIMEOUT_TEXT = "did not finish within 305 seconds"
STALLED_TEXT = "stopped sending its answer for 60 seconds"
PLACEHOLDER_PREFIXES = ("_Thinking…_", "_Waiting for a free slot")

LONG = 3600.0  # generous *virtual* seconds for test-side waits


NOTICE_MARKERS = (":warning:", ":no_entry:", ":turtle:", ":electric_plug:", ":hourglass:", ":scroll:", ":mag:")


def classify(text: str) -> str:
    """What a bot message's text is, as the user sees it. (A streaming answer's partial
    text reads as "answered" too: wait for `settle()` before judging finals.)"""
    if text == BUSY_NOTICE:
        return "busy"
    if TIMEOUT_TEXT in text:
        return "timeout"
    if STALLED_TEXT in text:
        return "stalled"
    if INTERRUPTED_NOTICE in text:
        return "interrupted"
    if not text or text.startswith(PLACEHOLDER_PREFIXES):
        return "pending"
    if text.rsplit("\n\n", 1)[-1].startswith(NOTICE_MARKERS):
        return "error"
    return "answered"


@dataclass(frozen=True)
class Write:
    time: float  # anyio.current_time()
    method: str  # chat.postMessage | chat.update
    channel: str
    ts: str  # the bot message written
    thread_ts: str
    text: str


class RecordingSlack(FakeSlack):
    """FakeSlack that timestamps every text the bot writes (virtual time)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.writes: list[Write] = []
        self.latest: dict[tuple[str, str], Write] = {}  # (channel, ts) -> last write
        self.terminal: set[tuple[str, str]] = set()  # bot messages whose text is terminal

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        response = await super().handle(request)
        method = request.url.path.rsplit("/", 1)[-1]
        if method in ("chat.postMessage", "chat.update") and response.status_code == 200:
            body = json.loads(response.content)
            if body.get("ok"):
                message = body["message"]
                write = Write(
                    anyio.current_time(),
                    method,
                    body["channel"],
                    body["ts"],
                    message.get("thread_ts", body["ts"]),
                    self.visible_text(body["channel"], body["ts"]),
                )
                self.writes.append(write)
                key = (write.channel, write.ts)
                self.latest[key] = write
                if classify(write.text) == "pending":
                    self.terminal.discard(key)
                else:
                    self.terminal.add(key)
                self._changed()
        return response

    def thread_finals(self, channel: str, thread_ts: str) -> list[Write]:
        """The last write of every bot message in a thread, in message order."""
        return sorted(
            (w for w in self.latest.values() if w.channel == channel and w.thread_ts == thread_ts), key=lambda w: w.ts
        )

    def texts_of(self, channel: str, ts: str) -> list[str]:
        """Every text one bot message had, in order."""
        return [w.text for w in self.writes if w.channel == channel and w.ts == ts]

    async def wait_terminal(self, count: int, timeout: float = LONG) -> None:
        """Until at least `count` bot messages show a non-placeholder text. A partial
        streaming answer counts, so follow this with `settle()` before judging finals."""
        await self.wait_until(lambda: len(self.terminal) >= count, timeout)


class CountingOpenAI(FakeOpenAI):
    """FakeOpenAI that also counts chat calls still waiting for their response headers
    (`open_streams` only counts bodies already streaming)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.awaiting_headers = 0
        self.max_calls_open = 0

    @property
    def calls_open(self) -> int:
        return self.awaiting_headers + self.open_streams

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        self.awaiting_headers += 1
        self.max_calls_open = max(self.max_calls_open, self.calls_open)
        try:
            return await super().handle(request)
        finally:
            self.awaiting_headers -= 1


def no_response() -> Behaviour:
    """OpenAI takes the request and never answers, not even the response headers (the
    fake does that for `hang=True` together with a `status`, which is never sent).

    Only ASYNC_TIMEOUT_SECONDS can end this: the 60 s idle deadline starts with the
    stream. `Behaviour(hang=True)` alone is a different hang: headers, then silence; the
    bot cuts that after 60 s as a stalled stream (scenario 6)."""
    return Behaviour(hang=True, status=503)


def endless_trickle() -> Behaviour:
    """A stream that never goes quiet for 60 s but would take 100 minutes to finish."""
    return Behaviour(text="word " * 200, chunks=200, chunk_delay=30.0)


def _prewarm_openai(client) -> None:
    """The openai SDK looks up the platform in a worker thread on its first request
    (`asyncify(get_platform)`); do that lookup now, synchronously, so no request of the
    simulation ever waits on a thread (see the module docstring)."""
    if getattr(client, "_platform", "absent") is None:
        from openai._base_client import get_platform

        client._platform = get_platform()


@asynccontextmanager
async def sim_bot(slack: FakeSlack, ai: FakeOpenAI, **overrides) -> AsyncIterator[Nursery]:
    settings = {**PRODUCTION, **overrides}
    async with running_bot(slack, ai, inline_store=True, ready_timeout=LONG, **settings) as nursery:
        _prewarm_openai(nursery.services.openai)
        yield nursery


def forbid_worker_threads(monkeypatch) -> list[str]:
    """Make `anyio.to_thread.run_sync` raise; returns the list of offending callables."""
    offenders: list[str] = []

    async def no_threads(func, *args, **kwargs):
        offenders.append(getattr(func, "__qualname__", repr(func)))
        raise AssertionError(f"worker thread used in the virtual-clock simulation: {offenders[-1]}")

    monkeypatch.setattr(anyio.to_thread, "run_sync", no_threads)
    return offenders


async def settle(nursery: Nursery, ai: FakeOpenAI, *, timeout: float = LONG) -> None:
    """Until nothing is in flight: no request, no held gate or model slot, no open stream."""
    with anyio.fail_after(timeout):
        while (
            nursery.active
            or nursery.gates.held
            or ai.open_streams
            or getattr(ai, "awaiting_headers", 0)
            or nursery.services.model_slots.borrowed_tokens
        ):
            await anyio.sleep(0.25)


def assert_released(nursery: Nursery, ai: FakeOpenAI) -> None:
    assert nursery.gates.held == 0
    assert nursery.services.model_slots.borrowed_tokens == 0
    assert ai.open_streams == 0
    assert getattr(ai, "awaiting_headers", 0) == 0
    assert not nursery.active


# ---- logs ---------------------------------------------------------------------------

WATCHDOG = re.compile(r"^request \w+ in \S+ running for \d+s \(stage: [\w ]+\)$")
# Anything that smells of a limiter/lock misuse, an escaped exception or a traceback.
FORBIDDEN = re.compile(
    r"RuntimeError|Traceback|release|borrow|WouldBlock|not held|BrokenResource|ClosedResource"
    r"|Cancelled|unexpected error|handler failed|could not record|ExceptionGroup",
    re.IGNORECASE,
)


def assert_clean_logs(
    records: Iterable[logging.LogRecord], *, allowed_warnings: Iterable[re.Pattern] = (), allow_errors: bool = False
) -> dict[str, int]:
    """Check every WARNING+ record; returns a count of warnings per allowed pattern."""
    patterns = list(allowed_warnings)
    counts: dict[str, int] = {}
    for record in records:
        if record.levelno < logging.WARNING:
            continue
        message = record.getMessage()
        full = message
        if record.exc_info:
            full += "\n" + logging.Formatter().formatException(record.exc_info)
        assert not FORBIDDEN.search(full), f"forbidden log record: {record.levelname} {record.name}: {full}"
        if record.levelno >= logging.ERROR:
            assert allow_errors, f"ERROR log record: {record.name}: {full}"
            continue
        matched = next((p for p in patterns if p.search(message)), None)
        assert matched is not None, f"unexpected warning: {record.name}: {message}"
        counts[matched.pattern] = counts.get(matched.pattern, 0) + 1
    return counts
