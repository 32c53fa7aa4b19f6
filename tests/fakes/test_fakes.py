"""The fakes speak the real wire formats: the real openai SDK, the bot's Slack Web API
client and its WebSocket client all work against them, in-process and over sockets."""

from __future__ import annotations

import json
import time
from contextlib import asynccontextmanager

import anyio
import httpx2
import openai
import pytest

from bot.slack.web_api import SlackAPIError, SlackWebAPI
from bot.slack.websocket import WebSocketClosed, connect_websocket
from tests.fakes import Behaviour, FakeOpenAI, FakeSlack, http_server, openai_server, slack_server

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]


# ---------------------------------------------------------------- helpers


@asynccontextmanager
async def openai_client(fake: FakeOpenAI, base_url: str | None = None):
    """The real SDK, in-process through MockTransport or over a real server at base_url."""
    transport = httpx2.MockTransport(fake.handle) if base_url is None else None
    async with (
        httpx2.AsyncClient(transport=transport) as http,
        openai.AsyncOpenAI(
            api_key=fake.api_key, base_url=base_url or "https://api.openai.test/v1/", http_client=http, max_retries=0
        ) as client,
    ):
        yield client


@asynccontextmanager
async def slack_api(fake: FakeSlack, base_url: str | None = None, **kwargs):
    transport = httpx2.MockTransport(fake.handle) if base_url is None else None
    async with httpx2.AsyncClient(transport=transport) as http:
        yield SlackWebAPI(
            bot_token=kwargs.get("bot_token", fake.bot_token),
            app_token=fake.app_token,
            base_url=base_url or "https://slack.test/api/",
            client=http,
        )


async def stream_text(client: openai.AsyncOpenAI, **kwargs) -> tuple[str, list]:
    stream = await client.chat.completions.create(model="gpt-5-mini", messages=MESSAGES, stream=True, **kwargs)
    parts, chunks = [], []
    async with stream:
        async for chunk in stream:
            chunks.append(chunk)
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
    return "".join(parts), chunks


# ---------------------------------------------------------------- OpenAI


@pytest.mark.parametrize("over_socket", [False, True], ids=["mock", "socket"])
async def test_openai_streams_echo_with_usage(over_socket):
    fake = FakeOpenAI()
    with anyio.fail_after(10):
        async with _maybe_server(fake, over_socket) as base_url, openai_client(fake, base_url) as client:
            text, chunks = await stream_text(client, stream_options={"include_usage": True})
            assert text == "Echo: hello there"
            assert chunks[-2].choices[0].finish_reason == "stop"
            assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
            completion = await client.chat.completions.create(model="gpt-5-mini", messages=MESSAGES)
            assert completion.choices[0].message.content == "Echo: hello there"
            assert [m.id async for m in client.models.list()] == fake.models
            await fake.wait_until(lambda: fake.open_streams == 0)
    assert fake.requests[0]["stream"] is True and fake.requests[0]["messages"] == MESSAGES
    assert fake.max_open_streams == 1 and fake.streams_finished == 1


def _maybe_server(fake: FakeOpenAI, over_socket: bool):
    if over_socket:
        return openai_server(fake)

    @asynccontextmanager
    async def nothing():
        yield None

    return nothing()


async def test_openai_list_content_parts_are_echoed():
    fake = FakeOpenAI()
    parts = [
        {"type": "text", "text": "look "},
        {"type": "image_url", "image_url": {"url": "data:,"}},
        {"type": "text", "text": "here"},
    ]
    async with openai_client(fake) as client:
        completion = await client.chat.completions.create(
            model="gpt-5-mini", messages=[{"role": "user", "content": parts}]
        )
    assert completion.choices[0].message.content == "Echo: look here"


