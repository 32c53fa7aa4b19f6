"""A simulated world, as data: what one seed means.

`generate(seed)` draws a whole `Scenario` from `random.Random(seed)`: the users and
channels, every message (when it is posted, in which thread, how Slack delivers it, and
what OpenAI does with it — a few answers carry broadcast mentions or are longer than one
Slack message), the Slack / socket / storage faults with their moments (Web API outages
of 0.5–20 s, posts Slack makes but answers 5xx for, streams Slack ends by itself), and
the SIGTERMs and crashes. Nothing else in a run is random: the world only *executes* the
scenario (the scheduler's own coin flips are seeded from `scenario.seed` too), so a
scenario is the complete, replayable description of a run, and the shrinker can edit it
(fewer messages, fewer faults, plainer answers) and run it again.

Times are virtual seconds after the bot's first socket said hello, on a 0.25 s grid:
coarse on purpose, so that messages, faults, deadlines and shutdowns often land on the
same instant and the scheduler's interleavings at that instant get explored.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, replace

GRID = 0.25

# ---- what OpenAI does with one attempt ----------------------------------------------
# A message's `ai` is a tuple of steps, one per HTTP attempt (the SDK retries 429/5xx and
# connection errors twice); the last step repeats. Steps are tuples so they print short:
#   ("ok", latency, chunks, chunk_delay)   a normal streamed answer (the echo of the question)
#   ("ok", latency, chunks, chunk_delay, text)  ... whose text is special: "broadcast" (carries
#                                          <!here>, <!channel>, @everyone: the bot must make them
#                                          inert) or "long" (longer than one Slack message: split)
#   ("noresp",)                            takes the request, never sends headers: only the 305 s deadline ends it
#   ("trickle",)                           streams a word every 30 s for 100 minutes: deadline again
#   ("silent", latency)                    headers, then nothing: the 60 s idle deadline
#   ("stall", latency, after)              `after` chunks, then nothing: the idle deadline
#   ("cut", latency, after)                `after` chunks, then the connection breaks mid-answer
#   ("status", code, latency, error_code)  an HTTP error (429, 500, 503, 400 context_length_exceeded)
#   ("connect",)                           the TCP connection fails (the SDK sees httpx ConnectError)
OK_PLAIN = ("ok", 1.0, 2, 0.25)


@dataclass(frozen=True)
class Msg:
    id: int
    at: float  # when the user posts it
    user: int
    place: str  # "dm" | "channel"
    channel: int = 0  # which shared channel, when place == "channel"
    root: int | None = None  # id of the thread's first message; None: it starts a thread
    mention: bool = True  # channel messages: mentions the bot (a thread's first one always does)
    twin: bool = False  # also deliver the plain `message` twin of the `app_mention` (as Slack does)
    delay: float = 0.0  # Slack delivers the event this long after the post: reorders envelopes
    dup: float | None = None  # a late ack: Slack delivers the event again this long after the first delivery
    ai: tuple[tuple, ...] = (OK_PLAIN,)


@dataclass(frozen=True)
class Fault:
    """One thing that goes wrong at `at`.

    kind "slack":   the next `times` calls to Web API method `target` fail with `status`
                    (429 with Retry-After `retry_after`, 500 JSON, 502/503 HTML pages);
    kind "socket":  `target` is a disconnect reason (warning, refresh_requested,
                    link_disabled, too_many_websockets), "drop" (abrupt), "silence" (dead
                    socket) or "refuse" (the next `times` upgrades are refused);
    kind "storage": the next `times` calls to Store method `target` raise StorageError
                    (`error`: "database or disk is full" | "database is locked");
    kind "sigterm": a graceful stop (nursery.stop()); a new process starts
                    `restart_after` seconds later (None: the bot stays down);
    kind "crash":   a hard stop: the process's effects end at this instant; a new process
                    starts `restart_after` seconds later on the same database;
    kind "outage":  Slack's whole Web API answers HTTP `status` (an HTML page, nothing done)
                    for `seconds` (FakeSlack.outage);
    kind "slack" with `after`: Slack *does* the next `times` calls to `target`, then answers
                    HTTP `status` (the reply is lost: a post exists that the bot was told failed);
    kind "end_stream": Slack ends, by itself, the native stream answering message `target`
                    ("m12") if one is streaming at that instant (FakeSlack.end_stream).

    Replicas (`Scenario.replicas` > 1): "sigterm" and "crash" stop the replica `target`
    names ("r1"; "" is r0), and its restart runs under a new replica id if `new_id`;
    kind "pause":     replica `target` freezes for `seconds` (SIGSTOP … SIGCONT): its Web
                    API and OpenAI calls, socket frames and store transactions wait until
                    it resumes (its timers still fire, and their calls wait too); with
                    `on` "opening", not at `at` but as the next answer's first message
                    after `at` leaves it (chat.startStream, or the "Thinking…" post):
                    that call reaches Slack when it resumes (a post on the wire, stopped
                    before Slack makes the message);
    kind "partition": replica `target`'s store calls raise StorageError for `seconds`
                    (cut off from the database; Slack and OpenAI still reachable).
    """

    at: float
    kind: str
    target: str = ""
    status: int = 0
    retry_after: float = 0.0
    times: int = 1
    error: str = ""
    restart_after: float | None = None
    seconds: float = 0.0  # outage: how long
    after: bool = False  # slack: the call takes effect, then the 5xx
    new_id: bool = False  # sigterm/crash of a replica: it restarts under a new replica id
    on: str = ""  # pause: "opening", as the replica's next answer's first message goes out


@dataclass(frozen=True)
class Scenario:
    seed: int
    users: int
    channels: int
    slots: int  # ASYNC_MAX_CONCURRENT_REQUESTS
    slack_latency: float  # every Web API call takes this long
    messages: tuple[Msg, ...] = ()
    faults: tuple[Fault, ...] = ()
    native: bool = True  # NATIVE_STREAMING (production: on); off, DMs stream by chat.update too
    replicas: int = 1  # bot processes running at once on the one database and the one Slack
    replica_timeout: float = 30.0  # REPLICA_TIMEOUT_SECONDS (also the thread leases' time to live)
    note: str = field(default="", compare=False)  # what the shrinker did, for the printout

    # ---- (de)serialisation: a shrunk scenario is replayed from its JSON ---------------

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Scenario:
        raw = json.loads(text)
        messages = tuple(Msg(**{**m, "ai": tuple(tuple(s) for s in m["ai"])}) for m in raw.pop("messages"))
        faults = tuple(Fault(**f) for f in raw.pop("faults"))
        return cls(**raw, messages=messages, faults=faults)

    def describe(self) -> str:
        """The scenario, one line per message and fault, in time order."""
        lines = [
            f"seed {self.seed}: {self.users} user(s), {self.channels} channel(s), {self.slots} model slot(s), "
            f"Slack latency {self.slack_latency:g}s, native streaming {'on' if self.native else 'off'}, "
            f"{len(self.messages)} message(s), {len(self.faults)} fault(s)"
            + (f", {self.replicas} replicas (timeout {self.replica_timeout:g}s)" if self.replicas > 1 else "")
        ]
        rows: list[tuple[float, int, str]] = []
        for m in self.messages:
            where = f"DM of u{m.user}" if m.place == "dm" else f"#c{m.channel} by u{m.user}"
            thread = "new thread" if m.root is None else f"in thread of m{m.root}"
            extra = []
            if m.place == "channel" and m.root is not None:
                extra.append("mention" if m.mention else "no mention")
            if m.twin:
                extra.append("+twin")
            if m.delay:
                extra.append(f"delivered +{m.delay:g}s")
            if m.dup is not None:
                extra.append(f"redelivered +{m.dup:g}s")
            steps = " then ".join(_step_text(s) for s in m.ai)
            rows.append(
                (m.at, 0, f"m{m.id}: {where}, {thread}{', ' + ', '.join(extra) if extra else ''}; OpenAI: {steps}")
            )
        for f in self.faults:
            rows.append((f.at, 1, f"fault: {_fault_text(f)}"))
        lines += [f"  t={at:8.2f}  {text}" for at, _, text in sorted(rows, key=lambda r: (r[0], r[1]))]
        if self.note:
            lines.append(f"  ({self.note})")
        return "\n".join(lines)


def _step_text(step: tuple) -> str:
    kind = step[0]
    if kind == "ok":
        text = f" ({step[4]} text)" if len(step) > 4 else ""
        return f"answer{text} after {step[1]:g}s in {step[2]} chunk(s) {step[3]:g}s apart"
    if kind == "noresp":
        return "no response at all"
    if kind == "trickle":
        return "endless trickle"
    if kind == "silent":
        return f"headers after {step[1]:g}s then silence"
    if kind == "stall":
        return f"{step[2]} chunk(s) after {step[1]:g}s then silence"
    if kind == "cut":
        return f"{step[2]} chunk(s) after {step[1]:g}s then connection cut"
    if kind == "status":
        return f"HTTP {step[1]}{' ' + step[3] if step[3] else ''} after {step[2]:g}s"
    if kind == "connect":
        return "connection refused"
    return repr(step)


def _fault_text(f: Fault) -> str:
    if f.kind == "slack":
        extra = f" Retry-After {f.retry_after:g}s" if f.status == 429 else ""
        if f.after:
            return f"Slack does {f.target} but answers HTTP {f.status} x{f.times}"
        return f"Slack {f.target} answers HTTP {f.status}{extra} x{f.times}"
    if f.kind == "outage":
        return f"Slack Web API outage: HTTP {f.status} for {f.seconds:g}s"
    if f.kind == "end_stream":
        return f"Slack ends the stream answering {f.target} by itself"
    if f.kind == "socket":
        if f.target == "refuse":
            return f"socket upgrades refused x{f.times}"
        return f"socket {f.target}" if f.target in ("drop", "silence") else f"socket disconnect ({f.target})"
    if f.kind == "storage":
        return f"storage {f.target} fails ({f.error}) x{f.times}"
    who = f" of replica {f.target}" if f.target else ""
    if f.kind == "pause":
        when = " as its next answer opens" if f.on else ""
        return f"replica {f.target or 'r0'} paused{when} for {f.seconds:g}s"
    if f.kind == "partition":
        return f"replica {f.target or 'r0'} cut off from storage for {f.seconds:g}s"
    restart = "stays down" if f.restart_after is None else f"restart after {f.restart_after:g}s"
    if f.new_id and f.restart_after is not None:
        restart += " under a new replica id"
    return f"{f.kind.upper()}{who}, {restart}"


# ---- generation -----------------------------------------------------------------------

SLACK_METHODS = (
    "chat.postMessage",
    "chat.update",
    "chat.startStream",
    "chat.appendStream",
    "chat.stopStream",
    "assistant.threads.setStatus",
    "conversations.replies",
    "apps.connections.open",
    "auth.test",
)
STORE_METHODS = (
    "claim_event",
    "thread_known",
    "load_history",
    "import_history",
    "start_request",
    "finish_request",
    "prune_events",
)
DISCONNECT_REASONS = ("warning", "refresh_requested", "link_disabled", "too_many_websockets")


def _q(x: float) -> float:
    """Onto the grid."""
    return round(round(x / GRID) * GRID, 6)


def _latency(rng: random.Random, profile: str) -> float:
    """OpenAI's time to first token: mostly seconds, a long tail."""
    r = rng.random()
    if r < 0.6:
        return _q(rng.uniform(0.0, 4.0))
    if r < 0.9:
        return _q(rng.uniform(4.0, 30.0))
    return _q(rng.uniform(30.0, 200.0 if profile != "calm" else 60.0))


