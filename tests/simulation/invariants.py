"""The invariants every simulated run must satisfy, checked after the run.

Each check appends a readable line to `world.violations`. What is checked:

1. Exactly once. Every user message the bot acked is handled exactly once: one request,
   or one busy reply, or (only a channel follow-up without a mention, in a thread the
   bot does not know) deliberately ignored. A message acked only by a process that then
   crashed may be lost (ack-first plus durable dedupe is at-most-once across a kill -9);
   it may never be handled twice. Messages never acked (the bot was down) are handled at
   most once too.
2. One visible outcome. Each handling created exactly one bot message (its placeholder,
   its busy note, or the notice that the placeholder could not be posted) and that
   message ends terminal — an answer, busy, timeout, error or interrupted — and agrees
   with the request's outcome in storage. Excused, and counted: Slack refusing (with an
   injected fault) every post a handling tried, and a crash orphan (a placeholder
   Slack created for a crashed process that never got to record it).
3. Every bot message belongs to a handling; none is left "Thinking…"/streaming.
4. Deadlines. No request outlives ASYNC_TIMEOUT_SECONDS + FINALIZE_SECONDS, no OpenAI call
   outlives its request's deadline (exact in virtual time: EPS), nothing of a request
   talks to Slack after it ended; after SIGTERM requests end within the grace period
   plus the finalize bound.
5. Storage agrees with Slack: nothing in flight at the end; every stored request was
   run; only answered exchanges are in the model's context, with the text Slack shows;
   every prompt's history is made of stored answers and user messages of that thread.
(Per-thread exclusion and "limiters back to zero" are checked live, in `world.py`.)
"""

from __future__ import annotations

import math
import sqlite3
from collections import defaultdict

from bot.processing.answer import FINALIZE_SECONDS, SHUTDOWN_FINALIZE_SECONDS
from bot.processing.failures import BUSY_NOTICE
from tests.simulation.world import CREATING_METHODS, World
from tests.simulation_support import PRODUCTION, TIMEOUT_TEXT, classify

EPS = 1e-6  # "one scheduling step": virtual time does not advance within a step
TIMEOUT = PRODUCTION["async_timeout_seconds"]
GRACE = PRODUCTION["shutdown_grace_seconds"]
EXTRA_NOTICE_MARKERS = (":floppy_disk:",)  # notices classify() does not know yet
SHOWS = {"answered": {"answered"}, "timeout": {"timeout"}, "error": {"error", "stalled"},
         "interrupted": {"interrupted"}}


