"""Issue 5, observability: the /metrics, /healthz and /readyz listener, the metrics a
request leaves behind, JSON logs, and the watchdog — on Trio and asyncio, with the real
bot in-process (running_bot) and real HTTP to its listener on 127.0.0.1."""

from __future__ import annotations

import io
import json
import logging

import anyio
import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.config import ConfigError, load_settings
from bot.logs import setup_logging
from bot.metrics_server import MAX_HEAD
from bot.storage import StorageError, open_store
from tests.fakes.openai import Behaviour
from tests.harness import eventually, running_bot, send_dm, wait_reply

pytestmark = pytest.mark.anyio

SECRETS = ("xoxb-test-token", "xapp-test-token", "sk-test")


async def get(port: int, path: str, method: str = "GET") -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=5.0) as client:
        return await client.request(method, f"http://127.0.0.1:{port}{path}")


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


class FlakyStore:
    """A real store whose reads can be made to fail, as a locked or lost database does."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.broken = False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def thread_known(self, thread):
        if self.broken:
            raise StorageError("thread_known failed: database is locked")
        return await self.inner.thread_known(thread)


async def test_metrics_endpoint_counts_a_request(slack, ai):
    async with running_bot(slack, ai, metrics_port=0) as nursery:
        port = nursery.metrics_port
        assert port
        _, ev = await send_dm(slack, "hello there")
        await wait_reply(slack, "D1", ev["ts"], "Echo: hello there")
        await eventually(lambda: nursery.outcomes.get("answered") == 1)
        response = await get(port, "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert value(text, "slackbot_events_received_total", type="message") == 1
    assert value(text, "slackbot_envelopes_acked_total") == 1
    assert value(text, "slackbot_ack_latency_seconds_count") == 1
    assert value(text, "slackbot_requests_total", outcome="answered") == 1
    assert value(text, "slackbot_reply_latency_seconds_count", outcome="answered") == 1
    assert value(text, "slackbot_time_to_first_token_seconds_count") == 1
    assert value(text, "slackbot_openai_tokens_total", model="gpt-5-mini", direction="in") > 0
    assert value(text, "slackbot_openai_tokens_total", model="gpt-5-mini", direction="out") == 3  # "Echo: hello there"
    assert value(text, "slackbot_slack_api_calls_total", method="chat.postMessage", result="ok") >= 1
    assert value(text, "slackbot_slack_api_calls_total", method="auth.test", result="ok") == 1
    assert value(text, "slackbot_storage_call_seconds_count", method="finish_request") == 1
    assert value(text, "slackbot_requests_in_flight") == 0
    assert value(text, "slackbot_model_slots_total") == 100
    assert value(text, "slackbot_model_slots_borrowed") == 0
    for name in (
        "slackbot_requests_queued",
        "slackbot_socket_reconnects",
        "slackbot_slack_api_rate_limited",
        "slackbot_request_errors",
    ):
        assert f"# TYPE {name}" in text
    assert not any(secret in text for secret in SECRETS)


async def test_metrics_show_busy_queued_in_flight_errors_and_rate_limits(slack, ai):
    async with running_bot(slack, ai, metrics_port=0, async_max_concurrent_requests=1) as nursery:
        port = nursery.metrics_port
        slack.fail_next("chat.postMessage", status=429, retry_after=0)
        ai.enqueue(Behaviour(text="slow answer", latency=1.0), Behaviour(status=401))
        _, first = await send_dm(slack, "first", channel="D1")
        await eventually(lambda: len(ai.requests) == 1)
        await send_dm(slack, "again", channel="D1", thread_ts=first["ts"])  # same thread: busy
        _, other = await send_dm(slack, "other", channel="D2")  # waits for the one model slot
        await eventually(lambda: nursery.services.model_slots.statistics().tasks_waiting == 1)
        during = (await get(port, "/metrics")).text
        await wait_reply(slack, "D2", other["ts"], "API key")
        await eventually(lambda: not nursery.active)
        after = (await get(port, "/metrics")).text
    assert value(during, "slackbot_requests_in_flight") == 2
    assert value(during, "slackbot_requests_queued") == 1
    assert value(during, "slackbot_model_slots_borrowed") == 1
    assert value(after, "slackbot_requests_total", outcome="busy") == 1
    assert value(after, "slackbot_requests_total", outcome="queued") == 1
    assert value(after, "slackbot_requests_total", outcome="answered") == 1
    assert value(after, "slackbot_requests_total", outcome="error") == 1
    assert value(after, "slackbot_request_errors_total", kind="openai_auth") == 1
    assert value(after, "slackbot_slack_api_rate_limited_total", method="chat.postMessage") == 1
    assert value(after, "slackbot_events_received_total", type="message") == 3


async def test_socket_reconnects_are_counted_by_reason(slack, ai):
    async with running_bot(slack, ai, metrics_port=0) as nursery:
        await slack.disconnect("refresh_requested")
        await eventually(lambda: nursery.reader.reconnects.get("refresh_requested") == 1)
        text = (await get(nursery.metrics_port, "/metrics")).text
    assert value(text, "slackbot_socket_reconnects_total", reason="refresh_requested") == 1


async def test_healthz_and_unknown_paths_and_methods(slack, ai):
    async with running_bot(slack, ai, metrics_port=0) as nursery:
        port = nursery.metrics_port
        health = await get(port, "/healthz")
        missing = await get(port, "/nope")
        post = await get(port, "/metrics", method="POST")
        head = await get(port, "/healthz", method="HEAD")
    assert (health.status_code, health.text) == (200, "ok\n")
    assert missing.status_code == 404
    assert post.status_code == 405
    assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == "3"


async def test_keep_alive_and_a_malformed_request(slack, ai):
    async with running_bot(slack, ai, metrics_port=0) as nursery:
        port = nursery.metrics_port
        async with httpx2.AsyncClient(timeout=5.0) as client:  # one connection, two requests
            first = await client.get(f"http://127.0.0.1:{port}/healthz")
            second = await client.get(f"http://127.0.0.1:{port}/readyz")
        assert (first.status_code, second.status_code) == (200, 200)
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"NOT HTTP AT ALL\r\n\r\n")
            reply = await stream.receive()
        assert reply.startswith(b"HTTP/1.1 400")
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:  # an oversized head is refused
            await stream.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEAD + 10))
            reply = await stream.receive()
        assert reply.startswith(b"HTTP/1.1 4")
        assert (await get(port, "/healthz")).status_code == 200  # still serving


async def test_an_idle_connection_is_closed(slack, ai, monkeypatch):
    monkeypatch.setattr("bot.metrics_server.IDLE_TIMEOUT", 0.2)
    async with (
        running_bot(slack, ai, metrics_port=0) as nursery,
        await anyio.connect_tcp("127.0.0.1", nursery.metrics_port) as stream,
    ):
        with anyio.fail_after(3), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await stream.receive()  # the server hangs up on a client that says nothing


async def test_readyz_follows_the_socket(slack, ai):
    async with running_bot(slack, ai, metrics_port=0) as nursery:
        port = nursery.metrics_port
        ready = await get(port, "/readyz")
        assert (ready.status_code, ready.text) == (200, "ready\n")
        slack.fail_next("apps.connections.open", times=3)  # reconnecting takes a few backoffs
        await slack.drop()
        await eventually(lambda: nursery.reader.ready_sockets == 0)
        down = await get(port, "/readyz")
        assert down.status_code == 503 and "Socket Mode" in down.text
        await eventually(lambda: nursery.reader.ready_sockets == 1, timeout=15)
        assert (await get(port, "/readyz")).status_code == 200


async def test_readyz_follows_storage(slack, ai):
    store = FlakyStore(await open_store("sqlite:///:memory:"))
    try:
        async with running_bot(slack, ai, store=store, metrics_port=0) as nursery:
            port = nursery.metrics_port
            assert (await get(port, "/readyz")).status_code == 200
            store.broken = True
            down = await get(port, "/readyz")
            assert down.status_code == 503 and "storage unavailable (StorageError)" in down.text
            assert (await get(port, "/healthz")).status_code == 200  # alive, just not ready
            store.broken = False
            assert (await get(port, "/readyz")).status_code == 200
            text = (await get(port, "/metrics")).text
        assert value(text, "slackbot_storage_call_seconds_count", method="thread_known") >= 2
    finally:
        await store.inner.aclose()


async def test_no_listener_unless_metrics_port_is_set(slack, ai):
    async with running_bot(slack, ai) as nursery:
        assert nursery.metrics_port is None


# ---------------------------------------------------------------- logs and watchdog


@pytest.fixture
def json_log():
    """The real `setup_logging(fmt="json")`, writing to a buffer instead of stderr."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging("INFO", SECRETS, "json")
    buffer = io.StringIO()
    root.handlers[0].setStream(buffer)
    try:
        yield buffer
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def parse_lines(buffer: io.StringIO) -> list[dict]:
    lines = buffer.getvalue().splitlines()
    assert lines
    return [json.loads(line) for line in lines]  # every line is one JSON object


