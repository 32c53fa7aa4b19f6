"""End to end: the real `slackbot` process against the fakes, over real sockets.

Each test starts `python -m bot` in a fresh temporary directory (so no `.env` is read)
with a minimal environment pointing it at a fake Slack (Web API + Socket Mode over a
real WebSocket) and a fake OpenAI server (real HTTP, SSE streaming), both on 127.0.0.1
and served from this test process. The test process runs on both AnyIO backends; the
bot runs on Trio or asyncio (BOT_ASYNC_BACKEND), so every pairing is exercised.

Nothing here can hang: the process is killed in a `finally` with bounded waits, and
its stdout/stderr are read concurrently into buffers so the pipes never fill.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import pytest

from bot.processing.failures import INTERRUPTED_NOTICE
from bot.storage import ThreadKey, open_store
from tests.fakes import Behaviour, FakeOpenAI, FakeSlack, openai_server, slack_server
from tests.harness import send_dm, wait_reply

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

REPO_ROOT = Path(__file__).resolve().parent.parent
BOT_TOKEN = "xoxb-test-token"
APP_TOKEN = "xapp-test-token"
API_KEY = "sk-test"
SECRETS = (BOT_TOKEN, APP_TOKEN, API_KEY)
READY_TIMEOUT = 15.0  # process start (imports) + auth.test + socket hello


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    """The test process (and the fakes it serves) runs on both backends."""
    return request.param


def base_env(
    tmp_path: Path, *, backend: str, slack_url: str | None = None, openai_url: str | None = None, **extra: str
) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "PYTHONPATH": str(REPO_ROOT),
        "SLACK_BOT_TOKEN": BOT_TOKEN,
        "SLACK_APP_TOKEN": APP_TOKEN,
        "OPENAI_API_KEY": API_KEY,
        "DATABASE_URL": f"sqlite:///{tmp_path}/bot.db",
        "LOG_LEVEL": "INFO",
        "SOCKET_PING_INTERVAL_SECONDS": "1",
        "SHUTDOWN_GRACE_SECONDS": "1",
        "ASYNC_TIMEOUT_SECONDS": "30",
        "BOT_ASYNC_BACKEND": backend,
    }
    if slack_url is not None:
        env["SLACK_API_URL"] = slack_url
    if openai_url is not None:
        env["OPENAI_BASE_URL"] = openai_url
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


@dataclass
class BotProcess:
    process: anyio.abc.Process
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)

    @property
    def log(self) -> str:
        return self.stderr.decode("utf-8", errors="replace")

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def wait_log(self, needle: str, timeout: float = 10.0) -> None:
        with anyio.fail_after(timeout):
            while needle not in self.log:
                if self.process.returncode is not None:
                    await anyio.sleep(0.1)  # let the readers take the last bytes
                    if needle in self.log:
                        return
                    raise AssertionError(
                        f"bot exited ({self.process.returncode}) before logging {needle!r}:\n{self.log}"
                    )
                await anyio.sleep(0.02)

    async def wait_exit(self, timeout: float) -> int:
        with anyio.fail_after(timeout):
            return await self.process.wait()

    def assert_no_secrets(self) -> None:
        out = self.log + self.stdout.decode("utf-8", errors="replace")
        for secret in SECRETS:
            assert secret not in out, f"a token leaked into the bot's output: {secret[:5]}…"


@asynccontextmanager
async def bot_process(tmp_path: Path, env: dict[str, str]) -> AsyncIterator[BotProcess]:
    """Run `python -m bot` for the duration of the block; always killed (bounded) on exit.
    A failure inside the block is re-raised bare, with the bot's stderr attached as a note."""
    workdir = tmp_path / "cwd"
    workdir.mkdir(exist_ok=True)
    process = await anyio.open_process(
        [sys.executable, "-m", "bot"], cwd=str(workdir), env=env, stdin=subprocess.DEVNULL
    )
    bot = BotProcess(process)
    drained = [anyio.Event(), anyio.Event()]

    async def drain(stream: anyio.abc.ByteReceiveStream | None, into: bytearray, done: anyio.Event) -> None:
        try:
            if stream is not None:
                async for chunk in stream:
                    into += chunk
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            pass
        finally:
            done.set()

    error: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, process.stdout, bot.stdout, drained[0])
            tg.start_soon(drain, process.stderr, bot.stderr, drained[1])
            try:
                yield bot
            finally:
                with anyio.CancelScope(shield=True):
                    if process.returncode is None:
                        process.kill()
                    with anyio.move_on_after(5):
                        await process.wait()
                    with anyio.move_on_after(2):  # the readers end at EOF; never wait for ever
                        for done in drained:
                            await done.wait()
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # Trio wraps the block's own exception: unwrap it
        if len(group.exceptions) != 1 or not isinstance(group.exceptions[0], Exception):
            raise
        error = group.exceptions[0]
    except Exception as exc:
        error = exc
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await process.aclose()
    if error is not None:
        error.add_note(f"--- bot stderr (exit code {process.returncode}) ---\n{bot.log}")
        raise error


