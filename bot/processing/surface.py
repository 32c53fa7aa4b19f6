"""Where an answer appears, as processing sees it: the `ReplySurface` interface.

Processing turns a message into a reply through this interface only; the nursery builds
the Slack one (`bot.slack.answer_surface`) and passes it in, `slackbot shell` a terminal
one. Besides the answer itself (start, status, the growing text, the final text), the
surface reads what the conversation platform holds: an earlier thread the bot has not
stored, the files attached to the message, and it posts the images the bot draws.

Progress: a step of the work that takes a while (reading a file, fetching an image,
drawing) is a *task*: `begin_task("Reading report.pdf")` gives its id, `end_task(id, ok=…)`
says how it ended, and `progress(surface, title)` wraps a block in both. How a task
appears is the surface's business — Slack's native stream shows it as a task card (with
the thread status as the fallback), a placeholder or a terminal as the status line
"_Reading report.pdf…_" (`task_status`). Titles are plain text, without the "…".

Errors cross this boundary as the processing layer's own types, as httpx maps httpcore's
exceptions at its transport boundary: `SurfaceError` when the platform refused,
`bot.file_problem.FileProblem` when one file cannot be used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from bot.storage.base import HistoryMessage

PLACEHOLDER = "_Thinking…_"


def task_status(title: str) -> str:
    """The status line that shows a task where no task card can: "Reading report.pdf" →
    "_Reading report.pdf…_"."""
    return f"_{title}…_"


class SurfaceError(Exception):
    """The platform refused an operation. `code` is its own error code (for example
    Slack's `missing_scope`), `operation` what was being done."""

    def __init__(self, operation: str, code: str) -> None:
        super().__init__(f"{operation} failed: {code}")
        self.operation = operation
        self.code = code


@dataclass(frozen=True)
class Receipt:
    """What the final write says about itself: which request it ends, and how (as storage
    would record it). The Slack surface keeps it in the message's metadata, so a replica
    taking over a request whose outcome never reached storage can see from the message
    itself that it was delivered, and leave it alone."""

    request_id: str
    outcome: str
    reply_to: str = ""  # the id of the message it answers
    try_again: bool = False  # a failure the user may re-run: the write offers "Try again" (for `reply_to`)


class AttachedFile(Protocol):
    """A file attached to the message, as the surface describes it before downloading."""

    @property
    def name(self) -> str: ...

    @property
    def mimetype(self) -> str: ...

    @property
    def filetype(self) -> str: ...


class ReplySurface(Protocol):
    @property
    def message_ts(self) -> list[str]:
        """The ids of the messages showing the answer, first one first (empty while none is)."""

    @property
    def text(self) -> str: ...

    @property
    def placeholder_ts(self) -> str: ...

    @property
    def placeholder_streams(self) -> bool:
        """The answer was opened as a stream the platform shows live (Slack's native
        streaming): it must be stopped before it can be edited. Stored with the request,
        for whoever has to finish it after a crash."""

    async def start(self, status: str = PLACEHOLDER) -> str:
        """Open the answer (a placeholder, a stream…); its id, or "" if the answer will
        appear only when it is finished. Raises SurfaceError."""

    @property
    def opening_marked(self) -> bool:
        """Whether the message `start` opened says itself which message it answers, so
        that a replica taking the request over after a crash finds it in the thread
        (a placeholder's metadata). False when it cannot (a native stream:
        chat.startStream takes no metadata): its id is then recorded in storage."""

    def set_status(self, status: str) -> None: ...

    def begin_task(self, title: str) -> str:
        """Show that a step of the work has started ("Reading report.pdf": plain text,
        no "…"); returns its id for `end_task`. Never raises, never blocks."""

    def end_task(self, task_id: str, *, ok: bool = True) -> None:
        """The step is over: done (`ok`) or failed. An unknown or already ended id is
        ignored. Never raises, never blocks."""

    def append(self, delta: str) -> None: ...

    async def run(self) -> None:
        """Show changes until cancelled (runs beside the model call)."""

    async def finish(self, notice: str = "", receipt: Receipt | None = None) -> bool:
        """The final text plus `notice` — posted now if nothing was shown yet — carrying
        `receipt` where the platform can keep it. True only when the user can see it."""

    async def withdraw(self) -> None:
        """Take the answer's first message back (delete it; a stream is stopped first if
        the platform requires it): it opened an answer nobody will finish, its request
        having passed to another replica that did not know of it. Gone already counts as
        withdrawn. Raises SurfaceError."""

    async def read_thread(self, exclude_ts: set[str]) -> list[HistoryMessage]:
        """The thread's earlier conversation as the platform holds it (for a thread the
        bot has not stored), leaving out `exclude_ts`. Raises SurfaceError."""

    async def resolve_file(self, obj: dict[str, Any]) -> AttachedFile:
        """Describe an attached file (name, type) without downloading it. Raises FileProblem."""

    async def download_file(self, file: AttachedFile, *, max_bytes: int) -> bytes:
        """The file's bytes, at most `max_bytes`. Raises FileProblem."""

    async def post_image(self, data: bytes, *, filename: str, title: str, comment: str, alt_text: str) -> None:
        """Post an image the bot made into the conversation. Raises SurfaceError."""


class Task:
    """A task `progress` shows while its block runs; `fail()` ends it as failed even
    though the block goes on (the error was handled inside)."""

    def __init__(self, task_id: str) -> None:
        self.id = task_id
        self.ok = True

    def fail(self) -> None:
        self.ok = False


@contextmanager
def progress(surface: ReplySurface, title: str) -> Iterator[Task]:
    """`title` shown as a task while the block runs: ended as done when the block
    returns (unless `fail()` was called), as failed when it raises — cancellation too."""
    task = Task(surface.begin_task(title))
    try:
        yield task
    except BaseException:
        surface.end_task(task.id, ok=False)
        raise
    surface.end_task(task.id, ok=task.ok)
