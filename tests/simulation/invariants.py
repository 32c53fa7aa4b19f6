"""The invariants every simulated run must satisfy, checked after the run.

Each check appends a readable line to `world.violations`. What is checked:

1. Exactly once. Every user message the bot acked is handled exactly once: one request,
   or one busy reply, or (only a channel follow-up without a mention, in a thread the
   bot does not know) deliberately ignored. A message acked only by a process that then
   crashed may be lost (ack-first plus durable dedupe is at-most-once across a kill -9);
   it may never be handled twice. Messages never acked (the bot was down) are handled at
   most once too.
2. One visible outcome. Each handling created one bot message (its placeholder or
   stream, its busy note, the notice that the placeholder could not be posted, or —
   when it started without a placeholder because chat.update's budget was low — the
   answer posted when done; an answer longer than one Slack message continues in more,
   each but the last full) and what it shows (FakeSlack.visible_text) ends terminal — an
   answer, busy, timeout, error or interrupted — and agrees with the request's outcome in
   storage. Messages are attributed to the call during which Slack stored them, so a
   post Slack made but answered 5xx for still counts. Excused, and counted: Slack
   refusing (injected faults, outages) every post a handling tried (a crash orphan — a
   placeholder of a crashed process that storage never knew — is not excused: requests
   are recorded before their first message is posted); an
   answer shown although Slack answered its post with a 5xx and the thread could not be
   read to find it (stored as an error: never the other way round); an answer posted
   without a placeholder by a process killed before it recorded it (the recovery's
   notice follows it); a final write, or the crash recovery's fix-up, cut by its bound
   while Slack refused every call of it; a request taken over whose one message, posted
   after the takeover read the thread, it withdrew itself (the takeover's notice is what
   the user sees: 3.).
   Answered means shown: every request stored as answered has its stored text visible in
   its messages, joined (broadcast mentions inert: "@" + WORD JOINER; split over
   messages), and none of them still streaming. No bot message shows a live broadcast
   mention (<!here>, <!channel>, <!everyone>, a bare @here …).
3. Every bot message belongs to a handling or to a crash recovery — the interrupted
   notice posted as a new message in the thread of a request the start-up found in
   flight without a placeholder, one per such request (and every such request gets
   one, unless Slack refused the recovery's calls or the recovering process died too);
   none is left "Thinking…"/streaming.
4. Deadlines. No request outlives ASYNC_TIMEOUT_SECONDS + FINALIZE_SECONDS, no OpenAI call
   outlives its request's deadline (exact in virtual time: EPS), nothing of a request
   talks to Slack after it ended, the timeout notice goes out at the deadline (later
   only by time spent waiting for Slack: the bot's budget for the method, or its own
   calls); after SIGTERM requests end within the grace period plus the shutdown's
   finalize bound.
5. Storage agrees with Slack: nothing in flight at the end (but a request whose
   interrupted notice a SIGTERM's bounded shutdown could not get to Slack, when nothing
   ran after it to take it over: it stays in flight for the next start); every stored request was
   run; only answered exchanges are in the model's context, with the text Slack shows;
   every prompt's history is made of stored answers and user messages of that thread.
6. Slack's rate limits (`check_retry_after`): no call went inside a Retry-After window
   Slack had announced to the process that made it before it made it (a 429 it had
   received). Calls already on their way when the 429 came back, and calls of another
   process (a restarted one cannot know its predecessor's windows; a replica cannot know
   another's), are counted only.
7. Replicas (`check_replicas`): leases are exclusive and their tokens grow; a write
   under a lease that passed on never takes effect (each request is closed once, and a
   takeover's outcome stands — what Slack shows is held to it by 2.); two requests in
   one thread on different processes overlap only if the earlier one's lease passed to
   the later one while its process was crashed, paused or cut off from storage; a
   request that learnt it lost its lease writes nothing more to Slack, but the
   withdrawal (chat.delete, and the chat.stopStream of a stream before it) of its own
   first message when the takeover closed the request naming another message or none
   (that message landed after the takeover read the thread). Across replicas, 1.–5.
   hold as for one process: a message handled by one replica is handled by no other; a
   request taken over shows the interrupted notice.
(Per-thread exclusion and "limiters back to zero" are checked live, in `world.py`.)
"""

from __future__ import annotations

import math
import re
import sqlite3
from collections import defaultdict
from dataclasses import dataclass
from itertools import pairwise

from bot.processing.answer import FINALIZE_SECONDS, SHUTDOWN_FINALIZE_SECONDS
from bot.processing.failures import BUSY_NOTICE, STORAGE_DOWN_NOTICE
from bot.slack.markdown import SLACK_MARKDOWN_LIMIT, WORD_JOINER
from tests.simulation.world import CREATING_METHODS, World
from tests.simulation_support import PRODUCTION, TIMEOUT_TEXT, classify

EPS = 1e-6  # "one scheduling step": virtual time does not advance within a step
TIMEOUT = PRODUCTION["async_timeout_seconds"]
GRACE = PRODUCTION["shutdown_grace_seconds"]
EXTRA_NOTICE_MARKERS = (":floppy_disk:",)  # notices classify() does not know yet
RECOVERY = ("startup", "takeover")
TAKEN_OVER = (
    "taken over by"  # in the detail bot.replica.take_over stores  # the tags of a process taking over others' requests
)
SHOWS = {
    "answered": {"answered"},
    "timeout": {"timeout"},
    "error": {"error", "stalled"},
    "interrupted": {"interrupted"},
}


