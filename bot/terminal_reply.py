"""`TerminalWriter`: the `ReplySurface` of `slackbot shell` — the answer streams to a
text stream (stdout) as the model writes it.

Writes go through a worker thread (one at a time, in order): a terminal or pipe that
stops reading must stall only this writer, never the event loop. Status lines
("Thinking…", or a task that began: "Reading report.pdf…") go to `status_out` (stderr)
only when it is a terminal, so piped output is the answers alone.
"""

from __future__ import annotations

import functools
import uuid
from typing import Any, TextIO

import anyio
import anyio.to_thread

from bot.file_problem import FileProblem
from bot.processing.surface import PLACEHOLDER, AttachedFile, Receipt, SurfaceError, task_status
from bot.storage.base import HistoryMessage


class TerminalWriter:
    def __init__(
        self, out: TextIO, *, status_out: TextIO | None = None, limiter: anyio.CapacityLimiter | None = None
    ) -> None:
        self._out = out
        self._status_out = status_out if status_out is not None and _is_tty(status_out) else None
        self._limiter = limiter or anyio.CapacityLimiter(1)
        self._pieces: list[str] = []
        self._written = 0  # characters of the text already written
        self._status = ""
        self._task_ids = 0
        self._dirty = anyio.Event()
        self.message_ts: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    @property
    def placeholder_ts(self) -> str:
        return self.message_ts[0] if self.message_ts else ""

    @property
    def placeholder_streams(self) -> bool:
        return False

    @property
    def opening_marked(self) -> bool:
        return True  # nobody takes a terminal's answer over: nothing to record

    async def start(self, status: str = PLACEHOLDER) -> str:
        ts = f"shell-{uuid.uuid4().hex[:12]}"  # stands for the message id storage keeps
        self.message_ts.append(ts)
        self.set_status(status)
        return ts

    def set_status(self, status: str) -> None:
        self._status = status
        self._dirty.set()

    def begin_task(self, title: str) -> str:
        """A task is its status line ("Reading report.pdf…") until the next one."""
        self._task_ids += 1
        self.set_status(task_status(title))
        return f"task-{self._task_ids}"

    def end_task(self, task_id: str, *, ok: bool = True) -> None:
        """Nothing to show: the answer (or the next status) follows."""

    def append(self, delta: str) -> None:
        self._pieces.append(delta)
        self._dirty.set()

    async def run(self) -> None:
        shown_status = ""
        while True:
            await self._dirty.wait()
            self._dirty = anyio.Event()
            if not self.text and self._status != shown_status and self._status_out is not None:
                shown_status = self._status
                await self._write(self._status_out, f"({self._status.strip('_*')})\n")
            await self._flush()

    async def finish(self, notice: str = "", receipt: Receipt | None = None) -> bool:
        await self._flush()
        ending = "\n" if self.text else ""
        if notice:
            ending += f"{notice}\n" if not self.text else f"\n{notice}\n"
        await self._write(self._out, ending + "\n")
        return True

    # The shell keeps its whole conversation in storage and attaches files by path
    # (`/file`), so nothing is read through the surface; images are not drawn here.

    async def withdraw(self) -> None:
        """Nothing to take back: a terminal's answer has no other replica to lose it to."""

    async def read_thread(self, exclude_ts: set[str]) -> list[HistoryMessage]:
        return []

    async def resolve_file(self, obj: dict[str, Any]) -> AttachedFile:
        raise FileProblem("can't be read in the shell: attach files with /file PATH", "unsupported")

    async def download_file(self, file: AttachedFile, *, max_bytes: int) -> bytes:
        raise FileProblem("can't be read in the shell: attach files with /file PATH", "unsupported")

    async def post_image(self, data: bytes, *, filename: str, title: str, comment: str, alt_text: str) -> None:
        raise SurfaceError("posting an image", "not_supported_in_the_shell")

    async def _flush(self) -> None:
        text = self.text
        if len(text) > self._written:
            chunk = text[self._written :]
            # Shielded: run() is cancelled the moment the stream ends, and a cancellation
            # between taking the chunk and writing it would lose it.
            with anyio.CancelScope(shield=True):
                await self._write(self._out, chunk)
            self._written += len(chunk)

    async def _write(self, stream: TextIO, text: str) -> None:
        if text:
            await anyio.to_thread.run_sync(functools.partial(_write_now, stream, text), limiter=self._limiter)


def _write_now(stream: TextIO, text: str) -> None:
    stream.write(text)
    stream.flush()


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
