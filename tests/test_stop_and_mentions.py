"""The agent view's Stop button (`agent_session_stopped`), on Trio and asyncio, and the
broadcast-mention filter for model output (`neutralize_broadcasts` / `stable_length`)."""

from __future__ import annotations

import random
import re

import anyio
import pytest

from bot.processing.failures import INTERRUPTED_NOTICE, STOPPED_NOTICE
from bot.slack.events import StopRequest, parse_stop
from bot.slack.markdown import WORD_JOINER, neutralize_broadcasts, stable_length
from bot.storage import open_store
from tests.fakes.openai import Behaviour
from tests.harness import eventually, running_bot, send_dm, wait_reply

WJ = WORD_JOINER
LONG_ANSWER = " ".join(f"word{i}" for i in range(100))


def methods(slack) -> list[str]:
    return [m for m, _ in slack.calls]


def stop_event(channel: str, thread_ts: str | None, streams: list[str] | None = None, user: str = "U1") -> dict:
    """Shaped as docs.slack.dev/reference/events/agent_session_stopped shows it."""
    event = {"type": "agent_session_stopped", "channel": channel, "user": user, "streaming_message_ts": streams or []}
    if thread_ts is not None:
        event["thread_ts"] = thread_ts
    return event


def stopped_count(nursery) -> float:
    value = nursery.services.metrics.registry.get_sample_value("slackbot_requests_total", {"outcome": "stopped"})
    return value or 0.0


# ---- the Stop button, in-process against the fakes ----------------------------------------


@pytest.mark.anyio
async def test_stop_ends_a_native_stream_promptly_with_the_stopped_notice(slack, ai):
    ai.enqueue(Behaviour(text=LONG_ANSWER, chunks=100, chunk_delay=0.1))  # ~10 s in full
    async with running_bot(slack, ai, native_streaming=True, async_timeout_seconds=30) as nursery:
        _, ev = await send_dm(slack, "tell me a long story")
        await slack.wait_until(lambda: "chat.appendStream" in methods(slack))
        assert len(nursery.active) == 1 and ai.open_streams == 1
        stream_ts = slack.messages["D1"][-1]["ts"]
        slack.end_stream("D1", stream_ts)  # Slack stops the stream itself when the user clicks
        stopped_at = anyio.current_time()
        eid = await slack.send_app_event(stop_event("D1", ev["ts"], [stream_ts]))
        await slack.wait_acked(eid)
        replies = await wait_reply(slack, "D1", ev["ts"], STOPPED_NOTICE, timeout=3)
        await eventually(lambda: not nursery.active, timeout=3)
        assert anyio.current_time() - stopped_at < 2.0
        await ai.wait_until(lambda: ai.open_streams == 0, timeout=2)
        assert nursery.outcomes.get("stopped") == 1 and "interrupted" not in nursery.outcomes
        assert stopped_count(nursery) == 1
        assert [b["value"] for b in slack.buttons("D1", stream_ts) if b["action_id"] == "try_again"] == [ev["ts"]]
    (reply,) = replies
    assert reply.endswith(STOPPED_NOTICE) and reply.startswith("word0")  # what was written stays
    assert "word99" not in reply and INTERRUPTED_NOTICE not in reply
    assert slack.messages["D1"][-1]["ts"] == stream_ts  # in the same message, nothing new posted
    assert ai.open_streams == 0


@pytest.mark.anyio
async def test_stop_by_thread_alone_stops_a_channel_answer(slack, ai):
    ai.enqueue(Behaviour(text=LONG_ANSWER, chunks=100, chunk_delay=0.1))
    async with running_bot(slack, ai, async_timeout_seconds=30) as nursery:
        mention = slack.app_mention_event("C1", "U1", "a long one please")
        await slack.send_event(mention)
        await slack.wait_until(lambda: any("word0" in r for r in slack.bot_replies("C1", mention["ts"])))
        await slack.send_app_event(stop_event("C1", mention["ts"]))  # no stream: an empty list
        replies = await wait_reply(slack, "C1", mention["ts"], STOPPED_NOTICE, timeout=3)
        await eventually(lambda: not nursery.active, timeout=3)
        await ai.wait_until(lambda: ai.open_streams == 0, timeout=2)
        assert nursery.outcomes.get("stopped") == 1 and stopped_count(nursery) == 1
    assert len(replies) == 1 and "word99" not in replies[0]


