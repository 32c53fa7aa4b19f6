"""A small WebSocket client: wsproto over an AnyIO byte stream (TCP, TLS for wss://).

Why our own: it runs unchanged on Trio and asyncio, adds no second HTTP stack beside
httpx2, and gives the Socket Mode reader exactly the three things it needs — send a
text frame, receive the next text frame, and know when the peer last said anything
(pongs included) so a silent dead socket can be abandoned.

`WebSocket` is the interface the reader uses; `connect_websocket` is the real
implementation. Tests swap in an in-memory one with the same methods.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from typing import Protocol
from urllib.parse import urlsplit

import anyio
import anyio.abc
import certifi
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, ProtocolError

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # Slack envelopes are small; this only stops a runaway peer.


class WebSocketClosed(Exception):
    """The connection is gone: a close frame, a TCP reset, EOF, or a protocol error."""


class WebSocket(Protocol):
    last_activity: float  # anyio.current_time() when the peer last sent anything

    async def send_text(self, text: str) -> None: ...

    async def send_texts(self, texts: list[str]) -> None:
        """Several text messages, in order (in one write where the transport allows:
        the reader acks a burst of envelopes this way)."""

    async def receive_text(self) -> str:
        """The next complete text message. Raises WebSocketClosed when the socket ends."""

    def take_buffered(self) -> list[str]:
        """The complete messages already received behind the last one `receive_text`
        returned, without waiting and without a checkpoint ([] when nothing is)."""

    async def ping(self) -> None: ...

    async def aclose(self) -> None:
        """Close politely, bounded in time (Slack may never finish the TCP close)."""


class Connector(Protocol):
    async def __call__(self, url: str) -> WebSocket: ...


def _ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certifi.where())


async def connect_websocket(url: str, *, timeout: float = 15.0) -> WsprotoWebSocket:
    """Open a WebSocket to `url` (ws:// or wss://) and complete the upgrade handshake."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise WebSocketClosed(f"not a WebSocket URL: {parts.scheme}://{parts.hostname}")
    tls = parts.scheme == "wss"
    port = parts.port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    stream: anyio.abc.ByteStream  # a TCP stream, wrapped in TLS for wss://
    with anyio.fail_after(timeout):
        try:
            if tls:
                stream = await anyio.connect_tcp(
                    parts.hostname,
                    port,
                    tls=True,
                    ssl_context=_ssl_context(),
                    tls_hostname=parts.hostname,
                    tls_standard_compatible=False,
                )
            else:
                stream = await anyio.connect_tcp(parts.hostname, port)
        except OSError as exc:
            raise WebSocketClosed(f"cannot connect to {parts.hostname}:{port}: {exc}") from None
        ws = WsprotoWebSocket(stream)
        try:
            await ws._handshake(host_header, target)
        except BaseException:
            await ws._abort()
            raise
    return ws


class WsprotoWebSocket:
    """The real client. One task reads (the Socket Mode reader); any task may send —
    writes are serialised by an anyio.Lock so frames never interleave."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self._stream = stream
        self._conn = WSConnection(ConnectionType.CLIENT)
        self._send_lock = anyio.Lock()
        self._parts: list[str] = []
        self._size = 0
        self._closed = False
        self._pending: list[str] = []
        self.last_activity = anyio.current_time()

    async def _write(self, *events: Event) -> None:
        """Send `events` (frames, in order) in one write."""
        try:
            data = b"".join(self._conn.send(event) for event in events)
        except LocalProtocolError as exc:
            raise WebSocketClosed(f"cannot send on this socket: {exc}") from None
        async with self._send_lock:
            try:
                await self._stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self._closed = True
                raise WebSocketClosed(f"send failed: {exc!r}") from None

    async def _handshake(self, host: str, target: str) -> None:
        """Send the upgrade request and read up to the 101 response. Frames that came in
        the same TCP read as the 101 (Slack sends its `hello`, and any envelope already
        waiting, right behind it) are parsed at once and wait in `_pending`, so the next
        `receive_text()` / `take_buffered()` returns them without a further read."""
        await self._write(Request(host=host, target=target))
        accepted = False
        while not accepted:
            self._receive(await self._read_chunk())
            for event in self._conn.events():
                if accepted:
                    await self._on_event(event)  # a frame that came with the 101
                elif isinstance(event, AcceptConnection):
                    accepted = True  # keep going: the rest of this read is frames
                elif isinstance(event, (RejectConnection, RejectData)):
                    code = getattr(event, "status_code", "?")
                    raise WebSocketClosed(f"WebSocket upgrade refused (HTTP {code})")

    def _receive(self, data: bytes) -> None:
        """Feed bytes to wsproto; a protocol error ends the socket like any other failure."""
        try:
            self._conn.receive_data(data)
        except ProtocolError as exc:  # a bad HTTP response to the upgrade, data after close
            self._closed = True
            raise WebSocketClosed(f"protocol error: {exc}") from None

    async def _read_chunk(self) -> bytes:
        try:
            data = await self._stream.receive(65536)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._closed = True
            raise WebSocketClosed(f"connection lost: {exc!r}") from None
        self.last_activity = anyio.current_time()
        return data

    async def send_text(self, text: str) -> None:
        if self._closed:
            raise WebSocketClosed("socket is closed")
        await self._write(TextMessage(data=text))

    async def send_texts(self, texts: list[str]) -> None:
        """Several text messages, back to back, in one write (one trip through the event
        loop instead of one per message)."""
        if self._closed:
            raise WebSocketClosed("socket is closed")
        await self._write(*(TextMessage(data=text) for text in texts))

    def take_buffered(self) -> list[str]:
        """The complete messages already received behind the last one `receive_text`
        returned, without waiting (not a checkpoint). Lets the reader ack a burst in one
        write before anything else runs."""
        texts, self._pending = self._pending, []
        return texts

    async def ping(self) -> None:
        if not self._closed:
            await self._write(Ping(payload=b"slackbot-ping"))

    async def receive_text(self) -> str:
        while not self._pending:
            if self._closed:
                raise WebSocketClosed("socket is closed")
            self._receive(await self._read_chunk())
            for event in self._conn.events():
                await self._on_event(event)
        return self._pending.pop(0)

    async def _on_event(self, event: Event) -> None:
        if isinstance(event, TextMessage):
            self._parts.append(event.data)
            self._size += len(event.data)
            if self._size > MAX_MESSAGE_BYTES:
                self._closed = True
                raise WebSocketClosed("message too large")
            if event.message_finished:
                self._pending.append("".join(self._parts))
                self._parts.clear()
                self._size = 0
        elif isinstance(event, Ping):
            await self._write(event.response())
        elif isinstance(event, CloseConnection):
            with contextlib.suppress(WebSocketClosed):
                await self._write(event.response())
            self._closed = True
            if not self._pending:
                raise WebSocketClosed(f"closed by peer: {event.code} {event.reason or ''}".strip())
        elif isinstance(event, (Pong, BytesMessage)):
            pass  # activity already recorded; Slack sends no binary frames

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            with anyio.move_on_after(1.0, shield=True):
                try:
                    data = self._conn.send(CloseConnection(code=1000))
                    async with self._send_lock:
                        await self._stream.send(data)
                except Exception:
                    pass
        await self._abort()

    async def _abort(self) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.aclose_forcefully(self._stream)
