"""Replicas end to end: two or three real `python -m bot` processes on one database.

The processes are started as tests/test_e2e.py starts one (a fresh working directory, a
minimal environment), each under its own REPLICA_ID and alternating bot backends (trio,
asyncio, trio: every cluster runs both), on one PostgreSQL database or one SQLite file
shared by two processes. They talk to one fake Slack and one fake OpenAI served from
this process over real sockets (tests/fakes/servers.py). The fake Slack spreads
envelopes over every open Socket Mode connection (round robin); a task here redelivers
any envelope not acked within REDELIVER_AFTER seconds, on another connection, as Slack does.

What a user of the workspace sees is then checked, never how fast:
- every message has exactly one visible outcome: its answer; the busy notice for a
  follow-up sent while its thread was answering; the interrupted notice for a request
  a killed replica held. Nothing is answered twice, nothing is left "Thinking…" or
  streaming, and no thread still shows the assistant's "is thinking…" status;
- the model is asked at most once per message, and never twice at once in one thread
  (from the fake OpenAI's request log, by thread: `ModelCalls`);
- every event was acked by some replica, possibly after a redelivery.

Scenarios: SIGKILL one replica mid-burst (the others answer everything sent after it
and take over its requests within REPLICA_TIMEOUT_SECONDS + 5 s), and a rolling restart
(SIGTERM, wait for the exit, start again under the same REPLICA_ID, each replica in
turn) under a steady stream of messages.

Slack's rules stay on in the fake, rate-limit tiers included: the replicas divide
Slack's budgets between them, and whatever goes over is answered 429 as Slack would.
The first-DM welcome is off: it is one more bot message per user, tested in
tests/interactions/, and it would blur "one outcome per message".

A check that meets a known bot bug (each is described where it is detected) does not
stop the test: every other check runs first, then the test xfails with the bug's
description, so a new failure is never hidden behind a known one.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import httpx2
import pytest

from bot.processing.failures import BUSY_NOTICE, INTERRUPTED_NOTICE
from bot.storage import InFlightRequest, SQLStore, Store, ThreadKey, open_store
from tests.fakes.openai import Behaviour, FakeOpenAI, last_user_text
from tests.fakes.servers import http_server, slack_server
from tests.fakes.slack import FakeSlack, Link, NoConnection
from tests.postgres import fresh_database
from tests.test_e2e import API_KEY, APP_TOKEN, BOT_TOKEN, READY_TIMEOUT, BotProcess, base_env

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

REPLICA_TIMEOUT = 3.0  # REPLICA_TIMEOUT_SECONDS: small, so a takeover comes within seconds
TAKEOVER_BOUND = REPLICA_TIMEOUT + 5.0  # a killed replica's requests are finalized by then
# Each native stream taken over needs a chat.stopStream first, and that is Tier 2: 20 a
# minute for the whole workspace, so one every 3 s for a lone survivor, every 6 s each for
# two (they split the budget). A takeover's call goes first in the queue, and its first
# one beyond the burst (it never waits out the slot the survivor's own answer just used),
# but a second (third…) stream stopped by one survivor waits for its slot: Slack's rate,
# not the bot, sets that part of the bound.
STOP_STREAM_INTERVAL = 60.0 / 20
REDELIVER_AFTER = 1.0  # Slack waits a few seconds for an ack; sooner here (dedupe works harder)
FAST = 0.3  # model latency of an ordinary question
PROCESS_EXIT_TIMEOUT = 15.0
SETTLE_TIMEOUT = 20.0  # for the last answers after the action (they are due within seconds)
QUIET = 0.5  # after everything is settled: room for a wrong second answer to show up
BACKENDS = ("trio", "asyncio")
MESSAGE = re.compile(r"msg (T\d+)-(\d+) end")
READY = re.compile(r"socket #1 ready \(connections: (\d+)")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    """The test process (and the fakes it serves) runs on both backends."""
    return request.param


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """One database for the whole cluster: a fresh PostgreSQL database, or one SQLite
    file that every process opens (parametrised indirectly: "postgres" or "sqlite")."""
    if request.param == "postgres":
        yield from fresh_database()
    else:
        yield f"sqlite:///{tmp_path}/shared.db"


# ---------------------------------------------------------------- the model's log, by thread


@dataclass
class ModelCall:
    text: str  # the last user message: names the message (and so the thread) asked about
    started: float  # the request arrived
    ended: float | None = None  # its answer was sent to the end, or the client went away

    def end(self) -> None:
        if self.ended is None:
            self.ended = anyio.current_time()


class _TimedBody(httpx2.AsyncByteStream):
    """A streamed answer that notes when its last byte went out (or it was closed)."""

    def __init__(self, inner: httpx2.AsyncByteStream, call: ModelCall) -> None:
        self._inner, self._call = inner, call

    async def __aiter__(self):  # type: ignore[override]
        try:
            async for chunk in self._inner:
                yield chunk
        finally:
            self._call.end()

    async def aclose(self) -> None:
        self._call.end()
        await self._inner.aclose()


class ModelCalls:
    """In front of `FakeOpenAI.handle`: every chat call's span, from the request's arrival to
    the end of its answer. Two spans of one thread that overlap are two model calls in one
    thread at once."""

    def __init__(self, ai: FakeOpenAI) -> None:
        self.ai = ai
        self.calls: list[ModelCall] = []

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        call = None
        if request.method == "POST" and request.url.path.rstrip("/").endswith("/chat/completions"):
            try:
                body = json.loads(request.content)
            except ValueError:
                body = None
            if isinstance(body, dict):
                call = ModelCall(last_user_text(body), anyio.current_time())
                self.calls.append(call)
        response = await self.ai.handle(request)
        if call is None:
            return response
        if "content-length" in response.headers:  # not streamed (an error): it is over
            call.end()
            return response
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        return httpx2.Response(response.status_code, headers=response.headers, stream=_TimedBody(response.stream, call))

    def problems(self) -> list[str]:
        out: list[str] = []
        by_message: dict[tuple[str, int], list[ModelCall]] = {}
        by_thread: dict[str, list[ModelCall]] = {}
        for call in self.calls:
            found = MESSAGE.search(call.text)
            if found is None:
                out.append(f"a model call about no message sent: {call.text!r}")
                continue
            by_message.setdefault((found.group(1), int(found.group(2))), []).append(call)
            by_thread.setdefault(found.group(1), []).append(call)
        out += [f"model asked {len(c)} times about {t}-{k}" for (t, k), c in by_message.items() if len(c) > 1]
        for tag, calls in by_thread.items():
            calls.sort(key=lambda c: c.started)
            for before, after in itertools.pairwise(calls):
                if before.ended is None or after.started < before.ended:
                    out.append(f"two model calls at once in {tag}: {before} and {after}")
        return out


def model(slow: float) -> Callable[[dict], Behaviour]:
    """The fake model's script: it echoes, after FAST seconds, or `slow` for a message
    marked slow; a few chunks, as a stream."""

    def script(request: dict) -> Behaviour:
        text = last_user_text(request)
        latency = slow if text.endswith(" slow") else FAST
        return Behaviour(text="Echo: " + text, latency=latency, chunks=3, chunk_delay=0.05)

    return script


# ---------------------------------------------------------------- the processes


@dataclass(eq=False)
class Replica:
    name: str  # its REPLICA_ID, kept across restarts
    backend: str  # BOT_ASYNC_BACKEND
    runs: list[BotProcess] = field(default_factory=list)  # one per start
    link: Link | None = None  # its current Socket Mode connection, as the fake Slack sees it

    @property
    def bot(self) -> BotProcess:
        return self.runs[-1]

    def answered(self, run: int = -1) -> int:
        return self.runs[run].log.count(": answered after ")


async def _drain(stream: anyio.abc.ByteReceiveStream | None, into: bytearray, done: anyio.Event) -> None:
    try:
        if stream is not None:
            async for chunk in stream:
                into += chunk
    except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
        pass
    finally:
        done.set()


class Cluster:
    """N bot processes on one database, the fakes they share, and Slack's redelivery."""

    def __init__(
        self,
        tmp_path: Path,
        database_url: str,
        count: int,
        slack: FakeSlack,
        calls: ModelCalls,
        tg: anyio.abc.TaskGroup,
        urls: tuple[str, str],
        env: dict[str, str],
    ) -> None:
        self.tmp_path, self.database_url = tmp_path, database_url
        self.slack, self.calls, self._tg = slack, calls, tg
        self._slack_url, self._openai_url = urls
        self._env = env
        self.replicas = [Replica(f"replica-{'abc'[i]}", BACKENDS[i % 2]) for i in range(count)]
        self._started: list[tuple[BotProcess, list[anyio.Event]]] = []

    def env(self, replica: Replica) -> dict[str, str]:
        return base_env(
            self.tmp_path,
            backend=replica.backend,
            slack_url=self._slack_url,
            openai_url=self._openai_url,
            DATABASE_URL=self.database_url,
            REPLICA_ID=replica.name,
            REPLICA_TIMEOUT_SECONDS=f"{REPLICA_TIMEOUT:g}",
            WELCOME_MESSAGE="off",
            # Pings only keep a socket honest here; at 1 s a busy 2-core box may miss a
            # pong and replace a socket mid-test, which is tested elsewhere.
            SOCKET_PING_INTERVAL_SECONDS="5",
            **self._env,
        )

    async def start(self, *replicas: Replica) -> None:
        """Start these processes at once; back when each has its first socket ready. Each
        replica's `link` is found from the `num_connections` its hello reported: the
        fake numbers connections in the order they were accepted."""
        before = self.slack.connections_opened
        for replica in replicas:
            workdir = self.tmp_path / f"cwd-{replica.name}"
            workdir.mkdir(exist_ok=True)
            process = await anyio.open_process(
                [sys.executable, "-m", "bot"], cwd=str(workdir), env=self.env(replica), stdin=subprocess.DEVNULL
            )
            bot = BotProcess(process)
            replica.runs.append(bot)
            drained = [anyio.Event(), anyio.Event()]
            self._started.append((bot, drained))
            self._tg.start_soon(_drain, process.stdout, bot.stdout, drained[0])
            self._tg.start_soon(_drain, process.stderr, bot.stderr, drained[1])
        for replica in replicas:
            await replica.bot.wait_log("socket #1 ready", READY_TIMEOUT)
        new = sorted((c for c in self.slack.connections if c.id > before), key=lambda c: c.id)
        assert len(new) == len(replicas), f"{len(replicas)} processes started, {len(new)} sockets opened"

        def live_at_hello(replica: Replica) -> int:
            found = READY.search(replica.bot.log)
            assert found is not None
            return int(found.group(1))

        for replica, link in zip(sorted(replicas, key=live_at_hello), new, strict=True):
            replica.link = link

    async def redeliver_forever(self) -> None:
        """Slack's side: an envelope not acked in time goes again, on another connection."""
        while True:
            await anyio.sleep(0.2)
            with suppress(NoConnection):  # (every socket closed for a moment)
                await self.slack.redeliver_unacked(after=REDELIVER_AFTER)

    async def close(self) -> None:
        """Kill whatever still runs (bounded waits), so nothing outlives the test."""
        for bot, drained in self._started:
            if bot.process.returncode is None:
                bot.process.kill()
            with anyio.move_on_after(5):
                await bot.process.wait()
            with anyio.move_on_after(2):
                for done in drained:
                    await done.wait()
            with anyio.move_on_after(5):
                await bot.process.aclose()

    def logs(self, tail: int = 150) -> str:
        parts = []
        for replica in self.replicas:
            for n, bot in enumerate(replica.runs, 1):
                lines = bot.log.splitlines()
                shown = "\n".join(lines[-tail:])
                parts.append(
                    f"--- {replica.name} ({replica.backend}) run {n}, exit code {bot.returncode}, "
                    f"last {min(tail, len(lines))} of {len(lines)} lines ---\n{shown}"
                )
        return "\n".join(parts)


