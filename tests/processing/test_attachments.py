"""Images and documents end to end, in-process, on Trio and asyncio: the real bot against
FakeSlack (file downloads with bearer-token checks, the upload flow) and FakeOpenAI
(vision requests, tool calls, images/generations and images/edits)."""

from __future__ import annotations

import base64
import io
import math

import anyio
import httpx2
import pytest
from PIL import Image

from bot.processing.image_tools import DRAWING_STATUS, EDITING_STATUS
from bot.storage import ThreadKey
from tests import media_samples as samples
from tests.fakes.openai import Behaviour, image_parts, last_user_text
from tests.fakes.servers import http_server
from tests.fakes.slack import FakeSlack
from tests.harness import eventually, running_bot, wait_reply

pytestmark = pytest.mark.anyio

MB = 1024 * 1024


async def send_files(
    slack: FakeSlack, text: str, files: list[dict], *, thread_ts: str | None = None, channel: str = "D1"
) -> dict:
    """A user's DM with files attached (subtype file_share), delivered over Socket Mode."""
    event = slack.message_event(
        channel,
        "U1",
        text,
        thread_ts=thread_ts,
        channel_type="im",
        subtype="file_share" if files else None,
        files=files or None,
    )
    await slack.send_event(event)
    return event


async def done(
    nursery, slack: FakeSlack, channel: str, thread_ts: str, contains: str, *, timeout: float = 10.0
) -> list[str]:
    """Wait for a reply containing `contains`, then for the request to end (the thread
    takes one message at a time: a follow-up sent earlier would get the busy reply)."""
    replies = await wait_reply(slack, channel, thread_ts, contains, timeout=timeout)
    await eventually(lambda: not nursery.active, timeout=timeout)
    return slack.bot_replies(channel, thread_ts) or replies


def shown_texts(slack: FakeSlack, channel: str, thread_ts: str) -> list[str]:
    """Every text any bot message in the thread showed (placeholder states included)."""
    texts = []
    for message in slack.thread_messages(channel, thread_ts):
        texts.extend(slack.updates.get((channel, message["ts"]), []))
    return texts


def decoded(data_url: str) -> Image.Image:
    header, b64 = data_url.split(",", 1)
    assert header.startswith("data:image/") and header.endswith(";base64")
    return Image.open(io.BytesIO(base64.b64decode(b64)))


async def test_attached_image_reaches_the_model_and_stays_in_the_thread(slack, ai):
    photo = slack.add_file("photo.jpg", samples.jpeg_bytes((3000, 2000)))
    async with running_bot(slack, ai) as nursery:
        ev = await send_files(slack, "what is in this picture?", [photo])
        await done(nursery, slack, "D1", ev["ts"], "Echo: what is in this picture?")
        await send_files(slack, "and what colour is it?", [], thread_ts=ev["ts"])
        await done(nursery, slack, "D1", ev["ts"], "Echo: and what colour is it?")
    first, second = ai.requests
    [url] = image_parts(first)
    image = decoded(url)
    assert image.format == "JPEG" and max(image.size) <= 2048 and min(image.size) <= 768  # downscaled
    assert "1. photo.jpg — attached by the user (with this message)" in last_user_text(first)
    # The follow-up still shows the model the earlier image, from storage (no second download).
    assert len(image_parts(second)) == 1
    assert [d["served"] for d in slack.downloads] == ["file"]
    assert slack.downloads[0]["authorization"] == f"Bearer {slack.bot_token}"
    assert "[attached image: photo.jpg]" in second["messages"][1]["content"]


