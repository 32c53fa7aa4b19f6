"""Slack file download and upload against FakeSlack (real httpx2 client, real wire format),
on both backends: where the token may go, size caps, sign-in pages, files.info for
stubs, and the three-step upload that only posts once everything is ready."""

from __future__ import annotations

import math

import anyio
import anyio.lowlevel
import httpx2
import pytest

from bot.file_problem import FileProblem
from bot.slack.files import download_file, resolve_file, upload_to_thread
from bot.slack.web_api import SlackAPIError, SlackWebAPI
from tests import media_samples as samples
from tests.fakes.slack import FakeSlack

pytestmark = pytest.mark.anyio

MB = 1024 * 1024


@pytest.fixture
async def api(slack):
    async with httpx2.AsyncClient(transport=httpx2.MockTransport(slack.handle)) as client:
        yield SlackWebAPI(
            bot_token=slack.bot_token, app_token=slack.app_token, base_url="http://slack.test/api/", client=client
        )


async def test_token_hosts(api):
    assert api.is_slack_file_url("https://files.slack.com/files-pri/T1-F1/x.png")
    assert api.is_slack_file_url("https://files.slack.com:443/files-pri/T1-F1/x.png")
    assert api.is_slack_file_url("http://slack.test/files-pri/T1-F1/x.png")  # SLACK_API_URL's origin
    for url in (
        "http://files.slack.com/x",
        "https://files.slack.com.evil.example/x",
        "https://evil.example/x",
        "https://slack.com/x",
        "http://slack.test:8080/x",
        "https://slack.test/x",
        "not a url",
        "",
    ):
        assert not api.is_slack_file_url(url), url


async def problem(api, file, max_bytes=20 * MB) -> FileProblem:
    with pytest.raises(FileProblem) as caught:
        await download_file(api, await resolve_file(api, file), max_bytes=max_bytes)
    return caught.value


async def test_download_carries_the_token_and_returns_the_bytes(slack, api):
    data = samples.pdf_with_pages(["x"])
    file = slack.add_file("a.pdf", data)
    assert await download_file(api, await resolve_file(api, file), max_bytes=MB) == data
    assert slack.downloads == [
        {
            "file_id": file["id"],
            "url": file["url_private_download"],
            "authorization": "Bearer xoxb-test-token",
            "served": "file",
        }
    ]


async def test_a_file_bigger_than_it_declared_is_cut_off(slack, api):
    file = slack.add_file("liar.png", b"\x89PNG" + b"\0" * 5000, size=100)
    assert (await problem(api, file, max_bytes=1000)).kind == "too_large"


async def test_declared_size_over_the_limit_is_refused_without_a_download(slack, api):
    file = slack.add_file("big.mov", b"x", size=21 * MB)
    found = await problem(api, file)
    assert found.kind == "too_large" and "21.0 MB, over the 20 MB limit" in found.reason
    assert slack.downloads == []


async def test_missing_files_read_scope(slack, api):
    slack.file_scope = False
    file = slack.add_file("a.csv", samples.csv_bytes())
    assert (await problem(api, file)).kind == "login_page"
    assert slack.downloads[0]["served"] == "sign-in page"
    stub = FakeSlack.truncated(slack.add_file("b.csv", samples.csv_bytes()))
    assert "`files:read` scope" in (await problem(api, stub)).reason  # files.info says missing_scope


async def test_an_html_file_is_not_mistaken_for_a_sign_in_page(slack, api):
    page = b"<!DOCTYPE html><html><body>hello</body></html>"
    file = slack.add_file("page.html", page)
    assert await download_file(api, await resolve_file(api, file), max_bytes=MB) == page


async def test_stubs_deleted_and_external_files(slack, api):
    full = slack.add_file("a.csv", samples.csv_bytes())
    resolved = await resolve_file(api, FakeSlack.truncated(full))
    assert resolved.url == full["url_private_download"] and resolved.size == len(samples.csv_bytes())
    assert (await problem(api, {"id": "F404", "file_access": "check_file_info"})).kind == "gone"
    assert (await problem(api, {"id": "F1", "name": "x", "mode": "tombstone"})).kind == "gone"
    external = {**full, "mode": "external", "is_external": True}
    assert (await problem(api, external)).kind == "external"


async def test_upload_posts_the_file_in_the_thread_without_the_token(slack, api):
    parent = slack.add_user_message("C1", "U1", "draw please")
    file_id = await upload_to_thread(
        api,
        channel="C1",
        thread_ts=parent,
        filename="fox.png",
        data=samples.png_bytes(),
        title="A fox",
        comment="_a fox_",
        alt_text="a fox",
    )
    [upload] = slack.uploads
    assert upload["file"]["id"] == file_id and upload["channel"] == "C1" and upload["thread_ts"] == parent
    assert upload["bytes"] == samples.png_bytes() and upload["alt_txt"] == "a fox"
    assert [p["authorization"] for p in slack.upload_posts] == [""]
    [message] = [m for m in slack.thread_messages("C1", parent) if m.get("files")]
    assert message["text"] == "_a fox_" and message["files"][0]["title"] == "A fox"
    methods = [m for m, _ in slack.calls]
    assert methods == ["files.getUploadURLExternal", "files.completeUploadExternal"]


async def test_cancelled_before_the_last_step_posts_nothing(slack, api):
    slack.latency["files"] = math.inf  # the byte upload hangs
    parent = slack.add_user_message("C1", "U1", "draw")
    with anyio.move_on_after(0.2) as scope:
        await upload_to_thread(api, channel="C1", thread_ts=parent, filename="x.png", data=b"12345", title="x")
    assert scope.cancelled_caught
    assert slack.uploads == [] and not any(m.get("files") for m in slack.thread_messages("C1", parent))
    assert "files.completeUploadExternal" not in [m for m, _ in slack.calls]


async def test_the_last_step_is_not_cut_by_a_cancellation(slack, api):
    slack.latency["files.completeUploadExternal"] = 0.3
    parent = slack.add_user_message("C1", "U1", "draw")
    with anyio.move_on_after(0.1) as scope:  # fires while Slack is completing
        file_id = await upload_to_thread(
            api, channel="C1", thread_ts=parent, filename="x.png", data=b"12345", title="x"
        )
        assert file_id  # it returns: the file was posted, so the caller can record it
        await anyio.lowlevel.checkpoint()  # the caller's next checkpoint is where the cancellation lands
        pytest.fail("the cancellation should land at the next checkpoint")
    assert scope.cancelled_caught
    assert len(slack.uploads) == 1  # posted, and we waited to know it


async def test_upload_refused_by_slack_raises(slack, api):
    slack.fail_next("files.getUploadURLExternal", error="missing_scope")
    with pytest.raises(SlackAPIError) as caught:
        await upload_to_thread(api, channel="C1", thread_ts="1.0", filename="x.png", data=b"1", title="x")
    assert caught.value.error == "missing_scope"
