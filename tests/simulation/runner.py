"""Run scenarios deterministically, check them, shrink failures, and report.

`run_scenario(scenario)` is one fresh `trio.run` on a fresh `MockClock(autojump_threshold=0)`
with every source of nondeterminism pinned to the seed:

- Trio's scheduler: each batch of runnable tasks is put in creation order and then
  shuffled with Trio's own `_r`, seeded from the seed (the switch Trio provides for
  Hypothesis). So interleavings vary from seed to seed, yet replay exactly;
- Python's global `random` (the openai SDK's retry jitter) and `uuid.uuid4` (request ids,
  error ids, idempotency keys), seeded; the reconnect backoff's RNG (in `world.py`);
- the garbage collector is paused during the run, so no finalizer runs at a moment that
  depends on memory history (what survives the collection before a run is frozen, so that
  collection only walks the previous run's objects); no worker thread may be used at all (one would let the
  mock clock jump while it runs), which is enforced.

The trace — every Slack call, delivery, ack, OpenAI call, fault, process event and bot log
line, with its virtual time — is what "bit for bit" compares.
"""

from __future__ import annotations

import gc
import logging
import random
import re
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field

import anyio.to_thread
import trio
import trio.testing

from tests.simulation import invariants
from tests.simulation.scenario import Scenario, generate, shrink_candidates, size
from tests.simulation.world import World

FORBIDDEN_LOG = re.compile(
    r"RuntimeError|WouldBlock|not held|BrokenResource|ClosedResource|Cancelled|borrow|unexpected error"
    r"|handler failed|ExceptionGroup|Traceback",
    re.IGNORECASE,
)


@dataclass
class Result:
    scenario: Scenario
    violations: list[str]
    trace: list[tuple]
    stats: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0
    virtual_seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return bool(self.violations)

    def kinds(self) -> set[str]:
        return {violation_kind(v) for v in self.violations}


def violation_kind(text: str) -> str:
    """A violation without its particulars, to tell "the same failure" when shrinking."""
    text = re.sub(r"^t=[\d.]+: ", "", text).split("\n", 1)[0]
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    text = re.sub(r"\b(m|#|request |process #?)\d+\b", r"\1N", text)
    text = re.sub(r"[0-9a-f]{12}|\d+(\.\d+)?", "N", text)
    return " ".join(text.split()[:7])


class _TraceLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.world: World | None = None

    def emit(self, record: logging.LogRecord) -> None:
        world = self.world
        if world is None:
            return
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            message += f" [{type(record.exc_info[1]).__name__}: {record.exc_info[1]}]"
        try:
            world.log_trace("log", f"{record.levelname} {record.name}: {message}")
        except Exception:
            world.trace.append((None, "log", f"{record.levelname} {record.name}: {message}"))
        if record.levelno >= logging.WARNING:
            exc = record.exc_info[1] if record.exc_info else None
            if FORBIDDEN_LOG.search(message) or (exc is not None and type(exc).__name__ != "StorageError"):
                world.violations.append(f"log: {record.levelname} {record.name}: {message}")


