"""Socket Mode recovery at the edges, as real Slack behaves.

1. Frames that come with the WebSocket upgrade: Slack sends the 101 response, `hello` and
   any envelope already waiting in one TCP write. They must be delivered (and acked) at
   once, not when the next bytes happen to arrive (a ping's pong, seconds later).
2. Short outages: while Slack refuses connections (apps.connections.open fails, or the
   upgrade is refused) the reader retries with a jittered backoff capped at
   BACKOFF_CAP_SECONDS (5 s), never faster than BACKOFF_MIN_SECONDS, so it is back within
   a few seconds of Slack. Sockets that die right after `hello` still back off (the
   backoff resets only after a socket served a while); a rate limit waits its Retry-After.
3. Half-open sockets (TCP up, nothing arriving, pongs never come back): abandoned once
   nothing was heard for ping interval + pong timeout (15 s with the default 10 s pings).

The fast tests run on both backends in real time. The production-timing ones (a 15 s
outage, 10 s pings) run on Trio's MockClock (autojump), where they cost virtual seconds
only; AnyIO has no virtual clock for asyncio, and the code under test is the same
backend-neutral reader the real-time tests run on both backends.
"""

from __future__ import annotations

import json
import math
import random

import anyio
import anyio.abc
import httpx2
import pytest
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from bot.slack.socket_mode import (
    BACKOFF_CAP_SECONDS,
    BACKOFF_MIN_SECONDS,
    PONG_TIMEOUT_SECONDS,
    Backoff,
    SocketModeReader,
)
from bot.slack.web_api import SlackWebAPI
from bot.slack.websocket import WebSocketClosed, connect_websocket
from tests.fakes import FakeOpenAI, FakeSlack, slack_server
from tests.fakes.servers import WsprotoLink
from tests.harness import send_dm, wait_reply
from tests.simulation_support import PRODUCTION, forbid_worker_threads, sim_bot

PING = PRODUCTION["socket_ping_interval_seconds"]  # 10 s
assert PING == 10.0 and PONG_TIMEOUT_SECONDS == 5.0 and BACKOFF_CAP_SECONDS == 5.0


def _mock_clock():
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


def virtual_time(test):
    """Trio only, on a MockClock: production timings cost virtual seconds (see the module doc)."""
    return pytest.mark.anyio(pytest.mark.parametrize("anyio_backend", [_mock_clock()], ids=["trio-mockclock"])(test))


HELLO = json.dumps(
    {
        "type": "hello",
        "num_connections": 1,
        "connection_info": {"app_id": "A1"},
        "debug_info": {"host": "raw", "approximate_connection_time": 18060},
    }
)
ENVELOPE = json.dumps(
    {
        "envelope_id": "e-1",
        "type": "events_api",
        "accepts_response_payload": False,
        "retry_attempt": 0,
        "retry_reason": "",
        "payload": {"event": {"type": "message"}},
    }
)
DISCONNECT = json.dumps({"type": "disconnect", "reason": "too_many_websockets"})


class OutageSlack(FakeSlack):
    """A FakeSlack that is down until `down_until` (its own clock): apps.connections.open
    answers `internal_error` (kind "open"), or WebSocket upgrades are refused (kind
    "upgrade"). Every attempt that met the outage is timed in `refused`."""

    def __init__(self, kind: str = "open", **kwargs) -> None:
        super().__init__(**kwargs)
        self.kind = kind
        self.down_until = -math.inf
        self.refused: list[float] = []

    def down(self) -> bool:
        return anyio.current_time() < self.down_until

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        if self.kind == "open" and self.down() and request.url.path.endswith("/apps.connections.open"):
            self.refused.append(anyio.current_time())
            self._changed()
            return httpx2.Response(200, json={"ok": False, "error": "internal_error"})
        return await super().handle(request)

    def claim_ticket(self, url: str) -> None:
        if self.kind == "upgrade" and self.down():
            self.refused.append(anyio.current_time())
            self._changed()
            raise WebSocketClosed("WebSocket upgrade refused (HTTP 503)")
        super().claim_ticket(url)


def _api(fake: FakeSlack, http: httpx2.AsyncClient, base_url: str = "https://slack.test/api/") -> SlackWebAPI:
    return SlackWebAPI(bot_token=fake.bot_token, app_token=fake.app_token, base_url=base_url, client=http)


