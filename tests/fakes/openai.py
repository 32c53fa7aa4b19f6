"""A fake OpenAI Chat Completions API that speaks the real wire format.

Why: the real `openai.AsyncOpenAI` client parses its answers, so the bot's streaming,
error handling and cleanup are tested against genuine SSE chunks, error JSON and status
codes. All waiting is `anyio.sleep`, so latency, stalls and hangs cost virtual time
under a Trio MockClock and real time over `tests.fakes.servers.openai_server`.

Each chat request's behaviour comes from `enqueue(...)`d Behaviours first, else from
`script(request_json)`; the default script echoes the last user message. A Behaviour
with `tool_calls` streams function calls instead of text; `reject_tools` makes the fake
refuse the `tools` parameter as models without function calling do. Image requests take
their behaviour from `image_queue` and answer with real base64 PNGs (an edit returns
the source image inverted).
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import io
import json
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx2

CREATED = 1_700_000_000


@dataclass
class Behaviour:
    """How to answer one chat request. Chunk counts below count content chunks; the role
    chunk OpenAI sends first always goes out (after `latency`)."""

    text: str | None = None  # None: the script's default (echo)
    latency: float = 0.0  # before the first chunk (streaming) or the response (not streaming)
    chunk_delay: float = 0.0  # between content chunks
    chunks: int = 5  # the text is split into this many content chunks (fewer if it is short)
    hang: bool = False  # never send the first chunk
    stall_after: int | None = None  # send N content chunks, then nothing, forever
    status: int | None = None  # answer with this HTTP error status instead
    error_code: str | None = None  # e.g. context_length_exceeded, rate_limit_exceeded, insufficient_quota
    cut_after: int | None = None  # send N content chunks, then break the body (no [DONE])
    # Send N content chunks, then an error object in the stream, as OpenAI does when a
    # stream fails after it started (HTTP 200 already sent): `data: {"error": {...}}`.
    error_after: int | None = None
    finish_reason: str = "stop"
    retry_after: float | None = None  # Retry-After header on an error answer
    # Function calls to stream instead of text: (name, arguments as a dict or raw JSON text).
    # The arguments go out in pieces, as OpenAI sends them; finish_reason becomes "tool_calls".
    tool_calls: list[tuple[str, dict | str]] | None = None


def last_user_text(request: dict) -> str:
    """The text of the last user message (text parts joined when content is a list)."""
    for message in reversed(request.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return "".join(part.get("text", "") for part in content if part.get("type") == "text")
            return str(content or "")
    return ""


def image_parts(request: dict) -> list[str]:
    """The image URLs (data URLs) of every image part in the request's user messages."""
    urls = []
    for message in request.get("messages") or []:
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, list):
            urls.extend(p["image_url"]["url"] for p in content if p.get("type") == "image_url")
    return urls


def echo(request: dict) -> Behaviour:
    return Behaviour(text="Echo: " + last_user_text(request))