@asynccontextmanager
async def cluster(
    tmp_path: Path, database_url: str, count: int, *, script: Callable[[dict], Behaviour], **env: str
) -> AsyncIterator[Cluster]:
    """The fakes on real sockets and `count` replicas connected to them. A failure inside
    the block is re-raised bare, with every replica's log attached as a note."""
    slack = FakeSlack(bot_token=BOT_TOKEN, app_token=APP_TOKEN)
    calls = ModelCalls(FakeOpenAI(api_key=API_KEY, script=script))
    nodes: list[Cluster] = []
    error: Exception | None = None
    try:
        async with (
            slack_server(slack) as slack_url,
            http_server(calls.handle) as openai_origin,
            anyio.create_task_group() as tg,
        ):
            node = Cluster(tmp_path, database_url, count, slack, calls, tg, (slack_url, f"{openai_origin}/v1/"), env)
            nodes.append(node)
            tg.start_soon(node.redeliver_forever)
            try:
                await node.start(*node.replicas)
                yield node
            finally:
                with anyio.CancelScope(shield=True):
                    await node.close()
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # Trio wraps the block's own exception: unwrap it
        if len(group.exceptions) != 1 or not isinstance(group.exceptions[0], Exception):
            raise
        error = group.exceptions[0]
    except Exception as exc:
        error = exc
    if error is not None:
        if nodes:
            error.add_note(nodes[0].logs())
        raise error