def final_kind(message: dict | None, *, expired: bool = False) -> str:
    """What the user ends up seeing (`shown`: FakeSlack.visible_text). A message still in
    native-streaming state is pending, unless `expired`: Slack ends a stream nobody stops
    after a while (FakeSlack.end_stream models that), which is how a stream of a crashed
    process ends."""
    if message is None:
        return "deleted"
    return final_kind_of([message], expired=expired)


def final_kind_of(messages: list[dict | None], *, expired: bool = False) -> str:
    """The same for an answer shown in several messages (a long one continues in more)."""
    if any(m is None for m in messages):
        return "deleted"
    if any(m.get("streaming") for m in messages) and not expired:
        return "pending"
    text = "\n\n".join(m["shown"] for m in messages)
    kind = classify(text)
    if kind == "answered" and text.rsplit("\n\n", 1)[-1].startswith(EXTRA_NOTICE_MARKERS):
        return "error"
    return kind


def check(world: World) -> None:
    v = world.violate
    slack = world.slack
    incs = {inc.n: inc for inc in world.incs}
    crashed = {n for n, inc in incs.items() if inc.dead}

    bot_messages: dict[str, dict] = {}
    for channel, messages in slack.messages.items():
        for message in messages:
            if message.get("bot_id") == slack.bot_id:
                bot_messages[message["ts"]] = {
                    **message,
                    "channel": channel,
                    "shown": slack.visible_text(channel, message["ts"]),
                }

    creations: dict[tuple, list] = defaultdict(list)  # (inc, kind, rid or msg) -> creating calls
    created_by: dict[str, object] = {}
    for call in world.slack_calls:
        if call.method not in CREATING_METHODS and not call.created_ts:
            continue
        tag = call.tag
        key = (call.inc, tag.kind, tag.rid or tag.msg) if tag else (call.inc, "none", None)
        creations[key].append(call)
        if call.created_ts:
            created_by[call.created_ts] = call

    rows = _rows(world)
    stored = {r["request_id"]: r for r in rows}
    by_rid = {rec.rid: rec for rec in world.requests}
    withdrawn = _withdrawals(world, stored)
    # Requests another process closed (a takeover, after their owner's lease passed to it):
    # that outcome stands, whatever their owner, fenced off, thought it was.
    # (by another replica, or by the replica's own sweep after its finish_request failed)
    taken_over = {op.rid: op for op in world.store_log if op.op == "finish" and op.result and TAKEN_OVER in op.detail}
    for h in world.handlings:
        world.count(f"handled_{h.kind}")
    for rec in world.requests:
        world.count(f"outcome_{rec.outcome}")
    for call in world.slack_calls:
        if call.created_ts and not call.ok:
            world.count("posts_made_but_answered_5xx")
    # What each start-up's crash recovery found in flight, and what it posted.
    recovered: dict[int, dict[str, object]] = {
        n: {r.request_id: r for r in found} for n, found in world.recovered.items()
    }
    recovery_posts: dict[tuple[int, str, str], list[str]] = defaultdict(list)  # (process, channel, thread) -> ts

    # 1. exactly once
    acked_by: dict[int, set[int]] = defaultdict(set)
    for envelope_id in slack.acks:
        event_id = world.envelope_event.get(envelope_id)
        if event_id is None:
            continue
        link = slack.deliveries[envelope_id].connection
        acked_by[world.events[event_id].msg].add(world.link_inc.get(link.id, 0))
    by_msg = defaultdict(list)
    for h in world.handlings:
        if h.kind != "duplicate":
            by_msg[h.msg].append(h)
    for mid in world.msg_ts:
        m = world.msgs[mid]
        hs = by_msg.get(mid, [])
        notes = [h for h in hs if h.kind == "storage_down"]
        if len(hs) > 1 and notes and len({h.inc for h in hs}) > 1:
            note = notes[0]
            shown_before = any(  # Slack had answered a call that made another replica's message
                c.created_ts and c.tag and c.tag.msg == mid and c.inc != note.inc and c.t_end < note.t
                for c in world.slack_calls
            )
            if len(notes) == 1 and all(h.t > note.t for h in hs if h is not note):
                # The note came first; Slack redelivered the event later, to a replica that
                # could reach storage, and it answered: a late answer after the apology.
                world.count("answered_after_a_storage_note")
            elif len(notes) == 1 and not shown_before:
                # The cut-off replica looked at the thread before giving the note, and the
                # other replica's answer was not in it yet (Slack slow, or refusing posts).
                world.count("storage_note_before_the_answer_showed")
            else:
                v(
                    f"m{mid}: a replica cut off from storage told the user it cannot answer, while another "
                    f"handled it: {[(h.kind, h.inc) for h in hs]}"
                )
        elif len(hs) > 1:
            v(f"m{mid} was handled {len(hs)} times: {[(h.kind, h.inc) for h in hs]}")
        if not hs:
            if acked_by[mid] and not (acked_by[mid] & crashed):
                v(f"m{mid} was acked (by process {sorted(acked_by[mid])}) but never handled")
            elif acked_by[mid]:
                world.count("lost_in_crash")
        elif hs[0].kind == "skip" and not (m.place == "channel" and m.root is not None and not m.mention):
            v(f"m{mid} ({m.place}, root {m.root}, mention {m.mention}) was ignored as a follow-up in an unknown thread")
    if None in by_msg:
        v(f"handlings of events that are no scenario message: {by_msg[None]}")

    # 2. one visible outcome per handling
    accounted: set[str] = set()
    for rec in world.requests:
        calls = creations.get((rec.inc, "request", rec.rid), [])
        made = sorted({c.created_ts for c in calls if c.created_ts}, key=_ts_order)
        accounted.update(made)
        row = stored.get(rec.rid)
        who = f"m{rec.msg} (request {rec.rid}, process #{rec.inc})"
        if not made:
            if rec.inc in crashed or rec.outcome == "interrupted" or rec.rid in taken_over:
                continue  # (a takeover's notice, if it posted one, is checked in 3.)
            if calls and all(c.faulted for c in calls):
                world.count("outcome_refused_by_slack")
                continue
            # A shutdown cut the notice's post short (bounded, by design) after Slack had
            # refused everything else: nothing could be shown in time.
            cut = [c for c in calls if not c.faulted]
            if (
                calls
                and all(c.error == "cancelled" for c in cut)
                and any(c.faulted for c in calls)
                and (incs[rec.inc].stopped_at is not None)
            ):
                world.count("notice_cut_by_shutdown_during_outage")
                continue
            v(
                f"{who} ended {rec.outcome} with nothing visible in Slack "
                f"(posts tried: {[(c.method, c.error) for c in calls]})"
            )
            continue
        if rec.rid in taken_over and rec.rid in withdrawn and made == [withdrawn[rec.rid].ts]:
            # Its one message landed after the takeover's notice (checked in 3.), which
            # did not know of it, and it withdrew it: the notice is what the user sees.
            world.count("orphans_withdrawn")
            continue
        messages = [bot_messages.get(ts) for ts in made]
        # An answer longer than one Slack message goes on in more messages; every one but
        # the last is then full (split_markdown cuts in the second half of the limit).
        for ts, message in zip(made[:-1], messages[:-1], strict=True):
            if message is None or len(message["shown"]) < SLACK_MARKDOWN_LIMIT // 2:
                v(f"{who} created {len(made)} bot messages: {made} ({ts} shows {_show(message)})")
                break
        # A native stream that failed (Slack refused an append or the stop), or one of a
        # crashed process, or one Slack ended itself, may be left for Slack to end: what
        # counts is the text it shows.
        fell_back = any(
            "Stream" in c.method and not c.ok and c.status != 429
            for c in world.slack_calls
            if c.tag and c.tag.rid == rec.rid
        )  # (a 429: Slack took nothing, the stream goes on)
        expired = rec.inc in crashed or fell_back
        kind = final_kind_of(messages, expired=expired)
        if any(m is not None and m.get("streaming") for m in messages) and kind != "pending":
            world.count("streams_left_for_slack_to_expire")
        cut = _cut_by_slack(world, rec)
        shown = _show_all(messages)
        if kind == "pending":
            if rec.inc in crashed and row is None:
                # A request is recorded before anything is posted: a message Slack made for
                # it is known to storage, so a takeover finishes it (issue 11).
                v(f"{who} left {made[0]} showing {shown}: posted before the request was recorded")
                continue
            if cut:
                world.count("final_write_cut_by_slack_faults")
                continue
            if row is not None and row["status"] == "interrupted" and _recovery_refused(world, rec, recovered):
                world.count("recovery_cut_by_slack_faults")
                continue
            v(
                f"{who} left its message {made[-1]} showing {shown} forever (outcome {rec.outcome}, "
                f"stored {row['status'] if row else 'nothing'})"
            )
            continue
        expected = row["status"] if row is not None else rec.outcome
        if expected == "in_flight":
            continue  # reported below
        if kind not in SHOWS.get(expected, {expected}):
            if cut:
                world.count("final_write_cut_by_slack_faults")
            elif kind == "answered" and expected == "error" and any(c.created_ts and not c.ok for c in calls):
                # Slack posted the answer but answered 5xx, and the thread could not be read
                # to find out: the bot cannot know it is shown (never the other way round).
                world.count("answer_shown_though_slack_said_it_failed")
            elif (
                kind == "answered"
                and expected == "interrupted"
                and rec.inc in crashed
                and any(rec.rid in found and not found[rec.rid].placeholder_ts for found in recovered.values())
            ):
                # Killed between posting the answer (it had no placeholder) and recording it:
                # the recovery's notice follows the answer in the thread.
                world.count("answer_posted_then_crash")
            elif _recovery_refused(world, rec, recovered):
                world.count("recovery_cut_by_slack_faults")
            else:
                v(f"{who}: Slack shows {kind} ({shown}) but the outcome is {expected}")
        if (
            row is not None
            and rec.inc not in crashed
            and row["status"] != rec.outcome
            and not (rec.outcome == "stopped" and row["status"] == "interrupted")
        ):
            if rec.rid in taken_over and rec.outcome == "answered" and rec.end < taken_over[rec.rid].t - EPS:
                # Its process delivered the answer and lived on, but could not record it
                # (cut off from storage); the takeover then replaced the answer on screen.
                v(
                    f"{who} delivered its answer, then a takeover by process #{taken_over[rec.rid].inc} "
                    f"replaced it with the interrupted notice"
                )
            elif rec.rid in taken_over:
                world.count("outcomes_of_fenced_off_requests_overruled")
            else:
                v(f"{who}: the bot says {rec.outcome}, storage says {row['status']}")

    # No request stored as answered whose answer Slack does not show: its messages, joined,
    # show the stored text (broadcast mentions made inert, split over messages), and none of
    # them is still streaming.
    for row in rows:
        if row["status"] != "answered":
            continue
        rec = by_rid.get(row["request_id"])
        if rec is None:
            continue  # reported below
        made = sorted(
            {c.created_ts for c in creations.get((rec.inc, "request", rec.rid), []) if c.created_ts}, key=_ts_order
        )
        messages = [bot_messages.get(ts) for ts in made]
        who = f"m{rec.msg} (request {rec.rid}, process #{rec.inc})"
        if not messages or any(m is None for m in messages):
            v(f"{who} is stored as answered, but Slack has no message of it ({made})")
            continue
        if any(m.get("streaming") for m in messages):
            v(f"{who} is stored as answered, but its message is still streaming: {_show_all(messages)}")
        joined = _plain("".join(m["shown"] for m in messages))
        if row["reply"] is None or _plain(_inert(row["reply"])) not in joined:
            v(f"{who} is stored as answered with {row['reply']!r:.80}, but Slack shows {_show_all(messages)}")
            continue
        if len(messages) > 1:
            world.count("answers_in_several_messages")
        if _live_broadcast(row["reply"]):
            world.count("answers_with_broadcasts_made_inert")

    notes = {"busy": BUSY_NOTICE, "storage_down": STORAGE_DOWN_NOTICE}  # a note instead of a request
    for h in world.handlings:
        if h.kind not in notes:
            continue
        calls = creations.get((h.inc, h.kind, h.msg), [])
        made = [c.created_ts for c in calls if c.created_ts]
        accounted.update(made)
        if len(made) > 1:
            v(f"m{h.msg}: {len(made)} {h.kind} replies")
        elif made:
            if bot_messages.get(made[0], {}).get("shown") != notes[h.kind]:
                v(f"m{h.msg}: the {h.kind} reply reads {_show(bot_messages.get(made[0]))}")
        elif h.inc in crashed or (calls and all(c.faulted for c in calls)):
            pass
        elif calls and any(c.faulted for c in calls) and all(c.faulted or c.error == "cancelled" for c in calls):
            # Its bound (10 s: a best-effort note) ran out while Slack was down.
            world.count("busy_reply_cut_by_slack_faults")
        else:
            v(
                f"m{h.msg}: told {h.kind}, but no {h.kind} reply reached Slack "
                f"(posts: {[(c.method, c.error) for c in calls]})"
            )

    # 3. every bot message belongs to a handling (or to a crash recovery) and is terminal
    extras: dict[tuple, list[str]] = defaultdict(list)
    for ts, message in bot_messages.items():
        if _live_broadcast(message["shown"]):
            v(f"bot message {ts} in {message['channel']} shows a live broadcast mention: {_show(message)}")
        if ts in accounted:
            continue
        call = created_by.get(ts)
        if call is not None and call.tag is not None and call.tag.kind == "envelope":
            # Posted while taking the event in, before any request (a first DM's welcome).
            if final_kind(message) == "pending":
                v(f"bot message {ts} posted for m{call.tag.msg} ({_show(message)}) is left pending")
            extras[(call.inc, call.tag.msg)].append(ts)
            if len(extras[(call.inc, call.tag.msg)]) == 2:  # a retried post shown twice
                v(f"m{call.tag.msg}: process #{call.inc} posted {extras[(call.inc, call.tag.msg)]} while taking it in")
            world.count("extra_messages")
            continue
        if call is not None and call.tag is not None and call.tag.kind in RECOVERY:
            # The crash recovery's notice for a request that had posted nothing yet: in the
            # thread of a request this start-up found in flight without a placeholder.
            thread = (message["channel"], str(message.get("thread_ts") or ""))
            found = recovered.get(call.inc, {})
            if not any(
                not r.placeholder_ts and (r.thread.channel, r.thread.thread_ts) == thread for r in found.values()
            ):
                v(
                    f"bot message {ts} in {thread} ({_show(message)}) was posted by the start-up of process "
                    f"#{call.inc}, for no request it found interrupted"
                )
            elif final_kind(message) != "interrupted":
                v(f"the crash recovery's message {ts} in {thread} shows {_show(message)}")
            recovery_posts[(call.inc, *thread)].append(ts)
            continue
        owner = f"{call.tag.kind} of m{call.tag.msg}" if call is not None and call.tag else "nobody"
        v(f"bot message {ts} in {message['channel']} ({_show(message)}) was posted by {owner}")
    # ... and each request a crash interrupted before it posted anything gets that notice,
    # once per recovery (a second one only when the first recovery was killed too).
    for n, found in recovered.items():
        for r in found.values():
            if r.placeholder_ts:
                continue  # its placeholder is edited (checked with its request, above)
            key = (n, r.thread.channel, r.thread.thread_ts)
            wanted = sum(
                1 for x in found.values() if not x.placeholder_ts and (x.thread.channel, x.thread.thread_ts) == key[1:]
            )
            posts = recovery_posts.get(key, [])
            if len(posts) > wanted:
                v(
                    f"the start-up of process #{n} posted {len(posts)} interrupted notices in {key[1:]} "
                    f"for {wanted} request(s)"
                )
            elif not posts:
                tried = [
                    c
                    for c in world.slack_calls
                    if c.inc == n
                    and c.tag
                    and c.tag.kind in RECOVERY
                    and c.args.get("channel") == r.thread.channel
                    and r.thread.thread_ts in (c.args.get("thread_ts"), c.args.get("ts"))
                ]
                if n in crashed or (
                    any(c.faulted for c in tried) and all(c.faulted or c.error == "cancelled" for c in tried)
                ):
                    world.count("recovery_notice_lost_to_slack_or_crash")
                else:
                    v(
                        f"request {r.request_id} in {key[1:]} was interrupted before posting anything, and the "
                        f"start-up of process #{n} left its thread without a notice (calls: "
                        f"{[(c.method, c.error or 'ok') for c in tried]})"
                    )
            else:
                world.count("recovery_posts")

    # 4. deadlines
    for rec in world.requests:
        if rec.inc in crashed:
            continue
        if math.isnan(rec.end):
            v(f"request {rec.rid} (m{rec.msg}) never ended")
            continue
        # (a paused process's clock runs on, but it does nothing: the pause is added)
        limit = rec.start + TIMEOUT + FINALIZE_SECONDS + incs[rec.inc].paused_between(rec.start, rec.end)
        stopped = incs[rec.inc].stopped_at
        if stopped is not None:
            # interrupted after the grace (+ the 0.05 s poll, twice); a final write already
            # waiting in Slack's budget is cut to SHUTDOWN_WRITE_SECONDS then
            limit = min(limit, max(stopped, rec.start) + GRACE + SHUTDOWN_FINALIZE_SECONDS + 0.1)
        if rec.end > limit + EPS:
            v(f"request {rec.rid} (m{rec.msg}) ran until {rec.end:.3f}, past its bound {limit:.3f}")
    for call in world.ai_calls:
        rec = by_rid.get(call.tag.rid) if call.tag and call.tag.kind == "request" else None
        if rec is None:
            v(f"an OpenAI call for m{call.msg} at {call.t:.3f} made outside any request ({call.tag})")
            continue
        if call.inc in crashed:
            continue
        if call.t_end > rec.start + TIMEOUT + EPS + incs[call.inc].paused_between(rec.start, call.t_end):
            v(
                f"OpenAI call for m{call.msg} ended at {call.t_end:.3f}, {call.t_end - rec.start - TIMEOUT:.3f}s "
                f"past its request's deadline"
            )
        if call.t_end > rec.end + EPS:
            v(f"OpenAI call for m{call.msg} outlived its request ({call.t_end:.3f} > {rec.end:.3f})")
    for rec in world.requests:  # the timeout notice goes out at the deadline, not a step later
        if rec.outcome != "timeout" or rec.inc in crashed:
            continue
        notices = [
            c.t
            for c in world.slack_calls
            if c.tag
            and c.tag.rid == rec.rid
            and TIMEOUT_TEXT
            in str(c.args.get("markdown_text") or c.args.get("text") or "") + str(c.args.get("blocks") or "")
        ]
        deadline = rec.start + TIMEOUT
        if notices and abs(notices[0] - deadline) > EPS:
            # ... unless it waited for Slack in between: its turn in a method's budget (the
            # final write waits for it), its own calls (a stream stopped first), or the
            # back-off after Slack refused one of them.
            mine = [c for c in world.slack_calls if c.tag and c.tag.rid == rec.rid and c.t < notices[0]]
            busy = [(w.t0, w.t1) for w in world.budget_waits if w.tag and w.tag.rid == rec.rid]
            busy += [(c.t, c.t_end) for c in mine]
            # ... and the back-off after a call Slack refused (5xx, 429), until the next call
            busy += [(c.t_end, nxt.t) for c, nxt in pairwise(mine) if not c.ok and (c.faulted or c.status >= 429)]
            busy += [(a, b) for kind, a, b in incs[rec.inc].impaired if kind == "pause"]
            if notices[0] > deadline and _covered(busy, deadline, notices[0]) >= notices[0] - deadline - EPS:
                world.count("timeout_notices_waiting_for_slack")
            else:
                v(
                    f"request {rec.rid} (m{rec.msg}) sent its timeout notice at {notices[0]:.6f}, "
                    f"{notices[0] - deadline:+.6f}s from its deadline"
                )
    for call in world.slack_calls:
        if call.tag and call.tag.kind == "request" and call.inc not in crashed:
            rec = by_rid.get(call.tag.rid)
            if rec is not None and not math.isnan(rec.end) and call.t > rec.end + EPS:
                v(f"{call.method} for m{call.tag.msg} at {call.t:.3f}, after its request ended at {rec.end:.3f}")

    # 5. storage agrees with Slack
    for row in rows:
        if row["status"] == "in_flight" and _left_for_the_next_start(world, by_rid.get(row["request_id"])):
            world.count("left_in_flight_for_the_next_start")
        elif row["status"] == "in_flight":
            v(
                f"storage still has request {row['request_id']} in flight at the end "
                f"(placeholder {row['placeholder_ts']}, shows {_show(bot_messages.get(row['placeholder_ts']))})"
            )
        if row["request_id"] not in by_rid:
            v(f"storage has request {row['request_id']}, which no process ran")
        in_context = row["in_context"]
        if row["status"] == "answered":
            if in_context != [1, 1]:
                v(f"answered request {row['request_id']} has context flags {in_context} (want user + answer)")
        elif any(in_context):
            v(f"{row['status']} request {row['request_id']} put messages into the model's context")
    answers = defaultdict(set)
    imported = defaultdict(set)
    for row in rows:
        if row["status"] == "answered" and row["reply"] is not None:
            answers[(row["channel"], row["thread_ts"])].add(row["reply"])
    for channel, thread_ts, content in _imported(world):
        imported[(channel, thread_ts)].add(content)
    user_texts = defaultdict(set)
    for mid, thread in world.msg_thread.items():
        user_texts[thread].add(f"m{mid} from u{world.msgs[mid].user}: question {mid}")
    for call in world.ai_calls:
        if call.thread is None or not call.body:
            continue
        for message in call.body.get("messages", [])[1:-1]:
            content = message.get("content")
            if message.get("role") == "assistant":
                if content not in answers[call.thread] and content not in imported[call.thread]:
                    v(
                        f"the prompt for m{call.msg} carries an assistant message that is no stored answer: "
                        f"{content!r:.80}"
                    )
            elif (
                message.get("role") == "user"
                and content not in user_texts[call.thread]
                and content not in imported[call.thread]
            ):
                v(f"the prompt for m{call.msg} carries a user message from elsewhere: {content!r:.80}")