async def test_earlier_images_are_kept_within_max_context_images(slack, ai):
    async with running_bot(slack, ai, max_context_images=2) as nursery:
        ev = await send_files(slack, "one", [slack.add_file("a.png", samples.png_bytes(color=(255, 0, 0)))])
        await done(nursery, slack, "D1", ev["ts"], "Echo: one")
        for n, name in enumerate(["b.png", "c.png"], start=2):
            await send_files(slack, f"more {n}", [slack.add_file(name, samples.png_bytes())], thread_ts=ev["ts"])
            await done(nursery, slack, "D1", ev["ts"], f"Echo: more {n}")
        await send_files(slack, "which images?", [], thread_ts=ev["ts"])
        await done(nursery, slack, "D1", ev["ts"], "Echo: which images?")
    last = ai.requests[-1]
    assert len(image_parts(last)) == 2
    listing = last_user_text(last)
    assert "1. b.png — attached by the user (earlier in this thread)" in listing
    assert "2. c.png — attached by the user (earlier in this thread)" in listing and "a.png —" not in listing


async def test_animated_gif_uses_its_first_frame_and_says_so(slack, ai):
    gif = slack.add_file("dance.gif", samples.animated_gif(frames=4))
    async with running_bot(slack, ai) as nursery:
        ev = await send_files(slack, "what moves?", [gif])
        replies = await done(nursery, slack, "D1", ev["ts"], "Echo: what moves?")
    assert "**dance.gif** is animated: I looked at its first frame only" in replies[-1]
    assert decoded(image_parts(ai.requests[0])[0]).size == (40, 30)


async def test_documents_are_read_labelled_and_kept_with_the_thread(slack, ai):
    files = [
        slack.add_file("report.pdf", samples.pdf_with_pages(["Alpha revenue 42", "Beta costs 7", "Gamma"])),
        slack.add_file("notes.docx", samples.docx_with_table()),
        slack.add_file("book.xlsx", samples.xlsx_two_sheets()),
        slack.add_file("scores.csv", samples.csv_bytes()),
        slack.add_file("config.yaml", b"retries: 3\nname: demo\n"),
    ]
    slack.latency["files"] = 0.15  # slow downloads, so the progress shows in the placeholder
    async with running_bot(slack, ai) as nursery:
        ev = await send_files(slack, "summarise these", files)
        await done(nursery, slack, "D1", ev["ts"], "Echo: summarise these", timeout=15)
        await send_files(slack, "what were the Beta costs?", [], thread_ts=ev["ts"])
        await done(nursery, slack, "D1", ev["ts"], "Echo: what were the Beta costs?")
    text = last_user_text(ai.requests[0])
    assert "[Attached file: report.pdf (PDF, 3 pages)]" in text and "Beta costs 7" in text
    assert "[End of report.pdf]" in text
    assert "North | 120" in text and "[Attached file: notes.docx (Word document, 1 table)]" in text
    assert "## Sheet: Sales" in text and "## Sheet: Costs" in text and "Rent,1500.5" in text
    assert "ada,91" in text and "retries: 3" in text
    # Kept with the thread: the follow-up's history carries the documents.
    history_user = ai.requests[1]["messages"][1]
    assert history_user["role"] == "user" and "Beta costs 7" in history_user["content"]
    shown = shown_texts(slack, "D1", ev["ts"])
    assert any("Reading report.pdf…" in t for t in shown), shown


async def test_a_long_document_is_trimmed_to_the_budget_with_a_note(slack, ai):
    pages = [f"page {i} " + "lorem ipsum dolor sit amet " * 40 for i in range(30)]
    long_pdf = slack.add_file("long.pdf", samples.pdf_with_pages(pages))
    async with running_bot(slack, ai, context_budget_tokens=6000, max_answer_tokens=1000) as nursery:
        ev = await send_files(slack, "what is this about?", [long_pdf])
        replies = await done(nursery, slack, "D1", ev["ts"], "Echo: what is this about?")
    assert "**long.pdf** is long: I could read only the first" in replies[-1]
    text = last_user_text(ai.requests[0])
    assert "long.pdf was trimmed to fit the model's context" in text
    assert "page 0 " in text and "page 29 " not in text


