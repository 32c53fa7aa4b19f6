"""Files to and from Slack: resolve a message's file objects, download their bytes
safely, and upload a file into a thread with Slack's current three-step flow.

Downloads:
- a truncated file object (`{"id": …, "file_access": "check_file_info"}`, as Slack
  Connect and some Socket Mode events send) is completed with `files.info`;
- the declared `size` is checked before anything is downloaded, and the bytes are
  counted while streaming (a file may be bigger than it said);
- the bot token goes only to Slack's file host or SLACK_API_URL's origin
  (`SlackWebAPI.open_file` enforces it); redirects are followed by hand, each target
  checked again, so a redirect can never carry the token elsewhere;
- Slack answers a download without a valid token or the `files:read` scope with its
  HTML sign-in page and HTTP 200: HTML where a file was expected becomes a clear
  "add the files:read scope" line instead of being fed to the model.

Uploads (`files.upload` is retired): `files.getUploadURLExternal` → POST the bytes to the
returned URL (no token) → `files.completeUploadExternal` with `channel_id` + `thread_ts`.
Slack discards uploads that are never completed, so a request cancelled before the last
step leaves nothing behind; the last step is shielded (and bounded) so that once it is
sent we always learn whether the file was posted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import anyio
import httpx2

from bot.downloads import MB, read_capped
from bot.file_problem import FileProblem
from bot.processing.documents import sniff
from bot.slack.web_api import NotSlackFileHost, SlackAPIError, SlackWebAPI

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
COMPLETE_TIMEOUT = 15.0
REDIRECTS = frozenset({301, 302, 303, 307, 308})
SCOPE_MISSING = (
    "could not be downloaded: Slack sent its sign-in page instead of the file. The bot's token is "
    "missing the `files:read` scope; an admin needs to add it under **OAuth & Permissions** and "
    "reinstall the app"
)


@dataclass(frozen=True)
class SlackFile:
    id: str
    name: str
    mimetype: str
    filetype: str
    size: int | None  # as Slack declares it
    url: str  # url_private_download, else url_private
    mode: str  # hosted, snippet, post, external, tombstone, …
    hidden: bool = False  # hidden_by_limit (the workspace's plan hides older files)


def _file_from_object(obj: dict[str, Any]) -> SlackFile:
    size = obj.get("size")
    name = obj.get("name") or obj.get("title") or obj.get("id") or "file"
    return SlackFile(
        id=str(obj.get("id", "")),
        name=str(name),
        mimetype=str(obj.get("mimetype") or ""),
        filetype=str(obj.get("filetype") or ""),
        size=size if isinstance(size, int) and size >= 0 else None,
        url=str(obj.get("url_private_download") or obj.get("url_private") or ""),
        mode=str(obj.get("mode") or "hosted"),
        hidden=bool(obj.get("hidden_by_limit")),
    )


async def resolve_file(slack: SlackWebAPI, obj: dict[str, Any]) -> SlackFile:
    """The complete file; `files.info` when the event gave only a stub. Raises FileProblem."""
    if obj.get("file_access") == "check_file_info" or (
        obj.get("id")
        and not (
            obj.get("url_private") or obj.get("url_private_download") or obj.get("mode") in ("tombstone", "external")
        )
    ):
        try:
            body = await slack.call("files.info", file=str(obj.get("id", "")))
        except SlackAPIError as exc:
            if exc.error == "missing_scope":
                raise FileProblem(
                    "could not be read: the bot's token is missing the `files:read` scope; an admin "
                    "needs to add it under **OAuth & Permissions** and reinstall the app",
                    "missing_scope",
                ) from None
            if exc.error in ("file_not_found", "file_deleted"):
                raise FileProblem("is no longer available on Slack", "gone") from None
            raise FileProblem(f"could not be looked up on Slack (`{exc.error}`)", "files_info_failed") from None
        found = body.get("file")
        obj = found if isinstance(found, dict) else {}
    return _file_from_object(obj)


def check_declared(file: SlackFile, max_bytes: int) -> None:
    """Refuse before downloading: too big, empty, deleted, external, or without a URL."""
    if file.mode == "tombstone":
        raise FileProblem("was deleted", "gone")
    if file.hidden:
        raise FileProblem("is hidden by the workspace's plan limits, so I can't read it", "hidden")
    if file.mode == "external":
        raise FileProblem("is stored outside Slack (an external link), so I can't read it", "external")
    if file.size is not None and file.size > max_bytes:
        raise FileProblem(
            f"is {file.size / MB:,.1f} MB, over the {max_bytes / MB:g} MB limit, so I did not download it", "too_large"
        )
    if file.size == 0:
        raise FileProblem("is empty", "empty")
    if not file.url:
        raise FileProblem("has no download link in Slack's event", "no_url")


def _expects_html(file: SlackFile) -> bool:
    return (
        file.filetype.lower() in ("html", "htm")
        or file.mimetype.lower() == "text/html"
        or file.name.lower().endswith((".html", ".htm"))
    )


async def download_file(slack: SlackWebAPI, file: SlackFile, *, max_bytes: int) -> bytes:
    """The file's bytes, at most `max_bytes`. Raises FileProblem with a reason for the user."""
    check_declared(file, max_bytes)
    url = file.url
    for _hop in range(MAX_REDIRECTS + 1):
        try:
            async with slack.open_file(url) as response:
                if response.status_code in REDIRECTS:
                    location = response.headers.get("location", "")
                    target = str(response.url.join(location)) if location else ""
                    if not target or not slack.is_slack_file_url(target):
                        host = httpx2.URL(target).host if target else "nowhere"
                        log.warning("download of file %s redirected off Slack's file host (to %s)", file.id, host)
                        raise FileProblem(SCOPE_MISSING, "login_page")
                    url = target
                    continue
                if response.status_code in (401, 403):
                    raise FileProblem(SCOPE_MISSING, "login_page")
                if response.status_code in (404, 410):
                    raise FileProblem("is no longer available on Slack", "gone")
                if response.status_code != 200:
                    raise FileProblem(
                        f"could not be downloaded from Slack (HTTP {response.status_code})", "download_failed"
                    )
                content_type = response.headers.get("content-type", "").lower()
                data = await read_capped(response, max_bytes)
        except NotSlackFileHost:
            log.warning("file %s has a URL outside Slack's file host; not downloaded with the token", file.id)
            raise FileProblem(
                "is not hosted on Slack's file server, so I did not download it", "foreign_host"
            ) from None
        except (SlackAPIError, httpx2.HTTPError) as exc:
            log.warning("download of file %s failed: %s", file.id, exc)
            raise FileProblem(
                "could not be downloaded from Slack (a network error); please try again", "download_failed"
            ) from None
        if not _expects_html(file) and (content_type.startswith("text/html") or sniff(data) == "html"):
            log.warning("download of file %s returned an HTML page (missing files:read scope?)", file.id)
            raise FileProblem(SCOPE_MISSING, "login_page")
        if not data:
            raise FileProblem("is empty", "empty")
        return data
    raise FileProblem("could not be downloaded: Slack redirected too many times", "download_failed")