def check_retry_after(world: World) -> None:
    """6. No call went inside a Retry-After window Slack had announced — to the process
    that made it, before it made it (a 429 it had received). Excused, and counted: a call
    already on its way when the 429 came back (Slack answered another call first), and a
    call of another process (a restarted one cannot know what its predecessor was told).

    Per process on purpose, also when replicas run at once: Slack's rate limits are the
    workspace's (the replicas share FakeSlack's tiers) while each replica budgets as if
    alone, and a replica is never told of a window Slack announced to another — so a
    replica calling inside another's window is what the design allows, and is counted,
    not reported; inside a window announced to itself it is a bug as before."""
    windows: dict[tuple, list] = defaultdict(list)
    for c in world.slack_calls:
        if c.status == 429:
            windows[(c.inc, c.key)].append(c)
    for c in world.slack_calls:
        if c.in_window_at is None:
            continue
        told = [
            w
            for w in windows.get((c.inc, c.key), [])
            if w.seq1 < c.seq0 and w.t_end - EPS <= c.in_window_at < w.t_end + w.retry_after - EPS
        ]
        if told:
            w = told[-1]
            v_text = (
                f"{c.method}{' in ' + str(c.key[1]) if c.key[1] else ''} by process #{c.inc} "
                f"({_whose(c)}) went out at {c.t:.3f}, "
                f"inside the Retry-After window of {w.retry_after:g}s Slack had announced to it at "
                f"{w.t_end:.3f}"
            )
            world.violate(v_text)
        else:
            world.count("calls_in_retry_after_unknown_to_their_process")