async def test_bad_files_each_get_a_line_and_the_rest_is_answered(slack, ai):
    files = [
        slack.add_file("secret.pdf", samples.encrypted_pdf()),
        slack.add_file("broken.pdf", samples.corrupt_pdf()),
        slack.add_file("empty.txt", b""),
        slack.add_file("photo.pdf", samples.png_bytes()),  # wrong extension
        slack.add_file("archive.zip", b"PK\x03\x04whatever"),  # unknown type
        slack.add_file("latin1.txt", "café crème".encode("latin-1")),  # undecodable
        slack.add_file("bomb.docx", samples.zip_bomb(250)),
        slack.add_file("huge.png", samples.huge_png_header()),
        slack.add_file("big.pdf", b"%PDF-1.4 tiny", size=25 * MB),  # declares 25 MB
        slack.add_file("scores.csv", samples.csv_bytes()),
    ]
    async with running_bot(slack, ai) as nursery:
        ev = await send_files(slack, "compare the scores", files)
        replies = await done(nursery, slack, "D1", ev["ts"], "Echo: compare the scores", timeout=15)
    final = replies[-1]
    expected = {
        "secret.pdf": "is password-protected",
        "broken.pdf": "is damaged",
        "empty.txt": "is empty",
        "photo.pdf": "is named like a PDF but contains a PNG image",
        "archive.zip": "can't be read: .zip files aren't supported",
        "latin1.txt": "is not UTF-8 text",
        "bomb.docx": "looks like a zip bomb",
        "huge.png": "is too large to process",
        "big.pdf": "is 25.0 MB, over the 20 MB limit, so I did not download it",
    }
    lines = final.splitlines()
    for name, reason in expected.items():
        line = next((line for line in lines if f"*{name}*" in line), "")
        assert line.startswith(":warning:") and reason in line, (name, final)
    assert "ada,91" in last_user_text(ai.requests[0])  # the good file still went to the model
    downloaded = {slack.files[d["file_id"]]["name"] for d in slack.downloads}
    assert "big.pdf" not in downloaded and "archive.zip" not in downloaded  # refused before downloading
    assert "empty.txt" not in downloaded  # declared size 0


async def test_only_unreadable_files_get_the_notes_without_a_model_call(slack, ai):
    async with running_bot(slack, ai) as nursery:
        ev = await send_files(slack, "", [slack.add_file("secret.pdf", samples.encrypted_pdf())])
        replies = await done(nursery, slack, "D1", ev["ts"], "is password-protected")
    assert replies == [
        ":warning: **secret.pdf** is password-protected (encrypted), so I can't read it; send a copy "
        "without a password."
    ]
    assert ai.requests == []


async def test_sign_in_page_instead_of_the_file_names_the_missing_scope(slack, ai):
    slack.file_scope = False
    pdf = slack.add_file("report.pdf", samples.pdf_with_pages(["hello"]))
    async with running_bot(slack, ai) as nursery:
        ev = await send_files(slack, "read this", [pdf])
        replies = await done(nursery, slack, "D1", ev["ts"], "Echo: read this")
    assert "`files:read` scope" in replies[-1] and "**report.pdf**" in replies[-1]
    assert slack.downloads[0]["served"] == "sign-in page"
    assert "<html" not in str(ai.requests[0]["messages"]).lower()


async def test_truncated_file_object_is_completed_with_files_info(slack, ai):
    full = slack.add_file("scores.csv", samples.csv_bytes())
    async with running_bot(slack, ai) as nursery:
        ev = await send_files(slack, "top score?", [FakeSlack.truncated(full)])
        await done(nursery, slack, "D1", ev["ts"], "Echo: top score?")
    assert ("files.info", {"file": full["id"]}) in slack.calls
    assert "ada,91" in last_user_text(ai.requests[0])