@pytest.mark.parametrize(
    ("behaviour", "error", "code"),
    [
        (Behaviour(status=429, retry_after=1), openai.RateLimitError, "rate_limit_exceeded"),
        (
            Behaviour(status=400, error_code="context_length_exceeded"),
            openai.BadRequestError,
            "context_length_exceeded",
        ),
        (Behaviour(status=500), openai.InternalServerError, None),
        (Behaviour(status=429, error_code="insufficient_quota"), openai.RateLimitError, "insufficient_quota"),
    ],
)
async def test_openai_error_statuses_raise_sdk_exceptions(behaviour, error, code):
    fake = FakeOpenAI()
    fake.enqueue(behaviour)
    with anyio.fail_after(10):
        async with openai_client(fake) as client:
            with pytest.raises(error) as info:
                await client.chat.completions.create(model="gpt-5-mini", messages=MESSAGES, stream=True)
            assert info.value.code == code
            assert (await stream_text(client))[0] == "Echo: hello there"  # the queue is used up


async def test_openai_wrong_key_is_authentication_error():
    fake = FakeOpenAI(api_key="sk-right")
    async with httpx2.AsyncClient(transport=httpx2.MockTransport(fake.handle)) as http:
        client = openai.AsyncOpenAI(
            api_key="sk-wrong", base_url="https://api.openai.test/v1/", http_client=http, max_retries=0
        )
        with pytest.raises(openai.AuthenticationError) as info:
            await client.chat.completions.create(model="gpt-5-mini", messages=MESSAGES)
    assert info.value.code == "invalid_api_key"


@pytest.mark.parametrize("over_socket", [False, True], ids=["mock", "socket"])
async def test_openai_streams_close_when_left_early(over_socket):
    """Leaving `async with stream` early, or cancelling a stalled stream, closes the body."""
    fake = FakeOpenAI()
    fake.enqueue(Behaviour(text="x" * 100, chunks=50, chunk_delay=0.01), Behaviour(stall_after=2))
    with anyio.fail_after(10):
        async with _maybe_server(fake, over_socket) as base_url, openai_client(fake, base_url) as client:
            stream = await client.chat.completions.create(model="gpt-5-mini", messages=MESSAGES, stream=True)
            async with stream:
                await stream.__anext__()  # (not `async for ... break`: that strands the SDK's generator)
            await fake.wait_until(lambda: fake.open_streams == 0, timeout=5)

            received = []
            with anyio.move_on_after(0.5) as scope:
                stream = await client.chat.completions.create(model="gpt-5-mini", messages=MESSAGES, stream=True)
                async with stream:
                    async for chunk in stream:
                        received.append(chunk)
            assert scope.cancelled_caught and len(received) == 3  # role chunk + 2 content chunks
            await fake.wait_until(lambda: fake.open_streams == 0, timeout=5)
    assert fake.max_open_streams == 1 and fake.streams_finished == 0


async def test_openai_stream_arrives_incrementally_over_socket():
    fake = FakeOpenAI()
    fake.enqueue(Behaviour(text="abcd", chunks=4, chunk_delay=0.2))
    with anyio.fail_after(10):
        async with openai_server(fake) as base_url, openai_client(fake, base_url) as client:
            stream = await client.chat.completions.create(model="gpt-5-mini", messages=MESSAGES, stream=True)
            times = []
            async with stream:
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        times.append(anyio.current_time())
    assert len(times) == 4 and times[-1] - times[0] >= 0.5


@pytest.mark.parametrize("over_socket", [False, True], ids=["mock", "socket"])
async def test_openai_cut_stream_raises(over_socket):
    fake = FakeOpenAI()
    fake.enqueue(Behaviour(text="abcdef", chunks=3, cut_after=1))
    with anyio.fail_after(10):
        async with _maybe_server(fake, over_socket) as base_url, openai_client(fake, base_url) as client:
            with pytest.raises((httpx2.RemoteProtocolError, openai.APIConnectionError)):
                await stream_text(client)
            await fake.wait_until(lambda: fake.open_streams == 0, timeout=5)