def _covered(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """How much of [start, end] the intervals cover."""
    total, reach = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, end)
        if b > a:
            total += b - a
            reach = b
    return total


def _whose(call) -> str:
    tag = call.tag
    if tag is None:
        return "untagged"
    return tag.kind if tag.msg is None else f"{tag.kind} of m{tag.msg}"


def _recovery_refused(world: World, rec, recovered: dict) -> bool:
    """A crashed request's placeholder that the next start-up's recovery tried to fix up
    while Slack refused every one of those calls (an outage, injected faults) until the
    recovery's own bound ran out: the view stays stale, as a final write cut by Slack does."""
    if not rec.placeholder_ts and rec.rid not in {rid for found in recovered.values() for rid in found}:
        return False
    for n, found in recovered.items():
        r = found.get(rec.rid)
        if r is None or not r.placeholder_ts:
            continue
        tried = [
            c
            for c in world.slack_calls
            if c.inc == n and c.tag and c.tag.kind in RECOVERY and c.args.get("ts") == r.placeholder_ts
        ]
        # (chat.update's streaming_state_conflict is Slack's rule, not a fault: the recovery
        # answers it by stopping the stream, and those stops are what the faults refused,
        # the last one cut by the recovery's bound.)
        if tried and all(c.faulted or c.error in ("streaming_state_conflict", "cancelled") for c in tried):
            return any(c.faulted for c in tried)
    return False


