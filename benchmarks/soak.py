"""Soak: 10,000 messages over 1,000 threads, with random latency, hangs and errors.

    python benchmarks/soak.py            # or: make bench-soak
    python benchmarks/soak.py --messages 2000 --threads 200 --rate 30   # a shorter one

Starts the fakes and the real bot process (as bench_conversations does), with its
/metrics listener on, then sends `--messages` DMs at `--rate` per second, round-robin
over `--threads` Slack threads: the first message of each thread starts it, the rest are
follow-ups in it, so every thread builds up a history and takes turns on its gate. The
fake model answers after a random 0.2–3 s; `--hang-share` of requests never answer (the
bot's 8 s timeout ends them) and `--error-share` get an OpenAI error (half 500s, which
the SDK retries, half 400s). The bot's RSS is sampled every second, during the run and
for `--idle` seconds after the last message (long enough for the bot's 60 s clean-up to
drop idle thread gates), along with its in-flight gauge from /metrics.

Writes benchmarks/results/soak.png (RSS and requests in flight over time) and soak.md
(outcomes from /metrics, RSS at each quarter of the messages and after the idle period,
and whether memory came back flat). CPython keeps the memory of its busiest moment, so
RSS follows the peak number of requests in flight; "flat" means no growth after that
peak (≤ 5 MB) and none while idle (≤ 1 MB) — more messages must not mean more memory.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import anyio
import httpx2
from bench_conversations import (
    API_KEY,
    APP_TOKEN,
    BOT_TOKEN,
    BOTS,
    answer_for,
    bot_env,
    bot_process,
    read_status_kb,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import Behaviour, FakeOpenAI, FakeSlack, last_user_text, openai_server, slack_server

RESULTS = Path(__file__).resolve().parent / "results"
REQUEST_TIMEOUT = 8.0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scripted(rng: random.Random, hang_share: float, error_share: float):
    def script(request: dict) -> Behaviour:
        question = last_user_text(request)
        roll = rng.random()
        if roll < hang_share:
            return Behaviour(hang=True)
        if roll < hang_share + error_share:
            return Behaviour(status=500 if roll < hang_share + error_share / 2 else 400)
        return Behaviour(text=answer_for(question), latency=rng.uniform(0.2, 3.0), chunks=8)

    return script


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def soak(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    # Unlimited on purpose: the soak runs 30 messages a second for minutes, far beyond
    # Slack's tiers for one workspace; it measures memory over time, not Slack's limits.
    slack = FakeSlack(bot_token=BOT_TOKEN, app_token=APP_TOKEN, rate_limits=False)
    ai = FakeOpenAI(api_key=API_KEY, script=scripted(rng, args.hang_share, args.error_share))
    workdir = Path(tempfile.mkdtemp(prefix="slackbot-soak-"))
    port = free_port()
    samples: list[tuple[float, float, float, int]] = []  # (t, RSS MB, in flight, messages sent)
    sent = 0
    final_metrics: dict = {}
    try:
        async with slack_server(slack) as slack_url, openai_server(ai) as openai_url:
            env = bot_env(
                workdir,
                backend=args.backend,
                slack_url=slack_url,
                openai_url=openai_url,
                max_concurrent=100,
                log_level="WARNING",
                request_timeout=REQUEST_TIMEOUT,
            )
            env["METRICS_PORT"] = str(port)
            async with (
                bot_process(list(BOTS["slackbot"]), env, workdir, slack) as bot,
                httpx2.AsyncClient(timeout=5.0) as http,
            ):
                metrics_url = f"http://127.0.0.1:{port}/metrics"
                t0 = anyio.current_time()
                done_sending = anyio.Event()

                async def scrape() -> dict:
                    try:
                        return parse_metrics((await http.get(metrics_url)).text)
                    except httpx2.HTTPError:
                        return {}

                async def sampler() -> None:
                    while True:
                        rss = read_status_kb(bot.pid, "VmRSS") / 1024
                        metrics = await scrape()
                        in_flight = metrics.get(("slackbot_requests_in_flight", ()), math.nan)
                        samples.append((anyio.current_time() - t0, rss, in_flight, sent))
                        await anyio.sleep(1.0)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(sampler)
                    first_ts: dict[int, str] = {}
                    for m in range(args.messages):
                        await anyio.sleep_until(t0 + m / args.rate)
                        thread = m % args.threads
                        channel = f"S{thread}"
                        text = f"message {m} in {channel}"
                        event = slack.message_event(
                            channel, "U1", text, channel_type="im", thread_ts=first_ts.get(thread)
                        )
                        first_ts.setdefault(thread, event["ts"])
                        await slack.send_event(event)
                        sent = m + 1
                        if sent % max(1, args.messages // 10) == 0:
                            print(
                                f"  {sent} messages sent at {anyio.current_time() - t0:.0f} s, "
                                f"RSS {samples[-1][1] if samples else 0:.0f} MB",
                                flush=True,
                            )
                    done_sending.set()
                    sent_at = anyio.current_time() - t0
                    await anyio.sleep(args.idle)
                    final_metrics = await scrape()
                    tg.cancel_scope.cancel()
                peak = read_status_kb(bot.pid, "VmHWM") / 1024
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "samples": samples,
        "metrics": final_metrics,
        "sent_at": sent_at,
        "peak": peak,
        "log_tail": "\n".join(bot.stderr.decode(errors="replace").strip().splitlines()[-5:]),
    }


def rss_at(samples, seconds: float) -> float:
    return next((rss for t, rss, _, _ in samples if t >= seconds), samples[-1][1])


def report(args: argparse.Namespace, out: dict) -> str:
    samples, metrics, sent_at = out["samples"], out["metrics"], out["sent_at"]
    outcomes = {
        dict(labels)["outcome"]: int(v) for (name, labels), v in metrics.items() if name == "slackbot_requests_total"
    }
    errors = {
        dict(labels)["kind"]: int(v) for (name, labels), v in metrics.items() if name == "slackbot_request_errors_total"
    }
    quarters = [(f"{q * 25}% of messages", rss_at(samples, sent_at * q / 4)) for q in (1, 2, 3, 4)]
    # CPython keeps the arenas of its busiest moment, so RSS follows the peak number of
    # requests in flight. A leak shows as growth *after* that peak, or while idle.
    in_flight = [(t, f) for t, _, f, _ in samples if not math.isnan(f)]
    peak_t, peak_in_flight = max(in_flight, key=lambda x: x[1]) if in_flight else (0.0, math.nan)
    at_peak = rss_at(samples, peak_t + 10)
    after_idle = samples[-1][1]
    growth, idle_growth = after_idle - at_peak, after_idle - rss_at(samples, sent_at + 15)
    flat = growth <= 5.0 and idle_growth <= 1.0
    lines = [
        f"{args.messages} messages over {args.threads} threads at {args.rate:g}/s (model latency 0.2–3 s, "
        f"{args.hang_share:.0%} hang, {args.error_share:.0%} errors; bot timeout {REQUEST_TIMEOUT:g} s), "
        f"then {args.idle:g} s idle.",
        "",
        f"- sent in {sent_at:.0f} s; outcomes from /metrics: {outcomes or 'unavailable'}; error kinds: {errors}",
        "- RSS: "
        + ", ".join(f"{name} {rss:.1f} MB" for name, rss in quarters)
        + f", after {args.idle:g} s idle {after_idle:.1f} MB; peak (VmHWM) {out['peak']:.1f} MB",
        f"- requests in flight peaked at {peak_in_flight:.0f} at {peak_t:.0f} s (RSS 10 s later {at_peak:.1f} MB); "
        f"growth after that peak {growth:+.1f} MB, while idle {idle_growth:+.1f} MB → "
        + ("**flat**: memory follows concurrency, not the number of messages" if flat else "**still growing**"),
        f"- 1-min load average at the end {os.getloadavg()[0]:.2f} (2 cores, shared with the fakes"
        + (" and other work" if os.getloadavg()[0] > 2.5 else "")
        + ")",
    ]
    return "\n".join(lines) + "\n"


def chart(args: argparse.Namespace, out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = out["samples"]
    t = [s[0] for s in samples]
    fig, ax = plt.subplots(figsize=(10, 5))
    ax.plot(t, [s[1] for s in samples], color="#2a9d8f", label="bot RSS (MB)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS, MB")
    ax.set_ylim(bottom=0)
    ax.axvline(out["sent_at"], color="grey", linestyle="--", label="last message sent")
    ax2 = ax.twinx()
    ax2.plot(t, [s[2] for s in samples], color="#e76f51", alpha=0.6, label="requests in flight")
    ax2.set_ylabel("requests in flight")
    ax2.set_ylim(bottom=0)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="lower right")
    ax.set_title(f"Soak: {args.messages} messages over {args.threads} threads, with hangs and errors")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=1_000)
    parser.add_argument("--rate", type=float, default=30.0, help="messages per second (default 30)")
    parser.add_argument("--hang-share", type=float, default=0.02)
    parser.add_argument("--error-share", type=float, default=0.05)
    parser.add_argument("--idle", type=float, default=75.0, help="seconds to keep sampling after the last message")
    parser.add_argument("--backend", choices=("trio", "asyncio"), default="trio")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    out = anyio.run(soak, args, backend="trio")
    text = report(args, out)
    (RESULTS / "soak.md").write_text(text)
    chart(args, out, RESULTS / "soak.png")
    print(text)
    print(f"wrote {RESULTS / 'soak.md'} and {RESULTS / 'soak.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
