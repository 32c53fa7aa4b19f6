"""One chat stream against the fake OpenAI (real SSE over httpx2): chunks read as the JSON
the SDK parsed (no model object per chunk), the SDK's own errors for a refused request
and for an `error` object in the stream, tool calls assembled, the idle-gap deadline."""

from __future__ import annotations

import anyio
import httpx2
import openai
import openai._base_client
import pytest

from bot.openai_client import openai_client
from bot.processing.openai_chat import StreamStalled, stream_chat
from tests.fakes.openai import Behaviour, FakeOpenAI
from tests.harness import test_settings

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def ai() -> FakeOpenAI:
    return FakeOpenAI(api_key="sk-test")


@pytest.fixture
def no_models(monkeypatch):
    """Fail if the SDK builds its pydantic models for the chunks: the fast path must not."""

    def refuse(*args, **kwargs):
        raise AssertionError("a chunk was built as an SDK model")

    monkeypatch.setattr(openai._base_client, "construct_type", refuse)  # what the SDK builds chunks with


async def _stream(ai: FakeOpenAI, **kwargs):
    deltas: list[str] = []
    settings = test_settings()
    async with openai_client(settings.openai, transport=httpx2.MockTransport(ai.handle), max_retries=0) as client:
        result = await stream_chat(
            client,
            model="gpt-5-mini",
            messages=MESSAGES,
            max_tokens=100,
            idle_timeout=kwargs.pop("idle_timeout", 3.0),
            on_delta=deltas.append,
            **kwargs,
        )
    return result, deltas


async def test_text_usage_and_finish_reason_from_plain_json_chunks(ai, no_models):
    ai.enqueue(Behaviour(text="one two three four", chunks=4, finish_reason="length"))
    result, deltas = await _stream(ai, temperature=0.5)
    assert "".join(deltas) == result.text == "one two three four" and len(deltas) == 4
    assert result.finish_reason == "length"
    assert result.prompt_tokens > 0 and result.completion_tokens > 0
    sent = ai.requests[-1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["max_completion_tokens"] == 100 and sent["temperature"] == 0.5
    assert "reasoning_effort" not in sent  # unset parameters are not sent


async def test_tool_call_fragments_are_assembled(ai, no_models):
    ai.enqueue(Behaviour(tool_calls=[("generate_image", {"prompt": "a red fox"})]))
    tools = [{"type": "function", "function": {"name": "generate_image", "parameters": {"type": "object"}}}]
    result, deltas = await _stream(ai, tools=tools)
    assert deltas == [] and result.finish_reason == "tool_calls"
    [call] = result.tool_calls
    assert call.name == "generate_image" and call.id.startswith("call_")
    assert call.arguments == '{"prompt": "a red fox"}'


async def test_an_error_object_in_the_stream_raises_the_sdks_api_error(ai, no_models):
    ai.enqueue(Behaviour(text="half an answer here", chunks=4, error_after=2))
    with pytest.raises(openai.APIError) as raised:
        await _stream(ai)
    assert not isinstance(raised.value, openai.APIStatusError)  # the status was 200
    assert "had an error while processing" in raised.value.message
    assert raised.value.body["type"] == "server_error"


async def test_a_refused_request_raises_the_sdks_status_error(ai, no_models):
    ai.enqueue(Behaviour(status=429, error_code="rate_limit_exceeded"))
    with pytest.raises(openai.RateLimitError):
        await _stream(ai)
    ai.enqueue(Behaviour(status=400, error_code="context_length_exceeded"))
    with pytest.raises(openai.BadRequestError) as raised:
        await _stream(ai)
    assert raised.value.code == "context_length_exceeded"


async def test_a_broken_body_raises_a_connection_error(ai, no_models):
    ai.enqueue(Behaviour(text="will be cut off", chunks=3, cut_after=1))
    with pytest.raises(openai.APIConnectionError):
        await _stream(ai)


async def test_a_silent_stream_is_cut_at_the_idle_gap_and_closed(ai):
    ai.enqueue(Behaviour(text="starts then stops", chunks=3, stall_after=1))
    with anyio.fail_after(5), pytest.raises(StreamStalled):
        await _stream(ai, idle_timeout=0.3)
    await ai.wait_until(lambda: ai.open_streams == 0, timeout=2)


async def test_the_no_models_guard_would_catch_the_sdks_model_path(ai, no_models):
    """The guard above is real: the SDK's own typed stream builds a model per chunk."""
    async with openai_client(
        test_settings().openai, transport=httpx2.MockTransport(ai.handle), max_retries=0
    ) as client:
        stream = await client.chat.completions.create(model="gpt-5-mini", messages=MESSAGES, stream=True)
        with pytest.raises(AssertionError, match="built as an SDK model"):
            async for _ in stream:
                pass
        await stream.close()
