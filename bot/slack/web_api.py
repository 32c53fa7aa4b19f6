"""Slack Web API over httpx2 (the same HTTP stack the openai SDK uses).

One `SlackWebAPI` per process. It only ever sends a token to `SLACK_API_URL`, which
the settings insist is an http(s) URL chosen by the operator, and to Slack's file host
for downloads (`open_file` refuses any other host before sending a byte; redirects are
checked again by the caller). Upload bytes go to Slack's upload URL without the token.

Rate limits (`rate_limits.py`): every call first draws on its method's budget, shared
by the whole process; a 429 closes that method to every caller until its `Retry-After`
has passed, then the call is retried a bounded number of times. Waits sit inside the
caller's cancel scope, so a request's deadline still wins. Interim calls (`interim=True`,
the growing text of a streaming answer) never wait: they are skipped while the budget is
low (`SlackSkipped`) and not retried on a 429 — the next update or the final write
carries the same text.

Server errors: calls that are safe to repeat are retried on a 5xx or a broken connection;
`chat.postMessage` is retried too, under a marker in its message metadata — before
posting again the thread is searched for the marker, so an answer is never shown twice.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import anyio.lowlevel
import httpx2

from bot.metrics import Metrics
from bot.retrying import no_pause, retry
from bot.slack.rate_limits import SlackRateLimits

log = logging.getLogger(__name__)

# Methods whose reference says they accept JSON bodies; everything else goes form-encoded.
JSON_METHODS = frozenset(
    {
        "auth.test",
        "apps.connections.open",
        "chat.postMessage",
        "chat.update",
        "chat.delete",
        "chat.postEphemeral",
        "conversations.history",
        "views.open",
        "views.update",
        "views.publish",
        "views.push",
        "chat.startStream",
        "chat.appendStream",
        "chat.stopStream",
        "assistant.threads.setStatus",
        "assistant.threads.setSuggestedPrompts",
        "assistant.threads.setTitle",
    }
)


class SlackAPIError(Exception):
    """Slack answered `ok: false` (or not JSON at all). `error` is Slack's code.
    `transient`: a 5xx or a broken connection — Slack may or may not have acted."""

    def __init__(
        self, method: str, error: str, response: dict[str, Any] | None = None, *, transient: bool = False
    ) -> None:
        super().__init__(f"{method} failed: {error}")
        self.method = method
        self.error = error
        self.response = response or {}
        self.transient = transient


class _ServerError(SlackAPIError):
    """A 5xx (`http_response`) or a broken connection (None) from a method that may be
    tried again. It never leaves this module: once the tries are spent, `_call` turns it
    into what a method that is not retried would have raised."""

    def __init__(self, method: str, what: str, http_response: httpx2.Response | None) -> None:
        super().__init__(method, what, transient=True)
        self.http_response = http_response


class _Unconfirmed(Exception):
    """A post failed, and the thread cannot be searched for it: posting again might show
    the answer twice, so `failure` is what the caller gets."""

    def __init__(self, failure: SlackAPIError) -> None:
        super().__init__(failure.error)
        self.failure = failure


SLACK_FILE_HOST = "files.slack.com"
_DEFAULT_PORTS = {"http": 80, "https": 443}


class NotSlackFileHost(ValueError):
    """A file URL is not on Slack's file host nor SLACK_API_URL's origin, so the bot
    token must not go there."""


class SlackRateLimited(SlackAPIError):
    def __init__(self, method: str, retry_after: float) -> None:
        super().__init__(method, "ratelimited")
        self.retry_after = retry_after


class SlackSkipped(SlackAPIError):
    """An interim call was not made: its method's budget is kept for final writes."""

    def __init__(self, method: str) -> None:
        super().__init__(method, "skipped_low_budget")


# Methods that are safe to send twice (reads, and writes that set a state rather than
# add one): a 5xx or a broken connection is retried for these, a few times, quickly —
# a blip on the final chat.update must not leave an answer showing "Thinking…" forever.
# chat.postMessage is not among them: Slack may have posted before failing.
RETRY_SERVER_ERRORS = frozenset(
    {
        "chat.update",
        # Stopping twice is harmless: the second answers message_not_in_streaming_state,
        # which callers take as "stopped". A stream left open can never be edited again.
        "chat.stopStream",
        "conversations.replies",
        "conversations.history",
        "auth.test",
        "users.info",
        "assistant.threads.setStatus",
        "assistant.threads.setTitle",
    }
)
SERVER_ERROR_BACKOFF = 0.25  # seconds before the first retry; doubled for each next one
POST_ATTEMPTS = 4  # chat.postMessage tries on a 5xx / broken connection (each after a look-up)
POST_LOOKUPS = 8  # look-ups for a post's marker while Slack keeps failing (pauses 0.25 s … 4 s: ~20 s)
POST_MARKER = "slackbot_post"  # metadata event_type of our posts; event_payload.post_id is unique


