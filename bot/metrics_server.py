"""The operator's HTTP listener (METRICS_PORT, off by default): /metrics, /healthz, /readyz.

A minimal HTTP/1.1 server on AnyIO and h11, so it runs unchanged on Trio and asyncio, as
one more child task of the nursery's task group (its connections are tasks of a group
inside that task, so they end with it):

- `GET /metrics`  Prometheus text format (the `Metrics` object's private registry);
- `GET /healthz`  200 while the process is alive and its event loop answers;
- `GET /readyz`   200 when a Socket Mode connection has said hello and storage answers
                  a read within `READY_STORAGE_TIMEOUT`, else 503 with the reason.

GET and HEAD only; keep-alive is honoured; a connection idle for `IDLE_TIMEOUT` or
sending an oversized head is closed; at most `MAX_CONNECTIONS` are served at once.
Nothing here reads a token or a message, so nothing here can leak one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial

import anyio
import anyio.abc
import h11

from bot.metrics import CONTENT_TYPE, Metrics
from bot.storage.base import Store, ThreadKey

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 10.0
MAX_HEAD = 16 * 1024
MAX_CONNECTIONS = 32
READY_STORAGE_TIMEOUT = 2.0
READY_PROBE_THREAD = ThreadKey("readyz", "0")  # a read-only lookup; never written

Readiness = Callable[[], Awaitable[tuple[bool, str]]]
Response = tuple[int, str, bytes]  # status, content type, body


async def check_ready(socket_ready: Callable[[], bool], store: Store) -> tuple[bool, str]:
    """(ready, reason): a live Socket Mode connection, and storage answering a read."""
    if not socket_ready():
        return False, "no Socket Mode connection"
    try:
        with anyio.fail_after(READY_STORAGE_TIMEOUT):
            await store.thread_known(READY_PROBE_THREAD)
    except TimeoutError:
        return False, f"storage did not answer within {READY_STORAGE_TIMEOUT:g}s"
    except Exception as exc:
        return False, f"storage unavailable ({type(exc).__name__})"
    return True, "ready"


async def serve_endpoints(
    metrics: Metrics,
    readiness: Readiness,
    host: str,
    port: int,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on host:port until cancelled; `task_status.started(bound_port)` once listening."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    bound = listener.extra(anyio.abc.SocketAttribute.local_port)
    log.info("metrics and health endpoints on http://%s:%d/ (/metrics, /healthz, /readyz)", host, bound)
    open_connections = 0

    async def serve_one(stream: anyio.abc.SocketStream) -> None:
        nonlocal open_connections
        async with stream:
            if open_connections >= MAX_CONNECTIONS:
                return
            open_connections += 1
            try:
                await _serve_connection(stream, partial(_route, metrics, readiness))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError):
                pass
            finally:
                open_connections -= 1

    async with listener:
        task_status.started(bound)
        await listener.serve(serve_one)


async def _route(metrics: Metrics, readiness: Readiness, method: str, path: str) -> Response:
    if method not in ("GET", "HEAD"):
        return 405, "text/plain; charset=utf-8", b"method not allowed\n"
    if path == "/metrics":
        return 200, CONTENT_TYPE, metrics.render()
    if path == "/healthz":
        return 200, "text/plain; charset=utf-8", b"ok\n"
    if path == "/readyz":
        ready, reason = await readiness()
        return (200 if ready else 503), "text/plain; charset=utf-8", f"{reason}\n".encode()
    return 404, "text/plain; charset=utf-8", b"not found\n"


async def _serve_connection(stream: anyio.abc.ByteStream, route: Callable[[str, str], Awaitable[Response]]) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    while True:
        request = None
        with anyio.move_on_after(IDLE_TIMEOUT):
            try:
                request = await _next_request(stream, conn)
            except h11.RemoteProtocolError as exc:  # malformed, or a head over MAX_HEAD (431)
                await _send(
                    stream, conn, exc.error_status_hint, "text/plain; charset=utf-8", b"bad request\n", head_only=False
                )
                return
        if request is None:
            return  # closed, or idle too long
        method = request.method.decode("ascii", "replace")
        path = request.target.decode("ascii", "replace").split("?", 1)[0]
        status, content_type, body = await route(method, path)
        await _send(stream, conn, status, content_type, body, head_only=method == "HEAD")
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return  # Connection: close, or a request body we did not read to its end
        conn.start_next_cycle()


async def _next_request(stream: anyio.abc.ByteStream, conn: h11.Connection) -> h11.Request | None:
    request = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive()
            except anyio.EndOfStream:
                data = b""
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage):
            return request
        elif isinstance(event, h11.Data):
            continue  # a body on GET is ignored
        else:  # ConnectionClosed or PAUSED
            return None


async def _send(
    stream: anyio.abc.ByteStream, conn: h11.Connection, status: int, content_type: str, body: bytes, *, head_only: bool
) -> None:
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
    try:
        data = conn.send(h11.Response(status_code=status, headers=headers))
        if not head_only:
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
    except h11.LocalProtocolError:
        return
    await stream.send(data)
