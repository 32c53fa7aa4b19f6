"""The one top-level task group, and the life of a request inside it.

Everything the bot runs is a child of `Nursery.run`'s task group: the Socket Mode
reader, one task per request, the watchdog, the cleanup task and the signal watcher.
When `run` returns, nothing of the bot is left running.

A request's life (`_request`):
  parse → dedupe (memory, then storage) → per-thread gate (busy reply if taken)
  → its own cancel scope → `answer_message` → gate released by leaving `async with`.

Stop button (`agent_session_stopped`, from Slack's agent view): `stop_request` finds the
request running in that thread, sets its `stop_reason` and cancels its own scope; the
request's shielded clean-up then writes the answer so far with "_Stopped._" under it,
and it is counted `stopped`. Nothing else is touched.

Shutdown (`stop()`, or SIGINT/SIGTERM): stop reading events, give in-flight requests
`SHUTDOWN_GRACE_SECONDS`, then cancel the rest through their own scopes (each one
marks its placeholder interrupted, shielded and time-bounded), then end the group.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from functools import partial

import anyio

from bot.dedupe import RecentKeys
from bot.interactions.dispatch import SlackUX
from bot.metrics_server import check_ready, serve_endpoints
from bot.processing.answer import SHUTDOWN_WRITE_SECONDS, answer_message
from bot.processing.context import RequestState, UnrecordedOutcome
from bot.processing.failures import BUSY_NOTICE, STORAGE_DOWN_NOTICE
from bot.replica import keep_alive, keep_unrecorded, stop_replica
from bot.retrying import doubling, retry
from bot.services import SlackServices
from bot.slack.answer_surface import slack_surface
from bot.slack.events import IncomingMessage, Skip, StopRequest, parse_event, parse_stop
from bot.slack.receipts import answers_message, reply_payload
from bot.slack.reply import fallback_text
from bot.slack.socket_mode import Envelope, SocketModeReader
from bot.slack.try_again import TryAgain, mark_used, notice_blocks, parse_try_again, read_question, tell
from bot.slack.websocket import Connector
from bot.storage import StorageError
from bot.storage.base import ThreadKey
from bot.thread_gates import Hold, ThreadGates

log = logging.getLogger(__name__)

CLEANUP_INTERVAL = 60.0
EVENT_KEY_RETENTION = 24 * 3600.0  # Slack redelivers for minutes; a day is plenty
CLAIM_ATTEMPTS = 3  # claim_event tries, 0.1 s then 0.2 s apart, before in-memory dedupe alone
# With storage out of reach, whether another replica answers a message (its twin event,
# a redelivery) is unknown: its thread is looked at this long after, before saying so.
STORAGE_NOTE_GRACE = 5.0
TRY_AGAIN_LOOK_SECONDS = 20.0  # reading the thread for the message to try again
CLOSING_WAIT_SECONDS = 8.0  # a new message waits this long for a finished request to give its thread back
STORAGE_NOTE_LOOK_SECONDS = 30.0  # for that look (its budget is Tier 3, and many may be waiting)


class Nursery:
    def __init__(
        self,
        services: SlackServices,
        connector: Connector,
        *,
        handle_signals: bool = True,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.services = services
        replica = services.settings.replica
        self.gates = ThreadGates(services.store, owner=replica.id, lease_seconds=replica.timeout_seconds)
        self.recent = RecentKeys()
        self.active: dict[str, RequestState] = {}
        # Outcomes Slack shows that storage could not take yet (keep_alive records them).
        self.unrecorded: dict[str, UnrecordedOutcome] = {}
        self.outcomes: dict[str, int] = {}
        self.ux = SlackUX(services)
        self.reader = SocketModeReader(
            services.slack,
            connector,
            self.on_envelope,
            ping_interval=services.settings.slack.socket_ping_interval_seconds,
            ack_payload=self.ux.ack_payload,
            metrics=services.metrics,
        )
        services.metrics.watch_requests(lambda: len(self.active))
        services.metrics.watch_limiter(services.model_slots)
        self.metrics_port: int | None = None  # bound port of the /metrics listener, when on
        self._handle_signals = handle_signals
        self._wall_clock = wall_clock
        self._stop = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._reader_scope = anyio.CancelScope()
        self._accepting = True
        self._handling = 0  # envelopes dispatched whose task has not finished (see on_envelope)

    # ---- the task group -------------------------------------------------------------

    async def run(self) -> None:
        observability, replica = self.services.settings.observability, self.services.settings.replica
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if self._handle_signals:
                tg.start_soon(self._watch_signals)
            if observability.metrics_port is not None:
                ready = partial(check_ready, lambda: self.reader.ready_sockets > 0, self.services.store)
                self.metrics_port = await tg.start(
                    serve_endpoints,
                    self.services.metrics,
                    ready,
                    observability.metrics_host,
                    observability.metrics_port,
                )
            tg.start_soon(self._run_reader)
            tg.start_soon(
                self._watchdog, observability.watchdog_interval_seconds, observability.watchdog_threshold_seconds
            )
            tg.start_soon(self._cleanup)
            tg.start_soon(self.gates.renew_forever)
            # The heartbeat (and the sweep) in a task group of their own: they go on
            # through the shutdown's grace period, and have ended — a heartbeat already
            # on its worker thread included — before `stop_replica` removes the row,
            # which a late heartbeat would otherwise write back.
            async with anyio.create_task_group() as alive:
                alive.start_soon(
                    partial(
                        keep_alive,
                        self.services.slack,
                        self.services.store,
                        self.gates,
                        replica_timeout=replica.timeout_seconds,
                        bot_id=self.services.me.bot_id,
                        unrecorded=self.unrecorded,
                    )
                )
                await self._stop.wait()
                await self._shutdown(replica.shutdown_grace_seconds)
                alive.cancel_scope.cancel()
            await stop_replica(self.services.store, self.gates, self.unrecorded)
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
        if self.active or self._handling:
            log.info("waiting up to %.1fs for %d request(s) in flight", grace, max(len(self.active), self._handling))
            with anyio.move_on_after(grace):
                # Polled, not an Event: `active` and `_handling` change in many places.
                while self.active or self._handling:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
        if self.active:
            log.info("interrupting %d request(s)", len(self.active))
            while self.active:  # each one finalizes (bounded) and leaves
                for state in list(self.active.values()):  # (one that only just started, too)
                    state.scope.cancel()
                    state.hurry(SHUTDOWN_WRITE_SECONDS)  # a final write already waiting: cut it short
                await anyio.sleep(0.05)

    async def _watchdog(self, interval: float, threshold: float) -> None:
        """Monitoring only: it logs long requests and never touches their gates or scopes."""
        while True:
            await anyio.sleep(interval)
            now = anyio.current_time()
            for state in list(self.active.values()):
                age = now - state.started_at
                if age >= threshold:
                    log.warning(
                        "request %s in %s running for %.0fs (stage: %s)",
                        state.request_id,
                        state.message.thread,
                        age,
                        state.stage,
                        extra={
                            "request_id": state.request_id,
                            "age_s": round(age, 1),
                            "slack_thread": str(state.message.thread),
                            "stage": state.stage,
                        },
                    )

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
        # Counted from here, not from inside the task: an envelope acked an instant before
        # a SIGTERM must be waited for too, or it would be cancelled before it is even
        # `active` — acked, so never redelivered, and never answered.
        self._handling += 1
        self._tg.start_soon(self._handle, envelope, name=f"envelope {envelope.envelope_id}")

    async def _handle(self, envelope: Envelope) -> None:
        try:
            await self._request(envelope)
        finally:
            self._handling -= 1

    async def _request(self, envelope: Envelope) -> None:
        stop = parse_stop(envelope.payload) if envelope.type == "events_api" else None
        if stop is not None:  # the Stop button: about a request of ours, so handled here
            self.stop_request(stop)
            return
        click = parse_try_again(envelope.type, envelope.payload)
        if click is not None:  # "Try again" under a failure notice: a message to run again
            await self.try_again(click)
            return
        if self.ux.wants(envelope):  # slash commands, interactions, App Home, assistant threads
            await self.ux.handle(envelope)
            return
        parsed = parse_event(envelope.payload, self.services.me)
        if isinstance(parsed, Skip):
            level = logging.WARNING if parsed.malformed else logging.DEBUG
            log.log(level, "envelope %s skipped: %s", envelope.envelope_id, parsed.reason)
            return
        msg = parsed
        if not await self._first_time(msg):
            self._count("duplicate")
            log.info(
                "event %s (%s/%s) already handled; skipped (retry %d)",
                msg.event_id,
                msg.channel,
                msg.ts,
                envelope.retry_attempt,
            )
            return
        await self._serve(msg)

    async def _serve(self, msg: IncomingMessage) -> None:
        """A new message (or one to try again): access control, the thread's gate (the
        busy reply if it is taken), then the request."""
        if msg.kind == "thread_followup" and not await self._thread_known(msg):
            log.debug("message %s in a thread the bot is not part of; skipped", msg.ts)
            return
        if not await self.ux.admit(msg):  # access control (polite refusal once per thread); welcome
            return
        await self._closed(msg.thread)
        try:
            async with self.gates.try_enter(msg.thread) as hold:
                if hold is None:
                    await self._busy_reply(msg)
                    return
                await self._answer(msg, hold)
        except StorageError as exc:  # taking the thread's lease: who holds it is unknown
            await self._cannot_lease(msg, exc)

    async def _answer(self, msg: IncomingMessage, hold: Hold) -> None:
        state = RequestState.begin(msg, owner=hold.owner, fence=hold.fence)
        hold.on_lost = state.lose_lease  # another replica has the thread now: stop writing
        state.confirm_lease = partial(self.gates.confirm, hold)
        self.active[state.request_id] = state
        log.info(
            "request %s: %s in %s",
            state.request_id,
            msg.kind,
            msg.thread,
            extra={"request_id": state.request_id, "slack_thread": str(msg.thread), "kind": msg.kind},
        )
        try:
            with state.scope:
                await answer_message(
                    self.services,
                    state,
                    partial(
                        slack_surface,
                        self.services.slack,
                        self.services.me,
                        self.services.settings.surfaces,
                        self.services.store,
                        msg,
                        request_id=state.request_id,
                        may_write=partial(self.gates.surely_held, hold),
                    ),
                )
        finally:
            del self.active[state.request_id]
            if state.unrecorded is not None:
                keep_unrecorded(self.unrecorded, state.unrecorded)
            # No outcome: cancelled before answer_message reached its own try block.
            outcome = state.outcome or ("stopped" if state.stop_reason else "interrupted")
            self._count(outcome)
            duration = anyio.current_time() - state.started_at
            log.info(
                "request %s: %s after %.2fs",
                state.request_id,
                outcome,
                duration,
                extra={
                    "request_id": state.request_id,
                    "slack_thread": str(msg.thread),
                    "outcome": outcome,
                    "duration_s": round(duration, 3),
                },
            )

    def stop_request(self, stop: StopRequest) -> RequestState | None:
        """The user pressed Stop: cancel the request answering in that thread through its
        own scope (nothing else is touched), and return it; None when none is running."""
        if not stop.channel:
            log.warning("agent_session_stopped without a channel, thread or message; ignored")
            return None
        for state in self.active.values():
            msg = state.message
            if msg.channel != stop.channel:
                continue
            if (stop.thread_ts and msg.thread_ts == stop.thread_ts) or (
                state.placeholder_ts and state.placeholder_ts in stop.message_ts
            ):
                break
        else:
            log.debug(
                "stop in %s/%s (messages %s): no request running there; ignored",
                stop.channel,
                stop.thread_ts,
                ",".join(stop.message_ts) or "none",
            )
            return None
        if not state.stop_reason:  # Slack may deliver the event twice: once is enough
            log.info(
                "request %s: stopped by %s",
                state.request_id,
                stop.user or "the user",
                extra={"request_id": state.request_id, "slack_thread": str(msg.thread)},
            )
            state.stop_reason = f"stopped by {stop.user or 'the user'}"
        state.scope.cancel()
        return state

    async def try_again(self, click: TryAgain) -> None:
        """ "Try again" under a failure notice: the question is read from its thread and
        run as the new message it was (same gate, deadline and settings), once per notice
        (the click is claimed in storage, so a second click, a redelivery or another
        replica does nothing), and only for the user who asked it."""
        if not click.asked_ts:
            log.warning("a Try again click without its channel, message, user or value; ignored")
            return
        slack = self.services.slack
        question = await read_question(slack, click, bound=TRY_AGAIN_LOOK_SECONDS)
        if question is None:
            return
        if question.get("user") != click.user:
            asker = question.get("user")
            await tell(slack, click, f"Only <@{asker}> can ask for another answer to their message.")
            return
        event = {**question, "type": "message", "channel": click.channel}
        parsed = parse_event({"event_id": f"try-again:{click.claim_key}", "event": event}, self.services.me)
        if isinstance(parsed, Skip):
            log.warning(
                "Try again on %s/%s: not a message to answer (%s)", click.channel, click.asked_ts, parsed.reason
            )
            return
        if not await self.ux.first("try_again", click.claim_key):
            log.info("Try again on notice %s/%s: already used; ignored", click.channel, click.notice_ts)
            await tell(slack, click, "This was tried again already: the new answer is in the thread.")
            return
        log.info("Try again: %s asks again in %s (message %s)", click.user, parsed.thread, parsed.ts)
        await mark_used(slack, click)
        await self._serve(parsed)

    async def _closed(self, thread: ThreadKey) -> None:
        """A follow-up (or a "Try again" click) can come as soon as the answer or notice
        shows, while the request that wrote it still holds the thread (clearing the
        thread's status, recording its outcome, giving its lease back): wait for that,
        bounded, rather than give the busy reply. A request still running there is not
        waited for: the message gets the busy reply."""

        def closing() -> bool:
            if not self.gates.busy(thread):  # (the usual case: nothing to look through)
                return False
            return all(s.stage == "finishing" for s in self.active.values() if s.message.thread == thread)

        with anyio.move_on_after(CLOSING_WAIT_SECONDS):
            while closing():  # noqa: ASYNC110 (polled: the gate has no event to wait on)
                await anyio.sleep(0.05)

    async def _first_time(self, msg: IncomingMessage) -> bool:
        if not self.recent.add_all(msg.dedupe_keys, anyio.current_time()):
            return False
        # A momentary storage error must not make a restarted process forget that an
        # earlier one already handled this event: retry a little before falling back.
        try:
            return await retry(
                partial(self.services.store.claim_event, *msg.dedupe_keys),
                errors=StorageError,
                attempts=CLAIM_ATTEMPTS,
                pause=doubling(0.1),
            )
        except StorageError as exc:
            log.warning("storage cannot record event %s (%s); relying on in-memory dedupe", msg.event_id, exc)
            return True

    async def _thread_known(self, msg: IncomingMessage) -> bool:
        try:
            return await self.services.store.thread_known(msg.thread)
        except StorageError as exc:
            log.warning("storage cannot tell whether thread %s is known (%s); skipping", msg.thread, exc)
            return False

    async def _cannot_lease(self, msg: IncomingMessage, exc: StorageError) -> None:
        """Storage failed taking the thread's lease. Tell the user the bot cannot answer —
        unless, a moment later, the thread shows the bot answering there: another replica,
        which can reach storage, has the same message (a twin event or a redelivery), and
        the note would stand beside its answer."""
        await anyio.sleep(STORAGE_NOTE_GRACE)
        if await self._answered_elsewhere(msg):
            self._count("duplicate")
            log.warning(
                "thread %s: cannot take its lease (%s), but the bot answers message %s there already",
                msg.thread,
                exc,
                msg.ts,
            )
            return
        await self._storage_down_reply(msg, exc)

    async def _storage_down_reply(self, msg: IncomingMessage, exc: StorageError) -> None:
        self._count("error")
        log.error("thread %s: cannot take its lease (%s); message %s not answered", msg.thread, exc, msg.ts)
        await self._notice(msg, STORAGE_DOWN_NOTICE, "storage notice")

    async def _answered_elsewhere(self, msg: IncomingMessage) -> bool:
        """Whether the thread holds the bot's answer to the message, finished or not, or
        its busy reply (their metadata say which message they answer). Bounded; False
        when the thread cannot be read. (A native stream says so only once finished.)"""
        with anyio.move_on_after(STORAGE_NOTE_LOOK_SECONDS):
            try:
                replies = await self.services.slack.thread_replies(
                    msg.channel, msg.thread_ts, include_all_metadata=True
                )
            except Exception as exc:
                log.warning("could not read thread %s: %s", msg.thread, exc)
                return False
            return any(answers_message(m, msg.ts, self.services.me.bot_id) for m in replies)
        return False

    async def _busy_reply(self, msg: IncomingMessage) -> None:
        self._count("busy")
        log.info("thread %s busy; told the user (message %s)", msg.thread, msg.ts)
        await self._notice(msg, BUSY_NOTICE, "busy reply")

    async def _notice(self, msg: IncomingMessage, text: str, what: str) -> None:
        """Post `text` in the message's thread, with "Try again" for the message, bounded
        (10 s) and never raising."""
        with anyio.move_on_after(10):
            try:
                await self.services.slack.post_message(
                    msg.channel,
                    msg.thread_ts,
                    blocks=notice_blocks(text, msg.ts),
                    text=fallback_text(text),
                    payload=reply_payload(msg.ts),
                )
            except Exception as exc:
                log.warning("could not post the %s in %s: %s", what, msg.thread, exc)

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.services.metrics.requests.labels(outcome=outcome).inc()
