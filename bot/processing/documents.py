"""Text out of documents: PDF (pypdf), Word (python-docx), Excel (openpyxl), CSV/TSV, text.

Pure, blocking functions: the caller runs them in a worker thread behind a limiter
(`attachments.py`), passing `checkpoint` = `anyio.from_thread.check_cancelled`, which is
called between pages and rows so a cancelled request stops the parse within one page
instead of running it to the end.

Every problem is a `FileProblem` with a reason for the user. The limits exist because the
bytes come from anyone in the workspace:
- DOCX/XLSX are zip files: the entry count and the *declared* uncompressed total are
  checked from the central directory before any parser sees them (zipfile never inflates
  an entry past its declared size, so the declared total bounds the real work);
- PDFs: at most `max_pdf_pages` pages are read, and extraction stops at `max_chars`;
- every document stops at `max_chars` characters (the context budget trims further).
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field

from bot.config import MediaSettings
from bot.file_problem import FileProblem

log = logging.getLogger(__name__)

MB = 1024 * 1024

# Kinds of document this module reads, as returned by `document_kind`.
PDF, DOCX, XLSX, CSV, TSV, TEXT = "pdf", "docx", "xlsx", "csv", "tsv", "text"
KIND_LABELS = {PDF: "PDF", DOCX: "Word document", XLSX: "Excel workbook", CSV: "CSV", TSV: "TSV", TEXT: "text file"}

TEXT_EXTENSIONS = frozenset(
    "txt text md markdown rst json jsonl ndjson yaml yml toml ini cfg conf env log xml html htm css scss "
    "py pyi js mjs cjs jsx ts tsx java kt kts scala go rs rb php pl pm lua r jl swift m mm c h cc cpp cxx "
    "hpp hh cs fs vb sql sh bash zsh fish ps1 bat cmd dockerfile makefile gradle properties tf hcl "
    "graphql gql proto diff patch tex bib srt vtt svelte vue dart ex exs erl hs clj elm nim zig".split()
)
TEXT_MIMETYPES = frozenset(
    {
        "application/json",
        "application/x-yaml",
        "application/yaml",
        "application/xml",
        "application/javascript",
        "application/x-sh",
        "application/sql",
        "application/toml",
    }
)
# Slack's `filetype` for snippets and text uploads (besides the extension-like ones above).
SLACK_TEXT_FILETYPES = frozenset(
    {
        "text",
        "post",
        "javascript",
        "python",
        "shell",
        "markdown",
        "yaml",
        "json",
        "xml",
        "html",
        "csharp",
        "cpp",
        "c",
        "go",
        "java",
        "kotlin",
        "ruby",
        "rust",
        "sql",
        "swift",
        "typescript",
        "php",
        "perl",
        "scala",
        "diff",
        "dockerfile",
    }
)
LEGACY_OFFICE = {
    "doc": "Word 97–2003 (.doc) files can't be read; save it as .docx and send it again",
    "xls": "Excel 97–2003 (.xls) files can't be read; save it as .xlsx and send it again",
    "ppt": "PowerPoint files can't be read yet",
    "pptx": "PowerPoint files can't be read yet",
}


def _noop() -> None:
    pass


@dataclass(frozen=True)
class DocumentLimits:
    max_pdf_pages: int = 300
    max_chars: int = 1_000_000
    max_zip_entries: int = 5_000
    max_unzipped_bytes: int = 200 * MB
    max_rows: int = 200_000  # spreadsheet rows over all sheets
    max_columns: int = 500  # per row; the rest of a row is cut

    @classmethod
    def from_settings(cls, media: MediaSettings) -> DocumentLimits:
        """MAX_PDF_PAGES and MAX_DOCUMENT_CHARS; the other bounds are fixed."""
        return cls(max_pdf_pages=media.max_pdf_pages, max_chars=media.max_document_chars)


@dataclass(frozen=True)
class Document:
    name: str
    kind: str  # one of the kinds above
    text: str
    summary: str  # e.g. "3 pages", "2 sheets, 14 rows"
    notes: tuple[str, ...] = field(default=())  # what was left out, completing "<name> …"

    @property
    def label(self) -> str:
        return f"{KIND_LABELS[self.kind]}, {self.summary}" if self.summary else KIND_LABELS[self.kind]


def extension(name: str) -> str:
    base = name.rsplit("/", 1)[-1].lower()
    if "." not in base:
        return base if base in ("dockerfile", "makefile") else ""
    return base.rsplit(".", 1)[1]


def document_kind(name: str, mimetype: str = "", filetype: str = "") -> str | None:
    """Which reader a file needs, from its name, MIME type and Slack `filetype`;
    None when it is not a document this bot reads."""
    ext, mimetype, filetype = extension(name), (mimetype or "").lower(), (filetype or "").lower()
    if ext == "pdf" or mimetype == "application/pdf" or filetype == "pdf":
        return PDF
    if ext == "docx" or filetype == "docx":
        return DOCX
    if ext in ("xlsx", "xlsm") or filetype in ("xlsx", "xlsm"):
        return XLSX
    if ext == "csv" or filetype == "csv" or mimetype == "text/csv":
        return CSV
    if ext in ("tsv", "tab") or filetype == "tsv" or mimetype == "text/tab-separated-values":
        return TSV
    if ext in LEGACY_OFFICE:
        return None
    if (
        ext in TEXT_EXTENSIONS
        or filetype in SLACK_TEXT_FILETYPES
        or mimetype.startswith("text/")
        or mimetype in TEXT_MIMETYPES
    ):
        return TEXT
    return None


def unsupported_reason(name: str) -> str:
    """Why a file that is neither an image nor a known document is not read."""
    ext = extension(name)
    if ext in LEGACY_OFFICE:
        return LEGACY_OFFICE[ext]
    shown = f".{ext} files" if ext else "files of this type"
    return (
        f"can't be read: {shown} aren't supported. I read images (PNG, JPEG, GIF, WebP), PDF, "
        "Word (.docx), Excel (.xlsx/.xlsm), CSV/TSV and text or source files"
    )


def sniff(data: bytes) -> str:
    """What the bytes are, whatever the name says: pdf, zip, png, jpeg, gif, webp, html,
    empty, binary or text."""
    if not data:
        return "empty"
    head = data[:1024]
    if b"%PDF-" in head:
        return "pdf"
    if data.startswith(b"PK\x03\x04") or data.startswith(b"PK\x05\x06"):
        return "zip"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    lowered = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if lowered.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "html"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "text"
    if b"\x00" in data[:4096]:
        return "binary"
    return "text"


SNIFF_WORDS = {
    "pdf": "PDF data",
    "zip": "a zip archive",
    "png": "a PNG image",
    "jpeg": "a JPEG image",
    "gif": "a GIF image",
    "webp": "a WebP image",
    "html": "a web page (HTML)",
    "empty": "nothing",
    "binary": "binary data",
    "text": "plain text",
}


def _mismatch(kind: str, found: str) -> FileProblem:
    return FileProblem(
        f"is named like a {KIND_LABELS[kind]} but contains {SNIFF_WORDS[found]}; "
        "check the file (or its extension) and send it again",
        "wrong_type",
    )


def decode_text(data: bytes) -> str:
    """UTF-8 (with or without BOM) or BOM-marked UTF-16; anything else is refused rather
    than guessed, so the model never reads mojibake."""
    try:
        if data.startswith(codecs.BOM_UTF8):
            text = data[len(codecs.BOM_UTF8) :].decode("utf-8")
        elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            text = data.decode("utf-16")
        else:
            text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise FileProblem(
            "is not UTF-8 text, so I could not decode it; save it as UTF-8 and send it again", "undecodable"
        ) from None
    if "\x00" in text:
        raise FileProblem("looks like binary data, not text", "undecodable")
    return text


class _TextBudget:
    """Collects extracted text until `max_chars`; `full` says when to stop."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.parts: list[str] = []
        self.size = 0
        self.full = False

    def add(self, text: str) -> None:
        if self.full:
            return
        room = self.max_chars - self.size
        if len(text) > room:
            text, self.full = text[:room], True
        self.parts.append(text)
        self.size += len(text) + 1

    @property
    def text(self) -> str:
        return "\n".join(self.parts)