@asynccontextmanager
async def checking_store(database_url: str) -> AsyncIterator[SQLStore]:
    """The test's own look at the shared database (it is no replica: no heartbeat)."""
    store = await open_store(database_url)
    try:
        assert isinstance(store, SQLStore)
        yield store
    finally:
        with anyio.CancelScope(shield=True):
            await store.aclose()


async def lease_free(store: SQLStore, thread: ThreadKey) -> bool:
    """Nobody holds the thread's lease (never taken, or given back)."""
    rows = await store.database.transaction(
        "test: lease owner",
        lambda c: c.execute(
            "SELECT owner FROM thread_leases WHERE channel = ? AND thread_ts = ?", (thread.channel, thread.thread_ts)
        ).fetchall(),
        write=False,
    )
    return not rows or rows[0][0] == ""


class Heartbeats:
    """Watches the replicas' heartbeats in the database (ages by its clock): the oldest
    each live replica's got. Older than REPLICA_TIMEOUT, the others take it for dead."""

    def __init__(self, store: SQLStore, names: list[str]) -> None:
        self.store, self.names = store, set(names)
        self.oldest: dict[str, float] = {}

    async def watch(self) -> None:
        while True:
            ages = await self.store.replicas()
            for name in self.names & set(ages):
                self.oldest[name] = max(self.oldest.get(name, 0.0), ages[name])
            await anyio.sleep(0.2)

    def starved(self) -> dict[str, float]:
        return {name: round(age, 1) for name, age in self.oldest.items() if age > REPLICA_TIMEOUT}