def _ai_plan(rng: random.Random, profile: str) -> tuple[tuple, ...]:
    weights = {  # kind: weight, by profile
        "calm": {"ok": 95, "slow": 5},
        "busy": {"ok": 80, "slow": 8, "noresp": 2, "trickle": 1, "silent": 2, "stall": 2, "cut": 2, "status": 3},
        "faulty": {
            "ok": 50,
            "slow": 8,
            "noresp": 6,
            "trickle": 3,
            "silent": 6,
            "stall": 6,
            "cut": 6,
            "status": 10,
            "connect": 5,
        },
        "chaos": {
            "ok": 40,
            "slow": 8,
            "noresp": 8,
            "trickle": 4,
            "silent": 8,
            "stall": 8,
            "cut": 8,
            "status": 10,
            "connect": 6,
        },
    }[profile]
    kind = rng.choices(list(weights), list(weights.values()))[0]

    def ok() -> tuple:
        return ("ok", _latency(rng, profile), rng.randint(1, 6), _q(rng.choice([0.0, 0.25, 0.5, 1.0, 3.0])))

    if kind == "ok":
        return (ok(),)
    if kind == "slow":  # slow but steady: gaps just under the idle deadline
        return (("ok", _q(rng.uniform(0, 59)), rng.randint(2, 6), _q(rng.uniform(10.0, 59.0))),)
    if kind in ("noresp", "trickle", "connect"):
        first: tuple = (kind,)
    elif kind == "silent":
        first = ("silent", _latency(rng, profile))
    elif kind == "stall":
        first = ("stall", _latency(rng, profile), rng.randint(0, 3))
    elif kind == "cut":
        first = ("cut", _latency(rng, profile), rng.randint(0, 3))
    else:
        code, error_code = rng.choice(
            [(429, ""), (429, "insufficient_quota"), (500, ""), (503, ""), (400, "context_length_exceeded")]
        )
        first = ("status", code, _q(rng.uniform(0.0, 3.0)), error_code)
    if kind in ("status", "connect") and rng.random() < 0.5:  # transient: a retry succeeds (or fails again)
        return (first, rng.choice([ok(), first]), ok())
    return (first,)


