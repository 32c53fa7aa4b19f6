"""Several replicas of the bot on one database, against one fake Slack that spreads
envelopes across their Socket Mode connections (as Slack does): each event answered
once, one request per thread across replicas, and a frozen replica's request taken
over by a live one. On SQLite (one file, two processes' worth of stores) and on
PostgreSQL, on both Trio and asyncio."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from types import SimpleNamespace
from typing import Any

import anyio
import httpx2
import pytest

from bot.nursery import Nursery
from bot.processing import answer
from bot.processing.context import RequestState
from bot.processing.failures import BUSY_NOTICE, INTERRUPTED_NOTICE, STORAGE_DOWN_NOTICE
from bot.processing.message import IncomingMessage
from bot.replica import _ours_now
from bot.slack.web_api import SlackWebAPI
from bot.storage import InFlightRequest, RequestRecord, SQLStore, StorageError, Store, ThreadKey, open_store
from tests.fakes.openai import Behaviour, FakeOpenAI
from tests.fakes.slack import FakeSlack
from tests.harness import eventually, running_bot, send_dm
from tests.postgres import fresh_database

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    if request.param == "postgres":
        yield from fresh_database()
    else:
        yield f"sqlite:///{tmp_path}/bot.db"


class Freezable:
    """A replica's store and Slack calls that can be frozen: every call from then on
    waits until thawed, as in a process paused (SIGSTOP) or cut off from the network."""

    def __init__(self, store: Store, slack: FakeSlack) -> None:
        self.inner = store
        self.slack = slack
        self.frozen = False
        self._thawed = anyio.Event()

    def thaw(self) -> None:
        self.frozen = False
        self._thawed.set()

    async def _wait(self) -> None:
        if self.frozen:
            await self._thawed.wait()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name == "aclose" or not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            await self._wait()
            return await attr(*args, **kwargs)

        return call

    async def handle(self, request):
        await self._wait()
        return await self.slack.handle(request)


@asynccontextmanager
async def replicas(
    slack: FakeSlack, ai: FakeOpenAI, url: str, names: list[str], **overrides: Any
) -> AsyncIterator[tuple[list[Nursery], list[Freezable]]]:
    async with AsyncExitStack() as stack:
        nurseries, handles = [], []
        for name in names:
            store = await open_store(url)
            stack.push_async_callback(store.aclose)
            handle = Freezable(store, slack)
            nursery = await stack.enter_async_context(
                running_bot(slack, ai, store=handle, slack_handler=handle.handle, replica_id=name, **overrides)
            )
            nurseries.append(nursery)
            handles.append(handle)
        yield nurseries, handles


def answers(slack: FakeSlack, channel: str, thread_ts: str) -> list[str]:
    return [r for r in slack.bot_replies(channel, thread_ts) if r not in (BUSY_NOTICE,)]


async def test_each_event_is_answered_once_across_replicas(slack, ai, database_url):
    async with replicas(slack, ai, database_url, ["replica-a", "replica-b"]) as (nurseries, _):
        sent = []
        for n in range(6):
            _, ev = await send_dm(slack, f"question {n}", channel=f"D{n}")
            sent.append((f"D{n}", ev))
        # Slack redelivers two of them (no ack seen in time): on the other replica's socket.
        for _, ev in sent[:2]:
            await slack.send_event(ev, retry_attempt=1)
        for channel, ev in sent:
            await slack.wait_until(lambda c=channel, e=ev: answers(slack, c, e["ts"]), timeout=10)
        await anyio.sleep(0.3)  # time for a duplicate to show, if there were one
        for channel, ev in sent:
            assert len(answers(slack, channel, ev["ts"])) == 1, slack.bot_replies(channel, ev["ts"])
        assert sum(n.outcomes.get("answered", 0) for n in nurseries) == 6
        assert all(n.outcomes.get("answered", 0) > 0 for n in nurseries)  # both replicas did work


async def test_one_request_per_thread_across_replicas(slack, ai, database_url):
    ai.enqueue(Behaviour(text="the first answer", latency=1.0))
    async with replicas(slack, ai, database_url, ["replica-a", "replica-b"]) as (nurseries, _):
        _, first = await send_dm(slack, "first")
        thread = first["ts"]
        await slack.wait_until(lambda: sum(len(n.active) for n in nurseries) == 1)
        # Two follow-ups: round-robin puts one on each replica. The holder's own gate
        # says busy to one, the other replica's lease check to the other.
        for text in ("second", "third"):
            await slack.send_event(slack.message_event("D1", "U1", text, thread_ts=thread, channel_type="im"))
        await slack.wait_until(lambda: slack.bot_replies("D1", thread).count(BUSY_NOTICE) == 2, timeout=10)
        await slack.wait_until(lambda: "the first answer" in " ".join(slack.bot_replies("D1", thread)), timeout=10)
        await eventually(lambda: sum(n.outcomes.get("answered", 0) for n in nurseries) == 1)
        assert sum(n.outcomes.get("busy", 0) for n in nurseries) == 2
        assert all(n.outcomes.get("busy", 0) == 1 for n in nurseries)  # one said by each gate


async def test_a_frozen_replicas_request_is_taken_over_and_it_is_fenced_off_when_it_wakes(slack, ai, database_url):
    ai.enqueue(Behaviour(hang=True))  # replica-a's model call never answers
    fast = {"replica_timeout_seconds": 1.0}
    async with replicas(slack, ai, database_url, ["replica-a"], **fast) as ([a], [a_handle]):
        _, ev = await send_dm(slack, "will you answer?")
        # Recorded, model asked, answer opened (the model is asked beside the opening).
        await eventually(lambda: bool(ai.requests) and any(s.placeholder_ts for s in a.active.values()), timeout=10)
        [state] = a.active.values()
        a_handle.frozen = True  # replica-a stops: no heartbeat, no renewal, no writes
        async with replicas(slack, ai, database_url, ["replica-b"], **fast) as ([b], _):
            await slack.wait_until(
                lambda: INTERRUPTED_NOTICE in (slack.visible_text("D1", state.placeholder_ts) or ""), timeout=10
            )
            assert b.outcomes == {}  # b only took over; it answered nothing
            # replica-a wakes up: its renewal is refused, so it stops its request, and
            # storage refuses what it tries to write under its old token.
            a_handle.thaw()
            await eventually(lambda: not a.active, timeout=10)
            store = await open_store(database_url)
            try:
                assert await store.in_flight() == []
                assert isinstance(store, SQLStore)
                [(outcome, detail)] = await store.database.transaction(
                    "look",
                    lambda c: c.execute(
                        "SELECT status, detail FROM requests WHERE request_id = ?", (state.request_id,)
                    ).fetchall(),
                )
                assert outcome == "interrupted" and "taken over by replica-b" in detail  # b's write stands
                assert await store.load_history(ThreadKey("D1", ev["ts"])) == []
            finally:
                await store.aclose()
            assert INTERRUPTED_NOTICE in slack.visible_text("D1", state.placeholder_ts)


async def test_a_long_unfinished_answer_taken_over_leaves_only_the_notice(slack, ai, database_url):
    """replica-a dies in the middle of an answer longer than one Slack message: it has
    filled its placeholder and continued in a second message. The takeover edits the
    first into the notice and deletes the second (its metadata names the request): the
    thread does not show the end of an answer whose beginning is gone."""
    words = " ".join(f"word{n}" for n in range(6000))  # ~50,000 characters: several messages
    ai.enqueue(Behaviour(text=words, chunks=4, stall_after=2, chunk_delay=0.05))  # then nothing, forever
    fast = {"replica_timeout_seconds": 1.0, "stream_idle_timeout_seconds": 60.0}
    async with replicas(slack, ai, database_url, ["replica-a"], **fast) as ([a], [a_handle]):
        _, ev = await send_dm(slack, "a long one, please")
        await slack.wait_until(lambda: len(slack.bot_replies("D1", ev["ts"])) >= 2, timeout=10)
        [state] = a.active.values()
        parts = [m["ts"] for m in slack.thread_messages("D1", ev["ts"]) if m.get("bot_id") == slack.bot_id]
        a_handle.frozen = True  # replica-a stops mid-answer
        async with replicas(slack, ai, database_url, ["replica-b"], **fast):
            await slack.wait_until(lambda: slack.bot_replies("D1", ev["ts"]) == [INTERRUPTED_NOTICE], timeout=10)
            await _until_closed(database_url, state.request_id)
            assert [ts for _, ts in slack.deleted] == parts[1:]
            assert slack.visible_text("D1", parts[0]) == INTERRUPTED_NOTICE
        a_handle.thaw()


async def _frozen_with_a_request(
    slack: FakeSlack, ai: FakeOpenAI, a: Nursery, a_handle: Freezable, text: str
) -> tuple[str, str, int]:
    """replica-a holds a request (recorded, placeholder up, model asked), then freezes:
    (its request id, its placeholder's ts, the number of Slack calls before the freeze)."""
    await send_dm(slack, text)
    await eventually(lambda: bool(ai.requests), timeout=10)
    [state] = a.active.values()
    await eventually(lambda: bool(state.placeholder_ts), timeout=10)
    if a.services.settings.surfaces.native_streaming:  # a stream's id is recorded just after: wait for it
        with anyio.fail_after(10):
            while [r.placeholder_ts for r in await a_handle.inner.in_flight()] != [state.placeholder_ts]:
                await anyio.sleep(0.02)
    a_handle.frozen = True  # its Slack calls wait from now on: every call after is replica-b's
    return state.request_id, state.placeholder_ts, len(slack.calls)


async def test_a_native_stream_left_streaming_is_stopped_first_and_its_thread_not_read(slack, ai, database_url):
    """The dead replica's placeholder is a native stream, still streaming: the takeover stops
    it before anything else (an edit would be refused) and, the stream being still open,
    knows no final write was made: it writes the notice without reading the thread."""
    ai.enqueue(Behaviour(hang=True))
    fast = {"replica_timeout_seconds": 1.0, "native_streaming": True}
    async with replicas(slack, ai, database_url, ["replica-a"], **fast) as ([a], [a_handle]):
        request_id, ts, mark = await _frozen_with_a_request(slack, ai, a, a_handle, "stream, then freeze")
        assert slack.is_streaming("D1", ts)
        async with replicas(slack, ai, database_url, ["replica-b"], **fast):
            await slack.wait_until(lambda: slack.visible_text("D1", ts) == INTERRUPTED_NOTICE, timeout=10)
            await _until_closed(database_url, request_id)
            after = slack.calls[mark:]
            assert [m for m, args in after if args.get("ts") == ts] == ["chat.stopStream", "chat.update"]
            assert "conversations.replies" not in [m for m, _ in after]
            assert not slack.is_streaming("D1", ts)
        a_handle.thaw()


async def test_a_native_stream_already_closed_is_read_for_its_receipt_before_the_notice(slack, ai, database_url):
    """The stream was stopped (the dead replica gave streaming up, say): the takeover
    finds it no longer streaming, so it reads the thread as for any message, finds no
    receipt, and edits the message into the notice."""
    ai.enqueue(Behaviour(hang=True))
    fast = {"replica_timeout_seconds": 1.0, "native_streaming": True}
    async with replicas(slack, ai, database_url, ["replica-a"], **fast) as ([a], [a_handle]):
        request_id, ts, mark = await _frozen_with_a_request(slack, ai, a, a_handle, "stopped, then freeze")
        slack._stop_stream({"channel": "D1", "ts": ts})  # as its own give-up would have, before it froze
        async with replicas(slack, ai, database_url, ["replica-b"], **fast):
            await slack.wait_until(lambda: slack.visible_text("D1", ts) == INTERRUPTED_NOTICE, timeout=10)
            await _until_closed(database_url, request_id)
            after = [m for m, args in slack.calls[mark:] if args.get("ts") in (ts, _thread_of(slack, ts))]
            assert after[:3] == ["chat.stopStream", "conversations.replies", "chat.update"], after
        a_handle.thaw()


async def test_a_takeover_takes_the_dead_replicas_share_of_slacks_budgets_before_its_calls(slack, ai, database_url):
    ai.enqueue(Behaviour(hang=True))
    fast = {"replica_timeout_seconds": 1.0}
    async with replicas(slack, ai, database_url, ["replica-a"], **fast) as ([a], [a_handle]):
        _, ts, _ = await _frozen_with_a_request(slack, ai, a, a_handle, "share, then freeze")
        seen: list[tuple[str, int]] = []
        b_limits: list[Any] = []

        async def handler(request):
            method = request.url.path.rsplit("/", 1)[-1]
            if b_limits and method in ("conversations.replies", "chat.update"):
                seen.append((method, b_limits[0].shared_by))
            return await slack.handle(request)

        store = await open_store(database_url)
        try:
            async with running_bot(slack, ai, store=store, slack_handler=handler, replica_id="replica-b", **fast) as b:
                b_limits.append(b.services.slack.limits)
                await slack.wait_until(lambda: slack.visible_text("D1", ts) == INTERRUPTED_NOTICE, timeout=10)
        finally:
            await store.aclose()
        assert seen and all(shared == 1 for _, shared in seen), seen  # replica-a's half was taken first
        a_handle.thaw()


def _thread_of(slack: FakeSlack, ts: str) -> str:
    return next((str(m.get("thread_ts")) for m in slack.messages.get("D1", []) if m.get("ts") == ts), "")


async def _until_closed(url: str, request_id: str) -> None:
    with anyio.fail_after(10):
        while (await _request_row(url, request_id))[0] == "in_flight":
            await anyio.sleep(0.1)


class DiesOnOpening(Freezable):
    """A replica killed (SIGKILL) just as Slack makes its answer's first message: Slack
    makes it, and the replica never hears back, nor does anything more (no heartbeat,
    no renewal, no write): it never learns the message's id."""

    async def handle(self, request):
        method = request.url.path.rsplit("/", 1)[-1]
        opening = method == "chat.startStream" or (method == "chat.postMessage" and b"Thinking" in request.content)
        response = await super().handle(request)
        if opening and not self.frozen:
            self.frozen = True
            await self._wait()
        return response


async def _stopped_on_opening(
    stack: AsyncExitStack,
    handle: type[Freezable],
    slack: FakeSlack,
    ai: FakeOpenAI,
    database_url: str,
    settings: dict[str, Any],
) -> tuple[Nursery, Freezable, dict[str, Any]]:
    """replica-a, its store and Slack calls wrapped in `handle`, asked a DM; returns once
    `handle` has stopped it as its answer opens (replica-a, its handle, the DM's event)."""
    store = await open_store(database_url)
    stack.push_async_callback(store.aclose)
    a_handle = handle(store, slack)
    a = await stack.enter_async_context(
        running_bot(slack, ai, store=a_handle, slack_handler=a_handle.handle, replica_id="replica-a", **settings)
    )
    _, ev = await send_dm(slack, "will you answer?")
    await eventually(lambda: a_handle.frozen, timeout=10)
    return a, a_handle, ev


@pytest.mark.parametrize("native", [False, True], ids=["placeholder", "native stream"])
async def test_a_replica_killed_as_its_answer_opens_leaves_nothing_unfinished(slack, ai, database_url, native, caplog):
    """Issue 11: the request is recorded before its first message is posted, so a
    replica that dies as Slack makes that message (before any id of it reaches storage)
    leaves a request in flight that another replica takes over. It finds the message in
    the thread (the placeholder's metadata names the request; the stream is the bot's one
    message there without metadata) and edits it into the interrupted notice: nothing
    stays "Thinking…" or streaming, and no second message is posted. (Here it comes back
    instead, learns its message's id and its lost lease: the takeover recorded that
    message as the request's, so it leaves it as the takeover made it.)"""
    caplog.set_level(logging.INFO, logger="bot.processing.answer")
    ai.enqueue(Behaviour(hang=True))
    fast = {"replica_timeout_seconds": 1.0, "native_streaming": native}
    async with AsyncExitStack() as stack:
        a, a_handle, ev = await _stopped_on_opening(stack, DiesOnOpening, slack, ai, database_url, fast)
        [state] = a.active.values()
        assert not state.placeholder_ts  # it never learnt its message's id
        [opened] = [m for m in slack.thread_messages("D1", ev["ts"]) if m.get("bot_id") == slack.bot_id]
        async with replicas(slack, ai, database_url, ["replica-b"], **fast) as ([b], _):
            await slack.wait_until(lambda: INTERRUPTED_NOTICE in slack.visible_text("D1", opened["ts"]), timeout=10)
            assert not slack.is_streaming("D1", opened["ts"])
            assert b.outcomes == {}
            status, detail = await _closed_row(database_url, state.request_id)  # (stored just after the notice)
            assert status == "interrupted" and "taken over by replica-b" in detail
            a_handle.thaw()  # (the dead replica's last calls, for the test to end: fenced off)
            await eventually(lambda: not a.active, timeout=10)
        assert state.placeholder_ts == opened["ts"]  # it learnt its message's id on waking, and kept it:
        assert f"the takeover kept its first message {opened['ts']}" in caplog.text
        assert ("D1", opened["ts"]) not in slack.deleted
        assert INTERRUPTED_NOTICE in slack.visible_text("D1", opened["ts"])
        assert slack.bot_replies("D1", ev["ts"]) == [slack.visible_text("D1", opened["ts"])]  # one message


class PausedOnOpening(Freezable):
    """A replica paused (SIGSTOP) just before its answer's first message reaches Slack:
    it stops, storage calls too, and the post goes out when it resumes."""

    async def handle(self, request):
        method = request.url.path.rsplit("/", 1)[-1]
        opening = method == "chat.startStream" or (method == "chat.postMessage" and b"Thinking" in request.content)
        if opening and not self.paused_once:
            self.paused_once = self.frozen = True
        return await super().handle(request)

    paused_once = False


@pytest.mark.parametrize("native", [False, True], ids=["placeholder", "native stream"])
async def test_a_paused_replicas_first_message_landing_after_the_takeovers_notice_is_withdrawn(
    slack, ai, database_url, native
):
    """Issue 11: replica-a is paused past its lease after recording its request, before
    its post reached Slack. replica-b finds the request with no message anywhere and
    posts its notice; replica-a's post lands after it. Having lost its lease, replica-a
    writes no answer, but it asks storage whether the takeover knew that message: it did
    not (the request was closed with none), so replica-a withdraws it (a stream is
    stopped first: Slack refuses to delete one still streaming). The user sees one
    message under the question: the notice."""
    ai.enqueue(Behaviour(hang=True))  # (and no idle deadline: replica-a's request ends by its lease only)
    fast = {"replica_timeout_seconds": 1.0, "native_streaming": native, "stream_idle_timeout_seconds": 60.0}
    async with AsyncExitStack() as stack:
        a, a_handle, ev = await _stopped_on_opening(stack, PausedOnOpening, slack, ai, database_url, fast)
        [state] = a.active.values()
        async with replicas(slack, ai, database_url, ["replica-b"], **fast):
            try:
                with anyio.fail_after(10):  # replica-a's lease lapses and replica-b takes the request over
                    while (await _request_row(database_url, state.request_id))[0] == "in_flight":
                        await anyio.sleep(0.1)
                [notice] = [m["ts"] for m in slack.thread_messages("D1", ev["ts"]) if m.get("bot_id") == slack.bot_id]
            finally:
                a_handle.thaw()  # the post lands; replica-a then learns its lease is gone
            await eventually(lambda: not a.active, timeout=10)
            status, detail = await _request_row(database_url, state.request_id)
            assert status == "interrupted" and "taken over by replica-b" in detail
            store = await open_store(database_url)
            try:  # storage names the message that shows the request's outcome: the notice
                assert await store.request_record(state.request_id) == RequestRecord("interrupted", notice)
            finally:
                await store.aclose()
            # replica-a did post, after the notice, and took that message back.
            assert state.placeholder_ts and float(state.placeholder_ts) > float(notice)
            assert ("D1", state.placeholder_ts) in slack.deleted
            on_it = [m for m, args in slack.calls if args.get("ts") == state.placeholder_ts]  # (the opening aside)
            assert on_it == (["chat.stopStream", "chat.delete"] if native else ["chat.delete"]), on_it
            [shown] = slack.bot_replies("D1", ev["ts"])  # one bot message under the question: the notice
            assert INTERRUPTED_NOTICE in shown and "Thinking" not in shown
            assert not slack.is_streaming("D1", notice)


async def test_a_rolling_restart_loses_and_doubles_nothing(slack, ai, database_url):
    """The replica answering is told to stop (SIGTERM): it closes its socket first, so what
    is sent meanwhile goes to the other one; it finishes its answer within the grace
    period, gives its lease back and removes its heartbeat: nothing is left to recover."""
    ai.enqueue(Behaviour(text="answered during the restart", latency=0.5))
    grace = {"shutdown_grace_seconds": 5.0}
    async with replicas(slack, ai, database_url, ["replica-b"], **grace) as ([b], _):
        async with replicas(slack, ai, database_url, ["replica-a"], **grace) as ([a], _):
            _, first = await send_dm(slack, "slow one", channel="D1")
            await eventually(lambda: bool(a.active) or bool(b.active))
            holder = a if a.active else b
            holder.stop()  # SIGTERM
            await eventually(lambda: holder.reader.ready_sockets == 0)
            sent = []
            for n in range(4):
                _, ev = await send_dm(slack, f"meanwhile {n}", channel=f"D{n + 2}")
                sent.append((f"D{n + 2}", ev))
            for channel, ev in sent:
                await slack.wait_until(lambda c=channel, e=ev: answers(slack, c, e["ts"]), timeout=10)
            await slack.wait_until(
                lambda: "answered during the restart" in " ".join(slack.bot_replies("D1", first["ts"])), timeout=10
            )
        for channel, ev in [("D1", first), *sent]:
            assert len(answers(slack, channel, ev["ts"])) == 1
    store = await open_store(database_url)
    try:
        assert await store.in_flight() == []
        assert await store.replicas() == {}  # both left cleanly
    finally:
        await store.aclose()


class CutOff:
    """A replica's store that can be cut off from the database (its Slack calls go on):
    every write that closes or keeps a request then fails, as over a broken network."""

    FAILING = frozenset({"finish_request", "renew_leases", "release_lease", "heartbeat"})

    def __init__(self, store: Store) -> None:
        self.inner = store
        self.cut = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in self.FAILING:
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.cut:
                raise StorageError(f"{name} failed: could not connect to the database")
            return await attr(*args, **kwargs)

        return call


async def _closed_row(url: str, request_id: str, timeout: float = 10.0) -> tuple[str, str]:
    """The request's row once it is no longer in flight (or as it is after `timeout`)."""
    with anyio.move_on_after(timeout):
        while (row := await _request_row(url, request_id))[0] == "in_flight":
            await anyio.sleep(0.05)
        return row
    return await _request_row(url, request_id)


async def _request_row(url: str, request_id: str) -> tuple[str, str]:
    store = await open_store(url)
    try:
        assert isinstance(store, SQLStore)
        [(status, detail)] = await store.database.transaction(
            "look",
            lambda c: c.execute("SELECT status, detail FROM requests WHERE request_id = ?", (request_id,)).fetchall(),
        )
        return status, detail
    finally:
        await store.aclose()


async def _history(url: str, thread: ThreadKey) -> list[tuple[str, str]]:
    store = await open_store(url)
    try:
        return [(m.role, m.content) for m in await store.load_history(thread)]
    finally:
        await store.aclose()


async def test_an_answer_delivered_but_not_recorded_is_left_alone_by_the_takeover(slack, ai, database_url):
    """replica-a delivers its answer while cut off from storage, so the request looks
    abandoned once its lease lapses. replica-b takes it over, finds the receipt in the
    message's metadata, leaves the answer on screen and records it from what Slack shows."""
    ai.enqueue(Behaviour(text="the answer you already read", latency=0.3))
    fast = {"replica_timeout_seconds": 1.0}
    store = await open_store(database_url)
    cut = CutOff(store)
    try:
        async with running_bot(slack, ai, store=cut, replica_id="replica-a", **fast) as a:
            _, ev = await send_dm(slack, "please answer")
            await eventually(lambda: bool(a.active), timeout=10)
            [state] = a.active.values()
            cut.cut = True  # before the answer is recorded
            await eventually(lambda: state.request_id in a.unrecorded, timeout=10)
            ts = state.placeholder_ts
            assert "the answer you already read" in slack.visible_text("D1", ts)
            async with replicas(slack, ai, database_url, ["replica-b"], **fast):
                for _ in range(100):
                    status, detail = await _request_row(database_url, state.request_id)
                    if status != "in_flight":
                        break
                    await anyio.sleep(0.1)
                assert status == "answered", detail
                assert "taken over by replica-b, recorded from its receipt in Slack" in detail
                assert "the answer you already read" in slack.visible_text("D1", ts)  # not the notice
                assert INTERRUPTED_NOTICE not in slack.visible_text("D1", ts)
                history = await _history(database_url, ThreadKey("D1", ev["ts"]))
                assert history[0] == ("user", "please answer")
                assert history[1][0] == "assistant" and "the answer you already read" in history[1][1]
                # replica-a reaches storage again: its late recording finds the request closed.
                cut.cut = False
                await eventually(lambda: not a.unrecorded, timeout=10)
                assert (await _request_row(database_url, state.request_id))[0] == "answered"
    finally:
        await store.aclose()


async def test_a_replica_records_its_own_unrecorded_outcome_once_storage_is_back(slack, ai, database_url):
    """Cut off from storage only while the answer went out: the replica keeps the outcome
    and records it itself under a new lease, and never takes its own request over."""
    ai.enqueue(Behaviour(text="answered in a storage blip", latency=0.3))
    store = await open_store(database_url)
    cut = CutOff(store)
    try:
        async with running_bot(slack, ai, store=cut, replica_id="replica-a", replica_timeout_seconds=1.0) as a:
            _, ev = await send_dm(slack, "blip?")
            await eventually(lambda: bool(a.active), timeout=10)
            [state] = a.active.values()
            cut.cut = True
            await eventually(lambda: state.request_id in a.unrecorded, timeout=10)
            await anyio.sleep(0.5)  # a blip shorter than LATE_ATTEMPTS sweeps
            cut.cut = False
            await eventually(lambda: not a.unrecorded, timeout=10)
            for _ in range(100):
                status, detail = await _request_row(database_url, state.request_id)
                if status != "in_flight":
                    break
                await anyio.sleep(0.1)
            assert status == "answered" and "taken over" not in detail
            assert INTERRUPTED_NOTICE not in slack.visible_text("D1", state.placeholder_ts)
            assert [role for role, _ in await _history(database_url, ThreadKey("D1", ev["ts"]))] == [
                "user",
                "assistant",
            ]
    finally:
        await store.aclose()


class SlowBeat:
    """A replica's store whose heartbeat, once begun, cannot be cancelled and takes a
    while, as a worker-thread call to a slow database does."""

    def __init__(self, store: Store) -> None:
        self.inner = store
        self.beats = 0
        self.beating = anyio.Event()  # a heartbeat after the start-up's is on its way

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def heartbeat(self, replica: str) -> None:
        self.beats += 1
        if self.beats > 1:
            self.beating.set()
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.5)  # (longer than the shutdown of an idle replica)
            await self.inner.heartbeat(replica)