async def poll(predicate: Callable[[], Awaitable[object]], timeout: float, interval: float = 0.1) -> None:
    """Await `predicate()` until it is true, for at most `timeout` seconds."""
    with anyio.fail_after(timeout):
        while not await predicate():
            await anyio.sleep(interval)


# ---------------------------------------------------------------- the messages, and what Slack shows


@dataclass(eq=False)
class Thread:
    tag: str  # "T<n>": in every message's text, so every answer and model call names it
    channel: str
    ts: str = ""
    messages: list[Sent] = field(default_factory=list)

    @property
    def key(self) -> ThreadKey:
        return ThreadKey(self.channel, self.ts)


@dataclass(eq=False)
class Sent:
    thread: Thread
    k: int  # its place in the thread
    event: dict
    envelope_id: str = ""
    busy_ok: bool = False  # a follow-up sent while its thread may be answering: the busy notice will do
    interrupt_ok: bool = False  # held by a killed replica: the interrupted notice will do

    @property
    def text(self) -> str:
        return f"msg {self.thread.tag}-{self.k} end"


class Traffic:
    """DMs from one user, a channel per thread, and what the fake Slack shows of them."""

    def __init__(self, slack: FakeSlack) -> None:
        self.slack = slack
        self.threads: list[Thread] = []

    @property
    def messages(self) -> list[Sent]:
        return [m for t in self.threads for m in t.messages]

    async def new_thread(self, *, slow: bool = False, connection: Link | None = None) -> Sent:
        n = len(self.threads)
        thread = Thread(f"T{n}", f"D{n}")
        self.threads.append(thread)
        return await self._send(thread, slow=slow, connection=connection)

    async def follow_up(
        self, thread: Thread, *, busy_ok: bool = False, slow: bool = False, connection: Link | None = None
    ) -> Sent:
        return await self._send(thread, slow=slow, busy_ok=busy_ok, connection=connection)

    async def _send(self, thread: Thread, *, slow: bool, busy_ok: bool = False, connection: Link | None) -> Sent:
        k = len(thread.messages)
        text = f"msg {thread.tag}-{k} end" + (" slow" if slow else "")
        event = self.slack.message_event(thread.channel, "U1", text, thread_ts=thread.ts or None, channel_type="im")
        thread.ts = thread.ts or event["ts"]
        sent = Sent(thread, k, event, busy_ok=busy_ok)
        thread.messages.append(sent)  # before sending: its answer may come back at once
        sent.envelope_id = await self.slack.send_event(event, connection=connection)
        return sent

    def thread(self, key: ThreadKey) -> Thread:
        return next(t for t in self.threads if t.key == key)

    def bot_messages(self, thread: Thread) -> list[tuple[str, str, bool]]:
        """(ts, visible text, still streaming) of each bot message in the thread."""
        slack = self.slack
        return [
            (m["ts"], slack.visible_text(thread.channel, m["ts"]), slack.is_streaming(thread.channel, m["ts"]))
            for m in slack.thread_messages(thread.channel, thread.ts)
            if m.get("bot_id") == slack.bot_id and m["ts"] != thread.ts
        ]

    def answers(self, thread: Thread) -> dict[int, int]:
        counts = {m.k: 0 for m in thread.messages}
        for _, text, streaming in self.bot_messages(thread):
            found = MESSAGE.search(text)
            if not streaming and text.startswith("Echo: ") and found and found.group(1) == thread.tag:
                k = int(found.group(2))
                counts[k] = counts.get(k, 0) + 1
        return counts

    def settled(self, thread: Thread) -> bool:
        """Every message has its outcome and nothing streams: a good time for a follow-up."""
        shown = self.bot_messages(thread)
        return len(shown) == len(thread.messages) and not any(streaming for _, _, streaming in shown)

    def problems(self) -> list[str]:
        """Everything a user would find wrong; [] once every message has exactly one
        visible outcome and nothing is left in progress."""
        out: list[str] = []
        for thread in self.threads:
            where = f"{thread.tag} ({thread.channel}/{thread.ts})"
            busy = interrupted = 0
            for ts, text, streaming in self.bot_messages(thread):
                if streaming:
                    out.append(f"{where}: message {ts} still streaming: {text!r}")
                elif text == BUSY_NOTICE:
                    busy += 1
                elif text == INTERRUPTED_NOTICE:
                    interrupted += 1
                elif not (text.startswith("Echo: ") and MESSAGE.search(text)):
                    out.append(f"{where}: message {ts} shows {text!r}")  # "Thinking…", empty, an error
            answers = self.answers(thread)
            out += [f"{where}: message {k} answered {n} times" for k, n in answers.items() if n > 1]
            unanswered = [m for m in thread.messages if not answers.get(m.k)]
            if missing := [m.k for m in unanswered if not (m.busy_ok or m.interrupt_ok)]:
                out.append(f"{where}: message(s) {missing} not answered")
            may_busy = sum(1 for m in unanswered if m.busy_ok)
            may_interrupted = sum(1 for m in unanswered if m.interrupt_ok)
            if busy + interrupted != len(unanswered) or busy > may_busy or interrupted > may_interrupted:
                out.append(
                    f"{where}: {busy} busy and {interrupted} interrupted notices for {len(unanswered)} messages "
                    f"left unanswered, of which {may_busy} may be busy and {may_interrupted} interrupted"
                )
            if out and out[-1].startswith(where):
                out.append(f"{where}: shows {[text[:60] for _, text, _ in self.bot_messages(thread)]}")
        return out

    def stale_statuses(self) -> list[str]:
        """Threads that show the assistant status ("is thinking…") now: after
        `settle_and_check`, under a final answer or notice."""
        return [
            f"{t.tag} ({t.channel}/{t.ts}): {status!r}"
            for t in self.threads
            if (status := self.slack.visible_status(t.channel, t.ts))
        ]

    def unacked_events(self) -> list[str]:
        """Events no replica acked, on any delivery (first or redelivered)."""
        acked = {d.event_id for d in self.slack.deliveries.values() if d.envelope_id in self.slack.acks}
        return [m.text for m in self.messages if self.slack.deliveries[m.envelope_id].event_id not in acked]


