"""Settings: read once at start from the environment (and a `.env` file), validated.

A missing or malformed setting raises `ConfigError` naming the variable; the CLI turns
that into one clear line and exit code 2. Tokens are kept out of `repr()` so a settings
object can never leak one into a log line or a traceback.

`Settings` holds small groups by concern (`settings.slack`, `.openai`, `.media`,
`.surfaces`, `.budgets`, `.observability`, `.replica`, `.storage`); a part of the bot
that needs only one group is handed that group.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeGuard, overload
from urllib.parse import urlsplit

from bot.storage.location import locate

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant in a Slack workspace. Answer clearly and concisely. Use Markdown for formatting."
)


MAX_MONTHLY_TOKENS = 1_000_000_000_000  # the largest monthly token budget (a typo guard, not a policy)


class ConfigError(Exception):
    """A setting is missing or malformed. The message names the variable."""


ImageQuality = Literal["auto", "low", "medium", "high", "xhigh", "max"]  # IMAGE_QUALITY
_IMAGE_QUALITIES: tuple[ImageQuality, ...] = ("auto", "low", "medium", "high", "xhigh", "max")


def _is_image_quality(value: str) -> TypeGuard[ImageQuality]:
    return value in _IMAGE_QUALITIES


@dataclass(frozen=True)
class SlackSettings:
    """The Slack connection: the two tokens, the Web API address, the Socket Mode ping."""

    bot_token: str = field(repr=False)  # SLACK_BOT_TOKEN
    app_token: str = field(repr=False)  # SLACK_APP_TOKEN
    api_url: str = "https://slack.com/api/"  # SLACK_API_URL
    socket_ping_interval_seconds: float = 10.0


@dataclass(frozen=True)
class OpenAISettings:
    """The model endpoint and what one answer may take: time, concurrency, tokens."""

    api_key: str = field(repr=False)  # OPENAI_API_KEY
    base_url: str | None = None  # OPENAI_BASE_URL
    model: str = "gpt-5-mini"  # OPENAI_MODEL
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    async_timeout_seconds: float = 305.0
    stream_idle_timeout_seconds: float = 60.0
    async_max_concurrent_requests: int = 100
    context_budget_tokens: int = 100_000
    max_answer_tokens: int = 4_000


@dataclass(frozen=True)
class MediaSettings:
    """Files, images and documents, and fetching pasted image URLs."""

    max_file_mb: float = 20.0  # a file (or image URL) declared or found larger is refused before/while downloading
    max_files_per_message: int = 10  # attachments + image URLs read from one message; the rest get a note
    image_model: str = "gpt-image-2.5-sunburst"  # images.generate / images.edit; "off" disables the image tools
    image_size: str = "1024x1024"
    image_quality: ImageQuality = "auto"
    max_context_images: int = 4  # thread images (attached or generated) the model sees with each question
    max_image_pixels: int = 50_000_000  # decompression-bomb guard, checked from the header before decoding
    max_pdf_pages: int = 300  # pages read from one PDF; later pages are left out with a note
    max_document_chars: int = 1_000_000  # text extracted from one document before it is cut (bounds the work)
    media_workers: int = 2  # worker threads that parse documents and resize images at the same time
    url_fetch_timeout_seconds: float = 15.0  # for one pasted image URL, redirects included
    allow_loopback_urls: bool = False  # tests only: let pasted image URLs reach 127.0.0.1 / ::1


@dataclass(frozen=True)
class SurfaceSettings:
    """User settings, access control and the Slack UX: who may use the bot, how answers show."""

    settings_command: str = "/settings"  # the slash command that opens the settings modal
    admin_users: frozenset[str] = frozenset()  # may change the workspace defaults
    allowed_users: frozenset[str] = frozenset()  # empty: everyone may use the bot
    allowed_channels: frozenset[str] = frozenset()  # empty: every channel (DMs follow allowed_users)
    native_streaming: bool = True  # chat.startStream/appendStream/stopStream, else paced chat.update
    welcome: bool = True  # a short welcome with the answer to a user's first DM
    update_interval_seconds: float = 1.0  # between two edits of a paced (chat.update) answer


@dataclass(frozen=True)
class BudgetSettings:
    """Usage budgets: tokens in + out per calendar month (UTC); None: unlimited."""

    user_monthly_tokens: int | None = None  # each user's; the workspace defaults may set another
    workspace_monthly_tokens: int | None = None  # everyone's together


@dataclass(frozen=True)
class ObservabilitySettings:
    """Logs, the metrics and health endpoints, the watchdog."""

    log_level: str = "INFO"
    log_format: str = "text"  # "text" | "json"
    metrics_port: int | None = None  # None: no HTTP listener; 0: any free port (tests)
    metrics_host: str = "127.0.0.1"
    watchdog_interval_seconds: float = 30.0
    watchdog_threshold_seconds: float = 120.0


@dataclass(frozen=True)
class ReplicaSettings:
    """This process among those sharing the database, and how it stops."""

    id: str = "local"  # REPLICA_ID, default: the host name
    timeout_seconds: float = 30.0  # a heartbeat older than this, or a lease left unrenewed, is taken over
    shutdown_grace_seconds: float = 5.0


@dataclass(frozen=True)
class StorageSettings:
    database_url: str = "sqlite:///data/bot.db"  # DATABASE_URL


@dataclass(frozen=True)
class Settings:
    """Every setting, in groups; a part of the bot that needs one group is handed that group."""

    slack: SlackSettings
    openai: OpenAISettings
    media: MediaSettings = field(default_factory=MediaSettings)
    surfaces: SurfaceSettings = field(default_factory=SurfaceSettings)
    budgets: BudgetSettings = field(default_factory=BudgetSettings)
    observability: ObservabilitySettings = field(default_factory=ObservabilitySettings)
    replica: ReplicaSettings = field(default_factory=ReplicaSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    async_backend: str = "trio"  # BOT_ASYNC_BACKEND (trio, asyncio, uvloop): read by the CLI only, to start the loop

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret value, for the log redaction filter."""
        return tuple(s for s in (self.slack.bot_token, self.slack.app_token, self.openai.api_key) if s)


