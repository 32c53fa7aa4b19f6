"""Thread gates: one request per thread in a process (the limiter) and across replicas
(the lease in storage), on both Trio and asyncio."""

from __future__ import annotations

from contextlib import AsyncExitStack

import anyio
import pytest

from bot.storage import SQLStore, StorageError, ThreadKey
from bot.storage.sqlite import open_sqlite
from bot.thread_gates import ThreadGates

pytestmark = pytest.mark.anyio

T = ThreadKey("C1", "1.0")


@pytest.fixture
async def store(tmp_path):
    s = await open_sqlite(str(tmp_path / "bot.db"))
    yield s
    await s.aclose()


async def test_gate_admits_one_and_refuses_the_second_at_once(store: SQLStore):
    gates = ThreadGates(store, owner="r1")
    async with gates.try_enter(T) as first:
        assert first is not None and first.fence == 1 and gates.busy(T)
        async with gates.try_enter(T) as second:
            assert second is None
        async with gates.try_enter(ThreadKey("C1", "2.0")) as other:
            assert other is not None  # another thread is independent
    assert not gates.busy(T)
    assert gates.prune() == 2 and len(gates) == 0


async def test_gate_is_released_when_the_holder_is_cancelled(store: SQLStore):
    gates = ThreadGates(store, owner="r1")
    with anyio.move_on_after(0.05):
        async with gates.try_enter(T) as entered:
            assert entered is not None
            await anyio.sleep(10)
    async with gates.try_enter(T) as again:
        assert again is not None and again.fence == 2  # the lease was given back, not left to expire


async def test_prune_keeps_held_gates(store: SQLStore):
    gates = ThreadGates(store, owner="r1")
    async with gates.try_enter(ThreadKey("C", "1")):
        assert gates.prune() == 0
        assert gates.held == 1


async def test_two_replicas_never_hold_one_thread_at_once(tmp_path):
    a_store, b_store = await open_sqlite(str(tmp_path / "bot.db")), await open_sqlite(str(tmp_path / "bot.db"))
    a, b = ThreadGates(a_store, owner="replica-a"), ThreadGates(b_store, owner="replica-b")
    try:
        async with a.try_enter(T) as held_by_a:
            assert held_by_a is not None
            async with b.try_enter(T) as refused:
                assert refused is None  # busy on the other replica: told at once
            assert not b.busy(T)  # and b's own limiter was given back
        async with b.try_enter(T) as held_by_b:
            assert held_by_b is not None and held_by_b.fence > held_by_a.fence
    finally:
        await a_store.aclose()
        await b_store.aclose()


async def test_renewal_keeps_a_lease_and_a_lost_one_is_reported(store: SQLStore):
    gates = ThreadGates(store, owner="replica-a", lease_seconds=30)
    other = ThreadGates(store, owner="replica-b")
    lost: list[ThreadKey] = []
    async with gates.try_enter(T) as hold:
        assert hold is not None
        hold.on_lost = lambda: lost.append(T)
        await gates.renew_all()
        assert not hold.lost and lost == []
        async with other.try_enter(T) as refused:
            assert refused is None
        # This replica is cut off past its lease; the other one takes the thread.
        await store.database.transaction("expire", lambda c: c.execute("UPDATE thread_leases SET expires_at = 0"))
        async with other.try_enter(T) as taken:
            assert taken is not None
            await gates.renew_all()
            assert hold.lost and lost == [T]
    # The lost holder does not release what is no longer its own.
    assert await store.acquire_lease(T, "replica-c", ttl=30) is not None


async def test_a_storage_failure_taking_the_lease_raises_and_frees_the_limiter(store: SQLStore):
    class Down:
        async def acquire_lease(self, *args, **kwargs):
            raise StorageError("acquire_lease failed: connection refused")

    gates = ThreadGates(Down(), owner="r1")  # type: ignore[arg-type]
    with pytest.raises(StorageError):
        async with gates.try_enter(T):
            pass
    assert not gates.busy(T)


