"""Answer one message: placeholder → history → model → streamed reply → stored exchange.

The whole request runs under one deadline (`ASYNC_TIMEOUT_SECONDS`, a `move_on_after`),
which covers waiting for a free model slot too. Whatever happens — answer, timeout,
OpenAI or Slack error, or cancellation by shutdown — the `finally` block runs shielded
and time-bounded: the placeholder gets its final text or a clear notice, and the
request is closed in storage. Nothing is released by hand; the caller's `async with`
blocks do that as the stack unwinds.
"""

from __future__ import annotations

import logging
import time

import anyio

from bot.processing.context import RequestState, Services
from bot.processing.conversation import build_prompt
from bot.processing.failures import INTERRUPTED_NOTICE, describe, timeout_notice
from bot.processing.openai_chat import stream_chat
from bot.processing.options import RequestOptions, resolve_options
from bot.processing.reply import ReplySurface, ReplyWriter
from bot.slack_events import IncomingMessage, strip_mention
from bot.storage.base import HistoryMessage

log = logging.getLogger(__name__)

FINALIZE_SECONDS = 4.0  # bound on the shielded clean-up; keeps shutdown under 10 s
STORE_RESERVE_SECONDS = 1.0  # of FINALIZE_SECONDS, kept for closing the request in storage
WAITING_STATUS = "_Waiting for a free slot: many conversations are running right now…_"
LENGTH_NOTICE = "_(The answer was cut short: it reached the maximum length.)_"
EMPTY_NOTICE = "_(The model returned an empty answer. Please try rephrasing.)_"


async def answer_message(services: Services, state: RequestState, writer: ReplySurface | None = None) -> str:
    """Run one request to a terminal outcome and return it
    ("answered" | "timeout" | "error" | "interrupted").

    `writer` is where the answer appears: Slack by default; `slackbot shell` passes a
    terminal one, which is why nothing here talks to Slack directly."""
    msg = state.message
    settings = services.settings
    if writer is None:
        writer = ReplyWriter(services.slack, msg.channel, msg.thread_ts, interval=settings.update_interval_seconds)
    recorded = False
    outcome, notice, detail = "error", "", ""
    try:
        with anyio.move_on_after(settings.async_timeout_seconds) as deadline:
            state.stage = "posting placeholder"
            state.placeholder_ts = await writer.start()
            rebuild = msg.in_existing_thread and not await services.store.thread_known(msg.thread)
            recorded = True  # before the call: finishing a request never started is a no-op
            await services.store.start_request(
                state.request_id, msg.thread, user_ts=msg.ts,
                placeholder_ts=state.placeholder_ts, started_at=time.time(),
            )
            options = await resolve_options(services, msg)
            state.stage = "loading history"
            history = await load_history(services, msg, rebuild=rebuild, exclude_ts={state.placeholder_ts})
            if options.history_messages is not None:
                history = history[-options.history_messages:] if options.history_messages else []
            prompt = build_prompt(options.system_prompt, history, msg.text,
                                  budget_tokens=settings.context_budget_tokens,
                                  reserve_for_answer=options.max_answer_tokens)
            if prompt.dropped_history:
                log.info("request %s: left out %d older messages to fit the context budget",
                         state.request_id, prompt.dropped_history)
            finish_reason = await _stream_answer(services, state, writer, prompt.messages, options)
            outcome = "answered"
            if finish_reason == "length":
                notice = LENGTH_NOTICE
            elif not writer.text:
                notice = EMPTY_NOTICE
        if deadline.cancelled_caught:
            outcome, detail = "timeout", f"no answer within {settings.async_timeout_seconds:g}s"
            notice = timeout_notice(settings.async_timeout_seconds)
    except anyio.get_cancelled_exc_class():
        outcome, notice, detail = "interrupted", INTERRUPTED_NOTICE, "cancelled"
        raise
    except Exception as exc:  # every failure becomes a clear line in the thread
        failure = describe(exc)
        outcome, notice, detail = "error", failure.message, failure.kind
        log.warning("request %s failed: %s (%s)", state.request_id, failure.kind, type(exc).__name__)
    finally:
        state.outcome = outcome
        state.stage = "finishing"
        with anyio.CancelScope(shield=True), anyio.move_on_after(FINALIZE_SECONDS):
            await _finalize(services, state, writer, outcome, notice, detail, recorded)
    return outcome


