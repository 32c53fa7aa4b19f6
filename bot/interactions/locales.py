"""Users' Slack locales, for the settings modal's first guess at their language.

Slack has no locale in interaction payloads or slash commands; only `users.info` with
`include_locale=true` returns it, and that method needs the `users:read` scope. So the
look-up is best-effort and bounded (the modal must open within the trigger's 3 seconds),
each answer is kept for an hour, and a `missing_scope` answer switches the look-up off
for the life of the process (logged once): the modal then starts from the saved or
default language, as it did before.
"""

from __future__ import annotations

import logging

import anyio

from bot.slack.web_api import SlackAPIError, SlackRateLimited, SlackWebAPI

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT = 0.8  # seconds of the 3 s a trigger_id lives
CACHE_SECONDS = 3600.0
MAX_CACHED = 10_000
SCOPE_ERRORS = frozenset({"missing_scope", "not_allowed_token_type", "no_permission"})


class UserLocales:
    def __init__(self, *, ttl: float = CACHE_SECONDS) -> None:
        self._ttl = ttl
        self._cache: dict[str, tuple[str | None, float]] = {}
        self.enabled = True  # False once Slack said the token may not read users
        self.lookups = 0

    async def locale(self, slack: SlackWebAPI, user: str, *, timeout: float = LOOKUP_TIMEOUT) -> str | None:
        """The user's Slack locale (`de-DE`), or None when Slack does not say in time."""
        if not self.enabled or not user:
            return None
        cached = self._cache.get(user)
        now = anyio.current_time()
        if cached is not None and now - cached[1] < self._ttl:
            return cached[0]
        self.lookups += 1
        found: str | None = None
        answered = False
        with anyio.move_on_after(timeout):
            try:
                reply = await slack.call("users.info", user=user, include_locale=True)
                raw = (reply.get("user") or {}).get("locale")
                found = raw if isinstance(raw, str) and raw else None
                answered = True
            except SlackAPIError as exc:
                if exc.error in SCOPE_ERRORS:
                    self.enabled = False
                    log.warning(
                        "users.info refused (%s): the settings modal cannot start from users' Slack language; "
                        "add the users:read scope to use it",
                        exc.error,
                    )
                    return None
                log.info("could not read the locale of %s: %s", user, exc.error)
                if exc.transient or isinstance(exc, SlackRateLimited):
                    return None  # ask again next time
                answered = True  # e.g. user_not_found: not again for a while
        if not answered:
            log.info("the locale of %s took over %gs; the modal opens without it", user, timeout)
            return None
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()
        self._cache[user] = (found, now)
        return found
