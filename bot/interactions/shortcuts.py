"""Message shortcuts: "Summarize thread" and "Translate message".

Both answer privately, in a modal: it opens at once on the shortcut's trigger (which
lives 3 seconds) saying it is working, and is updated with the result — or with the
clear line `describe` gives for any failure. They use the user's own settings (model,
temperature or effort, language) and the same model slots and deadline as answers, so
a slow model costs the modal a timeout line, never the bot. They count against the user's
monthly token budget like answers (`bot.usage`): checked before the model call, and
their tokens recorded after it.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import anyio
from slack_sdk.models.blocks import Block, ContextBlock, MarkdownTextObject, SectionBlock
from slack_sdk.models.views import View

from bot.interactions.limits import SECTION_TEXT, clip
from bot.processing.conversation import build_prompt
from bot.processing.failures import describe, timeout_notice
from bot.processing.openai_chat import stream_chat
from bot.processing.options import RequestOptions, options_for
from bot.processing.surface import SurfaceError
from bot.services import SlackServices
from bot.slack.markdown import markdown_to_mrkdwn, split_markdown
from bot.slack.transcripts import transcript
from bot.slack.web_api import SlackAPIError
from bot.usage import check_budget, record_usage

log = logging.getLogger(__name__)

SUMMARIZE = "summarize_thread"
TRANSLATE = "translate_message"
TITLES = {SUMMARIZE: "Thread summary", TRANSLATE: "Translation"}
SECTION_LIMIT = SECTION_TEXT  # characters of mrkdwn per section block
MAX_SECTIONS = 40
NOTHING_TO_SHOW = "_(Nothing to show.)_"
CANNOT_READ = (
    "I can't read this conversation ({error}). If it is a channel, invite me to it first "
    "(`/invite` and my name), then try again."
)

SUMMARY_PROMPT = (
    "You summarize Slack conversations for someone who has not read them. Write a short summary: "
    "first one sentence on what the conversation is about, then bullet points with the main points, "
    "decisions and open questions. Keep people's mentions exactly as written (like <@U123>). "
    "Use Markdown."
)
TRANSLATE_PROMPT = (
    "Translate the user's message into {language}. Reply with the translation only: keep its "
    "formatting, emoji, links and mentions (like <@U123>) exactly as they are. If it is already in "
    "{language}, reply with it unchanged."
)


def result_view(kind: str, text: str, footer: str = "") -> dict[str, Any]:
    """The modal showing `text` (Markdown, converted to the mrkdwn modals take)."""
    mrkdwn = re.sub(r"&lt;([@#!][A-Za-z0-9^|_\-]+)&gt;", r"<\1>", markdown_to_mrkdwn(text))  # keep mentions
    parts = split_markdown(mrkdwn, SECTION_LIMIT)
    if len(parts) > MAX_SECTIONS:
        parts = [*parts[: MAX_SECTIONS - 1], "_(cut short: too long to show here)_"]
    blocks: list[Block] = [SectionBlock(text=MarkdownTextObject(text=part)) for part in parts if part.strip()]
    if not blocks:  # a view needs one block at least
        blocks.append(SectionBlock(text=MarkdownTextObject(text=NOTHING_TO_SHOW)))
    if footer:
        blocks.append(ContextBlock(elements=[MarkdownTextObject(text=clip(footer, SECTION_LIMIT))]))
    return View(type="modal", title=TITLES[kind], close="Close", blocks=blocks, callback_id=f"{kind}_result").to_dict()


async def run(services: SlackServices, kind: str, payload: dict[str, Any]) -> None:
    """Handle one message shortcut from open to result. Never raises on bad input."""
    user = (payload.get("user") or {}).get("id")
    channel = (payload.get("channel") or {}).get("id")
    message = payload.get("message")
    trigger = payload.get("trigger_id")
    if (
        not isinstance(user, str)
        or not user
        or not isinstance(channel, str)
        or not channel
        or not isinstance(trigger, str)
        or not trigger
        or not isinstance(message, dict)
    ):
        log.warning("%s shortcut without user, channel, message or trigger; ignored", kind)
        return
    slack = services.slack
    try:
        opened = await slack.call("views.open", trigger_id=trigger, view=result_view(kind, "_Working on it…_"))
    except SlackAPIError as exc:
        log.warning("%s: could not open the modal for %s: %s", kind, user, exc.error)
        return
    view_id = (opened.get("view") or {}).get("id")
    options = await options_for(services, user, None)
    refused = await check_budget(services.store, options.budgets, user, now=time.time())  # never raises
    try:
        if refused is not None:  # over budget: the line, and no model call
            text, footer = refused.message, ""
        else:
            if kind == SUMMARIZE:
                text = await _summarize(services, options, user, channel, message)
            else:
                text = await _translate(services, options, user, message)
            footer = f"Written by `{options.model}`. Only you can see this."
    except Exception as exc:
        failure = describe(SurfaceError(exc.method, exc.error) if isinstance(exc, SlackAPIError) else exc)
        log.warning("%s for %s failed: %s (%s)", kind, user, failure.kind, type(exc).__name__)
        text, footer = failure.message, ""
    try:
        await slack.call("views.update", view_id=view_id, view=result_view(kind, text, footer))
    except SlackAPIError as exc:
        log.info("%s: could not show the result to %s (modal closed?): %s", kind, user, exc.error)


async def _summarize(
    services: SlackServices, options: RequestOptions, user: str, channel: str, message: dict[str, Any]
) -> str:
    thread_ts = message.get("thread_ts") or message.get("ts")
    if not isinstance(thread_ts, str) or not thread_ts:
        return "This message has no thread to summarize."
    try:
        replies = await services.slack.thread_replies(channel, thread_ts)
    except SlackAPIError as exc:
        log.info("summarize: cannot read %s/%s: %s", channel, thread_ts, exc.error)
        return CANNOT_READ.format(error=exc.error)
    text = transcript(replies, services.me)
    if not text:
        return "There is nothing to summarize in this thread yet."
    return await _ask(services, options, user, SUMMARY_PROMPT, f"Summarize this conversation:\n\n{text}")


async def _translate(services: SlackServices, options: RequestOptions, user: str, message: dict[str, Any]) -> str:
    text = message.get("text")
    if not isinstance(text, str) or not text.strip():
        return "This message has no text to translate."
    return await _ask(services, options, user, TRANSLATE_PROMPT.format(language=options.language), text)


async def _ask(services: SlackServices, options: RequestOptions, user: str, system: str, user_text: str) -> str:
    openai_settings = services.settings.openai
    prompt = build_prompt(
        system,
        [],
        user_text,
        budget_tokens=openai_settings.context_budget_tokens,
        reserve_for_answer=options.max_answer_tokens,
    )
    pieces: list[str] = []
    tokens_in = tokens_out = 0
    outcome = "error"  # until the stream ends: an OpenAI error raises out of here
    try:
        with anyio.move_on_after(openai_settings.async_timeout_seconds) as deadline:
            async with services.model_slots:
                result = await stream_chat(
                    services.openai,
                    model=options.model,
                    messages=prompt.messages,
                    max_tokens=options.max_answer_tokens,
                    temperature=options.temperature,
                    reasoning_effort=options.reasoning_effort,
                    idle_timeout=openai_settings.stream_idle_timeout_seconds,
                    on_delta=pieces.append,
                )
                outcome, tokens_in, tokens_out = "answered", result.prompt_tokens, result.completion_tokens
        if deadline.cancelled_caught:
            outcome = "timeout"
    finally:
        with anyio.CancelScope(shield=True):
            await record_usage(
                services.store,
                user=user,
                model=options.model,
                outcome=outcome,
                tokens_in=tokens_in,
                tokens_out=tokens_out,
                now=time.time(),
            )
    if deadline.cancelled_caught:
        return timeout_notice(openai_settings.async_timeout_seconds)
    return "".join(pieces).strip() or "_(The model returned an empty answer. Please try again.)_"
