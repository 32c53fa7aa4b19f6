"""The storage interface: the one narrow door between the bot and its database.

Processing and the nursery only ever see `Store`. `open_store(DATABASE_URL)` picks the
engine (SQLite or PostgreSQL); the queries are the same for both (`sql_store.py`). Every
method is one transaction: it either happens whole or not at all, so a cancelled
request can never leave half an exchange behind.

Several replicas may share one database. Three things make that safe:

* `claim_event` is one atomic INSERT that only one replica wins: an event redelivered
  to another replica is recognised.
* A thread lease (`acquire_lease`) gives one request per Slack thread across replicas.
  Each grant carries a fencing token, larger than any earlier grant for that thread;
  `start_request` and `finish_request` take effect only while the token is the
  thread's current one, so a replica that lost its lease (paused, partitioned) cannot
  overwrite what the new owner wrote. Expiry is read from the database's clock, and a
  lease ends only by its owner's release or by expiry, never by force.
* Each replica writes a heartbeat. A request whose owner stopped beating, or whose
  lease lapsed, is `abandoned`: a live replica takes it over (the interrupted notice).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Literal, Protocol

Role = Literal["user", "assistant"]


class StorageError(RuntimeError):
    """The database failed (locked, disk full, corrupt file…). The message says which
    operation failed and why; the driver's error is chained as `__cause__`."""


class StoreClosed(RuntimeError):
    """The store was used after `aclose()`."""


Outcome = Literal["answered", "timeout", "error", "interrupted"]


@dataclass(frozen=True)
class ThreadKey:
    """A Slack conversation thread: the channel and the `ts` of its first message."""

    channel: str
    thread_ts: str

    def __str__(self) -> str:
        return f"{self.channel}/{self.thread_ts}"


@dataclass(frozen=True)
class HistoryMessage:
    role: Role
    content: str
    ts: str = ""  # Slack ts of the message this came from ("" when unknown)


@dataclass(frozen=True)
class InFlightRequest:
    """A request recorded as started and not yet finished: the placeholder to fix up
    after a crash ("" while storage has no id of it: see `Store.start_request`)."""

    request_id: str
    thread: ThreadKey
    placeholder_ts: str
    started_at: float
    owner: str = ""  # the replica that started it ("" for requests stored before replicas)
    user_ts: str = ""  # the message it answers
    streamed: bool = False  # its placeholder is a native stream (chat.startStream)


RequestStatus = Literal["in_flight", "answered", "timeout", "error", "interrupted"]


@dataclass(frozen=True)
class RequestRecord:
    """What storage holds of one request now: in flight or its outcome, and the message
    recorded as its answer's first ("" when none was)."""

    status: RequestStatus
    placeholder_ts: str


PreferenceScope = Literal["workspace", "user", "thread"]
Rating = Literal["good", "bad"]


@dataclass(frozen=True)
class PreferenceLayers:
    """Stored preferences, lowest priority first; each a JSON-able dict holding only the
    fields set at that level (a key present with value None means "explicitly unset")."""

    workspace: dict[str, object]
    user: dict[str, object]
    thread: dict[str, object]


ImageSource = Literal["user", "bot"]


@dataclass(frozen=True)
class ThreadImage:
    """An image that is part of a thread's conversation (attached by a user, or made by
    the bot), kept downscaled so later questions can see and edit it without fetching
    it from Slack again."""

    name: str
    mime: str  # image/png or image/jpeg
    data: bytes  # already downscaled and re-encoded (see processing/images.py)
    width: int
    height: int
    source: ImageSource
    label: str = ""  # what it is, for the model: "attached by the user", "you generated: a red fox"
    ts: str = ""  # Slack ts of the message it came with ("" when unknown)


@dataclass(frozen=True)
class UsageSummary:
    """Requests and tokens added up over some days (and users, and models)."""

    requests: int = 0
    tokens_in: int = 0  # prompt tokens
    tokens_out: int = 0  # completion tokens

    @property
    def tokens(self) -> int:
        """What a budget counts: tokens in and out together."""
        return self.tokens_in + self.tokens_out


@dataclass(frozen=True)
class UsageTotal:
    """One user's use of one model over some days, every outcome together."""

    user: str
    model: str
    requests: int
    tokens_in: int
    tokens_out: int

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out


