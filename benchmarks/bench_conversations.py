"""Benchmark: N concurrent conversations through the real bot process, over real sockets.

    python benchmarks/bench_conversations.py [--conversations 200] [--latency 2.0]
                                             [--backend trio|asyncio|uvloop] [--runs 1]
                                             [--bot slackbot|bolt-sync|bolt-async]
                                             [--hangs 15 --request-timeout 10]

Starts the fake Slack (Web API + Socket Mode) and the fake OpenAI server in this process
(on Trio), starts `python -m bot` against them, waits for its socket, then sends N DMs
— one per channel, D0 … D(N-1) — as fast as it can. Every model answer waits `--latency`
seconds before its first chunk, then streams in small chunks. It prints:

- ack latency p50/p99: the fake's ack time minus the envelope's send time;
- reply latency p50/p95/p99: from sending the event to the `chat.update` that carries
  the full answer (timestamped by wrapping the fake's Web API handler);
- replies per second and the wall time until the last reply;
- the bot process's peak RSS (VmHWM from /proc/<pid>/status);
- errors (conversations not answered in time, Slack calls that failed, final outcomes
  other than "answered");
- for finding where the time goes: the reply latency split into stages (event → model
  request received, event → answer opened (placeholder or stream), the model's first
  token → the first Slack call showing its text, model request → final update), the
  bot's CPU seconds during the burst (from /proc/<pid>/stat), and this process's own
  event-loop lag, which is part of every latency measured here (the fakes share the machine with the bot).

The bot runs with ASYNC_MAX_CONCURRENT_REQUESTS = max(100, N) unless `--max-concurrent`
says otherwise: with the default of 100, half of 200 conversations would wait a whole
model latency for a slot, whatever the bot's speed. `--profile FILE` runs the bot under
cProfile (`python -m cProfile -o FILE -m bot`); read it with `pstats`.

`--bot` races one of the baselines in benchmarks/baselines/ instead (same fakes, same
sockets, same settings; `benchmarks/compare.py` runs all three). `--hangs N` first sends N
conversations whose model never answers (channels H0 … H(N-1)), waits `--hang-lead`
seconds, then sends the burst: the burst's reply latency is then "a normal message while
N requests hang". `--request-timeout` is the bots' ASYNC_TIMEOUT_SECONDS (default 60).

This is not a test: it prints figures and compares them with the targets from the issue
(200 conversations at 2 s model latency answered within 2.5 s wall; ack p99 < 20 ms;
peak RSS < 70 MB). Exit status is 0 either way unless something broke.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import anyio  # noqa: E402
import anyio.abc  # noqa: E402
import httpx2  # noqa: E402

from tests.fakes import Behaviour, FakeOpenAI, FakeSlack, last_user_text, openai_server, slack_server  # noqa: E402

BOT_TOKEN = "xoxb-bench-token"
APP_TOKEN = "xapp-bench-token"
API_KEY = "sk-bench-key"
TARGET_WALL = 2.5  # seconds, for 200 conversations at 2 s latency
TARGET_ACK_P99 = 0.020
TARGET_RSS_MB = 70.0
FILLER = "Structured concurrency keeps every task inside a scope, so nothing outlives the request that started it. "


# Web API methods that show an answer (or its placeholder) to the user.
ANSWER_METHODS = frozenset(
    {"chat.postMessage", "chat.update", "chat.startStream", "chat.appendStream", "chat.stopStream"}
)
BASELINES = REPO_ROOT / "benchmarks" / "baselines"
BOTS = {  # --bot -> the command that starts it (all read the same environment)
    "slackbot": [sys.executable, "-m", "bot"],
    "bolt-sync": [sys.executable, str(BASELINES / "bolt_sync.py")],
    "bolt-async": [sys.executable, str(BASELINES / "bolt_async.py")],
}


def answer_for(question: str) -> str:
    return f"Answer to «{question}». {FILLER * 2}".strip()


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.1f} ms"


@dataclass
class RunResult:
    conversations: int
    answered: int
    ack: list[float]
    unacked: int
    reply: list[float]
    wall: float
    burst_send: float
    peak_rss_kb: int
    idle_rss_kb: int
    slack_errors: int
    outcomes: dict[str, int]
    exit_code: int | None
    log_tail: str = ""
    notes: list[str] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)  # per-conversation stage durations
    phases: dict[str, float] = field(default_factory=dict)  # start-up, shutdown (seconds)
    fake_lag: list[float] = field(default_factory=list)  # the fakes' event-loop lag during the burst
    duplicates: int = 0  # conversations whose answer appears more than once

    @property
    def errors(self) -> int:
        not_answered = self.conversations - self.answered
        bad_outcomes = sum(n for k, n in self.outcomes.items() if k != "answered")
        return not_answered + self.slack_errors + bad_outcomes + self.unacked + self.duplicates


def read_status_kb(pid: int, field_name: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def local_postgres_cpu(database_url: str) -> float:
    """User + system CPU seconds so far of every PostgreSQL server process on this
    machine (Linux /proc: the postmaster and its backends), when `database_url` is a
    PostgreSQL on this box; NaN otherwise. A run's database work shares the cores
    with the bots and the fakes, so a ceiling that leaves it out is too high."""
    if not database_url.startswith("postgresql") or urlsplit(database_url).hostname not in LOCAL_HOSTS:
        return math.nan
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() != "postgres":
                    continue
        except OSError:
            continue
        cpu = cpu_seconds(int(entry))
        if not math.isnan(cpu):
            total += cpu
    return total


def bot_env(
    workdir: Path,
    *,
    backend: str,
    slack_url: str,
    openai_url: str,
    max_concurrent: int,
    log_level: str,
    request_timeout: float = 60.0,
    replica_id: str = "bench",
    database_url: str = "",
    streaming: str = "native",
) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", str(workdir)),
        "PYTHONPATH": str(REPO_ROOT),
        "SLACK_BOT_TOKEN": BOT_TOKEN,
        "SLACK_APP_TOKEN": APP_TOKEN,
        "OPENAI_API_KEY": API_KEY,
        "SLACK_API_URL": slack_url,
        "OPENAI_BASE_URL": openai_url,
        "DATABASE_URL": database_url or f"sqlite:///{workdir}/bot.db",
        "REPLICA_ID": replica_id,
        "LOG_LEVEL": log_level,
        "BOT_ASYNC_BACKEND": backend,
        "ASYNC_MAX_CONCURRENT_REQUESTS": str(max_concurrent),
        "ASYNC_TIMEOUT_SECONDS": f"{request_timeout:g}",
        "SHUTDOWN_GRACE_SECONDS": "2",
        "SOCKET_PING_INTERVAL_SECONDS": "10",
        "NATIVE_STREAMING": "on" if streaming == "native" else "off",
    }


@dataclass
class BotProcess:
    process: anyio.abc.Process
    stderr: bytearray
    exit_code: int | None = None  # after the block: None if it had to be killed
    shutdown_seconds: float = math.nan  # from SIGTERM to exit

    @property
    def pid(self) -> int:
        return self.process.pid


@asynccontextmanager
async def bot_process(
    command: list[str], env: dict[str, str], workdir: Path, slack: FakeSlack
) -> AsyncIterator[BotProcess]:
    """Start a bot, keep reading its log (so the pipe never fills), wait until its socket
    is open on `slack`; on exit SIGTERM it (then kill after 15 s) and collect the log."""
    connected_before = len(slack.live_connections)
    process = await anyio.open_process(
        command, cwd=str(workdir), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    bot = BotProcess(process, bytearray())
    try:
        async with anyio.create_task_group() as tg:
            drained = anyio.Event()

            async def drain() -> None:
                assert process.stderr is not None
                try:
                    async for chunk in process.stderr:
                        bot.stderr.extend(chunk)
                finally:
                    drained.set()

            tg.start_soon(drain)
            with anyio.fail_after(30):
                while len(slack.live_connections) <= connected_before:
                    if process.returncode is not None:
                        raise RuntimeError(f"bot exited early:\n{bot.stderr.decode(errors='replace')}")
                    await anyio.sleep(0.02)
            yield bot
            t_stop = anyio.current_time()
            process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(15):
                bot.exit_code = await process.wait()
            bot.shutdown_seconds = anyio.current_time() - t_stop
            with anyio.move_on_after(2):  # the last log lines
                await drained.wait()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            with anyio.move_on_after(5):
                await process.aclose()


async def one_run(args: argparse.Namespace, run_no: int) -> RunResult:
    n = args.conversations
    # Slack's rate-limit tiers are on, as in a real workspace; --no-slack-tiers gives the
    # unlimited fake of the figures measured before the fake enforced them.
    slack = FakeSlack(bot_token=BOT_TOKEN, app_token=APP_TOKEN, rate_limits=not args.no_slack_tiers)
    ai = FakeOpenAI(
        api_key=API_KEY,
        script=lambda request: Behaviour(
            text=answer_for(last_user_text(request)),
            latency=args.latency,
            chunks=args.chunks,
            chunk_delay=args.chunk_delay,
            hang=last_user_text(request).startswith("hang"),
        ),
    )
    expected = {f"D{i}": answer_for(f"question {i} in D{i}") for i in range(n)}
    final_at: dict[str, float] = {}
    all_answered = anyio.Event()
    slack_errors = 0
    stage_at: dict[str, dict[str, float]] = {"placeholder": {}, "model_request": {}, "first_text": {}}
    original_handle = slack.handle

    async def timed_handle(request: httpx2.Request) -> httpx2.Response:
        """The fake's Web API, plus a timestamp for the update that carries the full answer."""
        nonlocal slack_errors
        response = await original_handle(request)
        method = request.url.path.rsplit("/", 1)[-1]
        if method in ANSWER_METHODS:
            body = json.loads(response.content)
            channel = body.get("channel")
            if not body.get("ok"):
                slack_errors += 1
            elif method in ("chat.postMessage", "chat.startStream"):
                stage_at["placeholder"].setdefault(channel, anyio.current_time())
            if body.get("ok") and channel in expected and channel not in final_at:
                # Done when the answer is all there, however it got there: chat.update
                # (bot, baselines) or Slack's native streaming (bot's default).
                shown = slack._find(channel, str(body.get("ts", "")))
                text = shown.get("text", "") if shown is not None else ""
                if text and expected[channel].startswith(text[:20]):  # the first piece of the answer shows
                    stage_at["first_text"].setdefault(channel, anyio.current_time())
                if shown is not None and expected[channel] in shown.get("text", ""):
                    final_at[channel] = anyio.current_time()
                    if len(final_at) == n:
                        all_answered.set()
        return response

    slack.handle = timed_handle  # slack_server looks the handler up per connection
    original_ai_handle = ai.handle

    async def timed_ai_handle(request: httpx2.Request) -> httpx2.Response:
        try:
            question = last_user_text(json.loads(request.content))
            channel = question.rsplit(" ", 1)[-1]
            stage_at["model_request"].setdefault(channel, anyio.current_time())
        except (ValueError, AttributeError):
            pass
        return await original_ai_handle(request)

    ai.handle = timed_ai_handle
    workdir = Path(tempfile.mkdtemp(prefix="slackbot-bench-"))
    try:
        async with slack_server(slack) as slack_url, openai_server(ai) as openai_url:
            env = bot_env(
                workdir,
                backend=args.backend,
                slack_url=slack_url,
                openai_url=openai_url,
                max_concurrent=args.max_concurrent or max(100, n),
                log_level=args.log_level,
                request_timeout=args.request_timeout,
                database_url=args.database_url,
                streaming=args.streaming,
            )
            phases: dict[str, float] = {}
            t0 = anyio.current_time()
            command = list(BOTS[args.bot])
            if args.profile:
                command[1:1] = ["-m", "cProfile", "-o", str(Path(args.profile).resolve())]
            async with AsyncExitStack() as replicas:
                bots = []
                for i in range(args.replicas):  # replicas share the database and the workspace
                    replica_env = dict(env, REPLICA_ID=f"replica-{i}")
                    bots.append(await replicas.enter_async_context(bot_process(command, replica_env, workdir, slack)))
                tg = await replicas.enter_async_context(anyio.create_task_group())  # exited before the bots
                phases["start-up"] = anyio.current_time() - t0
                if phases["start-up"] > 3 * args.replicas:
                    print("slow start:\n" + bots[0].stderr.decode(errors="replace"))
                await anyio.sleep(0.5)  # let the bot settle (first-use imports, idle loop)
                idle_rss = max(read_status_kb(bot.pid, "VmHWM") for bot in bots)

                envelope_of: dict[str, str] = {}
                lags: list[float] = []
                probe_scope = anyio.CancelScope()

                async def lag_probe() -> None:
                    """How late this process's own event loop wakes up: the fakes' share of
                    every latency measured here (an ack is timed when the fake reads it)."""
                    with probe_scope:
                        while True:
                            before = anyio.current_time()
                            await anyio.sleep(0.001)
                            lags.append(anyio.current_time() - before - 0.001)

                tg.start_soon(lag_probe)
                for i in range(args.hangs):  # requests whose model never answers
                    event = slack.message_event(f"H{i}", "U1", f"hang {i}", channel_type="im")
                    await slack.send_event(event)
                if args.hangs:
                    await anyio.sleep(args.hang_lead)
                bot_cpu0, fake_cpu0 = sum(cpu_seconds(bot.pid) for bot in bots), time.process_time()
                db_cpu0 = local_postgres_cpu(args.database_url)
                burst_start = anyio.current_time()
                for i in range(n):
                    channel = f"D{i}"
                    event = slack.message_event(channel, "U1", f"question {i} in {channel}", channel_type="im")
                    envelope_of[channel] = await slack.send_event(event)
                burst_send = anyio.current_time() - burst_start

                with anyio.move_on_after(args.timeout):
                    await all_answered.wait()
                replies_done = anyio.current_time()
                probe_scope.cancel()
                bot_cpu = sum(cpu_seconds(bot.pid) for bot in bots) - bot_cpu0
                fake_cpu = time.process_time() - fake_cpu0
                db_cpu = local_postgres_cpu(args.database_url) - db_cpu0
                phases["burst window"] = replies_done - burst_start
                phases["bot CPU in window"] = bot_cpu
                phases["fakes CPU in window"] = fake_cpu
                if not math.isnan(db_cpu):
                    phases["database CPU in window"] = db_cpu
                await anyio.sleep(0.2)  # late acks
                peak_rss = max(read_status_kb(bot.pid, "VmHWM") for bot in bots)
            exit_codes = {bot.exit_code for bot in bots}
            exit_code = exit_codes.pop() if len(exit_codes) == 1 else None
            phases["shutdown"] = max(bot.shutdown_seconds for bot in bots)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    log = "\n".join(bot.stderr.decode(errors="replace") for bot in bots)
    outcomes: dict[str, int] = {}
    for match in re.finditer(r"stopped; outcomes: (\{[^}]*\})", log):
        for key, value in re.findall(r"'(\w+)': (\d+)", match.group(1)):
            outcomes[key] = outcomes.get(key, 0) + int(value)
    acks = []
    unacked = 0
    for eid in envelope_of.values():
        delivery = slack.deliveries[eid]
        if eid in slack.acks:
            acks.append(slack.acks[eid] - delivery.sent_at)
        else:
            unacked += 1
    send_time = {c: slack.deliveries[eid].sent_at for c, eid in envelope_of.items()}
    replies = [final_at[c] - send_time[c] for c in final_at]
    wall = (max(final_at.values()) - burst_start) if final_at else math.nan
    result = RunResult(
        conversations=n,
        answered=len(final_at),
        ack=acks,
        unacked=unacked,
        reply=replies,
        wall=wall,
        burst_send=burst_send,
        peak_rss_kb=peak_rss,
        idle_rss_kb=idle_rss,
        slack_errors=slack_errors,
        outcomes=outcomes,
        exit_code=exit_code,
        log_tail="\n".join(log.strip().splitlines()[-5:]),
    )
    placeholder, model_request, first_text = stage_at["placeholder"], stage_at["model_request"], stage_at["first_text"]
    result.stages = {
        "event -> model request": [model_request[c] - send_time[c] for c in model_request if c in send_time],
        "event -> answer opened": [placeholder[c] - send_time[c] for c in placeholder if c in send_time],
        # The fake sends its first chunk `latency` after the request arrives.
        "first token -> first visible text": [
            first_text[c] - (model_request[c] + args.latency) for c in first_text if c in model_request
        ],
        "model request -> final update": [final_at[c] - model_request[c] for c in final_at if c in model_request],
    }
    result.phases = phases
    result.fake_lag = lags
    # Answered twice (by two replicas, or a redelivery)? Count the bot's messages that
    # carry each expected answer.
    result.duplicates = sum(
        max(0, sum(1 for m in slack.messages.get(c, []) if text in (m.get("text") or "")) - 1)
        for c, text in expected.items()
    )
    if ai.max_open_streams < n:
        result.notes.append(f"at most {ai.max_open_streams} model streams were open at once")
    counts = Counter(method for method, _ in slack.calls if method not in ("apps.connections.open", "auth.test"))
    if result.answered:
        per = ", ".join(f"{m} {c / result.answered:.2f}" for m, c in counts.most_common())
        result.notes.append(f"Slack calls per answer {sum(counts.values()) / result.answered:.2f} ({per})")
    return result


