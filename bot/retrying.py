"""`retry`: try again after a pause, for errors worth trying again — the one way the bot does it.

Several places retry a step that may fail for a moment (a 5xx from Slack, a locked
database, a Slack outage at start-up). What they share is the loop; what differs is
passed in: how many tries, which errors, how long to pause (and what to log, in the
same hook, since it knows the pause). It imports nothing of the bot, so every layer,
storage included, may use it.

A deadline is the caller's cancel scope (`move_on_after`, `fail_after`): the pauses sit
inside it, so a deadline or a shutdown interrupts a pause like any other wait.
Cancellation is never retried nor swallowed: it is not an `Exception`, so it passes
through untouched (Trio's `Cancelled` and asyncio's `CancelledError` alike).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

T = TypeVar("T")
E = TypeVar("E", bound=Exception)


def always(exc: Exception) -> bool:
    """Every error of the given type is worth another try."""
    return True


def no_pause(n: int, exc: Exception) -> float:
    """Try again at once (no sleep, so no checkpoint either)."""
    return 0.0


def doubling(first: float, *, cap: float = math.inf) -> Callable[[int, Exception], float]:
    """Pauses of `first`, then twice that, four times… never above `cap` seconds."""

    def pause(n: int, exc: Exception) -> float:
        # The exponent is bounded: retries without a limit must not overflow a float.
        return min(first * 2.0 ** min(n - 1, 64), cap)

    return pause


async def retry(
    attempt: Callable[[], Awaitable[T]],
    *,
    errors: type[E] | tuple[type[E], ...],
    attempts: int | None,
    pause: Callable[[int, E], float],
    retry_if: Callable[[E], bool] = always,
) -> T:
    """`await attempt()` until it returns, and return what it returned.

    When it raises one of `errors` (a type or a tuple of types) for which `retry_if(exc)`
    is true, and fewer than `attempts` tries have been made (`None`: no limit but the
    caller's cancel scope), sleep `pause(n, exc)` seconds — for the `n`th retry,
    counting from 1 — and try again. `pause` is called once per retry, before the
    pause, so it is where a retry is logged. A pause of 0 does not sleep at all.

    Anything else propagates unchanged: other errors at once, the last error once the
    tries are spent (the caller decides what that means), and cancellation always."""
    retries = 0
    while True:
        try:
            return await attempt()
        except errors as exc:
            retries += 1
            if (attempts is not None and retries >= attempts) or not retry_if(exc):
                raise
            delay = pause(retries, exc)
        # Outside the `except`: a cancellation during the pause does not carry the
        # error as its context.
        if delay > 0:
            await anyio.sleep(delay)