@dataclass(frozen=True)
class _Withdrawal:
    ts: str  # the request's first message, which it deleted
    opened_by: str  # the call that made it: chat.postMessage or chat.startStream
    deleted_at: int  # the chat.delete's seq0


def _withdrawals(world: World, stored: dict[str, dict]) -> dict[str, _Withdrawal]:
    """Requests that deleted their own first message (a chat.delete Slack took) after a
    takeover closed them naming another message, or none: a late first message of a
    process paused or cut off while it was on the wire (`answer._withdraw_if_orphaned`)."""
    first: dict[str, object] = {}
    for call in world.slack_calls:
        tag = call.tag
        if tag and tag.kind == "request" and call.created_ts and tag.rid not in first:
            first[tag.rid] = call
    found: dict[str, _Withdrawal] = {}
    for call in world.slack_calls:
        tag = call.tag
        if not (tag and tag.kind == "request" and call.ok and call.method == "chat.delete"):
            continue
        opening, row = first.get(tag.rid), stored.get(tag.rid)
        if opening is None or row is None or call.args.get("ts") != opening.created_ts:
            continue
        if row["status"] != "in_flight" and row["placeholder_ts"] != opening.created_ts:
            found.setdefault(tag.rid, _Withdrawal(opening.created_ts, opening.method, call.seq0))
    return found


