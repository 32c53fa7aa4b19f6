"""The chat call with the image tools offered: stream, run the tools the model called,
give it the results, stream again — at most MAX_TOOL_ROUNDS times.

Same contract as `openai_chat.stream_chat` (the caller holds the model slot, the
request's deadline covers everything, text goes to `on_delta`), plus:
- the first time an endpoint refuses the `tools` parameter, the model is remembered in
  `MediaServices.tools_refused` and the keyword rule in `image_tools` decides instead,
  for this request and every later one;
- text of a later round starts on a new paragraph, so it does not run into the text
  the model wrote before calling a tool;
- token counts add up over the rounds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Unpack

import openai
from openai.types.chat import ChatCompletionMessageParam

from bot.processing.image_tools import ImageTools, api_message, refuses_tools
from bot.processing.openai_chat import ChatResult, StreamOptions, stream_chat

log = logging.getLogger(__name__)

MAX_TOOL_ROUNDS = 3


async def chat_with_tools(
    tools: ImageTools | None,
    client: openai.AsyncOpenAI,
    *,
    model: str,
    messages: list[ChatCompletionMessageParam],
    on_delta: Callable[[str], None],
    **kwargs: Unpack[StreamOptions],
) -> ChatResult:
    """`stream_chat`, with `tools` offered when given and enabled."""
    if tools is None or not tools.enabled:
        return await stream_chat(client, model=model, messages=messages, on_delta=on_delta, **kwargs)
    media = tools.services.media
    refused = media is not None and model in media.tools_refused
    if refused:
        reply = await tools.fallback(tools.state.message.text)
        if reply is not None:
            on_delta(reply)
            return ChatResult(text=reply, finish_reason="stop")
    total_in = total_out = 0
    written: list[str] = []
    rounds = 0

    def delta(piece: str) -> None:
        if rounds and not written and _needs_break(tools):
            piece = "\n\n" + piece
        written.append(piece)
        on_delta(piece)

    while True:
        offered = tools.specs() if not refused and rounds < MAX_TOOL_ROUNDS else None
        written.clear()
        try:
            result = await stream_chat(client, model=model, messages=messages, on_delta=delta, tools=offered, **kwargs)
        except openai.APIStatusError as exc:
            if not offered or rounds or not refuses_tools(exc):  # a later round's 400 is not a refusal
                raise
            log.warning(
                "model %s refused function calling (%s); using the keyword rule for images from now on",
                model,
                api_message(exc),
            )
            if media is not None:
                media.tools_refused.add(model)
            refused = True
            reply = await tools.fallback(tools.state.message.text)
            if reply is not None:
                on_delta(reply)
                return ChatResult(text=reply, finish_reason="stop", prompt_tokens=total_in, completion_tokens=total_out)
            continue
        total_in += result.prompt_tokens
        total_out += result.completion_tokens
        if not result.tool_calls or not offered:
            result.prompt_tokens, result.completion_tokens = total_in, total_out
            if tools.made and not tools.writer.text.strip():  # the picture was the answer
                on_delta("Here is the image.")
                result.text = "Here is the image."
            return result
        messages = [
            *messages,
            {
                "role": "assistant",
                "content": result.text or None,
                "tool_calls": [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in result.tool_calls
                ],
            },
        ]
        for call in result.tool_calls:
            outcome = await tools.run(call)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": outcome})
        rounds += 1


def _needs_break(tools: ImageTools) -> bool:
    text = tools.writer.text
    return bool(text) and not text.endswith("\n")