def report(args: argparse.Namespace, run_no: int, r: RunResult) -> None:
    bot = f"slackbot on {args.backend}" if args.bot == "slackbot" else args.bot
    hangs = f", {args.hangs} hanging" if args.hangs else ""
    if args.replicas > 1:
        bot += f", {args.replicas} replicas"
    print(f"--- run {run_no}: {r.conversations} conversations{hangs}, model latency {args.latency:g}s, {bot} ---")
    print(f"  burst sent in        {ms(r.burst_send)}")
    print(
        f"  ack latency          p50 {ms(percentile(r.ack, 50))}   p99 {ms(percentile(r.ack, 99))}   "
        f"max {ms(max(r.ack) if r.ack else math.nan)}   (unacked: {r.unacked})"
    )
    print(
        f"  (fakes' own loop lag p50 {ms(percentile(r.fake_lag, 50))}   p99 {ms(percentile(r.fake_lag, 99))}   "
        f"max {ms(max(r.fake_lag) if r.fake_lag else math.nan)}: included in the figures above and below)"
    )
    print(
        f"  reply latency        p50 {ms(percentile(r.reply, 50))}   p95 {ms(percentile(r.reply, 95))}   "
        f"p99 {ms(percentile(r.reply, 99))}"
    )
    rate = r.answered / r.wall if r.answered and r.wall > 0 else 0.0
    print(f"  replies              {r.answered}/{r.conversations} in {r.wall:.3f} s wall  ({rate:.1f} replies/s)")
    print(
        f"  bot peak RSS         {r.peak_rss_kb / 1024:.1f} MB  (idle before the burst: {r.idle_rss_kb / 1024:.1f} MB)"
    )
    print(
        f"  errors               {r.errors}  (not answered {r.conversations - r.answered}, slack errors "
        f"{r.slack_errors}, unacked {r.unacked}, duplicates {r.duplicates}; outcomes {r.outcomes or 'unknown'}; "
        f"exit code {r.exit_code})"
    )
    for name, values in r.stages.items():
        print(f"  {name:<30} p50 {ms(percentile(values, 50))}   p99 {ms(percentile(values, 99))}")
    if r.phases:
        print("  phases               " + "   ".join(f"{k} {v:.2f} s" for k, v in r.phases.items()))
    for note in r.notes:
        print(f"  note: {note}")
    if r.conversations == 200 and args.latency == 2.0 and args.bot == "slackbot" and not args.hangs:
        checks = [
            ("all answered within 2.5 s wall", r.answered == r.conversations and r.wall <= TARGET_WALL),
            ("ack p99 under 20 ms", bool(r.ack) and percentile(r.ack, 99) < TARGET_ACK_P99 and not r.unacked),
            ("peak RSS under 70 MB", 0 < r.peak_rss_kb / 1024 < TARGET_RSS_MB),
        ]
        print("  targets              " + "   ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in checks))
    if r.errors:
        print("  last log lines:\n    " + r.log_tail.replace("\n", "\n    "))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=200, help="concurrent conversations (default 200)")
    parser.add_argument("--latency", type=float, default=2.0, help="model latency before the first chunk, s")
    parser.add_argument("--chunks", type=int, default=8, help="content chunks per answer (default 8)")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="delay between chunks, s (default 0)")
    parser.add_argument("--backend", choices=("trio", "asyncio", "uvloop"), default="trio", help="the bot's backend")
    parser.add_argument(
        "--streaming",
        choices=("native", "update"),
        default="native",
        help="the bot's NATIVE_STREAMING: Slack's streaming in DMs (default) or paced chat.update",
    )
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole measurement (default 1)")
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=0,
        help="ASYNC_MAX_CONCURRENT_REQUESTS for the bot (default: max(100, conversations))",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="give up waiting for replies after this")
    parser.add_argument(
        "--no-slack-tiers",
        action="store_true",
        help="the fake Slack without its per-method rate limits (earlier figures)",
    )
    parser.add_argument(
        "--profile", metavar="FILE", help="run the bot under cProfile and write its stats to FILE (slows it down)"
    )
    parser.add_argument("--log-level", default="INFO", help="the bot's LOG_LEVEL (default INFO)")
    parser.add_argument(
        "--bot",
        choices=sorted(BOTS),
        default="slackbot",
        help="which bot to race: this one (default) or a baseline from benchmarks/baselines/",
    )
    parser.add_argument(
        "--hangs",
        type=int,
        default=0,
        help="conversations whose model never answers, sent before the burst (default 0)",
    )
    parser.add_argument(
        "--hang-lead",
        type=float,
        default=0.5,
        help="seconds between the hanging conversations and the burst (default 0.5)",
    )
    parser.add_argument(
        "--request-timeout", type=float, default=60.0, help="the bots' ASYNC_TIMEOUT_SECONDS (default 60)"
    )
    parser.add_argument(
        "--replicas", type=int, default=1, help="bot processes sharing one database and workspace (default 1)"
    )
    parser.add_argument(
        "--database-url", default="", help="DATABASE_URL for the bot(s) (default: an SQLite file in a temp dir)"
    )
    return parser


def main() -> int:
    args = build_parser().parse_args()
    if sys.platform != "linux":
        print("note: peak RSS is read from /proc and is only reported on Linux")
    failed = False
    for run_no in range(1, args.runs + 1):
        started = time.perf_counter()
        try:
            result = anyio.run(one_run, args, run_no, backend="trio")
        except Exception as exc:
            print(f"--- run {run_no}: failed: {exc!r}")
            failed = True
            continue
        report(args, run_no, result)
        print(f"  (run took {time.perf_counter() - started:.1f} s including start-up)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
