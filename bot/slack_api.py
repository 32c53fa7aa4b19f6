"""Slack Web API over httpx2 (the same HTTP stack the openai SDK uses).

One `SlackWebAPI` per process. It only ever sends a token to `SLACK_API_URL`, which
the settings insist is an http(s) URL chosen by the operator; file downloads (a later
issue) must check the host themselves before reusing the bot token.

Rate limits: a 429 is retried after its `Retry-After`, a bounded number of times, and
the sleep sits inside the caller's cancel scope, so a request's deadline still wins.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import anyio
import httpx2

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
    }
)


class SlackAPIError(Exception):
    """Slack answered `ok: false` (or not JSON at all). `error` is Slack's code."""

    def __init__(self, method: str, error: str, response: dict | None = None) -> None:
        super().__init__(f"{method} failed: {error}")
        self.method = method
        self.error = error
        self.response = response or {}


class SlackRateLimited(SlackAPIError):
    def __init__(self, method: str, retry_after: float) -> None:
        super().__init__(method, "ratelimited")
        self.retry_after = retry_after


def _retry_after(response: httpx2.Response) -> float:
    try:
        return max(0.0, min(float(response.headers.get("Retry-After", "1")), 300.0))
    except ValueError:
        return 1.0


class SlackWebAPI:
    def __init__(
        self,
        *,
        bot_token: str,
        app_token: str,
        base_url: str = "https://slack.com/api/",
        client: httpx2.AsyncClient,
        max_rate_limit_retries: int = 3,
    ) -> None:
        self._bot_token = bot_token
        self._app_token = app_token
        self._base_url = base_url if base_url.endswith("/") else base_url + "/"
        self._client = client
        self._max_retries = max_rate_limit_retries

    async def call(self, method: str, *, app_token: bool = False, **args: Any) -> dict:
        """Call `method` with `args`; returns the JSON body when `ok` is true.

        Raises SlackAPIError (`ok: false`, non-JSON answers, HTTP errors) or
        SlackRateLimited once the retries are spent. `None` arguments are dropped.
        """
        args = {k: v for k, v in args.items() if v is not None}
        token = self._app_token if app_token else self._bot_token
        headers = {"Authorization": f"Bearer {token}"}
        url = self._base_url + method
        attempt = 0
        while True:
            if method in JSON_METHODS:
                request = self._client.build_request(
                    "POST", url, headers={**headers, "Content-Type": "application/json; charset=utf-8"},
                    content=json.dumps(args).encode(),
                )
            else:
                form = {k: (json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for k, v in args.items()}
                request = self._client.build_request("POST", url, headers=headers, data=form)
            try:
                response = await self._client.send(request)
            except httpx2.HTTPError as exc:
                raise SlackAPIError(method, f"http_error: {type(exc).__name__}") from None
            if response.status_code == 429:
                delay = _retry_after(response)
                if attempt >= self._max_retries:
                    raise SlackRateLimited(method, delay)
                attempt += 1
                log.warning("slack %s rate limited; retrying in %.1fs (attempt %d)", method, delay, attempt)
                await anyio.sleep(delay)
                continue
            try:
                body = response.json()
            except ValueError:
                raise SlackAPIError(method, f"bad_response: HTTP {response.status_code}, not JSON") from None
            if not isinstance(body, dict):
                raise SlackAPIError(method, "bad_response: not a JSON object")
            if not body.get("ok"):
                error = str(body.get("error") or f"http_{response.status_code}")
                if error == "ratelimited" and attempt < self._max_retries:
                    attempt += 1
                    await anyio.sleep(_retry_after(response))
                    continue
                raise SlackAPIError(method, error, body)
            return body

    # Thin helpers for the calls the bot makes; they keep argument names in one place.

    async def post_message(self, channel: str, thread_ts: str | None, *, text: str | None = None,
                           markdown_text: str | None = None) -> str:
        body = await self.call("chat.postMessage", channel=channel, thread_ts=thread_ts,
                               text=text, markdown_text=markdown_text)
        return str(body.get("ts", ""))

    async def update_message(self, channel: str, ts: str, *, text: str | None = None,
                             markdown_text: str | None = None) -> None:
        await self.call("chat.update", channel=channel, ts=ts, text=text, markdown_text=markdown_text)

    async def thread_replies(self, channel: str, thread_ts: str, *, limit: int = 200) -> list[dict]:
        """All messages of a thread, parent first (follows cursors, capped at 1,000)."""
        messages: list[dict] = []
        cursor = None
        while len(messages) < 1000:
            body = await self.call("conversations.replies", channel=channel, ts=thread_ts,
                                   limit=limit, cursor=cursor)
            messages.extend(m for m in body.get("messages", []) if isinstance(m, dict))
            cursor = (body.get("response_metadata") or {}).get("next_cursor")
            if not cursor or not body.get("has_more", True):
                break
        return messages