def _required(env: Mapping[str, str], name: str, prefix: str | None = None, *, optional: bool = False) -> str:
    value = env.get(name, "").strip()
    if not value and optional:
        return ""
    if not value:
        raise ConfigError(f"{name} is not set (see the configuration table in README.md)")
    if prefix and not value.startswith(prefix):
        raise ConfigError(f"{name} must start with {prefix!r}")
    return value


@overload
def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float: ...
@overload
def _number(
    env: Mapping[str, str], name: str, default: int, *, cast: Callable[[str], int], minimum: float = 0.0
) -> int: ...
def _number(
    env: Mapping[str, str], name: str, default: float, *, cast: Callable[[str], float] = float, minimum: float = 0.0
) -> float:
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


@overload
def _url(env: Mapping[str, str], name: str, default: str) -> str: ...
@overload
def _url(env: Mapping[str, str], name: str, default: None) -> str | None: ...
def _url(env: Mapping[str, str], name: str, default: str | None) -> str | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name} must be an http(s) URL, got {raw!r}")
    return raw if raw.endswith("/") else raw + "/"


def load_settings(
    env: Mapping[str, str] | None = None, *, dotenv_path: str | None = ".env", purpose: str = "bot"
) -> Settings:
    """Build `Settings` from `env` (default: the process environment plus `.env`).

    `purpose` says which secrets must be present: "bot" all three; "shell" no Slack
    tokens, and no OpenAI key when OPENAI_BASE_URL names a local server; "check" none
    (`slackbot check` reports missing ones in its table instead of stopping at the first).
    Malformed values are errors whatever the purpose."""
    if env is None:
        if dotenv_path and os.path.exists(dotenv_path):
            from dotenv import dotenv_values

            merged = {k: v for k, v in dotenv_values(dotenv_path).items() if v is not None}
            merged.update(os.environ)  # the real environment wins over the file
            env = merged
        else:
            env = os.environ

    database_url = env.get("DATABASE_URL", "").strip() or StorageSettings.database_url
    try:
        locate(database_url)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    backend = env.get("BOT_ASYNC_BACKEND", "").strip().lower() or "trio"
    if backend not in ("trio", "asyncio", "uvloop"):
        raise ConfigError(f"BOT_ASYNC_BACKEND must be 'trio', 'asyncio' or 'uvloop', got {backend!r}")
    if backend == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ConfigError("BOT_ASYNC_BACKEND=uvloop needs the uvloop package, which is not installed here")
    log_level = env.get("LOG_LEVEL", "").strip().upper() or "INFO"
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, got {log_level!r}")

    # Read in the order the checks always ran (the first malformed value is the one reported).
    timeout = _number(env, "ASYNC_TIMEOUT_SECONDS", OpenAISettings.async_timeout_seconds)
    bot_token = _required(env, "SLACK_BOT_TOKEN", "xoxb-", optional=purpose != "bot")
    app_token = _required(env, "SLACK_APP_TOKEN", "xapp-", optional=purpose != "bot")
    api_key = _openai_key(env, purpose)
    slack_api_url = _url(env, "SLACK_API_URL", SlackSettings.api_url)
    openai = OpenAISettings(
        api_key=api_key,
        base_url=_url(env, "OPENAI_BASE_URL", None),
        model=env.get("OPENAI_MODEL", "").strip() or OpenAISettings.model,
        async_timeout_seconds=timeout,
        async_max_concurrent_requests=_number(
            env, "ASYNC_MAX_CONCURRENT_REQUESTS", OpenAISettings.async_max_concurrent_requests, cast=int
        ),
        stream_idle_timeout_seconds=_number(
            env, "STREAM_IDLE_TIMEOUT_SECONDS", OpenAISettings.stream_idle_timeout_seconds
        ),
        system_prompt=env.get("SYSTEM_PROMPT", "").strip() or DEFAULT_SYSTEM_PROMPT,
        context_budget_tokens=_number(
            env, "CONTEXT_BUDGET_TOKENS", OpenAISettings.context_budget_tokens, cast=int, minimum=500
        ),
    )
    shutdown_grace = _number(env, "SHUTDOWN_GRACE_SECONDS", ReplicaSettings.shutdown_grace_seconds, minimum=-1)
    slack = SlackSettings(
        bot_token=bot_token,
        app_token=app_token,
        api_url=slack_api_url,
        socket_ping_interval_seconds=_number(
            env, "SOCKET_PING_INTERVAL_SECONDS", SlackSettings.socket_ping_interval_seconds
        ),
    )
    media = _media_settings(env)
    surfaces = _slack_surface_settings(env)
    observability = _observability_settings(env, log_level)
    replica = ReplicaSettings(
        id=_replica_id(env),
        timeout_seconds=_number(env, "REPLICA_TIMEOUT_SECONDS", ReplicaSettings.timeout_seconds, minimum=1),
        shutdown_grace_seconds=shutdown_grace,
    )
    budgets = BudgetSettings(
        user_monthly_tokens=_budget(env, "USER_MONTHLY_TOKENS"),
        workspace_monthly_tokens=_budget(env, "WORKSPACE_MONTHLY_TOKENS"),
    )
    return Settings(
        slack=slack,
        openai=openai,
        media=media,
        surfaces=surfaces,
        budgets=budgets,
        observability=observability,
        replica=replica,
        storage=StorageSettings(database_url=database_url),
        async_backend=backend,
    )


