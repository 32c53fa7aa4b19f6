"""The settings modal and native streaming through the real `slackbot` process, over a real
WebSocket and real HTTP (the fakes served on 127.0.0.1), with the production defaults
(native streaming and the welcome on). Both the test process and the bot run on Trio and
asyncio."""

from __future__ import annotations

import pytest

from tests.fakes import Behaviour
from tests.harness import send_dm, wait_reply
from tests.interactions.test_settings import form
from tests.test_e2e import running

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


@pytest.fixture(params=["trio", "asyncio"])
def bot_backend(request):
    """BOT_ASYNC_BACKEND for the bot process."""
    return request.param


async def test_settings_modal_round_trip_and_native_streaming_over_real_sockets(tmp_path, bot_backend):
    async with running(tmp_path, backend=bot_backend) as (bot, slack, ai):
        eid, _ = await slack.send_slash_command("/settings")
        await slack.wait_acked(eid)
        await slack.wait_until(lambda: slack.views, timeout=10)
        view_id = next(iter(slack.views))
        bad = await slack.submit_view(view_id, form(temperature="warm"))
        await slack.wait_acked(bad)
        assert slack.ack_payloads[bad]["response_action"] == "errors"
        assert set(slack.ack_payloads[bad]["errors"]) == {"temperature"}
        good = await slack.submit_view(
            view_id, form(model="gpt-4o-mini", temperature="0.4", instructions="Sign off with -- bot")
        )
        await slack.wait_acked(good)
        assert slack.ack_payloads[good] is None
        await slack.wait_until(lambda: "U1" in slack.home_views, timeout=10)

        ai.enqueue(Behaviour(text="Echo: hello over real sockets", chunks=6, chunk_delay=0.4))
        _, ev = await send_dm(slack, "hello over real sockets")
        replies = await wait_reply(slack, "D1", ev["ts"], "Echo: hello over real sockets")
        await slack.wait_until(lambda: "chat.stopStream" in [m for m, _ in slack.calls], timeout=10)
        bot.assert_no_secrets()
    assert replies == ["Echo: hello over real sockets"]
    request = ai.requests[-1]
    assert request["model"] == "gpt-4o-mini" and request["temperature"] == 0.4
    assert "Sign off with -- bot" in request["messages"][0]["content"]
    called = [m for m, _ in slack.calls]
    assert called.count("chat.startStream") == 1 and "chat.appendStream" in called  # streamed over ~2.4 s
    assert any("I'm an AI assistant" in m.get("text", "") for m in slack.messages["D1"])  # the welcome
