"""Answer one message: recorded request → placeholder → history → attachments → model
(with the image tools) → streamed reply → stored exchange.

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import anyio
import anyio.lowlevel
from openai.types.chat import ChatCompletionMessageParam

from bot.metrics import first_call_timer
from bot.processing.attachments import Turn, image_urls, read_attachments
from bot.processing.context import RequestState, Services, UnrecordedOutcome
from bot.processing.conversation import build_prompt
from bot.processing.failures import INTERRUPTED_NOTICE, STOPPED_NOTICE, describe, timeout_notice
from bot.processing.image_tools import ImageTools
from bot.processing.message import IncomingMessage
from bot.processing.options import RequestOptions, resolve_options
from bot.processing.surface import PLACEHOLDER, Receipt, ReplySurface, SurfaceError
from bot.processing.tool_chat import chat_with_tools
from bot.retrying import doubling, retry
from bot.storage import StorageError
from bot.storage.base import HistoryMessage, Outcome, RequestRecord
from bot.usage import OverBudget, check_budget, record_usage

log = logging.getLogger(__name__)

START_SECONDS = 60.0  # bound on opening the answer (a placeholder post retried through an outage)
FINAL_WRITE_SECONDS = 90.0  # bound on the final Slack write (it may wait out Retry-After windows)
SHUTDOWN_WRITE_SECONDS = 3.0  # the same at shutdown (interrupted requests; `hurry`): exit under 10 s
# A request that lost its thread asks storage up to WITHDRAW_CHECKS times, this far apart,
# whether the takeover knew its first message (`_withdraw_if_orphaned`), all within
# WITHDRAW_SECONDS (Slack's chat.delete included).
WITHDRAW_CHECKS = 5
WITHDRAW_PAUSE_SECONDS = 1.0
WITHDRAW_SECONDS = 10.0
STORE_RESERVE_SECONDS = 1.0  # closing the request in storage, after the Slack write
LEASE_CHECK_SECONDS = 5.0  # asking storage, before the final write, whether the lease held (rare)
FINALIZE_SECONDS = FINAL_WRITE_SECONDS + STORE_RESERVE_SECONDS  # the longest a request outlives its deadline
SHUTDOWN_FINALIZE_SECONDS = SHUTDOWN_WRITE_SECONDS + STORE_RESERVE_SECONDS  # ... once shutdown interrupts it
RECORD_PAUSES = doubling(0.1)  # 0.1 s, then 0.2 s
FINISH_ATTEMPTS = 3  # finish_request tries (0.1 s, then 0.2 s apart) within the store reserve
WAITING_STATUS = "_Waiting for a free slot: many conversations are running right now…_"
LENGTH_NOTICE = "_(The answer was cut short: it reached the maximum length.)_"
EMPTY_NOTICE = "_(The model returned an empty answer. Please try rephrasing.)_"


SurfaceFactory = Callable[[RequestOptions], Awaitable[ReplySurface]]
# What a request ends as: storage's outcomes, and "stopped" (stored as "interrupted").
RequestOutcome = Outcome | Literal["stopped"]


async def answer_message(services: Services, state: RequestState, make_surface: SurfaceFactory) -> RequestOutcome:
    """Run one request to a terminal outcome and return it
    ("answered" | "timeout" | "error" | "interrupted" | "stopped").

    `make_surface(options)` gives where the answer appears: the nursery's builds the Slack
    one (native streaming, paced chat.update, or one finished message, as the options
    say); `slackbot shell` a terminal one. Nothing here talks to Slack."""
    msg = state.message
    openai_settings = services.settings.openai
    # First, and never raising: the options pick the surface's mode.
    options = await resolve_options(services, msg)
    writer = await make_surface(options)
    opening, progress = _Opening(), _Progress()
    outcome: RequestOutcome
    outcome, notice, detail = "error", "", ""
    retryable = True  # a failure's notice offers "Try again" unless a second try cannot mend it
    try:
        with anyio.move_on_after(openai_settings.async_timeout_seconds) as deadline:
            # The model request does not wait for the placeholder: the answer is opened
            # (recorded, then posted) beside the preparation of the request, and what the
            # model sends meanwhile is shown once the answer is open.
            error: Exception | None = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(_open, services, state, writer, opening, tg.cancel_scope.cancel)
                try:
                    await _prepare_and_stream(services, state, writer, options, opening, progress)
                except Exception as exc:  # kept out of the task group, so it leaves unwrapped
                    error = exc
            if opening.error is not None:
                raise opening.error
            if error is not None:
                raise error
            outcome = "answered"
            if progress.finish_reason == "length":
                notice = LENGTH_NOTICE
            elif not writer.text and progress.turn is not None and progress.turn.answerable:
                notice = EMPTY_NOTICE
        if deadline.cancelled_caught:
            outcome, detail = "timeout", f"no answer within {openai_settings.async_timeout_seconds:g}s"
            notice = timeout_notice(openai_settings.async_timeout_seconds)
    except anyio.get_cancelled_exc_class():
        if state.stop_reason:  # the user pressed Stop (the nursery set it before cancelling)
            outcome, notice, detail = "stopped", STOPPED_NOTICE, state.stop_reason
        elif state.lease_lost:
            outcome, notice, detail = "interrupted", INTERRUPTED_NOTICE, "the thread's lease passed to another replica"
        else:
            outcome, notice, detail = "interrupted", INTERRUPTED_NOTICE, "cancelled"
        raise
    except Exception as exc:  # every failure becomes a clear line in the thread
        failure = describe(exc)
        outcome, notice, detail, retryable = "error", failure.message, failure.kind, failure.retryable
        services.metrics.request_errors.labels(kind=failure.kind).inc()
        log.warning(
            "request %s failed: %s (%s)",
            state.request_id,
            failure.kind,
            type(exc).__name__,
            extra={"request_id": state.request_id, "slack_thread": str(msg.thread), "error_kind": failure.kind},
        )
    finally:
        state.outcome = outcome
        state.stage = "finishing"
        turn = progress.turn
        if turn is not None and turn.notes:  # files not read, documents trimmed: said under the answer
            notice = "\n".join([*turn.notes, notice]).strip()
        with anyio.CancelScope(shield=True):
            # Before the final write, not after: the thread stays held until the request
            # ends, and a follow-up sent as soon as the answer shows must find it free.
            # (The outcome recorded is the one known now: an answer Slack then refuses
            # still used its tokens.)
            if progress.model_called:
                await _record_usage(services, msg.user, options.model, _stored(outcome), progress)
            outcome = await _finalize(
                services,
                state,
                writer,
                outcome,
                notice,
                detail,
                opening.recorded,
                retryable=retryable,
                user_text=turn.stored_text if turn is not None else msg.text,
            )
        services.metrics.reply_latency.labels(outcome=outcome).observe(anyio.current_time() - state.started_at)
    return outcome


async def _record_usage(services: Services, user: str, model: str, outcome: Outcome, progress: _Progress) -> None:
    """The request's tokens: the chat model's, and the image model's when it drew (its
    own row, counted as no further request)."""
    now = time.time()
    await record_usage(
        services.store,
        user=user,
        model=model,
        outcome=outcome,
        tokens_in=progress.tokens_in,
        tokens_out=progress.tokens_out,
        now=now,
        timeout=STORE_RESERVE_SECONDS,
    )
    tools = progress.image_tools
    if tools is not None and (tools.tokens_in or tools.tokens_out):
        await record_usage(
            services.store,
            user=user,
            model=services.settings.media.image_model,
            outcome=outcome,
            tokens_in=tools.tokens_in,
            tokens_out=tools.tokens_out,
            now=now,
            timeout=STORE_RESERVE_SECONDS,
            requests=0,
        )


@dataclass
class _Opening:
    """The answer's opening (`_open`), which runs beside the preparation of the model
    request: `done` once the request is recorded and the answer posted, or either failed."""

    done: anyio.Event = field(default_factory=anyio.Event)
    recorded: bool = False  # start_request was called: the request is to be finished in storage
    error: Exception | None = None  # posting the answer failed: the request ends with it


@dataclass
class _Progress:
    """How far the preparation got, for the final write (the notes of unread files) and
    the stored exchange."""

    turn: Turn | None = None
    finish_reason: str | None = None
    model_called: bool = False  # a model stream was started (its tokens count, whatever the end)
    tokens_in: int = 0  # the stream's usage (it comes at its end: 0 for a stream cut short)
    tokens_out: int = 0
    image_tools: ImageTools | None = None  # their calls' tokens count too (under the image model)


async def _open(
    services: Services, state: RequestState, writer: ReplySurface, opening: _Opening, fail: Callable[[], None]
) -> None:
    """Record the request under the thread's lease, then post the answer's first message
    (or open its stream). In that order, so that a crash at any point leaves no message
    that no takeover knows of: a recorded request's first message is found in its
    thread (a placeholder's metadata says which message it answers), and one that
    cannot be found there (a native stream) has its id recorded as soon as it is known.
    One that lands after a takeover read the thread (this process paused or cut off
    while the post was on the wire) is withdrawn by this request itself, once it learns
    its lease is gone (`_withdraw_if_orphaned`).
    A failure to record or to post ends the request (`fail` cancels the preparation and
    the model call beside it)."""
    msg = state.message
    try:
        opening.recorded = True  # before the call: finishing a request never started is a no-op
        if not await services.store.start_request(
            state.request_id,
            msg.thread,
            user_ts=msg.ts,
            placeholder_ts="",
            started_at=time.time(),
            owner=state.owner,
            fence=state.fence,
        ):
            # The thread's lease passed to another replica before the request was even
            # recorded: it is theirs now. End here, as a shutdown would; nothing is
            # posted or stored but the notice (nobody else knows of this request).
            log.warning("request %s: the lease on %s was lost before it started", state.request_id, msg.thread)
            opening.recorded = False
            state.lose_lease()
            return
        state.placeholder_ts = await _start(state, writer)
        if state.placeholder_ts and not writer.opening_marked:
            await _record_placeholder(services, state, streamed=writer.placeholder_streams)
    except Exception as exc:
        opening.error = exc
        fail()
    finally:
        opening.done.set()


async def _record_placeholder(services: Services, state: RequestState, *, streamed: bool) -> None:
    """Record the id of an answer's first message that a takeover could not find in the
    thread by itself (one fenced UPDATE). Refused: the lease passed on, and the request
    with it. A storage error costs nothing but that: the final write records it anyway."""
    try:
        if not await services.store.record_placeholder(
            state.request_id, state.placeholder_ts, fence=state.fence, streamed=streamed
        ):
            log.warning("request %s: the lease on %s was lost as it opened", state.request_id, state.message.thread)
            state.lose_lease()
    except StorageError as exc:
        log.warning(
            "request %s: could not record its first message %s: %s", state.request_id, state.placeholder_ts, exc
        )


async def _prepare_and_stream(
    services: Services,
    state: RequestState,
    writer: ReplySurface,
    options: RequestOptions,
    opening: _Opening,
    progress: _Progress,
) -> None:
    """History, attachments, prompt, then the model's stream into the surface. It waits
    for the answer to be open only where it needs it: to read a thread the bot has not
    seen (its own placeholder left out), to show progress while reading files, and
    before it returns (so that the request is recorded before it is finished)."""
    msg = state.message
    openai_settings = services.settings.openai
    # Before anything is read or downloaded and before a model slot is taken; a request
    # already running is never cut by a budget.
    refusal = await check_budget(services.store, options.budgets, msg.user, now=time.time())
    if refusal is not None:  # over a monthly budget: its one line, and no model call
        raise OverBudget(refusal)
    state.stage = "loading history"
    rebuild = msg.in_existing_thread and not await services.store.thread_known(msg.thread)
    if rebuild:
        await opening.done.wait()
    history = await load_history(services, msg, writer, rebuild=rebuild, exclude_ts={state.placeholder_ts})
    if options.history_messages is not None:
        history = history[-options.history_messages :] if options.history_messages else []
    if msg.files or image_urls(msg.text):
        await opening.done.wait()
    state.stage = "reading attachments"
    turn = progress.turn = await read_attachments(
        services,
        state,
        writer,
        system_prompt=options.system_prompt,
        reserve_for_answer=options.max_answer_tokens,
    )
    prompt = build_prompt(
        options.system_prompt,
        history,
        turn.user_text,
        budget_tokens=openai_settings.context_budget_tokens,
        reserve_for_answer=options.max_answer_tokens,
        user_parts=turn.image_parts,
        parts_tokens=turn.image_tokens,
    )
    if prompt.dropped_history:
        log.info(
            "request %s: left out %d older messages to fit the context budget", state.request_id, prompt.dropped_history
        )
    if turn.answerable:  # else only unreadable files came: their notes are the whole answer
        image_tools = ImageTools(services, state, writer, turn.images, turn.notes) if services.media else None
        progress.image_tools = image_tools
        progress.model_called = True
        progress.finish_reason = await _stream_answer(
            services, state, writer, prompt.messages, options, opening.done, progress, image_tools
        )
    await opening.done.wait()


async def _start(state: RequestState, writer: ReplySurface) -> str:
    """Open the answer. Shielded: a cancellation while Slack creates the message would
    leave one whose id we never learnt (so never finalized). Bounded by START_SECONDS —
    long enough for a post retried through a short outage — and shortened by a shutdown
    (`RequestState.hurry`), never by a lost lease: the message is then withdrawn if the
    takeover did not know of it (`_withdraw_if_orphaned`), which takes its id.
    Cancellation takes effect right after."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(START_SECONDS) as posting:
        state.watch(posting, opening=True)
        try:
            return await writer.start()
        finally:
            state.final_write = None
    raise SurfaceError("posting the answer", "timeout")


async def _stream_answer(
    services: Services,
    state: RequestState,
    writer: ReplySurface,
    messages: list[ChatCompletionMessageParam],
    options: RequestOptions,
    opened: anyio.Event,
    progress: _Progress,
    image_tools: ImageTools | None = None,
) -> str | None:
    """Wait for a model slot, then stream; the writer's flush task starts once the answer
    is open (`opened`) and lives only as long as the stream. Errors are caught inside
    the task group so they leave it unwrapped."""
    openai_settings = services.settings.openai
    error: Exception | None = None
    finish_reason: str | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(_run_when_open, writer, opened)
        try:
            if services.model_slots.available_tokens < 1:
                await opened.wait()  # the wait is shown in the answer once it is open
                state.stage = "waiting for a model slot"
                services.metrics.requests.labels(outcome="queued").inc()
                writer.set_status(WAITING_STATUS)
            async with services.model_slots:
                state.stage = "streaming"
                writer.set_status(PLACEHOLDER)
                result = await chat_with_tools(
                    image_tools,
                    services.openai,
                    model=options.model,
                    messages=messages,
                    max_tokens=options.max_answer_tokens,
                    temperature=options.temperature,
                    reasoning_effort=options.reasoning_effort,
                    idle_timeout=openai_settings.stream_idle_timeout_seconds,
                    on_delta=first_call_timer(
                        writer.append,
                        lambda: services.metrics.first_token_latency.observe(anyio.current_time() - state.started_at),
                    ),
                )
                finish_reason = result.finish_reason
                progress.tokens_in, progress.tokens_out = result.prompt_tokens, result.completion_tokens
                services.metrics.openai_tokens.labels(model=options.model, direction="in").inc(result.prompt_tokens)
                services.metrics.openai_tokens.labels(model=options.model, direction="out").inc(
                    result.completion_tokens
                )
        except Exception as exc:
            error = exc
        finally:
            tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return finish_reason


async def _run_when_open(writer: ReplySurface, opened: anyio.Event) -> None:
    await opened.wait()
    await writer.run()


async def _finalize(
    services: Services,
    state: RequestState,
    writer: ReplySurface,
    outcome: RequestOutcome,
    notice: str,
    detail: str,
    recorded: bool,
    *,
    retryable: bool = True,
    user_text: str | None = None,
) -> RequestOutcome:
    """Write the final text, then record the outcome; returns the outcome as it ended
    (an answer Slack did not take is an error; one taken over is interrupted)."""
    msg = state.message
    if recorded and not state.lease_lost:
        # (A lease found gone is lost, and `_taken_over` says so; one storage cannot
        # confirm in time is treated as gone: the takeover then writes the notice.)
        with anyio.move_on_after(LEASE_CHECK_SECONDS) as asking:
            await state.confirm_lease()
        if asking.cancelled_caught:
            log.warning("request %s: could not confirm its thread's lease in time", state.request_id)
            state.lose_lease()
    if _taken_over(state, recorded):
        # Only here, before any final write: once one was tried, a takeover may have
        # found its receipt and closed the request naming no message (a placeholder
        # with a receipt is not an opening to it), and that answer must stay.
        if state.placeholder_ts:
            await _withdraw_if_orphaned(services, state, writer)
        state.outcome = "interrupted"
        return "interrupted"
    # The final write waits its turn in the workspace's budget for as long as Slack's
    # Retry-After asks (up to FINAL_WRITE_SECONDS); a shutdown shortens that (`hurry`).
    # Storage gets its own bound after it, so a slow Slack never leaves the request open.
    bound = SHUTDOWN_WRITE_SECONDS if outcome == "interrupted" else FINAL_WRITE_SECONDS
    delivered = False
    with anyio.move_on_after(bound) as slack_bound:
        state.watch(slack_bound)
        try:
            receipt = Receipt(state.request_id, _stored(outcome), msg.ts, try_again=outcome != "answered" and retryable)
            delivered = await writer.finish(notice, receipt)
        except Exception as exc:
            log.error("request %s: could not write the final text: %s", state.request_id, exc)
        finally:
            state.final_write = None
    if _taken_over(state, recorded):  # lost while writing: the write was cut short
        state.outcome = "interrupted"
        return "interrupted"
    if slack_bound.cancelled_caught:
        log.warning("request %s: Slack did not take the final text within %gs", state.request_id, bound)
    if not delivered and outcome == "answered":
        # Never stored as answered what Slack does not show.
        outcome, detail = "error", "answer not delivered to Slack"
        state.outcome = outcome
    if not delivered and recorded and outcome == "interrupted":
        # Shutdown cut the notice short (its Slack budget spent, say): the message may
        # still say "Thinking…" or be streaming. Left in flight, the request is taken
        # over — by the next start, or at once by another replica — which stops the
        # stream and writes the notice; closed here, nothing ever would.
        log.warning(
            "request %s: its interrupted notice did not reach Slack; left in flight for a takeover to write it",
            state.request_id,
        )
        return outcome
    if recorded:
        with anyio.move_on_after(STORE_RESERVE_SECONDS):
            await _record_outcome(
                services, state, writer, outcome, detail, user_text=msg.text if user_text is None else user_text
            )
    return outcome


async def _withdraw_if_orphaned(services: Services, state: RequestState, writer: ReplySurface) -> None:
    """The request lost its thread with its first message posted, before any final
    write: if the takeover closed it without that message (it read the thread before the
    message landed — this process paused or cut off from storage while the post was on
    the wire — and posted a notice of its own), nobody will ever finish it, so it is
    withdrawn. Left as it is if the takeover recorded it as the request's (it edited it
    into its notice), or cannot be told: storage out of reach, or the takeover still
    between its read of the thread and its outcome after WITHDRAW_CHECKS looks (then it
    stays, and is logged). Bounded by WITHDRAW_SECONDS, and shortened by a shutdown,
    as the final write is."""
    mine = state.placeholder_ts
    with anyio.move_on_after(WITHDRAW_SECONDS) as bound:
        state.watch(bound)
        try:
            record = await _closed_record(services, state)
            if record is None:
                return
            if record.placeholder_ts == mine:
                log.info("request %s: the takeover kept its first message %s", state.request_id, mine)
                return
            try:
                await writer.withdraw()
            except SurfaceError as exc:
                log.warning(
                    "request %s: could not withdraw its first message %s, posted after the takeover's notice (%s)",
                    state.request_id,
                    mine,
                    exc.code,
                )
                return
            log.warning(
                "request %s: its first message %s landed after the takeover's notice (it was %s); withdrawn",
                state.request_id,
                mine,
                f"closed with message {record.placeholder_ts}" if record.placeholder_ts else "closed without one",
            )
        finally:
            state.final_write = None
    if bound.cancelled_caught:
        log.warning("request %s: no time left to tell whether its first message %s is orphaned", state.request_id, mine)


async def _closed_record(services: Services, state: RequestState) -> RequestRecord | None:
    """The request's record once the takeover closed it, looked up to WITHDRAW_CHECKS
    times, WITHDRAW_PAUSE_SECONDS apart; None (logged) if it is still in flight, or
    storage cannot say."""
    for n in range(WITHDRAW_CHECKS):
        if n:
            await anyio.sleep(WITHDRAW_PAUSE_SECONDS)
        try:
            record = await services.store.request_record(state.request_id)
        except StorageError as exc:
            log.warning(
                "request %s: cannot tell whether the takeover knew its first message %s (%s); left as it is",
                state.request_id,
                state.placeholder_ts,
                exc,
            )
            return None
        if record is None or record.status != "in_flight":
            return record
    log.warning(
        "request %s: still in flight after its lease passed on; its first message %s is left to the takeover",
        state.request_id,
        state.placeholder_ts,
    )
    return None


def _stored(outcome: RequestOutcome) -> Outcome:
    """Storage keeps a user's Stop as "interrupted" (its detail says who stopped it)."""
    return "interrupted" if outcome == "stopped" else outcome


def _taken_over(state: RequestState, recorded: bool) -> bool:
    """Another replica owns the thread and takes this recorded request over (its notice,
    its stored outcome): a write from here could only overwrite what it shows. (A request
    that was never recorded still fixes its own placeholder: nobody else knows of it.
    One whose first message the takeover did not know withdraws it, and writes nothing
    else: `_withdraw_if_orphaned`.)"""
    if state.lease_lost and recorded:
        log.warning("request %s: lease lost; leaving the answer to the replica that took it over", state.request_id)
        return True
    return False


async def _record_outcome(
    services: Services,
    state: RequestState,
    writer: ReplySurface,
    outcome: RequestOutcome,
    detail: str,
    *,
    user_text: str,
) -> None:
    # A transient storage error here (locked, briefly full) would leave the request
    # "in flight", and a takeover would then overwrite a delivered answer with the
    # interrupted notice: retry within STORE_RESERVE_SECONDS. If storage still does not
    # take it, `state.unrecorded` stays set and the replica records it later.
    late = state.unrecorded = UnrecordedOutcome(
        request_id=state.request_id,
        thread=state.message.thread,
        outcome=_stored(outcome),
        user_text=user_text,
        user_ts=state.message.ts,
        reply_text=writer.text,
        finished_at=time.time(),
        detail=detail,
        placeholder_ts=state.placeholder_ts,
    )

    async def record() -> None:
        closed = await late.record(services.store, fence=state.fence)
        state.unrecorded = None
        if not closed:
            # Fenced off: another replica took the thread over (and stored its own outcome).
            log.warning(
                "request %s: outcome not stored; the thread's lease passed to another replica", state.request_id
            )

    def pause(n: int, exc: StorageError) -> float:
        log.warning("request %s: could not record its outcome (%s); retrying", state.request_id, exc)
        return RECORD_PAUSES(n, exc)

    try:
        await retry(record, errors=StorageError, attempts=FINISH_ATTEMPTS, pause=pause)
    except Exception:  # the last StorageError, or anything else at once
        log.exception("request %s: could not record its outcome", state.request_id)


async def load_history(
    services: Services, msg: IncomingMessage, surface: ReplySurface, *, rebuild: bool, exclude_ts: set[str]
) -> list[HistoryMessage]:
    """The thread's conversation from storage; with `rebuild` (a mention inside a thread the
    bot has not seen), first read once from the surface (Slack's thread) and stored."""
    store = services.store
    if rebuild:
        try:
            rebuilt = await surface.read_thread(exclude_ts | {msg.ts})
        except SurfaceError as exc:  # answer without the history rather than not at all
            log.warning("could not read thread %s (%s); answering without it", msg.thread, exc.code)
            rebuilt = []
        await store.import_history(msg.thread, rebuilt)
    return await store.load_history(msg.thread)