async def settle_and_check(node: Cluster, traffic: Traffic) -> None:
    """Wait (bounded) until every message has its outcome, give a wrong second answer a
    moment to show, then check Slack, the model's log and the acks."""
    with suppress(TimeoutError):  # (the assertion below says what is wrong)
        await node.slack.wait_until(lambda: not traffic.problems(), timeout=SETTLE_TIMEOUT)
    await anyio.sleep(QUIET)
    problems = traffic.problems() + node.calls.problems()
    if unacked := traffic.unacked_events():
        problems.append(f"never acked by any replica: {unacked}")
    assert not problems, "\n".join(problems)
    answered = [m for m in traffic.messages if traffic.answers(m.thread).get(m.k)]
    asked = {MESSAGE.search(c.text).group(0) for c in node.calls.calls}  # type: ignore[union-attr]
    assert all(m.text in asked for m in answered)  # (every answer came from the model)


def stale_status_bug(traffic: Traffic, taken_over: Sequence[Thread] = ()) -> list[str]:
    """Checked last, as it makes the test xfail: no thread whose messages all have their
    outcome still shows the assistant's "is thinking…" status (Slack shows it for up to 2
    minutes after it was set, unless the app clears it or posts in the thread)."""
    stale = traffic.stale_statuses()
    tags = {t.tag for t in taken_over}
    after_takeover = [s for s in stale if s.split(" ", 1)[0] in tags]
    after_answer = [s for s in stale if s.split(" ", 1)[0] not in tags]
    known = []
    if after_answer:
        known.append(
            "bot bug: 'is thinking…' stays under a final answer: the status is cleared by an interim "
            "assistant.threads.setStatus, which the bot skips once that budget is under half full (a burst of "
            f"~10 DMs on one process does it): {after_answer}"
        )
    if after_takeover:
        known.append(
            "bot bug: a takeover edits the dead replica's placeholder into the notice but never clears the "
            f"thread's assistant status: {after_takeover}"
        )
    return known