async def test_json_log_lines_parse_and_carry_fields_but_no_tokens(slack, ai, json_log):
    async with running_bot(slack, ai):
        _, ev = await send_dm(slack, "a secret question nobody should read in logs")
        await wait_reply(slack, "D1", ev["ts"], "Echo:")
        logging.getLogger("bot.test").info("token xoxb-test-token and sk-test here", extra={"leak": "xapp-test-token"})
    entries = parse_lines(json_log)
    raw = json_log.getvalue()
    assert not any(secret in raw for secret in SECRETS)
    assert "secret question" not in raw  # no message body at INFO
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys()
    done = [e for e in entries if e.get("outcome") == "answered"]
    assert len(done) == 1
    assert done[0]["request_id"] and done[0]["slack_thread"] == f"D1/{ev['ts']}"
    assert isinstance(done[0]["duration_s"], float)
    leaked = next(e for e in entries if e["logger"] == "bot.test")
    assert leaked["message"] == "token [redacted] and [redacted] here" and leaked["leak"] == "[redacted]"


async def test_json_log_keeps_tracebacks_redacted(json_log):
    try:
        raise ValueError("bad token xoxb-test-token")
    except ValueError:
        logging.getLogger("bot.test").exception("failed")
    (entry,) = parse_lines(json_log)
    assert entry["level"] == "ERROR" and "ValueError" in entry["exception"]
    assert "xoxb-test-token" not in json_log.getvalue()