def _serving(fake: FakeSlack):
    """Live, un-silenced sockets (what the bot can be reached on)."""
    return [c for c in fake.live_connections if not c.silenced]


# ---------------------------------------------------------------- 1. frames with the 101


async def _raw_server(reply: bytes, received: list[str]):
    """A bare AnyIO TCP server: reads the upgrade request, answers with `reply` (the 101
    response and frames behind it) in ONE send, then only listens (text frames it gets go
    to `received`). Never sends anything else."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def serve(stream: anyio.abc.SocketStream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        async with stream:
            while True:
                ws.receive_data(await stream.receive())
                if any(isinstance(e, Request) for e in ws.events()):
                    break
            await stream.send(ws.send(AcceptConnection()) + reply)  # one TCP write
            try:
                while True:
                    ws.receive_data(await stream.receive())
                    received.extend(e.data for e in ws.events() if isinstance(e, TextMessage))
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass

    return listener, port, serve


def _frames(*texts: str, close: bool = False) -> bytes:
    server = WSConnection(ConnectionType.SERVER)  # only for framing: server frames are unmasked
    server.receive_data(
        b"GET /link HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    list(server.events())
    server.send(AcceptConnection())
    data = b"".join(server.send(TextMessage(data=t)) for t in texts)
    return data + (server.send(CloseConnection(code=1000)) if close else b"")


@pytest.mark.anyio
@pytest.mark.parametrize("first", ["receive_text", "take_buffered"])
async def test_frames_in_the_same_tcp_write_as_the_101_are_delivered_at_once(first):
    received: list[str] = []
    listener, port, serve = await _raw_server(_frames(HELLO, ENVELOPE), received)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        with anyio.fail_after(2):  # the server never sends again: waiting would hang
            ws = await connect_websocket(f"ws://127.0.0.1:{port}/link?ticket=1")
            try:
                if first == "receive_text":
                    assert await ws.receive_text() == HELLO
                    assert ws.take_buffered() == [ENVELOPE]
                else:
                    assert ws.take_buffered() == [HELLO, ENVELOPE]
                assert ws.take_buffered() == []
                await ws.send_text(json.dumps({"envelope_id": "e-1"}))
                while not received:
                    await anyio.sleep(0.01)
                assert received == ['{"envelope_id": "e-1"}']
            finally:
                await ws.aclose()
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_close_right_behind_the_101_still_delivers_the_frames_before_it():
    """too_many_websockets: Slack's disconnect frame and close come with the upgrade."""
    listener, port, serve = await _raw_server(_frames(DISCONNECT, close=True), [])
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        with anyio.fail_after(2):
            ws = await connect_websocket(f"ws://127.0.0.1:{port}/link?ticket=1")
            try:
                assert await ws.receive_text() == DISCONNECT
                with pytest.raises(WebSocketClosed):
                    await ws.receive_text()
            finally:
                await ws.aclose()
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_garbled_upgrade_response_is_a_closed_socket_not_a_crash():
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def serve(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.receive()
            await stream.send(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: wrong\r\n\r\n"
            )
            await anyio.sleep(5)

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        with anyio.fail_after(2), pytest.raises(WebSocketClosed, match="protocol error"):
            await connect_websocket(f"ws://127.0.0.1:{port}/link")
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_hello_and_envelopes_in_one_write_are_acked_at_once():
    """Over the fake's real WebSocket server (which sends 101 + hello + the envelopes
    queued by `after_hello` in one write): acked within 100 ms, on the first socket and on
    its make-before-break replacement. Pings are 30 s apart, so nothing else would make the
    bot read again in time."""
    fake = FakeSlack()
    queued: dict[int, tuple[list[str], float]] = {}

    async def queue_envelopes(link: WsprotoLink) -> None:
        ids = [
            await fake.send_event(fake.message_event(f"D{link.id}", "U1", f"queued {i}"), connection=link)
            for i in range(2)
        ]
        queued[link.id] = ids, anyio.current_time()

    seen = []
    with anyio.fail_after(10):
        async with (
            slack_server(fake, after_hello=queue_envelopes) as api_url,
            httpx2.AsyncClient() as http,
            anyio.create_task_group() as tg,
        ):
            reader = SocketModeReader(_api(fake, http, api_url), connect_websocket, seen.append, ping_interval=30)
            tg.start_soon(reader.run)
            for number in (1, 2):
                await fake.wait_until(
                    lambda number=number: number in queued and all(e in fake.acks for e in queued[number][0]), timeout=3
                )
                ids, sent_at = queued[number]
                assert max(fake.acks[e] for e in ids) - sent_at < 0.1
                if number == 1:
                    await reader.connected.wait()
                    await fake.disconnect("refresh_requested")
            await fake.wait_until(lambda: len(fake.live_connections) == 1, timeout=5)
            tg.cancel_scope.cancel()
    assert [e.envelope_id for e in seen] == queued[1][0] + queued[2][0]
    assert reader.reconnects == {"refresh_requested": 1}


# ---------------------------------------------------------------- 2. backoff and outages


def test_backoff_is_jittered_capped_at_five_seconds_and_never_a_hot_loop():
    for seed in range(200):
        backoff = Backoff(rng=random.Random(seed))
        delays = [backoff.next_delay() for _ in range(40)]
        assert all(BACKOFF_MIN_SECONDS <= d <= BACKOFF_CAP_SECONDS for d in delays)
        assert delays[0] <= 0.5
        assert all(d >= BACKOFF_CAP_SECONDS / 2 for d in delays[5:])  # steady state: 2.5–5 s
        backoff.reset()
        assert backoff.next_delay() <= 0.5
    assert len({round(Backoff(rng=random.Random(s)).next_delay(), 6) for s in range(20)}) > 10  # jitter
    assert Backoff(base=0.0, rng=random.Random(1)).next_delay() == BACKOFF_MIN_SECONDS


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["open", "upgrade"])
async def test_after_a_short_outage_the_reader_is_back_within_the_backoff(kind):
    """Real time, both backends: the socket drops and Slack stays down for 1.5 s. The
    reader retries (never two attempts closer than the minimum delay), is back within the
    delay then due (≤ 2 s) of Slack, and acks what is sent then."""
    fake = OutageSlack(kind)
    seen = []
    async with httpx2.AsyncClient(transport=httpx2.MockTransport(fake.handle)) as http:
        reader = SocketModeReader(_api(fake, http), fake.connector, seen.append, ping_interval=1.0)
        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                tg.start_soon(reader.run)
                await reader.connected.wait()
                await anyio.sleep(0.1)
                fake.down_until = anyio.current_time() + 1.5
                await fake.drop()
                await fake.wait_until(lambda: _serving(fake) and not fake.down(), timeout=10)
                back = anyio.current_time() - fake.down_until
                envelope_id = await fake.send_event(fake.message_event("D1", "U1", "after the outage"))
                await fake.wait_acked(envelope_id, timeout=2)
                tg.cancel_scope.cancel()
    assert back <= 2.1  # the pause, then attempts 0.25–0.5, 0.5–1, 1–2 s apart
    assert len(fake.refused) >= 2
    gaps = [b - a for a, b in zip(fake.refused, fake.refused[1:], strict=False)]
    assert min(gaps) >= BACKOFF_MIN_SECONDS * 0.9
    assert [e.envelope_id for e in seen] == [envelope_id]
    assert reader.reconnects == {"dropped": 1}


