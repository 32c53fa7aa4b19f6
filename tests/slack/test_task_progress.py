"""Processing's tasks ("Reading report.pdf", "Drawing"…) as Slack's task cards in a native
stream, on Trio and asyncio: `task_update` chunks in chat.appendStream, one id per task
going from "in_progress" to "complete" or "error", the thread status as the fallback
wherever chunks cannot go, and the answer's text intact in every case.

Every chunk the bot sends is checked against the fake's rules (`check_chunks`: types,
required fields, statuses, lengths) and against slack_sdk's own chunk models."""

from __future__ import annotations

import io

import anyio
import httpx2
import pytest

from bot.slack.answer_surface import TASK_TITLE_CHARS, SlackAnswerWriter, task_title
from bot.slack.web_api import SlackWebAPI
from bot.terminal_reply import TerminalWriter
from tests import media_samples as samples
from tests.fakes.openai import Behaviour, last_user_text
from tests.fakes.slack import CHUNK_TEXT_LIMIT, MARKDOWN_TEXT_LIMIT, FakeSlack, check_chunks
from tests.harness import eventually, running_bot, wait_reply

pytestmark = pytest.mark.anyio

STREAM_METHODS = ("chat.startStream", "chat.appendStream", "chat.stopStream")


async def send_files(slack: FakeSlack, text: str, files: list[dict], *, channel: str = "D1") -> dict:
    event = slack.message_event(
        channel, "U1", text, channel_type="im", subtype="file_share" if files else None, files=files or None
    )
    await slack.send_event(event)
    return event


async def done(nursery, slack: FakeSlack, thread_ts: str, contains: str) -> list[str]:
    await wait_reply(slack, "D1", thread_ts, contains, timeout=15)
    await eventually(lambda: not nursery.active, timeout=15)
    return slack.bot_replies("D1", thread_ts)


def stream_ts(slack: FakeSlack, thread_ts: str) -> str:
    [ts] = [m["ts"] for m in slack.thread_messages("D1", thread_ts) if "task_display_mode" in m]
    return ts


def tasks(slack: FakeSlack, ts: str) -> list[tuple[str, str]]:
    """(title, final status) of each card of the message, in the order they appeared."""
    return [(task["title"], task["status"]) for task in slack.stream_tasks.get(("D1", ts), {}).values()]


def history(slack: FakeSlack, ts: str) -> dict[str, list[str]]:
    """Each card's statuses, update by update."""
    seen: dict[str, list[str]] = {}
    for _, message_ts, task_id, status in slack.task_updates:
        if message_ts == ts:
            seen.setdefault(task_id, []).append(status)
    return seen


def chunk_calls(slack: FakeSlack) -> list[tuple[str, dict]]:
    return [(m, a) for m, a in slack.calls if m in STREAM_METHODS and "chunks" in a]


def assert_chunks_are_slacks(slack: FakeSlack) -> None:
    """Every chunk the bot sent: valid by the fake's rules, within Slack's limits, and
    the same object when read back through slack_sdk's models."""
    chunk_models = pytest.importorskip("slack_sdk.models.messages.chunk")
    for _, args in chunk_calls(slack):
        chunks = args["chunks"]
        assert check_chunks(chunks) == chunks
        assert sum(len(c["text"]) for c in chunks if c["type"] == "markdown_text") <= MARKDOWN_TEXT_LIMIT
        assert "markdown_text" not in args  # one streaming mode: text goes as chunks beside them
        for chunk in chunks:
            assert chunk["type"] in ("markdown_text", "task_update")
            assert chunk_models.Chunk.parse(chunk).to_dict() == chunk
            if chunk["type"] == "task_update":
                assert 0 < len(chunk["title"]) <= CHUNK_TEXT_LIMIT
                assert chunk["status"] in ("in_progress", "complete", "error")


# ---------------------------------------------------------------- the bot, native