def final_kind(message: dict | None, *, expired: bool = False) -> str:
    """What the user ends up seeing. A message still in native-streaming state is pending,
    unless `expired`: Slack ends a stream nobody stops after a while (FakeSlack.end_stream
    models that), which is how a stream of a crashed process ends."""
    if message is None:
        return "deleted"
    if message.get("streaming") and not expired:
        return "pending"
    text = message.get("text") or ""
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
                bot_messages[message["ts"]] = {**message, "channel": channel}

    creations: dict[tuple, list] = defaultdict(list)  # (inc, kind, rid or msg) -> creating calls
    created_by: dict[str, object] = {}
    for call in world.slack_calls:
        if call.method not in CREATING_METHODS:
            continue
        tag = call.tag
        key = (call.inc, tag.kind, tag.rid or tag.msg) if tag else (call.inc, "none", None)
        creations[key].append(call)
        if call.created_ts:
            created_by[call.created_ts] = call

    rows = _rows(world)
    stored = {r["request_id"]: r for r in rows}
    for h in world.handlings:
        world.count(f"handled_{h.kind}")
    for rec in world.requests:
        world.count(f"outcome_{rec.outcome}")

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
        if len(hs) > 1:
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
        made = [c.created_ts for c in calls if c.created_ts]
        accounted.update(made)
        row = stored.get(rec.rid)
        who = f"m{rec.msg} (request {rec.rid}, process #{rec.inc})"
        if not made:
            if rec.inc in crashed or rec.outcome == "interrupted":
                continue
            if calls and all(c.injected for c in calls):
                world.count("outcome_refused_by_slack")
                continue
            v(f"{who} ended {rec.outcome} with nothing visible in Slack "
              f"(posts tried: {[(c.method, c.error) for c in calls]})")
            continue
        if len(made) > 1:
            v(f"{who} created {len(made)} bot messages: {made}")
        ts = made[0]
        message = bot_messages.get(ts)
        # A native stream that failed (Slack refused an append or the stop) is given up for
        # chat.update without being stopped, and so is a crashed process's: Slack ends such
        # streams itself after a while; what counts is the text they show.
        fell_back = any("Stream" in c.method and not c.ok for c in world.slack_calls
                        if c.tag and c.tag.rid == rec.rid)
        kind = final_kind(message, expired=rec.inc in crashed or fell_back)
        if message is not None and message.get("streaming") and kind != "pending":
            world.count("streams_left_for_slack_to_expire")
        cut = _cut_by_slack(world, rec)
        if kind == "pending":
            if rec.inc in crashed and row is None:
                world.count("crash_orphans")  # Slack made it; the process died before recording it
                continue
            if cut:
                world.count("final_write_cut_by_slack_faults")
                continue
            v(f"{who} left its message {ts} showing {_show(message)} forever (outcome {rec.outcome}, "
              f"stored {row['status'] if row else 'nothing'})")
            continue
        expected = row["status"] if row is not None else rec.outcome
        if expected == "in_flight":
            continue  # reported below
        if kind not in SHOWS.get(expected, {expected}):
            if cut:
                world.count("final_write_cut_by_slack_faults")
            else:
                v(f"{who}: Slack shows {kind} ({_show(message)}) but the outcome is {expected}")
        elif expected == "answered" and row is not None:
            reply = row["reply"]
            text = message.get("text") or ""
            if reply is None or not (text == reply or text.startswith(reply + "\n\n")):
                if cut:
                    world.count("final_write_cut_by_slack_faults")
                else:
                    v(f"{who}: Slack shows {_show(message)} but storage has the answer {reply!r}")
        if row is not None and rec.inc not in crashed and row["status"] != rec.outcome:
            v(f"{who}: the bot says {rec.outcome}, storage says {row['status']}")

    for h in world.handlings:
        if h.kind != "busy":
            continue
        calls = creations.get((h.inc, "busy", h.msg), [])
        made = [c.created_ts for c in calls if c.created_ts]
        accounted.update(made)
        if len(made) > 1:
            v(f"m{h.msg}: {len(made)} busy replies")
        elif made:
            if bot_messages.get(made[0], {}).get("text") != BUSY_NOTICE:
                v(f"m{h.msg}: the busy reply reads {_show(bot_messages.get(made[0]))}")
        elif not (h.inc in crashed or (calls and all(c.injected for c in calls))):
            v(f"m{h.msg}: told busy, but no busy reply reached Slack (posts: {[(c.method, c.error) for c in calls]})")

    # 3. every bot message belongs to a handling and is terminal
    for ts, message in bot_messages.items():
        if ts in accounted:
            continue
        call = created_by.get(ts)
        if call is not None and call.tag is not None and call.tag.kind == "envelope":
            # Posted while taking the event in, before any request (a first DM's welcome).
            if final_kind(message) == "pending":
                v(f"bot message {ts} posted for m{call.tag.msg} ({_show(message)}) is left pending")
            world.count("extra_messages")
            continue
        owner = f"{call.tag.kind} of m{call.tag.msg}" if call is not None and call.tag else "nobody"
        v(f"bot message {ts} in {message['channel']} ({_show(message)}) was posted by {owner}")

    # 4. deadlines
    by_rid = {rec.rid: rec for rec in world.requests}
    for rec in world.requests:
        if rec.inc in crashed:
            continue
        if math.isnan(rec.end):
            v(f"request {rec.rid} (m{rec.msg}) never ended")
            continue
        limit = rec.start + TIMEOUT + FINALIZE_SECONDS
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
        if call.t_end > rec.start + TIMEOUT + EPS:
            v(f"OpenAI call for m{call.msg} ended at {call.t_end:.3f}, {call.t_end - rec.start - TIMEOUT:.3f}s "
              f"past its request's deadline")
        if call.t_end > rec.end + EPS:
            v(f"OpenAI call for m{call.msg} outlived its request ({call.t_end:.3f} > {rec.end:.3f})")
    for rec in world.requests:  # the timeout notice goes out at the deadline, not a step later
        if rec.outcome != "timeout" or rec.inc in crashed:
            continue
        notices = [c.t for c in world.slack_calls if c.tag and c.tag.rid == rec.rid
                   and TIMEOUT_TEXT in str(c.args.get("markdown_text") or c.args.get("text") or "")]
        if notices and abs(notices[0] - (rec.start + TIMEOUT)) > EPS:
            v(f"request {rec.rid} (m{rec.msg}) sent its timeout notice at {notices[0]:.6f}, "
              f"{notices[0] - rec.start - TIMEOUT:+.6f}s from its deadline")
    for call in world.slack_calls:
        if call.tag and call.tag.kind == "request" and call.inc not in crashed:
            rec = by_rid.get(call.tag.rid)
            if rec is not None and not math.isnan(rec.end) and call.t > rec.end + EPS:
                v(f"{call.method} for m{call.tag.msg} at {call.t:.3f}, after its request ended at {rec.end:.3f}")

    # 5. storage agrees with Slack
    for row in rows:
        if row["status"] == "in_flight":
            v(f"storage still has request {row['request_id']} in flight at the end "
              f"(placeholder {row['placeholder_ts']}, shows {_show(bot_messages.get(row['placeholder_ts']))})")
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
                    v(f"the prompt for m{call.msg} carries an assistant message that is no stored answer: "
                      f"{content!r:.80}")
            elif message.get("role") == "user" and content not in user_texts[call.thread] \
                    and content not in imported[call.thread]:
                v(f"the prompt for m{call.msg} carries a user message from elsewhere: {content!r:.80}")