async def recorded(store: Store, sent: list[Sent]) -> list[InFlightRequest] | None:
    """The requests in flight, once each of `sent` (each the first message of its thread)
    is among them. (With its placeholder's ts, unless the bot's own Slack budget was too
    low for one: the answer is then posted when done, the thread status shows progress.)"""
    requests = await store.in_flight()
    have = {r.thread for r in requests}
    return requests if all(m.thread.key in have for m in sent) else None


# ---------------------------------------------------------------- the tests

SLOW_AT_KILL = 5.0  # the burst's questions are still being answered when the replica dies


@pytest.mark.parametrize(
    ("database_url", "count", "victim"),
    [
        pytest.param("postgres", 3, 1, id="postgres-3-kill_the_asyncio_one"),
        pytest.param("sqlite", 2, 0, id="sqlite-2-kill_the_trio_one"),
    ],
    indirect=["database_url"],
)
async def test_a_killed_replicas_threads_are_taken_over_and_nothing_new_is_lost(tmp_path, database_url, count, victim):
    known: list[str] = []  # bot bugs seen (the test xfails with them once all else passed)
    async with (
        cluster(tmp_path, database_url, count, script=model(slow=SLOW_AT_KILL)) as node,
        checking_store(database_url) as store,
    ):
        slack, traffic, dead = node.slack, Traffic(node.slack), node.replicas[victim]
        # A burst: quick questions round robin (a thread each), and two slow ones for each
        # replica, on its own socket. Once every one is being answered (or is done), and
        # the two of the replica to be killed are, a second message in every slow thread:
        # busy, from the holder's own gate or another replica's lease.
        quick = [await traffic.new_thread() for _ in range(2 * count)]
        assert {slack.deliveries[m.envelope_id].connection for m in quick} == {r.link for r in node.replicas}
        slow = [await traffic.new_thread(slow=True, connection=r.link) for r in node.replicas for _ in range(2)]
        mine = slow[2 * victim : 2 * victim + 2]  # the ones the replica to be killed has

        theirs = [m for m in quick + slow if slack.deliveries[m.envelope_id].connection is dead.link]

        async def picked_up() -> bool:
            """Nothing the replica to be killed acked is not yet recorded, so none is lost
            with it (a placeholder may wait a Retry-After: replicas that started together
            can go over Slack's tier for chat.startStream). Only its messages: another
            replica's held by a Retry-After could outlast its slow ones, and those are
            checked once everything has settled."""
            flying = {r.thread for r in await store.in_flight()}
            return all(m.thread.key in flying for m in mine) and all(
                m.thread.key in flying or traffic.answers(m.thread)[0] for m in theirs
            )

        await poll(picked_up, timeout=45)  # (a Retry-After can hold a placeholder on a busy box)
        for m in slow:
            await traffic.follow_up(m.thread, busy_ok=True)
        await slack.wait_until(
            lambda: all(
                BUSY_NOTICE in [text for _, text, _ in traffic.bot_messages(m.thread)] or traffic.answers(m.thread)[1]
                for m in slow
            ),
            timeout=10,
        )
        held = [r for r in await store.in_flight() if r.owner == dead.name]
        assert held, "the replica to be killed holds no request"
        for r in held:  # (which of its messages a request answers, storage does not say)
            thread = traffic.thread(r.thread)
            for m in thread.messages:
                m.interrupt_ok = m.interrupt_ok or not traffic.answers(thread)[m.k]

        dead.bot.process.kill()  # SIGKILL, its requests in flight
        killed_at = anyio.current_time()
        # Mid-burst: Slack, not knowing yet, sends the next envelope into the dead socket;
        # the rest go round robin. And a message in each thread the dead replica held:
        # its lease is still valid (busy), or has lapsed (then it is answered).
        into_the_dead_socket = await traffic.new_thread(connection=dead.link)
        for _ in range(2 * count):
            await traffic.new_thread()
        held_threads = [traffic.thread(r.thread) for r in held]
        for thread in held_threads:
            await traffic.follow_up(thread, busy_ok=True)
        assert await dead.bot.wait_exit(5) == -signal.SIGKILL

        def finalized(r: InFlightRequest) -> bool:
            """Its placeholder (or, without one, its thread) shows the notice or the answer."""
            thread = traffic.thread(r.thread)
            if r.placeholder_ts:
                shown = [slack.visible_text(thread.channel, r.placeholder_ts)]
            else:
                shown = [text for _, text, streaming in traffic.bot_messages(thread) if not streaming]
            return any(
                text == INTERRUPTED_NOTICE
                or (text.startswith("Echo: ") and (found := MESSAGE.search(text)) and found.group(1) == thread.tag)
                for text in shown
            )

        # The others finalize its requests, in time, and stay alive meanwhile (their
        # heartbeats fresh: else they would take each other for dead). In time: within
        # TAKEOVER_BOUND, plus a chat.stopStream slot for each native stream after the
        # first (the worst case: one survivor takes them all, at its share of Tier 2).
        streamed = await _streamed(store, held)
        allowed = TAKEOVER_BOUND + max(0, len(streamed) - 1) * STOP_STREAM_INTERVAL * (count - 1)
        heartbeats = Heartbeats(store, [r.name for r in node.replicas if r is not dead])
        async with anyio.create_task_group() as watching:
            watching.start_soon(heartbeats.watch)
            with anyio.move_on_after(allowed - (anyio.current_time() - killed_at)) as bound:
                await slack.wait_until(lambda: all(finalized(r) for r in held), timeout=math.inf)
            if bound.cancelled_caught:
                with anyio.move_on_after(30):  # (late, but it may still come: see below)
                    await slack.wait_until(lambda: all(finalized(r) for r in held), timeout=math.inf)
            watching.cancel_scope.cancel()
        took = anyio.current_time() - killed_at
        late = (
            f"the takeover of {len(held)} requests ({len(streamed)} native streams) took {took:.1f}s "
            f"(bound {allowed:g}s): {held}"
        )
        if bound.cancelled_caught:
            assert all(finalized(r) for r in held), f"not all of {held} finalized, even {took:.0f}s after the kill"
            assert heartbeats.starved(), late
            # Seen before keep_alive beat and swept in tasks of their own: the takeover's
            # Slack calls waited for budget inside the heartbeat loop.
            known.append(
                f"bot bug: {late}, and survivors' heartbeats aged past REPLICA_TIMEOUT_SECONDS={REPLICA_TIMEOUT:g} "
                f"(oldest: {heartbeats.starved()}) while they were taking over"
            )
        elif heartbeats.starved():
            known.append(f"bot bug: a live replica's heartbeat aged past REPLICA_TIMEOUT: {heartbeats.starved()}")
        # Its threads are free again, their history intact: the next message is answered.
        await poll(lambda: all_free(store, held_threads), timeout=10)
        after = [await traffic.follow_up(thread, busy_ok=True) for thread in held_threads]  # (see below)
        await settle_and_check(node, traffic)

        for m, r in zip(after, held, strict=True):
            if traffic.answers(m.thread).get(m.k):
                continue
            # Told "busy" in a thread nobody held. Seen with 3 replicas: the second survivor
            # takes over the same request again (from its own list of abandoned ones, read
            # before the first finished it), holding the thread's lease meanwhile.
            notices = slack.updates.get((m.thread.channel, r.placeholder_ts), [])
            assert r.placeholder_ts and len(notices) >= 3 and notices[-1] == notices[-2], (
                f"{m.text}: the busy notice, in a thread no replica held ({notices})"
            )
            known.append(
                f"bot bug: {m.thread.tag}'s request was taken over twice (notice written "
                f"{notices.count(notices[-1])} times); the second takeover held the free thread's lease, "
                "so a new message there was told 'busy'"
            )
        status = dict(
            await store.database.transaction(
                "test: outcomes",
                lambda c: c.execute("SELECT request_id, status FROM requests").fetchall(),
                write=False,
            )
        )
        assert all(status[r.request_id] in ("interrupted", "answered") for r in held), status
        assert all(r.answered() > 0 for r in node.replicas if r is not dead)
        # The envelope sent into the dead socket was never acked there; Slack sent it
        # again on a live connection, where it was answered (once: checked above).
        first_try = slack.deliveries[into_the_dead_socket.envelope_id]
        assert first_try.envelope_id not in slack.acks and first_try.redelivered
        again = [
            d
            for d in slack.deliveries.values()
            if d.event_id == first_try.event_id and d.envelope_id != first_try.envelope_id
        ]
        assert again and all(d.connection is not dead.link for d in again)
        assert any(d.envelope_id in slack.acks for d in again)
        await all_closed(store)
        known += stale_status_bug(traffic, held_threads)
    if known:
        pytest.xfail("; ".join(known))


