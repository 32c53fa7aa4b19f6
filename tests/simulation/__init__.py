"""Deterministic simulation at scale (issue 6): seeded random worlds, in virtual time.

One seed determines everything — users, threads, message timing, what OpenAI does with
each message, Slack / socket / storage faults, SIGTERMs and crashes, how many replicas
run at once and their kills, pauses and partitions, and the scheduler's interleavings —
and the same seed replays the same run bit for bit.

- `scenario.py`: `generate(seed)` → a `Scenario` (plain data, printable, JSON), and the
  shrinker's candidate reductions;
- `world.py`: runs a scenario against the real bot (`bot.startup.run_bot`) with the fakes
  (`tests/fakes`), Slack's redelivery, a SQLite file shared across restarts, crashes;
- `invariants.py`: what must hold after every run;
- `runner.py`: deterministic execution, shrinking, reports;
- `python -m tests.simulation --seed N` replays one seed with a readable trace,
  `--seeds 100000` runs many (see `__main__.py`); `tests/test_simulation_seeds.py` is CI.
"""

from tests.simulation.runner import Result, replay_command, report, run_scenario, run_seed, shrink
from tests.simulation.scenario import Scenario, generate

__all__ = ["Result", "Scenario", "generate", "replay_command", "report", "run_scenario", "run_seed", "shrink"]