@asynccontextmanager
async def running(
    tmp_path: Path, *, backend: str, slack: FakeSlack | None = None, ai: FakeOpenAI | None = None, **extra_env: str
) -> AsyncIterator[tuple[BotProcess, FakeSlack, FakeOpenAI]]:
    """Fakes on real sockets, plus the bot process connected to them (first socket live)."""
    slack = slack or FakeSlack(bot_token=BOT_TOKEN, app_token=APP_TOKEN)
    ai = ai or FakeOpenAI(api_key=API_KEY)
    async with slack_server(slack) as slack_url, openai_server(ai) as openai_url:
        env = base_env(tmp_path, backend=backend, slack_url=slack_url, openai_url=openai_url, **extra_env)
        async with bot_process(tmp_path, env) as bot:
            await bot.wait_log("socket #1 ready", READY_TIMEOUT)
            yield bot, slack, ai


@pytest.fixture(params=["trio", "asyncio"])
def bot_backend(request):
    """BOT_ASYNC_BACKEND for the bot process."""
    return request.param


@pytest.mark.parametrize("bot_backend", ["trio", "asyncio", "uvloop"])  # uvloop: here, not in every e2e test
async def test_dm_is_answered_in_its_thread(tmp_path, bot_backend):
    async with running(tmp_path, backend=bot_backend) as (bot, slack, ai):
        await bot.wait_log(f"starting on {bot_backend} ")
        eid, ev = await send_dm(slack, "hello over real sockets")
        assert await slack.wait_acked(eid) >= slack.deliveries[eid].sent_at
        replies = await wait_reply(slack, "D1", ev["ts"], "Echo: hello over real sockets")
        assert replies == ["Echo: hello over real sockets"]
        assert slack.messages["D1"][-1]["thread_ts"] == ev["ts"]  # the reply is in the DM's thread
        await bot.wait_log("answered after")
        bot.assert_no_secrets()
    assert len(ai.requests) == 1
    assert ai.requests[0]["messages"][-1] == {"role": "user", "content": "hello over real sockets"}


async def test_channel_mention_is_answered(tmp_path, bot_backend):
    async with running(tmp_path, backend=bot_backend) as (_bot, slack, ai):
        mention = slack.app_mention_event("C1", "U1", "what is the plan?")
        twin = slack.message_event("C1", "U1", mention["text"], ts=mention["ts"], channel_type="channel")
        eids = [await slack.send_event(mention), await slack.send_event(twin)]  # Slack sends both
        replies = await wait_reply(slack, "C1", mention["ts"], "Echo: what is the plan?")
        for eid in eids:
            await slack.wait_acked(eid)
        await anyio.sleep(0.3)
        assert slack.bot_replies("C1", mention["ts"]) == replies == ["Echo: what is the plan?"]
    assert len(ai.requests) == 1
    assert ai.requests[0]["messages"][-1]["content"] == "what is the plan?"  # the mention itself is stripped


async def test_a_burst_is_acked_at_once_and_each_event_answered_once(tmp_path, bot_backend):
    """Envelopes sent back to back reach the bot in few reads; each is acked and answered once."""
    async with running(tmp_path, backend=bot_backend) as (_bot, slack, ai):
        sent = [await send_dm(slack, f"burst {i}", channel=f"D{i}") for i in range(30)]
        for i, (eid, ev) in enumerate(sent):
            await slack.wait_acked(eid)
            await wait_reply(slack, f"D{i}", ev["ts"], f"Echo: burst {i}")
        await anyio.sleep(0.3)
        assert all(slack.bot_replies(f"D{i}", ev["ts"]) == [f"Echo: burst {i}"] for i, (_, ev) in enumerate(sent))
    assert len(ai.requests) == 30