async def test_a_renewal_racing_the_release_is_not_a_lost_lease(store: SQLStore):
    """A request ends while its renewal is on the way: the refused renewal is about a
    lease given back, not one taken by another replica."""
    gates = ThreadGates(store, owner="replica-a")
    lost: list[bool] = []
    release_now = anyio.Event()
    renewing = anyio.Event()
    real_renew = store.renew_leases

    async def slow_renew(leases, *, ttl):
        renewing.set()
        await release_now.wait()
        await anyio.sleep(0.05)  # the release commits first
        return await real_renew(leases, ttl=ttl)

    store.renew_leases = slow_renew  # type: ignore[method-assign]
    async with anyio.create_task_group() as tg, gates.try_enter(T) as hold:
        assert hold is not None
        hold.on_lost = lambda: lost.append(True)
        tg.start_soon(gates.renew_all)
        await renewing.wait()
        release_now.set()
    assert lost == [] and not hold.lost


async def test_every_held_lease_is_renewed_in_one_storage_call(store: SQLStore, caplog):
    """However many requests run, a tick is one call: renewed one by one, many holds on
    a slow database would take longer than the tick. A lease another replica has taken
    meanwhile is lost alone; a failed call is one log line, not one per lease."""
    gates = ThreadGates(store, owner="replica-a", lease_seconds=30.0)
    calls: list[int] = []
    real_renew = store.renew_leases
    down = False

    async def renew(leases, *, ttl):
        calls.append(len(leases))
        if down:
            raise StorageError("renew_leases failed: could not connect")
        return await real_renew(leases, ttl=ttl)

    store.renew_leases = renew  # type: ignore[method-assign]
    threads = [ThreadKey("C1", f"{i}.0") for i in range(40)]
    lost: list[ThreadKey] = []
    async with AsyncExitStack() as stack:
        holds = [await stack.enter_async_context(gates.try_enter(t)) for t in threads]
        for hold in holds:
            assert hold is not None
            hold.on_lost = lambda hold=hold: lost.append(hold.thread)
            hold.valid_until = anyio.current_time() + 12.0  # by its clock, 12 s of 30 left
        await store.database.transaction(
            "expire", lambda c: c.execute("UPDATE thread_leases SET expires_at = 0 WHERE thread_ts = '7.0'")
        )
        assert await store.acquire_lease(threads[7], "replica-b", ttl=30.0) is not None
        await gates.renew_all()
        assert calls == [40] and lost == [threads[7]]
        assert all(h.valid_until > anyio.current_time() + 29.0 for h in holds if h is not holds[7])
        down = True
        caplog.clear()
        await gates.renew_all()
        assert calls == [40, 39] and lost == [threads[7]]  # (the lost one is not asked for)
        assert len([r for r in caplog.records if "could not renew" in r.getMessage()]) == 1


async def test_a_holder_that_cannot_renew_gives_the_lease_up_before_it_can_pass_on(store: SQLStore):
    """Cut off from storage, the holder stops its request a third of a lease before the
    database would let another replica take the thread (by its own clock, counted from
    before the last renewal that succeeded)."""
    gates = ThreadGates(store, owner="replica-a", lease_seconds=3.0)
    lost: list[float] = []
    real_renew = store.renew_leases
    cut_off = False

    async def renew(leases, *, ttl):
        if cut_off:
            raise StorageError("renew_leases failed: could not connect")
        return await real_renew(leases, ttl=ttl)

    store.renew_leases = renew  # type: ignore[method-assign]
    async with gates.try_enter(T) as hold:
        assert hold is not None
        hold.on_lost = lambda: lost.append(anyio.current_time())
        start = anyio.current_time()
        await gates.renew_all()  # renewed: valid a full lease from now
        renewed_at = anyio.current_time()
        assert hold.valid_until >= start + 3.0
        cut_off = True
        await anyio.sleep(0.2)
        await gates.renew_all()  # one failure, 2.8 s left: tried again at the next tick
        assert not hold.lost and lost == []
        await anyio.sleep(max(0.0, renewed_at + 2.0 - anyio.current_time()))
        await gates.renew_all()  # the next tick would be at or past the expiry: given up now
        assert hold.lost and len(lost) == 1
        assert lost[0] < renewed_at + 3.0  # before the database lets it pass on
        assert await store.acquire_lease(T, "replica-b", ttl=3.0) is None  # and it had not yet


