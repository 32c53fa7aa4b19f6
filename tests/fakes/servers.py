"""Serve the fakes over real sockets on 127.0.0.1, for end-to-end tests of the bot process.

Pure AnyIO (trio and asyncio): h11 for HTTP/1.1 (keep-alive, Content-Length or chunked
request bodies; streamed responses go out chunked, one write per chunk, so SSE arrives
incrementally) and wsproto for Socket Mode. A client that disconnects mid-stream is
noticed at once, even while the body is idle, and the body is closed, so
`FakeOpenAI.open_streams` drops back to 0.

    async with openai_server(fake_openai) as base_url: ...   # http://127.0.0.1:<port>/v1/
    async with slack_server(fake_slack) as api_url: ...      # http://127.0.0.1:<port>/api/

Socket Mode upgrades are answered the way Slack does it: the 101 response, the `hello`
frame (and whatever `after_hello` sends, e.g. envelopes that were waiting) go out in ONE
TCP write, so the client's first read holds frames behind the handshake.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import anyio
import anyio.abc
import h11
import httpx2
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, CloseConnection, Ping, RejectConnection, Request, TextMessage
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from bot.slack.websocket import WebSocketClosed

from .openai import FakeOpenAI
from .slack import FakeSlack, Link

log = logging.getLogger(__name__)

Handler = Callable[[httpx2.Request], Awaitable[httpx2.Response]]
_GONE = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)
_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length"}
MAX_HEAD = 64 * 1024


@asynccontextmanager
async def _tcp_server(on_connection: Callable[[anyio.abc.SocketStream, int], Awaitable[None]]) -> AsyncIterator[int]:
    """Listen on 127.0.0.1 (a free port) until the block exits; yields the port. Every
    connection task closes its socket when it ends or the server stops."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def serve_one(stream: anyio.abc.SocketStream) -> None:
        try:
            await on_connection(stream, port)
        except _GONE:
            pass
        except Exception:
            log.exception("fake server connection failed")
        finally:
            await anyio.aclose_forcefully(stream)

    error: BaseException | None = None
    try:
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, serve_one)
            try:
                yield port
            finally:
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        error = group.exceptions[0]
    if error is not None:
        # Connection tasks never fail, so the group only wraps the caller's own exception
        # (a failed assert, a TimeoutError): re-raise it bare, as if there were no server.
        raise error