def check_zip(data: bytes, kind: str, limits: DocumentLimits) -> None:
    """Refuse a zip-based document before parsing it: not a zip, damaged, too many
    entries, or a declared uncompressed total over the limit (a zip bomb)."""
    found = sniff(data)
    if found != "zip":
        raise _mismatch(kind, found)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError):
        raise FileProblem(f"is damaged: it is not a readable {KIND_LABELS[kind]}", "corrupt") from None
    if len(entries) > limits.max_zip_entries:
        raise FileProblem(
            f"has {len(entries):,} parts inside (the limit is {limits.max_zip_entries:,}); "
            "it looks like a zip bomb, so I did not open it",
            "zip_bomb",
        )
    total = sum(e.file_size for e in entries)
    if total > limits.max_unzipped_bytes:
        raise FileProblem(
            f"would unpack to {total / MB:,.0f} MB (the limit is {limits.max_unzipped_bytes / MB:,.0f} "
            "MB); it looks like a zip bomb, so I did not open it",
            "zip_bomb",
        )


def extract_document(
    name: str, data: bytes, kind: str, limits: DocumentLimits, checkpoint: Callable[[], None] = _noop
) -> Document:
    """The document's text, labelled by kind. Raises FileProblem."""
    if not data:
        raise FileProblem("is empty", "empty")
    if kind == PDF:
        return _pdf(name, data, limits, checkpoint)
    if kind == DOCX:
        return _docx(name, data, limits, checkpoint)
    if kind == XLSX:
        return _xlsx(name, data, limits, checkpoint)
    found = sniff(data)
    if found not in ("text", "html"):
        raise _mismatch(kind, found)
    text = decode_text(data)
    notes: tuple[str, ...] = ()
    if len(text) > limits.max_chars:
        notes = (f"is long: only its first {limits.max_chars:,} characters were read",)
        text = text[: limits.max_chars]
    if not text.strip():
        raise FileProblem("is empty", "empty")
    if kind in (CSV, TSV):
        rows = text.count("\n") + (0 if text.endswith("\n") else 1)
        return Document(name, kind, text, f"{rows:,} rows", notes)
    return Document(name, kind, text, f"{text.count(chr(10)) + 1:,} lines", notes)


