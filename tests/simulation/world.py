"""Execute one `Scenario` against the real bot, in virtual time, and record everything.

The world is the fakes (Slack's Web API and Socket Mode, OpenAI) plus what a real
deployment adds around the bot: Slack's redelivery of un-acked events, a SQLite file that
outlives the process, and an operator who sends SIGTERM or whose machine crashes. Each
bot process is an `Incarnation` running the real `bot.startup.run_bot` with in-process
transports; a crash is modelled exactly: at the crash instant the incarnation's Web API
and OpenAI calls, its socket frames and its database transactions stop having any effect
(each one blocks forever from then on), and its task group is cancelled. Whatever its
shielded clean-up then tries is lost, as it would be under `kill -9`.

Every Slack/OpenAI call is attributed (through a context variable set by the
instrumentation around the nursery) to the user message whose handling made it — or to
a process's start-up (identify, and the crash recovery's fix-ups) — which is what lets
the invariants (`invariants.py`) say "this message got exactly this one visible
outcome". Every message Slack stores is attributed to the call being answered at that
moment, so a post Slack made but answered 5xx for (`Fault.after`) is known too; so is
every call Slack logs inside a Retry-After window it had announced, and every wait of
the bot's own budget for a method (observed, not changed).

Slack's weather besides injected faults: its rate limits (FakeSlack's tiers, on by
default), outages of the whole Web API, posts made then answered 5xx, and native streams
it ends by itself mid-answer.

Replicas (`Scenario.replicas` > 1): that many incarnations run at once, each a replica
with its own REPLICA_ID, its own store on the shared SQLite file and its own Socket Mode
connections to the one Slack (which spreads envelopes over them round-robin). Each
replica is a slot whose incarnations succeed one another (a crash, then its restart under
the same id or a new one). A replica can be paused (every call, socket frame and store
transaction of it waits until it resumes) or cut off from storage (its store calls raise
StorageError). The store records the lease grants, renewals and releases and the fenced
writes (start_request / finish_request) with their results, in commit order
(`World.store_log`), and every takeover of another's request (`bot.replica._notify`,
observed) is attributed to the process that did it: what the replica invariants read.
"""

from __future__ import annotations

import contextvars
import json
import math
import os
import random
import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import httpx2

import bot.replica
from bot.processing.answer import FINALIZE_SECONDS
from bot.startup import run_bot
from bot.storage import StorageError
from bot.storage.base import ThreadKey
from bot.storage.sql_store import SQLStore
from bot.storage.sqlite import open_sqlite
from tests.fakes.openai import Behaviour, FakeOpenAI, last_user_text
from tests.fakes.slack import FakeSlack, NoConnection, _parse_args
from tests.harness import SETTING_DEFAULTS, test_settings
from tests.simulation.scenario import Fault, Msg, Scenario
from tests.simulation_support import (
    PRODUCTION,
    _prewarm_openai,
    endless_trickle,
    no_response,
)

SETTINGS = SETTING_DEFAULTS  # by the flat names the harness takes
# What ships, where the test harness turns a feature off for the narrower tests.
PRODUCT_DEFAULTS = {name: SETTINGS[name] for name in ("welcome", "native_streaming") if name in SETTINGS}
RETRY_SCHEDULE = (3.0, 10.0, 30.0, 60.0, 120.0, 300.0)  # Slack's redelivery of un-acked events
DRAIN_LIMIT = 2400.0  # virtual seconds after the last scheduled action for everything to settle
CREATING_METHODS = ("chat.postMessage", "chat.startStream")


@dataclass(frozen=True)
class Tag:
    """Whose handling a call belongs to: `kind` is "envelope" (dedupe/gate), "request"
    (answering: `rid`), "busy" (the busy reply), "storage_down" (the note that the lease
    could not be taken), "startup" (identify, and taking over the requests of the previous
    run) or "takeover" (a live replica taking over an abandoned request: `of`)."""

    inc: int
    msg: int | None
    kind: str
    rid: str = ""
    of: str = ""  # startup / takeover: the request taken over


HANDLING: contextvars.ContextVar[Tag | None] = contextvars.ContextVar("sim_handling", default=None)
# The Web API call being answered (set around FakeSlack.handle): what Slack creates or logs
# while answering it is attributed to it, even when the answer is lost (a 5xx after acting).
CURRENT_CALL: contextvars.ContextVar[SlackCall | None] = contextvars.ContextVar("sim_call", default=None)


@dataclass
class SlackCall:
    t: float
    inc: int
    tag: Tag | None
    method: str
    args: dict
    ok: bool = False
    error: str = ""
    injected: bool = False  # answered by an injected fault (fail_next)
    outage: bool = False  # answered by an outage (FakeSlack.outage)
    created_ts: str = ""  # the message Slack created while answering (also when it then answered 5xx)
    t_end: float = math.nan
    seq0: int = 0  # the world's event counter when the call was sent ...
    issued: int = 0  # ... before a pause of its process held it back (== seq0 - 1 without one)
    seq1: int = 0  # ... and when its answer came back (orders calls within one instant)
    status: int = 0  # HTTP status
    retry_after: float = 0.0  # a 429's Retry-After
    in_window_at: float | None = None  # Slack logged it inside a Retry-After window it had announced (arrival)

    @property
    def faulted(self) -> bool:
        """Refused by the world's weather (an injected fault or an outage), not by the bot."""
        return self.injected or self.outage

    @property
    def key(self) -> tuple[str, str | None]:
        """The rate-limit bucket Slack charges it to (chat.postMessage: per channel)."""
        if self.method == "chat.postMessage":
            channel = self.args.get("channel") or self.args.get("channel_id")
            return self.method, str(channel) if channel else None
        return self.method, None


@dataclass
class BudgetWait:
    """A call that waited for its turn in the bot's own budget of a Web API method."""

    tag: Tag | None
    method: str
    t0: float
    t1: float


@dataclass
class AICall:
    t: float
    inc: int
    tag: Tag | None
    msg: int | None
    attempt: int
    step: tuple
    t_end: float = math.nan
    thread: tuple | None = None
    body: dict | None = None


@dataclass
class Request:
    inc: int
    rid: str
    msg: int | None
    thread: tuple
    start: float
    state: Any
    end: float = math.nan
    outcome: str = ""
    placeholder_ts: str = ""


@dataclass
class Handling:
    kind: str  # request | busy | skip | duplicate | storage_down
    inc: int
    msg: int | None
    t: float


@dataclass
class EventState:
    event_id: str
    msg: int
    event: dict
    sends: list[tuple[float, str | None, int]] = field(default_factory=list)  # (time, envelope id, attempt)
    next_try: float = math.inf

    done: bool = False  # acked (an ack is never taken back)

    def acked(self, slack: FakeSlack) -> bool:
        if not self.done:
            self.done = any(env in slack.acks for _, env, _ in self.sends if env is not None)
        return self.done