def _server_error_pause(method: str, what: str, attempt: int) -> float:
    """The pause before the `attempt`th retry after a 5xx or a broken connection (logged)."""
    delay = SERVER_ERROR_BACKOFF * 2.0 ** (attempt - 1)
    log.warning("slack %s failed (%s); retrying in %.2fs (attempt %d)", method, what, delay, attempt)
    return delay


def _retry_after(response: httpx2.Response) -> float:
    try:
        return max(0.0, min(float(response.headers.get("Retry-After", "1")), 300.0))
    except ValueError:
        return 1.0


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


class SlackWebAPI:
    def __init__(
        self,
        *,
        bot_token: str,
        app_token: str,
        base_url: str = "https://slack.com/api/",
        client: httpx2.AsyncClient,
        max_rate_limit_retries: int = 6,
        metrics: Metrics | None = None,
        limits: SlackRateLimits | None = None,
    ) -> None:
        self._metrics = metrics if metrics is not None else Metrics()
        self.limits = limits if limits is not None else SlackRateLimits()
        self._bot_token = bot_token
        self._app_token = app_token
        self._base_url = base_url if base_url.endswith("/") else base_url + "/"
        self._client = client
        self._max_retries = max_rate_limit_retries

    async def call(
        self, method: str, *, app_token: bool = False, interim: bool = False, priority: bool = False, **args: Any
    ) -> dict[str, Any]:
        """Call `method` with `args`; returns the JSON body when `ok` is true. With
        `priority` (a takeover's calls) it waits for its method's budget ahead of the others.

        Raises SlackAPIError (`ok: false`, non-JSON answers, HTTP errors),
        SlackRateLimited once the retries are spent, or — with `interim` — SlackSkipped
        when the method's budget is low. `None` arguments are dropped.
        """
        args = {k: v for k, v in args.items() if v is not None}
        result = "error"
        try:
            body = await self._call(method, app_token, args, interim, priority)
            result = "ok"
            return body
        except SlackSkipped:
            result = "skipped"
            raise
        except anyio.get_cancelled_exc_class():
            result = "cancelled"
            raise
        finally:
            self._metrics.slack_calls.labels(method=method, result=result).inc()

    async def _call(
        self, method: str, app_token: bool, args: dict[str, Any], interim: bool, priority: bool = False
    ) -> dict[str, Any]:
        """One call, tried again — `max_rate_limit_retries` times at most, whatever the
        reasons — after a 429 (the budget's wait is the Retry-After; never for an interim
        call) and, for RETRY_SERVER_ERRORS, after a 5xx or a broken connection (doubling
        pauses). Once the tries are spent, a 5xx is read like any other answer."""
        channel = args.get("channel") or args.get("channel_id")
        channel = channel if isinstance(channel, str) else None

        def again(exc: SlackAPIError) -> bool:
            return isinstance(exc, _ServerError) or (isinstance(exc, SlackRateLimited) and not interim)

        def pause(n: int, exc: SlackAPIError) -> float:
            if isinstance(exc, SlackRateLimited):
                log.warning("slack %s rate limited; retrying in %.1fs (attempt %d)", method, exc.retry_after, n)
                return 0.0  # the budget's wait (in `_send`) is the Retry-After
            return _server_error_pause(method, exc.error, n)

        try:
            return await retry(
                partial(self._send, method, app_token, args, channel, interim, priority),
                errors=SlackAPIError,
                attempts=self._max_retries + 1,
                pause=pause,
                retry_if=again,
            )
        except _ServerError as exc:
            last = exc
        if last.http_response is None:
            raise SlackAPIError(method, f"http_error: {last.error}", transient=True)
        return self._read(method, last.http_response, channel)

    async def _send(
        self,
        method: str,
        app_token: bool,
        args: dict[str, Any],
        channel: str | None,
        interim: bool,
        priority: bool = False,
    ) -> dict[str, Any]:
        """One try: the budget, the request, the answer. Raises _ServerError for what a
        method of RETRY_SERVER_ERRORS may try again."""
        if interim:
            if not self.limits.try_acquire(method, channel):
                raise SlackSkipped(method)
        else:
            await self.limits.acquire(method, channel, priority=priority)
        # A cancelled caller sends nothing more (a request that lost its thread's lease,
        # say). Costs no scheduling step when not cancelled; a shielded write still goes.
        await anyio.lowlevel.checkpoint_if_cancelled()
        token = self._app_token if app_token else self._bot_token
        headers = {"Authorization": f"Bearer {token}"}
        url = self._base_url + method
        if method in JSON_METHODS:
            request = self._client.build_request(
                "POST",
                url,
                headers={**headers, "Content-Type": "application/json; charset=utf-8"},
                content=json.dumps(args).encode(),
            )
        else:
            form = {k: _form_value(v) for k, v in args.items()}
            request = self._client.build_request("POST", url, headers=headers, data=form)
        try:
            response = await self._client.send(request)
        except httpx2.HTTPError as exc:
            if method in RETRY_SERVER_ERRORS:
                raise _ServerError(method, type(exc).__name__, None) from None
            raise SlackAPIError(method, f"http_error: {type(exc).__name__}", transient=True) from None
        if response.status_code >= 500 and method in RETRY_SERVER_ERRORS:
            raise _ServerError(method, f"HTTP {response.status_code}", response)
        return self._read(method, response, channel)

    def _read(self, method: str, response: httpx2.Response, channel: str | None) -> dict[str, Any]:
        """The JSON body of an `ok` answer; raises SlackRateLimited (having closed the
        method for every caller until its Retry-After) or SlackAPIError."""
        server_error = response.status_code >= 500
        try:
            body = response.json()
        except ValueError:
            body = None
        limited = response.status_code == 429 or (isinstance(body, dict) and body.get("error") == "ratelimited")
        if limited:
            self._metrics.slack_rate_limited.labels(method=method).inc()
            delay = _retry_after(response)
            self.limits.retry_after(method, channel, delay)  # for every caller of this method
            raise SlackRateLimited(method, delay)
        if not isinstance(body, dict):
            what = "not JSON" if body is None else "not a JSON object"
            raise SlackAPIError(method, f"bad_response: HTTP {response.status_code}, {what}", transient=server_error)
        if not body.get("ok"):
            error = str(body.get("error") or f"http_{response.status_code}")
            raise SlackAPIError(method, error, body, transient=server_error)
        return body

    # Thin helpers for the calls the bot makes; they keep argument names in one place.

    async def post_message(
        self,
        channel: str,
        thread_ts: str | None,
        *,
        text: str | None = None,
        markdown_text: str | None = None,
        blocks: list[dict[str, Any]] | None = None,
        payload: dict[str, str] | None = None,
        priority: bool = False,
    ) -> str:
        """Post in a thread; returns the new message's ts. `payload` goes into the
        message's metadata beside the post's marker (an answer's receipt).

        A 5xx or a broken connection leaves it unknown whether Slack posted: each post
        carries a unique marker in its metadata, and before posting again the thread is
        searched for it — and searched again, with growing pauses, while the search
        fails too (a short outage). The post is repeated only once the search has
        answered that it is not there, so an answer is never shown twice."""
        marker = uuid.uuid4().hex
        post = partial(
            self.call,
            "chat.postMessage",
            channel=channel,
            thread_ts=thread_ts,
            text=text,
            markdown_text=markdown_text,
            blocks=blocks,
            metadata={"event_type": POST_MARKER, "event_payload": {**(payload or {}), "post_id": marker}},
            priority=priority,
        )
        if not thread_ts:  # no thread to search for the marker: one try
            return str((await post()).get("ts", ""))
        return await self._post_exactly_once(post, channel, thread_ts, marker, priority)

    async def _post_exactly_once(
        self,
        post: Callable[[], Awaitable[dict[str, Any]]],
        channel: str,
        thread_ts: str,
        marker: str,
        priority: bool = False,
    ) -> str:
        """`post()` up to POST_ATTEMPTS times; before each repeat, the thread is searched
        for `marker` (POST_LOOKUPS searches at most for the whole post, one at least
        after each failed try; the pauses before them grow)."""
        failure: SlackAPIError | None = None  # the last try's: Slack may have posted
        lookups = 0

        async def search(what: str) -> str:
            nonlocal lookups
            lookups += 1
            await anyio.sleep(_server_error_pause("chat.postMessage", what, min(lookups, 5)))
            return await self.find_post(channel, thread_ts, marker, priority=priority)

        async def attempt() -> str:
            nonlocal failure
            if failure is not None:  # until the thread says whether the last try went through
                try:
                    found = await retry(
                        partial(search, failure.error),
                        errors=SlackAPIError,
                        attempts=max(1, POST_LOOKUPS - lookups),
                        pause=no_pause,
                        retry_if=lambda exc: exc.transient,
                    )
                except SlackAPIError as lookup:
                    log.warning(
                        "cannot tell whether chat.postMessage went through (%s); not posting again", lookup.error
                    )
                    raise _Unconfirmed(failure) from None
                if found:
                    log.info("chat.postMessage had gone through despite %s; not posting again", failure.error)
                    return found
            try:
                return str((await post()).get("ts", ""))
            except SlackAPIError as exc:
                failure = exc
                raise

        try:
            return await retry(
                attempt,
                errors=SlackAPIError,
                attempts=POST_ATTEMPTS,
                pause=no_pause,
                retry_if=lambda exc: exc.transient,
            )
        except _Unconfirmed as exc:
            raise exc.failure from None

    async def find_post(self, channel: str, thread_ts: str, marker: str, *, priority: bool = False) -> str:
        """The ts of our message in the thread that carries `marker`, or ""."""
        replies = await self.thread_replies(channel, thread_ts, include_all_metadata=True, priority=priority)
        for message in reversed(replies):
            meta = message.get("metadata") or {}
            if meta.get("event_type") == POST_MARKER and (meta.get("event_payload") or {}).get("post_id") == marker:
                return str(message.get("ts") or "")
        return ""

    async def update_message(
        self,
        channel: str,
        ts: str,
        *,
        text: str | None = None,
        markdown_text: str | None = None,
        blocks: list[dict[str, Any]] | None = None,
        metadata: dict[str, Any] | None = None,
        interim: bool = False,
        priority: bool = False,
    ) -> None:
        """Edit a message; `metadata` replaces the message's (without it, Slack keeps it)."""
        await self.call(
            "chat.update",
            channel=channel,
            ts=ts,
            text=text,
            markdown_text=markdown_text,
            blocks=blocks,
            metadata=metadata,
            interim=interim,
            priority=priority,
        )

    async def thread_replies(
        self,
        channel: str,
        thread_ts: str,
        *,
        limit: int = 200,
        include_all_metadata: bool = False,
        priority: bool = False,
    ) -> list[dict[str, Any]]:
        """All messages of a thread, parent first (follows cursors, capped at 1,000)."""
        messages: list[dict[str, Any]] = []
        cursor = None
        while len(messages) < 1000:
            body = await self.call(
                "conversations.replies",
                channel=channel,
                ts=thread_ts,
                limit=limit,
                cursor=cursor,
                include_all_metadata=include_all_metadata or None,
                priority=priority,
            )
            messages.extend(m for m in body.get("messages", []) if isinstance(m, dict))
            cursor = (body.get("response_metadata") or {}).get("next_cursor")
            if not cursor or not body.get("has_more", True):
                break
        return messages

    # File bytes. The bot token may go only to Slack's file host and to SLACK_API_URL's
    # own origin; the check lives here, next to the token, so no caller can get it wrong.

    def is_slack_file_url(self, url: str) -> bool:
        """True for https://files.slack.com/… and for URLs on SLACK_API_URL's origin
        (same scheme, host and port): the only places a download may carry the token."""
        try:
            target = httpx2.URL(url)
        except (httpx2.InvalidURL, TypeError, ValueError):
            return False
        if target.scheme == "https" and target.host == SLACK_FILE_HOST and target.port in (None, 443):
            return True
        api = httpx2.URL(self._base_url)
        return (target.scheme, target.host, target.port or _DEFAULT_PORTS.get(target.scheme)) == (
            api.scheme,
            api.host,
            api.port or _DEFAULT_PORTS.get(api.scheme),
        )

    @asynccontextmanager
    async def open_file(self, url: str) -> AsyncIterator[httpx2.Response]:
        """GET a Slack-hosted file with the bot token, as a streamed response that is
        closed on exit. Redirects are not followed: the caller checks each Location with
        `is_slack_file_url` and calls again. Raises NotSlackFileHost (before anything is
        sent) for any other host, SlackAPIError for transport errors."""
        if not self.is_slack_file_url(url):
            raise NotSlackFileHost(url)
        request = self._client.build_request("GET", url, headers={"Authorization": f"Bearer {self._bot_token}"})
        try:
            response = await self._client.send(request, stream=True, follow_redirects=False)
        except httpx2.HTTPError as exc:
            raise SlackAPIError("file download", f"http_error: {type(exc).__name__}") from None
        try:
            yield response
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()

    async def post_upload(self, upload_url: str, data: bytes, *, filename: str) -> None:
        """Step 2 of Slack's upload flow: POST the bytes to the `upload_url` that
        files.getUploadURLExternal returned, without the bot token (the URL itself
        authorises the upload). Raises SlackAPIError unless Slack answers 200."""
        if httpx2.URL(upload_url).scheme not in ("https", "http"):
            raise SlackAPIError("file upload", "bad_upload_url")
        try:
            response = await self._client.post(
                upload_url, content=data, headers={"Content-Type": "application/octet-stream", "X-Filename": filename}
            )
        except httpx2.HTTPError as exc:
            raise SlackAPIError("file upload", f"http_error: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise SlackAPIError("file upload", f"http_{response.status_code}")