def _pdf(name: str, data: bytes, limits: DocumentLimits, checkpoint: Callable[[], None]) -> Document:
    from pypdf import PasswordType, PdfReader
    from pypdf.errors import DependencyError

    found = sniff(data)
    if found != "pdf":
        raise _mismatch(PDF, found)
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            try:
                opened = reader.decrypt("")  # "owner password only" PDFs open with an empty password
            except DependencyError:
                opened = PasswordType.NOT_DECRYPTED
            if opened == PasswordType.NOT_DECRYPTED:
                raise FileProblem(
                    "is password-protected (encrypted), so I can't read it; send a copy without a password", "encrypted"
                )
        count = len(reader.pages)
    except FileProblem:
        raise
    except Exception as exc:
        log.info("pdf %r unreadable: %s: %s", name, type(exc).__name__, exc)
        raise FileProblem("is damaged: it is not a readable PDF", "corrupt") from None
    if count == 0:
        raise FileProblem("has no pages", "empty")
    budget = _TextBudget(limits.max_chars)
    notes: list[str] = []
    unreadable = 0
    read = min(count, limits.max_pdf_pages)
    for number in range(read):
        checkpoint()
        try:
            text = reader.pages[number].extract_text() or ""
        except Exception as exc:
            log.info("pdf %r page %d unreadable: %s", name, number + 1, type(exc).__name__)
            unreadable += 1
            continue
        budget.add(f"--- page {number + 1} ---\n{text.strip()}")
        if budget.full:
            read = number + 1
            notes.append(
                f"is long: I read its text up to page {read} of {count} (the first {limits.max_chars:,} characters)"
            )
            break
    if read < count and not budget.full:
        notes.append(f"has {count} pages: I read the first {read} (the limit is {limits.max_pdf_pages})")
    if unreadable:
        notes.append(f"has {unreadable} page(s) whose text could not be extracted")
    text = budget.text
    body = "".join(line for line in text.splitlines() if not line.startswith("--- page ")).strip()
    if not body:
        raise FileProblem(
            "has no text I can extract (it may be scanned images); try sending the pages as images instead", "no_text"
        )
    return Document(name, PDF, text, f"{count} page{'s' if count != 1 else ''}", tuple(notes))


