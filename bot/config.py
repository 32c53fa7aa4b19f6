"""Settings: read once at start from the environment (and a `.env` file), validated.

A missing or malformed setting raises `ConfigError` naming the variable; the CLI turns
that into one clear line and exit code 2. Tokens are kept out of `repr()` so a settings
object can never leak one into a log line or a traceback.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant in a Slack workspace. Answer clearly and concisely. "
    "Use Markdown for formatting."
)


class ConfigError(Exception):
    """A setting is missing or malformed. The message names the variable."""


@dataclass(frozen=True)
class Settings:
    slack_bot_token: str = field(repr=False)
    slack_app_token: str = field(repr=False)
    openai_api_key: str = field(repr=False)
    slack_api_url: str = "https://slack.com/api/"
    openai_base_url: str | None = None
    openai_model: str = "gpt-5-mini"
    database_url: str = "sqlite:///data/bot.db"
    async_timeout_seconds: float = 305.0
    async_max_concurrent_requests: int = 100
    stream_idle_timeout_seconds: float = 60.0
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    log_level: str = "INFO"
    async_backend: str = "trio"
    # Tuning knobs with sensible defaults; documented in the README.
    context_budget_tokens: int = 100_000
    max_answer_tokens: int = 4_000
    update_interval_seconds: float = 1.0
    shutdown_grace_seconds: float = 5.0
    watchdog_interval_seconds: float = 30.0
    watchdog_threshold_seconds: float = 120.0
    socket_ping_interval_seconds: float = 10.0
    # --- images and documents -------------------------------------------------------
    # --- user settings and Slack UX --------------------------------------------------
    # --- observability ----------------------------------------------------------------

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret value, for the log redaction filter."""
        return tuple(s for s in (self.slack_bot_token, self.slack_app_token, self.openai_api_key) if s)

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)


def _required(env: Mapping[str, str], name: str, prefix: str | None = None) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigError(f"{name} is not set (see the configuration table in README.md)")
    if prefix and not value.startswith(prefix):
        raise ConfigError(f"{name} must start with {prefix!r}")
    return value


def _number(env: Mapping[str, str], name: str, default: float, *, cast=float, minimum: float = 0.0):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        kind = "a whole number" if cast is int else "a number"
        raise ConfigError(f"{name} must be {kind}, got {raw!r}") from None
    if value <= minimum:
        raise ConfigError(f"{name} must be greater than {minimum:g}, got {raw!r}")
    return value


def _url(env: Mapping[str, str], name: str, default: str | None) -> str | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name} must be an http(s) URL, got {raw!r}")
    return raw if raw.endswith("/") else raw + "/"


def load_settings(env: Mapping[str, str] | None = None, *, dotenv_path: str | None = ".env") -> Settings:
    """Build `Settings` from `env` (default: the process environment plus `.env`)."""
    if env is None:
        if dotenv_path and os.path.exists(dotenv_path):
            from dotenv import dotenv_values

            merged = {k: v for k, v in dotenv_values(dotenv_path).items() if v is not None}
            merged.update(os.environ)  # the real environment wins over the file
            env = merged
        else:
            env = os.environ

    database_url = env.get("DATABASE_URL", "").strip() or Settings.database_url
    if not database_url.startswith("sqlite:///"):
        raise ConfigError(
            f"DATABASE_URL must look like sqlite:///path/to/bot.db (got {database_url!r}); "
            "other databases are not supported yet"
        )
    backend = env.get("BOT_ASYNC_BACKEND", "").strip().lower() or "trio"
    if backend not in ("trio", "asyncio"):
        raise ConfigError(f"BOT_ASYNC_BACKEND must be 'trio' or 'asyncio', got {backend!r}")
    log_level = env.get("LOG_LEVEL", "").strip().upper() or "INFO"
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, got {log_level!r}")

    timeout = _number(env, "ASYNC_TIMEOUT_SECONDS", Settings.async_timeout_seconds)
    return Settings(
        slack_bot_token=_required(env, "SLACK_BOT_TOKEN", "xoxb-"),
        slack_app_token=_required(env, "SLACK_APP_TOKEN", "xapp-"),
        openai_api_key=_required(env, "OPENAI_API_KEY"),
        slack_api_url=_url(env, "SLACK_API_URL", Settings.slack_api_url),
        openai_base_url=_url(env, "OPENAI_BASE_URL", None),
        openai_model=env.get("OPENAI_MODEL", "").strip() or Settings.openai_model,
        database_url=database_url,
        async_timeout_seconds=timeout,
        async_max_concurrent_requests=_number(
            env, "ASYNC_MAX_CONCURRENT_REQUESTS", Settings.async_max_concurrent_requests, cast=int
        ),
        stream_idle_timeout_seconds=_number(
            env, "STREAM_IDLE_TIMEOUT_SECONDS", Settings.stream_idle_timeout_seconds
        ),
        system_prompt=env.get("SYSTEM_PROMPT", "").strip() or DEFAULT_SYSTEM_PROMPT,
        log_level=log_level,
        async_backend=backend,
        context_budget_tokens=_number(
            env, "CONTEXT_BUDGET_TOKENS", Settings.context_budget_tokens, cast=int, minimum=500
        ),
        shutdown_grace_seconds=_number(
            env, "SHUTDOWN_GRACE_SECONDS", Settings.shutdown_grace_seconds, minimum=-1
        ),
        socket_ping_interval_seconds=_number(
            env, "SOCKET_PING_INTERVAL_SECONDS", Settings.socket_ping_interval_seconds
        ),
        **_media_settings(env),
        **_ux_settings(env),
        **_observability_settings(env),
    )


def _media_settings(env: Mapping[str, str]) -> dict:
    """Settings for images and documents."""
    return {}


def _ux_settings(env: Mapping[str, str]) -> dict:
    """Settings for user preferences, access control and Slack UX."""
    return {}


def _observability_settings(env: Mapping[str, str]) -> dict:
    """Settings for metrics, health endpoints and log format."""
    return {}


def sqlite_path(database_url: str) -> str:
    """`sqlite:///data/bot.db` → `data/bot.db`; `sqlite:////abs/x.db` → `/abs/x.db`; `:memory:` kept."""
    return database_url.removeprefix("sqlite:///")