async def test_a_document_read_is_a_task_card_that_ends_complete(slack, ai):
    pdf = slack.add_file("report.pdf", samples.pdf_with_pages(["Alpha revenue 42", "Beta costs 7"]))
    slack.latency["files"] = 0.3  # slow enough for a tick to send the card while it runs
    async with running_bot(slack, ai, native_streaming=True) as nursery:
        ev = await send_files(slack, "summarise this", [pdf])
        replies = await done(nursery, slack, ev["ts"], "Echo: summarise this")
    ts = stream_ts(slack, ev["ts"])
    assert tasks(slack, ts) == [("Reading report.pdf", "complete")]
    assert list(history(slack, ts).values()) == [["in_progress", "complete"]]
    expected = "Echo: " + last_user_text(ai.requests[0])
    assert "Beta costs 7" in expected
    assert replies == [expected]  # the text intact, streamed as markdown_text chunks beside the card
    assert "".join(slack.stream_appends[("D1", ts)]) == expected
    assert ("D1", ev["ts"], "is reading report.pdf…") not in slack.statuses  # the card shows it instead
    assert ("D1", ev["ts"], "is thinking…") in slack.statuses
    called = [m for m, _ in slack.calls]
    assert called.count("chat.startStream") == 1 and called.count("chat.stopStream") == 1
    assert "chat.update" not in called and "chat.postMessage" not in called
    assert_chunks_are_slacks(slack)


async def test_a_file_that_cannot_be_read_ends_as_error(slack, ai):
    files = [
        slack.add_file("secret.pdf", samples.encrypted_pdf()),
        slack.add_file("scores.csv", samples.csv_bytes()),
        slack.add_file("archive.zip", b"PK\x03\x04whatever"),  # refused before downloading: no task
    ]
    async with running_bot(slack, ai, native_streaming=True) as nursery:
        ev = await send_files(slack, "compare", files)
        [reply] = await done(nursery, slack, ev["ts"], "Echo: compare")
    ts = stream_ts(slack, ev["ts"])
    assert tasks(slack, ts) == [("Reading secret.pdf", "error"), ("Reading scores.csv", "complete")]
    assert "**secret.pdf** is password-protected" in reply and "**archive.zip**" in reply
    assert reply.startswith("Echo: compare") and "ada,91" in reply
    assert_chunks_are_slacks(slack)


async def test_an_image_drawn_is_two_task_cards(slack, ai):
    ai.enqueue(Behaviour(tool_calls=[("generate_image", {"prompt": "a red fox in the snow"})]))
    ai.image_queue.append(Behaviour(latency=0.3))
    async with running_bot(slack, ai, native_streaming=True) as nursery:
        ev = await send_files(slack, "draw me a fox", [])
        await done(nursery, slack, ev["ts"], "Echo: draw me a fox")
        await eventually(lambda: len(slack.uploads) == 1)
    ts = stream_ts(slack, ev["ts"])
    assert tasks(slack, ts) == [("Drawing", "complete"), ("Posting the image", "complete")]
    assert history(slack, ts)["task-1"] == ["in_progress", "complete"]  # seen while it was drawing
    assert slack.visible_text("D1", ts) == "Echo: draw me a fox"
    assert ("D1", ev["ts"], "is drawing…") not in slack.statuses
    assert_chunks_are_slacks(slack)


async def test_a_refused_drawing_ends_as_error_and_is_said(slack, ai):
    ai.enqueue(Behaviour(tool_calls=[("generate_image", {"prompt": "something"})]))
    ai.image_queue.append(
        Behaviour(status=400, error_code="moderation_blocked", text="Your request was rejected by the safety system.")
    )
    async with running_bot(slack, ai, native_streaming=True) as nursery:
        ev = await send_files(slack, "draw something", [])
        [reply] = await done(nursery, slack, ev["ts"], "refused to draw this")
    assert tasks(slack, stream_ts(slack, ev["ts"])) == [("Drawing", "error")]
    assert reply.startswith("Echo: draw something")
    assert slack.uploads == []


async def test_a_timeout_while_reading_ends_the_task_as_error(slack, ai):
    pdf = slack.add_file("report.pdf", samples.pdf_with_pages(["hello"]))
    slack.latency["files"] = 3.0
    async with running_bot(slack, ai, native_streaming=True, async_timeout_seconds=0.6) as nursery:
        ev = await send_files(slack, "read this", [pdf])
        [reply] = await done(nursery, slack, ev["ts"], "did not finish within")
    ts = stream_ts(slack, ev["ts"])
    assert tasks(slack, ts) == [("Reading report.pdf", "error")]
    assert not slack.is_streaming("D1", ts)
    assert ai.requests == [] and "did not finish within 0.6 seconds" in reply
    assert_chunks_are_slacks(slack)


