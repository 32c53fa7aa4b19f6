"""A message's files and pasted image URLs → what the model reads, what the thread keeps,
and a line for the user about anything that could not be used.

For each attached file (at most MAX_FILES_PER_MESSAGE, then image URLs in the text):
  stub → `files.info` → type from name/MIME (unknown types are refused *before* any
  download) → declared size check → download (slack/files) → parse or downscale in a
  worker thread behind `MediaServices.workers`.
Any `FileProblem` becomes one line naming the file and the reason; the rest of the
message is still answered. Each download-and-read is a task on the surface ("Reading
report.pdf", "Fetching the image": a task card in Slack's native stream, else the status
line), ended as failed when the file could not be used.

What comes out (`Turn`):
- documents as labelled blocks in the user text, trimmed together to the context
  budget with a visible note; the same text is what the thread stores, so later
  questions can refer to the documents;
- images as data-URL parts: this message's images plus the thread's newest
  MAX_CONTEXT_IMAGES earlier ones (stored downscaled by `Store.add_thread_images`,
  so they need no second download and survive the file's deletion in Slack), listed by
  number so the model can name one for `edit_image`.

Nothing is written to disk: files are held in memory (at most MAX_FILE_MB each), so a
cancelled request leaves no temporary file.
"""

from __future__ import annotations

import base64
import functools
import html
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio.from_thread
import anyio.to_thread
from openai.types.chat import ChatCompletionContentPartImageParam

from bot.config import MediaSettings
from bot.file_problem import FileProblem
from bot.processing.context import MediaServices, RequestState, Services
from bot.processing.documents import (
    Document,
    DocumentLimits,
    document_kind,
    extract_document,
    unsupported_reason,
)
from bot.processing.images import PreparedImage, image_tokens, is_image_file, prepare_image
from bot.processing.surface import PLACEHOLDER, ReplySurface, progress
from bot.processing.tokens import count_tokens, cut_to_tokens
from bot.storage.base import ThreadImage
from bot.url_fetch import fetch_image

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")
MB = 1024 * 1024
DOCUMENT_SHARE = 0.75  # of the room left after system prompt, text, images and answer; history gets the rest
MARGIN_TOKENS = 200
# URLs in Slack text come as <url> or <url|label>; bare ones only from other clients.
_URL = re.compile(r"<([a-zA-Z][a-zA-Z0-9+.\-]*://[^>|\s]+)(?:\|[^>]*)?>|(?<![<|\w])(https?://[^\s<>|]+)")
_IMAGE_PATH = re.compile(r"\.(png|jpe?g|gif|webp)$", re.IGNORECASE)


@dataclass
class Turn:
    """What one message brings besides its text."""

    user_text: str  # for the model: the text, document blocks, and the list of images
    stored_text: str  # for the thread's history: the text and document blocks
    images: list[ThreadImage] = field(default_factory=list)  # in context, oldest first, numbered from 1
    notes: list[str] = field(default_factory=list)  # lines for the user (files not read, trimmed, …)
    answerable: bool = True  # False: nothing usable arrived (only unreadable files), so no model call

    @property
    def image_parts(self) -> list[ChatCompletionContentPartImageParam]:
        return [
            {
                "type": "image_url",
                "image_url": {
                    "url": f"data:{i.mime};base64,{base64.b64encode(i.data).decode('ascii')}",
                    "detail": "auto",
                },
            }
            for i in self.images
        ]

    @property
    def image_tokens(self) -> int:
        return sum(image_tokens(i.width, i.height) for i in self.images)


def image_urls(text: str) -> list[str]:
    """Links in the text whose path ends like an image file (.png .jpg .jpeg .gif .webp);
    other links stay plain text for the model."""
    found: list[str] = []
    for match in _URL.finditer(text or ""):
        url = html.unescape(match.group(1) or match.group(2))
        try:
            path = urlsplit(url).path
        except ValueError:
            continue
        if _IMAGE_PATH.search(path) and url not in found:
            found.append(url)
    return found


def _line(name: str, reason: str) -> str:
    return f":warning: **{_clean(name)}** {reason}."


def _clean(name: str) -> str:
    """A file name safe to show in Slack Markdown: no formatting, no `<!channel>`-style
    mentions (a file named so must not make the bot ping anyone), one line."""
    return "".join(" " if c in "\n\r" else c for c in name if c not in "*`<>")[:120]