@pytest.mark.anyio
async def test_stop_found_by_its_streaming_message_alone(slack, ai):
    ai.enqueue(Behaviour(text=LONG_ANSWER, chunks=100, chunk_delay=0.1))
    async with running_bot(slack, ai, native_streaming=True, async_timeout_seconds=30) as nursery:
        _, ev = await send_dm(slack, "story")
        await slack.wait_until(lambda: "chat.appendStream" in methods(slack))
        stream_ts = slack.messages["D1"][-1]["ts"]
        await slack.send_app_event(stop_event("D1", None, [stream_ts]))
        await wait_reply(slack, "D1", ev["ts"], STOPPED_NOTICE, timeout=3)
        await eventually(lambda: not nursery.active, timeout=3)
        assert nursery.outcomes.get("stopped") == 1


@pytest.mark.anyio
async def test_stop_elsewhere_or_with_nothing_running_changes_nothing(slack, ai):
    ai.enqueue(Behaviour(text="slow but sure", chunks=5, chunk_delay=0.2))
    async with running_bot(slack, ai) as nursery:
        idle = await slack.send_app_event(stop_event("D9", "1.000001"))  # nothing runs there
        await slack.wait_acked(idle)
        _, ev = await send_dm(slack, "keep going")
        await ai.wait_until(lambda: ai.open_streams == 1)
        other = await slack.send_app_event(stop_event("D1", "9.999999", ["9.999998"]))  # another thread
        await slack.wait_acked(other)
        wrong_channel = await slack.send_app_event(stop_event("D2", ev["ts"]))
        await slack.wait_acked(wrong_channel)
        malformed = await slack.send_app_event({"type": "agent_session_stopped", "thread_ts": ev["ts"]})
        await slack.wait_acked(malformed)
        replies = await wait_reply(slack, "D1", ev["ts"], "slow but sure")
        await eventually(lambda: nursery.outcomes.get("answered") == 1)
        assert "stopped" not in nursery.outcomes and stopped_count(nursery) == 0
    assert replies == ["slow but sure"]
    assert not slack.bot_replies("D9", "1.000001")


@pytest.mark.anyio
async def test_a_stopped_thread_takes_the_next_message(slack, ai):
    ai.enqueue(Behaviour(text=LONG_ANSWER, chunks=100, chunk_delay=0.1))
    async with running_bot(slack, ai, async_timeout_seconds=30) as nursery:
        _, ev = await send_dm(slack, "first")
        await ai.wait_until(lambda: ai.open_streams == 1)
        await slack.send_app_event(stop_event("D1", ev["ts"]))
        await wait_reply(slack, "D1", ev["ts"], STOPPED_NOTICE, timeout=3)
        await eventually(lambda: not nursery.active and nursery.gates.held == 0, timeout=3)
        _, _ev2 = await send_dm(slack, "second", thread_ts=ev["ts"])
        await wait_reply(slack, "D1", ev["ts"], "Echo: second")
        await eventually(lambda: nursery.outcomes.get("answered") == 1)
        assert nursery.outcomes.get("stopped") == 1
    assert ai.requests[-1]["messages"][-1]["content"] == "second"


@pytest.mark.anyio
async def test_a_stopped_request_is_closed_in_storage(slack, ai, tmp_path):
    ai.enqueue(Behaviour(text=LONG_ANSWER, chunks=100, chunk_delay=0.1))
    store = await open_store(f"sqlite:///{tmp_path}/bot.db")
    try:
        async with running_bot(slack, ai, store=store, async_timeout_seconds=30) as nursery:
            _, ev = await send_dm(slack, "first")
            await ai.wait_until(lambda: ai.open_streams == 1)
            await slack.send_app_event(stop_event("D1", ev["ts"]))
            await eventually(lambda: nursery.outcomes.get("stopped") == 1, timeout=3)
            await eventually(lambda: not nursery.active, timeout=3)
            assert await store.in_flight() == []  # closed: a restart will not overwrite "Stopped."
    finally:
        await store.aclose()


# ---- parse_stop ---------------------------------------------------------------------------


def _payload(event: dict) -> dict:
    return {"type": "event_callback", "team_id": "T1", "event_id": "Ev1", "event": event}