def generate(seed: int) -> Scenario:
    rng = random.Random(seed)
    profile = rng.choices(["calm", "busy", "faulty", "chaos"], [2, 3, 3, 2])[0]
    users = rng.randint(1, 6)
    channels = rng.choice([0, 1, 1, 2])
    size = rng.choices(["tiny", "small", "medium", "large"], [2, 4, 3, 1])[0]
    count = {
        "tiny": rng.randint(1, 3),
        "small": rng.randint(3, 10),
        "medium": rng.randint(10, 25),
        "large": rng.randint(25, 45),
    }[size]
    span = rng.choice([5.0, 30.0, 120.0, 400.0, 900.0])
    slots = rng.choice([1, 2, 3, 5, 100, 100])
    slack_latency = rng.choice([0.0, 0.0, 0.0, 0.01, 0.1, 0.5])

    messages: list[Msg] = []
    for i in range(count):
        roots = [m for m in messages if m.root is None]
        if roots and rng.random() < 0.4:  # a follow-up in an existing thread
            root = rng.choice(roots)
            gap = rng.choice([0.0, 0.25, 1.0, 3.0, 10.0, 30.0, 120.0, 320.0, 600.0])
            at = _q(root.at + gap * rng.uniform(0.5, 1.5))
            if root.place == "dm":
                msg = Msg(i, at, root.user, "dm", root=root.id)
            else:
                mention = rng.random() < 0.5
                msg = Msg(
                    i,
                    at,
                    rng.randrange(users),
                    "channel",
                    root.channel,
                    root.id,
                    mention,
                    twin=mention and rng.random() < 0.8,
                )
        else:
            at = _q(rng.uniform(0, span))
            user = rng.randrange(users)
            if channels and rng.random() < 0.4:
                msg = Msg(i, at, user, "channel", rng.randrange(channels), twin=rng.random() < 0.8)
            else:
                msg = Msg(i, at, user, "dm")
        if rng.random() < 0.2:
            msg = replace(msg, delay=rng.choice([0.25, 0.5, 1.0, 2.0, 5.0]))
        if rng.random() < 0.15:
            msg = replace(msg, dup=rng.choice([0.0, 0.25, 1.0, 3.0, 10.0, 60.0, 400.0]))
        messages.append(replace(msg, ai=_ai_plan(rng, profile)))

    end = max([m.at for m in messages] + [span])
    deliveries = sorted({m.at + m.delay for m in messages})

    def moment(upto: float) -> float:
        """A random instant; often exactly when an event is delivered, so that a fault
        and an envelope race in the same instant (the scheduler seed picks the order)."""
        if deliveries and rng.random() < 0.3:
            return rng.choice(deliveries)
        return _q(rng.uniform(0, upto))

    faults: list[Fault] = []
    n_faults = {"calm": 0, "busy": rng.randint(0, 3), "faulty": rng.randint(2, 8), "chaos": rng.randint(6, 16)}[profile]
    for _ in range(n_faults):
        at = moment(end + 30)
        kind = rng.choices(["slack", "socket", "storage"], [5, 3, 2])[0]
        if kind == "slack":
            method = rng.choices(SLACK_METHODS, [4, 5, 2, 2, 2, 1, 1, 1, 1])[0]
            status = rng.choice([429, 429, 500, 502, 503])
            if status == 429:
                faults.append(Fault(at, "slack", method, 429, _q(rng.uniform(0.25, 1.0)) or GRID, rng.randint(1, 3)))
            else:
                faults.append(Fault(at, "slack", method, status, times=rng.randint(1, 2)))
        elif kind == "socket":
            target = rng.choices(
                ["warning", "refresh_requested", "link_disabled", "too_many_websockets", "drop", "silence", "refuse"],
                [3, 4, 1, 1, 3, 2, 1],
            )[0]
            faults.append(Fault(at, "socket", target, times=rng.randint(1, 3) if target == "refuse" else 1))
        else:
            faults.append(
                Fault(
                    at,
                    "storage",
                    rng.choice(STORE_METHODS),
                    error=rng.choice(["database or disk is full", "database is locked"]),
                    times=rng.randint(1, 2),
                )
            )
    r = rng.random()
    if profile != "calm" and r < 0.55:  # a SIGTERM or a crash at a random moment
        kind = "crash" if r < 0.3 else "sigterm"
        at = moment(end + 10)
        restart = rng.choice([0.25, 1.0, 5.0, 30.0, 120.0])
        if kind == "sigterm" and rng.random() < 0.3:
            restart = None  # and it stays down: what arrives later is never acked
        faults.append(Fault(at, kind, restart_after=restart))
        if rng.random() < 0.2 and restart is not None:  # and a second one after the restart
            kind2 = rng.choice(["crash", "sigterm"])
            faults.append(
                Fault(_q(at + restart + rng.uniform(0, 60)), kind2, restart_after=rng.choice([0.25, 5.0, 30.0]))
            )
    native = rng.random() < 0.7
    # Slack's weather, drawn from a stream of its own (so the rest of a seed's world is what
    # it was before these existed): Web API outages, posts Slack made but answered 5xx for,
    # streams Slack ends by itself, and answers whose text the bot must transform.
    messages, weather = _weather(random.Random(f"{seed}:weather"), profile, messages, end, native)
    faults.extend(weather)
    # Replicas, from a stream of their own too: most seeds stay the one process they were.
    replicas, replica_timeout, replica_faults = _replicas(random.Random(f"{seed}:replicas"), profile, messages, end)
    faults.extend(replica_faults)
    faults.sort(key=lambda f: f.at)
    return Scenario(
        seed,
        users,
        channels,
        slots,
        slack_latency,
        tuple(messages),
        tuple(faults),
        native,
        replicas=replicas,
        replica_timeout=replica_timeout,
        note=f"profile {profile}, size {size}" + (f", {replicas} replicas" if replicas > 1 else ""),
    )