@virtual_time
@pytest.mark.parametrize("kind", ["open", "upgrade"])
async def test_after_a_15s_outage_the_bot_is_back_within_5s_of_slack(kind, monkeypatch):
    """Production timings on a virtual clock: twenty times, the socket drops and Slack is
    down for 15 s. Each time the bot is connected again at most BACKOFF_CAP_SECONDS after
    Slack is back (with the old 30 s cap it could be ~15 s), and a DM sent then is answered.
    Between outages the socket serves a while, which resets the backoff."""
    offenders = forbid_worker_threads(monkeypatch)  # a thread hop would skew virtual time
    slack, ai = OutageSlack(kind), FakeOpenAI()
    delays = []
    async with sim_bot(slack, ai) as nursery:
        for round_ in range(20):
            await anyio.sleep(30)
            attempts = len(slack.refused)
            slack.down_until = anyio.current_time() + 15
            await slack.drop()
            await slack.wait_until(lambda: _serving(slack), 120)
            delays.append(anyio.current_time() - slack.down_until)
            assert 4 <= len(slack.refused) - attempts <= 10  # retried, but no hot loop
            _, event = await send_dm(slack, f"back {round_}")
            await wait_reply(slack, "D1", event["ts"], f"Echo: back {round_}", timeout=60)
        reconnects = dict(nursery.reader.reconnects)
    print(f"\nreconnected after Slack was back: max {max(delays):.2f}s, {sorted(round(d, 2) for d in delays)}")
    assert min(delays) >= 0 and max(delays) <= BACKOFF_CAP_SECONDS + 0.01
    assert reconnects == {"dropped": 20}
    assert offenders == []