class Store(Protocol):
    async def claim_event(self, *keys: str) -> bool:
        """Record `keys` (an event id, `channel:ts`) as handled, in one transaction. True
        the first time, False if any was already claimed — by this process or an earlier
        one (the new ones are claimed all the same)."""

    async def thread_known(self, thread: ThreadKey) -> bool:
        """True if the bot has taken part in this thread (so follow-ups need no mention)."""

    async def load_history(self, thread: ThreadKey) -> list[HistoryMessage]:
        """The thread's conversation, oldest first: user messages and the bot's answers."""

    async def import_history(self, thread: ThreadKey, messages: list[HistoryMessage]) -> None:
        """Seed an unknown thread with history rebuilt from Slack; a no-op if the thread
        already has history."""

    async def start_request(
        self,
        request_id: str,
        thread: ThreadKey,
        *,
        user_ts: str,
        placeholder_ts: str,
        started_at: float,
        owner: str,
        fence: int,
        streamed: bool = False,
    ) -> bool:
        """Record a request of replica `owner` as in flight and mark the thread known
        (`streamed`: its placeholder is a native stream). False, and nothing written,
        unless `fence` is the thread's current lease token.
        It is recorded before anything is posted (`placeholder_ts` ""), so a crash leaves
        no message that no takeover knows of; `record_placeholder` or `finish_request`
        adds the answer's first message later."""

    async def record_placeholder(
        self, request_id: str, placeholder_ts: str, *, fence: int, streamed: bool = False
    ) -> bool:
        """Say which message opened the request's answer (one that a takeover cannot find
        in the thread by itself: a native stream, `streamed`, which a takeover stops
        before anything else). True if stored; False, and nothing
        written, if the request is not in flight, already has one, or `fence` is not the
        current lease token of its thread."""

    async def finish_request(
        self,
        request_id: str,
        *,
        fence: int,
        outcome: Outcome,
        user_text: str,
        user_ts: str,
        reply_text: str,
        finished_at: float,
        detail: str = "",
        placeholder_ts: str = "",
    ) -> bool:
        """Close a request and, in the same transaction, append the exchange to the
        thread's history. Only answered exchanges enter the history the model sees; the
        others are kept with their outcome for the record. `placeholder_ts`: the
        answer's first message, kept if the request had none recorded yet (the reply in
        the history carries it). True if this call closed it; False, and nothing
        written, if it was not in flight or `fence` is not the current lease token of
        its thread (the lease was lost to another replica)."""

    async def request_record(self, request_id: str) -> RequestRecord | None:
        """The request's status and recorded first message, as storage holds them now
        (None for an unknown id). A request that lost its thread asks it, to learn
        whether the takeover knew of the message it posted late."""

    async def in_flight(self) -> list[InFlightRequest]:
        """Requests started and never finished, on every replica, oldest first."""

    async def abandoned_requests(self, *, replica_timeout: float) -> list[InFlightRequest]:
        """Requests in flight that nobody will finish: their owner's heartbeat is older
        than `replica_timeout` seconds (or missing), or their lease lapsed or passed to
        another request. Oldest first."""

    # -- replicas: thread leases and heartbeats --

    async def acquire_lease(self, thread: ThreadKey, owner: str, *, ttl: float) -> int | None:
        """Take `thread` for `ttl` seconds: its new fencing token, or None if another
        holder's lease has not expired. A lease `owner` already holds is taken anew (a
        replica restarted under the same id). Never waits."""

    async def renew_leases(self, leases: Sequence[tuple[ThreadKey, int]], *, ttl: float) -> set[ThreadKey]:
        """Extend each lease (thread, token) to `ttl` seconds from now, all in one
        transaction: the threads renewed. One left out passed to someone else (or was
        released). One call however many leases a replica holds, so a renewal tick
        lasts one round trip, not one per request."""

    async def release_lease(self, thread: ThreadKey, token: int) -> None:
        """End the lease (a no-op if it already passed to someone else)."""

    async def heartbeat(self, replica: str) -> None:
        """Record that `replica` is alive now (by the database's clock)."""

    async def forget_replica(self, replica: str) -> None:
        """Remove `replica`'s heartbeat (it shut down cleanly)."""

    async def replicas(self) -> dict[str, float]:
        """Each replica with a heartbeat, and the seconds since its last one."""

    async def prune_events(self, older_than: float) -> int:
        """Forget claimed event keys claimed before `older_than` (epoch seconds)."""

    # -- user settings, feedback and one-time notices (the settings modal, App Home) --

    async def load_preferences(self, user: str, thread: ThreadKey | None) -> PreferenceLayers:
        """The stored preference layers that apply to `user` in `thread`, in one read."""

    async def save_preferences(
        self, scope: PreferenceScope, key: str, prefs: dict[str, object], *, updated_by: str
    ) -> None:
        """Replace the preferences stored for (`scope`, `key`); an empty `prefs` deletes
        them. Keys: "" for the workspace, the user id, or `str(ThreadKey)` for a thread."""

    async def record_feedback(self, channel: str, message_ts: str, user: str, rating: Rating) -> None:
        """Record `user`'s thumbs up/down on an answer; a later click replaces the earlier."""

    async def feedback_for(self, channel: str, message_ts: str) -> dict[str, Rating]:
        """The ratings given to one answer, by user id."""

    async def claim_once(self, kind: str, key: str) -> bool:
        """True the first time (`kind`, `key`) is claimed, False ever after: for things
        said once (the welcome on a first DM, a refusal per thread)."""

    # -- images in a thread's conversation (images and documents) --

    async def add_thread_images(self, thread: ThreadKey, images: list[ThreadImage], *, keep: int) -> None:
        """Append images to the thread's conversation, then forget all but its newest
        `keep` (the bound on what a thread stores)."""

    async def thread_images(self, thread: ThreadKey, *, limit: int) -> list[ThreadImage]:
        """The thread's newest `limit` images, oldest first."""

    # -- usage: requests and tokens per day, user, model and outcome (budgets, `slackbot usage`) --

    async def record_usage(
        self, user: str, model: str, outcome: str, tokens_in: int, tokens_out: int, *, at: float, requests: int = 1
    ) -> None:
        """Add `requests` (one request; 0 for a second model the same request used, such as
        the image model) and its tokens to the usage of `user` with `model` on the UTC
        day of `at` (epoch seconds), under `outcome` ("answered", "timeout"…). One upsert
        that adds to what is there, so replicas recording at once lose nothing."""

    async def usage_totals(self, since: date, until: date) -> list[UsageTotal]:
        """Usage per user and model over the UTC days `since` ≤ day < `until`, every
        outcome added up; the most tokens first (then user, then model)."""

    async def user_usage(self, user: str, since: date, until: date) -> UsageSummary:
        """`user`'s usage over `since` ≤ day < `until` (UTC days), every model and outcome."""

    async def workspace_usage(self, since: date, until: date) -> UsageSummary:
        """Everyone's usage over `since` ≤ day < `until` (UTC days)."""

    async def aclose(self) -> None:
        """Close the database; later calls raise."""