def _cut_by_slack(world: World, rec) -> bool:
    """The request's final write ran out of its bounded time (FINALIZE_SECONDS) while
    Slack was failing its calls with injected faults: the view may stay stale, by design
    (shutdown must stay bounded)."""
    needle = f"request {rec.rid}: Slack did not take the final text"
    if not any(kind == "log" and needle in text for _, kind, text in world.trace):
        return False
    return any(c.injected for c in world.slack_calls if c.tag and c.tag.rid == rec.rid)


def _show(message: dict | None) -> str:
    if message is None:
        return "(no message)"
    text = message.get("text") or ""
    state = " [streaming]" if message.get("streaming") else ""
    return repr(text if len(text) <= 70 else text[:67] + "...") + state


def _rows(world: World) -> list[dict]:
    conn = sqlite3.connect(world.db_path)
    try:
        rows = []
        for rid, channel, thread_ts, placeholder_ts, status in conn.execute(
                "SELECT request_id, channel, thread_ts, placeholder_ts, status FROM requests ORDER BY rowid"):
            messages = conn.execute("SELECT role, content, in_context FROM messages WHERE request_id = ? ORDER BY id",
                                    (rid,)).fetchall()
            reply = next((c for role, c, _ in messages if role == "assistant"), None)
            rows.append({"request_id": rid, "channel": channel, "thread_ts": thread_ts,
                         "placeholder_ts": placeholder_ts, "status": status, "reply": reply,
                         "in_context": [flag for _, _, flag in messages]})
        return rows
    finally:
        conn.close()


def _imported(world: World) -> list[tuple[str, str, str]]:
    conn = sqlite3.connect(world.db_path)
    try:
        return conn.execute("SELECT channel, thread_ts, content FROM messages WHERE request_id IS NULL").fetchall()
    finally:
        conn.close()
