"""`bot.retrying.retry`, on both backends: the tries, the pauses, which errors are tried
again, and that cancellation is never retried nor swallowed."""

import math

import anyio
import pytest

from bot.retrying import always, doubling, no_pause, retry

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


class Flaky(Exception):
    pass


class Fatal(Exception):
    pass


def failing(*errors: Exception, result: str = "done"):
    """An attempt that raises `errors` in turn, then returns `result`; `calls` counts."""
    calls: list[float] = []

    async def attempt() -> str:
        calls.append(anyio.current_time())
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result

    return attempt, calls


async def test_returns_the_first_success_without_pausing():
    attempt, calls = failing()
    paused: list[int] = []
    assert await retry(attempt, errors=Flaky, attempts=3, pause=lambda n, exc: paused.append(n) or 1.0) == "done"
    assert len(calls) == 1 and paused == []


async def test_retries_matching_errors_with_the_pauses_given():
    attempt, calls = failing(Flaky("a"), Flaky("b"))
    seen: list[tuple[int, str]] = []

    def pause(n: int, exc: Flaky) -> float:
        seen.append((n, str(exc)))
        return 0.02 * n

    assert await retry(attempt, errors=Flaky, attempts=3, pause=pause) == "done"
    assert seen == [(1, "a"), (2, "b")]  # counted from 1, with the error that caused it
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.02 and calls[2] - calls[1] >= 0.04


async def test_the_last_error_propagates_once_the_tries_are_spent():
    errors = [Flaky(str(i)) for i in range(5)]
    attempt, calls = failing(*errors)
    paused: list[int] = []
    with pytest.raises(Flaky) as caught:
        await retry(attempt, errors=Flaky, attempts=3, pause=lambda n, exc: paused.append(n) or 0.0)
    assert caught.value is errors[2]  # the same object, unwrapped
    assert len(calls) == 3 and paused == [1, 2]  # no pause after the last try


async def test_one_attempt_means_no_retry():
    attempt, calls = failing(Flaky())
    with pytest.raises(Flaky):
        await retry(attempt, errors=Flaky, attempts=1, pause=no_pause)
    assert len(calls) == 1


async def test_other_errors_and_refused_ones_propagate_at_once():
    attempt, calls = failing(Fatal())
    with pytest.raises(Fatal):
        await retry(attempt, errors=Flaky, attempts=5, pause=no_pause)
    assert len(calls) == 1

    attempt, calls = failing(Flaky("retry me"), Flaky("permanent"))
    with pytest.raises(Flaky, match="permanent"):
        await retry(attempt, errors=Flaky, attempts=5, pause=no_pause, retry_if=lambda exc: str(exc) != "permanent")
    assert len(calls) == 2


async def test_without_a_limit_it_retries_until_it_succeeds():
    attempt, calls = failing(*(Flaky() for _ in range(20)))
    assert await retry(attempt, errors=Flaky, attempts=None, pause=no_pause) == "done"
    assert len(calls) == 21


async def test_a_zero_pause_is_no_checkpoint():
    """Retrying at once must not let other tasks run in between (no sleep(0))."""
    attempt, _calls = failing(Flaky(), Flaky())
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        # The task group's child has not started yet; an attempt that never checkpoints
        # (this one) and zero pauses finish before it does.
        await retry(attempt, errors=Flaky, attempts=3, pause=no_pause)
        ran.append("retried")
    assert ran == ["retried", "other"]


async def test_the_callers_deadline_interrupts_a_pause_and_is_not_swallowed():
    attempt, calls = failing(*(Flaky() for _ in range(10)))
    with anyio.move_on_after(0.1) as scope:
        await retry(attempt, errors=Flaky, attempts=None, pause=lambda n, exc: 60.0)
    assert scope.cancelled_caught
    assert len(calls) == 1


async def test_cancellation_inside_an_attempt_is_never_retried():
    calls: list[int] = []

    async def attempt() -> str:
        calls.append(1)
        await anyio.sleep_forever()
        return "never"

    with anyio.move_on_after(0.05) as scope:
        # Even with errors=Exception and retry_if always true: cancellation is no Exception.
        await retry(attempt, errors=Exception, attempts=None, pause=no_pause, retry_if=always)
    assert scope.cancelled_caught
    assert calls == [1]


def test_doubling_pauses():
    pause = doubling(0.25)
    assert [pause(n, Flaky()) for n in range(1, 6)] == [0.25, 0.5, 1.0, 2.0, 4.0]
    capped = doubling(1.0, cap=30.0)
    assert [capped(n, Flaky()) for n in range(1, 8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert capped(10_000, Flaky()) == 30.0  # no overflow, however long it has been retrying
    assert math.isfinite(doubling(1.0)(10_000, Flaky()))


async def test_a_tuple_of_error_types():
    attempt, calls = failing(Flaky(), TimeoutError(), Fatal())
    with pytest.raises(Fatal):
        await retry(attempt, errors=(Flaky, TimeoutError), attempts=5, pause=no_pause)
    assert len(calls) == 3