@contextmanager
def deterministic(seed: int, world: World):
    """Pin every source of nondeterminism for one run (and put everything back after)."""
    import trio._core._run as trio_run

    saved_sched = (trio_run._ALLOW_DETERMINISTIC_SCHEDULING, trio_run._r.getstate())
    trio_run._ALLOW_DETERMINISTIC_SCHEDULING = True
    trio_run._r.seed(f"{seed}:scheduler")
    saved_random = random.getstate()
    random.seed(f"{seed}:global")
    saved_uuid4 = uuid.uuid4
    uuid_rng = random.Random(f"{seed}:uuid")
    uuid.uuid4 = lambda: uuid.UUID(int=uuid_rng.getrandbits(128), version=4)
    saved_run_sync = anyio.to_thread.run_sync
    offenders: list[str] = []

    async def no_threads(func, *args, **kwargs):
        offenders.append(getattr(func, "__qualname__", repr(func)))
        raise AssertionError(f"worker thread used in the simulation: {offenders[-1]}")

    anyio.to_thread.run_sync = no_threads
    handler = _TraceLog()
    handler.world = world
    loggers = [logging.getLogger(name) for name in ("bot", "openai")]
    saved_loggers = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
        lg.propagate = False  # pytest's capture would cost more than the run
        lg.addHandler(handler)
    gc_enabled = gc.isenabled()
    gc.collect()
    # What survived is long-lived (modules, caches): frozen, the next run's collection does
    # not walk it again (a full collection per run was a sixth of the simulator's time).
    gc.freeze()
    gc.disable()
    try:
        yield offenders
    finally:
        if gc_enabled:
            gc.enable()
        for lg, (level, propagate) in zip(loggers, saved_loggers, strict=False):
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate
        anyio.to_thread.run_sync = saved_run_sync
        uuid.uuid4 = saved_uuid4
        random.setstate(saved_random)
        trio_run._ALLOW_DETERMINISTIC_SCHEDULING, state = saved_sched
        trio_run._r.setstate(state)


def run_scenario(scenario: Scenario) -> Result:
    world = World(scenario)
    started = time.perf_counter()
    try:
        with deterministic(scenario.seed, world) as offenders:
            try:
                trio.run(world.run, clock=trio.testing.MockClock(autojump_threshold=0))
            except BaseException as exc:
                world.violations.append("the run crashed: " + "".join(traceback.format_exception(exc))[-4000:])
            world.finished = True
            if offenders:
                world.violations.append(f"worker threads were used: {offenders}")
            if not any(v.startswith("the run crashed") for v in world.violations):
                invariants.check(world)
                invariants.check_retry_after(world)
                invariants.check_replicas(world)
    finally:
        world.cleanup()
    return Result(
        scenario,
        world.violations,
        world.trace,
        dict(sorted(world.stats.items())),
        time.perf_counter() - started,
        getattr(world, "end_time", 0.0),
    )


def run_seed(seed: int) -> Result:
    return run_scenario(generate(seed))


def shrink(result: Result, *, max_runs: int = 200, max_seconds: float = 120.0, progress=None) -> Result:
    """Greedy shrinking: take the first smaller variant that still fails the same way,
    until no variant does (or the budget runs out)."""
    wanted = violation_kind(result.violations[0])
    best = result
    runs, started = 0, time.perf_counter()
    improved = True
    while improved and runs < max_runs and time.perf_counter() - started < max_seconds:
        improved = False
        for candidate in shrink_candidates(best.scenario):
            if size(candidate) >= size(best.scenario):
                continue
            if runs >= max_runs or time.perf_counter() - started >= max_seconds:
                break
            attempt = run_scenario(candidate)
            runs += 1
            if wanted in attempt.kinds():
                best = attempt
                improved = True
                if progress:
                    progress(f"  shrunk to {len(candidate.messages)} message(s), {len(candidate.faults)} fault(s)")
                break
    note = f"shrunk from seed {result.scenario.seed} in {runs} runs"
    best.scenario = Scenario(**{**best.scenario.__dict__, "note": note})
    return best


def format_trace(trace: list[tuple]) -> str:
    lines = []
    for t, kind, text in trace:
        stamp = f"{t:10.3f}" if t is not None else " " * 10
        lines.append(f"{stamp}  {kind:<9} {text}")
    return "\n".join(lines)


def replay_command(seed: int) -> str:
    return f"python -m tests.simulation --seed {seed}"


def report(result: Result) -> str:
    s = result.scenario
    lines = [f"SIMULATION FAILED: seed {s.seed} — {len(result.violations)} violation(s):"]
    lines += [f"  - {v}" for v in result.violations[:20]]
    if len(result.violations) > 20:
        lines.append(f"  … and {len(result.violations) - 20} more")
    lines.append(f"replay: {replay_command(s.seed)}")
    return "\n".join(lines)