async def test_a_replica_that_stops_leaves_no_heartbeat_even_with_one_on_the_way(slack, ai, database_url):
    """Stopped while a heartbeat is on its way: the heartbeat ends before the row is
    removed, so no fresh row is left for the others to count as a live replica (they
    would keep splitting Slack's budgets with it for REPLICA_TIMEOUT_SECONDS)."""
    store = await open_store(database_url)
    slow = SlowBeat(store)
    try:
        async with running_bot(slack, ai, store=slow, replica_id="replica-a", replica_timeout_seconds=1.0):
            with anyio.fail_after(5):
                await slow.beating.wait()
        assert "replica-a" not in await store.replicas()
    finally:
        await store.aclose()


class Unreachable(CutOff):
    """Cut off entirely: claiming events and taking leases fail too."""

    FAILING = CutOff.FAILING | {"claim_event", "acquire_lease"}


async def test_a_replica_cut_off_from_storage_says_so_once(slack, ai, database_url, monkeypatch):
    monkeypatch.setattr("bot.nursery.STORAGE_NOTE_GRACE", 0.3)
    store = await open_store(database_url)
    cut = Unreachable(store)
    try:
        async with running_bot(slack, ai, store=cut, replica_id="replica-a") as a:
            cut.cut = True
            _, ev = await send_dm(slack, "anyone there?")
            await slack.wait_until(lambda: slack.bot_replies("D1", ev["ts"]) == [STORAGE_DOWN_NOTICE], timeout=10)
            assert a.outcomes == {"error": 1} and ai.requests == []
    finally:
        await store.aclose()


