"""`slackbot` / `python -m bot`: read the settings, set up logging, run on the chosen backend.

Exit codes: 0 after a clean shutdown, 2 for a configuration or start-up problem (one
clear line on stderr, no traceback).
"""

from __future__ import annotations

import gc
import logging
import sys

import anyio

from bot.config import ConfigError, load_settings
from bot.logs import setup_logging

log = logging.getLogger("bot")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print("usage: slackbot\n\nStarts the Slack bot. Settings come from the environment and a .env "
              "file in the current directory; see README.md for the table.")
        return 0
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"slackbot: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.secrets)

    from bot.startup import StartupError, run_bot  # after logging, so import-time logs are filtered

    # The ~100k objects the imports created (the openai SDK's models above all) live for
    # the whole run: move them out of the collector's reach, so a full collection during a
    # burst scans only what the bot itself allocates (it cut ack p99 from ~45 ms to ~12 ms
    # in benchmarks/bench_conversations.py).
    gc.freeze()

    log.info("starting on %s (model %s, timeout %gs, max %d concurrent model calls)", settings.async_backend,
             settings.openai_model, settings.async_timeout_seconds, settings.async_max_concurrent_requests)
    try:
        anyio.run(run_bot, settings, backend=settings.async_backend)
    except StartupError as exc:
        log.error("%s", exc)
        print(f"slackbot: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
