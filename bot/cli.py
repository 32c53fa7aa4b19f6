"""`slackbot` / `python -m bot`: read the settings, set up logging, run on the chosen backend.

Commands: none or `run` (the bot), `manifest` (the Slack app manifest), `check` (try the
configuration for real), `shell` (the assistant in a terminal, no Slack) and `usage`
(tokens per user and model for a month, from the database).

Exit codes: 0 after a clean shutdown, 2 for a configuration or start-up problem (one
clear line on stderr, no traceback); `check` exits 1 when any check fails, `usage` when
the database cannot be read.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from bot.config import ConfigError, load_settings
from bot.logs import setup_logging

log = logging.getLogger("bot")
T = TypeVar("T")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slackbot",
        description="A Slack assistant backed by OpenAI. Without a command it starts the bot. Settings come "
        "from the environment and a .env file in the current directory; see README.md.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("run", help="start the bot (the default)")
    manifest = commands.add_parser("manifest", help="print the Slack app manifest (JSON) to create the app from")
    manifest.add_argument("--name", default="AI Assistant", help="the app's name in Slack (default: %(default)s)")
    commands.add_parser("check", help="check the tokens, the OpenAI key and model, and the database, for real")
    commands.add_parser("shell", help="talk to the assistant from this terminal (needs no Slack)")
    usage = commands.add_parser(
        "usage", help="print the tokens used per user and per model in a month (from DATABASE_URL; needs no tokens)"
    )
    usage.add_argument("--month", metavar="YYYY-MM", help="the month, in UTC (default: this month)")
    usage.add_argument("--csv", action="store_true", help="CSV with a header row: one row per user and model")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse printed why
        return int(exc.code or 0)
    if args.command == "manifest":
        return _manifest(args.name)
    if args.command == "check":
        return _check()
    if args.command == "shell":
        return _shell()
    if args.command == "usage":
        return _usage(args.month, as_csv=args.csv)
    return _run()


def _manifest(name: str) -> int:
    """Needs no tokens: it is what you create the Slack app (and so the tokens) from."""
    from bot.manifest import build_manifest

    try:
        settings = load_settings(purpose="check")
    except ConfigError as exc:
        print(f"slackbot: configuration error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(build_manifest(name=name, command=settings.surfaces.settings_command), indent=2))
    return 0


def _check() -> int:
    from bot.check import CheckResult, render, run_checks

    try:
        settings = load_settings(purpose="check")
    except ConfigError as exc:
        print(render([CheckResult("Configuration", False, str(exc), "Fix this value in .env or the environment.")]))
        return 1
    setup_logging("ERROR", settings.secrets)  # the table is the output; keep library chatter out of it
    print(f"Checking the configuration (backend {settings.async_backend})…\n")
    results = _run_on(settings.async_backend, run_checks, settings)
    print(render(results))
    return 0 if all(r.ok for r in results) else 1


def _shell() -> int:
    from bot.shell import run_shell

    try:
        settings = load_settings(purpose="shell")
    except ConfigError as exc:
        print(f"slackbot: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(
        "WARNING" if settings.observability.log_level in ("DEBUG", "INFO") else settings.observability.log_level,
        settings.secrets,
    )
    try:
        return _run_on(settings.async_backend, run_shell, settings)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 0


def _usage(month: str | None, *, as_csv: bool) -> int:
    """Needs only DATABASE_URL: no Slack tokens, no OpenAI key."""
    from bot.usage_report import MonthError, parse_month, usage_report

    try:
        start = parse_month(month)
    except MonthError as exc:
        print(f"slackbot: {exc}", file=sys.stderr)
        return 2
    try:
        settings = load_settings(purpose="check")
    except ConfigError as exc:
        print(f"slackbot: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging("ERROR", settings.secrets)  # the report is the output
    code, text = _run_on(settings.async_backend, usage_report, settings, start, as_csv)
    print(text, end="", file=sys.stdout if code == 0 else sys.stderr)
    return code


def _run() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"slackbot: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.observability.log_level, settings.secrets, settings.observability.log_format)

    _without_the_sdks_aiohttp_transport()
    from bot.startup import StartupError, run_bot  # after logging, so import-time logs are filtered

    # The ~100k objects the imports created (the openai SDK's models above all) live for
    # the whole run: move them out of the collector's reach, so a full collection during a
    # burst scans only what the bot itself allocates (it cut ack p99 from ~45 ms to ~12 ms
    # in benchmarks/bench_conversations.py).
    gc.freeze()

    log.info(
        "starting on %s (model %s, timeout %gs, max %d concurrent model calls)",
        settings.async_backend,
        settings.openai.model,
        settings.openai.async_timeout_seconds,
        settings.openai.async_max_concurrent_requests,
    )
    try:
        _run_on(settings.async_backend, run_bot, settings)
    except StartupError as exc:
        log.error("%s", exc)
        print(f"slackbot: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def _run_on(backend: str, func: Callable[..., Awaitable[T]], *args: object) -> T:
    """Run `func` on BOT_ASYNC_BACKEND's event loop: Trio, asyncio, or asyncio on uvloop
    (which AnyIO starts for us; the bot's code is the same on all three)."""
    if backend == "uvloop":
        return anyio.run(func, *args, backend="asyncio", backend_options={"use_uvloop": True})
    return anyio.run(func, *args, backend=backend)


def _without_the_sdks_aiohttp_transport() -> None:
    """The openai SDK imports its optional aiohttp transport whenever aiohttp is installed
    (beside Bolt, say, or another app in the same environment): about 9 MB of resident
    memory and 100 ms of start-up for a transport this bot never uses (it is asyncio-only;
    the bot's client is httpx2). Marked absent before the SDK is imported, the SDK takes
    its own "not installed" path. Nothing else is affected: no other part of the bot
    imports aiohttp."""
    sys.modules.setdefault("openai._vendor.httpx_aiohttp", None)  # type: ignore[arg-type]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