async def _streamed(store: SQLStore, requests: list[InFlightRequest]) -> list[str]:
    """Those of `requests` stored as native streams, as their (dead) owner left them."""
    ids = {r.request_id for r in requests}
    rows = await store.database.transaction(
        "test: streamed",
        lambda c: c.execute("SELECT request_id FROM requests WHERE streamed = 1").fetchall(),
        write=False,
    )
    return [rid for (rid,) in rows if rid in ids]


CLOSE_TIMEOUT = 10.0  # an answer shows before its request is closed: the status clear after it
# (assistant.threads.setStatus, up to EXTRA_TIMEOUT when Slack rate-limits it) and the
# outcome's recording come after the final write


async def all_closed(store: Store) -> None:
    """Every request is closed in storage, within CLOSE_TIMEOUT of the checks that saw its
    outcome in Slack (else the assertion names those left in flight)."""
    with suppress(TimeoutError):
        await poll(lambda: _none_in_flight(store), timeout=CLOSE_TIMEOUT)
    assert await store.in_flight() == []


async def _none_in_flight(store: Store) -> bool:
    return not await store.in_flight()


async def all_free(store: SQLStore, threads: list[Thread]) -> bool:
    for thread in threads:
        if not await lease_free(store, thread.key):
            return False
    return True


