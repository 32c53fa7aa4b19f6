"""The one top-level task group, and the life of a request inside it.

Everything the bot runs is a child of `Nursery.run`'s task group: the Socket Mode
reader, one task per request, the watchdog, the cleanup task and the signal watcher.
When `run` returns, nothing of the bot is left running.

A request's life (`_request`):
  parse → dedupe (memory, then storage) → per-thread gate (busy reply if taken)
  → its own cancel scope → `answer_message` → gate released by leaving `async with`.

Shutdown (`stop()`, or SIGINT/SIGTERM): stop reading events, give in-flight requests
`SHUTDOWN_GRACE_SECONDS`, then cancel the rest through their own scopes (each one
marks its placeholder interrupted, shielded and time-bounded), then end the group.
"""

from __future__ import annotations

import logging
import signal
import time
import uuid
from collections.abc import Callable

import anyio

from bot.dedupe import RecentKeys
from bot.processing.answer import answer_message
from bot.processing.context import RequestState, Services
from bot.processing.failures import BUSY_NOTICE
from bot.slack_events import IncomingMessage, Skip, parse_event
from bot.slack_socket import Envelope, SocketModeReader
from bot.storage import StorageError
from bot.thread_gates import ThreadGates
from bot.websocket import Connector

log = logging.getLogger(__name__)

CLEANUP_INTERVAL = 60.0
EVENT_KEY_RETENTION = 24 * 3600.0  # Slack redelivers for minutes; a day is plenty


class Nursery:
    def __init__(self, services: Services, connector: Connector, *, handle_signals: bool = True,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.services = services
        self.gates = ThreadGates()
        self.recent = RecentKeys()
        self.active: dict[str, RequestState] = {}
        self.outcomes: dict[str, int] = {}
        self.reader = SocketModeReader(services.slack, connector, self.on_envelope,
                                       ping_interval=services.settings.socket_ping_interval_seconds)
        self._handle_signals = handle_signals
        self._wall_clock = wall_clock
        self._stop = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._reader_scope = anyio.CancelScope()
        self._accepting = True

    # ---- the task group -------------------------------------------------------------

    async def run(self) -> None:
        settings = self.services.settings
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if self._handle_signals:
                tg.start_soon(self._watch_signals)
            tg.start_soon(self._run_reader)
            tg.start_soon(self._watchdog, settings.watchdog_interval_seconds, settings.watchdog_threshold_seconds)
            tg.start_soon(self._cleanup)
            await self._stop.wait()
            await self._shutdown(settings.shutdown_grace_seconds)
            tg.cancel_scope.cancel()
        log.info("stopped; outcomes: %s", self.outcomes or "none")

    def stop(self) -> None:
        """Begin a graceful shutdown (idempotent)."""
        self._stop.set()

    async def _run_reader(self) -> None:
        with self._reader_scope:
            await self.reader.run()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("received %s; shutting down", signal.Signals(signum).name)
                self.stop()
                return

    async def _shutdown(self, grace: float) -> None:
        self._accepting = False
        self._reader_scope.cancel()
        if self.active:
            log.info("waiting up to %.1fs for %d request(s) in flight", grace, len(self.active))
            with anyio.move_on_after(grace):
                while self.active:
                    await anyio.sleep(0.05)
        if self.active:
            log.info("interrupting %d request(s)", len(self.active))
            for state in list(self.active.values()):
                state.scope.cancel()
            while self.active:  # each one finalizes (bounded) and leaves
                await anyio.sleep(0.05)

    async def _watchdog(self, interval: float, threshold: float) -> None:
        """Monitoring only: it logs long requests and never touches their gates or scopes."""
        while True:
            await anyio.sleep(interval)
            now = anyio.current_time()
            for state in list(self.active.values()):
                age = now - state.started_at
                if age >= threshold:
                    log.warning("request %s in %s running for %.0fs (stage: %s)",
                                state.request_id, state.message.thread, age, state.stage)

    async def _cleanup(self) -> None:
        while True:
            await anyio.sleep(CLEANUP_INTERVAL)
            dropped = self.gates.prune()
            self.recent.prune(anyio.current_time())
            try:
                await self.services.store.prune_events(self._wall_clock() - EVENT_KEY_RETENTION)
            except StorageError as exc:
                log.warning("cleanup could not prune stored event keys: %s", exc)
            log.debug("cleanup: dropped %d idle thread gates; %d remain", dropped, len(self.gates))

    # ---- requests ---------------------------------------------------------------------

    def on_envelope(self, envelope: Envelope) -> None:
        """Called by the reader right after the ack: start the request's task and return."""
        if self._tg is None or not self._accepting:
            log.warning("envelope %s arrived after shutdown began; not handled", envelope.envelope_id)
            return
        self._tg.start_soon(self._request, envelope, name=f"envelope {envelope.envelope_id}")

    async def _request(self, envelope: Envelope) -> None:
        if envelope.type != "events_api":
            log.info("envelope %s: %s is not handled yet", envelope.envelope_id, envelope.type)
            return
        parsed = parse_event(envelope.payload, self.services.me)
        if isinstance(parsed, Skip):
            level = logging.WARNING if parsed.malformed else logging.DEBUG
            log.log(level, "envelope %s skipped: %s", envelope.envelope_id, parsed.reason)
            return
        msg = parsed
        if not await self._first_time(msg):
            self._count("duplicate")
            log.info("event %s (%s/%s) already handled; skipped (retry %d)", msg.event_id,
                     msg.channel, msg.ts, envelope.retry_attempt)
            return
        if msg.kind == "thread_followup" and not await self._thread_known(msg):
            log.debug("message %s in a thread the bot is not part of; skipped", msg.ts)
            return
        async with self.gates.try_enter(msg.thread) as entered:
            if not entered:
                await self._busy_reply(msg)
                return
            state = RequestState(request_id=uuid.uuid4().hex[:12], message=msg,
                                 started_at=anyio.current_time())
            self.active[state.request_id] = state
            log.info("request %s: %s in %s", state.request_id, msg.kind, msg.thread)
            try:
                with state.scope:
                    await answer_message(self.services, state)
            finally:
                del self.active[state.request_id]
                self._count(state.outcome or "interrupted")
                log.info("request %s: %s after %.2fs", state.request_id, state.outcome,
                         anyio.current_time() - state.started_at)

    async def _first_time(self, msg: IncomingMessage) -> bool:
        if not self.recent.add_all(msg.dedupe_keys, anyio.current_time()):
            return False
        try:
            for key in msg.dedupe_keys:
                if not await self.services.store.claim_event(key):
                    return False
        except StorageError as exc:
            log.warning("storage cannot record event %s (%s); relying on in-memory dedupe", msg.event_id, exc)
        return True

    async def _thread_known(self, msg: IncomingMessage) -> bool:
        try:
            return await self.services.store.thread_known(msg.thread)
        except StorageError as exc:
            log.warning("storage cannot tell whether thread %s is known (%s); skipping", msg.thread, exc)
            return False

    async def _busy_reply(self, msg: IncomingMessage) -> None:
        self._count("busy")
        log.info("thread %s busy; told the user (message %s)", msg.thread, msg.ts)
        with anyio.move_on_after(10):
            try:
                await self.services.slack.post_message(msg.channel, msg.thread_ts, markdown_text=BUSY_NOTICE)
            except Exception as exc:  # noqa: BLE001 - a failed busy note must not kill anything
                log.warning("could not post the busy reply in %s: %s", msg.thread, exc)

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