async def test_a_replica_cut_off_from_storage_keeps_quiet_when_another_answers(slack, ai, database_url, monkeypatch):
    """The mention's twin (or a redelivery) lands on the replica cut off from storage: it
    cannot know another replica has the message, but a moment later the thread shows it."""
    monkeypatch.setattr("bot.nursery.STORAGE_NOTE_GRACE", 0.5)
    ai.enqueue(Behaviour(text="answered by the healthy one", latency=0.2))
    store = await open_store(database_url)
    cut = Unreachable(store)
    try:
        async with (
            running_bot(slack, ai, store=cut, replica_id="replica-a") as a,
            replicas(slack, ai, database_url, ["replica-b"]) as ([b], _),
        ):
            cut.cut = True
            _, ev = await send_dm(slack, "twice delivered")
            await slack.send_event(ev, retry_attempt=1)  # round robin: one on each replica
            await slack.wait_until(
                lambda: "answered by the healthy one" in " ".join(slack.bot_replies("D1", ev["ts"])), timeout=10
            )
            await eventually(lambda: a.outcomes.get("duplicate", 0) == 1, timeout=10)
            assert STORAGE_DOWN_NOTICE not in slack.bot_replies("D1", ev["ts"])
            assert b.outcomes.get("answered") == 1
    finally:
        await store.aclose()