async def test_the_bot_token_goes_only_to_slack_file_hosts(slack, ai):
    seen: list[tuple[str, str]] = []
    original = slack.handle

    async def handle(request: httpx2.Request) -> httpx2.Response:
        seen.append((request.url.host, request.headers.get("authorization", "")))
        if request.url.path.endswith("/redirecting.png"):  # Slack's file host redirects elsewhere
            return httpx2.Response(302, headers={"Location": "https://cdn.evil.example/stolen.png"})
        return await original(request)

    slack.handle = handle
    foreign = {
        **slack.add_file("foreign.png", samples.png_bytes()),
        "url_private": "https://evil.example/a.png",
        "url_private_download": "https://evil.example/a.png",
    }
    redirecting = slack.add_file("redirecting.png", samples.png_bytes())
    redirecting["url_private_download"] = redirecting["url_private_download"].rsplit("/", 1)[0] + "/redirecting.png"
    async with running_bot(slack, ai) as nursery:
        ev = await send_files(slack, "look", [foreign, redirecting])
        replies = await done(nursery, slack, "D1", ev["ts"], "Echo: look")
    assert all("evil" not in host for host, _ in seen), seen
    assert "**foreign.png** is not hosted on Slack's file server" in replies[-1]
    assert "**redirecting.png** could not be downloaded: Slack sent its sign-in page" in replies[-1]


async def test_pasted_image_url_is_fetched_only_when_loopback_is_allowed(slack, ai):
    png = samples.png_bytes((300, 200))

    async def serve(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=png, headers={"Content-Type": "image/png"})

    async with http_server(serve) as origin:
        async with running_bot(slack, ai, allow_loopback_urls=True) as nursery:
            ev = await send_files(slack, f"what is <{origin}/cat.png>?", [])
            await done(nursery, slack, "D1", ev["ts"], "Echo: what is")
        assert len(image_parts(ai.requests[-1])) == 1
        assert f"from the link {origin}/cat.png" in last_user_text(ai.requests[-1])
        slack2 = FakeSlack()
        async with running_bot(slack2, ai) as nursery:
            ev = await send_files(slack2, f"and <{origin}/cat.png>?", [])
            replies = await done(nursery, slack2, "D1", ev["ts"], "Echo: and")
        assert "points to a private or local network address" in replies[-1]
        assert image_parts(ai.requests[-1]) == []


async def test_generate_image_tool_uploads_into_the_thread(slack, ai):
    ai.enqueue(Behaviour(tool_calls=[("generate_image", {"prompt": "a red fox in the snow"})]))
    ai.image_queue.append(Behaviour(latency=0.3))  # slow enough for the status to show
    async with running_bot(slack, ai, image_size="1536x1024", image_quality="low") as nursery:
        ev = await send_files(slack, "draw me a fox", [])
        await done(nursery, slack, "D1", ev["ts"], "Echo: draw me a fox")
        await eventually(lambda: len(slack.uploads) == 1)
    [request] = ai.image_requests
    assert request["endpoint"] == "generations" and request["prompt"] == "a red fox in the snow"
    assert request["model"] == "gpt-image-2.5-sunburst" and request["size"] == "1536x1024"
    assert request["quality"] == "low"
    tools = [t["function"]["name"] for t in ai.requests[0]["tools"]]
    assert tools == ["generate_image"]  # nothing to edit yet
    [upload] = slack.uploads
    assert upload["channel"] == "D1" and upload["thread_ts"] == ev["ts"]
    assert upload["bytes"].startswith(b"\x89PNG") and upload["comment"] == "_a red fox in the snow_"
    assert [p["authorization"] for p in slack.upload_posts] == [""]  # no token to the upload URL
    follow_up = ai.requests[1]["messages"]
    assert follow_up[-2]["tool_calls"][0]["function"]["name"] == "generate_image"
    assert follow_up[-1]["role"] == "tool" and "posted in the thread" in follow_up[-1]["content"]
    assert any(DRAWING_STATUS in t for t in shown_texts(slack, "D1", ev["ts"]))
    # The file message is in the thread, from the bot.
    assert any(m.get("files") for m in slack.thread_messages("D1", ev["ts"]))


