"""What the user reads when something goes wrong — one clear line, never a stack trace.

`describe(exc)` maps an exception to a short kind (for logs, storage and metrics) and
the sentence shown in the thread. Unknown exceptions get a generic line with an error
id that also appears in the log, so an operator can find the traceback.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import openai

from bot.processing.openai_chat import StreamStalled
from bot.processing.surface import SurfaceError
from bot.storage import StorageError
from bot.usage import OverBudget

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    kind: str
    message: str
    retryable: bool = True  # its notice offers "Try again" (a second try may mend it)


def timeout_notice(seconds: float) -> str:
    return (
        f":hourglass: Sorry, the model did not finish within {seconds:g} seconds, so I stopped "
        "waiting. Please try again, perhaps with a shorter question."
    )


INTERRUPTED_NOTICE = ":warning: Interrupted: the bot was restarted before this answer finished. Please ask again."
STOPPED_NOTICE = "_Stopped._"  # the user pressed Stop in the agent view (`agent_session_stopped`)
STORAGE_DOWN_NOTICE = (
    ":floppy_disk: I cannot reach my database right now, so I cannot answer safely. "
    "Please try again in a minute; an admin should check the bot's log."
)
BUSY_NOTICE = (
    ":hourglass_flowing_sand: I'm still working on the previous message in this thread. "
    "Please wait for that answer, then send this again."
)


def describe(exc: BaseException) -> Failure:
    code = getattr(exc, "code", None)
    if isinstance(exc, OverBudget):  # refused before the model call (bot.usage.check_budget)
        return Failure("over_budget", f":no_entry_sign: {exc.refusal.message}", retryable=False)
    if isinstance(exc, StreamStalled):
        return Failure(
            "stalled",
            f":hourglass: The model stopped sending its answer for {exc.idle_timeout:g} "
            "seconds, so I gave up. Please try again.",
        )
    if isinstance(exc, openai.AuthenticationError):
        return Failure(
            "openai_auth", ":no_entry: OpenAI rejected the bot's API key. An admin needs to check `OPENAI_API_KEY`."
        )
    if isinstance(exc, openai.PermissionDeniedError):
        return Failure(
            "openai_permission", ":no_entry: OpenAI refused this request (permission denied for this key or model)."
        )
    if isinstance(exc, openai.RateLimitError):
        if code == "insufficient_quota":
            return Failure(
                "openai_quota", ":no_entry: The OpenAI account is out of quota. An admin needs to check billing."
            )
        return Failure(
            "openai_rate_limit", ":turtle: OpenAI is rate-limiting the bot right now. Please try again in a minute."
        )
    if isinstance(exc, openai.BadRequestError) and code == "context_length_exceeded":
        return Failure(
            "context_too_long",
            ":scroll: This conversation is too long for the model. Please start a new thread.",
            retryable=False,
        )
    if isinstance(exc, openai.NotFoundError):
        return Failure(
            "openai_not_found",
            ":mag: OpenAI does not know the configured model. An admin needs to check `OPENAI_MODEL`.",
        )
    if isinstance(exc, openai.BadRequestError):
        return Failure("openai_bad_request", f":warning: OpenAI rejected the request: {_short(exc)}")
    if isinstance(exc, openai.APITimeoutError):
        return Failure("openai_timeout", ":hourglass: OpenAI did not respond in time. Please try again.")
    if isinstance(exc, openai.APIConnectionError):
        return Failure("openai_unreachable", ":electric_plug: I could not reach OpenAI. Please try again in a moment.")
    if isinstance(exc, openai.InternalServerError):
        return Failure("openai_server_error", ":warning: OpenAI had an internal error. Please try again.")
    if isinstance(exc, openai.APIError):
        return Failure("openai_error", f":warning: OpenAI returned an error: {_short(exc)}")
    if isinstance(exc, SurfaceError):
        return Failure("slack_error", f":warning: Slack returned an error (`{exc.code}`) while I was answering.")
    if isinstance(exc, StorageError):
        log.error("storage failed: %s", exc)
        return Failure(
            "storage_error",
            ":floppy_disk: I could not save this conversation (a storage error). "
            "An admin should check the bot's disk and log.",
        )
    error_id = uuid.uuid4().hex[:8]
    log.error("unexpected error %s", error_id, exc_info=exc)
    return Failure(
        "internal_error", f":warning: Something went wrong on my side (error id `{error_id}`). Please try again."
    )


def _short(exc: BaseException, limit: int = 200) -> str:
    text = getattr(exc, "message", None) or str(exc)
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
