"""`SlackUX`: everything the bot does besides answering messages, behind one small door.

The nursery hands it what is not a message to answer — slash commands, interactions
(modal submissions, buttons, message shortcuts) and the App Home / assistant events —
and asks it two questions about messages: may this one be answered (access control,
with a polite refusal once per thread), and is it a user's first DM (the welcome).
The Socket Mode reader asks it for ack payloads (`ack_payload`): pure and instant,
which is how a settings modal shows validation errors without waiting on anything.

Each module under `bot.interactions` handles one surface; this one only routes.
Handlers are bounded in time and never raise into the nursery: a bug or a malformed
payload costs a log line, not the bot.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from slack_sdk.models.blocks import MarkdownTextObject, SectionBlock
from slack_sdk.models.views import View

from bot.interactions import assistant, settings_flow, shortcuts
from bot.interactions.access import refusal
from bot.interactions.app_home import OPEN_SETTINGS_ACTION
from bot.interactions.feedback import record_click
from bot.interactions.limits import MODAL_TITLE, SECTION_TEXT, clip
from bot.interactions.locales import UserLocales
from bot.interactions.model_catalog import ModelCatalog
from bot.interactions.settings_modal import (
    CALLBACK_ID,
    MODEL_ACTION,
    THREAD_SETTINGS,
    ModalContext,
    errors_ack,
    parse_submission,
)
from bot.interactions.welcome import welcome_text
from bot.services import SlackServices
from bot.slack.events import IncomingMessage
from bot.slack.feedback_blocks import FEEDBACK_ACTION
from bot.slack.socket_mode import Envelope
from bot.slack.web_api import SlackAPIError
from bot.storage.base import ThreadKey

log = logging.getLogger(__name__)

# (`agent_session_stopped`, the agent view's Stop button, is not among them: it is about a
# running request, so the nursery handles it before asking `wants` — see Nursery.stop_request.)
UX_EVENTS = frozenset(
    {"app_home_opened", "assistant_thread_started", "assistant_thread_context_changed", "app_context_changed"}
)
NOTICE_TIMEOUT = 10.0
MAX_REMEMBERED = 50_000  # in-memory "already said" keys, a cache in front of storage


def notice_view(title: str, text: str) -> dict[str, Any]:
    """A modal with one line of text (cut to fit: a title holds 24 characters, a section 3,000)."""
    return View(
        type="modal",
        title=clip(title, MODAL_TITLE),
        close="Close",
        blocks=[SectionBlock(text=MarkdownTextObject(text=clip(text, SECTION_TEXT)))],
    ).to_dict()


class SlackUX:
    def __init__(
        self, services: SlackServices, *, catalog: ModelCatalog | None = None, locales: UserLocales | None = None
    ) -> None:
        self.services = services
        self.catalog = catalog or ModelCatalog()
        self.locales = locales or UserLocales()
        self._said: set[tuple[str, str]] = set()  # (kind, key) known to be claimed already

    # ---- asked by the Socket Mode reader, while acking (pure, no I/O) ------------------

    def ack_payload(self, envelope_type: str, payload: dict[str, Any]) -> dict[str, Any] | None:
        """The payload to send with the ack of an envelope that accepts one, or None."""
        surfaces = self.services.settings.surfaces
        if envelope_type == "slash_commands":
            command = payload.get("command")
            if command != surfaces.settings_command:
                return {
                    "response_type": "ephemeral",
                    "text": f"I don't know {command}. Try {surfaces.settings_command}.",
                }
            why = refusal(surfaces, str(payload.get("user_id") or ""), None)
            return {"response_type": "ephemeral", "text": why} if why else None
        if envelope_type == "interactive" and payload.get("type") == "view_submission":
            view = payload.get("view")
            if isinstance(view, dict) and view.get("callback_id") == CALLBACK_ID:
                user = str((payload.get("user") or {}).get("id") or "")
                submission = parse_submission(view, user=user, admins=surfaces.admin_users)
                if submission.errors:
                    return errors_ack(submission.errors)
        return None

    # ---- asked by the nursery ------------------------------------------------------------

    def wants(self, envelope: Envelope) -> bool:
        """True for envelopes this object handles instead of the message pipeline."""
        if envelope.type != "events_api":
            return True
        event = envelope.payload.get("event")
        return isinstance(event, dict) and event.get("type") in UX_EVENTS

    async def handle(self, envelope: Envelope) -> None:
        """Handle one envelope to completion, within a bound; never raises (but cancellation)."""
        bound = self.services.settings.openai.async_timeout_seconds + 30.0
        try:
            with anyio.move_on_after(bound) as scope:
                await self._route(envelope)
            if scope.cancelled_caught:
                log.warning("envelope %s (%s) not handled within %.0fs", envelope.envelope_id, envelope.type, bound)
        except Exception:
            log.exception("envelope %s (%s): handler failed", envelope.envelope_id, envelope.type)

    async def admit(self, msg: IncomingMessage) -> bool:
        """Whether `msg` may be answered. Refuses (once per thread) users and channels outside
        ALLOWED_USERS / ALLOWED_CHANNELS; welcomes a user's first DM."""
        why = refusal(self.services.settings.surfaces, msg.user, msg.channel)
        if why:
            log.info("message %s from %s in %s refused by access control", msg.ts, msg.user, msg.channel)
            if await self.first("refusal", str(msg.thread)):
                await self._post(msg.channel, msg.thread_ts, why)
            return False
        if msg.kind == "dm" and self.services.settings.surfaces.welcome and await self.first("welcome", msg.user):
            # Its own message in the DM, not in the thread: the conversation stays the user's.
            await self._post(
                msg.channel, None, welcome_text(msg.user, self.services.settings.surfaces.settings_command)
            )
        return True

    # ---- routing ---------------------------------------------------------------------

    async def _route(self, envelope: Envelope) -> None:
        payload = envelope.payload
        if envelope.type == "slash_commands":
            await self._slash_command(payload)
        elif envelope.type == "interactive":
            await self._interaction(payload)
        else:
            await self._event(payload.get("event") or {})

    async def _slash_command(self, payload: dict[str, Any]) -> None:
        surfaces = self.services.settings.surfaces
        user, trigger = payload.get("user_id"), payload.get("trigger_id")
        if payload.get("command") != surfaces.settings_command or refusal(surfaces, str(user or ""), None):
            return  # answered in the ack
        if not isinstance(user, str) or not user or not isinstance(trigger, str) or not trigger:
            log.warning("slash command without user_id or trigger_id; ignored")
            return
        await settings_flow.open_settings(
            self.services,
            self.catalog,
            user=user,
            trigger_id=trigger,
            context=ModalContext(None, "command"),
            locales=self.locales,
        )

    async def _interaction(self, payload: dict[str, Any]) -> None:
        kind = payload.get("type")
        user = (payload.get("user") or {}).get("id")
        if not isinstance(user, str) or not user:
            log.warning("%s interaction without a user; ignored", kind)
            return
        if kind == "view_submission":
            if (payload.get("view") or {}).get("callback_id") == CALLBACK_ID:
                await settings_flow.save(self.services, payload)
        elif kind == "block_actions":
            for action in payload.get("actions") or ():
                if isinstance(action, dict):
                    await self._action(payload, user, action)
        elif kind == "message_action":
            await self._message_shortcut(payload, user)
        elif kind == "view_closed":
            return
        else:
            log.info("interaction %r is not handled", kind)

    async def _action(self, payload: dict[str, Any], user: str, action: dict[str, Any]) -> None:
        action_id = str(action.get("action_id") or "")
        raw_view = payload.get("view")
        view: dict[str, Any] = raw_view if isinstance(raw_view, dict) else {}
        if action_id == FEEDBACK_ACTION:
            try:
                await record_click(self.services.store, payload, action)
            except Exception as exc:
                log.error("could not record feedback from %s: %s", user, exc)
        elif action_id.startswith(OPEN_SETTINGS_ACTION):
            if refusal(self.services.settings.surfaces, user, None):
                return
            await settings_flow.open_settings(
                self.services,
                self.catalog,
                user=user,
                trigger_id=str(payload.get("trigger_id") or ""),
                context=ModalContext(None, "home"),
                scope=str(action.get("value") or "user"),
                locales=self.locales,
            )
        elif action_id == MODEL_ACTION and view.get("callback_id") == CALLBACK_ID:
            await settings_flow.model_changed(self.services, self.catalog, payload)
        else:
            log.debug("block action %r is not handled", action_id)

    async def _message_shortcut(self, payload: dict[str, Any], user: str) -> None:
        callback = payload.get("callback_id")
        channel = (payload.get("channel") or {}).get("id")
        raw_message = payload.get("message")
        message: dict[str, Any] = raw_message if isinstance(raw_message, dict) else {}
        trigger = str(payload.get("trigger_id") or "")
        why = refusal(self.services.settings.surfaces, user, channel if isinstance(channel, str) else None)
        if why:
            await self._open_notice(trigger, "Not available", why)
            return
        if callback in (shortcuts.SUMMARIZE, shortcuts.TRANSLATE):
            await shortcuts.run(self.services, callback, payload)
        elif callback == THREAD_SETTINGS:
            thread_ts = message.get("thread_ts") or message.get("ts")
            if not isinstance(channel, str) or not channel or not isinstance(thread_ts, str) or not thread_ts:
                log.warning("thread settings shortcut without channel or message; ignored")
                return
            await settings_flow.open_settings(
                self.services,
                self.catalog,
                user=user,
                trigger_id=trigger,
                context=ModalContext(ThreadKey(channel, thread_ts), "shortcut"),
                scope="thread",
                locales=self.locales,
            )
        else:
            log.info("message shortcut %r is not handled", callback)
            await self._open_notice(
                trigger, "Unknown shortcut", "This shortcut is not supported by this version of the assistant."
            )

    async def _event(self, event: dict[str, Any]) -> None:
        event_type = event.get("type")
        if event_type == "app_home_opened":
            user, channel = event.get("user"), event.get("channel")
            if not isinstance(user, str) or not user:
                log.warning("app_home_opened without a user; ignored")
            elif event.get("tab") == "messages":
                if isinstance(channel, str) and channel and not refusal(self.services.settings.surfaces, user, None):
                    await assistant.suggest_prompts(self.services.slack, channel)  # agent view
            else:
                await settings_flow.refresh_home(self.services, user)
        else:
            await assistant.on_assistant_event(self.services.slack, event)

    # ---- helpers ---------------------------------------------------------------------

    async def first(self, kind: str, key: str) -> bool:
        """True the first time (kind, key) comes up, across restarts (storage), with an
        in-memory fallback when storage fails."""
        if (kind, key) in self._said:
            return False
        try:
            first = await self.services.store.claim_once(kind, key)
        except Exception as exc:
            log.warning("storage cannot remember the %s for %s (%s); using memory", kind, key, exc)
            first = True
        if len(self._said) >= MAX_REMEMBERED:
            self._said.clear()
        self._said.add((kind, key))
        return first

    async def _post(self, channel: str, thread_ts: str | None, text: str) -> None:
        with anyio.move_on_after(NOTICE_TIMEOUT):
            try:
                await self.services.slack.post_message(channel, thread_ts, markdown_text=text)
            except SlackAPIError as exc:
                log.warning("could not post in %s/%s: %s", channel, thread_ts, exc.error)

    async def _open_notice(self, trigger: str, title: str, text: str) -> None:
        if not trigger:
            return
        try:
            await self.services.slack.call("views.open", trigger_id=trigger, view=notice_view(title, text))
        except SlackAPIError as exc:
            log.info("could not open a notice: %s", exc.error)