async def test_replicas_split_slacks_rate_limits_between_those_alive(slack, ai, database_url):
    fast = {"replica_timeout_seconds": 1.0}
    async with replicas(slack, ai, database_url, ["replica-a"], **fast) as ([a], _):
        limits = a.services.slack.limits
        assert limits.shared_by == 1
        async with replicas(slack, ai, database_url, ["replica-b"], **fast) as ([b], _):
            await eventually(lambda: limits.shared_by == 2 and b.services.slack.limits.shared_by == 2, timeout=10)
        await eventually(lambda: limits.shared_by == 1, timeout=10)  # b left cleanly: a has it all again


def _abandoned(n: int, *, streamed: bool = False, placeholder: bool = True) -> InFlightRequest:
    return InFlightRequest(
        f"r{n}",
        ThreadKey(f"D{n}", f"{n}.0"),
        f"{n}.5" if placeholder or streamed else "",
        float(n),
        "replica-gone",
        f"{n}.1",
        streamed,
    )


async def test_a_sweep_takes_what_its_budgets_let_out_now_and_leaves_the_rest_to_the_other_replicas():
    async with httpx2.AsyncClient() as client:
        _sweep_shares(SlackWebAPI(bot_token="xoxb-1", app_token="xapp-1", client=client))


def _sweep_shares(slack: SlackWebAPI) -> None:
    requests = [_abandoned(1, streamed=True), _abandoned(2, streamed=True), _abandoned(3), _abandoned(4)]
    assert _ours_now(slack, requests) == requests  # alone: it takes everything (at its own pace)
    slack.limits.share(2)
    stop = slack.limits.bucket("chat.stopStream")
    assert stop is not None and stop.available() == 1
    # Its half of the budgets lets out one chat.stopStream and two chat.update now: one
    # stream (stopped, then edited), and one of the others (read, then edited).
    assert [r.request_id for r in _ours_now(slack, requests)] == ["r1", "r3"]
    update = slack.limits.bucket("chat.update")
    assert update is not None
    while update.available():
        update.reserve()
    while stop.available():
        stop.reserve()
    # Nothing left in the budgets: one request all the same (every sweep makes progress).
    assert [r.request_id for r in _ours_now(slack, requests)] == ["r1"]
    # A request storage knows no placeholder of counts a chat.update all the same: it
    # was recorded before its post, which the takeover then mostly finds in the thread.
    assert [r.request_id for r in _ours_now(slack, [_abandoned(5), _abandoned(6, placeholder=False)])] == ["r5"]