REPLICA_SHARE = 0.2  # of the seeds run several replicas at once


def _replicas(rng: random.Random, profile: str, messages: list[Msg], end: float) -> tuple[int, float, list[Fault]]:
    """How many replicas a seed runs (2–3 in REPLICA_SHARE of the seeds, else 1), their
    REPLICA_TIMEOUT_SECONDS (short, so that takeovers happen within a scenario), and the
    replica faults: kills (restarting under the same id or a new one), pauses around a
    lease's lifetime and partitions from storage, often while a request is answering."""
    if rng.random() >= REPLICA_SHARE:
        return 1, 30.0, []
    replicas = rng.choice([2, 2, 3])
    timeout = rng.choice([10.0, 15.0, 30.0])
    starts = sorted({m.at + m.delay for m in messages})

    def moment() -> float:
        if starts and rng.random() < 0.6:  # while something answers
            return _q(rng.choice(starts) + rng.uniform(0.0, 6.0))
        return _q(rng.uniform(0, end + 30))

    faults: list[Fault] = []
    n_faults = {"calm": 0, "busy": rng.randint(1, 2), "faulty": rng.randint(1, 3), "chaos": rng.randint(2, 4)}[profile]
    for _ in range(n_faults):
        target = f"r{rng.randrange(replicas)}"
        kind = rng.choices(["crash", "sigterm", "pause", "partition"], [3, 1, 3, 2])[0]
        if kind in ("crash", "sigterm"):
            restart = rng.choice([0.25, 5.0, 30.0, 120.0, None if kind == "sigterm" else 60.0])
            faults.append(Fault(moment(), kind, target, restart_after=restart, new_id=rng.random() < 0.5))
        elif kind == "pause":
            seconds = rng.choice([1.0, timeout / 2, timeout * 1.5, timeout * 3, 150.0])
            faults.append(Fault(moment(), "pause", target, seconds=_q(seconds)))
        else:
            seconds = rng.choice([1.0, timeout / 2, timeout * 2, 90.0])
            faults.append(Fault(moment(), "partition", target, seconds=_q(seconds)))
    return replicas, timeout, faults


