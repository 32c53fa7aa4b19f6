"""This process as one replica among those sharing the database: its heartbeat, and
taking over the requests that replicas which stopped (or lost their leases) left in flight.

A request in flight whose owner's heartbeat is older than REPLICA_TIMEOUT_SECONDS, or
whose lease lapsed, will never be finished by its owner. A live replica takes it over:
it takes the thread's lease (through the same gates new messages use, so it never
races a request answering in that thread), edits the answer into the interrupted notice
(stopping a native stream first) and stores the outcome under its own fencing token.
A thread whose lease has not expired yet is simply tried again at the next heartbeat.

At start, a replica also takes over the requests still recorded under its own id: they
belong to its previous run, which is dead (it is this process). That is the crash
recovery of a single bot, and it happens at once; other replicas' requests wait for
their heartbeat to age.
"""

from __future__ import annotations

import logging
import time

import anyio

from bot.processing.failures import INTERRUPTED_NOTICE
from bot.slack.reply import fallback_text
from bot.slack.web_api import SlackAPIError, SlackWebAPI
from bot.storage import InFlightRequest, StorageError, Store
from bot.thread_gates import ThreadGates

log = logging.getLogger(__name__)

NOTICE_SECONDS = 10.0  # for editing one abandoned answer into the notice


async def start_replica(slack: SlackWebAPI, store: Store, gates: ThreadGates, *, replica_timeout: float) -> int:
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
    return await take_over(slack, store, gates, own, replica_timeout=replica_timeout)


async def keep_alive(slack: SlackWebAPI, store: Store, gates: ThreadGates, *, replica_timeout: float) -> None:
    """Until cancelled: a heartbeat, then a look for abandoned requests, three times per
    REPLICA_TIMEOUT_SECONDS. A storage error costs one beat, never the bot."""
    while True:
        await anyio.sleep(replica_timeout / 3)
        try:
            await store.heartbeat(gates.owner)
            await take_over(slack, store, gates, [], replica_timeout=replica_timeout)
        except StorageError as exc:
            log.warning("replica %s: heartbeat or takeover failed: %s", gates.owner, exc)


async def stop_replica(store: Store, gates: ThreadGates) -> None:
    """A clean exit: the heartbeat row goes, so nobody waits for it to age."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        try:
            await store.forget_replica(gates.owner)
        except StorageError as exc:
            log.warning("replica %s: could not remove its heartbeat (it ages out): %s", gates.owner, exc)


async def take_over(
    slack: SlackWebAPI, store: Store, gates: ThreadGates, also: list[InFlightRequest], *, replica_timeout: float
) -> int:
    """Take over every abandoned request (and those in `also`) whose thread is free."""
    found = {r.request_id: r for r in also}
    for req in await store.abandoned_requests(replica_timeout=replica_timeout):
        found.setdefault(req.request_id, req)
    done = 0
    for req in found.values():
        async with gates.try_enter(req.thread) as hold:
            if hold is None:
                log.debug("request %s: thread %s still leased; next time", req.request_id, req.thread)
                continue
            await _notify(slack, req)
            closed = await store.finish_request(
                req.request_id,
                fence=hold.fence,
                outcome="interrupted",
                user_text="",
                user_ts="",
                reply_text="",
                finished_at=time.time(),
                detail=f"replica {req.owner or 'unknown'} stopped; taken over by {gates.owner}",
            )
            if closed:
                done += 1
                log.info(
                    "request %s in %s: left by replica %r, marked interrupted",
                    req.request_id,
                    req.thread,
                    req.owner or "unknown",
                )
    return done


async def _notify(slack: SlackWebAPI, req: InFlightRequest) -> None:
    channel = req.thread.channel
    with anyio.move_on_after(NOTICE_SECONDS):
        try:
            if req.placeholder_ts:
                await _mark_interrupted(slack, channel, req.placeholder_ts)
            else:
                await slack.post_message(channel, req.thread.thread_ts, markdown_text=INTERRUPTED_NOTICE)
        except SlackAPIError as exc:
            log.warning("could not mark request %s in %s interrupted: %s", req.request_id, req.thread, exc.error)


async def _mark_interrupted(slack: SlackWebAPI, channel: str, ts: str) -> None:
    """Edit the message into the notice; a message still streaming is stopped first
    (only then: chat.stopStream's budget is small). The notice goes in a markdown block,
    so it replaces blocks a final write may already have left there (an edit without
    blocks keeps a message's blocks, and they are what Slack shows)."""
    try:
        await _edit_to_notice(slack, channel, ts)
        return
    except SlackAPIError as exc:
        if exc.error != "streaming_state_conflict":
            raise
    try:
        await slack.call("chat.stopStream", channel=channel, ts=ts)
    except SlackAPIError as exc:
        log.debug("chat.stopStream on %s before marking it interrupted: %s", ts, exc.error)
    await _edit_to_notice(slack, channel, ts)


async def _edit_to_notice(slack: SlackWebAPI, channel: str, ts: str) -> None:
    await slack.update_message(
        channel, ts, blocks=[{"type": "markdown", "text": INTERRUPTED_NOTICE}], text=fallback_text(INTERRUPTED_NOTICE)
    )