_ERRORS = {  # status -> (type, default code, message)
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Request not allowed."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist or you do not have access to it."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again later."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
_MESSAGES = {
    "context_length_exceeded": "This model's maximum context length is 128000 tokens. However, your messages "
    "resulted in 130000 tokens. Please reduce the length of the messages.",
    "insufficient_quota": "You exceeded your current quota, please check your plan and billing details.",
}


def error_response(
    status: int, code: str | None = None, *, message: str | None = None, retry_after: float | None = None
) -> httpx2.Response:
    """An error in OpenAI's JSON shape, which the SDK maps to its exception classes."""
    kind, default_code, default_message = _ERRORS.get(status, _ERRORS[500 if status >= 500 else 400])
    code = code or default_code
    if code == "insufficient_quota":
        kind = "insufficient_quota"
    body = {
        "error": {
            "message": message or _MESSAGES.get(code or "", default_message),
            "type": kind,
            "param": "messages" if code == "context_length_exceeded" else None,
            "code": code,
        }
    }
    headers = {"x-request-id": "req_fake_error"}
    if retry_after is not None:
        headers["retry-after"] = f"{retry_after:g}"
    return httpx2.Response(status, json=body, headers=headers)


class _ClosingStream(httpx2.AsyncByteStream):
    """A response body that closes its generator when the response is closed.

    httpx2's wrapper for `content=<async generator>` only closes the generator when
    iteration ends; an `async with stream:` that exits early would leave it suspended
    until garbage collection. Closing it here makes `open_streams` exact."""

    def __init__(self, generator: AsyncIterator[bytes]) -> None:
        self._generator = generator

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._generator

    async def aclose(self) -> None:
        await self._generator.aclose()  # type: ignore[attr-defined]


class FakeOpenAI:
    """`POST /v1/chat/completions` (streaming and not, text or tool calls, vision parts
    recorded in `requests`), `POST /v1/images/generations` and `/v1/images/edits`, and
    `GET /v1/models`."""

    def __init__(
        self,
        *,
        api_key: str = "sk-test",
        script: Callable[[dict], Behaviour | str] | None = None,
        models: tuple[str, ...] = ("gpt-5-mini", "gpt-4o-mini"),
    ) -> None:
        self.api_key = api_key
        self.script = script or echo
        self.queue: list[Behaviour] = []
        self.models = list(models)
        self.requests: list[dict] = []  # every chat request body, in order
        self.reject_tools = False  # answer requests that offer `tools` with a 400, as non-tool models do
        self.image_requests: list[dict] = []  # every images/generations and images/edits request, parsed
        self.image_queue: list[Behaviour] = []  # how to answer the next image requests (text: raw b64_json)
        self.open_streams = 0  # streaming bodies started and not yet finished or closed
        self.max_open_streams = 0
        self.streams_finished = 0  # bodies that reached [DONE]
        self._ids = 0
        self._event: anyio.Event | None = None

    def enqueue(self, *behaviours: Behaviour | str) -> None:
        """Answer the next requests with these, in order, before falling back to `script`."""
        self.queue.extend(b if isinstance(b, Behaviour) else Behaviour(text=b) for b in behaviours)

    def _changed(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait_until(self, predicate: Callable[[], Any], timeout: float = 10.0) -> None:
        """Block until `predicate()` holds (re-checked when a request arrives or a stream
        opens or closes), e.g. `wait_until(lambda: fake.open_streams == 0)`."""
        with anyio.fail_after(timeout):
            while not predicate():
                if self._event is None:
                    self._event = anyio.Event()
                await self._event.wait()

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or key != self.api_key:
            shown = f"{key[:5]}***" if key else "(none)"
            return error_response(
                401,
                message=f"Incorrect API key provided: {shown}. You can find your API key "
                "at https://platform.openai.com/account/api-keys.",
            )
        path = request.url.path.rstrip("/")
        if request.method == "GET" and path.endswith("/models"):
            data = [{"id": m, "object": "model", "created": CREATED, "owned_by": "openai"} for m in self.models]
            return httpx2.Response(200, json={"object": "list", "data": data})
        if request.method == "POST" and path.endswith("/chat/completions"):
            return await self._chat(request)
        if request.method == "POST" and path.endswith(("/images/generations", "/images/edits")):
            return await self._images(request, "edits" if path.endswith("/edits") else "generations")
        return error_response(404, message=f"Invalid URL ({request.method} {request.url.path})")

    async def _chat(self, request: httpx2.Request) -> httpx2.Response:
        try:
            body = json.loads(request.content)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return error_response(400, message="We could not parse the JSON body of your request.")
        self.requests.append(body)
        self._changed()
        if not body.get("model") or not isinstance(body.get("messages"), list):
            return error_response(400, message="Missing required parameter: 'model' or 'messages'.")
        if self.reject_tools and body.get("tools"):
            return httpx2.Response(
                400,
                headers={"x-request-id": "req_fake_tools"},
                json={
                    "error": {
                        "message": "Unsupported parameter: 'tools' is not supported with this model.",
                        "type": "invalid_request_error",
                        "param": "tools",
                        "code": "unsupported_parameter",
                    }
                },
            )
        behaviour = self.queue.pop(0) if self.queue else self.script(body)
        if isinstance(behaviour, str):
            behaviour = Behaviour(text=behaviour)
        text = behaviour.text if behaviour.text is not None else echo(body).text or ""
        self._ids += 1
        completion_id = f"chatcmpl-fake{self._ids:06d}"
        headers = {"x-request-id": f"req_fake_{self._ids}", "openai-processing-ms": "1"}
        if behaviour.status is not None:
            await anyio.sleep(math.inf if behaviour.hang else behaviour.latency)
            return error_response(behaviour.status, behaviour.error_code, retry_after=behaviour.retry_after)
        if not body.get("stream"):
            await anyio.sleep(math.inf if behaviour.hang else behaviour.latency)
            return httpx2.Response(
                200,
                headers=headers,
                json={
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": CREATED,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                            "logprobs": None,
                            "finish_reason": behaviour.finish_reason,
                        }
                    ],
                    "usage": _usage(body, text),
                    "service_tier": "default",
                    "system_fingerprint": "fp_fake",
                },
            )
        events = self._events(body, behaviour, text, completion_id)
        return httpx2.Response(
            200, headers={**headers, "content-type": "text/event-stream; charset=utf-8"}, stream=_ClosingStream(events)
        )

    async def _events(self, body: dict, b: Behaviour, text: str, completion_id: str) -> AsyncIterator[bytes]:
        """The SSE body; `open_streams` counts it from its first step until it ends or is closed."""
        self.open_streams += 1
        self.max_open_streams = max(self.max_open_streams, self.open_streams)
        self._changed()
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def event(choices: list, usage: dict | None = None) -> bytes:
            chunk = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": body["model"],
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
                "choices": choices,
            }
            if include_usage:
                chunk["usage"] = usage
            return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()

        def delta(content: dict, finish: str | None = None) -> list:
            return [{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}]

        try:
            await anyio.sleep(math.inf if b.hang else b.latency)
            yield event(delta({"role": "assistant", "content": "" if not b.tool_calls else None, "refusal": None}))
            if b.tool_calls:
                for index, (name, arguments) in enumerate(b.tool_calls):
                    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
                    yield event(
                        delta(
                            {
                                "tool_calls": [
                                    {
                                        "index": index,
                                        "id": f"call_fake{self._ids:04d}{index}",
                                        "type": "function",
                                        "function": {"name": name, "arguments": ""},
                                    }
                                ]
                            }
                        )
                    )
                    for piece in _split(raw, 3):
                        await anyio.sleep(b.chunk_delay)
                        yield event(delta({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}))
                yield event(delta({}, "tool_calls"))
                if include_usage:
                    yield event([], _usage(body, ""))
                yield b"data: [DONE]\n\n"
                self.streams_finished += 1
                return
            pieces = _split(text, b.chunks)
            for i in range(len(pieces) + 1):
                if i == b.stall_after:
                    await anyio.sleep(math.inf)
                if i == b.error_after:
                    failure = {
                        "message": "The server had an error while processing your request. Sorry about that!",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                    yield f"data: {json.dumps({'error': failure})}\n\n".encode()
                    return
                if i == b.cut_after:
                    raise httpx2.RemoteProtocolError(
                        "peer closed connection without sending complete message body (incomplete chunked read)"
                    )
                if i == len(pieces):
                    break
                await anyio.sleep(b.chunk_delay if i else 0)
                yield event(delta({"content": pieces[i]}))
            yield event(delta({}, b.finish_reason))
            if include_usage:
                yield event([], _usage(body, text))
            yield b"data: [DONE]\n\n"
            self.streams_finished += 1
        finally:
            self.open_streams -= 1
            self._changed()

    async def _images(self, request: httpx2.Request, endpoint: str) -> httpx2.Response:
        """`POST /v1/images/generations` (JSON) and `/v1/images/edits` (multipart), answered
        the way GPT image models answer: one base64 PNG per image, no URLs."""
        record: dict[str, Any] = {"endpoint": endpoint, "image": None}
        if endpoint == "generations":
            try:
                body = json.loads(request.content)
            except ValueError:
                return error_response(400, message="We could not parse the JSON body of your request.")
            record.update(body if isinstance(body, dict) else {})
        else:
            content_type = request.headers.get("content-type", "")
            if not content_type.startswith("multipart/form-data"):
                return error_response(400, message="Expected multipart/form-data.")
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + request.content
            )
            for part in message.iter_parts():
                name = part.get_param("name", header="content-disposition")
                payload = part.get_payload(decode=True) or b""
                if name in ("image", "image[]"):
                    record["image"] = payload
                    record["image_filename"] = part.get_filename()
                    record["image_content_type"] = part.get_content_type()
                elif name:
                    record[name] = payload.decode("utf-8", "replace")
        self.image_requests.append(record)
        self._changed()
        if not record.get("prompt") or not record.get("model"):
            return error_response(400, message="Missing required parameter: 'prompt' or 'model'.")
        if endpoint == "edits" and not record["image"]:
            return error_response(400, message="Missing required parameter: 'image'.")
        behaviour = self.image_queue.pop(0) if self.image_queue else Behaviour()
        await anyio.sleep(math.inf if behaviour.hang else behaviour.latency)
        if behaviour.status is not None:
            return error_response(behaviour.status, behaviour.error_code, message=behaviour.text)
        b64 = (
            behaviour.text
            if behaviour.text is not None
            else base64.b64encode(_picture(record["prompt"], record["image"])).decode("ascii")
        )
        size = record.get("size") if record.get("size") not in (None, "auto") else "1024x1024"
        return httpx2.Response(
            200,
            headers={"x-request-id": f"req_fake_img_{len(self.image_requests)}"},
            json={
                "created": CREATED,
                "background": "opaque",
                "data": [{"b64_json": b64}],
                "output_format": "png",
                "quality": record.get("quality") or "medium",
                "size": size,
                "usage": {
                    "input_tokens": 50,
                    "input_tokens_details": {"image_tokens": 0, "text_tokens": 50},
                    "output_tokens": 272,
                    "total_tokens": 322,
                },
            },
        )


def _picture(prompt: str, source: bytes | None) -> bytes:
    """A small real PNG: a colour from the prompt, or the source image inverted (an edit)."""
    from PIL import Image, ImageOps

    if source:
        with Image.open(io.BytesIO(source)) as image:
            picture = ImageOps.invert(image.convert("RGB")).resize((64, 64))
    else:
        seed = sum(prompt.encode()) % 256
        picture = Image.new("RGB", (96, 64), (seed, 255 - seed, 128))
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def _split(text: str, chunks: int) -> list[str]:
    if not text:
        return []
    size = math.ceil(len(text) / max(1, min(chunks, len(text))))
    return [text[i : i + size] for i in range(0, len(text), size)]


def _usage(body: dict, text: str) -> dict:
    prompt = sum(len(str(m.get("content") or "").split()) for m in body.get("messages", [])) + 3
    completion = len(text.split())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