def _part_of_withdrawal(call, gone: _Withdrawal | None) -> bool:
    """`call` is the chat.delete of a withdrawn first message, or the chat.stopStream of
    that stream before it."""
    if gone is None or call.args.get("ts") != gone.ts:
        return False
    if call.method == "chat.delete":
        return True
    return call.method == "chat.stopStream" and gone.opened_by == "chat.startStream" and call.seq0 < gone.deleted_at


def _cut_by_slack(world: World, rec) -> bool:
    """The request's final write ran out of its bounded time (FINAL_WRITE_SECONDS, or
    SHUTDOWN_WRITE_SECONDS once a shutdown interrupts it) while Slack was failing its calls
    with injected faults or an outage: the view may stay stale, by design (shutdown must
    stay bounded). Slack's own rate limits are no excuse: the bot keeps budgets for them."""
    needle = f"request {rec.rid}: Slack did not take the final text"
    if not any(kind == "log" and needle in text for _, kind, text in world.trace):
        return False
    return any(c.faulted for c in world.slack_calls if c.tag and c.tag.rid == rec.rid)


def _left_for_the_next_start(world: World, rec) -> bool:
    """A SIGTERM's shutdown could not get the request's interrupted notice to Slack (its
    bounded write was cut): the request stays in flight, truthfully, for a takeover to
    write the notice — the next start, or another replica. Excused only when nothing ran
    after that shutdown to take it over (the bot stayed down)."""
    if rec is None:
        return False
    needle = f"request {rec.rid}: its interrupted notice did not reach Slack; left in flight"
    if not any(kind == "log" and needle in text for _, kind, text in world.trace):
        return False
    inc = next((i for i in world.incs if i.n == rec.inc), None)
    if inc is None or inc.stopped_at is None or inc.crashed_at is not None:
        return False
    return not any(other is not inc and (other.ended is None or other.ended > inc.stopped_at) for other in world.incs)