def _budget(env: Mapping[str, str], name: str) -> int | None:
    """A monthly token budget: a whole number (`1_000_000` and `1,000,000` read as written);
    empty or 0 means unlimited (None)."""
    raw = env.get(name, "").strip()
    digits = raw.replace("_", "").replace(",", "")
    if not digits:
        return None
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 13 or int(digits) > MAX_MONTHLY_TOKENS:
        raise ConfigError(
            f"{name} must be a whole number of tokens up to {MAX_MONTHLY_TOKENS:,} (0 or empty: unlimited), got {raw!r}"
        )
    return int(digits) or None


def _replica_id(env: Mapping[str, str]) -> str:
    """REPLICA_ID, or the host name: one replica per machine needs no setting; several
    on one machine (sharing an SQLite file, say) need one each."""
    value = env.get("REPLICA_ID", "").strip() or socket.gethostname() or ReplicaSettings.id
    if len(value) > 200 or not value.isprintable():
        raise ConfigError(f"REPLICA_ID must be a short printable name, got {value[:40]!r}")
    return value


def _media_settings(env: Mapping[str, str]) -> MediaSettings:
    """Settings for images and documents."""
    image_model = env.get("IMAGE_MODEL", "").strip() or MediaSettings.image_model
    image_size = env.get("IMAGE_SIZE", "").strip().lower() or MediaSettings.image_size
    if image_size != "auto" and not re.fullmatch(r"[1-9][0-9]{1,4}x[1-9][0-9]{1,4}", image_size):
        raise ConfigError(f"IMAGE_SIZE must be WIDTHxHEIGHT (e.g. 1024x1024) or auto, got {image_size!r}")
    image_quality = env.get("IMAGE_QUALITY", "").strip().lower() or MediaSettings.image_quality
    if not _is_image_quality(image_quality):
        raise ConfigError(f"IMAGE_QUALITY must be one of auto, low, medium, high, xhigh, max; got {image_quality!r}")
    loopback = env.get("ALLOW_LOOPBACK_URLS", "").strip().lower() or "false"
    if loopback not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"ALLOW_LOOPBACK_URLS must be true or false, got {loopback!r}")
    return MediaSettings(
        max_file_mb=_number(env, "MAX_FILE_MB", MediaSettings.max_file_mb),
        max_files_per_message=_number(env, "MAX_FILES_PER_MESSAGE", MediaSettings.max_files_per_message, cast=int),
        image_model=image_model,
        image_size=image_size,
        image_quality=image_quality,
        max_context_images=_number(env, "MAX_CONTEXT_IMAGES", MediaSettings.max_context_images, cast=int, minimum=-1),
        max_image_pixels=_number(env, "MAX_IMAGE_PIXELS", MediaSettings.max_image_pixels, cast=int, minimum=10_000),
        max_pdf_pages=_number(env, "MAX_PDF_PAGES", MediaSettings.max_pdf_pages, cast=int),
        max_document_chars=_number(env, "MAX_DOCUMENT_CHARS", MediaSettings.max_document_chars, cast=int, minimum=1000),
        media_workers=_number(env, "MEDIA_WORKERS", MediaSettings.media_workers, cast=int),
        url_fetch_timeout_seconds=_number(env, "URL_FETCH_TIMEOUT_SECONDS", MediaSettings.url_fetch_timeout_seconds),
        allow_loopback_urls=loopback in ("true", "1", "yes"),
    )


