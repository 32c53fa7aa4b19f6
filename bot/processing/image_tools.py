"""Drawing and editing pictures: the `generate_image` / `edit_image` tools offered to
the chat model, what running them does, and the rule used where tools are refused.

Running a tool: `images.generate` or `images.edit` (model IMAGE_MODEL, size IMAGE_SIZE,
quality IMAGE_QUALITY; GPT image models answer with base64) → the bytes are checked and
downscaled for the thread's memory in a worker thread → uploaded into the thread
(the surface's `post_image`; in Slack the upload is completed only once the bytes are up) with a short
caption → remembered as a thread image, so "make it darker" can edit it next. The
result sent back to the model is one sentence; what went wrong (moderation refusal,
missing `files:write`) is also a line for the user. Progress is two tasks on the surface:
"Drawing" (or "Editing the image") until a usable picture came back, then "Posting the
image"; each ends as failed when its part did not work.

The fallback rule (`decide_without_tools`), for endpoints that refuse the `tools`
parameter: a message that starts with a drawing request ("draw …", "paint …", "sketch
…", "generate/create/make/design an image/picture/logo/… of …") generates an image from
the whole message; one that starts with an edit request ("make it …", "change …",
"remove …", "add …", "edit …", "turn it …", "recolor …") while the conversation has an
image edits the most recent one; anything else is answered in text.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import openai
from openai.types import ImagesResponse
from openai.types.chat import ChatCompletionFunctionToolParam

from bot.file_problem import FileProblem
from bot.processing.attachments import in_worker
from bot.processing.context import RequestState, Services
from bot.processing.images import PreparedImage, prepare_image
from bot.processing.openai_chat import ToolCall, sdk_timeout
from bot.processing.surface import PLACEHOLDER, ReplySurface, SurfaceError, progress, task_status
from bot.storage import StorageError
from bot.storage.base import ThreadImage

log = logging.getLogger(__name__)

GENERATE, EDIT = "generate_image", "edit_image"
DRAWING_TASK = "Drawing"
EDITING_TASK = "Editing the image"
UPLOADING_TASK = "Posting the image"
# The same, as status lines (where the surface cannot show tasks).
DRAWING_STATUS = task_status(DRAWING_TASK)  # "_Drawing…_"
EDITING_STATUS = task_status(EDITING_TASK)
UPLOADING_STATUS = task_status(UPLOADING_TASK)
MAX_GENERATED_BYTES = 50 * 1024 * 1024

GENERATE_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": GENERATE,
        "description": (
            "Draw a new picture and post it in this Slack thread. Use it when the user asks you to draw, "
            "paint, sketch, create, generate or make an image, picture, photo, illustration, logo, icon, "
            "poster or diagram. Not for describing or analysing images."
        ),
        "parameters": {
            "type": "object",
            "additionalProperties": False,
            "required": ["prompt"],
            "properties": {
                "prompt": {"type": "string", "description": "A detailed description of the picture to draw."}
            },
        },
    },
}
EDIT_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": EDIT,
        "description": (
            "Change a picture from this conversation (one the user attached or one you drew) and post the "
            "result in this thread: e.g. make it darker, remove the background, add or replace something."
        ),
        "parameters": {
            "type": "object",
            "additionalProperties": False,
            "required": ["prompt"],
            "properties": {
                "prompt": {"type": "string", "description": "What to change, described fully."},
                "image": {
                    "type": "integer",
                    "description": (
                        "Which picture to edit: its number in the list of images in "
                        "this conversation. Default: the most recent one."
                    ),
                },
            },
        },
    },
}

_DRAW = re.compile(
    r"^\s*(?:(?:please|pls|can you|could you|would you|now)[\s,]+)*(?:"
    r"(?:draw|paint|sketch|illustrate)\b"
    r"|(?:generate|create|make|design|render|produce)\s+(?:me\s+)?(?:a|an|another|some|the|\d+)?\s*"
    r"(?:\w+\s+){0,3}?(?:image|picture|pic|photo|drawing|illustration|logo|icon|poster|painting|"
    r"diagram|sketch|wallpaper|avatar)s?\b)",
    re.IGNORECASE,
)
_EDIT = re.compile(
    r"^\s*(?:(?:please|pls|can you|could you|would you|now)[\s,]+)*(?:"
    r"make\s+(?:it|this|that|the\s+\w+)|change|edit|remove|add|replace|turn\s+(?:it|this|that)|"
    r"recolou?r|erase|brighten|darken|crop|put)\b",
    re.IGNORECASE,
)


def decide_without_tools(text: str, has_image: bool) -> str | None:
    """The documented keyword rule for endpoints without function calling:
    GENERATE, EDIT, or None (answer in text)."""
    if _DRAW.match(text or ""):
        return GENERATE
    if has_image and _EDIT.match(text or ""):
        return EDIT
    return None


def refuses_tools(exc: Exception) -> bool:
    """Does this error say the endpoint or model does not do function calling? (OpenAI:
    "'tools' is not supported with this model"; Ollama: "… does not support tools";
    vLLM: "auto tool choice requires --enable-auto-tool-choice".)"""
    if not isinstance(exc, (openai.BadRequestError, openai.UnprocessableEntityError, openai.NotFoundError)):
        return False
    param = str(getattr(exc, "param", "") or "")
    message = str(getattr(exc, "message", "") or exc).lower()
    return param in ("tools", "tool_choice") or "tool" in message or "function call" in message


def api_message(exc: Exception) -> str:
    """The endpoint's own words from an SDK error ("Your request was rejected by the
    safety system."), without the SDK's "Error code: 400 - " prefix."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    text = body.get("message") if isinstance(body, dict) else None
    text = str(text or getattr(exc, "message", "") or exc)
    text = re.sub(r"^Error code: \d+ - ", "", " ".join(text.split()))
    return text[:300]


