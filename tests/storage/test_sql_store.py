"""The store's contract, on every engine (see conftest.py) and both Trio and asyncio."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime

import anyio
import pytest

from bot.storage import (
    HistoryMessage,
    InFlightRequest,
    RequestRecord,
    SQLStore,
    StorageError,
    StoreClosed,
    ThreadKey,
    UsageSummary,
    UsageTotal,
)
from bot.storage.sql_store import RENEW_BATCH
from tests.storage.conftest import Opener, lease, raw

pytestmark = pytest.mark.anyio

THREAD = ThreadKey("C1", "1700000000.000100")
OTHER = ThreadKey("C2", "1700000000.000200")


async def start(store: SQLStore, request_id: str, thread: ThreadKey = THREAD, started_at: float = 1.0) -> None:
    fence = await lease(store, thread)
    assert await store.start_request(
        request_id,
        thread,
        user_ts=f"u-{request_id}",
        placeholder_ts=f"p-{request_id}",
        started_at=started_at,
        owner="replica-a",
        fence=fence,
    )


async def finish(
    store: SQLStore, request_id: str, outcome: str = "answered", reply: str = "answer", fence: int | None = None
) -> bool:
    if fence is None:
        fences = await raw(store, "SELECT fence FROM requests WHERE request_id = ?", (request_id,))
        fence = fences[0][0] if fences else 1
    return await store.finish_request(
        request_id,
        fence=fence,
        outcome=outcome,
        user_text=f"question {request_id}",
        user_ts=f"u-{request_id}",
        reply_text=reply,
        finished_at=2.0,
        detail="" if outcome == "answered" else f"{outcome} detail",
    )


# -- events ----------------------------------------------------------------------------


async def test_claim_event_is_idempotent_and_survives_reopen(reopen: Opener) -> None:
    store = await reopen()
    assert await store.claim_event("Ev1") is True
    assert await store.claim_event("Ev1") is False
    assert await store.claim_event("C1:1700000000.000100") is True
    await store.aclose()

    reopened = await reopen()
    try:
        assert await reopened.claim_event("Ev1") is False  # dedupe survives a restart
        assert await reopened.claim_event("C1:1700000000.000100") is False
        assert await reopened.claim_event("Ev2") is True
    finally:
        await reopened.aclose()


async def test_concurrent_claims_of_one_key_have_exactly_one_winner(store: SQLStore) -> None:
    results: list[bool] = []

    async def claim() -> None:
        results.append(await store.claim_event("EvRace"))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(claim)
    assert sorted(results) == [False] * 9 + [True]


async def test_an_events_keys_are_claimed_together(store: SQLStore) -> None:
    # An app_mention and its `message` twin: different event ids, the same channel:ts.
    assert await store.claim_event("event:Ev1", "msg:C1:1.0") is True
    assert await store.claim_event("event:Ev2", "msg:C1:1.0") is False  # the twin
    assert await store.claim_event("event:Ev2") is False  # claimed all the same
    assert await store.claim_event("event:Ev3", "msg:C1:2.0") is True
    with pytest.raises(ValueError):
        await store.claim_event()

    results: list[bool] = []

    async def twin(event_id: str) -> None:
        results.append(await store.claim_event(f"event:{event_id}", "msg:C1:3.0"))

    async with anyio.create_task_group() as tg:
        for n in range(6):
            tg.start_soon(twin, f"Race{n}")
    assert sorted(results) == [False] * 5 + [True]


async def test_prune_events_forgets_only_old_claims(store: SQLStore) -> None:
    before = time.time()
    assert await store.claim_event("old")
    # Backdate one claim, as if it were a day old.
    await raw(store, "UPDATE events SET claimed_at = ? WHERE key = 'old' RETURNING key", (before - 86400,))
    assert await store.claim_event("new")

    assert await store.prune_events(before - 3600) == 1
    assert await store.prune_events(before - 3600) == 0
    assert await store.claim_event("old") is True  # forgotten, so claimable again
    assert await store.claim_event("new") is False  # kept


# -- threads and history ---------------------------------------------------------------


async def test_start_request_marks_thread_known(store: SQLStore) -> None:
    assert await store.thread_known(THREAD) is False
    await start(store, "r1")
    assert await store.thread_known(THREAD) is True
    assert await store.thread_known(OTHER) is False


async def test_history_is_oldest_first_and_only_answered_exchanges_are_in_context(store: SQLStore) -> None:
    for n, outcome in enumerate(["answered", "timeout", "answered", "error", "interrupted"]):
        await start(store, f"r{n}", started_at=float(n))
        await finish(store, f"r{n}", outcome=outcome, reply=f"reply {n}")

    assert await store.load_history(THREAD) == [
        HistoryMessage("user", "question r0", "u-r0"),
        HistoryMessage("assistant", "reply 0", "p-r0"),
        HistoryMessage("user", "question r2", "u-r2"),
        HistoryMessage("assistant", "reply 2", "p-r2"),
    ]
    assert await store.load_history(OTHER) == []
    # The failed exchanges are kept for the record, out of context, with their outcome.
    assert await raw(
        store,
        "SELECT m.role, m.content, m.in_context, r.status, r.detail FROM messages m"
        " JOIN requests r USING (request_id) WHERE r.status != 'answered' ORDER BY m.id",
    ) == [
        ("user", "question r1", 0, "timeout", "timeout detail"),
        ("assistant", "reply 1", 0, "timeout", "timeout detail"),
        ("user", "question r3", 0, "error", "error detail"),
        ("assistant", "reply 3", 0, "error", "error detail"),
        ("user", "question r4", 0, "interrupted", "interrupted detail"),
        ("assistant", "reply 4", 0, "interrupted", "interrupted detail"),
    ]


async def test_empty_reply_stores_only_the_user_message(store: SQLStore) -> None:
    await start(store, "r1")
    await finish(store, "r1", outcome="error", reply="")
    assert await raw(store, "SELECT role, content FROM messages") == [("user", "question r1")]


async def test_finish_request_twice_is_a_no_op(store: SQLStore) -> None:
    await start(store, "r1")
    await finish(store, "r1", outcome="answered", reply="first")
    await finish(store, "r1", outcome="error", reply="second")

    assert await store.load_history(THREAD) == [
        HistoryMessage("user", "question r1", "u-r1"),
        HistoryMessage("assistant", "first", "p-r1"),
    ]
    assert await raw(store, "SELECT COUNT(*) FROM messages") == [(2,)]
    assert await raw(store, "SELECT status, finished_at FROM requests") == [("answered", 2.0)]


async def test_finish_unknown_request_changes_nothing(store: SQLStore) -> None:
    await finish(store, "nope")
    assert await raw(store, "SELECT COUNT(*) FROM messages") == [(0,)]
    assert await raw(store, "SELECT COUNT(*) FROM requests") == [(0,)]


async def test_finish_request_rejects_an_unknown_outcome(store: SQLStore) -> None:
    await start(store, "r1")
    with pytest.raises(ValueError, match="outcome"):
        await finish(store, "r1", outcome="exploded")
    assert [r.request_id for r in await store.in_flight()] == ["r1"]


async def test_import_history_seeds_unknown_thread_once(store: SQLStore) -> None:
    imported = [HistoryMessage("user", "hi", "1.1"), HistoryMessage("assistant", "hello", "1.2")]
    await store.import_history(THREAD, imported)
    assert await store.thread_known(THREAD) is True
    assert await store.load_history(THREAD) == imported

    # A second import (e.g. a concurrent rebuild) must not duplicate anything.
    await store.import_history(THREAD, [HistoryMessage("user", "other", "9.9")])
    assert await store.load_history(THREAD) == imported

    # New exchanges append after the imported history.
    await start(store, "r1")
    await finish(store, "r1")
    assert [m.content for m in await store.load_history(THREAD)] == ["hi", "hello", "question r1", "answer"]


async def test_import_history_is_a_no_op_when_the_thread_has_history(store: SQLStore) -> None:
    await start(store, "r1")
    await finish(store, "r1")
    await store.import_history(THREAD, [HistoryMessage("user", "from slack", "0.1")])
    assert [m.content for m in await store.load_history(THREAD)] == ["question r1", "answer"]


async def test_import_empty_history_marks_thread_known(store: SQLStore) -> None:
    await store.import_history(OTHER, [])
    assert await store.thread_known(OTHER) is True
    assert await store.load_history(OTHER) == []


# -- in-flight requests ----------------------------------------------------------------


async def test_in_flight_lists_unfinished_requests_oldest_first(store: SQLStore) -> None:
    await start(store, "late", started_at=20.0)
    await start(store, "early", thread=OTHER, started_at=10.0)
    await start(store, "done", started_at=5.0)
    await finish(store, "done")

    assert await store.in_flight() == [
        InFlightRequest("early", OTHER, "p-early", 10.0, "replica-a", "u-early"),
        InFlightRequest("late", THREAD, "p-late", 20.0, "replica-a", "u-late"),
    ]
    await finish(store, "early", outcome="interrupted")
    assert [r.request_id for r in await store.in_flight()] == ["late"]


async def test_a_request_opened_as_a_native_stream_is_listed_as_one(store: SQLStore) -> None:
    fence = await lease(store, THREAD)
    assert await store.start_request(
        "streamed",
        THREAD,
        user_ts="u-streamed",
        placeholder_ts="p-streamed",
        started_at=1.0,
        owner="replica-a",
        fence=fence,
        streamed=True,
    )
    await start(store, "posted", thread=OTHER, started_at=2.0)
    assert [(r.request_id, r.streamed) for r in await store.in_flight()] == [("streamed", True), ("posted", False)]
    # replica-a has no heartbeat: both are abandoned, and the takeover knows which one streams.
    abandoned = await store.abandoned_requests(replica_timeout=30.0)
    assert [(r.request_id, r.streamed) for r in abandoned] == [("streamed", True), ("posted", False)]


async def test_a_request_recorded_before_its_placeholder_gets_it_once(store: SQLStore) -> None:
    fence = await lease(store, THREAD)
    assert await store.start_request(
        "r1", THREAD, user_ts="u-r1", placeholder_ts="", started_at=1.0, owner="replica-a", fence=fence
    )
    assert [r.placeholder_ts for r in await store.in_flight()] == [""]  # recorded before anything is posted
    assert await store.record_placeholder("r1", "p-r1", fence=fence, streamed=True) is True
    assert await store.in_flight() == [InFlightRequest("r1", THREAD, "p-r1", 1.0, "replica-a", "u-r1", streamed=True)]
    assert await store.record_placeholder("r1", "p-other", fence=fence) is False  # write-once
    assert await store.record_placeholder("nope", "p-x", fence=fence) is False
    assert [r.placeholder_ts for r in await store.in_flight()] == ["p-r1"]
    await finish(store, "r1")
    assert await store.record_placeholder("r1", "p-late", fence=fence) is False  # closed
    assert await store.load_history(THREAD) == [
        HistoryMessage("user", "question r1", "u-r1"),
        HistoryMessage("assistant", "answer", "p-r1"),
    ]


async def test_record_placeholder_is_fenced_by_the_lease(store: SQLStore) -> None:
    old = await lease(store, THREAD)
    assert await store.start_request(
        "r1", THREAD, user_ts="u-r1", placeholder_ts="", started_at=1.0, owner="replica-a", fence=old
    )
    await raw(store, "UPDATE thread_leases SET expires_at = 0 RETURNING token")  # replica-a paused past its lease
    assert await store.acquire_lease(THREAD, "replica-b", ttl=60) == old + 1
    assert await store.record_placeholder("r1", "p-r1", fence=old) is False
    assert [r.placeholder_ts for r in await store.in_flight()] == [""]


async def test_request_record_says_what_a_takeover_left_of_a_request(store: SQLStore) -> None:
    """What a request that lost its thread reads to learn whether the takeover knew of
    its first message: its status, and the first message storage holds."""
    old = await lease(store, THREAD)
    for rid in ("r1", "r2"):
        assert await store.start_request(
            rid, THREAD, user_ts=f"u-{rid}", placeholder_ts="", started_at=1.0, owner="replica-a", fence=old
        )
    assert await store.request_record("r1") == RequestRecord("in_flight", "")
    assert await store.request_record("nope") is None
    await raw(store, "UPDATE thread_leases SET expires_at = 0 RETURNING token")  # replica-a paused past its lease
    new = await store.acquire_lease(THREAD, "replica-b", ttl=60)
    assert new == old + 1
    for rid, found in (("r1", "p-r1"), ("r2", "")):  # r1's message found in the thread; r2's not
        assert await store.finish_request(
            rid,
            fence=new,
            outcome="interrupted",
            user_text="",
            user_ts="",
            reply_text="",
            finished_at=2.0,
            detail="taken over",
            placeholder_ts=found,
        )
    assert await store.request_record("r1") == RequestRecord("interrupted", "p-r1")
    assert await store.request_record("r2") == RequestRecord("interrupted", "")


async def test_finish_request_gives_a_request_without_one_its_placeholder(store: SQLStore) -> None:
    fence = await lease(store, THREAD)
    for rid, recorded in (("r1", ""), ("r2", "p-r2")):
        assert await store.start_request(
            rid, THREAD, user_ts=f"u-{rid}", placeholder_ts=recorded, started_at=1.0, owner="a", fence=fence
        )
        assert await store.finish_request(
            rid,
            fence=fence,
            outcome="answered",
            user_text="q",
            user_ts=f"u-{rid}",
            reply_text=f"answer {rid}",
            finished_at=2.0,
            placeholder_ts=f"given-{rid}",
        )
    # One recorded earlier stays (it is the message the takeover would have fixed).
    assert [(m.content, m.ts) for m in await store.load_history(THREAD) if m.role == "assistant"] == [
        ("answer r1", "given-r1"),
        ("answer r2", "p-r2"),
    ]
    assert await raw(store, "SELECT placeholder_ts FROM requests ORDER BY request_id") == [("given-r1",), ("p-r2",)]


async def test_in_flight_survives_a_crash(reopen: Opener) -> None:
    store = await reopen()
    await start(store, "r1", started_at=3.0)
    await store.aclose()  # the process "dies" without finishing r1

    reopened = await reopen()
    try:
        assert await reopened.in_flight() == [InFlightRequest("r1", THREAD, "p-r1", 3.0, "replica-a", "u-r1")]
        assert await reopened.thread_known(THREAD) is True
        await finish(reopened, "r1", outcome="interrupted", reply="")
        assert await reopened.in_flight() == []
        assert await reopened.load_history(THREAD) == []  # not answered: out of context
    finally:
        await reopened.aclose()


async def test_duplicate_start_request_raises_storage_error(store: SQLStore) -> None:
    await start(store, "r1")
    with pytest.raises(StorageError, match="start_request failed"):
        await start(store, "r1")
    assert len(await store.in_flight()) == 1  # the store is still usable


# -- lifecycle ------------------------------------------------------------------------


async def test_calls_after_aclose_raise_store_closed(reopen: Opener) -> None:
    store = await reopen()
    await store.aclose()
    await store.aclose()  # idempotent
    with pytest.raises(StoreClosed):
        await store.claim_event("Ev1")
    with pytest.raises(StoreClosed):
        await store.load_history(THREAD)
    with pytest.raises(StoreClosed):
        await store.in_flight()
    assert issubclass(StoreClosed, RuntimeError) and issubclass(StorageError, RuntimeError)


# -- cancellation: all or nothing --------------------------------------------------------


async def exchange_state(store: SQLStore) -> tuple[str, int]:
    """(status of r1, number of its messages) straight from the tables."""
    [(status,)] = await raw(store, "SELECT status FROM requests WHERE request_id = 'r1'")
    [(count,)] = await raw(store, "SELECT COUNT(*) FROM messages WHERE request_id = 'r1'")
    return status, int(count)


async def assert_whole_or_nothing(store: SQLStore) -> tuple[str, int]:
    state = await exchange_state(store)
    assert state in {("in_flight", 0), ("answered", 2)}, f"half-done exchange: {state}"
    return state


async def test_cancel_before_finish_runs_leaves_nothing_half_done(store: SQLStore) -> None:
    await start(store, "r1")
    fence = await lease(store, THREAD)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await finish(store, "r1", fence=fence)
    assert scope.cancelled_caught
    assert await assert_whole_or_nothing(store) == ("in_flight", 0)
    # The request can still be finished afterwards, exactly once.
    await finish(store, "r1")
    assert await assert_whole_or_nothing(store) == ("answered", 2)


async def test_move_on_after_zero_leaves_nothing_half_done(store: SQLStore) -> None:
    await start(store, "r1")
    fence = await lease(store, THREAD)
    with anyio.move_on_after(0):
        await finish(store, "r1", fence=fence)
    await assert_whole_or_nothing(store)
    await finish(store, "r1")  # whichever way it went, finishing again completes it once
    assert await exchange_state(store) == ("answered", 2)
    assert len(await store.load_history(THREAD)) == 2


# -- replicas: leases, fencing, heartbeats ------------------------------------------------


async def test_a_lease_is_exclusive_until_released_and_tokens_only_grow(store: SQLStore) -> None:
    first = await store.acquire_lease(THREAD, "replica-a", ttl=60)
    assert first == 1
    assert await store.acquire_lease(THREAD, "replica-b", ttl=60) is None  # held: refused at once
    assert await store.acquire_lease(OTHER, "replica-b", ttl=60) == 1  # other threads are independent
    await store.release_lease(THREAD, first)
    second = await store.acquire_lease(THREAD, "replica-b", ttl=60)
    assert second == 2
    await store.release_lease(THREAD, first)  # a stale release changes nothing
    assert await store.acquire_lease(THREAD, "replica-a", ttl=60) is None


async def test_leases_are_renewed_together_and_only_the_ones_still_held(store: SQLStore) -> None:
    """One call renews any number of leases (more than one UPDATE's worth here): the
    ones still held under the token given are renewed and returned; a lease released,
    taken by another holder since, or never taken is not."""
    threads = [ThreadKey("C9", f"1700000000.{i:06d}") for i in range(RENEW_BATCH * 2 + 50)]
    tokens = {t: await store.acquire_lease(t, "replica-a", ttl=5) for t in threads}
    released, taken, never = threads[3], threads[RENEW_BATCH + 1], ThreadKey("C9", "1800000000.000000")
    await store.release_lease(released, tokens[released])
    await raw(
        store,
        "UPDATE thread_leases SET expires_at = 0 WHERE channel = ? AND thread_ts = ? RETURNING token",
        (taken.channel, taken.thread_ts),
    )
    assert await store.acquire_lease(taken, "replica-b", ttl=60) == tokens[taken] + 1
    asked = [(t, tokens[t]) for t in threads] + [(never, 1)]
    renewed = await store.renew_leases(asked, ttl=600)
    assert renewed == set(threads) - {released, taken}
    [(now,)] = await raw(store, "SELECT bot_now()")
    leases = {
        ThreadKey(c, ts): (owner, expires)
        for c, ts, owner, expires in await raw(store, "SELECT channel, thread_ts, owner, expires_at FROM thread_leases")
    }
    assert all(leases[t][1] > now + 590 for t in renewed)  # (they were taken for 5 s)
    assert leases[released] == ("", 0)  # still released
    assert leases[taken][0] == "replica-b" and leases[taken][1] < now + 61  # still the other's, as it was
    assert never not in leases  # nothing created
    assert await store.renew_leases([], ttl=600) == set()


async def test_an_expired_lease_passes_on_and_its_old_holder_is_fenced_off(store: SQLStore) -> None:
    old = await store.acquire_lease(THREAD, "replica-a", ttl=0)  # expires at once, by the database's clock
    assert old is not None
    assert (
        await store.start_request(
            "r1", THREAD, user_ts="u1", placeholder_ts="p1", started_at=1.0, owner="replica-a", fence=old
        )
        is False
    )  # an expired lease does not start a request
    assert await store.renew_leases([(THREAD, old)], ttl=60) == {THREAD}  # nobody took it meanwhile: renewable
    assert await store.start_request(
        "r1", THREAD, user_ts="u1", placeholder_ts="p1", started_at=1.0, owner="replica-a", fence=old
    )
    await raw(store, "UPDATE thread_leases SET expires_at = 0 RETURNING token")  # replica-a paused past its lease
    new = await store.acquire_lease(THREAD, "replica-b", ttl=60)
    assert new is not None and new > old
    assert await store.renew_leases([(THREAD, old)], ttl=60) == set()  # lost for good

    # The old holder wakes up and tries to close its request: nothing changes.
    assert await finish(store, "r1", fence=old) is False
    assert [r.request_id for r in await store.in_flight()] == ["r1"]
    assert await store.load_history(THREAD) == []
    assert not await store.start_request(
        "r2", THREAD, user_ts="u2", placeholder_ts="p2", started_at=2.0, owner="replica-a", fence=old
    )
    # The new owner can close it (taking it over).
    assert await finish(store, "r1", outcome="interrupted", reply="", fence=new) is True
    assert await store.in_flight() == []


async def test_concurrent_acquires_of_one_thread_have_exactly_one_winner(store: SQLStore) -> None:
    tokens: list[int | None] = []

    async def take(owner: str) -> None:
        tokens.append(await store.acquire_lease(THREAD, owner, ttl=60))

    async with anyio.create_task_group() as tg:
        for n in range(8):
            tg.start_soon(take, f"replica-{n}")
    assert sorted(tokens, key=lambda t: t is not None) == [None] * 7 + [1]


async def test_two_stores_on_one_database_see_each_others_claims_and_leases(reopen: Opener) -> None:
    a, b = await reopen(), await reopen()  # two replicas
    try:
        results: list[bool] = []

        async def claim(store: SQLStore) -> None:
            results.append(await store.claim_event("Ev-redelivered"))

        async with anyio.create_task_group() as tg:
            for store in (a, b, a, b):
                tg.start_soon(claim, store)
        assert sorted(results) == [False, False, False, True]

        token = await a.acquire_lease(THREAD, "replica-a", ttl=60)
        assert token is not None
        assert await b.acquire_lease(THREAD, "replica-b", ttl=60) is None
        await a.release_lease(THREAD, token)
        assert await b.acquire_lease(THREAD, "replica-b", ttl=60) == token + 1
    finally:
        await a.aclose()
        await b.aclose()


async def test_heartbeats_and_abandoned_requests(store: SQLStore) -> None:
    await store.heartbeat("replica-a")
    await store.heartbeat("replica-b")
    ages = await store.replicas()
    assert set(ages) == {"replica-a", "replica-b"} and all(0 <= age < 5 for age in ages.values())

    a_token = await lease(store, THREAD, "replica-a")
    b_token = await lease(store, OTHER, "replica-b")
    for request_id, thread, owner, fence in (("ra", THREAD, "replica-a", a_token), ("rb", OTHER, "replica-b", b_token)):
        assert await store.start_request(
            request_id, thread, user_ts="u", placeholder_ts=f"p-{request_id}", started_at=1.0, owner=owner, fence=fence
        )
    assert await store.abandoned_requests(replica_timeout=30) == []  # both alive, both leases valid

    # replica-b stops beating (killed): its request is abandoned once the timeout passes.
    await raw(store, "UPDATE replicas SET heartbeat_at = heartbeat_at - 100 WHERE replica_id = 'replica-b' RETURNING 1")
    assert [r.request_id for r in await store.abandoned_requests(replica_timeout=30)] == ["rb"]
    # A request whose lease lapsed is abandoned too, even if its replica still beats.
    await raw(store, "UPDATE thread_leases SET expires_at = 0 WHERE owner = 'replica-a' RETURNING 1")
    assert [r.request_id for r in await store.abandoned_requests(replica_timeout=30)] == ["ra", "rb"]

    await store.forget_replica("replica-b")
    assert set(await store.replicas()) == {"replica-a"}


async def test_a_restarted_replica_takes_back_its_own_leases_at_once(store: SQLStore) -> None:
    old = await store.acquire_lease(THREAD, "replica-a", ttl=600)  # then replica-a is killed
    assert old is not None
    assert await store.acquire_lease(THREAD, "replica-b", ttl=600) is None  # others wait for the expiry
    new = await store.acquire_lease(THREAD, "replica-a", ttl=600)  # replica-a, restarted
    assert new is not None and new > old
    assert await store.renew_leases([(THREAD, old)], ttl=600) == set()  # the dead run is fenced off


# -- usage ------------------------------------------------------------------------------

# 2026-03-31 23:59:59 and 2026-04-01 00:00:00 UTC: the last second of March, the first of April.
END_OF_MARCH = datetime(2026, 3, 31, 23, 59, 59, tzinfo=UTC).timestamp()
START_OF_APRIL = END_OF_MARCH + 1
MARCH = (date(2026, 3, 1), date(2026, 4, 1))
APRIL = (date(2026, 4, 1), date(2026, 5, 1))


async def test_usage_adds_up_per_day_user_model_and_outcome(store: SQLStore) -> None:
    await store.record_usage("U1", "gpt-5-mini", "answered", 100, 20, at=END_OF_MARCH)
    await store.record_usage("U1", "gpt-5-mini", "answered", 50, 5, at=END_OF_MARCH - 3600)
    await store.record_usage("U1", "gpt-5-mini", "timeout", 70, 0, at=END_OF_MARCH)
    await store.record_usage("U1", "gpt-4o", "answered", 10, 1, at=END_OF_MARCH)
    await store.record_usage("U2", "gpt-5-mini", "answered", 1000, 300, at=END_OF_MARCH)
    await store.record_usage("U1", "gpt-5-mini", "answered", 7, 3, at=START_OF_APRIL)  # next month

    # One row per (day, user, model, outcome), each holding the sums.
    rows = await raw(
        store,
        "SELECT day, user_id, model, outcome, requests, tokens_in, tokens_out FROM usage_daily"
        " ORDER BY day, user_id, model, outcome",
    )
    assert [tuple(int(v) if not isinstance(v, str) else v for v in row) for row in rows] == [
        ("2026-03-31", "U1", "gpt-4o", "answered", 1, 10, 1),
        ("2026-03-31", "U1", "gpt-5-mini", "answered", 2, 150, 25),
        ("2026-03-31", "U1", "gpt-5-mini", "timeout", 1, 70, 0),
        ("2026-03-31", "U2", "gpt-5-mini", "answered", 1, 1000, 300),
        ("2026-04-01", "U1", "gpt-5-mini", "answered", 1, 7, 3),
    ]

    # Per user and model, every outcome together, the most tokens first.
    assert await store.usage_totals(*MARCH) == [
        UsageTotal("U2", "gpt-5-mini", requests=1, tokens_in=1000, tokens_out=300),
        UsageTotal("U1", "gpt-5-mini", requests=3, tokens_in=220, tokens_out=25),
        UsageTotal("U1", "gpt-4o", requests=1, tokens_in=10, tokens_out=1),
    ]
    assert await store.usage_totals(*APRIL) == [UsageTotal("U1", "gpt-5-mini", 1, 7, 3)]
    assert await store.user_usage("U1", *MARCH) == UsageSummary(requests=4, tokens_in=230, tokens_out=26)
    assert (await store.user_usage("U1", *MARCH)).tokens == 256
    assert await store.user_usage("U1", *APRIL) == UsageSummary(1, 7, 3)
    assert await store.workspace_usage(*MARCH) == UsageSummary(requests=5, tokens_in=1230, tokens_out=326)
    # The bounds are days, `until` excluded.
    assert await store.workspace_usage(date(2026, 3, 31), date(2026, 3, 31)) == UsageSummary()
    assert await store.workspace_usage(date(2026, 3, 31), date(2026, 4, 2)) == UsageSummary(6, 1237, 329)


async def test_a_second_model_of_one_request_adds_tokens_and_no_request(store: SQLStore) -> None:
    await store.record_usage("U1", "gpt-5-mini", "answered", 100, 20, at=END_OF_MARCH)
    await store.record_usage("U1", "gpt-image", "answered", 50, 272, at=END_OF_MARCH, requests=0)  # it drew
    assert await store.usage_totals(*MARCH) == [
        UsageTotal("U1", "gpt-image", requests=0, tokens_in=50, tokens_out=272),
        UsageTotal("U1", "gpt-5-mini", requests=1, tokens_in=100, tokens_out=20),
    ]
    assert await store.user_usage("U1", *MARCH) == UsageSummary(requests=1, tokens_in=150, tokens_out=292)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            await store.record_usage("U1", "m", "answered", 1, 1, at=END_OF_MARCH, requests=bad)


async def test_no_usage_reads_as_zero(store: SQLStore) -> None:
    assert await store.usage_totals(*MARCH) == []
    assert await store.user_usage("U1", *MARCH) == UsageSummary(0, 0, 0)
    assert await store.workspace_usage(*MARCH) == UsageSummary(0, 0, 0)


async def test_bad_usage_is_refused_whole(store: SQLStore) -> None:
    for outcome, tokens_in, tokens_out in (("", 1, 1), ("x" * 41, 1, 1), ("answered", -1, 0), ("answered", 1, 2.5)):
        with pytest.raises(ValueError):
            await store.record_usage("U1", "m", outcome, tokens_in, tokens_out, at=END_OF_MARCH)
    assert await store.workspace_usage(*MARCH) == UsageSummary()


async def test_replicas_recording_at_once_lose_nothing(reopen: Opener) -> None:
    """The upsert adds in the database: 2 stores (replicas) × 20 concurrent requests of one
    user, model and day, all in one row, none lost."""
    a, b = await reopen(), await reopen()
    try:

        async def record(store: SQLStore, n: int) -> None:
            await store.record_usage("U1", "gpt-5-mini", "answered", n, 1, at=END_OF_MARCH)

        async with anyio.create_task_group() as tg:
            for n in range(1, 21):
                tg.start_soon(record, a if n % 2 else b, n)
        assert await a.user_usage("U1", *MARCH) == UsageSummary(requests=20, tokens_in=210, tokens_out=20)
        assert await b.usage_totals(*MARCH) == [UsageTotal("U1", "gpt-5-mini", 20, 210, 20)]
    finally:
        await a.aclose()
        await b.aclose()


async def test_usage_survives_a_restart(reopen: Opener) -> None:
    store = await reopen()
    await store.record_usage("U1", "gpt-5-mini", "answered", 5, 6, at=END_OF_MARCH)
    await store.aclose()
    store = await reopen()
    try:
        assert await store.user_usage("U1", *MARCH) == UsageSummary(1, 5, 6)
    finally:
        await store.aclose()


async def test_a_database_from_before_usage_is_upgraded_in_place(engine: str, db_path: str) -> None:
    """A database at the schema before the usage table (on either engine) keeps its data
    and gets the table at open."""
    if engine == "postgres":
        import psycopg

        from bot.storage.postgres import MIGRATIONS as PG_MIGRATIONS
        from bot.storage.postgres import open_postgres
        from tests.postgres import fresh_database

        before = next(i for i, script in enumerate(PG_MIGRATIONS) if "CREATE TABLE usage_daily" in script)
        databases = fresh_database()
        url = next(databases)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ)")
            for number in range(before):
                conn.execute(PG_MIGRATIONS[number])
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (number + 1,))
            conn.execute(
                "INSERT INTO preferences (scope, scope_key, prefs, updated_at) VALUES ('user', 'U1', '{\"a\": 1}', 0)"
            )
        try:
            store = await open_postgres(url, pool_size=2)
            try:
                await check_upgraded(store)
                versions = await raw(store, "SELECT max(version) FROM schema_migrations")
                assert versions == [(len(PG_MIGRATIONS),)]
            finally:
                await store.aclose()
        finally:
            databases.close()
        return

    import os
    import sqlite3

    from bot.storage.sqlite import MIGRATIONS, open_sqlite

    before = next(i for i, script in enumerate(MIGRATIONS) if "CREATE TABLE usage_daily" in script)
    os.makedirs(os.path.dirname(db_path), exist_ok=True)
    conn = sqlite3.connect(db_path)
    for script in MIGRATIONS[:before]:
        conn.executescript(script)
    conn.execute("INSERT INTO preferences (scope, scope_key, prefs, updated_at) VALUES ('user', 'U1', '{\"a\": 1}', 0)")
    conn.execute(f"PRAGMA user_version={before}")
    conn.commit()
    conn.close()
    store = await open_sqlite(db_path, inline=engine == "sqlite-inline")
    try:
        await check_upgraded(store)
        assert await raw(store, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    finally:
        await store.aclose()


async def check_upgraded(store: SQLStore) -> None:
    assert (await store.load_preferences("U1", None)).user == {"a": 1}  # kept
    assert await store.workspace_usage(*MARCH) == UsageSummary()
    await store.record_usage("U1", "gpt-5-mini", "answered", 3, 4, at=END_OF_MARCH)
    await store.record_usage("U1", "gpt-5-mini", "answered", 3, 4, at=END_OF_MARCH)
    assert await store.user_usage("U1", *MARCH) == UsageSummary(2, 6, 8)