SLOW_AT_STOP = 0.5  # a request in flight when its replica is told to stop (well within the grace)
STREAM_INTERVAL = 0.3  # the steady stream: a message every this many seconds


@pytest.mark.parametrize(
    ("database_url", "count"),
    [pytest.param("postgres", 2, id="postgres-2"), pytest.param("sqlite", 2, id="sqlite-2")],
    indirect=["database_url"],
)
async def test_a_rolling_restart_under_a_steady_stream_loses_and_doubles_nothing(tmp_path, database_url, count):
    async with (
        cluster(tmp_path, database_url, count, script=model(slow=SLOW_AT_STOP), SHUTDOWN_GRACE_SECONDS="5") as node,
        checking_store(database_url) as store,
    ):
        traffic = Traffic(node.slack)
        rng = random.Random(count)
        stop = anyio.Event()

        async def steady() -> None:
            """New threads, and now and then a follow-up in a thread at rest (all answered,
            its lease given back), so every message is due one answer."""
            while not stop.is_set():
                thread = None
                if traffic.threads and rng.random() < 0.3:
                    thread = rng.choice(traffic.threads)
                    if not (traffic.settled(thread) and await lease_free(store, thread.key)):
                        thread = None
                if thread is None:
                    await traffic.new_thread()
                else:
                    await traffic.follow_up(thread)
                await anyio.sleep(STREAM_INTERVAL)

        async def in_flight_or_answered(m: Sent) -> bool:
            return bool(traffic.answers(m.thread)[0] or await recorded(store, [m]))

        async with anyio.create_task_group() as tg:
            tg.start_soon(steady)
            for replica in node.replicas:
                # It holds a request when told to stop (recorded, its placeholder up): it
                # finishes it within the grace period (the answer is checked below).
                held = await traffic.new_thread(slow=True, connection=replica.link)
                await poll(lambda h=held: in_flight_or_answered(h), timeout=20)
                replica.bot.process.send_signal(signal.SIGTERM)
                assert await replica.bot.wait_exit(PROCESS_EXIT_TIMEOUT) == 0
                # It left nothing behind: no request in flight, no heartbeat to age.
                assert not [r for r in await store.in_flight() if r.owner == replica.name]
                assert replica.name not in await store.replicas()
                await node.start(replica)  # the same REPLICA_ID
            sent = len(traffic.messages)
            await poll(lambda: _at_least(traffic, sent + 2 * count), timeout=10)  # every replica back at work
            stop.set()
        await settle_and_check(node, traffic)

        assert all(r.answered(0) > 0 and r.answered() > 0 for r in node.replicas)  # before and after its restart
        await all_closed(store)
        assert set(await store.replicas()) == {r.name for r in node.replicas}  # all alive
        assert all(len(r.runs) == 2 for r in node.replicas)
        known = stale_status_bug(traffic)
    if known:
        pytest.xfail("; ".join(known))


async def _at_least(traffic: Traffic, n: int) -> bool:
    return len(traffic.messages) >= n
