"""The simulator with several replicas at once (tests/simulation, `Scenario.replicas`):
hand-written worlds for what the random seeds only sometimes draw — two replicas sharing
many messages, one killed mid-answer and its request taken over, one paused past its
lease and fenced off when it resumes, one cut off from storage, one restarted under a new
id. Each run is checked by every invariant (invariants.py, 7. for replicas), and then
for the particular thing the world is about, from the world's own records: the lease
operations and fenced writes in commit order (`store_log`), the takeovers, the trace.

Bot bugs these worlds show are in test_simulation_seeds.py's KNOWN_BOT_BUGS (xfail).
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.simulation import report, run_scenario
from tests.simulation.runner import Result
from tests.simulation.scenario import Fault, Msg, Scenario
from tests.simulation.world import World

SLOW = (("ok", 20.0, 4, 1.0),)  # an answer that takes 23 s


def replicas(messages, faults=(), *, n: int = 2, timeout: float = 10.0, seed: int = 1, native: bool = False):
    return Scenario(seed, 3, 1, 100, 0.0, tuple(messages), tuple(faults), native, replicas=n, replica_timeout=timeout)


def run(scenario: Scenario) -> tuple[Result, World]:
    """Run and keep the world (run_scenario's result has the trace and the stats)."""
    worlds: list[World] = []
    original = World.__init__

    def keep(self, s):
        original(self, s)
        worlds.append(self)

    World.__init__ = keep
    try:
        result = run_scenario(scenario)
    finally:
        World.__init__ = original
    return result, worlds[0]


def lines(result: Result, kind: str) -> list[str]:
    return [text for _, k, text in result.trace if k == kind]


def test_two_replicas_share_many_messages():
    """40 DMs and channel threads with follow-ups over a minute, some twins and late
    redeliveries: each answered once, by one replica or the other, and both took part."""
    messages = []
    for i in range(40):
        root = i - 20 if i >= 20 else None  # the second half follow up the first
        at = 1.0 + i * 1.5
        if i % 3 == 0:
            messages.append(
                Msg(i, at, i % 3, "channel", 0, root=root if root is None or root % 3 == 0 else None, twin=True)
            )
        else:
            messages.append(
                Msg(
                    i,
                    at,
                    i % 3,
                    "dm",
                    root=root if root is not None and root % 3 == i % 3 else None,
                    dup=3.0 if i % 7 == 0 else None,
                )
            )
    scenario = replicas(messages, n=2, native=True)
    result, world = run(scenario)
    assert not result.failed, report(result)
    by_inc = Counter(rec.inc for rec in world.requests)
    assert set(by_inc) == {1, 2} and min(by_inc.values()) >= 10, by_inc
    assert Counter(rec.outcome for rec in world.requests) == {"answered": len(world.requests)}
    assert len({rec.msg for rec in world.requests}) == len(world.requests) == 40
    assert result.stats.get("handled_duplicate", 0) >= 1  # a twin or redelivery reached the other replica


def test_a_replica_killed_mid_answer_is_taken_over_by_the_other():
    """r0 is killed 4 s into a 23 s answer and stays down: once its heartbeat is older
    than REPLICA_TIMEOUT_SECONDS, r1 takes the thread's lease (a larger token), edits the
    placeholder into the interrupted notice and stores that outcome under its own fence.
    A later message in the thread is answered by r1."""
    scenario = replicas(
        [Msg(0, 1.0, 0, "dm", ai=SLOW), Msg(1, 40.0, 0, "dm", root=0)],
        [Fault(5.0, "crash", "r0", restart_after=None)],
    )
    result, world = run(scenario)
    assert not result.failed, report(result)
    first = next(rec for rec in world.requests if rec.msg == 0)
    assert first.inc == 1  # (FakeSlack's round-robin gives the first envelope to r0)
    finish = [op for op in world.store_log if op.op == "finish" and op.rid == first.rid and op.result]
    assert len(finish) == 1 and finish[0].inc == 2 and finish[0].outcome == "interrupted"
    assert "taken over by r1" in finish[0].detail
    assert 10.0 <= finish[0].t <= 5.0 + 10.0 + 10.0 / 3 + 1  # heartbeat aged, next sweep
    assert world.recovered == {2: [r for r in world.recovered[2]]} and world.recovered[2][0].request_id == first.rid
    shown = world.slack.visible_text("D0", first.placeholder_ts or world.recovered[2][0].placeholder_ts)
    assert "Interrupted" in shown
    follow_up = next(rec for rec in world.requests if rec.msg == 1)
    assert follow_up.inc == 2 and follow_up.outcome == "answered"
    assert result.stats["requests_taken_over"] == 1


def test_a_replica_killed_and_restarted_under_a_new_id():
    """r1 is killed mid-answer and restarted at once as r1.2: its start-up does not take
    over r1's requests (another id), but they are abandoned once r1's heartbeat ages, and
    one of the live replicas takes each over exactly once."""
    scenario = replicas(
        [Msg(0, 1.0, 0, "dm", ai=SLOW), Msg(1, 1.5, 1, "dm", ai=SLOW), Msg(2, 2.0, 2, "dm", ai=SLOW)],
        [Fault(5.0, "crash", "r1", restart_after=0.25, new_id=True)],
    )
    result, world = run(scenario)
    assert not result.failed, report(result)
    assert any("starting as replica r1.2" in text for text in lines(result, "process"))
    dead = [rec for rec in world.requests if rec.inc == 2]
    assert dead, "r1 answered nothing before it was killed"
    for rec in dead:
        closes = [op for op in world.store_log if op.op == "finish" and op.rid == rec.rid and op.result]
        assert len(closes) == 1 and closes[0].inc in (1, 3) and closes[0].outcome == "interrupted", closes
        assert closes[0].t >= 5.0 - 10.0 / 3 + 10.0 - 1e-6  # not before r1's last heartbeat aged
    assert Counter(rec.outcome for rec in world.requests if rec.inc != 2) == {"answered": 3 - len(dead)}


def test_a_replica_paused_past_its_lease_is_fenced_off():
    """r0 freezes for 40 s (its lease lives 10) in the middle of an answer. r1 takes the
    request over; when r0 resumes its renewal is refused and its request is cancelled, and
    nothing it then writes to storage takes effect: the takeover's outcome stands."""
    scenario = replicas([Msg(0, 1.0, 0, "dm", ai=(("ok", 5.0, 6, 4.0),))], [Fault(3.0, "pause", "r0", seconds=40.0)])
    result, world = run(scenario)
    assert not result.failed, report(result)
    rec = world.requests[0]
    assert rec.inc == 1
    ops = [op for op in world.store_log if op.thread == rec.thread or op.rid == rec.rid]
    grants = [op for op in ops if op.op == "acquire" and op.result is not None]
    assert [op.inc for op in grants] == [1, 2] and grants[1].result > grants[0].result
    # r0's lease had expired (by the store's clock: its last grant or renewal + its ttl), r0 still paused
    held = [op for op in ops if op.inc == 1 and op.op in ("acquire", "renew") and op.result]
    assert max(op.clock + op.ttl for op in held) - 1e-6 <= grants[1].clock and grants[1].t < 43.0
    refused = [op for op in ops if op.op == "renew" and op.inc == 1 and op.result is False]
    assert refused and refused[0].t >= 43.0 - 1e-6  # it learnt on resuming
    closes = [op for op in ops if op.op == "finish"]
    assert [(op.inc, op.result, op.outcome) for op in closes if op.result] == [(2, True, "interrupted")]
    assert all(op.result is False for op in closes if op.inc == 1)
    assert "Interrupted" in world.slack.visible_text("D0", rec.placeholder_ts)
    assert result.stats["renewals_refused"] >= 1


@pytest.mark.parametrize("seed", [6, 7, 8])
def test_a_replica_paused_mid_answer_writes_nothing_over_the_notice_on_waking(seed):
    """r0 freezes for 12 s in the middle of a streamed answer (chat.update mode; its
    lease lives 10 s) and r1 edits the placeholder into its notice. On waking, r0's
    stream goes on and its next edit is due at once, maybe before the renewal that tells
    it the lease is gone: it holds its edits back, since by its own clock it fell behind
    its lease, until that renewal says (refused: it stops). Nothing of r0's is written
    after r1 closed the request (invariant 7), and the notice stays. These seeds
    overwrote it with the answer's first words before (`ThreadGates.surely_held`)."""
    scenario = replicas(
        [Msg(0, 1.0, 0, "dm", ai=(("ok", 2.0, 20, 0.5),))], [Fault(2.0, "pause", "r0", seconds=12.0)], seed=seed
    )
    result, world = run(scenario)
    assert not result.failed, report(result)
    [rec] = world.requests
    assert rec.inc == 1
    closes = [op for op in world.store_log if op.op == "finish" and op.rid == rec.rid and op.result]
    assert [(op.inc, op.outcome) for op in closes] == [(2, "interrupted")]
    late = [
        c.method
        for c in world.slack_calls
        if c.tag and c.tag.rid == rec.rid and c.ok and c.issued > closes[0].seq and c.method != "conversations.replies"
    ]
    assert late == [], late
    channel, thread_ts = rec.thread
    [shown] = world.slack.bot_replies(channel, thread_ts)
    assert "Interrupted" in shown and "Echo" not in shown


def test_a_replica_cut_off_from_storage():
    """r0 loses its database for 20 s; Slack and OpenAI stay reachable. Messages it gets
    meanwhile are told the database is unreachable (it cannot take a lease), messages r1
    gets are answered; its heartbeat and renewals fail and it goes on once storage is
    back. (A request it was answering when cut off shows the known bot bug "a takeover
    overwrites an answer already delivered": none here.)"""
    scenario = replicas(
        [Msg(0, 1.0, 0, "dm"), Msg(1, 6.0, 1, "dm"), Msg(2, 7.0, 2, "dm"), Msg(3, 30.0, 0, "dm", root=0)],
        [Fault(3.0, "partition", "r0", seconds=20.0)],
    )
    result, world = run(scenario)
    assert not result.failed, report(result)
    kinds = Counter((h.kind, h.inc) for h in world.handlings)
    assert kinds[("storage_down", 1)] >= 1 and kinds[("request", 2)] >= 1, kinds
    assert result.stats["partitioned_store_calls"] >= 3
    logged = "\n".join(lines(result, "log"))
    assert "heartbeat failed" in logged and "could not renew" not in logged  # (no lease held)
    after = [rec for rec in world.requests if rec.msg == 3]
    assert after and after[0].outcome == "answered"  # the thread goes on after the partition


def test_three_replicas_with_every_fault():
    """Three replicas, timeout 15 s: one paused past its lease, one cut off from storage,
    one killed and restarted under the same id, while 30 messages come in. Every invariant
    holds except the known bot bugs these faults trigger."""
    messages = [Msg(i, 1.0 + i * 2.0, i % 3, "dm", ai=(("ok", 2.0 + (i % 5) * 3.0, 3, 1.0),)) for i in range(30)]
    faults = [
        Fault(6.0, "pause", "r1", seconds=25.0),
        Fault(20.0, "partition", "r2", seconds=5.0),
        Fault(35.0, "crash", "r0", restart_after=5.0),
    ]
    result, world = run(replicas(messages, faults, n=3, timeout=15.0))
    known = ("lost its thread's lease and still wrote to Slack", "delivered its answer, then a takeover")
    others = [v for v in result.violations if not any(k in v for k in known)]
    assert not others, report(result)
    assert len({rec.inc for rec in world.requests}) >= 3
    assert result.stats.get("requests_taken_over", 0) >= 1


@pytest.mark.parametrize("native", [False, True], ids=["placeholder", "native stream"])
@pytest.mark.parametrize("replicas_running", [1, 2], ids=["restarted", "taken over by another replica"])
def test_killed_while_its_first_message_is_on_the_wire(native, replicas_running):
    """Issue 11, the orphaned placeholder: m0's request starts at 2.0 and its first
    message (a "Thinking…" placeholder, or a native stream) is on the wire until 3.0
    (Slack takes 1 s a call); the process is killed at 2.5. Slack makes the message, and
    no id of it ever reaches storage. The request was recorded before the post, so the
    restarted process (its own previous run's request, at once) or the other replica
    (once the dead one's heartbeat aged) takes it over, finds the message in the thread
    — the placeholder's metadata names the request; a stream is the bot's one message
    without metadata — and edits it into the interrupted notice: nothing is left
    "Thinking…" or streaming, and no second message is posted."""
    crash = (
        Fault(2.5, "crash", restart_after=1.0)
        if replicas_running == 1
        else Fault(2.5, "crash", "r0", restart_after=None)
    )
    scenario = Scenario(
        1,
        1,
        1,
        100,
        1.0,
        (Msg(0, 1.0, 0, "dm", ai=SLOW),),
        (crash,),
        native,
        replicas=replicas_running,
        replica_timeout=10.0,
    )
    result, world = run(scenario)
    assert not result.failed, report(result)
    [rec] = world.requests
    assert rec.inc == 1 and not rec.placeholder_ts  # it never learnt its message's id
    channel, thread_ts = rec.thread
    [made] = [c.created_ts for c in world.slack_calls if c.tag and c.tag.rid == rec.rid and c.created_ts]
    assert "Interrupted" in world.slack.visible_text(channel, made)
    assert not world.slack.is_streaming(channel, made)
    replies = world.slack.bot_replies(channel, thread_ts)
    assert [r for r in replies if "Interrupted" in r] == [world.slack.visible_text(channel, made)]  # no new notice
    finish = [op for op in world.store_log if op.op == "finish" and op.rid == rec.rid and op.result]
    assert len(finish) == 1 and finish[0].inc == 2 and finish[0].outcome == "interrupted"
    assert result.stats["requests_taken_over"] == 1


@pytest.mark.parametrize("native", [False, True], ids=["placeholder", "native stream"])
def test_paused_while_its_first_message_is_on_the_wire(native):
    """Issue 11, the late first message: r0 records m0's request, then pauses for 13 s
    as its first message (a placeholder, or a native stream) leaves it, before Slack
    makes it. r1 takes the request over once r0's heartbeat is 10 s old, finds no message
    in the thread and posts its notice; r0 resumes, its post lands after that notice
    (within chat.startStream's own bound: a longer pause gives the stream up for a
    placeholder), and it learns its lease is gone. It asks storage, finds the request
    closed without its message, and withdraws it (a stream stopped first: Slack refuses
    to delete one still streaming): one bot message under the question, the notice, and
    nothing of r0's after it but the withdrawal (invariant 7 allows exactly that)."""
    scenario = replicas(
        [Msg(0, 1.0, 0, "dm", ai=SLOW)], [Fault(0.5, "pause", "r0", seconds=13.0, on="opening")], native=native
    )
    result, world = run(scenario)
    assert not result.failed, report(result)
    [rec] = world.requests
    assert rec.inc == 1
    channel, thread_ts = rec.thread
    [made] = [c for c in world.slack_calls if c.tag and c.tag.rid == rec.rid and c.created_ts]
    [notice] = [c for c in world.slack_calls if c.tag and c.tag.kind == "takeover" and c.created_ts]
    assert notice.inc == 2 and notice.seq1 < made.seq1  # r0's message landed after r1's notice
    assert (channel, made.created_ts) in world.slack.deleted
    mine = [
        c.method for c in world.slack_calls if c.tag and c.tag.rid == rec.rid and c.args.get("ts") == made.created_ts
    ]
    assert mine == (["chat.stopStream", "chat.delete"] if native else ["chat.delete"]), mine
    [shown] = world.slack.bot_replies(channel, thread_ts)
    assert "Interrupted" in shown and shown == world.slack.visible_text(channel, notice.created_ts)
    finish = [op for op in world.store_log if op.op == "finish" and op.rid == rec.rid and op.result]
    assert len(finish) == 1 and finish[0].inc == 2 and finish[0].outcome == "interrupted"
    assert result.stats["orphans_withdrawn"] == 1


def test_withdrawing_a_message_the_takeover_kept_is_a_violation(monkeypatch):
    """The other side of invariant 7's one allowance: a request that lost its thread may
    delete its own first message only when the takeover closed it without that message.
    Here r1 edited r0's placeholder into its notice (storage says so), and r0 is made to
    believe otherwise: its withdrawal deletes the notice, and the invariants say so."""
    from bot.processing import answer
    from bot.storage import RequestRecord

    async def closed_without_it(services, state):
        return RequestRecord("interrupted", "")

    monkeypatch.setattr(answer, "_closed_record", closed_without_it)
    scenario = replicas(
        [Msg(0, 1.0, 0, "dm", ai=(("ok", 2.0, 20, 0.5),))], [Fault(2.0, "pause", "r0", seconds=12.0)], seed=6
    )
    result, world = run(scenario)
    [rec] = world.requests
    deletes = [c for c in world.slack_calls if c.tag and c.tag.rid == rec.rid and c.ok and c.method == "chat.delete"]
    assert [c.args["ts"] for c in deletes] == [rec.placeholder_ts]  # the notice r1 made of it is gone
    assert result.failed
    assert any("still wrote to Slack: chat.delete" in v for v in result.violations), report(result)