def _show(message: dict | None) -> str:
    if message is None:
        return "(no message)"
    text = message.get("shown", message.get("text")) or ""
    state = " [streaming]" if message.get("streaming") else ""
    return repr(text if len(text) <= 70 else text[:67] + "...") + state


def _show_all(messages: list[dict | None]) -> str:
    return " + ".join(_show(m) for m in messages)


def _ts_order(ts: str) -> tuple[int, ...]:
    return tuple(int(part) for part in ts.split("."))


_ENTITY = re.compile(r"<!(here|channel|everyone|group)(?:\|[^<>\n]*)?>", re.IGNORECASE)
_BARE = re.compile(r"(?<![\w@])@(here|channel|everyone)\b", re.IGNORECASE)


def _inert(text: str) -> str:
    """A model's text as a user reads it once its broadcast mentions are inert: `<!here>`
    reads "@here" (the bot puts a WORD JOINER after the "@", which `_plain` drops)."""
    return _ENTITY.sub(lambda m: "@" + m.group(1), text)


def _plain(text: str) -> str:
    """For comparing what was stored with what is shown: no word joiners, no whitespace
    (a long answer is split between messages at a paragraph or line break)."""
    return "".join(text.replace(WORD_JOINER, "").split())


def _live_broadcast(shown: str) -> bool:
    """Whether a bot message would ping a whole channel: a `<!here>`-style entity, or a
    bare @here / @channel / @everyone without the joiner."""
    return bool(_ENTITY.search(shown) or _BARE.search(shown))


def _rows(world: World) -> list[dict]:
    conn = sqlite3.connect(world.db_path)
    try:
        rows = []
        for rid, channel, thread_ts, placeholder_ts, status in conn.execute(
            "SELECT request_id, channel, thread_ts, placeholder_ts, status FROM requests ORDER BY rowid"
        ):
            messages = conn.execute(
                "SELECT role, content, in_context FROM messages WHERE request_id = ? ORDER BY id", (rid,)
            ).fetchall()
            reply = next((c for role, c, _ in messages if role == "assistant"), None)
            rows.append(
                {
                    "request_id": rid,
                    "channel": channel,
                    "thread_ts": thread_ts,
                    "placeholder_ts": placeholder_ts,
                    "status": status,
                    "reply": reply,
                    "in_context": [flag for _, _, flag in messages],
                }
            )
        return rows
    finally:
        conn.close()


def _imported(world: World) -> list[tuple[str, str, str]]:
    conn = sqlite3.connect(world.db_path)
    try:
        return conn.execute("SELECT channel, thread_ts, content FROM messages WHERE request_id IS NULL").fetchall()
    finally:
        conn.close()


SLACK_WRITES = (
    "chat.postMessage",
    "chat.update",
    "chat.delete",
    "chat.startStream",
    "chat.appendStream",
    "chat.stopStream",
    "assistant.threads.setStatus",
    "assistant.threads.setTitle",
)


@dataclass
class _Lease:
    token: int
    owner: str
    inc: int
    expires: float  # by the store's clock
    released: bool = False


