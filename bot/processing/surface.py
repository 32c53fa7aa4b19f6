"""Where an answer appears, as processing sees it: the `ReplySurface` interface.

Processing turns a message into a reply through this interface only; the nursery builds
the Slack one (`bot.slack.answer_surface`) and passes it in, `slackbot shell` a terminal
one. Besides the answer itself (start, status, the growing text, the final text), the
surface reads what the conversation platform holds: an earlier thread the bot has not
stored, the files attached to the message, and it posts the images the bot draws.

Errors cross this boundary as the processing layer's own types, as httpx maps httpcore's
exceptions at its transport boundary: `SurfaceError` when the platform refused,
`bot.file_problem.FileProblem` when one file cannot be used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from bot.storage.base import HistoryMessage

PLACEHOLDER = "_Thinking…_"


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

    async def start(self, status: str = PLACEHOLDER) -> str:
        """Open the answer (a placeholder, a stream…); its id, or "" if the answer will
        appear only when it is finished. Raises SurfaceError."""

    def set_status(self, status: str) -> None: ...

    def append(self, delta: str) -> None: ...

    async def run(self) -> None:
        """Show changes until cancelled (runs beside the model call)."""

    async def finish(self, notice: str = "", receipt: Receipt | None = None) -> bool:
        """The final text plus `notice` — posted now if nothing was shown yet — carrying
        `receipt` where the platform can keep it. True only when the user can see it."""

    async def read_thread(self, exclude_ts: set[str]) -> list[HistoryMessage]:
        """The thread's earlier conversation as the platform holds it (for a thread the
        bot has not stored), leaving out `exclude_ts`. Raises SurfaceError."""

    async def resolve_file(self, obj: dict[str, Any]) -> AttachedFile:
        """Describe an attached file (name, type) without downloading it. Raises FileProblem."""

    async def download_file(self, file: AttachedFile, *, max_bytes: int) -> bytes:
        """The file's bytes, at most `max_bytes`. Raises FileProblem."""

    async def post_image(self, data: bytes, *, filename: str, title: str, comment: str, alt_text: str) -> None:
        """Post an image the bot made into the conversation. Raises SurfaceError."""
