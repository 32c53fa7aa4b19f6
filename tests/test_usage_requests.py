"""Budgets and usage for answers, through the whole bot (fake Slack, fake OpenAI) on Trio
and asyncio: a request over budget gets the one line and no model call; one under budget
is answered and its tokens recorded; a request already running is never cut.

"""

from __future__ import annotations

import time

import anyio
import pytest

from bot.storage import open_store
from bot.usage import month_bounds, month_days
from tests.fakes.openai import Behaviour
from tests.harness import running_bot, send_dm, wait_reply

pytestmark = pytest.mark.anyio


async def this_month(store, user: str):
    return await store.user_usage(user, *month_days(*month_bounds(time.time())))


async def test_an_answer_records_its_tokens_and_a_request_over_budget_makes_no_model_call(slack, ai):
    store = await open_store("sqlite:///:memory:")
    try:
        async with running_bot(slack, ai, store=store, user_monthly_tokens=1000):
            _, ev = await send_dm(slack, "hello there")
            await wait_reply(slack, "D1", ev["ts"], "Echo: hello there")
            used = await _eventually(lambda: this_month(store, "U1"), lambda u: u.requests == 1)
            assert used.tokens_out == 3 and used.tokens_in > 0  # the stream's usage
            await store.record_usage("U1", "gpt-5-mini", "answered", 1000, 0, at=time.time())  # now over
            calls = len(ai.requests)
            _, ev = await send_dm(slack, "and again", thread_ts=None)
            replies = await wait_reply(slack, "D1", ev["ts"], "You have used")
            assert len(ai.requests) == calls  # no model call
            assert f"You have used {1000 + used.tokens:,} of your 1,000 tokens this month" in replies[-1]
            # Another user, under their own budget, is answered.
            _, ev = await send_dm(slack, "from U2", user="U2", channel="D2")
            await wait_reply(slack, "D2", ev["ts"], "Echo: from U2")
    finally:
        await store.aclose()


async def test_the_workspace_budget_refuses_everyone(slack, ai):
    store = await open_store("sqlite:///:memory:")
    try:
        await store.record_usage("U9", "gpt-5-mini", "answered", 500, 0, at=time.time())
        async with running_bot(slack, ai, store=store, workspace_monthly_tokens=500):
            _, ev = await send_dm(slack, "hello there")
            replies = await wait_reply(slack, "D1", ev["ts"], "This workspace has used 500 of its 500 tokens")
        assert ai.requests == [] and "resets on 1 " in replies[-1]
    finally:
        await store.aclose()


async def test_a_running_request_is_never_cut_by_the_budget(slack, ai):
    store = await open_store("sqlite:///:memory:")
    try:
        async with running_bot(slack, ai, store=store, user_monthly_tokens=100):
            ai.enqueue(Behaviour(text="a slow but complete answer", chunks=5, chunk_delay=0.2))
            _, ev = await send_dm(slack, "go")
            with anyio.fail_after(5):
                while not ai.requests:  # the model call has started: the request passed the check
                    await anyio.sleep(0.01)
            await store.record_usage("U1", "gpt-5-mini", "answered", 5000, 0, at=time.time())  # over, mid-answer
            replies = await wait_reply(slack, "D1", ev["ts"], "a slow but complete answer")
        assert "You have used" not in replies[-1]
    finally:
        await store.aclose()


async def _eventually(read, ok, timeout: float = 5.0):
    with anyio.fail_after(timeout):
        while True:
            value = await read()
            if ok(value):
                return value
            await anyio.sleep(0.01)


async def test_the_tokens_of_a_drawing_count_under_the_image_model(slack, ai):
    """The images API bills tokens too (the fake: 50 in, 272 out per picture): they are
    recorded under the image model, as no second request, and count toward the budget."""
    store = await open_store("sqlite:///:memory:")
    try:
        ai.enqueue(Behaviour(tool_calls=[("generate_image", {"prompt": "a lighthouse"})]))
        async with running_bot(slack, ai, store=store) as nursery:
            _, ev = await send_dm(slack, "draw a lighthouse")
            await wait_reply(slack, "D1", ev["ts"], "Echo: draw a lighthouse")
            image_model = nursery.services.settings.media.image_model
            totals = await _eventually(
                lambda: store.usage_totals(*month_days(*month_bounds(time.time()))),
                lambda rows: {r.model for r in rows} == {"gpt-5-mini", image_model},
            )
        by_model = {r.model: r for r in totals}
        drawn = by_model[image_model]
        assert (drawn.user, drawn.requests, drawn.tokens_in, drawn.tokens_out) == ("U1", 0, 50, 272)
        assert by_model["gpt-5-mini"].requests == 1
        used = await this_month(store, "U1")
        assert used.requests == 1 and used.tokens == by_model["gpt-5-mini"].tokens + 322
    finally:
        await store.aclose()