@dataclass
class StoreOp:
    """One lease operation or fenced write, as the shared database committed it."""

    inc: int
    op: str  # acquire | renew | release | start | finish
    thread: tuple | None  # (channel, thread_ts); None for a finish (found by its request)
    token: int | None  # the fence / token passed (None for acquire)
    rid: str = ""
    owner: str = ""
    ttl: float = 0.0
    outcome: str = ""
    detail: str = ""
    t: float = math.nan  # world time of the commit
    clock: float = math.nan  # bot_now() at the commit (the store's clock)
    result: Any = None
    seq: int = 0  # the world's event counter at the commit (orders it among Slack calls)


STORE_OP: contextvars.ContextVar[StoreOp | list[StoreOp] | None] = contextvars.ContextVar("sim_store_op", default=None)


@dataclass
class Incarnation:
    n: int
    started: float
    slot: int = 0  # which replica (0 … replicas-1)
    replica_id: str = ""  # its REPLICA_ID ("" : the settings' default, the one-process worlds)
    dead: bool = False
    crashed_at: float | None = None
    stopped_at: float | None = None  # SIGTERM (nursery.stop())
    ended: float | None = None
    nursery: Any = None
    links: list = field(default_factory=list)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)
    in_request: int = 0  # _request tasks running
    restarted: bool = False  # a replacement process was started
    store: Any = None
    paused: anyio.Event | None = None  # set when it resumes; None while it runs
    pause_on: float | None = None  # a pause of this many seconds, due as its next answer opens (Fault.on)
    partitioned_until: float = -math.inf  # world time until which its store calls fail
    impaired: list[tuple[str, float, float]] = field(default_factory=list)  # (pause | partition | crash, from, to)

    async def hold(self) -> None:
        """A paused process does nothing until it resumes (or is killed)."""
        while self.paused is not None and not self.dead:
            await self.paused.wait()

    def paused_between(self, t0: float, t1: float) -> float:
        """Seconds of [t0, t1] this process spent paused."""
        return sum(max(0.0, min(t1, b) - max(t0, a)) for kind, a, b in self.impaired if kind == "pause")

    @property
    def up(self) -> bool:
        return not self.dead and self.stopped_at is None and self.ended is None


class _Dead(Exception):
    """Raised inside a transaction of a crashed incarnation: it never commits."""


class SimStore(SQLStore):
    """The real SQL store on the shared SQLite file, plus two things the world needs:
    storage faults (the next N calls of a method raise StorageError, as a locked or full
    database does) and death (a crashed incarnation's transactions never commit). Both
    hook the store's one way in, `_run`, so every method (present and future) has them."""

    world: World
    inc: Incarnation

    async def _observed(self, op: StoreOp, call):
        token = STORE_OP.set(op)
        try:
            return await call
        finally:
            STORE_OP.reset(token)

    async def acquire_lease(self, thread, owner, *, ttl):
        op = StoreOp(self.inc.n, "acquire", (thread.channel, thread.thread_ts), None, owner=owner, ttl=ttl)
        return await self._observed(op, super().acquire_lease(thread, owner, ttl=ttl))

    async def renew_leases(self, leases, *, ttl):
        # One StoreOp per lease renewed or refused, all committed together.
        ops = [StoreOp(self.inc.n, "renew", (t.channel, t.thread_ts), token, ttl=ttl) for t, token in leases]
        return await self._observed(ops, super().renew_leases(leases, ttl=ttl))

    async def release_lease(self, thread, token):
        op = StoreOp(self.inc.n, "release", (thread.channel, thread.thread_ts), token)
        return await self._observed(op, super().release_lease(thread, token))

    async def start_request(self, request_id, thread, **kwargs):
        op = StoreOp(
            self.inc.n,
            "start",
            (thread.channel, thread.thread_ts),
            kwargs.get("fence"),
            rid=request_id,
            owner=kwargs.get("owner", ""),
        )
        return await self._observed(op, super().start_request(request_id, thread, **kwargs))

    async def finish_request(self, request_id, **kwargs):
        op = StoreOp(
            self.inc.n,
            "finish",
            None,
            kwargs.get("fence"),
            rid=request_id,
            outcome=kwargs.get("outcome", ""),
            detail=kwargs.get("detail", ""),
        )
        return await self._observed(op, super().finish_request(request_id, **kwargs))

    async def _run(self, operation: str, body: Callable, *, write: bool = True):
        inc = self.inc
        world = self.world
        op = STORE_OP.get()
        await inc.hold()
        if inc.dead:
            await anyio.sleep_forever()
        if inc.nursery is not None:  # startup (crash recovery) is not fault-injected
            if world.now() < inc.partitioned_until:
                world.count("partitioned_store_calls")
                raise StorageError(f"{operation} failed: could not connect to the database (partitioned)")
            error = world.take_storage_fault(operation)
            if error:
                raise StorageError(f"{operation} failed: {error}")

        def guarded(conn):
            if inc.dead:
                raise _Dead
            result = body(conn)
            if isinstance(op, list):  # a batch (renew_leases): each lease's op, result its own
                for each in op:
                    each.t, each.clock, each.seq = world.now(), anyio.current_time(), world.next_seq()
                    each.result = ThreadKey(*each.thread) in result
                    world.store_log.append(each)
            elif op is not None:  # in commit order: nothing else runs between body and commit
                op.result, op.t, op.clock, op.seq = result, world.now(), anyio.current_time(), world.next_seq()
                world.store_log.append(op)
                if op.op == "acquire" and result is not None:
                    world.lease_tokens[op.thread] = result
            return result

        try:
            return await super()._run(operation, guarded, write=write)
        except _Dead:
            await anyio.sleep_forever()


class _WindowLog(list):
    """FakeSlack.calls_in_retry_after that also marks the call it logs."""

    def append(self, item) -> None:
        call = CURRENT_CALL.get()
        if call is not None:
            call.in_window_at = item[2]
        super().append(item)


class SimSlack(FakeSlack):
    """FakeSlack that marks injected fault responses, attributes every message it stores
    to the call that made it, and logs acks into the trace."""

    def __init__(self, world: World, **kwargs) -> None:
        super().__init__(**kwargs)
        self.world = world
        self.calls_in_retry_after = _WindowLog()

    def _store(self, channel: str, message: dict) -> dict:
        call = CURRENT_CALL.get()
        if call is not None and message.get("bot_id") == self.bot_id:
            call.created_ts = message["ts"]
        return super()._store(channel, message)

    def _take_fault(self, method: str):
        response = super()._take_fault(method)
        if response is not None:
            response.extensions["sim_injected"] = True
        return response

    def _on_client_frame(self, link, text: str) -> None:
        before = len(self.acks)
        super()._on_client_frame(link, text)
        if len(self.acks) != before:
            envelope_id = next(reversed(self.acks))
            name = self.world.envelope_names.get(envelope_id, envelope_id)
            self.world.log_trace("ack", f"socket #{link.id} acked {name}")