async def test_refresh_and_abrupt_drop_are_survived_without_loss_or_double_answers(tmp_path, bot_backend):
    async with running(tmp_path, backend=bot_backend) as (bot, slack, ai):
        threads: list[str] = []

        async def dm(text: str) -> str:
            _, ev = await send_dm(slack, text)
            threads.append(ev["ts"])
            return ev["ts"]

        await wait_reply(slack, "D1", await dm("before"), "Echo: before")
        first = slack.connections[-1]
        await slack.disconnect("refresh_requested", first)
        # Sent at once, so it lands on the socket being replaced, which must still take it.
        during = await dm("during refresh")
        await slack.wait_until(lambda: slack.connections_opened >= 2 and slack.connections[-1].live)
        second = slack.connections[-1]
        await wait_reply(slack, "D1", await dm("after refresh"), "Echo: after refresh")
        await slack.drop(second)  # abrupt: no disconnect frame, no close frame
        await slack.wait_until(lambda: slack.connections_opened >= 3 and slack.connections[-1].live)
        await wait_reply(slack, "D1", await dm("after drop"), "Echo: after drop")
        # The replaced socket is closed once drained; one socket is left.
        await slack.wait_until(lambda: first.closed and len(slack.live_connections) == 1, timeout=10)
        await slack.redeliver_unacked(after=0.5)  # as Slack would, for anything not acked
        await wait_reply(slack, "D1", during, "Echo: during refresh")
        await anyio.sleep(0.3)  # room for a wrong second answer to show up
        for ts in threads:
            assert len(slack.bot_replies("D1", ts)) == 1, slack.bot_replies("D1", ts)
        assert all(eid in slack.acks for eid, d in slack.deliveries.items() if not d.redelivered)
        assert "needs replacing (refresh_requested)" in bot.log and "needs replacing (dropped)" in bot.log
        bot.assert_no_secrets()
    assert len(ai.requests) == 4
    assert ai.open_streams == 0


async def test_sigterm_interrupts_requests_in_flight_and_exits_cleanly(tmp_path, bot_backend):
    ai = FakeOpenAI(api_key=API_KEY)
    ai.enqueue(Behaviour(hang=True))
    async with running(tmp_path, backend=bot_backend, ai=ai, ASYNC_TIMEOUT_SECONDS="60") as (bot, slack, ai):
        _, ev = await send_dm(slack, "a long question")
        await ai.wait_until(lambda: ai.open_streams == 1, timeout=10)
        await slack.wait_until(lambda: len(slack.bot_replies("D1", ev["ts"])) == 1)  # the placeholder
        bot.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(10):
            code = await bot.process.wait()
        assert code == 0
        assert slack.bot_replies("D1", ev["ts"]) == [INTERRUPTED_NOTICE]
        await ai.wait_until(lambda: ai.open_streams == 0, timeout=5)  # the stream was closed, not leaked
        await bot.wait_log("stopped; outcomes")
        assert "received SIGTERM" in bot.log and "Traceback" not in bot.log
        bot.assert_no_secrets()
    store = await open_store(f"sqlite:///{tmp_path}/bot.db")
    try:
        assert await store.in_flight() == []  # nothing left for the next start to repair
        assert await store.thread_known(ThreadKey("D1", ev["ts"]))
    finally:
        await store.aclose()


async def _run_to_exit(tmp_path: Path, env: dict[str, str], timeout: float = 15.0) -> BotProcess:
    async with bot_process(tmp_path, env) as bot:
        await bot.wait_exit(timeout)
    return bot  # (leaving the block waited for the readers to reach the end of the output)


async def test_missing_bot_token_is_one_clear_line_and_exit_2(tmp_path):
    env = base_env(tmp_path, backend="trio")
    del env["SLACK_BOT_TOKEN"]
    bot = await _run_to_exit(tmp_path, env)
    assert bot.returncode == 2
    lines = bot.log.strip().splitlines()
    assert len(lines) == 1 and "SLACK_BOT_TOKEN" in lines[0], bot.log
    assert "Traceback" not in bot.log
    bot.assert_no_secrets()


async def test_malformed_setting_is_one_clear_line_and_exit_2(tmp_path):
    env = base_env(tmp_path, backend="asyncio", SOCKET_PING_INTERVAL_SECONDS="soon")
    bot = await _run_to_exit(tmp_path, env)
    assert bot.returncode == 2
    lines = bot.log.strip().splitlines()
    assert len(lines) == 1 and "SOCKET_PING_INTERVAL_SECONDS" in lines[0], bot.log
    assert "Traceback" not in bot.log


async def test_rejected_bot_token_stops_with_exit_2_and_no_token_in_log(tmp_path, bot_backend):
    slack = FakeSlack(bot_token="xoxb-the-right-one", app_token=APP_TOKEN)
    async with slack_server(slack) as slack_url:
        env = base_env(tmp_path, backend=bot_backend, slack_url=slack_url, OPENAI_BASE_URL="http://127.0.0.1:9/v1/")
        bot = await _run_to_exit(tmp_path, env)
    assert bot.returncode == 2, bot.log
    assert "SLACK_BOT_TOKEN" in bot.log.strip().splitlines()[-1]
    assert "Traceback" not in bot.log
    bot.assert_no_secrets()