async def test_edit_image_tool_edits_the_last_image_of_the_thread(slack, ai):
    ai.enqueue(
        Behaviour(tool_calls=[("generate_image", {"prompt": "a lighthouse"})]),
        "Here it is.",
        Behaviour(tool_calls=[("edit_image", {"prompt": "make it darker"})]),
    )
    ai.image_queue.extend([Behaviour(), Behaviour(latency=0.3)])
    async with running_bot(slack, ai) as nursery:
        ev = await send_files(slack, "draw a lighthouse", [])
        await done(nursery, slack, "D1", ev["ts"], "Here it is.")
        await send_files(slack, "make it darker", [], thread_ts=ev["ts"])
        await done(nursery, slack, "D1", ev["ts"], "Echo: make it darker")
        await eventually(lambda: len(slack.uploads) == 2)
        stored = await nursery.services.store.thread_images(ThreadKey("D1", ev["ts"]), limit=5)
    _generated, edit = ai.image_requests
    assert edit["endpoint"] == "edits" and edit["prompt"] == "make it darker"
    assert edit["image"] and edit["image_content_type"] in ("image/png", "image/jpeg")
    assert Image.open(io.BytesIO(edit["image"])).size == (96, 64)  # the generated picture, from storage
    assert [t["function"]["name"] for t in ai.requests[2]["tools"]] == ["generate_image", "edit_image"]
    assert len(image_parts(ai.requests[2])) == 1  # the model saw the picture it drew
    assert [i.source for i in stored] == ["bot", "bot"]
    # The progress is shown in the placeholder or as the thread status (both are interim
    # calls, one of them may be skipped while chat.update's budget refills).
    assert any(EDITING_STATUS in t for t in shown_texts(slack, "D1", ev["ts"])) or any(
        "editing" in status for _, _, status in slack.statuses
    )


async def test_edit_of_an_attached_image(slack, ai):
    ai.enqueue(Behaviour(tool_calls=[("edit_image", {"prompt": "remove the background", "image": 1})]))
    photo = slack.add_file("me.png", samples.png_bytes((120, 80), color=(10, 200, 10)))
    async with running_bot(slack, ai) as nursery:
        ev = await send_files(slack, "remove the background", [photo])
        await done(nursery, slack, "D1", ev["ts"], "Echo: remove the background")
        await eventually(lambda: len(slack.uploads) == 1)
    [edit] = ai.image_requests
    assert edit["endpoint"] == "edits" and Image.open(io.BytesIO(edit["image"])).size == (120, 80)


async def test_fallback_rule_when_the_endpoint_refuses_tools(slack, ai):
    ai.reject_tools = True
    async with running_bot(slack, ai) as nursery:
        ev = await send_files(slack, "draw a lighthouse at night", [])
        await done(nursery, slack, "D1", ev["ts"], "Here is the image.")
        await eventually(lambda: len(slack.uploads) == 1)
        _, ev2 = None, await send_files(slack, "what is a lighthouse?", [])
        await done(nursery, slack, "D1", ev2["ts"], "Echo: what is a lighthouse?")
        ev3 = await send_files(slack, "make it darker", [], thread_ts=ev["ts"])
        await done(nursery, slack, "D1", ev["ts"], "Here is the edited image.")
        assert nursery.services.media.tools_refused == {"gpt-5-mini"}
    assert ev3
    assert [r["endpoint"] for r in ai.image_requests] == ["generations", "edits"]
    assert ai.image_requests[0]["prompt"] == "draw a lighthouse at night"
    # Once refused, tools are not offered again: one rejected request, then plain chat.
    assert "tools" in ai.requests[0] and all("tools" not in r for r in ai.requests[1:])