def _weather(
    rng: random.Random, profile: str, messages: list[Msg], end: float, native: bool
) -> tuple[list[Msg], list[Fault]]:
    counts = {  # (outages, posts made but answered 5xx, streams ended by Slack): upper bounds
        "calm": (0, 0, 0),
        "busy": (1, 1, 2),
        "faulty": (2, 2, 2),
        "chaos": (3, 3, 3),
    }[profile]
    chance = {"calm": 0.0, "busy": 0.35, "faulty": 0.6, "chaos": 0.85}[profile]
    deliveries = sorted({m.at + m.delay for m in messages})

    def moment(upto: float) -> float:
        if deliveries and rng.random() < 0.3:
            return rng.choice(deliveries)
        return _q(rng.uniform(0, upto))

    faults: list[Fault] = []
    for _ in range(counts[0]):
        if rng.random() < chance:
            faults.append(
                Fault(
                    moment(end + 30),
                    "outage",
                    status=rng.choice([503, 503, 502, 500]),
                    seconds=max(0.5, _q(rng.uniform(0.5, 20.0))),
                )
            )
    for _ in range(counts[1]):
        if rng.random() < chance:
            faults.append(
                Fault(
                    moment(end + 30),
                    "slack",
                    "chat.postMessage",
                    rng.choice([500, 502, 503]),
                    times=rng.choice([1, 1, 2]),
                    after=True,
                )
            )
    dms = [m for m in messages if m.place == "dm"]
    for _ in range(counts[2]):
        if native and dms and rng.random() < chance:
            m = rng.choice(dms)
            step = m.ai[0]
            horizon = step[1] + step[2] * step[3] + 3.0 if step[0] == "ok" else 60.0
            faults.append(Fault(_q(m.at + m.delay + rng.uniform(0.25, horizon)), "end_stream", f"m{m.id}"))
    out = []
    for m in messages:  # a few answers with text the bot must transform
        r = rng.random()
        variant = "broadcast" if r < 0.04 else "long" if r < 0.06 else ""
        if variant and m.ai[-1][0] == "ok":
            m = replace(m, ai=(*m.ai[:-1], (*m.ai[-1][:4], variant)))
        out.append(m)
    return out, faults


