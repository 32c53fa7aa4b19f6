"""`slackbot shell`: talk to the same processing pipeline from a terminal, no Slack needed.

It runs `answer_message` — options, history, context budget, deadlines, the model call,
storage — with a `TerminalWriter` as its surface instead of Slack: processing's
`Services` has no Slack client at all, and an import contract (pyproject.toml) keeps
`bot.processing` from importing `bot.slack`. It needs only an OpenAI key, or just
OPENAI_BASE_URL for a local OpenAI-compatible server.

A conversation is one thread (kept in an in-memory database for the session); `/new`
starts another. `/file PATH` attaches a document to the next message, read with the
same parsers the bot uses for Slack files (PDF, Word, Excel, CSV, text and source).

Input is read without threads: the loop waits until stdin is readable, then reads what
is there, so Ctrl-C or end of input end the session at once on both backends.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import anyio
import anyio.to_thread
import httpx2

from bot.config import MediaSettings, Settings
from bot.file_problem import FileProblem
from bot.openai_client import openai_client
from bot.processing.answer import answer_message
from bot.processing.context import RequestState, Services
from bot.processing.documents import DocumentLimits, document_kind, extract_document, unsupported_reason
from bot.processing.images import is_image_file
from bot.processing.message import IncomingMessage
from bot.storage import open_store
from bot.terminal_reply import TerminalWriter
from bot.thread_gates import ThreadGates

log = logging.getLogger(__name__)

SHELL_USER = "shell-user"
SHELL_CHANNEL = "shell"
HELP = (
    "Type a message and press Enter. Commands: /new starts a new conversation, "
    "/file PATH attaches a document to your next message, /help, /quit (or Ctrl-D)."
)
MB = 1024 * 1024


class LineReader:
    """Lines from a file descriptor, read only when it is readable (no worker thread)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = b""
        self._eof = False
        try:
            self._regular = stat.S_ISREG(os.fstat(fd).st_mode)  # epoll refuses regular files; they never block
        except OSError:
            self._regular = False

    async def readline(self) -> str | None:
        """The next line without its newline; None at end of input."""
        while b"\n" not in self._buffer and not self._eof:
            if not self._regular:
                await anyio.wait_readable(self._fd)
            chunk = os.read(self._fd, 65536)
            if chunk:
                self._buffer += chunk
            else:
                self._eof = True
        if not self._buffer:
            return None
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", errors="replace").rstrip("\r")


@dataclass
class Conversation:
    """One shell conversation = one thread."""

    thread_ts: str = ""
    count: int = 0
    attachments: list[str] = field(default_factory=list)

    def next_message(self, text: str) -> IncomingMessage:
        self.count += 1
        ts = f"{1_700_000_000 + self.count}.{uuid.uuid4().int % 1_000_000:06d}"
        first = not self.thread_ts
        if first:
            self.thread_ts = ts
        if self.attachments:
            text = "\n\n".join([text, *self.attachments])
            self.attachments = []
        return IncomingMessage(
            event_id=f"shell-{uuid.uuid4().hex}",
            kind="dm",
            channel=SHELL_CHANNEL,
            user=SHELL_USER,
            text=text,
            ts=ts,
            thread_ts=self.thread_ts,
            in_existing_thread=not first,
        )


def _read_file(path: Path, max_bytes: int) -> bytes:
    with path.expanduser().open("rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"is over the {max_bytes / MB:g} MB limit")
    return data


async def attach(path_text: str, media: MediaSettings, workers: anyio.CapacityLimiter) -> tuple[str, str]:
    """Read the document at `path_text`. Returns (the block to add to the next message,
    a line for the user); the block is "" when it could not be read."""
    path = Path(path_text)  # `~` is expanded in the worker thread that reads it
    name = path.name
    if is_image_file(name):
        return "", f"{name}: images can't be attached in the shell yet; documents can."
    kind = document_kind(name)
    if kind is None:
        return "", f"{name} {unsupported_reason(name)}"
    max_bytes = int(media.max_file_mb * MB)
    limits = DocumentLimits.from_settings(media)
    try:
        data = await anyio.to_thread.run_sync(_read_file, path, max_bytes, limiter=workers)
        document = await anyio.to_thread.run_sync(
            functools.partial(extract_document, name, data, kind, limits), limiter=workers
        )
    except OSError as exc:
        return "", f"{name}: cannot read it ({exc.strerror or exc})."
    except ValueError as exc:
        return "", f"{name} {exc}."
    except FileProblem as problem:
        return "", f"{name} {problem.reason}."
    notes = "".join(f" ({note})" for note in document.notes)
    block = f"[Attached file {name} — {document.label}]\n{document.text}"
    return block, f"Attached {name} ({document.label}){notes}; it goes with your next message."


async def run_shell(
    settings: Settings,
    *,
    stdin_fd: int | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    openai_transport: httpx2.AsyncBaseTransport | None = None,
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    reader = LineReader(sys.stdin.fileno() if stdin_fd is None else stdin_fd)
    output = anyio.CapacityLimiter(1)  # terminal writes, in order
    workers = anyio.CapacityLimiter(2)  # reading and parsing attached files

    async def say(text: str) -> None:
        await anyio.to_thread.run_sync(functools.partial(_say, err, text), limiter=output)

    store = await open_store("sqlite:///:memory:")
    gates = ThreadGates(store, owner="shell")  # the same gate as the bot's: its lease fences the writes
    try:
        async with openai_client(settings.openai, transport=openai_transport) as ai:
            services = Services(settings=settings, openai=ai, store=store, model_slots=anyio.CapacityLimiter(1))
            conversation = Conversation()
            await say(f"slackbot shell — model {settings.openai.model}. {HELP}")
            while True:
                line = await reader.readline()
                if line is None:
                    break
                line = line.strip()
                if not line:
                    continue
                command, _, argument = line.partition(" ")
                if command in ("/quit", "/exit"):
                    break
                if command == "/help":
                    await say(HELP)
                elif command == "/new":
                    conversation = Conversation()
                    await say("(new conversation)")
                elif command in ("/file", "/attach"):
                    if not argument.strip():
                        await say("Usage: /file PATH")
                        continue
                    block, note = await attach(argument.strip(), settings.media, workers)
                    if block:
                        conversation.attachments.append(block)
                    await say(note)
                elif command.startswith("/") and len(command) > 1 and " " not in command[1:] and command[1:].isalpha():
                    await say(f"Unknown command {command}. {HELP}")
                else:
                    msg = conversation.next_message(line)
                    async with gates.try_enter(msg.thread) as hold:
                        assert hold is not None  # one question at a time, in a store of its own
                        state = RequestState.begin(msg, owner=hold.owner, fence=hold.fence)
                        writer = TerminalWriter(out, status_out=err, limiter=output)
                        await answer_message(services, state, functools.partial(_same, writer))
    finally:
        with anyio.CancelScope(shield=True):
            await store.aclose()
    return 0


async def _same(writer: TerminalWriter, options: object) -> TerminalWriter:
    """The shell's surface: one terminal writer, whatever the options."""
    return writer


def _say(stream: TextIO, text: str) -> None:
    stream.write(text + "\n")
    stream.flush()