@virtual_time
async def test_sockets_that_die_right_after_hello_do_not_make_the_reader_hot_loop():
    """Slack accepts, says hello, then cuts the socket, for a virtual minute. The backoff
    is only reset by a socket that served STABLE_SOCKET_SECONDS, so the pauses grow to
    2.5–5 s instead of restarting at 0.25 s after every hello (which ran into
    apps.connections.open's rate limit: ~55 sockets a minute)."""
    fake = FakeSlack()
    async with httpx2.AsyncClient(transport=httpx2.MockTransport(fake.handle)) as http:
        reader = SocketModeReader(_api(fake, http), fake.connector, lambda env: None)
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader.run)
            await reader.connected.wait()
            start = anyio.current_time()
            while anyio.current_time() - start < 60:
                await fake.wait_until(lambda: fake.live_connections, 60)
                await anyio.sleep(0.01)  # the reader reads the hello
                await fake.drop()
            flapping = fake.connections_opened
            await fake.wait_until(lambda: fake.live_connections, 60)
            await anyio.sleep(60)  # now it stays up: the next failure starts from 0.25 s again
            await fake.drop()
            dropped_at = anyio.current_time()
            await fake.wait_until(lambda: fake.live_connections, 60)
            tg.cancel_scope.cancel()
    assert 60 / BACKOFF_CAP_SECONDS <= flapping <= 60 / (BACKOFF_CAP_SECONDS / 2) + 6
    assert anyio.current_time() - dropped_at <= 0.5
    assert reader.reconnects == {"dropped": fake.connections_opened - 1}


class _RateLimitedSlack(FakeSlack):
    def __init__(self) -> None:
        super().__init__()
        self.opens: list[float] = []

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.path.endswith("/apps.connections.open"):
            self.opens.append(anyio.current_time())
        return await super().handle(request)


@virtual_time
async def test_a_rate_limited_connections_open_waits_its_retry_after(caplog):
    """Reconnecting after a drop, apps.connections.open is rate limited (429, Retry-After:
    20) beyond the Web API client's own retries: the reader then waits the 20 s too, not
    its 0.25 s backoff."""
    fake = _RateLimitedSlack()
    async with httpx2.AsyncClient(transport=httpx2.MockTransport(fake.handle)) as http:
        api = _api(fake, http)
        reader = SocketModeReader(api, fake.connector, lambda env: None)
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader.run)
            await reader.connected.wait()
            await anyio.sleep(30)
            fake.fail_next("apps.connections.open", status=429, retry_after=20, times=10)
            await fake.drop()
            await fake.wait_until(lambda: fake.live_connections, 600)
            tg.cancel_scope.cancel()
    gaps = [round(b - a, 3) for a, b in zip(fake.opens, fake.opens[1:], strict=False)]
    assert len(gaps) == 11 and min(gaps[1:]) >= 20  # every attempt waited the Retry-After
    assert fake.connections_opened == 2
    assert any(
        "cannot open Socket Mode connection" in r.getMessage() and "retrying in 20.0s" in r.getMessage()
        for r in caplog.records
    )


# ---------------------------------------------------------------- 3. half-open sockets


