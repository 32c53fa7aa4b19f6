"""Logging set-up, with a filter that blanks every secret before a line is written.

Secrets are the configured tokens and anything shaped like a Slack or OpenAI token,
so a token can't leak even through a third-party library's log line or a traceback.
Lines are text by default, or one JSON object each with LOG_FORMAT=json (`JsonFormatter`,
which also carries the fields passed with `extra=`); the filter applies to both.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime

TOKEN_SHAPES = re.compile(r"\b(xox[abposr]-[A-Za-z0-9-]+|xapp-[A-Za-z0-9-]+|sk-[A-Za-z0-9_-]{8,})")


class RedactSecrets(logging.Filter):
    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self._secrets = tuple(s for s in secrets if len(s) >= 6)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return TOKEN_SHAPES.sub("[redacted]", text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        clean = self.redact(message)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        record.msg, record.args = clean, None
        return True


# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """`LOG_FORMAT=json`: one JSON object per line — time, level, logger, message, the
    fields a call passed with `extra=` (request_id, thread, outcome, durations, …) and the
    traceback if any. The finished line goes through `redact` as well, so a secret in an
    extra field is blanked too (the filter has already cleaned message and traceback)."""

    def __init__(self, redact: Callable[[str], str] = lambda text: text) -> None:
        super().__init__()
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value if isinstance(value, (int, float, bool, type(None))) else str(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return self._redact(json.dumps(entry, ensure_ascii=False))


def setup_logging(level: str = "INFO", secrets: tuple[str, ...] = (), fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    redact = RedactSecrets(secrets)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(redact.redact))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(redact)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Per-request HTTP lines from the clients would drown the bot's own log.
    for noisy in ("httpx2", "httpcore2", "openai"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