async def test_tokens_never_reach_the_log(tmp_path, bot_backend):
    """At DEBUG, through an exchange, a reconnect, an OpenAI auth error and shutdown."""
    ai = FakeOpenAI(api_key=API_KEY)
    async with running(tmp_path, backend=bot_backend, ai=ai, LOG_LEVEL="DEBUG") as (bot, slack, ai):
        _, ev = await send_dm(slack, "secret-free please")
        await wait_reply(slack, "D1", ev["ts"], "Echo: secret-free please")
        await slack.drop()
        await slack.wait_until(lambda: slack.connections_opened >= 2 and len(slack.live_connections) == 1)
        stranger = slack.message_event("C1", "U2", "chatter", thread_ts="1.000", channel_type="channel")
        await slack.wait_acked(await slack.send_event(stranger))  # skipped, with a DEBUG line
        ai.api_key = "sk-another-key"  # now OpenAI rejects the bot's key
        _, ev2 = await send_dm(slack, "now fail")
        await wait_reply(slack, "D1", ev2["ts"], "OPENAI_API_KEY")
        bot.process.send_signal(signal.SIGTERM)
        assert await bot.wait_exit(10) == 0
        await bot.wait_log("stopped; outcomes")
        assert "DEBUG" in bot.log, bot.log  # the level took effect, so there was plenty to leak into
        bot.assert_no_secrets()
        assert "xoxb-" not in bot.log and "xapp-" not in bot.log


async def test_files_and_image_tools_over_real_sockets(tmp_path, bot_backend):
    """The real process downloads attachments from the fake Slack's file host (the token
    goes there: it is SLACK_API_URL's origin), parses them in worker threads, sends the
    image to the model, edits it through the images API (multipart over real HTTP) and
    posts the result with the three-step upload."""
    from tests.fakes.openai import image_parts
    from tests.media_samples import pdf_with_pages, png_bytes

    slack = FakeSlack(bot_token=BOT_TOKEN, app_token=APP_TOKEN)
    ai = FakeOpenAI(api_key=API_KEY)
    ai.enqueue(Behaviour(tool_calls=[("edit_image", {"prompt": "make the square blue"})]), "Done, it is blue now.")
    async with running(tmp_path, backend=bot_backend, slack=slack, ai=ai) as (bot, slack, ai):
        files = [
            slack.add_file("report.pdf", pdf_with_pages(["Revenue rose 12%", "Costs fell"])),
            slack.add_file("square.png", png_bytes((200, 200))),
        ]
        event = slack.message_event(
            "D1", "U1", "make the square blue", channel_type="im", subtype="file_share", files=files
        )
        await slack.send_event(event)
        await wait_reply(slack, "D1", event["ts"], "Done, it is blue now.", timeout=20)
        with anyio.fail_after(10):
            while not slack.uploads:
                await anyio.sleep(0.05)
        bot.assert_no_secrets()
    assert [d["served"] for d in slack.downloads] == ["file", "file"]
    assert all(d["authorization"] == f"Bearer {BOT_TOKEN}" for d in slack.downloads)
    first = ai.requests[0]
    assert len(image_parts(first)) == 1 and "Revenue rose 12%" in str(first["messages"][-1]["content"])
    [edit] = ai.image_requests
    assert edit["endpoint"] == "edits" and edit["prompt"] == "make the square blue" and edit["image"]
    [upload] = slack.uploads
    assert upload["thread_ts"] == event["ts"] and upload["bytes"].startswith(b"\x89PNG")
    assert [p["authorization"] for p in slack.upload_posts] == [""]


async def test_metrics_endpoints_and_json_logs_from_the_real_process(tmp_path, bot_backend):
    import json
    import socket

    import httpx2

    with socket.socket() as probe:  # a free port for METRICS_PORT
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with running(tmp_path, backend=bot_backend, METRICS_PORT=str(port), LOG_FORMAT="json") as (bot, slack, _ai):
        _, ev = await send_dm(slack, "count me")
        await wait_reply(slack, "D1", ev["ts"], "Echo: count me")
        await bot.wait_log('"outcome": "answered"')
        async with httpx2.AsyncClient(timeout=5.0) as client:
            metrics = await client.get(f"http://127.0.0.1:{port}/metrics")
            ready = await client.get(f"http://127.0.0.1:{port}/readyz")
            health = await client.get(f"http://127.0.0.1:{port}/healthz")
        bot.process.send_signal(signal.SIGTERM)
        assert await bot.wait_exit(10) == 0
    assert (ready.status_code, health.status_code) == (200, 200)
    assert 'slackbot_requests_total{outcome="answered"} 1.0' in metrics.text
    assert 'slackbot_events_received_total{type="message"} 1.0' in metrics.text
    entries = [json.loads(line) for line in bot.log.splitlines() if line.strip()]  # every line is JSON
    done = next(e for e in entries if e.get("outcome") == "answered")
    assert done["slack_thread"] == f"D1/{ev['ts']}" and done["duration_s"] > 0
    assert "count me" not in bot.log  # no message text at INFO
    bot.assert_no_secrets()
