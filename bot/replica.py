"""This process as one replica among those sharing the database: its heartbeat, and
taking over the requests that replicas which stopped (or lost their leases) left in flight.

A request in flight whose owner's heartbeat is older than REPLICA_TIMEOUT_SECONDS, or
whose lease lapsed, will never be finished by its owner. A live replica takes it over:
it takes the thread's lease (through the same gates new messages use, so it never
races a request answering in that thread), edits the answer into the interrupted notice
(stopping a native stream first) and stores the outcome under its own fencing token.
A thread whose lease has not expired yet is simply tried again at the next heartbeat.

A request is recorded before its answer's first message is posted (`answer._open`), and
storage learns that message's id only with the outcome (a native stream's as soon as it
is known). So a takeover may have to find it in the thread: `find_opening` (the
placeholder's metadata names its request; a stream is the bot's one message without
metadata). Finding none, it posts a new notice, and closes the request without a
message of its own. An owner paused or cut off from storage *while* its post was on the
wire has that message land after the notice: having lost its lease, it writes no
answer, but it reads the request's row and, finding it closed without that message,
withdraws it (`answer._withdraw_if_orphaned`: chat.delete, a stream stopped first). A
message found here is recorded with the outcome, and its owner leaves it alone.

At start, a replica also takes over the requests still recorded under its own id: they
belong to its previous run, which is dead (it is this process). That is the crash
recovery of a single bot, and it happens at once; other replicas' requests wait for
their heartbeat to age.

Two things keep a takeover from replacing an answer the user already reads:
- A request of this process's own run whose outcome storage could not take (cut off
  from it as the answer went out) is never taken over by this process: it knows the
  outcome and records it late (`record_late`), under a new lease on the thread.
- Every final write carries a receipt in the message's metadata (`bot.slack.receipts`).
  A takeover first reads the thread: a delivered answer is left alone and recorded
  from what Slack shows. If the thread cannot be read, the request waits for the next
  heartbeat rather than risk overwriting it. (A placeholder recorded as a native stream
  is stopped first instead: if it was still streaming, no final write was made, and the
  thread is not read.)

A takeover should be done within REPLICA_TIMEOUT_SECONDS + 5 s of its owner's death,
and its Slack calls draw on the same budgets as this replica's own answers: they go
ahead of those in each budget (`priority`, at the same rate), and the dead replica's
share of the budgets is taken at once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import replace
from typing import Any

import anyio

from bot.processing.context import UnrecordedOutcome
from bot.processing.failures import INTERRUPTED_NOTICE
from bot.processing.surface import Receipt
from bot.slack.receipts import find_continuations, find_delivered, find_opening, receipt_metadata, receipt_payload
from bot.slack.reply import fallback_text
from bot.slack.try_again import notice_blocks
from bot.slack.web_api import SlackAPIError, SlackRateLimited, SlackWebAPI
from bot.storage import InFlightRequest, StorageError, Store
from bot.thread_gates import ThreadGates

log = logging.getLogger(__name__)

NOTICE_SECONDS = 20.0  # for reading one abandoned answer's thread, and for editing it into the notice
UNRECORDED_KEPT = 1000  # outcomes kept for late recording while storage is out of reach
LATE_ATTEMPTS = 3  # tries to record one of them late before it is left to a takeover
TAKEOVERS_AT_ONCE = 8  # abandoned requests taken over side by side
SWEEP_SECONDS = 1.0  # the look for abandoned requests comes at least this often (a cheap read)


async def start_replica(
    slack: SlackWebAPI, store: Store, gates: ThreadGates, *, replica_timeout: float, bot_id: str
) -> int:
    """Before this replica takes messages: say it is alive and recover its previous run's
    requests (and any other replica's that are already abandoned). Returns how many."""
    ages = await store.replicas()
    age = ages.get(gates.owner)
    if age is not None and age < replica_timeout:
        log.warning(
            "replica id %r sent a heartbeat %.0fs ago: if another process runs under this id, "
            "give each replica its own REPLICA_ID (its requests would be taken as this one's)",
            gates.owner,
            age,
        )
    own = [r for r in await store.in_flight() if r.owner == gates.owner]
    await store.heartbeat(gates.owner)
    _share_limits(slack, gates.owner, ages, replica_timeout)
    return await take_over(slack, store, gates, own, replica_timeout=replica_timeout, bot_id=bot_id)


async def keep_alive(
    slack: SlackWebAPI,
    store: Store,
    gates: ThreadGates,
    *,
    replica_timeout: float,
    bot_id: str,
    unrecorded: dict[str, UnrecordedOutcome] | None = None,
) -> None:
    """Until cancelled, in two tasks: three times per REPLICA_TIMEOUT_SECONDS, a heartbeat
    and this replica's share of Slack's rate limits (from the live replicas' heartbeats);
    and as often (every SWEEP_SECONDS at least), the late recording of this run's
    outcomes storage could not take, then a look for abandoned requests. A request is
    abandoned REPLICA_TIMEOUT_SECONDS after its owner's last heartbeat at most, and taken
    over at the next look: with a long timeout, a look every third of it would spend most
    of the 5 s a takeover has beyond the timeout. A storage error costs one round, never
    the bot."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(_beat_forever, slack, store, gates, replica_timeout)
        tg.start_soon(_sweep_forever, slack, store, gates, replica_timeout, bot_id, unrecorded)


async def _beat_forever(slack: SlackWebAPI, store: Store, gates: ThreadGates, replica_timeout: float) -> None:
    """The heartbeat, on its own: a takeover waiting on Slack must never delay it (the
    others would take this live replica for dead)."""
    while True:
        await anyio.sleep(replica_timeout / 3)
        try:
            await store.heartbeat(gates.owner)
            _share_limits(slack, gates.owner, await store.replicas(), replica_timeout)
        except StorageError as exc:
            log.warning("replica %s: heartbeat failed: %s", gates.owner, exc)


async def _sweep_forever(
    slack: SlackWebAPI,
    store: Store,
    gates: ThreadGates,
    replica_timeout: float,
    bot_id: str,
    unrecorded: dict[str, UnrecordedOutcome] | None,
) -> None:
    late = unrecorded if unrecorded is not None else {}
    while True:
        await anyio.sleep(min(replica_timeout / 3, SWEEP_SECONDS))
        try:
            await record_late(store, gates, late)
            await take_over(
                slack,
                store,
                gates,
                [],
                replica_timeout=replica_timeout,
                bot_id=bot_id,
                skip=set(late),
            )
        except StorageError as exc:
            log.warning("replica %s: takeover failed: %s", gates.owner, exc)


def _share_limits(slack: SlackWebAPI, me: str, ages: dict[str, float], replica_timeout: float) -> None:
    """Slack's budgets are the workspace's: split them between the live replicas."""
    live = {rid for rid, age in ages.items() if age < replica_timeout} | {me}
    if len(live) != slack.limits.shared_by:
        log.info("%d replica(s) alive: this one takes 1/%d of Slack's rate limits", len(live), len(live))
    slack.limits.share(len(live))


def keep_unrecorded(unrecorded: dict[str, UnrecordedOutcome], outcome: UnrecordedOutcome) -> None:
    """Keep `outcome` for `record_late`; the oldest goes when UNRECORDED_KEPT are kept
    (storage down for long: another replica's takeover then finds its receipt)."""
    log.warning("request %s: outcome %s kept until storage takes it", outcome.request_id, outcome.outcome)
    unrecorded[outcome.request_id] = outcome
    while len(unrecorded) > UNRECORDED_KEPT:
        dropped = unrecorded.pop(next(iter(unrecorded)))
        log.warning("request %s: too many outcomes waiting for storage; this one is dropped", dropped.request_id)


async def record_late(store: Store, gates: ThreadGates, unrecorded: dict[str, UnrecordedOutcome]) -> int:
    """Record this run's outcomes that storage could not take when they were delivered,
    each under a new lease on its thread (a thread busy again waits for the next beat).
    Raises StorageError while storage is still out of reach. Returns how many."""
    done = 0
    for late in list(unrecorded.values()):
        async with gates.try_enter(late.thread) as hold:
            if hold is None:
                continue
            try:
                closed = await late.record(store, fence=hold.fence)
            except StorageError:
                # Each try holds the thread's lease until it expires (giving it back fails
                # too): after a few, leave the request to a takeover, which finds its receipt.
                late.late_attempts += 1
                if late.late_attempts >= LATE_ATTEMPTS:
                    del unrecorded[late.request_id]
                    log.warning(
                        "request %s: storage refused its outcome %d times; left to a takeover (its receipt is in "
                        "Slack)",
                        late.request_id,
                        late.late_attempts,
                    )
                raise
            del unrecorded[late.request_id]
            if closed:
                done += 1
                log.info("request %s in %s: outcome %s recorded late", late.request_id, late.thread, late.outcome)
            else:  # another replica took it over meanwhile (from its receipt, if delivered)
                log.info("request %s: already closed by another replica", late.request_id)
    return done


async def stop_replica(
    store: Store, gates: ThreadGates, unrecorded: dict[str, UnrecordedOutcome] | None = None
) -> None:
    """A clean exit: outcomes still unrecorded get one more try, and the heartbeat row
    goes, so nobody waits for it to age."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        try:
            if unrecorded:
                await record_late(store, gates, unrecorded)
            await store.forget_replica(gates.owner)
        except StorageError as exc:
            log.warning("replica %s: could not record its last outcomes or remove its heartbeat: %s", gates.owner, exc)
    for late in (unrecorded or {}).values():
        log.warning("request %s: exiting with its outcome unrecorded (a takeover finds its receipt)", late.request_id)


async def take_over(
    slack: SlackWebAPI,
    store: Store,
    gates: ThreadGates,
    also: list[InFlightRequest],
    *,
    replica_timeout: float,
    bot_id: str,
    skip: set[str] | None = None,
) -> int:
    """Take over every abandoned request (and those in `also`) whose thread is free,
    but none in `skip` (this run's own, recorded late instead). `bot_id` is the bot's:
    its messages in the threads."""
    found = {r.request_id: r for r in also}
    abandoned = await store.abandoned_requests(replica_timeout=replica_timeout)
    for req in abandoned:
        found.setdefault(req.request_id, req)
    if any(r.owner != gates.owner for r in abandoned):
        # Another replica's: it is gone (or lost its threads). Its share of Slack's budgets
        # is free now; take it before the calls below, not at the next heartbeat (their
        # slots would be handed out at the smaller share).
        _share_limits(slack, gates.owner, await store.replicas(), replica_timeout)
    # At once, a few at a time: each waits for Slack's budgets (reading the thread, editing
    # the message), and one after another they would take many seconds for a replica
    # that left several requests behind. Their calls go ahead of this replica's own in
    # each budget (`priority`): their users see "Thinking…" until they are done.
    todo = [r for r in found.values() if not (skip and r.request_id in skip)]
    closed: list[str] = []
    limit = anyio.CapacityLimiter(TAKEOVERS_AT_ONCE)
    async with anyio.create_task_group() as tg:
        for req in _ours_now(slack, todo):
            tg.start_soon(_take_over_one, slack, store, gates, req, bot_id, limit, closed)
    return len(closed)


def _ours_now(slack: SlackWebAPI, requests: list[InFlightRequest]) -> list[InFlightRequest]:
    """The requests this sweep takes over. Each takeover needs two calls from budgets
    split between the live replicas (a stream: chat.stopStream, Tier 2, one call every
    few seconds, then chat.update; else conversations.replies, then chat.update if it
    has a placeholder). While other replicas are alive, the requests beyond what this
    one's budgets let out now are left to them (or to this replica's next sweep, within
    SWEEP_SECONDS), so that the survivors take a dead replica's requests over side by
    side. One request at least is taken at every sweep."""
    if slack.limits.shared_by <= 1:
        return requests
    room: dict[str, int] = {}
    taken: list[InFlightRequest] = []
    for req in requests:
        calls = _budgeted_calls(req)
        for method in calls:
            if method not in room:
                bucket = slack.limits.bucket(method)
                room[method] = bucket.available() if bucket is not None else len(requests)
        if taken and any(room[m] < calls.count(m) for m in calls):
            continue
        for method in calls:
            room[method] -= 1
        taken.append(req)
    if len(taken) < len(requests):
        log.info("%d abandoned request(s) left to another replica or the next sweep", len(requests) - len(taken))
    return taken


def _budgeted_calls(req: InFlightRequest) -> list[str]:
    """The split-budget calls a takeover of `req` makes when nothing was delivered. A
    chat.update even when storage knows no placeholder: the request was recorded before
    its post, which is then mostly found in the thread (a new notice, when none is, draws
    on the channel's chat.postMessage budget instead, which is not split)."""
    first = "chat.stopStream" if req.streamed else "conversations.replies"
    return [first, "chat.update"]


async def _take_over_one(
    slack: SlackWebAPI,
    store: Store,
    gates: ThreadGates,
    req: InFlightRequest,
    bot_id: str,
    limit: anyio.CapacityLimiter,
    closed: list[str],
) -> None:
    """One abandoned request, if its thread is free: left as it is if its final write
    reached Slack (recorded from its receipt), else edited into the interrupted notice.
    Never raises (a storage or Slack failure leaves it for the next sweep)."""
    async with limit:
        try:
            async with gates.try_enter(req.thread) as hold:
                if hold is None:
                    log.debug("request %s: thread %s still leased; next time", req.request_id, req.thread)
                    return
                try:
                    replies = await _thread(slack, req)
                except (SlackAPIError, TimeoutError) as exc:
                    log.warning(
                        "request %s: cannot tell from thread %s whether it was answered (%s); next time",
                        req.request_id,
                        req.thread,
                        exc.error if isinstance(exc, SlackAPIError) else "no answer",
                    )
                    return
                if not req.placeholder_ts and replies:
                    # Recorded before its first message was posted, which storage may
                    # not have yet: found in the thread, if it was posted.
                    req = replace(
                        req,
                        placeholder_ts=find_opening(replies, req.request_id, user_ts=req.user_ts, bot_id=bot_id),
                    )
                delivered = (
                    find_delivered(replies, req.request_id, placeholder_ts=req.placeholder_ts, user_ts=req.user_ts)
                    if replies
                    else None
                )
                left_by = f"replica {req.owner or 'unknown'}"
                if delivered is not None:
                    answered = delivered.outcome == "answered"
                    done = await store.finish_request(
                        req.request_id,
                        fence=hold.fence,
                        outcome=delivered.outcome,
                        user_text=delivered.asked if answered else "",
                        user_ts=req.user_ts,
                        reply_text=delivered.shown if answered else "",
                        finished_at=time.time(),
                        detail=(
                            f"{left_by} stopped; taken over by {gates.owner} (its notice found in Slack)"
                            if delivered.outcome == "interrupted"
                            else f"{left_by} delivered it but could not record it; taken over by {gates.owner}, "
                            "recorded from its receipt in Slack"
                        ),
                        placeholder_ts=req.placeholder_ts,
                    )
                    what = f"found delivered ({delivered.outcome}), left as it is"
                else:
                    notice_ts = await _notify(slack, req)
                    if notice_ts is None:
                        log.warning("request %s: its notice is not shown yet; next time", req.request_id)
                        return
                    await _remove_continuations(slack, req, replies or [], bot_id)
                    done = await store.finish_request(
                        req.request_id,
                        fence=hold.fence,
                        outcome="interrupted",
                        user_text="",
                        user_ts="",
                        reply_text="",
                        finished_at=time.time(),
                        detail=f"{left_by} stopped; taken over by {gates.owner}",
                        placeholder_ts=req.placeholder_ts or notice_ts,
                    )
                    what = "marked interrupted"
                if done:
                    closed.append(req.request_id)
                    log.info("request %s in %s: left by %s, %s", req.request_id, req.thread, left_by, what)
        except StorageError as exc:
            log.warning("request %s: takeover failed: %s; next time", req.request_id, exc)


async def _remove_continuations(
    slack: SlackWebAPI, req: InFlightRequest, replies: list[dict[str, Any]], bot_id: str
) -> None:
    """The messages a long unfinished answer continued in, after its first one (now the
    notice): deleted, so the thread does not show the end of an answer whose beginning
    the notice replaced. Best-effort: one that cannot be deleted is logged and left."""
    for ts in find_continuations(replies, req.request_id, opening_ts=req.placeholder_ts, bot_id=bot_id):
        with anyio.move_on_after(NOTICE_SECONDS) as bound:
            try:
                await slack.call("chat.delete", channel=req.thread.channel, ts=ts, priority=True)
            except SlackAPIError as exc:
                log.warning("request %s: could not delete its unfinished part %s: %s", req.request_id, ts, exc.error)
        if bound.cancelled_caught:
            log.warning("request %s: its unfinished part %s was not deleted in time", req.request_id, ts)


async def _thread(slack: SlackWebAPI, req: InFlightRequest) -> list[dict[str, Any]] | None:
    """The request's thread with its messages' metadata (receipts, placeholders); []
    when the thread is gone (deleted, or the bot left the channel); None when it was
    not read (a stream still open: see below). Raises
    SlackAPIError when Slack cannot say now (5xx, rate limited), or TimeoutError after
    NOTICE_SECONDS.

    A placeholder that is a native stream is stopped first (it has to be, before it can
    be edited into the notice). If it was still streaming, the request never made its
    final write — that is the stop itself, or comes after the stream is closed
    (`SlackAnswerWriter.finish`) — so no receipt can be in the thread, and it is not read."""
    with anyio.fail_after(NOTICE_SECONDS):
        if req.streamed and await _stopped_streaming(slack, req):
            log.info("request %s: its stream was still open: not answered, the thread is not read", req.request_id)
            return None
        try:
            return await slack.thread_replies(
                req.thread.channel, req.thread.thread_ts, include_all_metadata=True, priority=True
            )
        except SlackAPIError as exc:
            if exc.transient or isinstance(exc, SlackRateLimited):
                raise
            log.info("request %s: thread %s cannot be read (%s)", req.request_id, req.thread, exc.error)
            return []


async def _stopped_streaming(slack: SlackWebAPI, req: InFlightRequest) -> bool:
    """chat.stopStream on the request's placeholder: True if it was streaming (it is
    stopped now), False if it was not (or is gone). Raises SlackAPIError when Slack
    cannot say now (5xx, rate limited): whether it stopped is then unknown, and the next
    sweep finds out."""
    try:
        await slack.call("chat.stopStream", channel=req.thread.channel, ts=req.placeholder_ts, priority=True)
    except SlackAPIError as exc:
        if exc.transient or isinstance(exc, SlackRateLimited):
            raise
        log.debug("request %s: chat.stopStream on %s: %s", req.request_id, req.placeholder_ts, exc.error)
        return False
    return True


async def _notify(slack: SlackWebAPI, req: InFlightRequest) -> str | None:
    """The interrupted notice, itself a final write with its receipt: a takeover that
    could not record it finds it at the next sweep instead of writing it again. Returns
    the ts of the message that shows it (the placeholder edited, or a new message when
    the request left none), so storage names it; "" when there is nothing Slack will let
    it fix (the message or channel is gone); None when Slack did not take it in time or
    failed for now: the request then stays in flight for the next sweep."""
    channel = req.thread.channel
    receipt = Receipt(req.request_id, "interrupted", req.user_ts, try_again=bool(req.user_ts))
    shown: str | None = None
    with anyio.move_on_after(NOTICE_SECONDS):
        try:
            if req.placeholder_ts:
                await _mark_interrupted(slack, channel, req.placeholder_ts, receipt)
                shown = req.placeholder_ts
            else:
                shown = await slack.post_message(
                    channel,
                    req.thread.thread_ts,
                    blocks=_notice_blocks(receipt),
                    text=fallback_text(INTERRUPTED_NOTICE),
                    payload=receipt_payload(receipt),
                    priority=True,
                )
        except SlackAPIError as exc:
            log.warning("could not mark request %s in %s interrupted: %s", req.request_id, req.thread, exc.error)
            # Gone (message_not_found, channel_not_found…): nothing left to fix. Else later.
            retry_later = exc.transient or isinstance(exc, SlackRateLimited) or exc.error == "streaming_state_conflict"
            shown = None if retry_later else ""
        with contextlib.suppress(SlackAPIError):  # the dead request's "is thinking…", if it set one
            await slack.call(
                "assistant.threads.setStatus",
                channel_id=channel,
                thread_ts=req.thread.thread_ts,
                status="",
                priority=True,
            )
    return shown


async def _mark_interrupted(slack: SlackWebAPI, channel: str, ts: str, receipt: Receipt | None = None) -> None:
    """Edit the message into the notice; a message still streaming is stopped first
    (only then: chat.stopStream's budget is small; a placeholder known to be a stream
    was stopped already, by `_delivered`). The notice goes in a markdown block,
    so it replaces blocks a final write may already have left there (an edit without
    blocks keeps a message's blocks, and they are what Slack shows)."""
    try:
        await _edit_to_notice(slack, channel, ts, receipt)
        return
    except SlackAPIError as exc:
        if exc.error != "streaming_state_conflict":
            raise
    try:
        await slack.call("chat.stopStream", channel=channel, ts=ts, priority=True)
    except SlackAPIError as exc:
        log.debug("chat.stopStream on %s before marking it interrupted: %s", ts, exc.error)
    await _edit_to_notice(slack, channel, ts, receipt)


async def _edit_to_notice(slack: SlackWebAPI, channel: str, ts: str, receipt: Receipt | None = None) -> None:
    await slack.update_message(
        channel,
        ts,
        blocks=_notice_blocks(receipt),
        text=fallback_text(INTERRUPTED_NOTICE),
        metadata=receipt_metadata(receipt) if receipt is not None else None,
        priority=True,
    )


def _notice_blocks(receipt: Receipt | None) -> list[dict[str, Any]]:
    """The interrupted notice in a markdown block, with "Try again" for the question."""
    if receipt is not None and receipt.try_again:
        return notice_blocks(INTERRUPTED_NOTICE, receipt.reply_to)
    return [{"type": "markdown", "text": INTERRUPTED_NOTICE}]
