""" "Try again": the button under every failure notice, and what its click carries.

A notice that ends a request in failure (timeout, stalled stream, an OpenAI or Slack
error, interrupted by a restart or a takeover, stopped, storage out of reach) gets an
`actions` block with one button. Its value is the ts of the message it answers; the
click comes back as a `block_actions` interaction, which `parse_try_again` reads into
a `TryAgain`, and the nursery runs the question again as a new message would be run
(`Nursery.try_again`). Each notice's button works once: its click is claimed in
storage before anything runs, and the notice is edited to say who asked.

Only the asker's click counts: the question is re-run as theirs (their settings, their
budget), and another user's click gets a short ephemeral line instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import anyio
from slack_sdk.models.blocks import ActionsBlock, ButtonElement, ContextBlock, MarkdownTextObject

from bot.slack.web_api import SlackAPIError, SlackWebAPI

log = logging.getLogger(__name__)

TRY_AGAIN_ACTION = "try_again"
TRY_AGAIN_BLOCK = "try_again"
MAX_VALUE = 2000  # a button's value (Block Kit's limit); a ts is far shorter
CALL_SECONDS = 10.0  # bound on the notice's edit and on an ephemeral line


def try_again_block(asked_ts: str) -> dict[str, Any]:
    return ActionsBlock(
        block_id=TRY_AGAIN_BLOCK,
        elements=[ButtonElement(text="Try again", action_id=TRY_AGAIN_ACTION, value=asked_ts)],
    ).to_dict()


def notice_blocks(text: str, asked_ts: str) -> list[dict[str, Any]]:
    """A message that is only a failure notice: the notice, then the button."""
    return [{"type": "markdown", "text": text}, try_again_block(asked_ts)]


@dataclass(frozen=True)
class TryAgain:
    """A click on "Try again": `user` asks to re-run the message `asked_ts` of the thread
    `channel`/`thread_ts`, from the notice `notice_ts` (whose `blocks` are as Slack sent
    them with the click, to edit the button away)."""

    channel: str
    thread_ts: str
    notice_ts: str
    asked_ts: str
    user: str
    blocks: tuple[dict[str, Any], ...] = ()
    text: str = ""  # the notice's fallback text

    @property
    def claim_key(self) -> str:
        """One click per notice, across replicas and redeliveries."""
        return f"{self.channel}:{self.notice_ts}"


def parse_try_again(envelope_type: str, payload: object) -> TryAgain | None:
    """The "Try again" click in an `interactive` envelope, or None for anything else.
    Never raises. A click missing its channel, message, user or value comes back with
    an empty `asked_ts`, so the caller can log it as malformed.

    Slack's `block_actions` payload (docs.slack.dev/reference/interaction-payloads/
    block_actions-payload): `user.id`, `channel.id`, `container.message_ts`, `message`
    (with `ts`, `thread_ts`, `blocks`), and `actions[]` with `action_id` and `value`."""
    if envelope_type != "interactive" or not isinstance(payload, dict) or payload.get("type") != "block_actions":
        return None
    actions = payload.get("actions")
    found = [a for a in actions if isinstance(a, dict)] if isinstance(actions, list) else []
    action = next((a for a in found if a.get("action_id") == TRY_AGAIN_ACTION), None)
    if action is None:
        return None
    message = _object(payload.get("message"))
    container = _object(payload.get("container"))
    channel = _text(payload.get("channel"), "id") or _text(container, "channel_id")
    notice_ts = _text(message, "ts") or _text(container, "message_ts")
    thread_ts = _text(message, "thread_ts") or _text(container, "thread_ts")
    user = _text(payload.get("user"), "id")
    asked = action.get("value")
    asked_ts = asked if isinstance(asked, str) and 0 < len(asked) <= MAX_VALUE else ""
    if not (channel and notice_ts and thread_ts and user):
        asked_ts = ""
    blocks = tuple(b for b in message.get("blocks") or () if isinstance(b, dict))
    return TryAgain(channel, thread_ts, notice_ts, asked_ts, user, blocks, _text(message, "text"))


def after_click(blocks: tuple[dict[str, Any], ...], user: str) -> list[dict[str, Any]] | None:
    """The notice's blocks once its button is used: the button gone, a line saying who
    asked in its place. None when the blocks do not hold the whole message (a stopped
    stream shows its text outside them): an edit would lose that text, so the button
    stays, and the claim alone makes it work once."""
    if not any(b.get("type") == "markdown" for b in blocks):
        return None
    kept = [b for b in blocks if b.get("block_id") != TRY_AGAIN_BLOCK]
    said = ContextBlock(elements=[MarkdownTextObject(text=f":repeat: <@{user}> asked to try again.")]).to_dict()
    return [*kept, said]


def find_question(replies: list[dict[str, Any]], asked_ts: str) -> dict[str, Any] | None:
    """The message `asked_ts` among a thread's messages, or None (deleted, or never there;
    a deleted thread parent stays as a `tombstone`)."""
    found = next((m for m in replies if m.get("ts") == asked_ts), None)
    return None if found is None or found.get("subtype") == "tombstone" else found


async def read_question(slack: SlackWebAPI, click: TryAgain, *, bound: float) -> dict[str, Any] | None:
    """The message to try again, read from its thread (within `bound` seconds); None,
    with a line to the user, when the thread cannot be read now or the message is gone."""
    replies: list[dict[str, Any]] | None = None
    with anyio.move_on_after(bound):
        try:
            replies = await slack.thread_replies(click.channel, click.thread_ts)
        except SlackAPIError as exc:
            log.warning("Try again: cannot read thread %s/%s: %s", click.channel, click.thread_ts, exc.error)
    if replies is None:
        await tell(slack, click, "I could not read this thread just now. Please press Try again in a moment.")
        return None
    question = find_question(replies, click.asked_ts)
    if question is None:
        await tell(slack, click, "The message to answer is no longer in this thread.")
    return question


async def mark_used(slack: SlackWebAPI, click: TryAgain) -> None:
    """Edit the button away from the notice, saying who asked (bounded, never raising)."""
    blocks = after_click(click.blocks, click.user)
    if blocks is None:
        return
    with anyio.move_on_after(CALL_SECONDS):
        try:
            await slack.update_message(click.channel, click.notice_ts, blocks=blocks, text=click.text or None)
        except SlackAPIError as exc:
            log.warning("Try again: could not update notice %s/%s: %s", click.channel, click.notice_ts, exc.error)


async def tell(slack: SlackWebAPI, click: TryAgain, text: str) -> None:
    """An ephemeral line to the user who clicked (bounded, never raising)."""
    with anyio.move_on_after(CALL_SECONDS):
        try:
            await slack.call(
                "chat.postEphemeral", channel=click.channel, user=click.user, thread_ts=click.thread_ts, text=text
            )
        except SlackAPIError as exc:
            log.warning("could not tell %s in %s: %s", click.user, click.channel, exc.error)


def _object(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(obj: object, key: str) -> str:
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, str) else ""