async def test_http_server_chunked_requests_and_keep_alive():
    seen = []

    async def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append((request.method, request.url.path, request.content))
        return httpx2.Response(200, json={"got": request.content.decode()})

    async def body():
        yield b"chunked "
        yield b"body"

    with anyio.fail_after(10):
        async with http_server(handler) as url, httpx2.AsyncClient() as http:
            assert (await http.post(url + "/a", content=body())).json() == {"got": "chunked body"}
            assert (await http.post(url + "/b", content=b"plain")).json() == {"got": "plain"}
            ports = {
                r.extensions["network_stream"].get_extra_info("client_addr")[1]
                for r in [await http.get(url + "/c"), await http.get(url + "/d")]
            }
    assert seen[:2] == [("POST", "/a", b"chunked body"), ("POST", "/b", b"plain")]
    assert len(ports) == 1  # one kept-alive connection


# ---------------------------------------------------------------- Slack Web API


@pytest.mark.parametrize("over_socket", [False, True], ids=["mock", "socket"])
async def test_slack_web_api(over_socket):
    fake = FakeSlack()
    with anyio.fail_after(10):
        async with _maybe_slack(fake, over_socket) as base_url, slack_api(fake, base_url) as api:
            auth = await api.call("auth.test")
            assert (auth["user_id"], auth["bot_id"], auth["team_id"]) == ("UBOT", "BBOT", "T1")
            parent = fake.add_user_message("D1", "U1", "question")
            ts = await api.post_message("D1", parent, markdown_text="first")
            await api.update_message("D1", ts, markdown_text="first, then more")
            thread = await api.thread_replies("D1", parent, limit=1)  # form-encoded, two pages
            assert [m["text"] for m in thread] == ["question", "first, then more"]
            assert thread[0]["reply_count"] == 1
            assert thread[1]["bot_id"] == "BBOT" and thread[1]["user"] == "UBOT"
            user = await api.call("users.info", user="U1")
            assert user["user"]["id"] == "U1"
            with pytest.raises(SlackAPIError) as info:
                await api.post_message("D1", parent, text="a", markdown_text="b")
            assert info.value.error == "markdown_text_conflict"
            with pytest.raises(SlackAPIError, match="message_not_found"):
                await api.update_message("D1", "1.000000", text="x")
            with pytest.raises(SlackAPIError, match="unknown_method"):
                await api.call("chat.nonsense")
    assert fake.bot_replies("D1", parent) == ["first, then more"]
    assert fake.updates[("D1", ts)] == ["first", "first, then more"]
    assert [m for m, _ in fake.calls].count("conversations.replies") == 2
    assert ts > parent


def _maybe_slack(fake: FakeSlack, over_socket: bool):
    if over_socket:
        return slack_server(fake)

    @asynccontextmanager
    async def nothing():
        yield None

    return nothing()


async def test_slack_auth_and_faults():
    fake = FakeSlack()
    async with slack_api(fake, bot_token="xoxb-wrong") as api:
        with pytest.raises(SlackAPIError, match="invalid_auth"):
            await api.call("auth.test")
        with pytest.raises(SlackAPIError, match="invalid_auth"):  # app token required here
            await api.call("apps.connections.open")
    async with slack_api(fake) as api:
        fake.fail_next("chat.postMessage", status=429, retry_after=0.01)
        assert await api.post_message("C1", None, text="after a retry")
        fake.fail_next("chat.postMessage", status=502, body="<html>Bad Gateway</html>")
        with pytest.raises(SlackAPIError, match="bad_response"):
            await api.post_message("C1", None, text="x")
        fake.fail_next("auth.test", error="fatal_error", times=2)
        for _ in range(2):
            with pytest.raises(SlackAPIError, match="fatal_error"):
                await api.call("auth.test")
        assert (await api.call("auth.test"))["ok"]
    assert [m for m, _ in fake.calls].count("chat.postMessage") == 3


# ---------------------------------------------------------------- Socket Mode


async def _open_url(fake: FakeSlack, api: SlackWebAPI) -> str:
    return (await api.call("apps.connections.open", app_token=True))["url"]


