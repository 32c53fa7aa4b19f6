"""A fake Slack that speaks the real wire formats: the Web API and Socket Mode.

Why a fake and not mocks: the bot's HTTP client and WebSocket reader run unchanged
against it, so a test exercises the same JSON, headers, tokens, tickets, envelopes and
acks as production. It is pure AnyIO (no threads, no wall clock), so it also runs in a
Trio MockClock simulation where hours of reconnects and timeouts cost no real time.

Two ways to reach it:
- in-process: `httpx2.MockTransport(fake.handle)` for the Web API and `fake.connector`
  (a `bot.slack.websocket.Connector`) for Socket Mode;
- over real sockets: `tests.fakes.servers.slack_server(fake)`.

Both kinds of Socket Mode connection implement `Link` (the server side of one socket), so
`send_event`, `disconnect`, `drop`, `silence` and the ack log work the same for both.

Files: `add_file` stores bytes and returns the file object events carry; `url_private`
downloads are served under the fake's own origin (`files_url`) and check the bearer
token (Slack's HTML sign-in page with HTTP 200 otherwise, or when `file_scope` is off);
`files.info`, `files.getUploadURLExternal`, the byte upload and
`files.completeUploadExternal` work as Slack's upload flow does.

Rules Slack documents, enforced by default (docs.slack.dev method reference, as mirrored in
slack-ruby/slack-api-ref; summarised in shared/docs/protocols.md C2, C4, C5 and C6), so a
bot that breaks them fails here as it would in production:
- Rate limits per method, workspace-wide: one token bucket per method for the whole fake,
  shared by every caller (T2 20/min, T3 50/min, T4 100/min, burst = rate // 5, refilled
  continuously); chat.postMessage has one bucket per channel (1/s, burst 5) instead;
  auth.test is not limited. An empty bucket answers HTTP 429 `ratelimited` with
  `Retry-After` (whole seconds until a token is back); calls that arrive before the
  announced window ends are answered 429 again and logged in `calls_in_retry_after`.
  `FakeSlack(rate_limits=False)` turns the buckets off; `rate_overrides` changes rates.
- Streaming state: chat.update / chat.delete on a message still streaming →
  `streaming_state_conflict`; append/stop on one not streaming → `message_not_in_streaming_state`.
- Text caps: chat.update `text` ≤ 4,000, chat.postMessage `text` ≤ 40,000, `markdown_text`
  ≤ 12,000 (`msg_too_long`). Message blocks: ≤ 50 blocks, section text ≤ 3,000 (≤ 10
  fields), header ≤ 150, `markdown` blocks ≤ 12,000 together, context ≤ 10 elements,
  actions ≤ 25 elements, button text ≤ 75 (`invalid_blocks`). Views: ≤ 100 blocks, titles
  ≤ 24, private_metadata ≤ 3,000, plus the same per-block checks.
- Assistant status (setStatus, DMs and channel threads alike): expires 120 s after it was
  set, and clears when the app posts in the thread (postMessage with that thread_ts,
  startStream) or on status "". `visible_status` says what a user sees now.
- Streaming chunks (`chunks` on chat.startStream / appendStream / stopStream; docs.slack.dev
  chat.appendStream "chunks", slack_sdk.models.messages.chunk): `check_chunks` takes
  markdown_text, task_update, plan_update and blocks chunks with their required fields, a
  task status of pending / in_progress / complete / error, and the lengths below, else
  `invalid_chunks`. One streaming mode per stream: "the streaming mode must be the same as
  the one used to start the stream" (markdown_text or chunks); for a stream started empty
  the first call that carries content sets it — the fake's reading — and the other mode is
  `streaming_mode_mismatch`. Task states per message: `stream_tasks[(channel, ts)]`;
  `refuse_chunks = "invalid_chunks"` (or any code) refuses every call with chunks.
"""

from __future__ import annotations

import contextlib
import json
import math
import mimetypes
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, parse_qsl, quote, urlsplit

import anyio
import anyio.lowlevel
import httpx2

from bot.slack.websocket import WebSocketClosed

FIRST_TS = 1_700_000_000
MAX_CONNECTIONS = 10  # Slack's per-app cap on Socket Mode connections
# Form-encoded requests carry these structured arguments as JSON strings.
_JSON_ARGS = frozenset({"blocks", "attachments", "files", "metadata", "prompts", "view", "chunks"})

# Text caps per method and field (docs.slack.dev method reference; protocols.md C4, C6).
MARKDOWN_TEXT_LIMIT = 12_000  # markdown_text on postMessage/update/start/append/stopStream
TEXT_LIMIT = 40_000  # chat.postMessage `text`
UPDATE_TEXT_LIMIT = 4_000  # chat.update `text` (docs.slack.dev chat.update; protocols.md C6)
# Block Kit limits for messages (protocols.md C4, from slack_sdk's validators).
MESSAGE_BLOCKS_LIMIT = 50
VIEW_BLOCKS_LIMIT = 100
SECTION_TEXT_LIMIT = 3_000
SECTION_FIELDS_LIMIT = 10
HEADER_TEXT_LIMIT = 150
MARKDOWN_BLOCKS_LIMIT = 12_000  # cumulative across all `markdown` blocks of one message
CONTEXT_ELEMENTS_LIMIT = 10
ACTIONS_ELEMENTS_LIMIT = 25
BUTTON_TEXT_LIMIT = 75
# Streaming chunks. A markdown_text chunk's text shares MARKDOWN_TEXT_LIMIT with the
# `markdown_text` argument (per call). 256 for a plan_update title and a task's details and
# output (documented with the chunk types of Microsoft's Agents SDK for Slack); Slack gives
# no figure for a task's title: the same 256 is assumed.
CHUNK_TEXT_LIMIT = 256
TASK_STATUSES = frozenset({"pending", "in_progress", "complete", "error"})
TASK_DISPLAY_MODES = frozenset({"timeline", "plan"})  # chat.startStream task_display_mode (default timeline)
STATUS_TTL = 120.0  # assistant.threads.setStatus: removed if no message is sent within 2 minutes

# Rate limits (docs.slack.dev "Rate limits" and each method's tier; protocols.md C2, C6).
# Slack's tiers say "20+", "50+", "100+" per minute: bursts are tolerated, then 429.
TIER_PER_MINUTE = {2: 20, 3: 50, 4: 100}
METHOD_TIERS: dict[str, int] = {
    "chat.startStream": 2,
    "chat.stopStream": 2,
    "chat.update": 3,
    "chat.delete": 3,
    "conversations.replies": 3,
    "conversations.history": 3,
    "apps.connections.open": 3,
    "reactions.add": 3,
    "chat.appendStream": 4,
    "chat.postEphemeral": 4,
    "views.open": 4,
    "views.update": 4,
    "views.push": 4,
    "views.publish": 4,
    "assistant.threads.setTitle": 4,
    "assistant.threads.setSuggestedPrompts": 4,
    # Slack lists setStatus as "Special" and gives no figure; we model it as Tier 4.
    "assistant.threads.setStatus": 4,
    "users.info": 4,
    "files.info": 4,
    "files.getUploadURLExternal": 4,
    "files.completeUploadExternal": 4,
}
UNLIMITED_METHODS = frozenset({"auth.test"})  # "Special", and not limited in practice
# chat.postMessage is "Special": about one message a second per channel, short bursts
# allowed; modelled as one bucket per channel and no workspace-wide bucket.
POST_MESSAGE_PER_SECOND = 1
POST_MESSAGE_BURST = 5
_EPSILON = 1e-6  # float slack when comparing times and token counts