# ---- shrinking ------------------------------------------------------------------------


def without_messages(s: Scenario, ids: set[int]) -> Scenario:
    """Drop messages (and the follow-ups of a dropped thread's first message)."""
    drop = set(ids)
    drop |= {m.id for m in s.messages if m.root in drop}
    return replace(s, messages=tuple(m for m in s.messages if m.id not in drop))


def shrink_candidates(s: Scenario):
    """Smaller variants of `s`, most aggressive first (for a greedy shrinker)."""
    # 1. whole groups
    if s.faults:
        yield replace(s, faults=())
    if len(s.messages) > 1:
        half = len(s.messages) // 2
        yield without_messages(s, {m.id for m in s.messages[half:]})
        yield without_messages(s, {m.id for m in s.messages[:half]})
    # 2. one fault at a time
    for i in range(len(s.faults)):
        yield replace(s, faults=s.faults[:i] + s.faults[i + 1 :])
    # 3. one message at a time (with its follow-ups if it starts a thread)
    for m in s.messages:
        yield without_messages(s, {m.id})
    # 4. simpler worlds
    if s.users > 1:
        yield replace(s, users=1, messages=tuple(replace(m, user=0) for m in s.messages))
    if s.channels > 1:
        yield replace(s, channels=1, messages=tuple(replace(m, channel=0) for m in s.messages))
    if s.slack_latency:
        yield replace(s, slack_latency=0.0)
    if s.slots != 100:
        yield replace(s, slots=100)
    if s.native:
        yield replace(s, native=False)
    if s.replicas > 1:
        yield replace(s, replicas=s.replicas - 1)  # (a fault for a replica gone is skipped)
    # 5. plainer messages
    for i, m in enumerate(s.messages):
        simpler = []
        if m.ai != (OK_PLAIN,):
            simpler.append(replace(m, ai=(OK_PLAIN,)))
        if len(m.ai) > 1:
            simpler.append(replace(m, ai=m.ai[:1]))
        if any(len(step) > 4 for step in m.ai):
            simpler.append(replace(m, ai=tuple(step[:4] for step in m.ai)))
        if m.dup is not None:
            simpler.append(replace(m, dup=None))
        if m.delay:
            simpler.append(replace(m, delay=0.0))
        if m.twin:
            simpler.append(replace(m, twin=False))
        for new in simpler:
            yield replace(s, messages=(*s.messages[:i], new, *s.messages[i + 1 :]))
    # 6. earlier: the whole scenario moved to start at 0
    first = min([m.at for m in s.messages] + [f.at for f in s.faults], default=0.0)
    if first > 0:
        yield replace(
            s,
            messages=tuple(replace(m, at=_q(m.at - first)) for m in s.messages),
            faults=tuple(replace(f, at=_q(f.at - first)) for f in s.faults),
        )
    # 7. plainer faults
    for i, f in enumerate(s.faults):
        if f.times > 1:
            yield replace(s, faults=(*s.faults[:i], replace(f, times=1), *s.faults[i + 1 :]))
        if f.after:
            yield replace(s, faults=(*s.faults[:i], replace(f, after=False), *s.faults[i + 1 :]))
        if f.kind == "outage" and f.seconds > 0.5:
            yield replace(
                s, faults=(*s.faults[:i], replace(f, seconds=max(0.5, _q(f.seconds / 2))), *s.faults[i + 1 :])
            )
        if f.kind in ("sigterm", "crash") and f.restart_after not in (None, 0.25):
            yield replace(s, faults=(*s.faults[:i], replace(f, restart_after=0.25), *s.faults[i + 1 :]))
        if f.new_id:
            yield replace(s, faults=(*s.faults[:i], replace(f, new_id=False), *s.faults[i + 1 :]))
        if f.kind in ("pause", "partition") and f.seconds > 1.0:
            yield replace(
                s, faults=(*s.faults[:i], replace(f, seconds=max(1.0, _q(f.seconds / 2))), *s.faults[i + 1 :])
            )


def size(s: Scenario) -> tuple:
    """How big a scenario is (the shrinker only accepts strictly smaller ones)."""
    plain = (
        sum(m.ai != (OK_PLAIN,) for m in s.messages)
        + sum(len(m.ai) for m in s.messages)
        + sum(len(step) > 4 for m in s.messages for step in m.ai)
    )
    extras = sum((m.dup is not None) + bool(m.delay) + m.twin for m in s.messages)
    return (
        len(s.messages) + len(s.faults),
        plain
        + extras
        + sum(f.times for f in s.faults)
        + s.users
        + s.channels
        + (s.slack_latency > 0)
        + (s.slots != 100)
        + s.native
        + sum(f.restart_after not in (None, 0.25) for f in s.faults)
        + sum(f.after for f in s.faults)
        + (s.replicas - 1)
        + sum(f.new_id for f in s.faults),
        sum(m.at for m in s.messages) + sum(f.at + f.seconds for f in s.faults),
    )
