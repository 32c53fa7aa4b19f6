"""The explicit objects processing works with: what it may use, and what it reports.

`Services` is built once at start-up (`bot.startup`) and passed in; nothing in
processing reaches for a global. `RequestState` is one request's visible progress: the nursery's watchdog
reads `stage` and `started_at`; nothing else touches it.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import httpx2
import openai

from bot.config import Settings
from bot.metrics import Metrics
from bot.processing.message import IncomingMessage
from bot.storage.base import Outcome, Store, ThreadKey


@dataclass
class MediaServices:
    """What reading files and drawing images needs besides the Slack and OpenAI clients."""

    url_client: httpx2.AsyncClient  # pasted image URLs only: no token, no env proxies, no auto-redirects
    workers: anyio.CapacityLimiter  # worker threads parsing documents / resizing images (MEDIA_WORKERS)
    # Models whose endpoint refused the `tools` parameter; for them the documented
    # keyword rule (processing/image_tools.py) decides when to draw, without asking again.
    tools_refused: set[str] = field(default_factory=set)


@dataclass(frozen=True, kw_only=True)
class Services:
    """What processing may use. Nothing of Slack: where the answer appears, and what the
    platform holds (threads, files), comes per request as a `ReplySurface`."""

    settings: Settings
    openai: openai.AsyncOpenAI
    store: Store
    model_slots: anyio.CapacityLimiter  # bounds concurrent OpenAI calls (ASYNC_MAX_CONCURRENT_REQUESTS)
    metrics: Metrics = field(default_factory=Metrics)  # created at start; tests may leave the default
    media: MediaServices | None = None  # files and images; None: text only (nothing to fetch with)


@dataclass
class UnrecordedOutcome:
    """A request's outcome that storage could not take (cut off from it) after Slack
    showed it. The nursery keeps it, and the replica records it once storage answers
    again, under a new lease on the thread (`bot.replica.record_late`): the request is
    this process's own, so it knows the outcome; nobody should take it over as
    abandoned and overwrite what the user reads."""

    request_id: str
    thread: ThreadKey
    outcome: Outcome
    user_text: str
    user_ts: str
    reply_text: str
    finished_at: float
    detail: str
    placeholder_ts: str = ""  # the answer's first message (storage may not have it yet)
    late_attempts: int = 0  # tries to record it late that storage refused (see bot.replica.record_late)

    async def record(self, store: Store, *, fence: int) -> bool:
        """Close the request in storage with this outcome, under the lease `fence`
        (`Store.finish_request`: False when it was no longer in flight or fenced off)."""
        return await store.finish_request(
            self.request_id,
            fence=fence,
            outcome=self.outcome,
            user_text=self.user_text,
            user_ts=self.user_ts,
            reply_text=self.reply_text,
            finished_at=self.finished_at,
            detail=self.detail,
            placeholder_ts=self.placeholder_ts,
        )


async def _yes() -> bool:
    return True


@dataclass
class RequestState:
    request_id: str
    message: IncomingMessage
    started_at: float  # anyio.current_time()
    stage: str = "starting"
    outcome: str = ""
    placeholder_ts: str = ""
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    # Why the user stopped this request ("" while they have not). The nursery sets it
    # just before `scope.cancel()`, so the cancellation ends as "stopped", not "interrupted".
    stop_reason: str = ""
    # The bound on the Slack call that opens or closes the answer while it runs; a shutdown
    # shortens it (`hurry`), and the same shortened deadline holds for the next one.
    final_write: anyio.CancelScope | None = None
    hurry_deadline: float = math.inf
    # The write now running opens the answer: losing the lease does not cut it (the
    # message may be made all the same, and only its id lets it be withdrawn).
    opening_write: bool = False
    # Who holds the thread for this request: this replica's id and the lease's fencing
    # token (storage takes the request's writes only under that token).
    owner: str = ""
    fence: int = 0
    # The lease passed to another replica: from then on this request writes nothing,
    # to Slack or to storage (the new owner takes the request over), but for the
    # withdrawal of a first message the takeover did not know (`answer._withdraw_if_orphaned`).
    lease_lost: bool = False
    # Set while the outcome is not in storage yet; left set if storage could not take it.
    unrecorded: UnrecordedOutcome | None = None
    # Asked before the final write: is the thread's lease still this request's? Quick
    # while renewals keep their pace; after this process fell behind (paused, cut off)
    # it asks storage, and a lease found gone is lost (`lose_lease`) before anything is
    # written over the takeover's notice. The nursery binds it to the request's hold
    # (`ThreadGates.confirm`); without one (`slackbot shell`), always yes.
    confirm_lease: Callable[[], Awaitable[bool]] = field(default=_yes)

    def lose_lease(self) -> None:
        """Stop: the request, and the shielded Slack write it may be in (its final text
        would land on what the new owner shows)."""
        self.lease_lost = True
        self.scope.cancel()
        if self.final_write is not None and not self.opening_write:
            self.final_write.cancel()

    @classmethod
    def begin(cls, message: IncomingMessage, *, owner: str, fence: int) -> RequestState:
        """A new request for `message`, under the thread lease (`owner`, `fence`) it holds."""
        return cls(
            request_id=uuid.uuid4().hex[:12],
            message=message,
            started_at=anyio.current_time(),
            owner=owner,
            fence=fence,
        )

    def hurry(self, seconds: float) -> None:
        """Shutdown: leave the request's Slack writes at most `seconds` more, in all."""
        self.hurry_deadline = min(self.hurry_deadline, anyio.current_time() + seconds)
        if self.final_write is not None:
            self.final_write.deadline = min(self.final_write.deadline, self.hurry_deadline)

    def watch(self, scope: anyio.CancelScope, *, opening: bool = False) -> None:
        """`scope` bounds the Slack write now running (None: none is); `opening`: it
        opens the answer (`opening_write`)."""
        self.final_write = scope
        self.opening_write = opening
        scope.deadline = min(scope.deadline, self.hurry_deadline)