def burst_for(per_minute: float) -> int:
    """Bucket capacity for a tier rate: a fifth of a minute's calls (T2 4, T3 10, T4 20)."""
    return max(1, int(per_minute) // 5)


def default_limit(method: str) -> tuple[float, int] | None:
    """(calls per minute, burst) Slack allows `method` by default; None if not limited.
    For chat.postMessage the figures are per channel."""
    if method in UNLIMITED_METHODS:
        return None
    if method == "chat.postMessage":
        return POST_MESSAGE_PER_SECOND * 60, POST_MESSAGE_BURST
    tier = METHOD_TIERS.get(method)
    if tier is None:
        return None
    per_minute = TIER_PER_MINUTE[tier]
    return per_minute, burst_for(per_minute)


class SlackError(Exception):
    """Raised inside a method implementation; becomes `{"ok": false, "error": code}`, with
    `detail` (if any) in `response_metadata.messages` as Slack explains invalid_blocks."""

    def __init__(self, code: str, detail: str | None = None) -> None:
        super().__init__(code if detail is None else f"{code}: {detail}")
        self.code = code
        self.detail = detail

    def body(self) -> dict:
        body: dict = {"ok": False, "error": self.code}
        if self.detail is not None:
            body["response_metadata"] = {"messages": [f"[ERROR] {self.detail}"]}
        return body


class NoConnection(RuntimeError):
    """`send_event` found no live Socket Mode connection to deliver on."""


@dataclass
class Bucket:
    """A token bucket: `capacity` calls at once, refilled continuously at `per_minute`/60
    a second. Time comes from the caller (anyio.current_time()), so it runs on virtual time."""

    per_minute: float
    capacity: int
    tokens: float = -1.0  # -1: full, set on first use (a FakeSlack may be built outside a loop)
    updated: float = 0.0

    def _refill(self, now: float) -> None:
        if self.tokens < 0:
            self.tokens, self.updated = float(self.capacity), now
        self.tokens = min(float(self.capacity), self.tokens + (now - self.updated) * self.per_minute / 60)
        self.updated = now

    def take(self, now: float) -> float | None:
        """Take a token; None if one was there, else the seconds until one will be."""
        self._refill(now)
        if self.tokens >= 1 - _EPSILON:
            self.tokens = max(0.0, self.tokens - 1)
            return None
        return (1 - self.tokens) * 60 / self.per_minute


@dataclass
class Fault:
    error: str = "internal_error"
    status: int = 200
    retry_after: float | None = None
    body: str | None = None  # raw (non-JSON) body, e.g. an HTML 502 page
    times: int = 1
    after: bool = False  # the call takes effect first, then the answer is this error (lost reply)


@dataclass
class Delivery:
    """One envelope sent to the client (kept so tests can check acks and redeliveries)."""

    envelope_id: str
    event_id: str | None
    envelope: dict
    connection: Link
    sent_at: float
    retry_attempt: int = 0
    redelivered: bool = False


class Link:
    """Server side of one Socket Mode connection.

    FakeSlack talks to every connection only through this interface, which is what lets
    in-memory and real wsproto connections be driven by the same test code.
    """

    def __init__(self, fake: FakeSlack) -> None:
        self.fake = fake
        self.id = 0  # set by FakeSlack when the connection is accepted
        self.closed = False
        self.silenced = False  # dead socket: nothing sent, pings unanswered, client frames lost
        self.close_deadline: float | None = None  # set by disconnect(warning/refresh_requested)
        self.opened_at = anyio.current_time()
        self.pings = 0

    @property
    def live(self) -> bool:
        return not self.closed and (self.close_deadline is None or anyio.current_time() < self.close_deadline)

    @property
    def draining(self) -> bool:
        """Told to disconnect, still open for the grace period."""
        return self.close_deadline is not None

    def close_later(self, delay: float) -> None:
        self.close_deadline = anyio.current_time() + delay

    def _mark_closed(self) -> None:
        if not self.closed:
            self.closed = True
            self.fake._changed()

    async def send(self, text: str) -> None:
        """Send a text frame to the client (dropped if silenced or closed)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Polite close: a close frame after everything already sent."""
        raise NotImplementedError

    async def abort(self) -> None:
        """Abrupt close: the client's next receive raises WebSocketClosed."""
        raise NotImplementedError

    def __repr__(self) -> str:
        state = "closed" if self.closed else "silenced" if self.silenced else "draining" if self.draining else "live"
        return f"<{type(self).__name__} #{self.id} {state}>"


class MemoryLink(Link):
    """An in-memory connection. Server→client frames go through an unbounded memory object
    stream (sending never blocks the fake); client→server frames are handled at once."""

    def __init__(self, fake: FakeSlack) -> None:
        super().__init__(fake)
        self._to_client, self._from_server = anyio.create_memory_object_stream[str](math.inf)
        self.dropped = False
        self.client = MemoryWebSocket(self)

    async def send(self, text: str) -> None:
        await anyio.lowlevel.checkpoint()
        if self.live and not self.silenced:
            self._to_client.send_nowait(text)

    async def close(self) -> None:
        await anyio.lowlevel.checkpoint()
        self._to_client.close()  # the client drains what was sent, then sees the end
        self._mark_closed()

    async def abort(self) -> None:
        await anyio.lowlevel.checkpoint()
        self.dropped = True
        self._to_client.close()
        self._from_server.close()  # wakes a blocked receive_text at once
        self._mark_closed()


class MemoryWebSocket:
    """The client end of a MemoryLink; implements bot.slack.websocket.WebSocket."""

    def __init__(self, link: MemoryLink) -> None:
        self._link = link
        self._closed = False
        self.last_activity = anyio.current_time()

    async def send_text(self, text: str) -> None:
        await anyio.lowlevel.checkpoint()
        if self._closed or self._link.closed:
            raise WebSocketClosed("socket is closed")
        if not self._link.silenced:
            self._link.fake._on_client_frame(self._link, text)

    async def send_texts(self, texts: list[str]) -> None:
        """One frame after another, each as `send_text` sends it (there is no write to share)."""
        for text in texts:
            await self.send_text(text)

    async def receive_text(self) -> str:
        await anyio.lowlevel.checkpoint()
        link = self._link
        deadline = link.close_deadline if link.close_deadline is not None else math.inf
        with anyio.CancelScope(deadline=deadline) as scope:
            try:
                if self._closed or link.dropped:
                    raise anyio.ClosedResourceError
                try:  # frames sent before a close are delivered even after the deadline
                    text = link._from_server.receive_nowait()
                except anyio.WouldBlock:
                    text = await link._from_server.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                self._shut()
                raise WebSocketClosed("connection lost" if link.dropped else "closed by peer") from None
        if scope.cancelled_caught:  # the grace period after a `disconnect` ran out
            await link.close()
            self._shut()
            raise WebSocketClosed("closed by peer: 1000")
        self.last_activity = anyio.current_time()
        return text

    def take_buffered(self) -> list[str]:
        """Nothing: `receive_text` takes one frame at a time from the link and reads none
        ahead, so none is ever waiting behind it."""
        return []

    async def ping(self) -> None:
        await anyio.lowlevel.checkpoint()
        if not self._closed and self._link.live and not self._link.silenced:
            self._link.pings += 1
            self.last_activity = anyio.current_time()  # the pong arrives at once
            self._link.fake._changed()

    async def aclose(self) -> None:
        self._shut()
        self._link._to_client.close()
        self._link._mark_closed()

    def _shut(self) -> None:
        self._closed = True
        self._link._from_server.close()


class FakeSlack:
    """Slack's Web API (`handle`) and Socket Mode (`connector`, `send_event`, ...) in one object."""

    def __init__(
        self,
        *,
        bot_token: str = "xoxb-test-token",
        app_token: str = "xapp-test-token",
        bot_user_id: str = "UBOT",
        bot_id: str = "BBOT",
        team_id: str = "T1",
        app_id: str = "A1",
        ws_url: str = "ws://fake-slack.invalid/link",
        echo_bot_messages: bool = False,
        rate_limits: bool = True,
        rate_overrides: dict[str, float | None] | None = None,
    ) -> None:
        self.bot_token, self.app_token = bot_token, app_token
        self.bot_user_id, self.bot_id, self.team_id, self.app_id = bot_user_id, bot_id, team_id, app_id
        self.ws_url = ws_url
        self.echo_bot_messages = echo_bot_messages  # real Slack sends the bot's own posts back as events
        # Web API state
        self.messages: dict[str, list[dict]] = {}
        self.updates: dict[tuple[str, str], list[str]] = {}  # every text a message had, post first
        self.deleted: list[tuple[str, str]] = []
        self.calls: list[tuple[str, dict]] = []  # every call, rate-limited or faulted ones too
        self.accepted_calls: list[tuple[str, dict]] = []  # calls that reached the method (not 429, no fault)
        # Rate limits (see "rate limits" below)
        self.rate_limits = rate_limits  # False: no buckets (injected faults and their windows still apply)
        # method -> calls per minute (None: unlimited), in place of Slack's figure
        self.rate_overrides: dict[str, float | None] = dict(rate_overrides or {})
        self.rate_limited: dict[str, int] = {}  # method -> 429s answered (buckets, windows and injected)
        self.retry_windows: dict[tuple[str, str | None], float] = {}  # bucket key -> end of the announced Retry-After
        self.calls_in_retry_after: list[tuple[str, str | None, float]] = []  # (method, channel, time)
        self._buckets: dict[tuple[str, str | None], Bucket] = {}
        self.users: dict[str, dict] = {}  # overrides for users.info
        self.latency: dict[str, float] = {}  # per-method delay ("*" = every method); math.inf hangs
        self._faults: dict[str, list[Fault]] = {}
        self.outage_until = -math.inf  # see outage()
        self._outage_status = 503
        self._ts = 0
        # Views, App Home, assistant threads, native streaming (see "UX surfaces" below)
        self.views: dict[str, dict] = {}  # view_id -> the view as Slack holds it (id, hash, state…)
        self.home_views: dict[str, dict] = {}  # user id -> the published Home tab view
        self.ephemerals: list[dict] = []  # chat.postEphemeral arguments
        self.statuses: list[tuple[str, str, str]] = []  # (channel, thread_ts, status) per setStatus
        self.status_log: list[tuple[str, str, str, float]] = []  # (channel, thread_ts, status, time) per setStatus
        self.thread_status: dict[tuple[str, str], tuple[str, float]] = {}  # -> (status, since); a reply sets ""
        self.suggested_prompts: list[dict] = []  # setSuggestedPrompts arguments
        self.titles: dict[tuple[str, str], str] = {}  # (channel, thread_ts) -> title
        self.streaming_supported = True  # False: chat.*Stream answer unknown_method (an older Slack)
        self.stream_appends: dict[tuple[str, str], list[str]] = {}  # (channel, ts) -> appended texts
        # Streaming chunks: (channel, ts) -> task id -> the task as its last update left it
        # (title, status, details…), every chunk accepted in order, each task update.
        self.stream_tasks: dict[tuple[str, str], dict[str, dict]] = {}
        self.stream_chunks: dict[tuple[str, str], list[dict]] = {}
        self.task_updates: list[tuple[str, str, str, str]] = []  # (channel, ts, task id, status)
        self.refuse_chunks: str | None = None  # an error code: every call with `chunks` is refused with it
        self._triggers: dict[str, bool] = {}  # trigger_id -> used
        # Files (see "files" below)
        self.files_url = "http://slack.test"  # where url_private points; slack_server sets its own origin
        self.files: dict[str, dict] = {}  # file id -> file object
        self.file_data: dict[str, bytes] = {}
        self.file_scope = True  # False: the bot token lacks files:read (downloads get the sign-in page)
        self.downloads: list[dict] = []  # every GET of a file URL: file id, authorization header, what was served
        self.upload_posts: list[dict] = []  # every POST to an upload URL: file id, bytes, authorization header
        self.uploads: list[dict] = []  # completed uploads: file, channel, thread_ts, comment, bytes
        self._pending_uploads: dict[str, dict] = {}  # file id -> {filename, length, data}
        # Socket Mode state
        self.connections: list[Link] = []
        self.connections_opened = 0
        self.max_live_connections = 0
        self.refuse_connects = 0  # the next N WebSocket upgrades are refused
        self.approximate_connection_time = 18060
        self.deliveries: dict[str, Delivery] = {}
        self.acks: dict[str, float] = {}  # envelope_id -> anyio.current_time() of the first ack
        self.ack_payloads: dict[str, Any] = {}
        self.client_frames: list[tuple[int, str]] = []  # (connection id, raw text), acks included
        self._tickets: dict[str, bool] = {}  # ticket -> used
        self._round_robin = 0
        self._ids = 0
        self._event: anyio.Event | None = None

    # ------------------------------------------------------------------ waiting

    def _changed(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait_until(self, predicate: Callable[[], Any], timeout: float = 10.0) -> None:
        """Block until `predicate()` is true; re-checked on every state change (a call, a
        message, an ack, a connection opening or closing, a grace period ending)."""
        with anyio.fail_after(timeout):
            while not predicate():
                if self._event is None:
                    self._event = anyio.Event()
                event = self._event
                now = anyio.current_time()
                wake = min(
                    (
                        c.close_deadline
                        for c in self.connections
                        if c.close_deadline is not None and c.close_deadline > now
                    ),
                    default=math.inf,
                )
                with anyio.CancelScope(deadline=wake):
                    await event.wait()

    async def wait_acked(self, envelope_id: str, timeout: float = 5.0) -> float:
        """The ack time of `envelope_id`; TimeoutError if it is not acked in time."""
        await self.wait_until(lambda: envelope_id in self.acks, timeout)
        return self.acks[envelope_id]

    # ------------------------------------------------------------------ Web API

    def fail_next(
        self,
        method: str,
        *,
        error: str = "internal_error",
        status: int = 200,
        retry_after: float | None = None,
        body: str | None = None,
        times: int = 1,
        after: bool = False,
    ) -> None:
        """The next `times` calls to `method` fail. status=429 answers `ratelimited` with a
        Retry-After header; `body` replaces the JSON with raw text (a proxy's 502 page).
        `after`: Slack does the work, then the answer is lost in a 5xx (a post may exist
        although the caller was told it failed)."""
        self._faults.setdefault(method, []).append(Fault(error, status, retry_after, body, times, after))

    def outage(self, seconds: float, *, status: int = 503) -> None:
        """From now, for `seconds`, every Web API call answers an HTML `status` page and
        does nothing (a short Slack outage; file downloads are not affected)."""
        self.outage_until = anyio.current_time() + seconds
        self._outage_status = status

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        """The Web API: `POST /api/<method>` (GET works too, as on Slack)."""
        path = request.url.path
        if path.startswith(("/files-pri/", "/upload/")):
            return await self._file_http(request)
        method = path.split("/api/", 1)[1] if "/api/" in path else path.strip("/")
        try:
            args = _parse_args(request)
        except SlackError as exc:
            self.calls.append((method, {}))
            self._changed()
            return _json(exc.body())
        self.calls.append((method, args))
        self._changed()
        delay = self.latency.get(method, self.latency.get("*", 0.0))
        if delay:
            await anyio.sleep(delay)
        now = anyio.current_time()
        if now < self.outage_until:
            return httpx2.Response(
                self._outage_status,
                text="<html><h1>Service Unavailable</h1></html>",
                headers={"Content-Type": "text/html"},
            )
        key = self._bucket_key(method, args)
        window = self.retry_windows.get(key)
        in_window = window is not None and now < window - _EPSILON
        if in_window:
            self.calls_in_retry_after.append((method, _channel_of(args), now))
        after = bool(self._faults.get(method)) and self._faults[method][0].after
        fault = self._take_fault(method)
        if fault is not None and after:  # Slack acts, then the answer is lost
            impl = _METHODS.get(method)
            if impl is not None:
                with contextlib.suppress(SlackError):
                    impl(self, args)
                self._changed()
            return fault
        if fault is not None:
            if fault.status_code == 429:
                self._count_limited(method)
                self._announce(key, now + float(fault.headers.get("Retry-After", "1")))
            return fault
        try:
            self._check_token(method, request.headers.get("authorization", ""))
            impl = _METHODS.get(method)
            if impl is None:
                raise SlackError("unknown_method")
        except SlackError as exc:
            return _json(exc.body())
        if in_window:  # Slack keeps limiting until the window it announced is over
            return self._ratelimited(method, window - now)
        limited = self._take_token(method, key, now)
        if limited is not None:
            return limited
        self.accepted_calls.append((method, args))
        try:
            body = impl(self, args)
        except SlackError as exc:
            return _json(exc.body())
        if method == "chat.postMessage" and self.echo_bot_messages and self._candidates():
            event = {**body["message"], "channel": body["channel"], "event_ts": body["ts"], "channel_type": "im"}
            await self.send_event(event)
        self._changed()
        return _json({"ok": True, **body})

    def _take_fault(self, method: str) -> httpx2.Response | None:
        queue = self._faults.get(method)
        if not queue:
            return None
        fault = queue[0]
        fault.times -= 1
        if fault.times <= 0:
            queue.pop(0)
        if fault.status == 429:
            retry = fault.retry_after if fault.retry_after is not None else 1
            return _json({"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": f"{retry:g}"})
        headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
        if fault.body is not None:
            return httpx2.Response(fault.status, text=fault.body, headers={"Content-Type": "text/html", **headers})
        return _json({"ok": False, "error": fault.error}, status=fault.status, headers=headers)

    # ------------------------------------------------------------------ rate limits
    # One bucket per method for the whole fake (Slack limits per method, per workspace, per
    # app: every caller shares it), one per channel for chat.postMessage. A 429 announces a
    # window (Retry-After); calls inside it are logged and refused, as Slack keeps limiting.

    def limit_of(self, method: str) -> tuple[float, int] | None:
        """(calls per minute, burst) this fake allows `method`, overrides included; None if
        unlimited. Overrides get `burst_for(per_minute)` as their burst."""
        if method in self.rate_overrides:
            per_minute = self.rate_overrides[method]
            return None if per_minute is None else (per_minute, burst_for(per_minute))
        return default_limit(method)

    def accepted(self, method: str) -> int:
        """How many calls to `method` got past faults, auth and rate limits."""
        return sum(1 for m, _ in self.accepted_calls if m == method)

    @staticmethod
    def _bucket_key(method: str, args: dict) -> tuple[str, str | None]:
        if method == "chat.postMessage":
            return method, _channel_of(args)
        return method, None

    def _count_limited(self, method: str) -> None:
        self.rate_limited[method] = self.rate_limited.get(method, 0) + 1

    def _announce(self, key: tuple[str, str | None], until: float) -> None:
        self.retry_windows[key] = max(until, self.retry_windows.get(key, until))

    def _ratelimited(self, method: str, wait: float) -> httpx2.Response:
        self._count_limited(method)
        retry = max(1, math.ceil(wait - _EPSILON))
        return _json({"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": str(retry)})

    def _take_token(self, method: str, key: tuple[str, str | None], now: float) -> httpx2.Response | None:
        """None if the call may go ahead, else the 429 (and the window it announces)."""
        limit = self.limit_of(method)
        if not self.rate_limits or limit is None or (method == "chat.postMessage" and key[1] is None):
            return None
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = Bucket(*limit)
        wait = bucket.take(now)
        if wait is None:
            return None
        response = self._ratelimited(method, wait)
        self._announce(key, now + float(response.headers["Retry-After"]))
        return response

    def _check_token(self, method: str, authorization: str) -> None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise SlackError("not_authed")
        expected = self.app_token if method == "apps.connections.open" else self.bot_token
        if token != expected:
            raise SlackError("invalid_auth")

    def _next_ts(self) -> str:
        """Deterministic, strictly increasing Slack timestamps (no wall clock)."""
        self._ts += 1
        micros = self._ts * 100
        return f"{FIRST_TS + micros // 1_000_000}.{micros % 1_000_000:06d}"

    def _find(self, channel: str, ts: str) -> dict | None:
        return next((m for m in self.messages.get(channel, []) if m["ts"] == ts), None)

    def _store(self, channel: str, message: dict) -> dict:
        self.messages.setdefault(channel, []).append(message)
        self.updates[(channel, message["ts"])] = [message["text"]]
        self._changed()
        return message

    def _auth_test(self, args: dict) -> dict:
        return {
            "url": "https://fake-team.slack.com/",
            "team": "Fake Team",
            "user": "bot",
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
            "is_enterprise_install": False,
        }

    def _connections_open(self, args: dict) -> dict:
        ticket = f"{len(self._tickets) + 1}"
        self._tickets[ticket] = False
        sep = "&" if "?" in self.ws_url else "?"
        return {"url": f"{self.ws_url}{sep}ticket={ticket}&app_id={self.app_id}"}

    def _text_args(self, args: dict, *, required: bool, text_limit: int = TEXT_LIMIT) -> dict:
        """The text fields of a message write, checked against Slack's per-field caps
        (`text_limit` is 4,000 for chat.update, 40,000 for chat.postMessage)."""
        text, markdown = args.get("text"), args.get("markdown_text")
        if markdown is not None and (text is not None or args.get("blocks")):
            raise SlackError("markdown_text_conflict")
        if markdown is not None:
            if len(markdown) > MARKDOWN_TEXT_LIMIT:
                raise SlackError("msg_too_long", f"markdown_text is longer than {MARKDOWN_TEXT_LIMIT} characters")
            return {"text": markdown, "markdown_text": markdown}
        if text is None and not args.get("blocks"):
            if required:
                raise SlackError("no_text")
            return {}
        if text is not None and len(text) > text_limit:
            raise SlackError("msg_too_long", f"text is longer than {text_limit} characters")
        out: dict = {"text": text or ""}
        if args.get("blocks"):
            out["blocks"] = _check_blocks(args["blocks"], MESSAGE_BLOCKS_LIMIT, message=True)
        return out

    def _post_message(self, args: dict) -> dict:
        channel = args.get("channel")
        if not channel:
            raise SlackError("channel_not_found")
        message = {
            "type": "message",
            "ts": self._next_ts(),
            "user": self.bot_user_id,
            "bot_id": self.bot_id,
            "app_id": self.app_id,
            "team": self.team_id,
            **self._text_args(args, required=True),
        }
        if args.get("thread_ts"):
            message["thread_ts"] = str(args["thread_ts"])
            self._clear_status(channel, message["thread_ts"])
        self._set_metadata(message, args)
        self._store(channel, message)
        return {"channel": channel, "ts": message["ts"], "message": dict(message)}

    @staticmethod
    def _set_metadata(message: dict, args: dict) -> None:
        """`metadata` as chat.postMessage, chat.update and chat.stopStream take it: an
        event_type and an event_payload; without the argument the message keeps its
        own, and an empty object removes it (chat.update's reference)."""
        metadata = args.get("metadata")
        if metadata is None:
            return
        if metadata == {}:
            message.pop("metadata", None)
            return
        if (
            not isinstance(metadata, dict)
            or not isinstance(metadata.get("event_type"), str)
            or not isinstance(metadata.get("event_payload"), dict)
        ):
            raise SlackError("invalid_metadata_format")
        message["metadata"] = metadata

    def _own_message(self, args: dict, refusal: str) -> dict:
        message = self._find(args.get("channel", ""), str(args.get("ts", "")))
        if message is None:
            raise SlackError("message_not_found")
        if message.get("bot_id") != self.bot_id:
            raise SlackError(refusal)
        return message

    def _update(self, args: dict) -> dict:
        message = self._own_message(args, "cant_update_message")
        if message.get("streaming"):  # stop the stream first (docs.slack.dev chat.update)
            raise SlackError("streaming_state_conflict")
        changes = self._text_args(args, required=True, text_limit=UPDATE_TEXT_LIMIT)
        if "markdown_text" not in changes:
            message.pop("markdown_text", None)
        self._set_metadata(message, args)
        message.pop("streaming", None)  # an edited stream is an ordinary message again
        message.update(changes, edited={"user": self.bot_user_id, "ts": self._next_ts()})
        self.updates[(args["channel"], message["ts"])].append(message["text"])
        return {"channel": args["channel"], "ts": message["ts"], "text": message["text"], "message": dict(message)}

    def _delete(self, args: dict) -> dict:
        message = self._own_message(args, "cant_delete_message")
        if message.get("streaming"):
            raise SlackError("streaming_state_conflict")
        self.messages[args["channel"]].remove(message)
        self.deleted.append((args["channel"], message["ts"]))
        return {"channel": args["channel"], "ts": message["ts"]}

    def _replies(self, args: dict) -> dict:
        channel, ts = args.get("channel", ""), str(args.get("ts", ""))
        if channel not in self.messages:
            raise SlackError("channel_not_found")
        thread = self.thread_messages(channel, ts)
        if not thread:
            raise SlackError("thread_not_found")
        try:
            limit = max(1, min(int(args.get("limit") or 100), 1000))
            start = int(str(args.get("cursor") or "offset_0").removeprefix("offset_"))
        except ValueError:
            raise SlackError("invalid_arguments") from None
        page = thread[start : start + limit]
        if str(args.get("include_all_metadata", "")).lower() not in ("true", "1"):
            page = [{k: v for k, v in m.items() if k != "metadata"} for m in page]  # as Slack: only on request
        more = start + limit < len(thread)
        return {
            "messages": page,
            "has_more": more,
            "response_metadata": {"next_cursor": f"offset_{start + limit}" if more else ""},
        }

    def _users_info(self, args: dict) -> dict:
        user = args.get("user")
        if not user:
            raise SlackError("user_not_found")
        default = {
            "id": user,
            "team_id": self.team_id,
            "name": f"user-{user.lower()}",
            "real_name": f"User {user}",
            "deleted": False,
            "is_bot": user == self.bot_user_id,
            "tz": "UTC",
            "tz_offset": 0,
            "profile": {"real_name": f"User {user}", "display_name": f"user-{user.lower()}"},
        }
        found = {**default, **self.users.get(user, {})}
        if str(args.get("include_locale", "")).lower() not in ("true", "1"):
            found.pop("locale", None)  # as Slack: only on request
        return {"user": found}

    # ------------------------------------------------------------------ UX surfaces
    # Views (modals, App Home), ephemeral messages, assistant threads and chat streaming,
    # checked the way Slack checks them where it matters to the bot: single-use triggers,
    # view limits, view hashes, the streaming state of a message.

    def new_trigger(self) -> str:
        """A trigger_id as an interaction carries it; views.open accepts each one once."""
        self._ids += 1
        trigger = f"{self._ids}.{self.team_id}.fake-trigger"
        self._triggers[trigger] = False
        return trigger

    def _check_view(self, view: object, kinds: tuple[str, ...]) -> dict:
        if not isinstance(view, dict) or view.get("type") not in kinds:
            raise SlackError("invalid_arguments")
        blocks = view.get("blocks")
        if not isinstance(blocks, list) or len(blocks) > VIEW_BLOCKS_LIMIT:
            raise SlackError("invalid_arguments")
        if view["type"] == "modal":
            title = (view.get("title") or {}).get("text", "")
            if not title or len(title) > 24:
                raise SlackError("invalid_arguments")
            for key in ("submit", "close"):
                if key in view and len((view[key] or {}).get("text", "")) > 24:
                    raise SlackError("invalid_arguments")
        if len(view.get("private_metadata") or "") > 3000 or len(view.get("callback_id") or "") > 255:
            raise SlackError("invalid_arguments")
        block_ids = [b.get("block_id") for b in blocks if isinstance(b, dict) and b.get("block_id")]
        if len(block_ids) != len(set(block_ids)):
            raise SlackError("invalid_blocks")
        for block in blocks:
            if not isinstance(block, dict) or "type" not in block:
                raise SlackError("invalid_blocks")
            if block["type"] == "input" and (not block.get("label") or not isinstance(block.get("element"), dict)):
                raise SlackError("invalid_blocks")
        _check_blocks(blocks, VIEW_BLOCKS_LIMIT, message=False)
        return view

    def _store_view(self, view: dict, view_id: str | None = None, **extra: Any) -> dict:
        self._ids += 1
        view_id = view_id or f"V{self._ids:08d}"
        stored = {
            **view,
            "id": view_id,
            "team_id": self.team_id,
            "app_id": self.app_id,
            "hash": f"{self._ids}.fakehash",
            "state": {"values": {}},
            **extra,
        }
        self.views[view_id] = stored
        return stored

    def _views_open(self, args: dict) -> dict:
        trigger = str(args.get("trigger_id") or "")
        if trigger not in self._triggers:
            raise SlackError("invalid_trigger_id" if trigger else "invalid_arguments")
        if self._triggers[trigger]:
            raise SlackError("exchanged_trigger_id")
        view = self._check_view(args.get("view"), ("modal",))
        self._triggers[trigger] = True
        return {"view": self._store_view(view)}

    def _views_update(self, args: dict) -> dict:
        view_id = args.get("view_id")
        if not view_id and args.get("external_id"):
            view_id = next((v["id"] for v in self.views.values() if v.get("external_id") == args["external_id"]), None)
        if not view_id or view_id not in self.views:
            raise SlackError("not_found")
        current = self.views[view_id]
        if args.get("hash") and args["hash"] != current["hash"]:
            raise SlackError("hash_conflict")
        view = self._check_view(args.get("view"), ("modal", "home"))
        return {"view": self._store_view(view, view_id)}

    def _views_publish(self, args: dict) -> dict:
        user = args.get("user_id")
        if not user:
            raise SlackError("invalid_arguments")
        view = self._check_view(args.get("view"), ("home",))
        stored = self._store_view(view)
        self.home_views[str(user)] = stored
        return {"view": stored}

    def _post_ephemeral(self, args: dict) -> dict:
        if not args.get("channel") or not args.get("user"):
            raise SlackError("channel_not_found" if not args.get("channel") else "user_not_in_channel")
        self._text_args(args, required=True)
        self.ephemerals.append(dict(args))
        return {"message_ts": self._next_ts()}

    def _assistant_set_status(self, args: dict) -> dict:
        channel, thread_ts = str(args.get("channel_id") or ""), str(args.get("thread_ts") or "")
        if not channel or not thread_ts or "status" not in args:
            raise SlackError("invalid_arguments")
        # DMs and channel threads alike: Slack allows channel threads since 2026-03.
        status, now = str(args["status"]), anyio.current_time()
        self.statuses.append((channel, thread_ts, status))
        self.status_log.append((channel, thread_ts, status, now))
        self.thread_status[(channel, thread_ts)] = (status, now)
        return {}

    def _clear_status(self, channel: str, thread_ts: str) -> None:
        """The app replied in the thread: Slack removes the status by itself."""
        if self.thread_status.get((channel, thread_ts), ("", 0.0))[0]:
            self.thread_status[(channel, thread_ts)] = ("", anyio.current_time())

    def visible_status(self, channel: str, thread_ts: str) -> str:
        """The status a user sees in the thread now: "" once cleared (status "", or the app
        posted in the thread) or STATUS_TTL seconds after it was set."""
        status, since = self.thread_status.get((channel, thread_ts), ("", 0.0))
        if not status or anyio.current_time() - since >= STATUS_TTL:
            return ""
        return status

    def _assistant_set_prompts(self, args: dict) -> dict:
        prompts = args.get("prompts")
        if not args.get("channel_id") or not isinstance(prompts, list) or not 1 <= len(prompts) <= 4:
            raise SlackError("invalid_arguments")
        if not all(isinstance(p, dict) and p.get("title") and p.get("message") for p in prompts):
            raise SlackError("invalid_arguments")
        self.suggested_prompts.append(dict(args))
        return {}

    def _assistant_set_title(self, args: dict) -> dict:
        if not args.get("channel_id") or not args.get("thread_ts") or not args.get("title"):
            raise SlackError("invalid_arguments")
        self.titles[(str(args["channel_id"]), str(args["thread_ts"]))] = str(args["title"])
        return {}

    def _streaming_message(self, args: dict) -> dict:
        if not self.streaming_supported:
            raise SlackError("unknown_method")
        message = self._own_message(args, "message_not_owned_by_app")
        if not message.get("streaming"):
            raise SlackError("message_not_in_streaming_state")
        return message

    def _stream_content(self, message: dict | None, args: dict) -> list[dict]:
        """A streaming call's content, checked before anything changes: its chunks (or []),
        the text caps, and the stream's mode (set here by the first call with content)."""
        text = args.get("markdown_text")
        chunks: list[dict] = []
        if "chunks" in args:
            if self.refuse_chunks:
                raise SlackError(self.refuse_chunks)
            chunks = check_chunks(args["chunks"])
        markdown = (text or "") + "".join(c["text"] for c in chunks if c["type"] == "markdown_text")
        if len(markdown) > MARKDOWN_TEXT_LIMIT:
            raise SlackError("msg_too_long", f"markdown_text is longer than {MARKDOWN_TEXT_LIMIT} characters")
        modes = {mode for mode, used in (("markdown_text", bool(text)), ("chunks", bool(chunks))) if used}
        known = (message or {}).get("stream_mode")
        if len(modes) > 1 or (known and modes and modes != {known}):
            raise SlackError("streaming_mode_mismatch", f"this stream takes {known or 'one mode'} only")
        if message is not None and modes:
            message["stream_mode"] = modes.pop()
        return chunks

    def _stream_text(self, message: dict, args: dict, chunks: list[dict]) -> None:
        """Apply a checked call: its text (the argument or markdown_text chunks) and tasks."""
        key = (args["channel"], message["ts"])
        texts = [args["markdown_text"]] if args.get("markdown_text") is not None else []
        for chunk in chunks:
            self.stream_chunks.setdefault(key, []).append(chunk)
            if chunk["type"] == "markdown_text":
                texts.append(chunk["text"])
            elif chunk["type"] == "task_update":
                fields = {k: v for k, v in chunk.items() if k not in ("type", "id")}
                self.stream_tasks.setdefault(key, {}).setdefault(chunk["id"], {}).update(fields)
                self.task_updates.append((key[0], key[1], chunk["id"], chunk["status"]))
            elif chunk["type"] == "plan_update":
                message["plan_title"] = chunk["title"]
        if not texts:
            return
        text = "".join(texts)
        message["text"] += text
        message["markdown_text"] = message["text"]
        self.stream_appends.setdefault(key, []).append(text)
        self.updates[key].append(message["text"])

    def _start_stream(self, args: dict) -> dict:
        if not self.streaming_supported:
            raise SlackError("unknown_method")
        channel = args.get("channel")
        if not channel:
            raise SlackError("channel_not_found")
        if not args.get("thread_ts"):
            raise SlackError("invalid_arguments")
        if not str(channel).startswith("D") and not (args.get("recipient_user_id") and args.get("recipient_team_id")):
            raise SlackError(
                "missing_recipient_team_id" if args.get("recipient_user_id") else "missing_recipient_user_id"
            )
        mode = args.get("task_display_mode")
        if mode is not None and mode not in TASK_DISPLAY_MODES:
            raise SlackError("invalid_arguments", "task_display_mode must be timeline or plan")
        message = {
            "type": "message",
            "ts": self._next_ts(),
            "user": self.bot_user_id,
            "bot_id": self.bot_id,
            "app_id": self.app_id,
            "team": self.team_id,
            "text": "",
            "thread_ts": str(args["thread_ts"]),
            "streaming": True,
            "task_display_mode": mode or "timeline",
        }
        chunks = self._stream_content(message, args)  # refused before anything is stored
        self._store(channel, message)
        self._stream_text(message, args, chunks)
        self._clear_status(str(channel), message["thread_ts"])
        return {"channel": channel, "ts": message["ts"]}

    def _append_stream(self, args: dict) -> dict:
        message = self._streaming_message(args)
        if not args.get("markdown_text") and not args.get("chunks"):
            raise SlackError("invalid_arguments")
        chunks = self._stream_content(message, args)
        self._stream_text(message, args, chunks)
        return {"channel": args["channel"], "ts": message["ts"]}

    def _stop_stream(self, args: dict) -> dict:
        message = self._streaming_message(args)
        blocks = _check_blocks(args["blocks"], MESSAGE_BLOCKS_LIMIT, message=True) if args.get("blocks") else None
        chunks = self._stream_content(message, args)
        self._set_metadata(message, args)
        self._stream_text(message, args, chunks)
        if blocks is not None:
            message["blocks"] = blocks
        message["streaming"] = False
        return {"channel": args["channel"], "ts": message["ts"], "message": dict(message)}

    def end_stream(self, channel: str, ts: str) -> None:
        """Take a message out of streaming state, as Slack does when a stream expires."""
        message = self._find(channel, ts)
        if message is not None:
            message["streaming"] = False

    def _message_or_deleted(self, channel: str, ts: str) -> dict | None:
        message = self._find(channel, ts)
        if message is None and (channel, ts) not in self.deleted:
            raise KeyError(f"no message {channel}/{ts}")
        return message

    def is_streaming(self, channel: str, ts: str) -> bool:
        """Whether the message is still in streaming state (started, not stopped or expired)."""
        message = self._message_or_deleted(channel, ts)
        return bool(message and message.get("streaming"))

    def visible_text(self, channel: str, ts: str) -> str:
        """The message as a user sees it now: "" once deleted; with blocks, their text
        (the top-level `text` is then only the notification fallback); a stream shows its
        text so far, and stopStream's blocks below it."""
        message = self._message_or_deleted(channel, ts)
        if message is None:
            return ""
        shown = _blocks_text(message.get("blocks") or [])
        if "streaming" in message:
            return "\n".join(part for part in (message["text"], shown) if part)
        return shown or message["text"]

    # Interaction payloads, shaped as Slack sends them over Socket Mode.

    async def send_slash_command(
        self, command: str, text: str = "", *, user: str = "U1", channel: str = "D1"
    ) -> tuple[str, str]:
        """Deliver a `slash_commands` envelope; returns (envelope_id, trigger_id)."""
        trigger = self.new_trigger()
        payload = {
            "token": "fake-verification-token",
            "team_id": self.team_id,
            "team_domain": "fake",
            "channel_id": channel,
            "channel_name": "directmessage" if channel.startswith("D") else "general",
            "user_id": user,
            "user_name": f"user-{user.lower()}",
            "command": command,
            "text": text,
            "api_app_id": self.app_id,
            "is_enterprise_install": "false",
            "response_url": f"https://hooks.slack.test/commands/{self.team_id}/1/x",
            "trigger_id": trigger,
        }
        envelope_id = await self.send_envelope("slash_commands", payload, accepts_response_payload=True)
        return envelope_id, trigger

    def _interaction_base(self, kind: str, user: str) -> dict:
        return {
            "type": kind,
            "team": {"id": self.team_id, "domain": "fake"},
            "user": {"id": user, "username": f"user-{user.lower()}", "team_id": self.team_id},
            "api_app_id": self.app_id,
            "token": "fake-verification-token",
            "trigger_id": self.new_trigger(),
            "is_enterprise_install": False,
            "enterprise": None,
        }

    async def submit_view(self, view_id: str, values: dict, *, user: str = "U1") -> str:
        """Deliver a `view_submission` of a view the bot opened, with `values` as its
        state (`{block_id: {action_id: value object}}`); returns the envelope_id."""
        view = dict(self.views[view_id])
        view["state"] = {"values": values}
        payload = {**self._interaction_base("view_submission", user), "view": view, "response_urls": []}
        return await self.send_envelope("interactive", payload, accepts_response_payload=True)

    async def click(
        self,
        action: dict,
        *,
        user: str = "U1",
        view_id: str | None = None,
        message: tuple[str, str] | None = None,
        values: dict | None = None,
    ) -> str:
        """Deliver a `block_actions` interaction for `action` (it needs `action_id`), from a
        view (`view_id`) or a message (`(channel, ts)`); returns the envelope_id."""
        payload = {
            **self._interaction_base("block_actions", user),
            "actions": [{"block_id": action.get("block_id", "b"), "action_ts": self._next_ts(), **action}],
        }
        if view_id is not None:
            view = dict(self.views[view_id])
            view["state"] = {"values": values or {}}
            payload.update(view=view, container={"type": "view", "view_id": view_id})
        if message is not None:
            channel, ts = message
            stored = self._find(channel, ts) or {"ts": ts}
            payload.update(
                channel={"id": channel, "name": channel},
                message=dict(stored),
                container={"type": "message", "message_ts": ts, "channel_id": channel, "is_ephemeral": False},
            )
        return await self.send_envelope("interactive", payload, accepts_response_payload=True)

    def buttons(self, channel: str, ts: str) -> list[dict]:
        """The buttons a stored message shows (in its `actions` blocks), each with its block_id."""
        message = self._find(channel, ts) or {}
        return [
            {**element, "block_id": block.get("block_id", "")}
            for block in message.get("blocks") or []
            if block.get("type") == "actions"
            for element in block.get("elements") or []
            if element.get("type") == "button"
        ]

    async def press(self, channel: str, ts: str, action_id: str, *, user: str = "U1") -> str:
        """A user presses the button `action_id` that the message `ts` shows, as Slack sends
        it (`block_actions` with the button's value, the message with its blocks and
        thread); a button the message does not show cannot be pressed (KeyError)."""
        button = next((b for b in self.buttons(channel, ts) if b.get("action_id") == action_id), None)
        if button is None:
            raise KeyError(f"message {channel}/{ts} shows no button {action_id!r}")
        action = {"type": "button", "action_id": action_id, "block_id": button["block_id"], "text": button["text"]}
        if "value" in button:
            action["value"] = button["value"]
        return await self.click(action, user=user, message=(channel, ts))

    async def message_shortcut(self, callback_id: str, channel: str, ts: str, *, user: str = "U1") -> str:
        """Deliver a `message_action` (message shortcut) on the stored message `ts`."""
        message = self._find(channel, ts)
        if message is None:
            raise KeyError(f"no message {channel}/{ts}")
        payload = {
            **self._interaction_base("message_action", user),
            "callback_id": callback_id,
            "action_ts": self._next_ts(),
            "message_ts": ts,
            "channel": {"id": channel, "name": channel},
            "message": dict(message),
            "response_url": f"https://hooks.slack.test/actions/{self.team_id}/1/x",
        }
        return await self.send_envelope("interactive", payload, accepts_response_payload=False)

    async def send_app_event(self, event: dict) -> str:
        """Deliver a non-message event (`app_home_opened`, `assistant_thread_started`, …)."""
        return await self.send_event({"event_ts": self._next_ts(), **event})

    # ------------------------------------------------------------------ files
    # `url_private` downloads, checked as Slack checks them: the bot token as a bearer
    # token and the files:read scope, else Slack's HTML sign-in page with HTTP 200. The
    # upload flow: files.getUploadURLExternal → POST the bytes (no token needed) →
    # files.completeUploadExternal, which alone makes the file appear in the thread.

    def add_file(
        self,
        name: str,
        data: bytes,
        *,
        mimetype: str | None = None,
        filetype: str | None = None,
        size: int | None = None,
        user: str = "U1",
        file_id: str | None = None,
    ) -> dict:
        """Store a file as if `user` uploaded it; returns the file object as events carry
        it. `size` overrides the declared size (a file that lies about it)."""
        if file_id is None:
            self._ids += 1
            file_id = f"F{self._ids:08d}"
        guessed = mimetypes.guess_type(name)[0] or "application/octet-stream"
        ext = name.rsplit(".", 1)[-1].lower() if "." in name else "binary"
        quoted = quote(name)
        base = f"{self.files_url}/files-pri/{self.team_id}-{file_id}"
        obj = {
            "id": file_id,
            "created": FIRST_TS,
            "timestamp": FIRST_TS,
            "name": name,
            "title": name,
            "mimetype": mimetype or guessed,
            "filetype": filetype or ext,
            "pretty_type": ext.upper(),
            "user": user,
            "user_team": self.team_id,
            "editable": False,
            "size": len(data) if size is None else size,
            "mode": "hosted",
            "is_external": False,
            "external_type": "",
            "is_public": False,
            "public_url_shared": False,
            "display_as_bot": False,
            "username": "",
            "url_private": f"{base}/{quoted}",
            "url_private_download": f"{base}/download/{quoted}",
            "permalink": f"https://fake-team.slack.com/files/{user}/{file_id}/{quoted}",
            "is_starred": False,
            "has_rich_preview": False,
            "file_access": "visible",
        }
        self.files[file_id] = obj
        self.file_data[file_id] = data
        return dict(obj)

    @staticmethod
    def truncated(file: dict) -> dict:
        """The stub Slack Connect (and some Socket Mode events) send instead of the file."""
        return {"id": file["id"], "file_access": "check_file_info"}

    def _files_info(self, args: dict) -> dict:
        file = self.files.get(str(args.get("file") or ""))
        if file is None:
            raise SlackError("file_not_found")
        if not self.file_scope:
            raise SlackError("missing_scope")
        return {"file": dict(file), "comments": [], "response_metadata": {"next_cursor": ""}}

    async def _file_http(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        authorization = request.headers.get("authorization", "")
        self._changed()
        delay = self.latency.get("files", 0.0)
        if delay:
            await anyio.sleep(delay)
        if path.startswith("/upload/"):
            return self._receive_upload(request, path.rsplit("/", 1)[-1], authorization)
        file_id = path.split("/")[2].split("-", 1)[-1] if path.count("/") >= 3 else ""
        record = {"file_id": file_id, "url": str(request.url), "authorization": authorization, "served": ""}
        self.downloads.append(record)
        scheme, _, token = authorization.partition(" ")
        if request.method != "GET" or file_id not in self.file_data:
            record["served"] = "not found"
            return httpx2.Response(404, text="Not Found", headers={"Content-Type": "text/plain"})
        if scheme.lower() != "bearer" or token != self.bot_token or not self.file_scope:
            record["served"] = "sign-in page"
            return httpx2.Response(200, text=_SIGN_IN_PAGE, headers={"Content-Type": "text/html; charset=utf-8"})
        record["served"] = "file"
        file = self.files[file_id]
        return httpx2.Response(200, content=self.file_data[file_id], headers={"Content-Type": file["mimetype"]})

    def _get_upload_url(self, args: dict) -> dict:
        filename = str(args.get("filename") or "")
        try:
            length = int(args.get("length") or 0)
        except ValueError:
            raise SlackError("invalid_arguments") from None
        if not filename or length <= 0:
            raise SlackError("invalid_arguments")
        self._ids += 1
        file_id = f"F{self._ids:08d}"
        self._pending_uploads[file_id] = {
            "filename": filename,
            "length": length,
            "data": None,
            "alt_txt": args.get("alt_txt", ""),
        }
        return {"upload_url": f"{self.files_url}/upload/v1/{file_id}-{uuid.uuid4().hex[:8]}", "file_id": file_id}

    def _receive_upload(self, request: httpx2.Request, ticket: str, authorization: str) -> httpx2.Response:
        file_id = ticket.split("-", 1)[0]
        pending = self._pending_uploads.get(file_id)
        self.upload_posts.append({"file_id": file_id, "bytes": len(request.content), "authorization": authorization})
        if request.method != "POST" or pending is None:
            return httpx2.Response(404, text="Not Found")
        if len(request.content) != pending["length"]:
            return httpx2.Response(400, text="length mismatch")
        pending["data"] = bytes(request.content)
        return httpx2.Response(200, text=f"OK - {len(request.content)}")

    def _complete_upload(self, args: dict) -> dict:
        files = args.get("files")
        if not isinstance(files, list) or not files:
            raise SlackError("invalid_arguments")
        if args.get("blocks"):
            _check_blocks(args["blocks"], MESSAGE_BLOCKS_LIMIT, message=True)
        channel, thread_ts = args.get("channel_id"), args.get("thread_ts")
        if thread_ts and not channel:
            raise SlackError("invalid_arguments")
        done = []
        for entry in files:
            pending = self._pending_uploads.get(str((entry or {}).get("id")))
            if pending is None or pending["data"] is None:
                raise SlackError("invalid_arguments")
        for entry in files:
            file_id = str(entry["id"])
            pending = self._pending_uploads.pop(file_id)
            title = str(entry.get("title") or pending["filename"])
            obj = self.add_file(pending["filename"], pending["data"], user=self.bot_user_id, file_id=file_id)
            obj["title"] = self.files[file_id]["title"] = title
            done.append({"id": file_id, "title": title})
            self.uploads.append(
                {
                    "file": obj,
                    "channel": channel,
                    "thread_ts": thread_ts,
                    "bytes": pending["data"],
                    "comment": args.get("initial_comment", ""),
                    "alt_txt": pending["alt_txt"],
                }
            )
            if channel:
                message = {
                    "type": "message",
                    "subtype": "file_share",
                    "ts": self._next_ts(),
                    "user": self.bot_user_id,
                    "bot_id": self.bot_id,
                    "app_id": self.app_id,
                    "team": self.team_id,
                    "text": str(args.get("initial_comment") or ""),
                    "files": [obj],
                    "upload": True,
                }
                if thread_ts:
                    message["thread_ts"] = str(thread_ts)
                self._store(str(channel), message)
        return {"files": done}

    # ------------------------------------------------------------------ helpers for tests

    def add_user_message(
        self, channel: str, user: str, text: str, thread_ts: str | None = None, *, files: list[dict] | None = None
    ) -> str:
        """Store a message so conversations.replies sees it; returns its ts. With
        user=bot_user_id it is stored as the bot's own (e.g. a placeholder left by a crash)."""
        message = {"type": "message", "ts": self._next_ts(), "user": user, "text": text, "team": self.team_id}
        if user == self.bot_user_id:
            message.update(bot_id=self.bot_id, app_id=self.app_id)
        else:
            message["client_msg_id"] = str(uuid.UUID(int=self._ts))
        if thread_ts:
            message["thread_ts"] = thread_ts
        if files:
            message["files"] = files
        return self._store(channel, message)["ts"]

    def thread_messages(self, channel: str, thread_ts: str) -> list[dict]:
        """The thread as conversations.replies returns it: parent first, then replies by ts."""
        all_messages = self.messages.get(channel, [])
        thread = sorted(
            (m for m in all_messages if m["ts"] == thread_ts or m.get("thread_ts") == thread_ts), key=lambda m: m["ts"]
        )
        if not thread or thread[0]["ts"] != thread_ts:
            return [dict(m) for m in thread]
        replies = thread[1:]
        parent = dict(thread[0])
        if replies:
            parent.update(
                thread_ts=thread_ts,
                reply_count=len(replies),
                reply_users=sorted({m["user"] for m in replies}),
                latest_reply=replies[-1]["ts"],
            )
        return [parent, *(dict(m) for m in replies)]

    def bot_replies(self, channel: str, thread_ts: str) -> list[str]:
        """The bot's replies in a thread as a user sees them (`visible_text`), oldest first."""
        return [
            self.visible_text(channel, m["ts"])
            for m in self.thread_messages(channel, thread_ts)
            if m.get("bot_id") == self.bot_id and m["ts"] != thread_ts
        ]

    def message_event(
        self,
        channel: str,
        user: str,
        text: str,
        ts: str | None = None,
        thread_ts: str | None = None,
        channel_type: str = "im",
        subtype: str | None = None,
        files: list[dict] | None = None,
    ) -> dict:
        """A `message` event as Slack delivers it. Without `ts` a plain (or file_share /
        thread_broadcast) message is also stored, so the bot finds it in the thread."""
        if ts is None:
            stored = subtype in (None, "file_share", "thread_broadcast")
            ts = self.add_user_message(channel, user, text, thread_ts, files=files) if stored else self._next_ts()
        event = {
            "type": "message",
            "channel": channel,
            "user": user,
            "text": text,
            "ts": ts,
            "event_ts": ts,
            "channel_type": channel_type,
            "team": self.team_id,
            "blocks": _rich_text(text),
        }
        if thread_ts:
            event["thread_ts"] = thread_ts
        if subtype:
            event["subtype"] = subtype
        if files:
            event["files"] = files
        return event

    def app_mention_event(
        self, channel: str, user: str, text: str, ts: str | None = None, thread_ts: str | None = None
    ) -> dict:
        """An `app_mention` event; `<@bot>` is prefixed when the text lacks it."""
        mention = f"<@{self.bot_user_id}>"
        if mention not in text:
            text = f"{mention} {text}"
        if ts is None:
            ts = self.add_user_message(channel, user, text, thread_ts)
        event = {
            "type": "app_mention",
            "channel": channel,
            "user": user,
            "text": text,
            "ts": ts,
            "event_ts": ts,
            "team": self.team_id,
            "blocks": _rich_text(text),
        }
        if thread_ts:
            event["thread_ts"] = thread_ts
        return event

    # ------------------------------------------------------------------ Socket Mode

    @property
    def live_connections(self) -> list[Link]:
        return [c for c in self.connections if c.live]

    async def connector(self, url: str) -> MemoryWebSocket:
        """A `bot.slack.websocket.Connector`: an in-memory socket to this fake for a URL from
        apps.connections.open (unknown or reused tickets raise WebSocketClosed)."""
        await anyio.lowlevel.checkpoint()
        self.claim_ticket(url)
        link = MemoryLink(self)
        await self.attach(link)
        return link.client

    def claim_ticket(self, url: str) -> None:
        """Accept a connection URL once; raise WebSocketClosed like a refused upgrade."""
        if self.refuse_connects > 0:
            self.refuse_connects -= 1
            raise WebSocketClosed("WebSocket upgrade refused (HTTP 503)")
        ticket = parse_qs(urlsplit(url).query).get("ticket", [""])[0]
        if ticket not in self._tickets:
            raise WebSocketClosed("WebSocket upgrade refused (HTTP 401): unknown ticket")
        if self._tickets[ticket]:
            raise WebSocketClosed("WebSocket upgrade refused (HTTP 401): ticket already used")
        self._tickets[ticket] = True

    async def attach(self, link: Link) -> None:
        """Register an accepted connection and greet it (used by both transports)."""
        self.connections_opened += 1
        link.id = self.connections_opened
        self.connections.append(link)
        live = len(self.live_connections)
        self.max_live_connections = max(self.max_live_connections, live)
        self._changed()
        if live > MAX_CONNECTIONS:
            await link.send(
                json.dumps(
                    {
                        "type": "disconnect",
                        "reason": "too_many_websockets",
                        "num_connections": live,
                        "connection_info": {"app_id": self.app_id},
                        "debug_info": {"host": "fake-slack"},
                    }
                )
            )
            await link.close()
            return
        await link.send(
            json.dumps(
                {
                    "type": "hello",
                    "num_connections": live,
                    "connection_info": {"app_id": self.app_id},
                    "debug_info": {
                        "host": "fake-slack",
                        "build_number": 1,
                        "approximate_connection_time": self.approximate_connection_time,
                    },
                }
            )
        )

    def _on_client_frame(self, link: Link, text: str) -> None:
        """A text frame from the client; acks are recorded with their time and payload."""
        self.client_frames.append((link.id, text))
        try:
            frame = json.loads(text)
        except ValueError:
            frame = None
        if isinstance(frame, dict) and isinstance(frame.get("envelope_id"), str):
            envelope_id = frame["envelope_id"]
            if envelope_id not in self.acks:
                self.acks[envelope_id] = anyio.current_time()
                self.ack_payloads[envelope_id] = frame.get("payload")
        self._changed()

    def _candidates(self) -> list[Link]:
        live = [c for c in self.live_connections if not c.silenced]
        return [c for c in live if not c.draining] or live

    def _pick(self, connection: Link | None) -> Link:
        if connection is not None:
            return connection
        candidates = self._candidates()
        if not candidates:
            raise NoConnection("no live Socket Mode connection")
        link = candidates[self._round_robin % len(candidates)]
        self._round_robin += 1
        return link

    async def send_envelope(
        self,
        type: str,
        payload: dict,
        *,
        accepts_response_payload: bool = False,
        retry_attempt: int = 0,
        retry_reason: str = "",
        connection: Link | None = None,
    ) -> str:
        """Send any envelope (`events_api`, `slash_commands`, `interactive`); returns its envelope_id."""
        link = self._pick(connection)
        self._ids += 1
        envelope_id = str(uuid.UUID(int=self._ids))
        envelope = {
            "envelope_id": envelope_id,
            "type": type,
            "accepts_response_payload": accepts_response_payload,
            "retry_attempt": retry_attempt,
            "retry_reason": retry_reason,
            "payload": payload,
        }
        self.deliveries[envelope_id] = Delivery(
            envelope_id, payload.get("event_id"), envelope, link, anyio.current_time(), retry_attempt
        )
        await link.send(json.dumps(envelope))
        return envelope_id

    async def send_event(
        self, event: dict, *, event_id: str | None = None, retry_attempt: int = 0, connection: Link | None = None
    ) -> str:
        """Wrap `event` in an event_callback + `events_api` envelope and deliver it on a live
        connection (round-robin, preferring ones not told to disconnect). Returns envelope_id."""
        if event_id is None:
            self._ids += 1
            event_id = f"Ev{self._ids:010d}"
        event_time = int(float(event.get("event_ts") or event.get("ts") or FIRST_TS))
        payload = {
            "token": "fake-verification-token",
            "team_id": self.team_id,
            "context_team_id": self.team_id,
            "context_enterprise_id": None,
            "api_app_id": self.app_id,
            "event": event,
            "type": "event_callback",
            "event_id": event_id,
            "event_time": event_time,
            "authorizations": [
                {
                    "enterprise_id": None,
                    "team_id": self.team_id,
                    "user_id": self.bot_user_id,
                    "is_bot": True,
                    "is_enterprise_install": False,
                }
            ],
            "is_ext_shared_channel": False,
            "event_context": f"4-fake-{event_id}",
        }
        return await self.send_envelope(
            "events_api",
            payload,
            retry_attempt=retry_attempt,
            retry_reason="timeout" if retry_attempt else "",
            connection=connection,
        )

    async def redeliver_unacked(self, after: float = 3.0) -> list[str]:
        """Resend events not acked `after` seconds after delivery (same event_id,
        retry_attempt + 1), as Slack does; returns the new envelope ids."""
        now, new = anyio.current_time(), []
        for delivery in list(self.deliveries.values()):
            due = now - delivery.sent_at >= after and delivery.envelope_id not in self.acks
            if due and not delivery.redelivered and delivery.envelope["type"] == "events_api" and self._candidates():
                delivery.redelivered = True
                payload = delivery.envelope["payload"]
                new.append(
                    await self.send_event(
                        payload["event"], event_id=payload["event_id"], retry_attempt=delivery.retry_attempt + 1
                    )
                )
        return new

    async def send_raw(self, text: str, connection: Link | None = None) -> None:
        """Send any text (malformed JSON, unknown frame types) as is."""
        await self._pick(connection).send(text)

    def _target(self, connection: Link | None) -> Link:
        if connection is not None:
            return connection
        live = self.live_connections
        if not live:
            raise NoConnection("no live Socket Mode connection")
        return live[0]

    async def disconnect(
        self, reason: str = "refresh_requested", connection: Link | None = None, *, grace: float = 5.0
    ) -> Link:
        """Send a `disconnect` frame (default: to the oldest live connection). For `warning`
        and `refresh_requested` the socket stays open until the client closes it or `grace`
        seconds pass; for other reasons it is closed right after the frame."""
        link = self._target(connection)
        await link.send(json.dumps({"type": "disconnect", "reason": reason, "debug_info": {"host": "fake-slack"}}))
        if reason in ("warning", "refresh_requested"):
            link.close_later(grace)
            self._changed()
        else:
            await link.close()
        return link

    async def drop(self, connection: Link | None = None) -> Link:
        """Cut a connection abruptly (no disconnect, no close frame)."""
        link = self._target(connection)
        await link.abort()
        return link

    def silence(self, connection: Link | None = None) -> Link:
        """Make a connection a dead socket: it stays open but nothing passes either way."""
        link = self._target(connection)
        link.silenced = True
        self._changed()
        return link


def _channel_of(args: dict) -> str | None:
    channel = args.get("channel") or args.get("channel_id")
    return str(channel) if channel else None


def _text_of(obj: object) -> str:
    """The text of a text object ({"type": "mrkdwn"|"plain_text", "text": …})."""
    return str(obj.get("text") or "") if isinstance(obj, dict) else ""


def _check_button(element: object, where: str) -> None:
    if (
        isinstance(element, dict)
        and element.get("type") == "button"
        and len(_text_of(element.get("text"))) > BUTTON_TEXT_LIMIT
    ):
        raise SlackError("invalid_blocks", f"{where}: button text must be at most {BUTTON_TEXT_LIMIT} characters")


def check_chunks(chunks: object) -> list[dict]:
    """The `chunks` of a chat.*Stream call as Slack documents them (docs.slack.dev
    chat.appendStream "chunks"; the models of slack_sdk.models.messages.chunk), or
    SlackError("invalid_chunks") naming what is wrong."""

    def bad(what: str) -> SlackError:
        return SlackError("invalid_chunks", what)

    def text(chunk: dict, key: str, *, required: bool, limit: int | None = CHUNK_TEXT_LIMIT) -> None:
        value = chunk.get(key)
        if value is None and not required:
            return
        if not isinstance(value, str) or (required and not value.strip()):
            raise bad(f"{chunk.get('type')} chunk needs a non-empty string `{key}`")
        if limit is not None and len(value) > limit:
            raise bad(f"{chunk.get('type')} chunk `{key}` is longer than {limit} characters")

    if not isinstance(chunks, list):
        raise bad("chunks must be an array")
    for chunk in chunks:
        if not isinstance(chunk, dict):
            raise bad("each chunk must be an object")
        kind = chunk.get("type")
        if kind == "markdown_text":
            if not isinstance(chunk.get("text"), str):
                raise bad("markdown_text chunk needs a string `text`")
        elif kind == "task_update":
            text(chunk, "id", required=True, limit=None)
            text(chunk, "title", required=True)
            if chunk.get("status") not in TASK_STATUSES:
                raise bad(f"task_update status must be one of {sorted(TASK_STATUSES)}")
            text(chunk, "details", required=False)
            text(chunk, "output", required=False)
            sources = chunk.get("sources")
            if sources is not None and (
                not isinstance(sources, list)
                or not all(
                    isinstance(x, dict) and x.get("type") == "url" and x.get("url") and x.get("text") for x in sources
                )
            ):
                raise bad("task_update sources are url elements with a url and a text")
        elif kind == "plan_update":
            text(chunk, "title", required=True)
        elif kind == "blocks":
            _check_blocks(chunk.get("blocks"), MESSAGE_BLOCKS_LIMIT, message=True)
        else:
            raise bad(f"unknown chunk type {kind!r}")
    return chunks


def _check_blocks(blocks: object, limit: int, *, message: bool) -> list:
    """Block Kit limits Slack checks on every write (protocols.md C4); `invalid_blocks`
    with a detail naming the block, as in Slack's `response_metadata.messages`."""
    if not isinstance(blocks, list):
        raise SlackError("invalid_blocks", "blocks must be an array")
    if len(blocks) > limit:
        raise SlackError("invalid_blocks", f"no more than {limit} items allowed [json-pointer:/blocks]")
    markdown_total = 0
    for i, block in enumerate(blocks):
        where = f"[json-pointer:/blocks/{i}]"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise SlackError("invalid_blocks", f"{where}: a block must be an object with a type")
        kind = block["type"]
        if kind == "section":
            if len(_text_of(block.get("text"))) > SECTION_TEXT_LIMIT:
                raise SlackError("invalid_blocks", f"{where}: section text must be at most {SECTION_TEXT_LIMIT} chars")
            if len(block.get("fields") or []) > SECTION_FIELDS_LIMIT:
                raise SlackError("invalid_blocks", f"{where}: at most {SECTION_FIELDS_LIMIT} fields")
            _check_button(block.get("accessory"), where)
        elif kind == "header":
            if len(_text_of(block.get("text"))) > HEADER_TEXT_LIMIT:
                raise SlackError("invalid_blocks", f"{where}: header text must be at most {HEADER_TEXT_LIMIT} chars")
        elif kind == "markdown":
            if not message:
                raise SlackError("invalid_blocks", f"{where}: markdown blocks are for messages only")
            markdown_total += len(str(block.get("text") or ""))
            if markdown_total > MARKDOWN_BLOCKS_LIMIT:
                raise SlackError(
                    "invalid_blocks", f"{where}: markdown blocks may hold {MARKDOWN_BLOCKS_LIMIT} characters in all"
                )
        elif kind == "context":
            if len(block.get("elements") or []) > CONTEXT_ELEMENTS_LIMIT:
                raise SlackError("invalid_blocks", f"{where}: at most {CONTEXT_ELEMENTS_LIMIT} context elements")
        elif kind == "actions":
            elements = block.get("elements") or []
            if len(elements) > ACTIONS_ELEMENTS_LIMIT:
                raise SlackError("invalid_blocks", f"{where}: at most {ACTIONS_ELEMENTS_LIMIT} action elements")
            for element in elements:
                _check_button(element, where)
    return blocks


def _blocks_text(blocks: list) -> str:
    """What a user reads in blocks: section/header/markdown/context texts, rich text."""
    parts: list[str] = []
    for block in blocks:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind in ("section", "header"):
            parts.append(_text_of(block.get("text")))
            parts.extend(_text_of(field) for field in block.get("fields") or [])
        elif kind == "markdown":
            parts.append(str(block.get("text") or ""))
        elif kind == "context":
            parts.append(" ".join(_text_of(e) for e in block.get("elements") or [] if _text_of(e)))
        elif kind == "rich_text":
            parts.append(
                "".join(
                    str(leaf.get("text") or "")
                    for section in block.get("elements") or []
                    for leaf in section.get("elements") or []
                    if isinstance(leaf, dict)
                )
            )
    return "\n".join(part for part in parts if part)


def _json(body: dict, status: int = 200, headers: dict | None = None) -> httpx2.Response:
    return httpx2.Response(
        status,
        content=json.dumps(body).encode(),
        headers={"Content-Type": "application/json; charset=utf-8", **(headers or {})},
    )


def _parse_args(request: httpx2.Request) -> dict:
    """Arguments from the query string plus a JSON or form body, as Slack reads them."""
    args: dict[str, Any] = dict(request.url.params)
    content_type = request.headers.get("content-type", "").lower()
    body = request.content
    if content_type.startswith("application/json"):
        if body:
            try:
                parsed = json.loads(body)
            except ValueError:
                raise SlackError("invalid_json") from None
            if not isinstance(parsed, dict):
                raise SlackError("json_not_object")
            args.update(parsed)
    elif body:
        for key, value in parse_qsl(body.decode(), keep_blank_values=True):
            if key in _JSON_ARGS:
                with contextlib.suppress(ValueError):
                    value = json.loads(value)
            args[key] = value
    return args


def _rich_text(text: str) -> list[dict]:
    return [
        {
            "type": "rich_text",
            "block_id": "fake",
            "elements": [{"type": "rich_text_section", "elements": [{"type": "text", "text": text}]}],
        }
    ]


_METHODS: dict[str, Callable[[FakeSlack, dict], dict]] = {
    "auth.test": FakeSlack._auth_test,
    "apps.connections.open": FakeSlack._connections_open,
    "chat.postMessage": FakeSlack._post_message,
    "chat.update": FakeSlack._update,
    "chat.delete": FakeSlack._delete,
    "conversations.replies": FakeSlack._replies,
    "users.info": FakeSlack._users_info,
    "views.open": FakeSlack._views_open,
    "views.update": FakeSlack._views_update,
    "views.publish": FakeSlack._views_publish,
    "chat.postEphemeral": FakeSlack._post_ephemeral,
    "chat.startStream": FakeSlack._start_stream,
    "chat.appendStream": FakeSlack._append_stream,
    "chat.stopStream": FakeSlack._stop_stream,
    "assistant.threads.setStatus": FakeSlack._assistant_set_status,
    "assistant.threads.setSuggestedPrompts": FakeSlack._assistant_set_prompts,
    "assistant.threads.setTitle": FakeSlack._assistant_set_title,
    "files.info": FakeSlack._files_info,
    "files.getUploadURLExternal": FakeSlack._get_upload_url,
    "files.completeUploadExternal": FakeSlack._complete_upload,
}

# What Slack answers (HTTP 200) to a file download without a valid token or files:read.
_SIGN_IN_PAGE = """<!DOCTYPE html><html lang="en-US" class="supports_custom_scrollbar"><head><meta charset="utf-8">
<title>Slack</title><meta name="referrer" content="no-referrer"></head><body class="index">
<div id="page"><h1>Sign in to Fake Team</h1><p>fake-team.slack.com</p><form id="signin_form" method="post">
<input type="email" name="email"><input type="password" name="password"><button>Sign in</button></form></div>
</body></html>"""