async def test_watchdog_logs_a_long_request_every_interval(slack, ai, json_log):
    ai.enqueue(Behaviour(hang=True))

    def watch_lines():
        return [e for e in parse_lines(json_log) if "stage" in e and e["level"] == "WARNING"]

    async with running_bot(
        slack,
        ai,
        watchdog_interval_seconds=0.2,
        watchdog_threshold_seconds=0.1,
        async_timeout_seconds=60.0,
        stream_idle_timeout_seconds=60.0,
    ):
        _, ev = await send_dm(slack, "this will hang")
        # Polled, not slept: on a loaded machine the intervals stretch, the behaviour does not.
        await eventually(lambda: len(w := watch_lines()) >= 4 and w[-1]["age_s"] >= 0.8, timeout=20)
    watch = watch_lines()
    assert len(watch) >= 4  # one per 0.2 s interval while the request hangs
    ages = [e["age_s"] for e in watch]
    assert ages == sorted(ages) and ages[-1] >= 0.8
    assert all(e["stage"] for e in watch) and watch[-1]["stage"] == "streaming"
    assert all(e["slack_thread"] == f"D1/{ev['ts']}" for e in watch)


def test_observability_settings():
    base = {"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xapp-1", "OPENAI_API_KEY": "sk-1"}
    settings = load_settings(base, dotenv_path=None)
    assert (
        settings.observability.metrics_port,
        settings.observability.metrics_host,
        settings.observability.log_format,
    ) == (None, "127.0.0.1", "text")
    settings = load_settings(
        {
            **base,
            "METRICS_PORT": "9102",
            "METRICS_HOST": "0.0.0.0",
            "LOG_FORMAT": "JSON",
            "WATCHDOG_INTERVAL_SECONDS": "5",
            "WATCHDOG_THRESHOLD_SECONDS": "30",
        },
        dotenv_path=None,
    )
    assert (
        settings.observability.metrics_port,
        settings.observability.metrics_host,
        settings.observability.log_format,
    ) == (9102, "0.0.0.0", "json")
    assert (settings.observability.watchdog_interval_seconds, settings.observability.watchdog_threshold_seconds) == (
        5.0,
        30.0,
    )
    for bad in (
        {"METRICS_PORT": "http"},
        {"METRICS_PORT": "70000"},
        {"LOG_FORMAT": "xml"},
        {"WATCHDOG_INTERVAL_SECONDS": "0"},
    ):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            load_settings({**base, **bad}, dotenv_path=None)