class ScriptedRecords:
    """A store whose `request_record` answers from a script (a StorageError is raised),
    the last answer repeating; it counts the reads."""

    def __init__(self, *answers: RequestRecord | StorageError) -> None:
        self.answers = list(answers)
        self.reads = 0

    async def request_record(self, request_id: str) -> RequestRecord | None:
        self.reads += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, StorageError):
            raise answer
        return answer


class WithdrawCount:
    withdrawn = 0

    async def withdraw(self) -> None:
        self.withdrawn += 1


def _lost_request(store: ScriptedRecords) -> tuple[Any, RequestState]:
    msg = IncomingMessage("Ev1", "dm", "D1", "U1", "hi", "1.000100", "1.000100", in_existing_thread=False)
    state = RequestState(request_id="r1", message=msg, started_at=0.0, placeholder_ts="1.000300", lease_lost=True)
    return SimpleNamespace(store=store), state


IN_FLIGHT = RequestRecord("in_flight", "")


@pytest.mark.parametrize(
    ("answers", "reads", "withdrawn"),
    [
        ((RequestRecord("interrupted", "1.000300"),), 1, 0),  # the takeover edited it: left alone
        ((RequestRecord("interrupted", ""),), 1, 1),  # closed without it (its own notice): withdrawn
        ((RequestRecord("interrupted", "1.000200"),), 1, 1),  # closed naming another message: withdrawn
        ((IN_FLIGHT, IN_FLIGHT, RequestRecord("interrupted", "")), 3, 1),  # the takeover finished meanwhile
        ((IN_FLIGHT,), answer.WITHDRAW_CHECKS, 0),  # still undecided: left, and said
        ((StorageError("request_record failed: could not connect"),), 1, 0),  # cut off: left, and said
    ],
    ids=["kept", "closed-without-it", "closed-with-another", "waited-for", "undecided", "storage-down"],
)
async def test_a_request_that_lost_its_thread_withdraws_its_first_message_only_if_the_takeover_did_not_know_it(
    answers, reads, withdrawn, monkeypatch, caplog
):
    monkeypatch.setattr(answer, "WITHDRAW_PAUSE_SECONDS", 0.01)
    store = ScriptedRecords(*answers)
    services, state = _lost_request(store)
    surface = WithdrawCount()
    await answer._withdraw_if_orphaned(services, state, surface)
    assert (store.reads, surface.withdrawn) == (reads, withdrawn)
    if answers[-1] is IN_FLIGHT or isinstance(answers[-1], StorageError):
        assert "1.000300" in caplog.text and any(r.levelname == "WARNING" for r in caplog.records)
    assert state.final_write is None  # the bound it ran under is gone with it


async def test_the_wait_for_an_undecided_takeover_is_cut_short_by_a_shutdown():
    store = ScriptedRecords(IN_FLIGHT)
    services, state = _lost_request(store)
    surface = WithdrawCount()
    state.hurry(0.05)  # SIGTERM: its Slack writes (and this) have 0.05 s left
    with anyio.fail_after(answer.WITHDRAW_PAUSE_SECONDS):
        await answer._withdraw_if_orphaned(services, state, surface)
    assert store.reads == 1 and surface.withdrawn == 0
