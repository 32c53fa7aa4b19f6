"""The Socket Mode reader: keeps a WebSocket to Slack open and turns frames into envelopes.

Its one promise: **every envelope is acked the moment it arrives**, before anything
else happens, then handed to `on_envelope` (a plain function the nursery gives it, which
starts a task and returns at once). Nothing here waits on processing, so a slow OpenAI
call can never make Slack's 3-second ack deadline slip. An ack may carry a payload (a
modal's validation errors): the `ack_payload` hook computes it synchronously, from the
envelope alone, inside the same ack write.

Connections:
- each one starts with `apps.connections.open` (a fresh, single-use URL) and is usable
  once `hello` arrives;
- a `disconnect` frame (`warning`, `refresh_requested`, …) asks for a replacement: the new
  socket is opened *before* the old one is closed (make-before-break), and the old one
  keeps reading and acking until the new one has said hello;
- a ping goes out every `ping_interval`, and its pong must come back within
  `pong_timeout` (5 s, or one interval if that is shorter): a socket from which nothing
  at all (no frame, no pong) was heard for `ping_interval + pong_timeout` is half-open,
  and is abandoned (15 s with the default 10 s interval);
- failures reconnect with jittered exponential backoff capped at 5 s, so the bot is back
  within a few seconds of Slack after an outage; never faster than 0.25 s, and the
  backoff is only reset once a socket has stayed up for a while (one that dies right after
  `hello` cannot make the reader hot-loop); `link_disabled` and `too_many_websockets`
  pause for minutes, a refused app token for 60 s, a rate limit for its Retry-After.

Duplicates (redeliveries, the same event on two sockets) are not this module's
concern: it acks them too, and the nursery dedupes.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc

from bot.metrics import Metrics
from bot.slack.web_api import SlackAPIError, SlackRateLimited, SlackWebAPI
from bot.slack.websocket import Connector, WebSocket, WebSocketClosed

log = logging.getLogger(__name__)

ENVELOPE_TYPES = frozenset({"events_api", "slash_commands", "interactive"})
RETIRE_DRAIN_SECONDS = 2.0  # how long a replaced socket keeps reading before we close it
LONG_BACKOFF_REASONS = {"link_disabled": 300.0, "too_many_websockets": 60.0}
BAD_TOKEN_BACKOFF_SECONDS = 60.0  # apps.connections.open refused the app token
BACKOFF_BASE_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 5.0  # the longest wait between two attempts while Slack is down
BACKOFF_MIN_SECONDS = 0.25  # the shortest: never a hot loop
STABLE_SOCKET_SECONDS = 5.0  # a socket that lived this long resets the backoff
PONG_TIMEOUT_SECONDS = 5.0  # a ping's pong must arrive within this (or one ping interval)


@dataclass(frozen=True)
class Envelope:
    envelope_id: str
    type: str
    payload: dict[str, Any]
    retry_attempt: int = 0
    received_at: float = 0.0  # anyio.current_time() when the frame was read


EnvelopeHandler = Callable[[Envelope], None]
# (envelope type, payload) -> the ack's payload, or None. Called while acking: must be pure and instant.
AckPayload = Callable[[str, dict[str, Any]], "dict[str, Any] | None"]


class Backoff:
    """Exponential backoff with jitter: the n-th delay is drawn from [d/2, d] where
    d = base·2ⁿ capped at `cap` (0.25–0.5 s, 0.5–1 s, 1–2 s, 2–4 s, then 2.5–5 s for
    every further attempt), and is never below `minimum`."""

    def __init__(
        self,
        base: float = BACKOFF_BASE_SECONDS,
        cap: float = BACKOFF_CAP_SECONDS,
        rng: random.Random | None = None,
        minimum: float = BACKOFF_MIN_SECONDS,
    ) -> None:
        self.base, self.cap, self.minimum, self.failures = base, cap, minimum, 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        doubling: int = 2 ** min(self.failures, 32)  # a non-negative power: an int
        delay = min(self.cap, self.base * doubling)
        self.failures += 1
        return max(self.minimum, delay / 2 + self._rng.uniform(0, delay / 2))

    def reset(self) -> None:
        self.failures = 0


@dataclass
class _Connection:
    number: int
    ws: WebSocket
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    hello: anyio.Event = field(default_factory=anyio.Event)
    wants_replacement: anyio.Event = field(default_factory=anyio.Event)
    closed: anyio.Event = field(default_factory=anyio.Event)
    reason: str = ""
    opened_at: float = field(default_factory=anyio.current_time)

    def end(self, reason: str) -> None:
        if not self.reason:
            self.reason = reason
        self.wants_replacement.set()


class SocketModeReader:
    def __init__(
        self,
        slack: SlackWebAPI,
        connector: Connector,
        on_envelope: EnvelopeHandler,
        *,
        ping_interval: float = 10.0,
        pong_timeout: float = PONG_TIMEOUT_SECONDS,
        hello_timeout: float = 15.0,
        rng: random.Random | None = None,
        ack_payload: AckPayload | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics if metrics is not None else Metrics()
        self._slack = slack
        self._connect_ws = connector
        self._on_envelope = on_envelope
        self._ack_payload = ack_payload
        self._ping_interval = ping_interval
        # A ping's pong must be back before the next ping is due, and within pong_timeout.
        self._silence_limit = ping_interval + min(pong_timeout, ping_interval)
        self._hello_timeout = hello_timeout
        self._backoff = Backoff(rng=rng)
        self._count = 0
        self.connected = anyio.Event()  # set once the first socket said hello
        self.reconnects: dict[str, int] = {}
        self.envelopes_acked = 0
        self.live_sockets = 0
        self.ready_sockets = 0  # open sockets that have said hello (what /readyz checks)

    async def run(self) -> None:
        """Keep one socket serving (two while one replaces the other), until cancelled."""
        async with anyio.create_task_group() as tg:
            previous: _Connection | None = None
            while True:
                conn = await self._open_with_backoff(tg)
                if previous is not None:
                    # Make-before-break: the new socket is live. The old one keeps reading
                    # (and acking) a moment longer for frames already on their way to it.
                    tg.start_soon(self._retire, previous)
                previous = conn
                await conn.wants_replacement.wait()
                self.reconnects[conn.reason] = self.reconnects.get(conn.reason, 0) + 1
                self._metrics.socket_reconnects.labels(reason=conn.reason).inc()
                log.info("socket #%d needs replacing (%s)", conn.number, conn.reason)
                pause = LONG_BACKOFF_REASONS.get(conn.reason)
                short_lived = anyio.current_time() - conn.opened_at < STABLE_SOCKET_SECONDS
                if not short_lived:
                    self._backoff.reset()  # it served a while: this is a fresh failure
                if pause is None and conn.reason in ("dropped", "stale", "closed") and short_lived:
                    pause = self._backoff.next_delay()  # a socket that dies at once: don't hot-loop
                    await anyio.sleep(pause)
                elif pause is not None:
                    log.error("Slack said %s; waiting %.0fs before reconnecting", conn.reason, pause)
                    conn.scope.cancel()
                    await anyio.sleep(pause)

    async def _retire(self, conn: _Connection) -> None:
        with anyio.move_on_after(RETIRE_DRAIN_SECONDS):
            await conn.closed.wait()
        conn.scope.cancel()

    async def _open_with_backoff(self, tg: anyio.abc.TaskGroup) -> _Connection:
        while True:
            try:
                conn = await self._open()
            except (SlackAPIError, WebSocketClosed, TimeoutError, OSError) as exc:
                delay = self._backoff.next_delay()
                if isinstance(exc, SlackRateLimited):
                    delay = max(delay, exc.retry_after)
                elif isinstance(exc, SlackAPIError) and exc.error in ("invalid_auth", "not_authed", "account_inactive"):
                    delay = max(delay, BAD_TOKEN_BACKOFF_SECONDS)
                    log.error("apps.connections.open refused the app token (%s); check SLACK_APP_TOKEN", exc.error)
                log.warning("cannot open Socket Mode connection (%s); retrying in %.1fs", exc, delay)
                await anyio.sleep(delay)
                continue
            tg.start_soon(self._serve, conn)
            with anyio.move_on_after(self._hello_timeout) as wait:
                await _first_of(conn.hello, conn.wants_replacement)
            if conn.hello.is_set():
                # The backoff is reset only once this socket has served a while (in `run`):
                # one that dies right after hello must not bring back the shortest delay.
                self.connected.set()
                return conn
            conn.scope.cancel()
            delay = self._backoff.next_delay()
            why = "no hello" if wait.cancelled_caught else conn.reason
            log.warning("socket #%d failed before hello (%s); retrying in %.1fs", conn.number, why, delay)
            await anyio.sleep(delay)

    async def _open(self) -> _Connection:
        body = await self._slack.call("apps.connections.open", app_token=True)
        url = body.get("url")
        if not isinstance(url, str) or not url:
            raise SlackAPIError("apps.connections.open", "no_url_in_response")
        with anyio.fail_after(self._hello_timeout):
            ws = await self._connect_ws(url)
        self._count += 1
        return _Connection(self._count, ws)

    async def _serve(self, conn: _Connection) -> None:
        """Read one socket until it ends or is replaced; always close it on the way out."""
        self.live_sockets += 1
        try:
            with conn.scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._keepalive, conn)
                    try:
                        while True:
                            await self._on_frames(conn, await _receive_burst(conn.ws))
                    except WebSocketClosed as exc:
                        log.info("socket #%d closed: %s", conn.number, exc)
                        conn.end("dropped")
                    tg.cancel_scope.cancel()
        finally:
            self.live_sockets -= 1
            if conn.hello.is_set():
                self.ready_sockets -= 1
            conn.end("closed")
            conn.closed.set()
            with anyio.CancelScope(shield=True):
                await conn.ws.aclose()

    async def _keepalive(self, conn: _Connection) -> None:
        """Ping every `ping_interval`. The socket is dead (half-open: TCP up, nothing
        arriving) once nothing at all — no frame, no pong — was heard from it for
        `ping_interval + pong_timeout`: the last ping's pong is overdue. Checked at that
        exact moment, not at the next ping."""
        next_ping = anyio.current_time() + self._ping_interval
        while True:
            now = anyio.current_time()
            deadline = conn.ws.last_activity + self._silence_limit
            if now >= deadline:
                self._abandon_silent(conn)
                return
            if now < next_ping:
                await anyio.sleep(min(next_ping, deadline) - now)
                continue
            next_ping = now + self._ping_interval
            # A write that cannot finish (the peer's window is full) must not stall the
            # watchdog past the deadline; a ping cut off mid-write leaves the socket unusable.
            with anyio.move_on_after(deadline - now) as writing:
                try:
                    await conn.ws.ping()
                except WebSocketClosed:
                    conn.end("dropped")
                    conn.scope.cancel()
                    return
            if writing.cancelled_caught:
                self._abandon_silent(conn)
                return

    def _abandon_silent(self, conn: _Connection) -> None:
        log.warning("socket #%d silent for %gs; abandoning it", conn.number, self._silence_limit)
        conn.end("stale")
        conn.scope.cancel()

    async def _on_frame(self, conn: _Connection, text: str) -> None:
        await self._on_frames(conn, [text])

    async def _on_frames(self, conn: _Connection, texts: list[str]) -> None:
        """Handle frames that arrived together. Every envelope among them is acked, in one
        write, before any of them is dispatched or any other frame is handled: under a
        burst, acking one envelope per trip through a busy event loop made the last acks
        wait behind the work the first ones started."""
        received_at = anyio.current_time()
        frames = [frame for text in texts if (frame := self._parse(conn, text)) is not None]
        acks = [self._ack(frame) for frame in frames if _envelope_id(frame)]
        if acks:
            # Ack first, whatever the envelopes hold: Slack redelivers anything un-acked.
            try:
                await conn.ws.send_texts(acks)
                self.envelopes_acked += len(acks)
                self._observe_acks(len(acks), received_at)
            except WebSocketClosed:
                conn.end("dropped")
                conn.scope.cancel()
                return  # not acked: Slack redelivers them, possibly on the new socket
        for frame in frames:
            envelope_id = _envelope_id(frame)
            if envelope_id:
                self._dispatch(frame, envelope_id, received_at)
            else:
                self._on_control(conn, frame)

    def _ack(self, frame: dict[str, Any]) -> str:
        """The ack frame; with a payload when the envelope accepts one and the `ack_payload`
        hook (pure and instant: validation only, no I/O) has one for it."""
        ack: dict[str, Any] = {"envelope_id": _envelope_id(frame)}
        payload = frame.get("payload")
        if (
            self._ack_payload is not None
            and frame.get("accepts_response_payload") is True
            and isinstance(payload, dict)
        ):
            try:
                response = self._ack_payload(str(frame.get("type")), payload)
            except Exception:  # a bug in the hook must not cost the ack
                log.exception("envelope %s: ack payload hook failed; acking without one", ack["envelope_id"])
                response = None
            if response:
                ack["payload"] = response
        return json.dumps(ack)

    def _parse(self, conn: _Connection, text: str) -> dict[str, Any] | None:
        try:
            frame = json.loads(text)
        except ValueError:
            log.warning("socket #%d: frame is not JSON (%d chars); ignored", conn.number, len(text))
            return None
        if not isinstance(frame, dict):
            log.warning("socket #%d: frame is not a JSON object; ignored", conn.number)
            return None
        return frame

    def _on_control(self, conn: _Connection, frame: dict[str, Any]) -> None:
        frame_type = frame.get("type")
        if frame_type == "hello":
            info = frame.get("debug_info") or {}
            log.info(
                "socket #%d ready (connections: %s, refresh in ~%ss)",
                conn.number,
                frame.get("num_connections"),
                info.get("approximate_connection_time", "?"),
            )
            if not conn.hello.is_set():
                self.ready_sockets += 1
            conn.hello.set()
        elif frame_type == "disconnect":
            reason = str(frame.get("reason") or "unknown")
            log.info("socket #%d: Slack sent disconnect (%s)", conn.number, reason)
            conn.end(reason)
        else:
            log.warning("socket #%d: unknown frame type %r; ignored", conn.number, frame_type)

    def _observe_acks(self, count: int, received_at: float) -> None:
        latency = anyio.current_time() - received_at
        self._metrics.envelopes_acked.inc(count)
        for _ in range(count):
            self._metrics.ack_latency.observe(latency)

    def _dispatch(self, frame: dict[str, Any], envelope_id: str, received_at: float) -> None:
        env_type = frame.get("type")
        payload = frame.get("payload")
        self._metrics.events_received.labels(type=_event_type(env_type, payload)).inc()
        if env_type not in ENVELOPE_TYPES or not isinstance(payload, dict):
            log.warning("envelope %s: unexpected type %r or payload; acked and ignored", envelope_id, env_type)
            return
        retry = frame.get("retry_attempt")
        envelope = Envelope(
            envelope_id=envelope_id,
            type=str(env_type),
            payload=payload,
            retry_attempt=retry if isinstance(retry, int) else 0,
            received_at=received_at,
        )
        try:
            self._on_envelope(envelope)
        except Exception:  # the reader must outlive any bug downstream
            log.exception("envelope %s: handler failed to start", envelope_id)


def _event_type(env_type: object, payload: object) -> str:
    """`message`, `app_mention`, … for Events API envelopes; the envelope type otherwise."""
    if env_type == "events_api" and isinstance(payload, dict) and isinstance(payload.get("event"), dict):
        return str(payload["event"].get("type") or "unknown")[:40]
    return str(env_type if env_type in ENVELOPE_TYPES else "unknown")


def _envelope_id(frame: dict[str, Any]) -> str:
    envelope_id = frame.get("envelope_id")
    return envelope_id if isinstance(envelope_id, str) else ""


async def _receive_burst(ws: WebSocket) -> list[str]:
    """The next message, plus any already received behind it (taken without waiting)."""
    first = await ws.receive_text()
    return [first, *ws.take_buffered()]


async def _first_of(*events: anyio.Event) -> None:
    """Return as soon as any of `events` is set."""
    async with anyio.create_task_group() as tg:

        async def wait(ev: anyio.Event) -> None:
            await ev.wait()
            tg.cancel_scope.cancel()

        for ev in events:
            tg.start_soon(wait, ev)