@virtual_time
async def test_a_half_open_socket_is_replaced_within_15s(monkeypatch):
    """Production 10 s pings on a virtual clock: the socket goes dead (fake `silence()`:
    TCP up, nothing passes, pongs never come) at various points of the ping cycle; each time
    a new socket serves at most ping interval + pong timeout = 15 s later (was 40 s), and
    the DM sent into the dead socket is redelivered there and answered."""
    offenders = forbid_worker_threads(monkeypatch)  # a thread hop would skew virtual time
    slack, ai = FakeSlack(), FakeOpenAI()
    took = []
    async with sim_bot(slack, ai) as nursery:
        for round_, offset in enumerate([0.0, 0.5, 3.0, 7.0, 9.9, 10.0]):
            await anyio.sleep(30 + offset)
            dead = slack.silence()
            silenced_at = anyio.current_time()
            event = slack.message_event("D1", "U1", f"into the void {round_}", channel_type="im")
            await slack.send_event(event, connection=dead)  # never reaches the bot
            await slack.wait_until(lambda: _serving(slack), 120)
            took.append(anyio.current_time() - silenced_at)
            assert len(await slack.redeliver_unacked(after=0)) == 1  # Slack retries it on the new socket
            await wait_reply(slack, "D1", event["ts"], f"Echo: into the void {round_}", timeout=60)
        reconnects = dict(nursery.reader.reconnects)
    print(f"\nhalf-open socket replaced after {[round(t, 2) for t in took]}s")
    assert max(took) <= PING + PONG_TIMEOUT_SECONDS + 0.01
    assert min(took) >= PONG_TIMEOUT_SECONDS  # the last pong counts: never abandoned early
    assert reconnects == {"stale": 6}
    assert offenders == []


@pytest.mark.anyio
async def test_a_half_open_real_socket_is_replaced_quickly():
    """Both backends, real sockets, 0.2 s pings: the pong must be back within one interval,
    so the dead socket is abandoned 0.4 s after the last thing it said."""
    fake = FakeSlack()
    with anyio.fail_after(10):
        async with slack_server(fake) as api_url, httpx2.AsyncClient() as http, anyio.create_task_group() as tg:
            reader = SocketModeReader(_api(fake, http, api_url), connect_websocket, lambda env: None, ping_interval=0.2)
            tg.start_soon(reader.run)
            await reader.connected.wait()
            await anyio.sleep(0.5)
            assert fake.connections[0].pings >= 1 and reader.reconnects == {}  # pongs keep it alive
            dead = fake.silence()
            silenced_at = anyio.current_time()
            await fake.wait_until(lambda: dead.closed, timeout=5)  # the bot abandoned it
            took = anyio.current_time() - silenced_at
            await fake.wait_until(lambda: _serving(fake), timeout=5)
            envelope_id = await fake.send_event(fake.message_event("D1", "U1", "on the new socket"))
            await fake.wait_acked(envelope_id, timeout=2)
            tg.cancel_scope.cancel()
    assert took < 0.65  # ≤ 0.4 s after the last pong (the old 4-interval rule: 0.8–1 s)
    assert reader.reconnects == {"stale": 1}


class _StuckSocket:
    """Says hello, then nothing; its pings never get written (a full send window)."""

    def __init__(self) -> None:
        self.last_activity = anyio.current_time()
        self._hello = True
        self.closed = False

    async def send_text(self, text: str) -> None:
        await anyio.sleep_forever()

    async def send_texts(self, texts: list[str]) -> None:
        await anyio.sleep_forever()

    async def receive_text(self) -> str:
        if self._hello:
            self._hello = False
            self.last_activity = anyio.current_time()
            return HELLO
        await anyio.sleep_forever()

    def take_buffered(self) -> list[str]:
        return []

    async def ping(self) -> None:
        await anyio.sleep_forever()

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.anyio
async def test_a_ping_stuck_in_the_write_does_not_stall_the_watchdog():
    fake = FakeSlack()
    sockets: list[_StuckSocket] = []

    async def connector(url: str) -> _StuckSocket:
        fake.claim_ticket(url)
        sockets.append(_StuckSocket())
        return sockets[-1]

    async with httpx2.AsyncClient(transport=httpx2.MockTransport(fake.handle)) as http:
        reader = SocketModeReader(_api(fake, http), connector, lambda env: None, ping_interval=0.2)
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(reader.run)
                while len(sockets) < 2:
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
    assert sockets[0].closed
    assert reader.reconnects.get("stale", 0) >= 1
