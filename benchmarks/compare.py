"""Race the bot against the two Bolt architectures users would otherwise run.

    python benchmarks/compare.py            # or: make bench-compare
    python benchmarks/compare.py --sizes 50,200 --bots slackbot,bolt-async   # a subset

All three bots — this one (`python -m bot`), benchmarks/baselines/bolt_sync.py (Bolt
`App` + `SocketModeHandler`, 10 threads, sync OpenAI) and bolt_async.py (Bolt `AsyncApp`
+ aiohttp Socket Mode, `AsyncOpenAI`, `asyncio.wait_for`) — run as real processes
against the same fake Slack (Web API + Socket Mode over a real WebSocket) and fake
OpenAI (real HTTP, SSE), one at a time, through `bench_conversations.one_run`:

- bursts of 50, 200 and 1000 concurrent conversations (one DM each) with 2 s model
  latency: throughput (answers/s), reply latency p50/p95/p99 (event sent → answer shown),
  ack latency p99 (envelope sent → ack read by the fake), peak RSS (VmHWM), and the bot's
  CPU seconds per 1000 answers. A run stops at `--cap` seconds; a bot that has not
  answered everything by then is reported with what it reached.
- 15 conversations whose model never answers (past the bots' 10 s timeout), then one
  normal message: how long that message takes.

Writes benchmarks/results/compare.md (the table) and compare.png (the chart), and prints
the table. The fakes run in this process and share the machine with the bot, so their
own event-loop lag (printed) is part of every latency.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import anyio
from bench_conversations import BOTS, RunResult, build_parser, one_run, percentile

RESULTS = Path(__file__).resolve().parent / "results"
LATENCY = 2.0
HANGS = 15
HANG_TIMEOUT = 10.0
LABELS = {
    "slackbot": "slackbot (this bot, Trio)",
    "slackbot-asyncio": "slackbot (this bot, asyncio)",
    "slackbot-uvloop": "slackbot (this bot, uvloop)",
    "bolt-sync": "Bolt sync (10 threads)",
    "bolt-async": "Bolt async (aiohttp)",
}


@dataclass
class Row:
    bot: str
    scenario: str
    conversations: int
    result: RunResult | None
    cap: float
    error: str = ""
    repeats: list[Row] = field(default_factory=list)  # every run of this scenario, this one included

    @property
    def throughput(self) -> float:
        r = self.result
        if not r or not r.answered:
            return 0.0
        wall = r.wall if r.answered == r.conversations else self.cap
        return r.answered / wall

    def p(self, q: float) -> float:
        return percentile(self.result.reply, q) if self.result else math.nan

    @property
    def ack_p99(self) -> float:
        return percentile(self.result.ack, 99) if self.result else math.nan

    @property
    def rss_mb(self) -> float:
        return self.result.peak_rss_kb / 1024 if self.result else math.nan

    @property
    def cpu_per_1000(self) -> float:
        r = self.result
        if not r or not r.answered:
            return math.nan
        return r.phases.get("bot CPU in window", math.nan) / r.answered * 1000

    @property
    def lag_p99(self) -> float:
        return percentile(self.result.fake_lag, 99) if self.result else math.nan


def run_one(
    bot: str, *, conversations: int, hangs: int, cap: float, request_timeout: float, backend: str, tiers: bool = True
) -> Row:
    args = build_parser().parse_args([] if tiers else ["--no-slack-tiers"])
    # "slackbot-asyncio" / "slackbot-uvloop": this bot on that backend (plain "slackbot": --backend)
    name, _, on = bot.partition("-") if bot.startswith("slackbot-") else (bot, "", backend)
    args.bot, args.conversations, args.latency, args.timeout = name, conversations, LATENCY, cap
    args.hangs, args.request_timeout, args.backend = hangs, request_timeout, on or backend
    scenario = f"{hangs} hanging + 1" if hangs else f"burst {conversations}"
    print(f"running {bot}: {scenario} …", flush=True)
    started = time.perf_counter()
    try:
        result = anyio.run(one_run, args, 1, backend="trio")
    except Exception as exc:
        print(f"  failed: {exc!r}")
        return Row(bot, scenario, conversations, None, cap, error=repr(exc))
    row = Row(bot, scenario, conversations, result, cap)
    print(
        f"  {result.answered}/{conversations} answered, {row.throughput:.1f}/s, p99 {fmt_s(row.p(99))}, "
        f"ack p99 {fmt_ms(row.ack_p99)}, RSS {row.rss_mb:.0f} MB, fakes' lag p99 {fmt_ms(row.lag_p99)} "
        f"({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    return row


def median_run(runs: list[Row]) -> Row:
    """The run with the median figure (throughput for bursts, reply time for the hang
    scenario); it remembers all runs, so the table can show their spread."""
    ok = [r for r in runs if r.result] or runs
    hang = ok[0].scenario.startswith(str(HANGS))
    ordered = sorted(ok, key=lambda r: r.p(50) if hang else -r.throughput)
    chosen = ordered[(len(ordered) - 1) // 2]
    chosen.repeats = runs
    return chosen


def spread(row: Row) -> str:
    if len(row.repeats) < 2:
        return ""
    hang = row.scenario.startswith(str(HANGS))
    values = sorted(r.p(50) if hang else r.throughput for r in row.repeats if r.result)
    unit = " s" if hang else "/s"
    return " (runs: " + ", ".join(f"{v:.1f}" if not hang else f"{v:.2f}" for v in values) + unit + ")"


def fmt_s(seconds: float) -> str:
    return "–" if math.isnan(seconds) else f"{seconds:.2f} s"


def fmt_ms(seconds: float) -> str:
    return "–" if math.isnan(seconds) else f"{seconds * 1000:.0f} ms"


LOAD_AT_START = os.getloadavg()[0]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, Python {platform.python_version()}; "
        f"1-min load average when the comparison started {LOAD_AT_START:.2f}"
    )


def markdown(rows: list[Row], command: str) -> str:
    repeats = max(len(r.repeats) for r in rows) if rows else 1
    lines = [
        f"Model latency {LATENCY:g} s before the first token; every bot is a real process talking to the same "
        "fake Slack and fake OpenAI over real sockets on 127.0.0.1."
        + (f" Each scenario ran {repeats} times; the row is the median run." if repeats > 1 else ""),
        "",
        "| bot | scenario | answered | answers/s | reply p50 | p95 | p99 | ack p99 | peak RSS | CPU s / 1000 msgs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = row.result
        if r is None:
            lines.append(f"| {LABELS[row.bot]} | {row.scenario} | failed: {row.error[:60]} |||||||")
            continue
        answered = f"{r.answered}/{r.conversations}"
        if r.answered < r.conversations:
            answered += f" (cap {row.cap:g} s)"
        lines.append(
            f"| {LABELS[row.bot]} | {row.scenario} | {answered} | "
            f"{'–' if row.scenario.startswith(str(HANGS)) else f'{row.throughput:.1f}'}{spread(row)} | "
            f"{fmt_s(row.p(50))} | "
            f"{fmt_s(row.p(95))} | {fmt_s(row.p(99))} | {fmt_ms(row.ack_p99)} | {row.rss_mb:.0f} MB | "
            f"{row.cpu_per_1000:.1f} |"
        )
    lines += [
        "",
        f"Command: `{command}`. Machine: {machine()}.",
        "The fakes' own event-loop lag p99 per run (part of every latency above): "
        + ", ".join(f"{row.bot}/{row.scenario} {fmt_ms(row.lag_p99)}" for row in rows if row.result)
        + ".",
    ]
    return "\n".join(lines) + "\n"


def chart(rows: list[Row], sizes: list[int], bots: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    width = 0.8 / len(bots)
    colors = {
        "slackbot": "#2a9d8f",
        "slackbot-asyncio": "#8ab17d",
        "slackbot-uvloop": "#e9c46a",
        "bolt-sync": "#e76f51",
        "bolt-async": "#457b9d",
    }

    def bars(ax, metric, title, ylabel, log=False):
        for k, bot in enumerate(bots):
            values = []
            for size in sizes:
                row = next((r for r in rows if r.bot == bot and r.scenario == f"burst {size}"), None)
                values.append(metric(row) if row and row.result else 0.0)
            xs = [i + (k - (len(bots) - 1) / 2) * width for i in range(len(sizes))]
            ax.bar(xs, values, width, label=LABELS[bot], color=colors[bot])
        ax.set_xticks(range(len(sizes)), [f"{s} conversations" for s in sizes])
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")

    bars(axes[0][0], lambda r: r.throughput, "Throughput", "answers per second")
    bars(axes[0][1], lambda r: r.p(99), f"Reply latency p99 (model latency {LATENCY:g} s)", "seconds", log=True)
    bars(axes[1][0], lambda r: r.rss_mb, "Peak RSS", "MB")
    ax = axes[1][1]
    hang_rows = [
        next((r for r in rows if r.bot == bot and r.scenario.startswith(f"{HANGS} hanging")), None) for bot in bots
    ]
    ax.bar(
        [LABELS[b] for b in bots],
        [r.p(50) if r and r.result and r.result.reply else 0.0 for r in hang_rows],
        color=[colors[b] for b in bots],
    )
    ax.axhline(LATENCY + 0.5, color="grey", linestyle="--", label="target: model latency + 0.5 s")
    ax.set_title(f"A normal message while {HANGS} requests hang (timeout {HANG_TIMEOUT:g} s)")
    ax.set_ylabel("seconds to answer")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend()
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bots",
        default="slackbot,bolt-async,bolt-sync",
        help="comma-separated subset of "
        + ", ".join(BOTS)
        + "; slackbot-asyncio and slackbot-uvloop run this bot on that backend in the same comparison",
    )
    parser.add_argument("--sizes", default="50,200,1000", help="burst sizes (default 50,200,1000)")
    parser.add_argument("--cap", type=float, default=60.0, help="stop waiting for a burst's answers after this")
    parser.add_argument(
        "--backend", choices=("trio", "asyncio", "uvloop"), default="trio", help="this bot's backend as 'slackbot'"
    )
    parser.add_argument("--no-hang", action="store_true", help="skip the hanging-requests scenario")
    parser.add_argument(
        "--no-slack-tiers", action="store_true", help="the fake Slack without its rate limits (earlier figures)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="run each scenario this many times and report the median run (default 1)"
    )
    args = parser.parse_args()
    bots = [b for b in args.bots.split(",") if b]
    unknown = [b for b in bots if b not in LABELS]
    if unknown:
        parser.error(f"unknown bots: {', '.join(unknown)}")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    RESULTS.mkdir(exist_ok=True)
    command = "python benchmarks/compare.py" + "".join(f" {a}" for a in sys.argv[1:])
    print(f"machine: {machine()}")
    rows: list[Row] = []
    for bot in bots:
        for size in sizes:
            rows.append(
                median_run(
                    [
                        run_one(
                            bot,
                            conversations=size,
                            hangs=0,
                            cap=args.cap,
                            request_timeout=60.0,
                            backend=args.backend,
                            tiers=not args.no_slack_tiers,
                        )
                        for _ in range(args.repeat)
                    ]
                )
            )
        if not args.no_hang:
            rows.append(
                median_run(
                    [
                        run_one(
                            bot,
                            conversations=1,
                            hangs=HANGS,
                            cap=3 * HANG_TIMEOUT,
                            request_timeout=HANG_TIMEOUT,
                            backend=args.backend,
                            tiers=not args.no_slack_tiers,
                        )
                        for _ in range(args.repeat)
                    ]
                )
            )
    table = markdown(rows, command)
    (RESULTS / "compare.md").write_text(table)
    chart(rows, sizes, bots, RESULTS / "compare.png")
    print()
    print(table)
    print(f"wrote {RESULTS / 'compare.md'} and {RESULTS / 'compare.png'}")
    return 0 if all(r.result for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
