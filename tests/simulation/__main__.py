"""Command line for the simulator (run from the repository root).

    python -m tests.simulation --seed 42            replay one seed: scenario, readable trace, verdict
    python -m tests.simulation --seed 42 --twice    … and run it again to prove the trace is identical
    python -m tests.simulation --seeds 100000       a long run (seeds 0..99999; --start to move the range)
    python -m tests.simulation --scenario FILE      replay a (shrunk) scenario saved as JSON ("-" = stdin)

A failing seed prints its violations and its replay command, then is shrunk (fewer
messages, faults, users; plainer answers) to a minimal scenario that fails the same way,
which is printed and saved as JSON for `--scenario`. Exit status 1 if any seed failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tests.simulation.runner import format_trace, replay_command, report, run_scenario, run_seed, shrink
from tests.simulation.scenario import Scenario, generate


def _shrink_and_print(result, out) -> None:
    print(f"shrinking seed {result.scenario.seed} …", file=out, flush=True)
    small = shrink(result, progress=lambda line: print(line, file=out, flush=True))
    print("minimal failing scenario:", file=out)
    print(small.scenario.describe(), file=out)
    print("its violations:", file=out)
    for v in small.violations[:10]:
        print(f"  - {v.splitlines()[0]}", file=out)
    path = f"/tmp/slackbot-sim-shrunk-{result.scenario.seed}.json"
    with open(path, "w") as f:
        f.write(small.scenario.to_json())
    print(f"replay it: python -m tests.simulation --scenario {path}", file=out, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.simulation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--seed", type=int, help="replay one seed with its trace")
    what.add_argument("--seeds", type=int, help="run this many seeds")
    what.add_argument("--scenario", help="replay a scenario JSON file (from the shrinker); '-' reads stdin")
    parser.add_argument("--start", type=int, default=0, help="first seed for --seeds (default 0)")
    parser.add_argument("--twice", action="store_true", help="with --seed: run twice, compare the traces")
    parser.add_argument("--quiet", "-q", action="store_true", help="with --seed: no trace, only the verdict")
    parser.add_argument("--no-shrink", action="store_true", help="do not shrink failures")
    parser.add_argument("--keep-going", action="store_true", help="with --seeds: do not stop at the first failure")
    args = parser.parse_args(argv)
    out = sys.stdout

    if args.seeds is not None:
        started = time.perf_counter()
        failures = []
        last = started
        for i, seed in enumerate(range(args.start, args.start + args.seeds), 1):
            result = run_seed(seed)
            if result.failed:
                failures.append(result)
                print(report(result), file=out, flush=True)
                if not args.keep_going:
                    break
            now = time.perf_counter()
            if now - last >= 10 or i == args.seeds:
                rate = i / (now - started) * 60
                print(
                    f"{i} seeds in {now - started:.0f}s ({rate:.0f} seeds/min), {len(failures)} failing",
                    file=out,
                    flush=True,
                )
                last = now
        if failures:
            print("failing seeds: " + ", ".join(str(r.scenario.seed) for r in failures), file=out)
            if not args.no_shrink:
                _shrink_and_print(failures[0], out)
            return 1
        return 0

    if args.scenario is not None:
        text = sys.stdin.read() if args.scenario == "-" else Path(args.scenario).read_text()
        scenario = Scenario.from_json(text)
    else:
        scenario = generate(args.seed)
    print(scenario.describe(), file=out)
    result = run_scenario(scenario)
    if not args.quiet:
        print("\ntrace (virtual seconds after the first socket's hello):", file=out)
        print(format_trace(result.trace), file=out)
    print(
        f"\n{len(result.trace)} trace lines, {result.virtual_seconds:.1f}s virtual in "
        f"{result.wall_seconds:.2f}s real; stats {result.stats}",
        file=out,
    )
    if args.twice:
        again = run_scenario(scenario)
        same = again.trace == result.trace and again.violations == result.violations
        print(f"second run: {'identical trace' if same else 'TRACE DIFFERS'} ({len(again.trace)} lines)", file=out)
        if not same:
            for i, (a, b) in enumerate(zip(result.trace, again.trace, strict=False)):
                if a != b:
                    print(f"first difference at line {i}:\n  {a}\n  {b}", file=out)
                    break
            return 1
    if result.failed:
        print(report(result), file=out)
        if args.seed is not None and not args.no_shrink:
            _shrink_and_print(result, out)
        return 1
    print(f"OK: all invariants hold ({replay_command(scenario.seed)})", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