def _docx(name: str, data: bytes, limits: DocumentLimits, checkpoint: Callable[[], None]) -> Document:
    import docx
    from docx.table import Table

    check_zip(data, DOCX, limits)
    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as exc:
        log.info("docx %r unreadable: %s: %s", name, type(exc).__name__, exc)
        raise FileProblem("is not a readable Word document (.docx)", "corrupt") from None
    budget = _TextBudget(limits.max_chars)
    tables = 0
    try:
        for i, block in enumerate(document.iter_inner_content()):
            if i % 100 == 0:
                checkpoint()
            if isinstance(block, Table):
                tables += 1
                budget.add(f"[table {tables}]")
                for row in block.rows:
                    budget.add(" | ".join(cell.text.strip().replace("\n", " ") for cell in row.cells))
                budget.add(f"[end of table {tables}]")
            elif block.text.strip():
                style = (block.style.name if block.style is not None else "") or ""
                prefix = "#" * int(style[-1]) + " " if style.startswith("Heading") and style[-1:].isdigit() else ""
                budget.add(prefix + block.text)
            if budget.full:
                break
    except FileProblem:
        raise
    except Exception as exc:
        log.info("docx %r failed while reading: %s: %s", name, type(exc).__name__, exc)
        raise FileProblem("is damaged: it is not a readable Word document", "corrupt") from None
    notes = (f"is long: only its first {limits.max_chars:,} characters were read",) if budget.full else ()
    if not budget.text.strip():
        raise FileProblem("has no text", "empty")
    summary = f"{tables} table{'s' if tables != 1 else ''}" if tables else ""
    return Document(name, DOCX, budget.text, summary, notes)


def _xlsx(name: str, data: bytes, limits: DocumentLimits, checkpoint: Callable[[], None]) -> Document:
    import openpyxl

    check_zip(data, XLSX, limits)
    try:
        workbook = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except Exception as exc:
        log.info("xlsx %r unreadable: %s: %s", name, type(exc).__name__, exc)
        raise FileProblem("is not a readable Excel workbook (.xlsx/.xlsm)", "corrupt") from None
    budget = _TextBudget(limits.max_chars)
    rows_read = 0
    notes: list[str] = []
    sheets = 0
    try:
        for sheet in workbook.worksheets:
            sheets += 1
            budget.add(f"## Sheet: {sheet.title}")
            columns = sheet.max_column if isinstance(sheet.max_column, int) else None
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            for row in sheet.iter_rows(
                values_only=True, max_col=min(columns or limits.max_columns, limits.max_columns)
            ):
                rows_read += 1
                if rows_read % 200 == 0:
                    checkpoint()
                values = list(row)
                while values and values[-1] is None:
                    values.pop()
                writer.writerow(["" if v is None else str(v) for v in values])
                if rows_read >= limits.max_rows or buffer.tell() > limits.max_chars:
                    break
            budget.add(buffer.getvalue().rstrip("\n"))
            if rows_read >= limits.max_rows:
                notes.append(f"is large: I read its first {limits.max_rows:,} rows")
                break
            if budget.full:
                notes.append(f"is long: only its first {limits.max_chars:,} characters were read")
                break
    except FileProblem:
        raise
    except Exception as exc:
        log.info("xlsx %r failed while reading: %s: %s", name, type(exc).__name__, exc)
        raise FileProblem("is damaged: it is not a readable Excel workbook", "corrupt") from None
    finally:
        workbook.close()
    if sheets == 0:
        raise FileProblem("has no worksheets", "empty")
    return Document(
        name, XLSX, budget.text, f"{sheets} sheet{'s' if sheets != 1 else ''}, {rows_read:,} rows", tuple(notes)
    )