async def test_images_api_refusal_is_told_to_the_user(slack, ai):
    ai.enqueue(Behaviour(tool_calls=[("generate_image", {"prompt": "something forbidden"})]))
    ai.image_queue.append(
        Behaviour(status=400, error_code="moderation_blocked", text="Your request was rejected by the safety system.")
    )
    async with running_bot(slack, ai) as nursery:
        ev = await send_files(slack, "draw something forbidden", [])
        replies = await done(nursery, slack, "D1", ev["ts"], "Echo: draw something forbidden")
    assert "The image service refused to draw this: Your request was rejected by the safety system." in replies[-1]
    assert slack.uploads == []


async def test_not_an_image_from_the_images_api_posts_nothing(slack, ai):
    ai.enqueue(Behaviour(tool_calls=[("generate_image", {"prompt": "x"})]))
    ai.image_queue.append(Behaviour(text=base64.b64encode(b"<html>nope</html>").decode()))
    async with running_bot(slack, ai) as nursery:
        ev = await send_files(slack, "draw x", [])
        replies = await done(nursery, slack, "D1", ev["ts"], "Echo: draw x")
    assert "no image was posted" in replies[-1]
    assert slack.uploads == [] and slack.upload_posts == []


async def test_text_only_messages_make_no_media_calls(slack, ai):
    async with running_bot(slack, ai) as nursery:
        ev = await send_files(slack, "just text", [])
        await done(nursery, slack, "D1", ev["ts"], "Echo: just text")
        await anyio.sleep(0.1)
    assert slack.downloads == [] and ai.image_requests == []
    assert [t["function"]["name"] for t in ai.requests[0]["tools"]] == ["generate_image"]


@pytest.mark.parametrize("where", ["download", "generation", "upload"])
async def test_the_request_deadline_covers_files_and_images(slack, ai, where):
    """A stuck download, drawing or upload costs the request its deadline: the
    placeholder gets the timeout notice and no file is half-posted."""
    if where == "download":
        slack.latency["files"] = math.inf
        files = [slack.add_file("scores.csv", samples.csv_bytes())]
    else:
        ai.enqueue(Behaviour(tool_calls=[("generate_image", {"prompt": "a fox"})]))
        files = []
        if where == "generation":
            ai.image_queue.append(Behaviour(hang=True))
        else:
            slack.latency["files"] = math.inf  # the byte upload to Slack's upload URL hangs
    async with running_bot(slack, ai, async_timeout_seconds=1.0) as nursery:
        ev = await send_files(slack, "go", files)
        replies = await done(nursery, slack, "D1", ev["ts"], "did not finish within 1 seconds")
    assert len(replies) == 1 and nursery.outcomes == {"timeout": 1}
    assert slack.uploads == [] and "files.completeUploadExternal" not in [m for m, _ in slack.calls]


async def test_a_file_name_cannot_make_the_bot_mention_anyone(slack, ai):
    sneaky = slack.add_file("<!channel> *urgent*.pdf", samples.encrypted_pdf())
    async with running_bot(slack, ai) as nursery:
        ev = await send_files(slack, "read", [sneaky])
        replies = await done(nursery, slack, "D1", ev["ts"], "Echo: read")
    assert "<!channel>" not in replies[-1] and "**!channel urgent.pdf** is password-protected" in replies[-1]


async def test_an_unavailable_image_model_is_named(slack, ai):
    ai.enqueue(Behaviour(tool_calls=[("generate_image", {"prompt": "a cat"})]))
    ai.image_queue.append(Behaviour(status=404, error_code="model_not_found"))
    async with running_bot(slack, ai, image_model="gpt-image-9") as nursery:
        ev = await send_files(slack, "draw a cat", [])
        replies = await done(nursery, slack, "D1", ev["ts"], "Echo: draw a cat")
    assert "The image model `gpt-image-9` is not available to this API key (HTTP 404)" in replies[-1]
    assert "IMAGE_MODEL" in replies[-1] and slack.uploads == []