def check_replicas(world: World) -> None:
    """7. Replicas (meaningful with several; true of one process and its restarts too).

    - Leases: a thread's lease is granted only when no other replica's is valid (expired
      or released; a replica id re-taking its own is its restart), with a larger token
      than any before; a renewal succeeds only for the thread's current token.
    - Fencing: a start_request / finish_request took effect only under the thread's
      current, unexpired lease; each request was closed at most once. So once a lease
      passed on, nothing its old holder wrote to storage took effect (the takeover's
      outcome stands; Slack showing that outcome is checked with every request, in 2.).
    - One request per thread at any instant across replicas: two requests in one thread
      on different processes overlap in time only if the earlier one's lease had passed
      to the later one (a larger fence) and its process was impaired — crashed, paused
      or cut off from storage — before then: a healthy replica keeps its leases.
    """
    v = world.violate
    incs = {inc.n: inc for inc in world.incs}
    thread_of = {rec.rid: rec.thread for rec in world.requests}
    leases: dict[tuple, _Lease] = {}
    closed: dict[str, object] = {}
    for op in world.store_log:
        thread = op.thread or thread_of.get(op.rid)
        cur = leases.get(thread)
        who = f"process #{op.inc}"
        if op.op == "acquire":
            if op.result is None:
                world.count("leases_refused")
                continue
            if cur is not None:
                if op.result <= cur.token:
                    v(f"lease on {thread} granted to {who} with token {op.result}, not above {cur.token}")
                if not cur.released and cur.expires > op.clock + EPS and cur.owner != op.owner:
                    v(
                        f"lease on {thread} granted to {op.owner!r} ({who}) at {op.t:.3f} while {cur.owner!r}'s "
                        f"(process #{cur.inc}) was valid for {cur.expires - op.clock:.3f}s more"
                    )
                if cur.inc != op.inc and not cur.released:
                    world.count("leases_taken_after_expiry")
            leases[thread] = _Lease(op.result, op.owner, op.inc, op.clock + op.ttl)
        elif op.op == "renew":
            if op.result:
                if cur is None or cur.token != op.token or cur.released:
                    v(f"{who} renewed a lease on {thread} it did not hold (token {op.token}, current {cur})")
                else:
                    cur.expires = op.clock + op.ttl
            else:
                world.count("renewals_refused")
        elif op.op == "release":
            if cur is not None and cur.token == op.token:
                cur.released = True
        elif op.op in ("start", "finish"):
            holds = cur is not None and cur.token == op.token and not cur.released and cur.expires > op.clock - EPS
            if op.result and not holds:
                v(
                    f"a fenced-off {op.op}_request of request {op.rid} ({who}, fence {op.token}) took effect "
                    f"at {op.t:.3f}; the lease on {thread} was {cur}"
                )
            elif not op.result and cur is not None and cur.token != op.token:
                world.count("fenced_writes_refused")
            if op.op == "finish" and op.result:
                if op.rid in closed:
                    v(f"request {op.rid} was closed twice")
                closed[op.rid] = op
                if thread_of.get(op.rid) is not None and world.request_by_rid[op.rid].inc != op.inc:
                    world.count("requests_taken_over")

    # A request that learnt it lost its thread (a renewal refused, its start or finish
    # fenced off), or was closed by another process, writes nothing more to Slack: the
    # thread is another's now, and so is what its messages show (a takeover's notice,
    # another request's answer and status).
    # Bar one thing: its withdrawal of its own first message, when the request was closed
    # naming another message (or none). Its process was paused or cut off while that post
    # was on the wire, past its lease; the takeover read the thread before it landed and
    # posted a notice of its own, so nobody else will ever finish it: a chat.delete of that
    # message, and the chat.stopStream before it that Slack needs for a stream (it refuses
    # to delete a message still streaming). Nothing else, and no other message.
    withdrawn = _withdrawals(world, {r["request_id"]: r for r in _rows(world)})
    knew: dict[str, int] = {}  # request -> the seq at which its process learnt it
    fence_of = {rec.rid: (rec.inc, rec.thread, getattr(rec.state, "fence", 0)) for rec in world.requests}
    for op in world.store_log:
        # Or not learnt but past: another process closed the request (a takeover, its
        # lease expired). A process paused past its lease writes nothing on waking
        # either, before its next renewal tells it: its notice would be overwritten.
        if op.op == "finish" and op.result and op.rid in fence_of and fence_of[op.rid][0] != op.inc:
            knew[op.rid] = min(knew.get(op.rid, op.seq), op.seq)
            continue
        if op.result is not False:
            continue
        for rid, (inc, thread, fence) in fence_of.items():
            if rid in knew or inc != op.inc:
                continue
            if (op.op == "renew" and op.thread == thread and op.token == fence) or (
                op.op in ("start", "finish") and op.rid == rid
            ):
                knew[rid] = op.seq
    for call in world.slack_calls:
        tag = call.tag
        if not (tag and tag.kind == "request" and tag.rid in knew and call.ok and call.issued > knew[tag.rid]):
            continue
        if _part_of_withdrawal(call, withdrawn.get(tag.rid)):
            continue
        if call.method in SLACK_WRITES:
            args = call.args
            text = str(args.get("markdown_text") or args.get("text") or args.get("status") or "")
            v(
                f"request {tag.rid} (m{tag.msg}, process #{call.inc}) lost its thread's lease and still wrote to "
                f"Slack: {call.method} {args.get('ts') or args.get('thread_ts') or ''} {text[:50]!r}"
            )
            break

    by_thread: dict[tuple, list] = defaultdict(list)
    for rec in world.requests:
        by_thread[rec.thread].append(rec)
    for thread, recs in by_thread.items():
        recs.sort(key=lambda r: r.start)
        for i, a in enumerate(recs):
            inc_a = incs[a.inc]
            a_end = a.end if not math.isnan(a.end) else (inc_a.crashed_at if inc_a.dead else math.inf)
            for b in recs[i + 1 :]:
                if b.start >= a_end - EPS:
                    break  # (sorted by start: a ended before the rest began)
                if b.inc == a.inc:
                    continue  # checked live, in the process (ActiveMonitor)
                fa, fb = getattr(a.state, "fence", 0), getattr(b.state, "fence", 0)
                if fb <= fa:
                    v(
                        f"two requests at once in thread {thread} across replicas: {a.rid} (process #{a.inc}, "
                        f"fence {fa}) and {b.rid} (process #{b.inc}, fence {fb}) at {b.start:.3f}"
                    )
                elif not any(
                    x <= b.start + EPS and y >= a.start - world.s.replica_timeout for _, x, y in inc_a.impaired
                ):
                    v(
                        f"process #{a.inc} lost the lease on {thread} to process #{b.inc} while healthy "
                        f"(request {a.rid} from {a.start:.3f}; {b.rid} started at {b.start:.3f})"
                    )
                else:
                    world.count("requests_overlapping_a_fenced_off_one")
