"""Stream one chat completion from an OpenAI-compatible endpoint, with two deadlines.

- The request's overall deadline is the caller's `move_on_after`; here we only make the
  SDK's own HTTP timeout fit inside what is left of it, so the SDK never waits longer
  than the request may.
- The idle-gap deadline is a cancel scope whose deadline moves forward with every chunk:
  a stream that goes silent (the commonest real hang) is cut after
  `idle_timeout` seconds, not after the SDK's 600 s read timeout.

The stream is always closed by its `async with`, whether it ends, fails, stalls or is
cancelled, so no connection is left open.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Required, TypedDict

import anyio
import httpx2
import openai
from openai.types.chat import ChatCompletionFunctionToolParam, ChatCompletionMessageParam


class StreamStalled(Exception):
    """The model stopped sending for longer than the idle-gap deadline."""

    def __init__(self, idle_timeout: float) -> None:
        super().__init__(f"no data from the model for {idle_timeout:g}s")
        self.idle_timeout = idle_timeout


@dataclass
class ToolCall:
    """One function call the model asked for, assembled from the stream's deltas."""

    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it (may be malformed)


@dataclass
class ChatResult:
    text: str
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tool_calls: list[ToolCall] = field(default_factory=list)


class StreamOptions(TypedDict, total=False):
    """The keyword arguments of `stream_chat` that callers pass through unchanged
    (`tool_chat.chat_with_tools`)."""

    max_tokens: Required[int]
    idle_timeout: Required[float]
    temperature: float | None
    reasoning_effort: str | None


def _optional(**params: object) -> dict[str, Any]:
    """Only the parameters that were set: some models reject e.g. `temperature`.
    (Any: they are spread into the SDK's keyword arguments, each of its own type.)"""
    return {k: v for k, v in params.items() if v is not None}


def sdk_timeout() -> httpx2.Timeout:
    """The SDK's HTTP timeout for a call made now: what is left of the caller's deadline
    (600 s without one; half a second at least), of which 10 s at most to connect. The
    deadline itself is the caller's cancel scope: this keeps the SDK's own timer inside
    it, for every OpenAI call (the chat stream here, the image tools' calls)."""
    deadline = anyio.current_effective_deadline()
    left = deadline - anyio.current_time() if math.isfinite(deadline) else 600.0
    left = max(0.5, left)
    return httpx2.Timeout(left, connect=min(10.0, left))


async def stream_chat(
    client: openai.AsyncOpenAI,
    *,
    model: str,
    messages: list[ChatCompletionMessageParam],
    max_tokens: int,
    idle_timeout: float,
    temperature: float | None = None,
    reasoning_effort: str | None = None,
    on_delta: Callable[[str], None],
    tools: list[ChatCompletionFunctionToolParam] | None = None,
) -> ChatResult:
    """Stream the answer, calling `on_delta(piece)` for each piece of text as it arrives.

    With `tools`, function calls the model makes arrive as `delta.tool_calls` fragments
    (id and name first, then the arguments in pieces, keyed by `index`); they are
    assembled into `ChatResult.tool_calls`.

    Raises openai errors as the SDK raises them, or StreamStalled.
    """
    body: dict[str, object] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": max_tokens,
        **_optional(temperature=temperature, reasoning_effort=reasoning_effort, tools=tools or None),
    }
    # The SDK's own request path (retries, error types, SSE decoding and its handling of
    # an `error` object in the stream), with the chunks left as the JSON it parsed: a
    # pydantic model built per chunk, and the parameters transformed through their type
    # annotations, cost about a tenth of the bot's CPU per answer. The parameters are
    # plain JSON already.
    stream = await client.post(
        "/chat/completions",
        cast_to=object,
        body=body,
        options={"timeout": sdk_timeout()},
        stream=True,
        stream_cls=openai.AsyncStream[object],
    )
    result = ChatResult(text="", finish_reason=None)
    pieces: list[str] = []
    calls: dict[int, ToolCall] = {}
    async with stream:
        with anyio.CancelScope(deadline=anyio.current_time() + idle_timeout) as idle:
            async for chunk in stream:
                idle.deadline = anyio.current_time() + idle_timeout
                if isinstance(chunk, dict):
                    _take(chunk, result, pieces, calls, on_delta)
        if idle.cancelled_caught:
            raise StreamStalled(idle_timeout)
    result.text = "".join(pieces)
    result.tool_calls = [calls[i] for i in sorted(calls) if calls[i].name]
    return result


def _take(
    chunk: dict[str, Any],
    result: ChatResult,
    pieces: list[str],
    calls: dict[int, ToolCall],
    on_delta: Callable[[str], None],
) -> None:
    """One `chat.completion.chunk` as JSON: its text, tool-call fragments, finish reason
    and usage. Anything missing or of another type is skipped, as the SDK's lenient
    models would leave it None."""
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        result.prompt_tokens = _int(usage.get("prompt_tokens"))
        result.completion_tokens = _int(usage.get("completion_tokens"))
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return
    choice = choices[0]
    delta = choice.get("delta")
    if isinstance(delta, dict):
        content = delta.get("content")
        if isinstance(content, str) and content:
            pieces.append(content)
            on_delta(content)
        for fragment in delta.get("tool_calls") or ():
            if not isinstance(fragment, dict) or not isinstance(fragment.get("index"), int):
                continue
            call = calls.setdefault(fragment["index"], ToolCall(id="", name="", arguments=""))
            call.id = _str(fragment.get("id")) or call.id
            function = fragment.get("function")
            if isinstance(function, dict):
                call.name = _str(function.get("name")) or call.name
                call.arguments += _str(function.get("arguments"))
    finish = choice.get("finish_reason")
    if isinstance(finish, str) and finish:
        result.finish_reason = finish


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""