async def in_worker(media: MediaServices, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Blocking work in a worker thread, at most MEDIA_WORKERS at once. Not abandoned on
    cancellation (so the limiter really bounds the threads doing work); parsers call
    `checkpoint` between pages, so a cancellation still lands within one page."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=media.workers)


@dataclass
class _Collected:
    documents: list[Document] = field(default_factory=list)
    images: list[ThreadImage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # for the user
    model_notes: list[str] = field(default_factory=list)  # for the model: what could not be read
    stored_notes: list[str] = field(default_factory=list)  # for the history: images seen, files not read
    documents_text: str = ""  # the labelled, trimmed document blocks


async def read_attachments(
    services: Services, state: RequestState, writer: ReplySurface, *, system_prompt: str, reserve_for_answer: int
) -> Turn:
    """Read the message's files and image URLs, and gather the thread's earlier images.
    Raises only for cancellation and storage errors; every file problem becomes a note."""
    msg = state.message
    media = services.media
    settings = services.settings
    if media is None:  # a surface without file support (e.g. a terminal)
        notes = [_line(str(f.get("name") or "a file"), "was not read: files are not supported here") for f in msg.files]
        return Turn(user_text=msg.text, stored_text=msg.text, notes=notes, answerable=bool(msg.text.strip()))
    earlier: list[ThreadImage] = []
    if msg.in_existing_thread and settings.media.max_context_images > 0:
        state.stage = "loading thread images"
        earlier = await services.store.thread_images(msg.thread, limit=settings.media.max_context_images)
    urls = image_urls(msg.text)
    if not msg.files and not urls:
        return _turn(msg.text, _Collected(), earlier)

    collected = _Collected()
    error: Exception | None = None
    async with anyio.create_task_group() as tg:  # the surface shows the tasks meanwhile
        tg.start_soon(writer.run)
        try:
            await _read_all(settings.media, media, state, writer, urls, collected)
            if collected.documents:
                state.stage = "fitting documents"
                room = (
                    settings.openai.context_budget_tokens
                    - reserve_for_answer
                    - count_tokens(system_prompt)
                    - count_tokens(msg.text)
                    - MARGIN_TOKENS
                    - sum(_image_cost(i) for i in [*earlier, *collected.images])
                )
                blocks, notes = await in_worker(
                    media, fit_documents, collected.documents, max(500, int(room * DOCUMENT_SHARE))
                )
                collected.notes.extend(notes)
                collected.documents_text = blocks
        except Exception as exc:  # leaves the task group unwrapped, as _stream_answer does
            error = exc
        finally:
            tg.cancel_scope.cancel()
    if error is not None:
        raise error
    if collected.images:
        state.stage = "storing images"
        stamped = [
            ThreadImage(i.name, i.mime, i.data, i.width, i.height, i.source, i.label, msg.ts) for i in collected.images
        ]
        await services.store.add_thread_images(msg.thread, stamped, keep=max(settings.media.max_context_images, 1))
    writer.set_status(PLACEHOLDER)
    return _turn(msg.text, collected, earlier)


def _image_cost(image: ThreadImage) -> int:
    return image_tokens(image.width, image.height)


def _turn(text: str, collected: _Collected, earlier: list[ThreadImage]) -> Turn:
    documents_text = collected.documents_text
    images = [*earlier, *collected.images]
    stored = "\n\n".join(p for p in (text, documents_text, "\n".join(collected.stored_notes)) if p)
    model_parts = [text, documents_text, "\n".join(collected.model_notes)]
    if images:
        new = len(earlier)
        listing = "; ".join(
            f"{n}. {_clean(i.name)} — {i.label or 'an image'}"
            f" ({'with this message' if n > new else 'earlier in this thread'})"
            for n, i in enumerate(images, 1)
        )
        model_parts.append(f"[Images in this conversation, in the order they are attached below: {listing}]")
    user_text = "\n\n".join(p for p in model_parts if p)
    answerable = bool(text.strip() or documents_text or collected.images)
    return Turn(user_text=user_text, stored_text=stored, images=images, notes=collected.notes, answerable=answerable)


async def _read_all(
    media_settings: MediaSettings,
    media: MediaServices,
    state: RequestState,
    writer: ReplySurface,
    urls: list[str],
    collected: _Collected,
) -> None:
    msg = state.message
    limit = media_settings.max_files_per_message
    sources: list[dict[str, Any] | str] = [*msg.files, *urls]
    if len(sources) > limit:
        skipped = len(sources) - limit
        collected.notes.append(
            f":warning: I read only the first {limit} files and links of this message; "
            f"{skipped} more {'were' if skipped != 1 else 'was'} left out."
        )
        sources = sources[:limit]
    for source in sources:
        if isinstance(source, str):
            await _read_url(media_settings, media, state, writer, source, collected)
        else:
            await _read_file(media_settings, media, state, writer, source, collected)


def _problem(collected: _Collected, state: RequestState, name: str, problem: FileProblem) -> None:
    log.info("request %s: file %r not used: %s (%s)", state.request_id, name, problem.kind, problem.reason)
    collected.notes.append(_line(name, problem.reason))
    collected.model_notes.append(
        f"[The file {_clean(name)} could not be read: it {problem.reason}. The user has "
        "been told; answer the rest of the message.]"
    )
    collected.stored_notes.append(f"[attached {_clean(name)}: not read — {problem.reason}]")


async def _read_file(
    media_settings: MediaSettings,
    media: MediaServices,
    state: RequestState,
    writer: ReplySurface,
    obj: dict[str, Any],
    collected: _Collected,
) -> None:
    name = str(obj.get("name") or obj.get("title") or obj.get("id") or "a file")
    try:
        state.stage = f"looking up {name}"
        file = await writer.resolve_file(obj)
        name = file.name
        image = is_image_file(file.name, file.mimetype, file.filetype)
        kind = None if image else document_kind(file.name, file.mimetype, file.filetype)
        if not image and kind is None:
            raise FileProblem(unsupported_reason(file.name), "unsupported")
        with progress(writer, f"Reading {_clean(name)}"):  # failed if a FileProblem leaves it
            state.stage = f"downloading {name}"
            data = await writer.download_file(file, max_bytes=int(media_settings.max_file_mb * MB))
            if kind is None:  # an image: a file that is neither was refused above
                state.stage = f"processing image {name}"
                prepared = await in_worker(media, prepare_image, data, max_pixels=media_settings.max_image_pixels)
                _add_image(collected, name, prepared, "attached by the user")
            else:
                state.stage = f"parsing {name}"
                document = await in_worker(
                    media,
                    extract_document,
                    name,
                    data,
                    kind,
                    DocumentLimits.from_settings(media_settings),
                    checkpoint=anyio.from_thread.check_cancelled,
                )
                collected.documents.append(document)
                collected.notes.extend(_line(name, note) for note in document.notes)
    except FileProblem as problem:
        _problem(collected, state, name, problem)


async def _read_url(
    media_settings: MediaSettings,
    media: MediaServices,
    state: RequestState,
    writer: ReplySurface,
    url: str,
    collected: _Collected,
) -> None:
    name = url if len(url) <= 80 else url[:77] + "…"
    try:
        with progress(writer, "Fetching the image"):
            state.stage = "fetching an image URL"
            fetched = await fetch_image(
                media.url_client,
                url,
                max_bytes=int(media_settings.max_file_mb * MB),
                timeout=media_settings.url_fetch_timeout_seconds,
                allow_loopback=media_settings.allow_loopback_urls,
            )
            state.stage = "processing an image URL"
            prepared = await in_worker(media, prepare_image, fetched.data, max_pixels=media_settings.max_image_pixels)
            short = urlsplit(url).path.rsplit("/", 1)[-1] or "image"
            _add_image(collected, short, prepared, f"from the link {url}")
    except FileProblem as problem:
        _problem(collected, state, name, problem)


def _add_image(collected: _Collected, name: str, prepared: PreparedImage, label: str) -> None:
    collected.images.append(
        ThreadImage(
            name=name,
            mime=prepared.mime,
            data=prepared.data,
            width=prepared.width,
            height=prepared.height,
            source="user",
            label=label,
        )
    )
    collected.stored_notes.append(f"[attached image: {_clean(name)}]")
    if prepared.note:
        collected.notes.append(_line(name, prepared.note))


def fit_documents(documents: list[Document], budget_tokens: int) -> tuple[str, list[str]]:
    """Label each document and trim them to share `budget_tokens` equally (a document
    that needs less leaves its share to the others). Blocking (token counting over up
    to MAX_DOCUMENT_CHARS): run it in a worker thread. Returns the text and user notes."""
    costs = [count_tokens(d.text) for d in documents]
    shares = _shares(costs, budget_tokens)
    blocks, notes = [], []
    for document, cost, share in zip(documents, costs, shares, strict=False):
        text, name = document.text, _clean(document.name)
        if cost > share:
            kept = cut_to_tokens(text, share)
            percent = max(1, round(100 * len(kept) / max(1, len(text))))
            text = (
                f"{kept}\n[… {name} was trimmed to fit the model's context: this is the first "
                f"{len(kept):,} of {len(document.text):,} characters …]"
            )
            notes.append(
                _line(
                    document.name,
                    f"is long: I could read only the first {percent}% of it "
                    f"({len(kept):,} of {len(document.text):,} characters)",
                )
            )
        blocks.append(f"[Attached file: {name} ({document.label})]\n{text}\n[End of {name}]")
    return "\n\n".join(blocks), notes


def _shares(costs: list[int], budget: int) -> list[int]:
    """Water-filling: small documents get what they need, the rest split what is left."""
    shares = [0] * len(costs)
    left, open_ = budget, sorted(range(len(costs)), key=lambda i: costs[i])
    while open_:
        fair = left // len(open_)
        i = open_[0]
        if costs[i] <= fair:
            shares[i] = costs[i]
            left -= costs[i]
            open_.pop(0)
        else:
            for j in open_:
                shares[j] = fair
            break
    return shares