# ---------------------------------------------------------------- fallbacks


@pytest.mark.parametrize("code", ["invalid_chunks", "invalid_arguments"])
async def test_refused_chunks_fall_back_to_the_status_and_the_text_still_streams(slack, ai, code):
    slack.refuse_chunks = code
    pdf = slack.add_file("report.pdf", samples.pdf_with_pages(["Alpha revenue 42"]))
    slack.latency["files"] = 0.3
    async with running_bot(slack, ai, native_streaming=True) as nursery:
        ev = await send_files(slack, "summarise this", [pdf])
        replies = await done(nursery, slack, ev["ts"], "Echo: summarise this")
    ts = stream_ts(slack, ev["ts"])
    assert replies == ["Echo: " + last_user_text(ai.requests[0])]
    assert len(chunk_calls(slack)) == 1  # refused once, then given up for this answer
    assert slack.stream_tasks == {}
    assert ("D1", ev["ts"], "is reading report.pdf…") in slack.statuses  # today's status line
    assert "".join(slack.stream_appends[("D1", ts)]) == replies[0]  # native stream, markdown_text
    called = [m for m, _ in slack.calls]
    assert "chat.update" not in called and "chat.postMessage" not in called


async def test_task_chunks_skipped_on_a_low_budget_show_as_the_status(slack, ai):
    """appendStream's budget below half: the card's update is skipped (an interim call,
    not queued), the status shows the task meanwhile, and chat.stopStream — a final
    write — carries its last state."""
    pdf = slack.add_file("report.pdf", samples.pdf_with_pages(["Alpha revenue 42"]))
    slack.latency["files"] = 0.4
    async with running_bot(slack, ai, native_streaming=True) as nursery:
        bucket = nursery.services.slack.limits.bucket("chat.appendStream")

        async def keep_it_low() -> None:
            while True:
                while bucket.available():
                    bucket.reserve()
                await anyio.sleep(0.02)

        async with anyio.create_task_group() as tg:
            tg.start_soon(keep_it_low)
            ev = await send_files(slack, "summarise this", [pdf])
            replies = await done(nursery, slack, ev["ts"], "Echo: summarise this")
            tg.cancel_scope.cancel()
    ts = stream_ts(slack, ev["ts"])
    assert "chat.appendStream" not in [m for m, _ in slack.calls]
    assert ("D1", ev["ts"], "is reading report.pdf…") in slack.statuses
    assert tasks(slack, ts) == [("Reading report.pdf", "complete")]  # from chat.stopStream
    assert replies == ["Echo: " + last_user_text(ai.requests[0])]
    assert_chunks_are_slacks(slack)


async def test_update_mode_is_unchanged_statuses_and_no_chunks(slack, ai):
    pdf = slack.add_file("report.pdf", samples.pdf_with_pages(["Alpha revenue 42"]))
    slack.latency["files"] = 0.3
    ai.enqueue("Read it.", Behaviour(tool_calls=[("generate_image", {"prompt": "a chart"})]))
    ai.image_queue.append(Behaviour(latency=0.3))
    slack.latency["files.completeUploadExternal"] = 0.3  # so "Posting the image…" shows too
    threads = []
    for text, files, reply in [("summarise this", [pdf], "Read it."), ("draw a chart", [], "Echo: draw a chart")]:
        # A bot each (a fresh chat.update budget: interim edits are skipped while it is low).
        async with running_bot(slack, ai, native_streaming=False) as nursery:
            ev = await send_files(slack, text, files)
            await done(nursery, slack, ev["ts"], reply)
            threads.append(ev["ts"])
    shown = [
        t for ts in threads for m in slack.thread_messages("D1", ts) for t in slack.updates.get(("D1", m["ts"]), [])
    ]
    for status in ("_Reading report.pdf…_", "_Drawing…_", "_Posting the image…_"):
        assert any(status in t for t in shown), (status, shown)
    assert ("D1", threads[0], "is reading report.pdf…") in slack.statuses
    assert ("D1", threads[1], "is drawing…") in slack.statuses
    assert not any(m in STREAM_METHODS for m, _ in slack.calls) and slack.stream_tasks == {}