async def _hello_event_ack(fake: FakeSlack, ws) -> None:
    hello = json.loads(await ws.receive_text())
    assert hello["type"] == "hello" and hello["connection_info"]["app_id"] == "A1"
    assert hello["num_connections"] == 1 and hello["debug_info"]["approximate_connection_time"] > 0
    event = fake.message_event("D1", "U1", "hi bot")
    envelope_id = await fake.send_event(event)
    envelope = json.loads(await ws.receive_text())
    assert envelope["envelope_id"] == envelope_id and envelope["type"] == "events_api"
    assert envelope["retry_attempt"] == 0 and envelope["accepts_response_payload"] is False
    payload = envelope["payload"]
    assert payload["type"] == "event_callback" and payload["event"] == event
    assert payload["event_id"].startswith("Ev") and payload["authorizations"][0]["user_id"] == "UBOT"
    assert fake.thread_messages("D1", event["ts"])[0]["text"] == "hi bot"
    await ws.send_text(json.dumps({"envelope_id": envelope_id}))
    assert await fake.wait_acked(envelope_id, timeout=5) <= anyio.current_time()
    assert fake.ack_payloads[envelope_id] is None


@pytest.mark.parametrize("over_socket", [False, True], ids=["memory", "socket"])
async def test_socket_mode_hello_event_ack_drop(over_socket):
    fake = FakeSlack()
    connect = connect_websocket if over_socket else fake.connector
    with anyio.fail_after(10):
        async with _maybe_slack(fake, over_socket) as base_url, slack_api(fake, base_url) as api:
            url = await _open_url(fake, api)
            ws = await connect(url)
            try:
                await _hello_event_ack(fake, ws)
                with pytest.raises(WebSocketClosed):  # tickets are single-use
                    await connect(url)
                before = ws.last_activity
                await anyio.sleep(0.01)
                await ws.ping()
                await fake.wait_until(lambda: fake.connections[0].pings == 1, timeout=5)
                await fake.send_raw("{not json")  # malformed frames pass as they are
                assert await ws.receive_text() == "{not json"
                assert ws.last_activity > before
                await fake.drop()
                with pytest.raises(WebSocketClosed):
                    await ws.receive_text()
                await fake.wait_until(lambda: not fake.live_connections, timeout=5)
            finally:
                await ws.aclose()
    assert fake.connections_opened == 1 and fake.connections[0].closed


@pytest.mark.parametrize("over_socket", [False, True], ids=["memory", "socket"])
async def test_socket_mode_refresh_keeps_old_socket_until_client_leaves(over_socket):
    fake = FakeSlack()
    connect = connect_websocket if over_socket else fake.connector
    with anyio.fail_after(10):
        async with _maybe_slack(fake, over_socket) as base_url, slack_api(fake, base_url) as api:
            old = await connect(await _open_url(fake, api))
            await old.receive_text()  # hello
            link = await fake.disconnect("refresh_requested", grace=5.0)
            assert json.loads(await old.receive_text())["reason"] == "refresh_requested"
            assert link.live and link.draining
            new = await connect(await _open_url(fake, api))
            try:
                assert json.loads(await new.receive_text())["num_connections"] == 2
                envelope_id = await fake.send_event(fake.message_event("D1", "U1", "x"))  # goes to the new socket
                assert json.loads(await new.receive_text())["envelope_id"] == envelope_id
                await old.aclose()
                await fake.wait_until(lambda: fake.live_connections == [fake.connections[1]], timeout=5)
            finally:
                await new.aclose()
    assert fake.max_live_connections == 2