def _slug(prompt: str) -> str:
    words = re.findall(r"[a-z0-9]+", prompt.lower())[:6]
    return "-".join(words)[:60] or "image"


@dataclass(frozen=True)
class _Made:
    """A picture the images API made: its bytes, and the downscaled copy the thread keeps."""

    data: bytes
    prepared: PreparedImage


@dataclass
class ImageTools:
    """One request's image tools: what they may use and which images they can see."""

    services: Services
    state: RequestState
    writer: ReplySurface
    images: list[ThreadImage]  # the conversation's images as numbered for the model (1-based)
    notes: list[str]  # lines for the user, shown with the answer
    made: int = 0  # images posted by this request
    tokens_in: int = 0  # the images API's usage, all calls of this request together
    tokens_out: int = 0

    @property
    def enabled(self) -> bool:
        return self.services.settings.media.image_model.lower() not in ("", "off", "none")

    def specs(self) -> list[ChatCompletionFunctionToolParam]:
        return [GENERATE_TOOL, EDIT_TOOL] if self.images else [GENERATE_TOOL]

    async def run(self, call: ToolCall) -> str:
        """Run one tool call; returns the tool result for the model. Raises only for
        cancellation and for errors that end the request (auth, quota, …)."""
        try:
            args = json.loads(call.arguments or "{}")
        except ValueError:
            args = None
        if not isinstance(args, dict) or not isinstance(args.get("prompt"), str) or not args["prompt"].strip():
            return "Error: the call needs a JSON object with a non-empty string `prompt`."
        prompt = args["prompt"].strip()
        if call.name == GENERATE:
            return await self.generate(prompt)
        if call.name == EDIT:
            number = args.get("image")
            return await self.edit(prompt, number if isinstance(number, int) else None)
        return f"Error: there is no tool called {call.name!r}."

    async def generate(self, prompt: str) -> str:
        self.state.stage = "generating an image"
        images = self.services.openai.images
        with progress(self.writer, DRAWING_TASK) as task:
            made = await self._made(
                await self._ask("draw", lambda: images.generate(prompt=prompt[:32000], **self._options()))
            )
            if isinstance(made, str):
                task.fail()
                return made
        return await self._post(made, prompt, f'you drew it for: "{prompt[:200]}"')

    async def edit(self, prompt: str, number: int | None) -> str:
        if not self.images:
            return "Error: there is no image in this conversation to edit."
        index = (number - 1) if number is not None else len(self.images) - 1
        if not 0 <= index < len(self.images):
            return f"Error: there is no image number {number}; the images are numbered 1 to {len(self.images)}."
        source = self.images[index]
        self.state.stage = "editing an image"
        extension = "png" if source.mime == "image/png" else "jpg"
        image = (f"image.{extension}", source.data, source.mime)
        images = self.services.openai.images
        with progress(self.writer, EDITING_TASK) as task:
            made = await self._made(
                await self._ask("edit", lambda: images.edit(image=image, prompt=prompt[:32000], **self._options()))
            )
            if isinstance(made, str):
                task.fail()
                return made
        return await self._post(made, prompt, f'you edited {source.name} for: "{prompt[:200]}"')

    def _options(self) -> dict[str, Any]:
        """What drawing and editing both send besides the prompt: the configured model,
        size and quality, one image, and the time left as the SDK's timeout (so it is
        taken at the call). (Any: spread into the SDK's keyword arguments.)"""
        media_settings = self.services.settings.media
        return {
            "model": media_settings.image_model,
            "size": media_settings.image_size,
            "quality": media_settings.image_quality,
            "n": 1,
            "timeout": sdk_timeout(),
        }

    async def _ask(self, verb: str, call: Callable[[], Awaitable[ImagesResponse]]) -> ImagesResponse | str:
        """The images API's answer to `call()`; or, when it refused to `verb` this or the
        model is not available, the tool result for the model (the user gets a note)."""
        try:
            response = await call()
        except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
            return self._refused(verb, exc)
        except (openai.NotFoundError, openai.PermissionDeniedError) as exc:
            return self._unavailable(exc)
        if response.usage is not None:  # GPT image models bill tokens; counted in the usage
            self.tokens_in += response.usage.input_tokens
            self.tokens_out += response.usage.output_tokens
        return response

    def _refused(self, verb: str, exc: openai.APIStatusError) -> str:
        message = api_message(exc)
        log.info("request %s: images API refused to %s: %s", self.state.request_id, verb, message)
        self.notes.append(f":warning: The image service refused to {verb} this: {message}")
        return f"The image service refused the request: {message}. Tell the user briefly."

    def _unavailable(self, exc: openai.APIStatusError) -> str:
        model = self.services.settings.media.image_model
        log.warning("request %s: image model %s unavailable: %s", self.state.request_id, model, api_message(exc))
        self.notes.append(
            f":no_entry: The image model `{model}` is not available to this API key "
            f"(HTTP {exc.status_code}); an admin needs to check `IMAGE_MODEL`."
        )
        return "Image generation is not available right now. Tell the user briefly."

    async def _made(self, response: ImagesResponse | str) -> _Made | str:
        """The picture in the images API's answer, checked and downscaled; or the tool
        result for the model when there is none (`response` is already one, or the
        answer held no usable image: the user gets a note)."""
        if isinstance(response, str):
            return response
        b64 = response.data[0].b64_json if response.data else None
        try:
            if not b64:
                raise FileProblem("contained no image", "no_image")
            try:
                data = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError):
                raise FileProblem("was not valid base64", "bad_base64") from None
            if len(data) > MAX_GENERATED_BYTES:
                raise FileProblem("was too large", "too_large")
            media = self.services.media
            assert media is not None  # the tools are only offered with media services
            prepared = await in_worker(
                media, prepare_image, data, max_pixels=self.services.settings.media.max_image_pixels
            )
        except FileProblem as problem:
            log.warning("request %s: the images API answer %s", self.state.request_id, problem.reason)
            self.notes.append(f":warning: The image service's answer {problem.reason}; no image was posted.")
            return f"The image service failed: its answer {problem.reason}. Tell the user briefly."
        return _Made(data, prepared)

    async def _post(self, made: _Made, prompt: str, label: str) -> str:
        data, prepared = made.data, made.prepared
        msg = self.state.message
        filename = f"{_slug(prompt)}.png" if data[:4] == b"\x89PNG" else f"{_slug(prompt)}.{_ext(data)}"
        self.state.stage = "uploading an image"
        # No <!channel>-style mentions and no stray italics in Slack's caption.
        caption = " ".join(prompt.replace("<", "").replace(">", "").replace("_", " ").split())
        caption = caption if len(caption) <= 150 else caption[:149] + "…"
        with progress(self.writer, UPLOADING_TASK) as task:
            try:
                await self.writer.post_image(
                    data, filename=filename, title=caption, comment=f"_{caption}_", alt_text=prompt
                )
            except SurfaceError as exc:
                task.fail()
                log.warning("request %s: could not post the image: %s", self.state.request_id, exc.code)
                hint = (
                    " (the bot's token needs the `files:write` scope)"
                    if exc.code in ("missing_scope", "not_allowed_token_type")
                    else ""
                )
                self.notes.append(f":warning: I made the image but Slack refused to post it: `{exc.code}`{hint}.")
                return f"The image was made but could not be posted in Slack ({exc.code}). Tell the user briefly."
        image = ThreadImage(
            name=filename,
            mime=prepared.mime,
            data=prepared.data,
            width=prepared.width,
            height=prepared.height,
            source="bot",
            label=label,
            ts=msg.ts,
        )
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):  # posted, so remember it
            try:
                await self.services.store.add_thread_images(
                    msg.thread, [image], keep=max(self.services.settings.media.max_context_images, 1)
                )
            except StorageError as exc:  # the picture is in Slack; only a later edit would miss it
                log.warning("request %s: could not store the posted image: %s", self.state.request_id, exc)
        self.images.append(image)
        self.made += 1
        self.writer.set_status(PLACEHOLDER)
        return (
            f"Done: the image was posted in the thread as {filename} (it is image number {len(self.images)} "
            "now). Reply with one short sentence; do not repeat the prompt or describe the tool."
        )

    async def fallback(self, text: str) -> str | None:
        """Apply the keyword rule; returns a short reply when it drew or edited, None to
        answer in text instead."""
        action = decide_without_tools(text, bool(self.images))
        if action is None:
            return None
        result = await (self.generate(text) if action == GENERATE else self.edit(text, None))
        if not result.startswith("Done"):
            return "I could not make the image this time."
        return "Here is the image." if action == GENERATE else "Here is the edited image."


def _ext(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:4] == b"RIFF":
        return "webp"
    if data[:3] == b"GIF":
        return "gif"
    return "png"