async def _stream_answer(services: Services, state: RequestState, writer: ReplySurface,
                         messages: list[dict], options: RequestOptions) -> str | None:
    """Wait for a model slot, then stream; the writer's flush task lives only as long
    as the stream. Errors are caught inside the task group so they leave it unwrapped."""
    settings = services.settings
    error: Exception | None = None
    finish_reason: str | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run)
        try:
            if services.model_slots.available_tokens < 1:
                state.stage = "waiting for a model slot"
                writer.set_status(WAITING_STATUS)
            async with services.model_slots:
                state.stage = "streaming"
                writer.set_status("_Thinking…_")
                result = await stream_chat(
                    services.openai, model=options.model, messages=messages,
                    max_tokens=options.max_answer_tokens, temperature=options.temperature,
                    reasoning_effort=options.reasoning_effort,
                    idle_timeout=settings.stream_idle_timeout_seconds, on_delta=writer.append,
                )
                finish_reason = result.finish_reason
        except Exception as exc:
            error = exc
        finally:
            tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return finish_reason


async def _finalize(services: Services, state: RequestState, writer: ReplySurface, outcome: str,
                    notice: str, detail: str, recorded: bool) -> None:
    msg = state.message
    # Slack gets its own, shorter bound: a final write that hangs must not use up the
    # whole of FINALIZE_SECONDS, or the request would never be closed in storage.
    with anyio.move_on_after(FINALIZE_SECONDS - STORE_RESERVE_SECONDS) as slack_bound:
        if writer.message_ts:
            await writer.finish(notice)
        elif notice and outcome != "interrupted":
            # The placeholder itself could not be posted; try once to say why.
            try:
                await writer.post_notice(notice)
            except Exception as exc:  # noqa: BLE001 - nothing more we can tell the user
                log.error("request %s: could not post the failure notice either: %s", state.request_id, exc)
    if slack_bound.cancelled_caught:
        log.warning("request %s: Slack did not take the final text within %gs", state.request_id,
                    FINALIZE_SECONDS - STORE_RESERVE_SECONDS)
    if recorded:
        try:
            await services.store.finish_request(
                state.request_id, outcome=outcome, user_text=msg.text, user_ts=msg.ts,
                reply_text=writer.text, finished_at=time.time(), detail=detail,
            )
        except Exception:
            log.exception("request %s: could not record its outcome", state.request_id)


async def load_history(services: Services, msg: IncomingMessage, *, rebuild: bool,
                       exclude_ts: set[str]) -> list[HistoryMessage]:
    """The thread's conversation from storage; with `rebuild` (a mention inside a thread the
    bot has not seen), first rebuilt once from `conversations.replies` and stored."""
    store = services.store
    if rebuild:
        try:
            replies = await services.slack.thread_replies(msg.channel, msg.thread_ts)
        except Exception as exc:  # noqa: BLE001 - answer without the history rather than not at all
            log.warning("could not read thread %s from Slack (%s); answering without it", msg.thread, exc)
            replies = []
        rebuilt = rebuild_history(replies, services.me.user_id, services.me.bot_id,
                                  exclude_ts=exclude_ts | {msg.ts})
        await store.import_history(msg.thread, rebuilt)
    return await store.load_history(msg.thread)


def rebuild_history(replies: list[dict], bot_user_id: str, bot_id: str, *,
                    exclude_ts: set[str]) -> list[HistoryMessage]:
    history: list[HistoryMessage] = []
    for m in replies:
        ts = m.get("ts")
        text = m.get("text") or ""
        if not isinstance(ts, str) or ts in exclude_ts or not isinstance(text, str) or not text.strip():
            continue
        mine = m.get("user") == bot_user_id or (bot_id and m.get("bot_id") == bot_id)
        if mine:
            history.append(HistoryMessage("assistant", text, ts))
        elif not m.get("bot_id"):
            history.append(HistoryMessage("user", strip_mention(text, bot_user_id), ts))
    return history