@pytest.mark.parametrize("over_socket", [False, True], ids=["memory", "socket"])
async def test_socket_mode_grace_runs_out_and_silence(over_socket):
    fake = FakeSlack()
    connect = connect_websocket if over_socket else fake.connector
    with anyio.fail_after(10):
        async with _maybe_slack(fake, over_socket) as base_url, slack_api(fake, base_url) as api:
            ws = await connect(await _open_url(fake, api))
            try:
                await ws.receive_text()  # hello
                await fake.disconnect("warning", grace=0.2)
                assert json.loads(await ws.receive_text())["reason"] == "warning"
                with pytest.raises(WebSocketClosed):
                    await ws.receive_text()
            finally:
                await ws.aclose()
            ws = await connect(await _open_url(fake, api))
            try:
                await ws.receive_text()  # hello
                await fake.disconnect("link_disabled")  # closed right after the frame
                assert json.loads(await ws.receive_text())["reason"] == "link_disabled"
                with pytest.raises(WebSocketClosed):
                    await ws.receive_text()
            finally:
                await ws.aclose()
            ws = await connect(await _open_url(fake, api))
            try:
                await ws.receive_text()  # hello
                link = fake.silence()
                envelope_id = await fake.send_event(fake.message_event("D1", "U1", "lost"), connection=link)
                await ws.send_text(json.dumps({"envelope_id": envelope_id}))
                await ws.ping()
                with anyio.move_on_after(0.2) as scope:
                    await ws.receive_text()
                assert scope.cancelled_caught and envelope_id not in fake.acks
            finally:
                await ws.aclose()


async def test_bot_messages_echo_back_as_events():
    fake = FakeSlack(echo_bot_messages=True)
    async with slack_api(fake) as api:
        ws = await fake.connector(await _open_url(fake, api))
        try:
            await ws.receive_text()  # hello
            ts = await api.post_message("D1", None, text="from the bot")
            event = json.loads(await ws.receive_text())["payload"]["event"]
            assert (event["ts"], event["bot_id"], event["user"], event["text"]) == (ts, "BBOT", "UBOT", "from the bot")
        finally:
            await ws.aclose()


async def test_redelivery_of_unacked_event():
    fake = FakeSlack()
    async with slack_api(fake) as api:
        ws = await fake.connector(await _open_url(fake, api))
        try:
            await ws.receive_text()  # hello
            first = await fake.send_event(fake.app_mention_event("C1", "U1", "hello"))
            assert await fake.redeliver_unacked(after=3.0) == []
            await anyio.sleep(0.05)
            [second] = await fake.redeliver_unacked(after=0.01)
            one, two = json.loads(await ws.receive_text()), json.loads(await ws.receive_text())
            assert (one["envelope_id"], two["envelope_id"]) == (first, second)
            assert one["payload"]["event_id"] == two["payload"]["event_id"]
            assert (two["retry_attempt"], two["retry_reason"]) == (1, "timeout")
            assert one["payload"]["event"]["text"] == "<@UBOT> hello"
        finally:
            await ws.aclose()


# ---------------------------------------------------------------- virtual time


def _mock_clock():
    import trio.testing

    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


@pytest.mark.parametrize("anyio_backend", [_mock_clock()], ids=["trio-mockclock"])
async def test_in_process_fakes_run_on_virtual_time():
    """Grace periods, latency and hangs cost virtual time only under a Trio MockClock."""
    slack, ai = FakeSlack(), FakeOpenAI()
    start, real_start = anyio.current_time(), time.monotonic()
    async with slack_api(slack) as api:
        ws = await slack.connector(await _open_url(slack, api))
        try:
            await ws.receive_text()  # hello
            await slack.disconnect("warning", grace=10)
            await slack.wait_until(lambda: not slack.live_connections, timeout=60)  # nobody reading: time alone
            assert anyio.current_time() - start >= 10
            assert json.loads(await ws.receive_text())["type"] == "disconnect"  # sent before the close
            with pytest.raises(WebSocketClosed):
                await ws.receive_text()
        finally:
            await ws.aclose()
    ai.enqueue(Behaviour(hang=True), Behaviour(text="abc", chunks=3, latency=30, chunk_delay=5))
    async with openai_client(ai) as client:
        with anyio.move_on_after(3600) as scope:
            await stream_text(client)
        assert scope.cancelled_caught and ai.open_streams == 0
        before = anyio.current_time()
        assert (await stream_text(client))[0] == "abc"
        assert anyio.current_time() - before == pytest.approx(40)
    assert anyio.current_time() - start >= 3650 and time.monotonic() - real_start < 5
