"""Benchmark: one replica against two, in one run, on the same fakes — and what a lease costs.

    python benchmarks/bench_replicas.py [--conversations 400] [--latency 2.0] [--runs 1]
                                        [--no-slack-tiers] [--database-url URL]
                                        [--lease-rounds 300]

Runs `bench_conversations.one_run` twice (1 bot process, then 2 sharing the database and
the workspace; the same conversations, model latency and caps), prints both reports and
the ratios (answers/s, wall time, CPU per answer), and checks what must hold whatever the
speed: every conversation answered exactly once (no duplicates), every outcome
"answered". Conversations are one per channel, so any overlap would show as a
duplicate answer; the one-request-per-thread rule across replicas is proved by the tests
(`tests/test_replicas.py`), not here.

Then it measures the lease overhead per request: the two storage calls a request adds
(`acquire_lease` before it starts, `release_lease` when it ends; a renewal only every
REPLICA_TIMEOUT_SECONDS/3 for requests that run that long), timed directly against the
same engine — one at a time, and 50 requests at once.

The fakes run in this process and share the machine's two cores with the bots: with two
replicas, three busy processes share two cores, which is part of what is measured.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import anyio  # noqa: E402

from benchmarks.bench_conversations import RunResult, build_parser, ms, one_run, percentile, report  # noqa: E402
from bot.storage import ThreadKey, open_store  # noqa: E402

TARGET_SPEEDUP = 1.7
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def fresh_database(url: str) -> Iterator[str]:
    """A new empty database on the server of `url` (PostgreSQL), dropped afterwards;
    for SQLite, "" (each run makes its own file). Every run starts from nothing: the fake
    Slack numbers its messages the same way each time, so old event claims would match."""
    if not url.startswith(("postgresql:", "postgres:")):
        yield ""
        return
    import psycopg

    name = "bench_" + uuid.uuid4().hex[:12]
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(url)._replace(path="/" + name))
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def cpu_per_answer(r: RunResult, who: str = "bot") -> float:
    return r.phases.get(f"{who} CPU in window", math.nan) / r.answered if r.answered else math.nan


def _cpu(r: RunResult) -> float:
    """The run's CPU seconds in the burst window: bots, fakes, and a PostgreSQL on this
    box when it is one (0 for SQLite: its work is in the bots' CPU)."""
    return (
        r.phases.get("bot CPU in window", math.nan)
        + r.phases.get("fakes CPU in window", math.nan)
        + r.phases.get("database CPU in window", 0.0)
    )


def cores_busy(r: RunResult) -> float:
    """The bots', the fakes' (and a local PostgreSQL's) CPU seconds over the burst's wall
    time: how many of the box's cores the run kept busy."""
    return _cpu(r) / r.wall if r.wall > 0 else math.nan


def box_ceiling(r: RunResult, cores: int, conversations: int, latency: float) -> float:
    """The answers/s no number of replicas could beat on this box with these fakes: the
    whole CPU of an answer (bots, fakes, a local PostgreSQL) spread over every core, and
    every conversation waiting the model's latency at least once."""
    per_answer = _cpu(r) / r.answered if r.answered else math.nan
    return min(cores / per_answer, conversations / latency)


async def lease_overhead(database_url: str, rounds: int) -> dict[str, list[float]]:
    """Seconds per acquire + release pair, sequentially and with 50 at once."""
    store = await open_store(database_url)
    timings: dict[str, list[float]] = {"one at a time": [], "50 at once": []}

    async def pair(kind: str, i: int) -> None:
        thread = ThreadKey(f"CLEASE{len(kind)}", f"{i}.000001")
        started = time.perf_counter()
        token = await store.acquire_lease(thread, "bench", ttl=30)
        assert token is not None
        await store.release_lease(thread, token)
        timings[kind].append(time.perf_counter() - started)

    try:
        for i in range(rounds):
            await pair("one at a time", i)
        for batch in range(0, rounds, 50):
            async with anyio.create_task_group() as tg:
                for i in range(batch, min(batch + 50, rounds)):
                    tg.start_soon(pair, "50 at once", i)
    finally:
        await store.aclose()
    return timings


def main() -> int:
    parser: argparse.ArgumentParser = build_parser()
    parser.description = __doc__.split("\n\n")[0]
    parser.set_defaults(conversations=400)
    parser.add_argument("--lease-rounds", type=int, default=300, help="acquire+release pairs timed (default 300)")
    args = parser.parse_args()
    if args.bot != "slackbot":
        parser.error("replicas are this bot's feature: --bot slackbot only")
    print(
        f"{args.conversations} conversations, model latency {args.latency:g}s, "
        f"Slack tiers {'off' if args.no_slack_tiers else 'on'}, "
        f"database {args.database_url or 'an SQLite file per run'}, backend {args.backend}"
    )
    failed = False
    for run_no in range(1, args.runs + 1):
        results: dict[int, RunResult] = {}
        for replicas in (1, 2):
            run_args = copy.copy(args)
            run_args.replicas = replicas
            try:
                with fresh_database(args.database_url) as url:
                    run_args.database_url = url
                    results[replicas] = anyio.run(one_run, run_args, run_no, backend="trio")
            except Exception as exc:
                print(f"--- run {run_no}, {replicas} replica(s): failed: {exc!r}")
                failed = True
                break
            report(run_args, run_no, results[replicas])
        if len(results) < 2:
            continue
        one, two = results[1], results[2]
        rate = {k: r.answered / r.wall if r.answered and r.wall > 0 else 0.0 for k, r in results.items()}
        speedup = rate[2] / rate[1] if rate[1] else math.nan
        print(f"=== run {run_no}: 2 replicas against 1 ===")
        print(f"  answers/s            {rate[1]:.1f} → {rate[2]:.1f}   ×{speedup:.2f}  (target ≥ ×{TARGET_SPEEDUP})")
        print(f"  wall time            {one.wall:.3f} s → {two.wall:.3f} s   ×{two.wall / one.wall:.2f}")
        print(
            f"  bot CPU per answer   {ms(cpu_per_answer(one))} → {ms(cpu_per_answer(two))}   "
            f"×{cpu_per_answer(two) / cpu_per_answer(one):.2f}"
        )
        print(
            f"  fakes CPU per answer {ms(cpu_per_answer(one, 'fakes'))} → {ms(cpu_per_answer(two, 'fakes'))}   "
            f"(the fake Slack and OpenAI, in this process)"
        )
        if "database CPU in window" in two.phases:
            print(
                f"  database CPU/answer  {ms(cpu_per_answer(one, 'database'))} → "
                f"{ms(cpu_per_answer(two, 'database'))}   (the PostgreSQL server on this box)"
            )
        print(f"  cores kept busy      {cores_busy(one):.2f} → {cores_busy(two):.2f}   (of {CORES})")
        ceiling = box_ceiling(two, CORES, args.conversations, args.latency)
        print(
            f"  this box's ceiling   {ceiling:.1f}/s = ×{ceiling / rate[1]:.2f} of 1 replica   "
            f"(min of {CORES} cores / CPU per answer, bots, fakes and a local database, and conversations / latency); "
            f"2 replicas reach {rate[2] / ceiling:.0%} of it"
        )
        print(f"  reply p50            {ms(percentile(one.reply, 50))} → {ms(percentile(two.reply, 50))}")
        print(f"  duplicates           {one.duplicates} / {two.duplicates}   errors {one.errors} / {two.errors}")
        checks = [
            (f"×{TARGET_SPEEDUP} answers/s", speedup >= TARGET_SPEEDUP),
            ("no duplicate, no error", one.errors == 0 and two.errors == 0),
        ]
        print("  targets              " + "   ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in checks))

    with tempfile.TemporaryDirectory(prefix="slackbot-lease-") as tmp, fresh_database(args.database_url) as fresh:
        url = fresh or f"sqlite:///{tmp}/bot.db"
        timings = anyio.run(lease_overhead, url, args.lease_rounds, backend="trio")
        engine = url.split(":", 1)[0]
        for name, values in timings.items():
            print(
                f"  lease overhead ({engine}, {name}): acquire+release p50 {ms(percentile(values, 50))}   "
                f"p99 {ms(percentile(values, 99))}"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