def test_parse_stop_reads_the_documented_payload():
    event = {
        "channel": "C0123ABC456",
        "event_ts": "1783536983.783769",
        "streaming_message_ts": ["1782234987.693923"],
        "thread_ts": "1782234671.392669",
        "type": "agent_session_stopped",
        "user": "U123ABC456",
    }
    assert parse_stop(_payload(event)) == StopRequest(
        "C0123ABC456", "1782234671.392669", ("1782234987.693923",), "U123ABC456"
    )


def test_parse_stop_is_defensive():
    assert parse_stop(_payload({"type": "message", "channel": "C1", "ts": "1.0"})) is None
    assert parse_stop("nonsense") is None and parse_stop({"event": "x"}) is None
    assert parse_stop(
        _payload({"type": "agent_session_stopped", "channel_id": "D1", "thread_ts": "1.0"})
    ) == StopRequest("D1", "1.0", ())
    assert parse_stop(
        _payload({"type": "agent_session_stopped", "channel": "D1", "streaming_message_ts": "2.0"})
    ) == StopRequest("D1", "", ("2.0",))
    assert parse_stop(
        _payload(
            {
                "type": "agent_session_stopped",
                "channel": "D1",
                "message_ts": "3.0",
                "streaming_message_ts": [None, 5, "2.0"],
            }
        )
    ) == StopRequest("D1", "", ("2.0", "3.0"))
    # Malformed (no channel, or nothing to find the request by): an empty channel, for the log.
    assert parse_stop(_payload({"type": "agent_session_stopped", "thread_ts": "1.0"})).channel == ""
    assert (
        parse_stop(_payload({"type": "agent_session_stopped", "channel": "D1", "streaming_message_ts": []})).channel
        == ""
    )
    assert parse_stop(_payload({"type": "agent_session_stopped", "channel": 5, "thread_ts": "1.0"})).channel == ""


# ---- neutralize_broadcasts ----------------------------------------------------------------


LIVE = re.compile(
    r"<!(?:channel|here|everyone|group|subteam)|(?<![\w])@(?:channel|here|everyone)(?![\w])", re.IGNORECASE
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("<!channel>", f"@{WJ}channel"),
        ("<!here>", f"@{WJ}here"),
        ("<!everyone>", f"@{WJ}everyone"),
        ("<!group>", f"@{WJ}channel"),
        ("<!here|here>", f"@{WJ}here"),
        ("<!channel|@channel>", f"@{WJ}channel"),
        ("<!HERE>", f"@{WJ}here"),
        ("<!subteam^S123>", f"@{WJ}S123"),
        ("<!subteam^S1|@devs>", f"@{WJ}devs"),
        ("<!subteam^S1|devs>", f"@{WJ}devs"),
        ("<!subteam^S1|@devs @here>", f"@{WJ}devs @{WJ}here"),
        ("@channel", f"@{WJ}channel"),
        ("@here", f"@{WJ}here"),
        ("@everyone", f"@{WJ}everyone"),
        ("@Here, look", f"@{WJ}Here, look"),
        ("(@here)", f"(@{WJ}here)"),
        ("hi <!here> and @channel!", f"hi @{WJ}here and @{WJ}channel!"),
        # Not Slack's syntax, but still never a ping: the `<!` is broken, the text kept.
        ("<!channel foo>", f"<{WJ}!channel foo>"),
        ("<!subteam>", f"<{WJ}!subteam>"),
        ("<!here", f"<{WJ}!here"),
        ("<!subteam^S1|a<b>", f"<{WJ}!subteam^S1|a<b>"),
        ("<!subteam^S1|<!here>>", f"<{WJ}!subteam^S1|@{WJ}here>"),
    ],
)
def test_broadcasts_become_readable_and_inert(raw, expected):
    assert neutralize_broadcasts(raw) == expected
    assert not LIVE.search(neutralize_broadcasts(raw))


@pytest.mark.parametrize(
    "text",
    [
        "<@U123> and <@U456|bob>",
        "<#C123|general>",
        "<https://example.com|a link>",
        "<!date^1392734382^{date}|Feb 18>",
        "mail me at name@here.com",
        "@channels and @hereby and @everyones",
        "@herd",
        "a @ b",
        "<!-- html -->",
        "x < y > z",
        "plain text",
        "",
        "`code` and ```fenced```",
        f"@{WJ}here already",
        f"<{WJ}!channel>",
    ],
)
def test_everything_else_is_left_alone(text):
    assert neutralize_broadcasts(text) == text