async def upload_to_thread(
    slack: SlackWebAPI,
    *,
    channel: str,
    thread_ts: str,
    filename: str,
    data: bytes,
    title: str,
    comment: str = "",
    alt_text: str = "",
) -> str:
    """Post `data` as a file in the thread; returns its file id. Raises SlackAPIError.

    The file appears only at the last step, which runs once the bytes are uploaded,
    shielded and bounded: a cancellation before it leaves no file (Slack discards
    uncompleted uploads), and one during it is held off until Slack has answered."""
    body = await slack.call(
        "files.getUploadURLExternal", filename=filename, length=len(data), alt_txt=alt_text[:1000] or None
    )
    upload_url, file_id = str(body.get("upload_url") or ""), str(body.get("file_id") or "")
    if not upload_url or not file_id:
        raise SlackAPIError("files.getUploadURLExternal", "bad_response: no upload_url")
    await slack.post_upload(upload_url, data, filename=filename)
    completed = False
    with anyio.CancelScope(shield=True), anyio.move_on_after(COMPLETE_TIMEOUT):
        await slack.call(
            "files.completeUploadExternal",
            files=[{"id": file_id, "title": title[:250]}],
            channel_id=channel,
            thread_ts=thread_ts,
            initial_comment=comment or None,
        )
        completed = True
    if not completed:
        raise SlackAPIError("files.completeUploadExternal", "timeout")
    return file_id