async def _read_head(stream: anyio.abc.SocketStream) -> bytes:
    """Bytes up to the end of the first request head (and whatever came with them)."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEAD:
            raise anyio.EndOfStream
        data += await stream.receive()
    return data


def _is_websocket(head: bytes) -> bool:
    lines = head.split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")
    return any(line.startswith(b"upgrade:") and b"websocket" in line for line in lines)


# ---------------------------------------------------------------- HTTP/1.1


async def _serve_http(stream: anyio.abc.SocketStream, handler: Handler, port: int, data: bytes = b"") -> None:
    conn = h11.Connection(h11.SERVER)
    if data:  # (h11 takes b"" to mean EOF)
        conn.receive_data(data)
    while True:
        received = await _next_request(stream, conn)
        if received is None:
            return
        head, body = received
        request = httpx2.Request(
            head.method.decode(),
            f"http://127.0.0.1:{port}{head.target.decode()}",
            headers=[(k, v) for k, v in head.headers if k not in (b"transfer-encoding",)],
            content=body,
        )
        try:
            response = await handler(request)
        except Exception:
            log.exception("fake handler failed for %s %s", request.method, request.url)
            response = httpx2.Response(500, text="fake handler failed")
        if not await _send_response(stream, conn, response) or conn.our_state is not h11.DONE:
            return
        if conn.their_state is not h11.DONE:
            return
        conn.start_next_cycle()


async def _next_request(stream: anyio.abc.SocketStream, conn: h11.Connection) -> tuple[h11.Request, bytes] | None:
    head, body = None, bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return None
        if event is h11.NEED_DATA:
            try:
                conn.receive_data(await stream.receive())
            except anyio.EndOfStream:
                conn.receive_data(b"")
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return head, bytes(body)
        else:  # ConnectionClosed, or PAUSED on a misbehaving client
            return None


async def _send_response(stream: anyio.abc.SocketStream, conn: h11.Connection, response: httpx2.Response) -> bool:
    """Write `response`; False when the connection must be closed (client gone, body broke)."""
    headers = [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP_BY_HOP]
    if "content-length" in response.headers:
        body = await response.aread()
        await stream.send(
            conn.send(
                h11.Response(
                    status_code=response.status_code, headers=[*headers, (b"content-length", str(len(body)).encode())]
                )
            )
        )
        await stream.send(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        return True
    await stream.send(
        conn.send(
            h11.Response(status_code=response.status_code, headers=[*headers, (b"transfer-encoding", b"chunked")])
        )
    )
    finished = False
    async with anyio.create_task_group() as tg:

        async def watch_client() -> None:
            """Notice a client that hangs up while the body is idle (a stalled stream)."""
            try:
                while True:
                    conn.receive_data(await stream.receive())  # a pipelined next request is kept
            except _GONE:
                tg.cancel_scope.cancel()

        tg.start_soon(watch_client)
        body = response.aiter_raw()
        try:
            async for chunk in body:
                if chunk:
                    await stream.send(conn.send(h11.Data(data=chunk)))
            await stream.send(conn.send(h11.EndOfMessage()))
            finished = True
        except _GONE:
            pass
        except Exception as exc:
            log.debug("response body failed (%r); cutting the connection", exc)
        finally:
            with anyio.CancelScope(shield=True):
                await body.aclose()
                await response.aclose()
            tg.cancel_scope.cancel()
    return finished


@asynccontextmanager
async def http_server(handler: Handler) -> AsyncIterator[str]:
    """Serve `handler` (an httpx2 request -> response coroutine) over HTTP/1.1; yields
    `http://127.0.0.1:<port>`."""
    async with _tcp_server(lambda stream, port: _serve_http(stream, handler, port)) as port:
        yield f"http://127.0.0.1:{port}"


@asynccontextmanager
async def openai_server(fake: FakeOpenAI) -> AsyncIterator[str]:
    """Yields the base URL for `AsyncOpenAI(base_url=...)`: `http://127.0.0.1:<port>/v1/`."""
    async with http_server(fake.handle) as url:
        yield f"{url}/v1/"


# ---------------------------------------------------------------- WebSocket (Socket Mode)


class WsprotoLink(Link):
    """The server side of a real Socket Mode connection. One task (`run`) reads; the fake
    writes from any task, serialised by a lock.

    While `corked` (from the 101 response until `uncork`), writes are collected instead of
    sent, and `uncork` sends them all in one TCP write."""

    def __init__(
        self, fake: FakeSlack, stream: anyio.abc.SocketStream, ws: WSConnection, *, corked: bytes | None = None
    ) -> None:
        super().__init__(fake)
        self._stream, self._ws = stream, ws
        self._lock = anyio.Lock()
        self._deadline = math.inf  # when `run` stops waiting for the client
        self._scope: anyio.CancelScope | None = None
        self._corked: list[bytes] | None = None if corked is None else [corked]
        self._stream_gone = False  # abort() closed the stream: nothing more can be sent

    async def uncork(self) -> None:
        """Send everything written while corked, in one write; from now on write at once."""
        async with self._lock:
            data, self._corked = b"".join(self._corked or ()), None
            if data and not self._stream_gone:
                try:
                    await self._stream.send(data)
                except _GONE:
                    self._mark_closed()

    def _set_deadline(self, deadline: float) -> None:
        self._deadline = deadline
        if self._scope is not None:
            self._scope.deadline = deadline

    def close_later(self, delay: float) -> None:
        super().close_later(delay)
        self._set_deadline(self.close_deadline)

    async def _write(self, event) -> None:
        try:
            data = self._ws.send(event)
        except LocalProtocolError:
            return
        if self._corked is not None:
            self._corked.append(data)  # goes out with the 101 (see uncork)
            return
        async with self._lock:
            try:
                await self._stream.send(data)
            except _GONE:
                self._mark_closed()

    async def send(self, text: str) -> None:
        if self.live and not self.silenced:
            await self._write(TextMessage(data=text))

    async def close(self) -> None:
        if not self.closed:
            self._mark_closed()
            await self._write(CloseConnection(code=1000))
            self._set_deadline(anyio.current_time() + 1.0)  # wait ≤1 s for the client's close

    async def abort(self) -> None:
        self._mark_closed()
        self._stream_gone = True
        self._set_deadline(-math.inf)
        await anyio.aclose_forcefully(self._stream)

    async def run(self) -> None:
        parts: list[str] = []
        try:
            while True:
                with anyio.CancelScope(deadline=self._deadline) as self._scope:
                    data = await self._stream.receive()
                if self._scope.cancelled_caught:
                    if self.closed:
                        return  # our close went unanswered (or we aborted)
                    await self.close()  # the grace period after `disconnect` ran out
                    continue
                self._ws.receive_data(data)
                for event in self._ws.events():
                    if isinstance(event, TextMessage):
                        parts.append(event.data)
                        if event.message_finished:
                            text, parts = "".join(parts), []
                            if not self.silenced:
                                self.fake._on_client_frame(self, text)
                    elif isinstance(event, Ping) and not self.silenced:
                        self.pings += 1
                        self.fake._changed()
                        await self._write(event.response())
                    elif isinstance(event, CloseConnection):
                        if self._ws.state is ConnectionState.REMOTE_CLOSING:
                            await self._write(event.response())
                        return
        except (*_GONE, RemoteProtocolError):
            return
        finally:
            self._mark_closed()
            await anyio.aclose_forcefully(self._stream)


AfterHello = Callable[[WsprotoLink], Awaitable[None]]


async def _serve_websocket(
    stream: anyio.abc.SocketStream,
    fake: FakeSlack,
    head: bytes,
    *,
    one_write: bool = True,
    after_hello: AfterHello | None = None,
) -> None:
    ws = WSConnection(ConnectionType.SERVER)
    ws.receive_data(head)
    request = next((e for e in ws.events() if isinstance(e, Request)), None)
    if request is None:
        return
    try:
        if urlsplit(request.target).path.rstrip("/") != "/link":
            raise WebSocketClosed("not found")
        fake.claim_ticket(request.target)
    except WebSocketClosed:
        await stream.send(ws.send(RejectConnection(status_code=403)))
        return
    accept = ws.send(AcceptConnection())
    if one_write:  # as Slack does: 101 + hello (+ after_hello's frames) in one TCP write
        link = WsprotoLink(fake, stream, ws, corked=accept)
    else:
        await stream.send(accept)
        link = WsprotoLink(fake, stream, ws)
    try:
        await fake.attach(link)
        if after_hello is not None and not link.closed:
            await after_hello(link)
    finally:
        with anyio.CancelScope(shield=True):
            await link.uncork()
    await link.run()


@asynccontextmanager
async def slack_server(
    fake: FakeSlack, *, one_write: bool = True, after_hello: AfterHello | None = None
) -> AsyncIterator[str]:
    """Serve the Web API, file downloads/uploads and Socket Mode (WebSocket upgrades on
    `/link`) on one port. Sets `fake.ws_url` to `ws://127.0.0.1:<port>/link` (and
    `fake.files_url` to the server's origin) while running; yields the Web API
    base URL `http://127.0.0.1:<port>/api/`.

    An accepted upgrade gets the 101 response and `hello` in one TCP write, with
    whatever `after_hello(link)` sends on the new link (e.g.
    `fake.send_event(..., connection=link)`: envelopes queued for a new socket) in the
    same write. `one_write=False` sends the 101 on its own first."""

    async def on_connection(stream: anyio.abc.SocketStream, port: int) -> None:
        head = await _read_head(stream)
        if _is_websocket(head):
            await _serve_websocket(stream, fake, head, one_write=one_write, after_hello=after_hello)
        else:
            await _serve_http(stream, fake.handle, port, head)

    previous = fake.ws_url, fake.files_url
    async with _tcp_server(on_connection) as port:
        fake.ws_url = f"ws://127.0.0.1:{port}/link"
        fake.files_url = f"http://127.0.0.1:{port}"  # url_private of files added from now on
        try:
            yield f"http://127.0.0.1:{port}/api/"
        finally:
            fake.ws_url, fake.files_url = previous