async def test_a_holder_surely_holding_its_lease_confirms_it_without_storage(store: SQLStore):
    gates = ThreadGates(store, owner="replica-a", lease_seconds=30.0)
    calls: list[list] = []
    real_renew = store.renew_leases

    async def renew(leases, *, ttl):
        calls.append(leases)
        return await real_renew(leases, ttl=ttl)

    store.renew_leases = renew  # type: ignore[method-assign]
    async with gates.try_enter(T) as hold:
        assert hold is not None
        assert gates.surely_held(hold)
        assert await gates.confirm(hold) and calls == []


async def test_a_holder_that_fell_behind_its_lease_holds_back_until_a_renewal_says(store: SQLStore):
    """As after a pause (SIGSTOP): by its own clock less than a renewal tick of the lease
    is left. Its writes wait (`surely_held` is False) and a renewal is run at once,
    not at the next tick; renewed, it may write again."""
    gates = ThreadGates(store, owner="replica-a", lease_seconds=30.0)
    async with anyio.create_task_group() as tg, gates.try_enter(T) as hold:
        assert hold is not None
        tg.start_soon(gates.renew_forever)  # (its tick: every 10 s)
        hold.valid_until = anyio.current_time() + 5.0  # fell behind: 5 s of 30 left, by its clock
        assert not gates.surely_held(hold)
        with anyio.fail_after(2):  # well before the next tick
            while not gates.surely_held(hold):
                await anyio.sleep(0.01)
        assert hold.valid_until > anyio.current_time() + 25.0 and not hold.lost
        tg.cancel_scope.cancel()


async def test_a_holder_that_fell_behind_confirms_by_one_renewal(store: SQLStore):
    gates = ThreadGates(store, owner="replica-a", lease_seconds=30.0)
    other = ThreadGates(store, owner="replica-b", lease_seconds=30.0)
    lost: list[bool] = []
    async with gates.try_enter(T) as hold:
        assert hold is not None
        hold.on_lost = lambda: lost.append(True)
        hold.valid_until = anyio.current_time() + 1.0
        assert await gates.confirm(hold)  # still its own: renewed
        assert gates.surely_held(hold) and lost == []
        # Paused past its lease this time: the other replica took the thread meanwhile.
        hold.valid_until = anyio.current_time() + 1.0
        await store.database.transaction("expire", lambda c: c.execute("UPDATE thread_leases SET expires_at = 0"))
        async with other.try_enter(T) as taken:
            assert taken is not None
            assert not await gates.confirm(hold)
            assert hold.lost and lost == [True]
            assert not await gates.confirm(hold) and lost == [True]  # told once
            assert not gates.surely_held(hold)


async def test_a_holder_that_fell_behind_and_cannot_reach_storage_gives_the_lease_up(store: SQLStore):
    gates = ThreadGates(store, owner="replica-a", lease_seconds=30.0)
    lost: list[bool] = []

    async def down(leases, *, ttl):
        raise StorageError("renew_leases failed: could not connect")

    async with gates.try_enter(T) as hold:
        assert hold is not None
        hold.on_lost = lambda: lost.append(True)
        store.renew_leases = down  # type: ignore[method-assign]
        assert await gates.confirm(hold)  # surely held: storage is not asked
        hold.valid_until = anyio.current_time() + 1.0
        assert not await gates.confirm(hold)
        assert hold.lost and lost == [True]