class _TrackedStream(httpx2.AsyncByteStream):
    """A response body that reports when it ends or is closed (an OpenAI call's end)."""

    def __init__(self, inner, on_end: Callable[[], None], inc: Incarnation | None = None) -> None:
        self._inner = inner
        self._on_end = on_end
        self._inc = inc

    async def __aiter__(self):
        try:
            async for chunk in self._inner:
                if self._inc is not None:
                    await self._inc.hold()  # a paused process reads nothing
                yield chunk
        finally:
            self._on_end()

    async def aclose(self) -> None:
        self._on_end()
        await self._inner.aclose()


def _pausable(ws, inc: Incarnation) -> None:
    """The client end of a socket whose frames wait while its process is paused: nothing
    is sent (acks, pings), and a frame that arrives is read when it resumes."""
    send_text, receive_text, ping = ws.send_text, ws.receive_text, ws.ping

    async def paused_send(text: str) -> None:
        await inc.hold()
        await send_text(text)

    async def paused_receive() -> str:
        await inc.hold()
        text = await receive_text()
        await inc.hold()
        return text

    async def paused_ping() -> None:
        await inc.hold()
        await ping()

    ws.send_text, ws.receive_text, ws.ping = paused_send, paused_receive, paused_ping


def _no_web(request: httpx2.Request) -> httpx2.Response:
    """Pasted image URLs: the simulated world has no web (its messages carry none)."""
    raise httpx2.ConnectError("the simulated world has no web")


def _behaviour(step: tuple) -> Behaviour:
    kind = step[0]
    if kind == "ok":
        return Behaviour(latency=step[1], chunks=step[2], chunk_delay=step[3])
    if kind == "noresp":
        return no_response()
    if kind == "trickle":
        return endless_trickle()
    if kind == "silent":
        return Behaviour(hang=True)
    if kind == "stall":
        return Behaviour(
            text="a partial answer that stops", latency=step[1], chunks=4, chunk_delay=0.5, stall_after=step[2]
        )
    if kind == "cut":
        return Behaviour(
            text="an answer that breaks off", latency=step[1], chunks=4, chunk_delay=0.5, cut_after=step[2]
        )
    if kind == "status":
        return Behaviour(status=step[1], latency=step[2], error_code=step[3] or None)
    raise ValueError(f"unknown OpenAI step {step!r}")


def answer_text(question: str, variant: str) -> str:
    """The model's text for an ("ok", …, variant) step."""
    if variant == "broadcast":  # the bot must make these inert before Slack sees them
        return f"Echo: {question}. Heads up <!here> and <!channel>, and @everyone too."
    if variant == "long":  # longer than one Slack message (12,000 characters): split in two
        paragraph = "This paragraph is here to make the answer long enough to need a second message. " * 6
        return f"Echo: {question}.\n\n" + "\n\n".join(f"{i}. {paragraph.strip()}" for i in range(30))
    raise ValueError(f"unknown answer text {variant!r}")


def message_id(text: str) -> int | None:
    """The scenario message a text belongs to ("m12 from u3 …" → 12)."""
    for word in text.split():
        if word.startswith("m") and word[1:].isdigit():
            return int(word[1:])
    return None