# ---------------------------------------------------------------- the writer itself


async def _writer(slack: FakeSlack, http: httpx2.AsyncClient, **kwargs) -> SlackAnswerWriter:
    api = SlackWebAPI(
        bot_token=slack.bot_token, app_token=slack.app_token, base_url="http://slack.test/api/", client=http
    )
    ts = slack.add_user_message("D1", "U1", "hi")
    return SlackAnswerWriter(api, "D1", ts, mode="native", interval=0.02, **kwargs)


async def _tick(writer: SlackAnswerWriter, seconds: float = 0.1) -> None:
    with anyio.move_on_after(seconds):
        await writer.run()


def _sequence(slack: FakeSlack, ts: str) -> list[str]:
    """The stream as Slack lays it out: text, and each card where it first appeared."""
    out: list[str] = []
    for chunk in slack.stream_chunks[("D1", ts)]:
        if chunk["type"] == "markdown_text":
            if out and not out[-1].startswith("[card "):
                out[-1] += chunk["text"]
            else:
                out.append(chunk["text"])
        elif f"[card {chunk['title']}]" not in out:
            out.append(f"[card {chunk['title']}]")
    return out


async def test_cards_sit_where_their_task_began_in_the_text():
    slack = FakeSlack()
    async with httpx2.AsyncClient(transport=httpx2.MockTransport(slack.handle)) as http:
        writer = await _writer(slack, http)
        early = writer.begin_task("Reading a.pdf")  # before the stream is open: it waits for it
        ts = await writer.start()
        writer.end_task(early)
        await _tick(writer)
        writer.append("First part. ")
        await _tick(writer)
        drawing = writer.begin_task("Drawing")
        writer.append("Second part.")
        writer.end_task(drawing, ok=False)
        writer.begin_task("Never ended")
        assert await writer.finish("_(a notice)_")
    assert _sequence(slack, ts) == [
        "[card Reading a.pdf]",
        "First part. ",
        "[card Drawing]",
        "Second part.",
        "[card Never ended]",
        "\n\n_(a notice)_",
    ]
    assert tasks(slack, ts) == [("Reading a.pdf", "complete"), ("Drawing", "error"), ("Never ended", "error")]
    assert slack.visible_text("D1", ts) == "First part. Second part.\n\n_(a notice)_"
    assert not slack.is_streaming("D1", ts) and writer.cards_fell_back == ""
    assert_chunks_are_slacks(slack)


async def test_no_cards_once_text_went_as_markdown_text():
    """Slack keeps a stream to the mode it started with: after plain markdown_text, a task
    is the status line (not visible once the answer is: as before)."""
    slack = FakeSlack()
    async with httpx2.AsyncClient(transport=httpx2.MockTransport(slack.handle)) as http:
        writer = await _writer(slack, http)
        ts = await writer.start()
        writer.append("Sure, drawing it now. ")
        await _tick(writer)
        task = writer.begin_task("Drawing")
        assert writer._shown_status() == "_Drawing…_"
        await _tick(writer)
        writer.end_task(task)
        writer.append("Here it is.")
        assert await writer.finish()
    assert chunk_calls(slack) == [] and slack.stream_tasks == {}
    assert slack.visible_text("D1", ts) == "Sure, drawing it now. Here it is."


async def test_a_stop_that_refuses_the_chunks_is_sent_again_without_them():
    slack = FakeSlack()
    async with httpx2.AsyncClient(transport=httpx2.MockTransport(slack.handle)) as http:
        writer = await _writer(slack, http)
        ts = await writer.start()
        task = writer.begin_task("Reading a.pdf")
        await _tick(writer)
        writer.end_task(task)
        writer.append("The answer.")
        slack.fail_next("chat.stopStream", error="invalid_chunks")
        assert await writer.finish()
    stops = [a for m, a in slack.calls if m == "chat.stopStream"]
    assert [c["type"] for c in stops[0]["chunks"]] == ["task_update", "markdown_text"]
    assert [c["type"] for c in stops[1]["chunks"]] == ["markdown_text"]  # still chunks: the stream's mode
    assert slack.visible_text("D1", ts) == "The answer."
    assert tasks(slack, ts) == [("Reading a.pdf", "in_progress")]  # Slack kept no later state
    assert writer.cards_fell_back.startswith("chat.stopStream refused them")