def _slack_surface_settings(env: Mapping[str, str]) -> SurfaceSettings:
    """Settings for user preferences, access control and Slack UX."""
    command = env.get("SETTINGS_COMMAND", "").strip() or SurfaceSettings.settings_command
    if not command.startswith("/"):
        command = "/" + command
    if not re.fullmatch(r"/[a-z0-9_\-]{1,31}", command):
        raise ConfigError(
            f"SETTINGS_COMMAND must be a slash command like /settings (lowercase, no spaces, "
            f"at most 32 characters), got {command!r}"
        )
    return SurfaceSettings(
        settings_command=command,
        admin_users=_slack_ids(env, "ADMIN_USERS", "UW"),
        allowed_users=_slack_ids(env, "ALLOWED_USERS", "UW"),
        allowed_channels=_slack_ids(env, "ALLOWED_CHANNELS", "CGD"),
        native_streaming=_flag(env, "NATIVE_STREAMING", SurfaceSettings.native_streaming),
        welcome=_flag(env, "WELCOME_MESSAGE", SurfaceSettings.welcome),
    )


def _slack_ids(env: Mapping[str, str], name: str, prefixes: str) -> frozenset[str]:
    """A comma- or space-separated list of Slack ids (users `U…`/`W…`, channels `C…`/`G…`/`D…`)."""
    ids = [part for part in re.split(r"[\s,]+", env.get(name, "").strip()) if part]
    for slack_id in ids:
        if not re.fullmatch(rf"[{prefixes}][A-Z0-9]+", slack_id):
            kinds = "user ids like U0123ABCD" if "U" in prefixes else "channel ids like C0123ABCD"
            raise ConfigError(f"{name} must list Slack {kinds}, separated by commas; got {slack_id!r}")
    return frozenset(ids)


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be on or off (true/false), got {raw!r}")


def _openai_key(env: Mapping[str, str], purpose: str) -> str:
    """The shell may talk to a local OpenAI-compatible server that needs no key."""
    if purpose == "bot":
        return _required(env, "OPENAI_API_KEY")
    key = _required(env, "OPENAI_API_KEY", optional=True)
    if not key and purpose == "shell" and not env.get("OPENAI_BASE_URL", "").strip():
        raise ConfigError("OPENAI_API_KEY is not set (or set OPENAI_BASE_URL to a local OpenAI-compatible server)")
    return key


def _observability_settings(env: Mapping[str, str], log_level: str) -> ObservabilitySettings:
    """Settings for metrics, health endpoints and log format."""
    port = None
    raw_port = env.get("METRICS_PORT", "").strip()
    if raw_port:
        try:
            port = int(raw_port)
        except ValueError:
            raise ConfigError(f"METRICS_PORT must be a port number, got {raw_port!r}") from None
        if not 0 <= port <= 65535:
            raise ConfigError(f"METRICS_PORT must be between 0 and 65535, got {raw_port!r}")
    log_format = env.get("LOG_FORMAT", "").strip().lower() or ObservabilitySettings.log_format
    if log_format not in ("text", "json"):
        raise ConfigError(f"LOG_FORMAT must be 'text' or 'json', got {log_format!r}")
    return ObservabilitySettings(
        log_level=log_level,
        metrics_port=port,
        metrics_host=env.get("METRICS_HOST", "").strip() or ObservabilitySettings.metrics_host,
        log_format=log_format,
        watchdog_interval_seconds=_number(
            env, "WATCHDOG_INTERVAL_SECONDS", ObservabilitySettings.watchdog_interval_seconds
        ),
        watchdog_threshold_seconds=_number(
            env, "WATCHDOG_THRESHOLD_SECONDS", ObservabilitySettings.watchdog_threshold_seconds, minimum=-1
        ),
    )