class World:
    def __init__(self, scenario: Scenario) -> None:
        self.s = scenario
        self.slack = SimSlack(self)
        if scenario.slack_latency:
            self.slack.latency["*"] = scenario.slack_latency
        self.ai = FakeOpenAI(script=self._script)
        self.trace: list[tuple] = []
        self.violations: list[str] = []
        self.incs: list[Incarnation] = []
        self.msgs: dict[int, Msg] = {m.id: m for m in scenario.messages}
        self.msg_ts: dict[int, str] = {}  # message id -> its Slack ts
        self.msg_thread: dict[int, tuple[str, str]] = {}  # message id -> (channel, thread ts)
        self.by_ts: dict[str, int] = {}
        self.events: dict[str, EventState] = {}
        self.envelope_names: dict[str, str] = {}
        self.envelope_event: dict[str, str] = {}
        self.link_inc: dict[int, int] = {}  # link id -> incarnation number
        self.slack_calls: list[SlackCall] = []
        self.budget_waits: list[BudgetWait] = []
        self.ai_calls: list[AICall] = []
        self.ai_attempts: dict[int, int] = {}
        self.requests: list[Request] = []
        self.handlings: list[Handling] = []
        self.storage_faults: dict[str, list[list]] = {}  # method -> [[error, times left], ...]
        # process -> the requests it took over (its start-up: its previous run's; a live
        # replica: abandoned ones), each once its lease was taken, before the notice
        self.recovered: dict[int, list] = {}
        self.store_log: list[StoreOp] = []  # lease operations and fenced writes, in commit order
        self.lease_tokens: dict[tuple, int] = {}  # thread -> its newest lease token
        self.request_by_rid: dict[str, Request] = {}
        self.pending_resumes = 0
        self.seq = 0
        self.t0: float | None = None  # when the scenario starts: the first socket said hello
        self.clock0 = 0.0
        self.tmp = tempfile.mkdtemp(prefix="slackbot-sim-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        self.db_path = os.path.join(self.tmp, "bot.db")
        self.pending_restarts = 0
        self._sent: anyio.Event | None = None  # set by a send (wakes the redelivery loop)
        self.drained = False
        self.finished = False
        self.end_time = 0.0
        self.stats: dict[str, int] = {}

    # ---- bookkeeping ----------------------------------------------------------------

    def now(self) -> float:
        if self.finished:  # the checks run after trio.run returned: no clock any more
            return self.end_time
        return anyio.current_time() - (self.t0 if self.t0 is not None else self.clock0)

    def log_trace(self, kind: str, text: str) -> None:
        """Trace times are virtual seconds after the scenario's start (t0; negative while
        the first process starts up)."""
        t = self.end_time if self.finished else anyio.current_time() - (self.t0 if self.t0 is not None else self.clock0)
        self.trace.append((round(t, 6), kind, text))

    def violate(self, text: str) -> None:
        self.violations.append(f"t={self.now():.3f}: {text}")
        self.log_trace("VIOLATION", text)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def take_storage_fault(self, method: str) -> str:
        queue = self.storage_faults.get(method)
        if not queue:
            return ""
        error = queue[0][0]
        queue[0][1] -= 1
        if queue[0][1] <= 0:
            queue.pop(0)
        self.log_trace("fault", f"storage {method} raises: {error}")
        self.count("storage_faults_hit")
        return error

    @property
    def current(self) -> Incarnation | None:
        return self.incs[-1] if self.incs else None

    def current_of(self, slot: int) -> Incarnation | None:
        """The newest incarnation of replica `slot`."""
        return next((inc for inc in reversed(self.incs) if inc.slot == slot), None)

    def fenced_off(self, rid: str) -> bool:
        """Whether the lease the request ran under has passed to a newer holder."""
        rec = self.request_by_rid.get(rid)
        return rec is not None and self.lease_tokens.get(rec.thread, 0) > getattr(rec.state, "fence", 0)

    # ---- OpenAI -------------------------------------------------------------------------

    def _step(self, mid: int | None, attempt: int) -> tuple:
        if mid is None or mid not in self.msgs:
            return ("ok", 0.0, 1, 0.0)
        plan = self.msgs[mid].ai
        return plan[min(attempt, len(plan) - 1)]

    def _script(self, body: dict) -> Behaviour:
        mid = message_id(last_user_text(body))
        step = self._step(mid, self.ai_attempts.get(mid, 1) - 1)
        behaviour = _behaviour(step)
        if step[0] == "ok" and len(step) > 4:
            behaviour.text = answer_text(last_user_text(body), step[4])
        return behaviour

    async def _openai(self, inc: Incarnation, request: httpx2.Request) -> httpx2.Response:
        await inc.hold()
        if inc.dead:
            await anyio.sleep_forever()
        try:
            body = json.loads(request.content)
        except ValueError:
            body = {}
        mid = message_id(last_user_text(body)) if isinstance(body, dict) else None
        attempt = self.ai_attempts.get(mid, 0)
        self.ai_attempts[mid] = attempt + 1
        step = self._step(mid, attempt)
        tag = HANDLING.get()
        call = AICall(
            self.now(),
            inc.n,
            tag,
            mid,
            attempt,
            step,
            thread=self.msg_thread.get(mid),
            body=body if isinstance(body, dict) else None,
        )
        self.ai_calls.append(call)
        self.log_trace("openai", f"#{inc.n} m{mid} attempt {attempt}: {step[0]}")
        # No thread may have two model calls at once (among live processes, and among the
        # requests still holding their thread's lease: one fenced off may not know yet).
        if call.thread is not None:
            for other in self.ai_calls:
                if (
                    other is not call
                    and math.isnan(other.t_end)
                    and other.thread == call.thread
                    and not self.incs[other.inc - 1].dead
                    and not (other.tag and other.tag.rid and self.fenced_off(other.tag.rid))
                ):
                    if tag is not None and tag.rid and self.fenced_off(tag.rid):
                        # This call's own request lost the thread (its process was paused or
                        # cut off) and does not know yet: it learns at its next renewal.
                        self.count("model_calls_of_fenced_off_requests")
                        continue
                    self.violate(f"two OpenAI calls at once in thread {call.thread}: m{other.msg} and m{mid}")

        def end() -> None:
            if math.isnan(call.t_end):
                call.t_end = self.now()

        if step[0] == "connect":
            end()
            raise httpx2.ConnectError("[Errno 111] Connection refused")
        try:
            response = await self.ai.handle(request)
        except BaseException:
            end()
            raise
        try:
            await inc.hold()
        except BaseException:
            end()
            raise
        if inc.dead:
            end()
            await anyio.sleep_forever()
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            response.stream = _TrackedStream(response.stream, end, inc)
        else:
            end()
        return response

    # ---- Slack Web API ------------------------------------------------------------------

    async def _slack_api(self, inc: Incarnation, request: httpx2.Request) -> httpx2.Response:
        # When the bot sent it, even if a pause holds it back: in the simulation a paused
        # process's code still runs between its I/O, so what it sends meanwhile left it
        # before anything it learns on resuming.
        issued = self.next_seq()
        method = request.url.path.rsplit("/", 1)[-1]
        opening = method == "chat.startStream" or (method == "chat.postMessage" and b"Thinking" in request.content)
        if inc.pause_on is not None and opening and not inc.dead:
            seconds, inc.pause_on = inc.pause_on, None
            self._pause(inc, seconds, self._tg)  # (Fault.on: this call waits, unsent, with the rest)
        await inc.hold()
        if inc.dead:
            await anyio.sleep_forever()
        try:
            args = _parse_args(request)
        except Exception:
            args = {}
        tag = HANDLING.get()
        if tag is not None and tag.kind == "process" and inc.nursery is None:
            tag = Tag(inc.n, None, "startup")  # identify, and the crash recovery's fix-ups
        call = SlackCall(self.now(), inc.n, tag, method, args, seq0=self.next_seq(), issued=issued)
        self.slack_calls.append(call)
        current = CURRENT_CALL.set(call)
        try:
            response = await self.slack.handle(request)
        except BaseException:
            call.error = "cancelled"
            raise
        finally:
            call.t_end = self.now()
            call.seq1 = self.next_seq()
            CURRENT_CALL.reset(current)
            if call.in_window_at is not None:  # the fake's clock -> the world's
                call.in_window_at -= anyio.current_time() - self.now()
        call.injected = bool(response.extensions.get("sim_injected"))
        call.status = response.status_code
        # An outage answers before anything else, in the instant the call arrives (no time
        # passes between that and this line).
        call.outage = (
            not call.injected and response.status_code >= 500 and anyio.current_time() < self.slack.outage_until
        )
        if response.status_code == 429:
            try:
                call.retry_after = float(response.headers.get("Retry-After", "1"))
            except ValueError:
                call.retry_after = 1.0
        try:
            body = json.loads(response.content)
        except ValueError:
            body = {}
        call.ok = response.status_code == 200 and bool(body.get("ok"))
        call.error = "" if call.ok else str(body.get("error") or f"HTTP {response.status_code}")
        if call.ok and method in CREATING_METHODS and call.created_ts != str(body.get("ts", "")):
            self.violate(
                f"world bookkeeping: {method} answered ts {body.get('ts')!r}, the fake stored {call.created_ts!r}"
            )
        if method not in ("apps.connections.open", "auth.test") or not call.ok:
            where = args.get("channel") or args.get("channel_id") or ""
            ts = args.get("ts") or args.get("thread_ts") or ""
            text = args.get("markdown_text") or args.get("text") or args.get("status") or ""
            owner = f" [m{call.tag.msg} {call.tag.kind}]" if call.tag else ""
            injected = " (injected)" if call.injected else " (outage)" if call.outage else ""
            if call.created_ts and not call.ok:
                injected += f" although Slack made {call.created_ts}"
            if call.in_window_at is not None:
                injected += " [inside an announced Retry-After window]"
            result = f"ok {call.created_ts}".rstrip() if call.ok else f"FAILED {call.error}{injected}"
            self.log_trace("slack", f"#{inc.n}{owner} {method} {where} {ts} {str(text)[:60]!r} -> {result}")
        await inc.hold()  # the answer reaches a paused process when it resumes
        if inc.dead:
            await anyio.sleep_forever()
        return response

    async def _connect(self, inc: Incarnation, url: str):
        await inc.hold()
        if inc.dead:
            await anyio.sleep_forever()
        ws = await self.slack.connector(url)
        _pausable(ws, inc)
        link = ws._link
        inc.links.append(link)
        self.link_inc[link.id] = inc.n
        self.log_trace("socket", f"#{inc.n} opened socket #{link.id}")
        if inc.dead:
            link.silenced = True
            await anyio.sleep_forever()
        return ws

    # ---- the bot's processes ------------------------------------------------------------

    def _on_ready(self, inc: Incarnation, nursery) -> None:
        """Instrument a fresh nursery before it runs (observation only)."""
        inc.nursery = nursery
        for name in (
            "_request",
            "_first_time",
            "_thread_known",
            "_busy_reply",
            "_storage_down_reply",
            "reader",
            "active",
            "gates",
        ):
            if not hasattr(nursery, name):
                raise AttributeError(f"the simulator's instrumentation needs Nursery.{name}; update tests/simulation")
        nursery.reader._backoff._rng = random.Random(f"{self.s.seed}:{inc.n}:backoff")
        _prewarm_openai(nursery.services.openai)
        nursery.active = ActiveMonitor(self, inc)
        world = self

        original_request = nursery._request

        async def request(envelope):
            inc.in_request += 1
            event = (envelope.payload.get("event") or {}) if isinstance(envelope.payload, dict) else {}
            mid = world.by_ts.get(str(event.get("ts", "")))
            HANDLING.set(Tag(inc.n, mid, "envelope"))
            try:
                await original_request(envelope)
            finally:
                inc.in_request -= 1

        original_first_time = nursery._first_time

        async def first_time(msg):
            fresh = await original_first_time(msg)
            if not fresh:
                world.handlings.append(Handling("duplicate", inc.n, world.by_ts.get(msg.ts), world.now()))
            return fresh

        original_thread_known = nursery._thread_known

        async def thread_known(msg):
            known = await original_thread_known(msg)
            if not known:
                world.handlings.append(Handling("skip", inc.n, world.by_ts.get(msg.ts), world.now()))
                world.log_trace("bot", f"#{inc.n} m{world.by_ts.get(msg.ts)} ignored: thread not known")
            return known

        original_storage_down = nursery._storage_down_reply

        async def storage_down_reply(msg, exc):
            mid = world.by_ts.get(msg.ts)
            world.handlings.append(Handling("storage_down", inc.n, mid, world.now()))
            HANDLING.set(Tag(inc.n, mid, "storage_down"))
            await original_storage_down(msg, exc)

        original_busy = nursery._busy_reply

        async def busy_reply(msg):
            mid = world.by_ts.get(msg.ts)
            world.handlings.append(Handling("busy", inc.n, mid, world.now()))
            HANDLING.set(Tag(inc.n, mid, "busy"))
            await original_busy(msg)

        limits = nursery.services.slack.limits
        original_acquire = limits.acquire

        async def acquire(method, channel=None, **kw):
            t0 = world.now()
            try:
                await original_acquire(method, channel, **kw)
            finally:
                if world.now() > t0:
                    world.budget_waits.append(BudgetWait(HANDLING.get(), method, t0, world.now()))

        limits.acquire = acquire
        nursery._request = request
        nursery._first_time = first_time
        nursery._thread_known = thread_known
        nursery._busy_reply = busy_reply
        nursery._storage_down_reply = storage_down_reply
        self.log_trace("process", f"#{inc.n} ready")

    async def _run_incarnation(self, inc: Incarnation) -> None:
        store = SimStore((await open_sqlite(self.db_path, inline=True, clock=anyio.current_time)).database)
        store.world, store.inc = self, inc
        inc.store = store
        settings = test_settings(
            **{
                **PRODUCTION,
                **PRODUCT_DEFAULTS,
                "async_max_concurrent_requests": self.s.slots,
                "database_url": f"sqlite:///{self.db_path}",
                **({"native_streaming": self.s.native} if "native_streaming" in SETTINGS else {}),
                **({"replica_id": inc.replica_id} if inc.replica_id else {}),
                "replica_timeout_seconds": self.s.replica_timeout,
            }
        )
        self.log_trace("process", f"#{inc.n} starting" + (f" as replica {inc.replica_id}" if inc.replica_id else ""))
        HANDLING.set(Tag(inc.n, None, "process"))  # this task's context: start-up, reader, …
        try:
            with inc.scope:
                await run_bot(
                    settings,
                    slack_transport=httpx2.MockTransport(partial(self._slack_api, inc)),
                    openai_transport=httpx2.MockTransport(partial(self._openai, inc)),
                    url_transport=httpx2.MockTransport(_no_web),  # (no real transport: no TLS set-up)
                    connector=partial(self._connect, inc),
                    store=store,
                    handle_signals=False,
                    on_ready=partial(self._on_ready, inc),
                )
        except Exception as exc:
            import traceback

            self.violate(
                f"process #{inc.n} died: {type(exc).__name__}: {exc}\n"
                + "".join(traceback.format_exception(exc))[-3000:]
            )
        finally:
            inc.ended = self.now()
            self.log_trace("process", f"#{inc.n} exited{' (crashed)' if inc.dead else ''}")
            self._check_released(inc)
            with anyio.CancelScope(shield=True):
                await store.aclose()  # not through _transaction: closes even for a dead process
            inc.done.set()

    def _check_released(self, inc: Incarnation) -> None:
        nursery = inc.nursery
        if nursery is None:
            return
        if nursery.active:
            self.violate(f"process #{inc.n} exited with requests still active: {list(nursery.active)}")
        if nursery.gates.held:
            self.violate(f"process #{inc.n} exited holding {nursery.gates.held} thread gate(s)")
        slots = nursery.services.model_slots.borrowed_tokens
        if slots:
            self.violate(f"process #{inc.n} exited holding {slots} model slot(s)")
        if inc.in_request:
            self.violate(f"process #{inc.n} exited with {inc.in_request} event task(s) still running")
        if getattr(nursery.reader, "live_sockets", 0):
            self.violate(f"process #{inc.n} exited with {nursery.reader.live_sockets} socket(s) still served")
        if inc.store is not None and inc.store.database._limiter.borrowed_tokens:
            self.violate(f"process #{inc.n} exited holding the store's transaction limiter")
        open_calls = [c for c in self.ai_calls if c.inc == inc.n and math.isnan(c.t_end)]
        if open_calls:
            self.violate(f"process #{inc.n} exited with {len(open_calls)} OpenAI call(s) open")

    async def _start(self, tg, slot: int = 0, *, new_id: bool = False) -> Incarnation:
        before = [i for i in self.incs if i.slot == slot]
        replica_id = f"r{slot}" if self.s.replicas > 1 else ""
        if before:
            replica_id = before[-1].replica_id  # a restart: under the same id ...
            if new_id:  # ... or the next one of this slot ("r1.2"; "local.2" in a one-process world)
                replica_id = f"{replica_id.split('.')[0] or SETTINGS['replica_id']}.{len(before) + 1}"
        inc = Incarnation(len(self.incs) + 1, self.now(), slot=slot, replica_id=replica_id)
        self.incs.append(inc)
        tg.start_soon(self._run_incarnation, inc, name=f"bot process #{inc.n}")
        return inc

    async def crash(self, inc: Incarnation) -> None:
        """kill -9: from this instant nothing the process does reaches the world."""
        inc.dead = True
        inc.crashed_at = self.now()
        inc.impaired.append(("crash", self.now(), math.inf))
        if inc.paused is not None:  # killed while paused: what waited meets its death
            inc.paused.set()
        for link in inc.links:
            link.silenced = True
        inc.scope.cancel()
        self.log_trace("process", f"#{inc.n} CRASHED")
        for link in inc.links:
            if not link.closed:
                await link.abort()

    # ---- Slack's side of event delivery ---------------------------------------------------

    async def _send(self, ev: EventState, *, why: str) -> None:
        attempt = len(ev.sends)
        try:
            envelope_id = await self.slack.send_event(ev.event, event_id=ev.event_id, retry_attempt=attempt)
        except NoConnection:
            envelope_id = None
            self.log_trace("deliver", f"{ev.event_id} ({why}, attempt {attempt}): no connection")
        else:
            delivery = self.slack.deliveries[envelope_id]
            name = f"{ev.event_id}#{attempt}"
            self.envelope_names[envelope_id] = name
            self.envelope_event[envelope_id] = ev.event_id
            self.log_trace("deliver", f"{name} ({why}) on socket #{delivery.connection.id}")
        ev.sends.append((self.now(), envelope_id, attempt))
        ev.next_try = self.now() + RETRY_SCHEDULE[min(attempt, len(RETRY_SCHEDULE) - 1)]
        if self._sent is not None:
            self._sent.set()

    async def _slack_redelivery(self) -> None:
        """What Slack does with events nobody acked: try again, backing off. Slack looks
        once a second; the seconds in which nothing can be due are slept through (an event
        only becomes due through a send, and a send wakes this task to look again)."""
        last = anyio.current_time()  # the grid: last + 1, last + 2, … (clock time)
        while True:
            due = min(
                (ev.next_try for ev in self.events.values() if ev.sends and not ev.acked(self.slack)), default=math.inf
            )
            offset = anyio.current_time() - self.now()  # clock time - world time
            tick = last + 1.0
            while math.isfinite(due) and tick - offset < due - 1e-9:
                tick += 1.0  # nothing is due at this look: skip it
            self._sent = anyio.Event()
            with anyio.CancelScope(deadline=tick if math.isfinite(due) else math.inf) as scope:
                await self._sent.wait()
            if not scope.cancelled_caught:  # a send: due times changed, look again
                continue
            last = tick
            now = self.now()
            for ev in list(self.events.values()):
                if ev.sends and ev.next_try <= now and not ev.acked(self.slack):
                    self.count("redeliveries")
                    await self._send(ev, why="retry")

    # ---- the scenario's actions ---------------------------------------------------------

    def _post(self, m: Msg) -> list[EventState]:
        """The user posts message m; returns the events Slack will deliver for it."""
        text = f"m{m.id} from u{m.user}: question {m.id}"
        user = f"U{m.user}"
        root_ts = self.msg_ts.get(m.root) if m.root is not None else None
        if m.root is not None and root_ts is None:
            return []
        events: list[dict] = []
        if m.place == "dm":
            channel = f"D{self.msgs[m.root].user if m.root is not None else m.user}"
            events.append(self.slack.message_event(channel, user, text, thread_ts=root_ts, channel_type="im"))
        else:
            channel = f"C{m.channel}"
            if m.mention or m.root is None:
                mention = self.slack.app_mention_event(channel, user, text, thread_ts=root_ts)
                events.append(mention)
                if m.twin:
                    events.append(
                        self.slack.message_event(
                            channel, user, mention["text"], ts=mention["ts"], thread_ts=root_ts, channel_type="channel"
                        )
                    )
            else:
                events.append(self.slack.message_event(channel, user, text, thread_ts=root_ts, channel_type="channel"))
        ts = events[0]["ts"]
        self.msg_ts[m.id] = ts
        self.by_ts[ts] = m.id
        self.msg_thread[m.id] = (channel, root_ts or ts)
        self.log_trace("user", f"m{m.id} posted in {channel} ts {ts}" + (f" (thread {root_ts})" if root_ts else ""))
        states = []
        for i, event in enumerate(events):
            event_id = f"Ev{m.id:04d}{'at'[i] if len(events) > 1 else ''}"  # app_mention, twin
            states.append(self.events.setdefault(event_id, EventState(event_id, m.id, event)))
        return states

    async def _fault(self, f: Fault, tg) -> None:
        self.count(f"fault_{f.kind}")
        if f.kind == "slack":
            if self.slack._faults.get(f.target):
                self.log_trace("fault", f"(skipped: a {f.target} fault is still pending)")
                return
            if f.after:
                self.slack.fail_next(
                    f.target,
                    status=f.status,
                    times=f.times,
                    after=True,
                    body=f"<html><body><h1>{f.status}</h1>upstream error</body></html>",
                )
                self.log_trace("fault", f"Slack will do {f.target} but answer HTTP {f.status} x{f.times}")
                return
            if f.status == 429:
                self.slack.fail_next(f.target, status=429, retry_after=f.retry_after, times=f.times)
            elif f.status == 500:
                self.slack.fail_next(f.target, status=500, error="internal_error", times=f.times)
            else:
                self.slack.fail_next(
                    f.target,
                    status=f.status,
                    times=f.times,
                    body=f"<html><body><h1>{f.status}</h1>upstream error</body></html>",
                )
            self.log_trace("fault", f"Slack {f.target} will answer HTTP {f.status} x{f.times}")
        elif f.kind == "socket":
            if f.target == "refuse":
                self.slack.refuse_connects += f.times
                self.log_trace("fault", f"next {f.times} socket upgrade(s) refused")
                return
            live = [c for c in self.slack.live_connections if not c.silenced]
            if not live:
                self.log_trace("fault", f"(socket {f.target} skipped: no live socket)")
                return
            link = live[0]
            self.log_trace("fault", f"socket #{link.id}: {f.target}")
            if f.target == "drop":
                await self.slack.drop(link)
            elif f.target == "silence":
                self.slack.silence(link)
            else:
                await self.slack.disconnect(f.target, link)
        elif f.kind == "outage":
            self.slack.outage(f.seconds, status=f.status)
            self.log_trace("fault", f"Slack Web API down (HTTP {f.status}) for {f.seconds:g}s")
        elif f.kind == "end_stream":
            mid = message_id(f.target)
            thread = self.msg_thread.get(mid) if mid is not None else None
            if thread is None:
                self.log_trace("fault", f"(end of stream skipped: {f.target} was not posted)")
                return
            channel, thread_ts = thread
            streams = [
                m["ts"]
                for m in self.slack.messages.get(channel, [])
                if m.get("streaming") and m.get("thread_ts") == thread_ts and m.get("bot_id") == self.slack.bot_id
            ]
            if not streams:
                self.log_trace("fault", f"(end of stream skipped: nothing streams in the thread of {f.target})")
                return
            self.slack.end_stream(channel, streams[-1])
            self.log_trace("fault", f"Slack ended the stream {streams[-1]} in {channel} by itself")
        elif f.kind == "storage":
            if self.storage_faults.get(f.target):  # like Slack faults: one burst at a time per method
                self.log_trace("fault", f"(skipped: a {f.target} fault is still pending)")
                return
            self.storage_faults.setdefault(f.target, []).append([f.error, f.times])
            self.log_trace("fault", f"storage {f.target} will fail x{f.times} ({f.error})")
        elif f.kind in ("pause", "partition"):
            inc = self._target(f)
            if inc is None or inc.dead or inc.ended is not None:
                self.log_trace("fault", f"({f.kind} skipped: no running process)")
                return
            until = self.now() + f.seconds
            if f.kind == "partition":
                inc.partitioned_until = max(inc.partitioned_until, until)
                inc.impaired.append(("partition", self.now(), until))
                self.log_trace("fault", f"#{inc.n} cut off from storage for {f.seconds:g}s")
                return
            if f.on == "opening":
                inc.pause_on = f.seconds
                self.log_trace("fault", f"#{inc.n} pauses for {f.seconds:g}s as its next answer opens")
                return
            self._pause(inc, f.seconds, tg)
        elif f.kind in ("sigterm", "crash"):
            inc = self._target(f)
            if inc is None or inc.dead or inc.ended is not None or (f.kind == "sigterm" and inc.stopped_at is not None):
                self.log_trace("fault", f"({f.kind} skipped: no running process)")
                return
            if f.kind == "sigterm":
                inc.stopped_at = self.now()
                self.log_trace("process", f"#{inc.n} SIGTERM")
                if inc.nursery is not None:
                    inc.nursery.stop()
                else:  # still starting: a signal then simply ends the process
                    inc.scope.cancel()
            else:
                await self.crash(inc)
            if f.restart_after is not None:
                self.pending_restarts += 1
                tg.start_soon(self._restart, inc, f.at + f.restart_after, f.new_id)

    def _target(self, f: Fault) -> Incarnation | None:
        """The running incarnation of the replica a fault names ("r1"; "" is r0)."""
        slot = int(f.target[1:]) if f.target.startswith("r") and f.target[1:].isdigit() else 0
        if slot >= self.s.replicas:  # (the shrinker took that replica away)
            return None
        return self.current_of(slot)

    def _pause(self, inc: Incarnation, seconds: float, tg) -> None:
        if inc.paused is not None:
            self.log_trace("fault", "(pause skipped: already paused)")
            return
        until = self.now() + seconds
        inc.paused = anyio.Event()
        inc.impaired.append(("pause", self.now(), until))
        self.log_trace("process", f"#{inc.n} PAUSED for {seconds:g}s")
        self.pending_resumes += 1
        tg.start_soon(self._resume, inc, until)

    async def _resume(self, inc: Incarnation, until: float) -> None:
        await anyio.sleep_until(self.t0 + until)
        event, inc.paused = inc.paused, None
        self.pending_resumes -= 1
        self.log_trace("process", f"#{inc.n} resumed")
        if event is not None:
            event.set()

    async def _restart(self, old: Incarnation, at: float, new_id: bool = False) -> None:
        if not old.dead:  # a graceful stop: the new process starts once the old one exited
            await old.done.wait()
        await anyio.sleep_until(self.t0 + max(at, self.now()))
        self.pending_restarts -= 1
        if old.restarted:  # crashed while stopping: one replacement process, not two
            return
        old.restarted = True
        await self._start(self._tg, old.slot, new_id=new_id)

    # ---- the run --------------------------------------------------------------------------

    def _actions(self) -> list[tuple[float, float, str, Any]]:
        """Every scheduled action: (time, tie-break, kind, what). Actions at one instant
        run in an order drawn from the seed (and stable when the shrinker removes others)."""
        seed = self.s.seed

        def tie(key: str) -> float:
            return random.Random(f"{seed}:{key}").random()

        actions = []
        for m in self.s.messages:
            actions.append((m.at, -1.0, "post", m))  # a post comes before its own deliveries
            actions.append((m.at + m.delay, tie(f"d{m.id}"), "deliver", m))
            if m.dup is not None:
                actions.append((m.at + m.delay + m.dup, tie(f"r{m.id}"), "dup", m))
        for i, f in enumerate(self.s.faults):
            actions.append((f.at, tie(f"f{i}:{f.kind}:{f.target}:{f.at}"), "fault", f))
        order = {"post": 0, "deliver": 1, "dup": 1, "fault": 1}
        actions.sort(key=lambda a: (a[0], order[a[2]], a[1], a[3].id if a[2] != "fault" else -1))
        return actions

    async def _notify(self, original, slack, req) -> bool:
        """`bot.replica._notify`, observed: a process taking over a request (its previous
        run's, at start-up, or an abandoned one): recorded, and its calls attributed."""
        tag = HANDLING.get()
        inc = self.incs[tag.inc - 1] if tag is not None else None
        if inc is None:
            return await original(slack, req)
        if req not in self.recovered.get(inc.n, []):
            self.recovered.setdefault(inc.n, []).append(req)
        kind = "startup" if inc.nursery is None else "takeover"
        if kind == "takeover" or self.s.replicas > 1:
            self.log_trace("bot", f"#{inc.n} takes over request {req.request_id} of replica {req.owner!r}")
        token = HANDLING.set(Tag(inc.n, None, kind, of=req.request_id))
        try:
            return await original(slack, req)
        finally:
            HANDLING.reset(token)

    async def run(self) -> None:
        original_notify = bot.replica._notify
        bot.replica._notify = partial(self._notify, original_notify)
        try:
            await self._run()
        finally:
            bot.replica._notify = original_notify

    async def _run(self) -> None:
        try:
            self.clock0 = anyio.current_time()
            async with anyio.create_task_group() as tg:
                self._tg = tg
                # One after another, each once the one before is connected: Slack's round
                # robin then gives r0 the first envelope, whatever the scheduler's seed.
                everyone = [await self._start(tg)]
                with anyio.move_on_after(60) as startup:
                    for slot in range(1, self.s.replicas + 1):
                        while any(i.nursery is None or not i.nursery.reader.connected.is_set() for i in everyone):
                            await anyio.sleep(0.05)
                            if any(i.ended is not None for i in everyone):
                                break
                        if slot < self.s.replicas and not any(i.ended is not None for i in everyone):
                            everyone.append(await self._start(tg, slot))
                if startup.cancelled_caught or any(i.ended is not None for i in everyone):
                    self.violate(
                        "the first process never connected" if len(everyone) == 1 else "a replica never connected"
                    )
                    tg.cancel_scope.cancel()
                    return
                t0 = anyio.current_time()
                self.trace = [(round(t - (t0 - self.clock0), 6), kind, text) for t, kind, text in self.trace]
                self.t0 = t0
                self.log_trace("world", "t0: first socket ready")
                tg.start_soon(self._slack_redelivery, name="slack redelivery")
                await self._play(tg)
                await self._drain()
                last = [self.current_of(slot) for slot in range(self.s.replicas)]
                running = [inc for inc in last if inc is not None and inc.ended is None and not inc.dead]
                for inc in running:
                    if inc.stopped_at is None:
                        inc.stopped_at = self.now()
                        self.log_trace("process", f"#{inc.n} final SIGTERM")
                        if inc.nursery is not None:
                            inc.nursery.stop()
                        else:
                            inc.scope.cancel()
                for inc in running:
                    with anyio.move_on_after(60) as stopping:
                        await inc.done.wait()
                    if stopping.cancelled_caught:
                        self.violate(f"process #{inc.n} did not exit within 60 s of SIGTERM")
                        inc.scope.cancel()
                for old in self.incs:
                    # A crashed process's shielded clean-up waits on calls that never return
                    # (its final write's own bound, FINALIZE_SECONDS, ends it).
                    with anyio.move_on_after(FINALIZE_SECONDS + 60) as waiting:
                        await old.done.wait()
                    if waiting.cancelled_caught:
                        self.violate(f"process #{old.n} never finished unwinding")
                        old.scope.cancel()
                tg.cancel_scope.cancel()
        finally:
            self.end_time = self.now()

    async def _play(self, tg) -> None:
        posted: dict[int, list[EventState]] = {}
        for at, _, kind, what in self._actions():
            await anyio.sleep_until(self.t0 + at)
            if kind == "post":
                posted[what.id] = self._post(what)
            elif kind == "deliver":
                for ev in posted.get(what.id, []):
                    await self._send(ev, why="first delivery")
            elif kind == "dup":
                for ev in posted.get(what.id, []):
                    self.count("late_redeliveries")
                    await self._send(ev, why="late ack: redelivered")
            else:
                await self._fault(what, tg)
        self.log_trace("world", "scenario played; draining")

    def _quiet(self) -> bool:
        if self.s.replicas > 1:
            return self._replicas_quiet()
        if self.pending_restarts:
            return False
        inc = self.current
        if inc is None or inc.dead:
            return False
        if not inc.up:
            return inc.ended is not None  # stopped for good: nothing more will happen
        if inc.nursery is None or inc.nursery.active or inc.in_request:
            return False
        if any(math.isnan(c.t_end) for c in self.ai_calls if not self.incs[c.inc - 1].dead):
            return False
        return all(ev.acked(self.slack) for ev in self.events.values() if ev.sends)

    def _replicas_quiet(self) -> bool:
        """Every replica idle (or stopped for good), and nothing left in flight in storage
        that a live replica has still to take over."""
        if self.pending_restarts or self.pending_resumes:
            return False
        live = 0
        for slot in range(self.s.replicas):
            inc = self.current_of(slot)
            if inc is None:
                return False
            if inc.dead:
                continue  # killed for good (a restart would be pending): the others take over
            if not inc.up:
                if inc.ended is None:
                    return False
                continue
            if inc.nursery is None or inc.nursery.active or inc.in_request:
                return False
            if self.now() < inc.partitioned_until:
                return False  # (the end is judged once storage is back for everyone)
            live += 1
        if not live:
            return True  # all stopped for good: nothing more will happen
        if any(math.isnan(c.t_end) for c in self.ai_calls if not self.incs[c.inc - 1].dead):
            return False
        if not all(ev.acked(self.slack) for ev in self.events.values() if ev.sends):
            return False
        conn = sqlite3.connect(self.db_path)
        try:
            return conn.execute("SELECT COUNT(*) FROM requests WHERE status = 'in_flight'").fetchone()[0] == 0
        finally:
            conn.close()

    async def _drain(self) -> None:
        start = self.now()
        quiet_since = None
        while self.now() - start < DRAIN_LIMIT:
            if self._quiet():
                quiet_since = self.now() if quiet_since is None else quiet_since
                if self.now() - quiet_since >= 5.0:
                    self.drained = True
                    return
            else:
                quiet_since = None
            await anyio.sleep(1.0)
        unacked = [ev.event_id for ev in self.events.values() if ev.sends and not ev.acked(self.slack)]
        inc = self.current
        self.violate(
            f"the world did not settle within {DRAIN_LIMIT:g}s: unacked events {unacked[:10]}, "
            f"active requests {list(inc.nursery.active) if inc and inc.nursery else '-'}"
        )

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class ActiveMonitor(dict):
    """`Nursery.active`, observed: every request's start and end, and no thread with two."""

    def __init__(self, world: World, inc: Incarnation) -> None:
        super().__init__()
        self.world, self.inc = world, inc
        self.records: dict[str, Request] = {}

    def __setitem__(self, rid, state) -> None:
        world = self.world
        thread = (state.message.channel, state.message.thread_ts)
        for other in self.values():
            if (other.message.channel, other.message.thread_ts) == thread:
                world.violate(f"two requests at once in thread {thread}: {other.request_id} and {rid}")
        mid = world.by_ts.get(state.message.ts)
        record = Request(self.inc.n, rid, mid, thread, state.started_at - world.t0, state)
        world.requests.append(record)
        world.request_by_rid[rid] = record
        world.handlings.append(Handling("request", self.inc.n, mid, world.now()))
        self.records[rid] = record
        HANDLING.set(Tag(self.inc.n, mid, "request", rid))
        world.log_trace("bot", f"#{self.inc.n} request {rid} for m{mid} starts")
        super().__setitem__(rid, state)

    def __delitem__(self, rid) -> None:
        record = self.records.pop(rid)
        record.end = self.world.now()
        record.outcome = record.state.outcome or "interrupted"
        record.placeholder_ts = record.state.placeholder_ts
        self.world.log_trace("bot", f"#{self.inc.n} request {rid} for m{record.msg} ends: {record.outcome}")
        super().__delitem__(rid)