async def test_an_unknown_argument_refusal_on_the_first_chunk_keeps_the_text_native():
    slack = FakeSlack()
    async with httpx2.AsyncClient(transport=httpx2.MockTransport(slack.handle)) as http:
        writer = await _writer(slack, http)
        ts = await writer.start()
        writer.append("Hello ")
        task = writer.begin_task("Reading a.pdf")
        slack.fail_next("chat.appendStream", error="invalid_arg_name")
        await _tick(writer)
        assert writer._shown_status() == "_Reading a.pdf…_"  # the status line shows it now
        writer.end_task(task)
        writer.append("world")
        assert await writer.finish()
    assert slack.visible_text("D1", ts) == "Hello world"
    assert slack.stream_tasks == {} and writer.fell_back == ""


async def test_an_append_that_fails_for_the_stream_still_closes_the_cards():
    """A stream given up mid-answer (here: Slack expired it) is rewritten with chat.update;
    the cards it showed were closed by the stop, and later tasks are the status line."""
    slack = FakeSlack()
    async with httpx2.AsyncClient(transport=httpx2.MockTransport(slack.handle)) as http:
        writer = await _writer(slack, http)
        ts = await writer.start()
        running = writer.begin_task("Reading a.pdf")
        await _tick(writer)
        writer.append("Partial answer")
        slack.fail_next("chat.appendStream", error="internal_error")
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            await eventually(lambda: writer.fell_back != "")
            later = writer.begin_task("Drawing")
            assert writer._shown_status() == "_Drawing…_"
            writer.end_task(later)
            writer.end_task(running)
            tg.cancel_scope.cancel()
        assert await writer.finish()
    assert tasks(slack, ts) == [("Reading a.pdf", "error")]  # closed by the stop, still running then
    assert slack.visible_text("D1", ts) == "Partial answer"


async def test_without_cards_a_task_is_the_status_line_as_set_status_made_it():
    """Placeholder and thread status show what they showed before tasks existed: each
    task's line from its beginning until the next one or the next status."""
    slack = FakeSlack()
    async with httpx2.AsyncClient(transport=httpx2.MockTransport(slack.handle)) as http:
        api = SlackWebAPI(
            bot_token=slack.bot_token, app_token=slack.app_token, base_url="http://slack.test/api/", client=http
        )
        writer = SlackAnswerWriter(api, "D1", slack.add_user_message("D1", "U1", "hi"), mode="update")
        seen = [writer._shown_status()]
        first = writer.begin_task("Reading a.pdf")
        seen.append(writer._shown_status())
        writer.end_task(first, ok=False)
        seen.append(writer._shown_status())
        writer.end_task(writer.begin_task("Reading b.csv"))
        seen.append(writer._shown_status())
        writer.set_status("_Thinking…_")
        seen.append(writer._shown_status())
    assert seen == ["_Thinking…_", "_Reading a.pdf…_", "_Reading a.pdf…_", "_Reading b.csv…_", "_Thinking…_"]


def test_task_titles_fit_a_card():
    assert task_title("Reading   report.pdf\n") == "Reading report.pdf"
    long = task_title("Reading " + "x" * 400)
    assert len(long) == TASK_TITLE_CHARS <= CHUNK_TEXT_LIMIT and long.endswith("…")
    assert task_title("  ") == "Working"


# ---------------------------------------------------------------- the terminal


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_the_terminal_prints_a_task_as_its_status_line():
    out, err = io.StringIO(), _Tty()
    writer = TerminalWriter(out, status_out=err)
    async with anyio.create_task_group() as tg:
        await writer.start()
        tg.start_soon(writer.run)
        await anyio.sleep(0.05)
        task = writer.begin_task("Reading report.pdf")
        await anyio.sleep(0.05)
        writer.end_task(task, ok=False)
        writer.end_task(task)  # again: ignored
        await anyio.sleep(0.05)
        writer.append("Answer.")
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert await writer.finish()
    assert err.getvalue().splitlines() == ["(Thinking…)", "(Reading report.pdf…)"]  # as set_status showed it
    assert out.getvalue() == "Answer.\n\n"