def test_neutralizing_twice_changes_nothing():
    text = "<!channel> <!subteam^S1|@devs> @here <!here text> <!everyone"
    once = neutralize_broadcasts(text)
    assert neutralize_broadcasts(once) == once


def test_long_unclosed_openers_are_defused_not_held_forever():
    text = "<!subteam^S1|" + "x" * 300
    assert stable_length(text) == len(text)
    assert neutralize_broadcasts(text) == f"<{WJ}!" + text[2:]
    assert neutralize_broadcasts(text + ">").startswith(neutralize_broadcasts(text))


@pytest.mark.parametrize(
    ("text", "held_from"),
    [
        ("hello <", 6),
        ("hello <!", 6),
        ("hello <!cha", 6),
        ("hello <!channel", 6),
        ("hello <!subteam^S1|@de", 6),
        ("hello @", 6),
        ("hello @her", 6),
        ("hello @here", 6),
        ("hello @everyon", 6),
        ("hello <x", 8),
        ("hello <!x", 9),
        ("hello @herd", 11),
        ("hello @here.", 12),
        ("hello <!here>", 13),
        ("me@", 3),
        ("<!date^1|x", 10),
    ],
)
def test_stable_length_holds_back_only_what_may_still_change(text, held_from):
    assert stable_length(text) == held_from


SAMPLE = (
    "Hi <@U123>! <!channel> please read. <!here|here> too, and <!everyone>; ping <!subteam^S1|@devs> "
    "and <!subteam^S2>, not name@here.com. Bare @here, @channel and @everyone, but not @channels. "
    "<!channel bogus> <!date^1|d> <!group> end @here"
)


def _assert_streams_like_the_whole(text: str, cuts: list[int]) -> None:
    """Feed `text` in pieces as a streaming writer would: neutralize the stable prefix of
    what has arrived, send only what is new. The result must equal the whole text's."""
    sent = ""
    previous = 0
    for cut in [*cuts, len(text)]:
        arrived = text[:cut]
        k = stable_length(arrived)
        assert previous <= k <= len(arrived)
        previous = k
        out = neutralize_broadcasts(arrived[:k])
        assert out.startswith(sent), (arrived, sent, out)
        sent = out
    assert neutralize_broadcasts(text).startswith(sent)  # the final write completes what was sent


def test_every_split_of_the_sample_is_prefix_stable():
    whole = neutralize_broadcasts(SAMPLE)
    assert not LIVE.search(whole)
    assert "<@U123>" in whole and "name@here.com" in whole and "@channels" in whole
    assert whole.count(WJ) == 11
    for p in range(len(SAMPLE) + 1):
        head = SAMPLE[:p]
        k = stable_length(head)
        stable = neutralize_broadcasts(head[:k])
        assert whole.startswith(stable), p
        if k == len(head):  # a fully stable text: any continuation keeps its form as a prefix
            for more in ("", ">", "here>", "channel", "x", " @", "<!", SAMPLE[p:]):
                assert neutralize_broadcasts(head + more).startswith(neutralize_broadcasts(head)), (p, more)
        _assert_streams_like_the_whole(SAMPLE, [p])
    _assert_streams_like_the_whole(SAMPLE, list(range(len(SAMPLE) + 1)))  # one character at a time


def test_random_texts_are_prefix_stable_and_never_ping():
    pieces = [
        "<",
        "!",
        ">",
        "|",
        "@",
        "^",
        " ",
        "\n",
        "x",
        "e",
        "channel",
        "here",
        "everyone",
        "group",
        "subteam",
        "subteam^S1",
        "<!",
        "<@U1>",
        "<!here>",
        "@here",
        "<!subteam^S9|@team>",
        "a@",
        "ch",
        "her",
    ]
    rng = random.Random(20240611)
    for _ in range(1500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        out = neutralize_broadcasts(text)
        assert not LIVE.search(out), (text, out)
        assert neutralize_broadcasts(out) == out
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 6))))
        _assert_streams_like_the_whole(text, cuts)
        for p in cuts:
            head = text[:p]
            stable = neutralize_broadcasts(head[: stable_length(head)])
            more = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
            assert neutralize_broadcasts(head + more).startswith(stable), (head, more)
