"""Documents, images and the small rules around them, on real sample files (no event loop
needed except where a worker thread's cancellation is checked)."""

from __future__ import annotations

import io
import tempfile

import anyio
import anyio.from_thread
import anyio.to_thread
import pytest
from PIL import Image

from bot.config import ConfigError, load_settings
from bot.file_problem import FileProblem
from bot.processing.attachments import fit_documents, image_urls
from bot.processing.conversation import build_prompt
from bot.processing.documents import (
    CSV,
    DOCX,
    PDF,
    TEXT,
    XLSX,
    Document,
    DocumentLimits,
    document_kind,
    extract_document,
)
from bot.processing.image_tools import EDIT, GENERATE, decide_without_tools
from bot.processing.images import image_tokens, prepare_image, target_size
from bot.processing.tokens import count_tokens
from tests import media_samples as samples

LIMITS = DocumentLimits()


def problem(fn, *args, **kwargs) -> FileProblem:
    with pytest.raises(FileProblem) as caught:
        fn(*args, **kwargs)
    return caught.value


# ---------------------------------------------------------------- documents


def test_multi_page_pdf_text_is_extracted_per_page():
    doc = extract_document("r.pdf", samples.pdf_with_pages(["First (page)", "Second", "Third"]), PDF, LIMITS)
    assert doc.label == "PDF, 3 pages"
    assert doc.text.splitlines() == [
        "--- page 1 ---",
        "First (page)",
        "--- page 2 ---",
        "Second",
        "--- page 3 ---",
        "Third",
    ]


def test_pdf_page_cap_reads_the_first_pages_with_a_note():
    data = samples.pdf_with_pages([f"p{i}" for i in range(12)])
    doc = extract_document("r.pdf", data, PDF, DocumentLimits(max_pdf_pages=5))
    assert "p4" in doc.text and "p5" not in doc.text
    assert doc.notes == ("has 12 pages: I read the first 5 (the limit is 5)",)


def test_pdf_text_cap_stops_extraction():
    data = samples.pdf_with_pages(["x" * 500 for _ in range(10)])
    doc = extract_document("r.pdf", data, PDF, DocumentLimits(max_chars=1200))
    assert len(doc.text) <= 1200 and "is long" in doc.notes[0]


def test_encrypted_pdf_is_refused_by_name():
    p = problem(extract_document, "s.pdf", samples.encrypted_pdf(), PDF, LIMITS)
    assert p.kind == "encrypted" and "password-protected" in p.reason


def test_pdf_with_only_an_owner_password_is_read():
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(samples.pdf_with_pages(["open to all"]))))
    writer.encrypt(user_password="", owner_password="owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    assert "open to all" in extract_document("o.pdf", out.getvalue(), PDF, LIMITS).text


def test_corrupt_and_textless_pdfs():
    assert problem(extract_document, "c.pdf", samples.corrupt_pdf(), PDF, LIMITS).kind == "corrupt"
    assert problem(extract_document, "blank.pdf", samples.pdf_with_pages(["", ""]), PDF, LIMITS).kind == "no_text"


def test_docx_with_a_table_keeps_order_headings_and_cells():
    doc = extract_document("n.docx", samples.docx_with_table(), DOCX, LIMITS)
    assert doc.text.splitlines() == [
        "# Quarterly report",
        "Revenue grew in every region.",
        "[table 1]",
        "Region | Revenue",
        "North | 120",
        "South | 95",
        "[end of table 1]",
        "Outlook: steady.",
    ]


def test_xlsx_with_two_sheets():
    doc = extract_document("b.xlsx", samples.xlsx_two_sheets(), XLSX, LIMITS)
    assert doc.summary == "2 sheets, 6 rows"
    assert doc.text.splitlines() == [
        "## Sheet: Sales",
        "Month,Units",
        "Jan,10",
        "Feb,12",
        "## Sheet: Costs",
        "Item,EUR",
        "Rent,1500.5",
        "Power,210",
    ]


def test_xlsm_is_read_like_xlsx():
    assert document_kind("macro.xlsm") == XLSX
    assert "Rent" in extract_document("macro.xlsm", samples.xlsx_two_sheets(), XLSX, LIMITS).text


def test_csv_and_text_files():
    doc = extract_document("s.csv", samples.csv_bytes(), CSV, LIMITS)
    assert doc.label == "CSV, 3 rows" and "linus,87" in doc.text
    bom = extract_document("u.md", "\ufeff# Títle\n".encode("utf-8"), TEXT, LIMITS)
    assert bom.text == "# Títle\n"
    utf16 = extract_document("w.txt", "hällo".encode("utf-16"), TEXT, LIMITS)
    assert utf16.text == "hällo"


def test_zip_bombs_are_refused_before_parsing():
    bomb = problem(extract_document, "b.docx", samples.zip_bomb(250), DOCX, LIMITS)
    assert bomb.kind == "zip_bomb" and "would unpack to 250 MB" in bomb.reason
    many = problem(extract_document, "m.xlsx", samples.many_entries_zip(50), XLSX, DocumentLimits(max_zip_entries=20))
    assert many.kind == "zip_bomb" and "50 parts" in many.reason


@pytest.mark.parametrize(
    "name,data,kind,reason",
    [
        ("e.txt", b"", TEXT, "is empty"),
        ("x.pdf", samples.png_bytes(), PDF, "is named like a PDF but contains a PNG image"),
        ("x.docx", b"just some words", DOCX, "is named like a Word document but contains plain text"),
        ("x.docx", samples.xlsx_two_sheets(), DOCX, "is not a readable Word document"),
        ("x.xlsx", samples.docx_with_table(), XLSX, "is not a readable Excel workbook"),
        ("x.txt", samples.pdf_with_pages(["a"]), TEXT, "contains PDF data"),
        ("x.txt", b"caf\xe9", TEXT, "is not UTF-8 text"),
        ("x.txt", b"\x00\x01\x02binary", TEXT, "binary data"),
    ],
)
def test_bad_documents_say_why(name, data, kind, reason):
    assert reason in problem(extract_document, name, data, kind, LIMITS).reason


def test_document_kinds_from_name_mime_and_slack_filetype():
    assert document_kind("a.PDF") == PDF
    assert document_kind("noext", "application/pdf") == PDF
    assert document_kind("main.py") == TEXT and document_kind("snippet", "", "python") == TEXT
    assert document_kind("data.tsv") == "tsv" and document_kind("Dockerfile") == TEXT
    assert document_kind("slides.pptx") is None and document_kind("old.doc") is None
    assert document_kind("song.mp3", "audio/mpeg", "mp3") is None


def test_parsing_writes_no_temporary_files(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    extract_document("a.pdf", samples.pdf_with_pages(["x"] * 3), PDF, LIMITS)
    extract_document("a.docx", samples.docx_with_table(), DOCX, LIMITS)
    extract_document("a.xlsx", samples.xlsx_two_sheets(), XLSX, LIMITS)
    prepare_image(samples.jpeg_bytes(), max_pixels=10**8)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.anyio
async def test_a_cancelled_parse_stops_within_a_page():
    """The worker thread checks for cancellation between pages: a 2,000-page PDF is
    abandoned almost at once, not parsed to the end."""
    data = samples.pdf_with_pages([f"page {i} " * 20 for i in range(2000)])
    started = anyio.current_time()
    with anyio.move_on_after(0.05) as scope:
        await anyio.to_thread.run_sync(
            lambda: extract_document(
                "big.pdf", data, PDF, DocumentLimits(max_pdf_pages=5000), checkpoint=anyio.from_thread.check_cancelled
            )
        )
    assert scope.cancelled_caught
    assert anyio.current_time() - started < 1.0


# ---------------------------------------------------------------- images


def test_large_image_is_downscaled_and_reencoded():
    prepared = prepare_image(samples.jpeg_bytes((4000, 3000)), max_pixels=50_000_000)
    assert (prepared.width, prepared.height) == (1024, 768) and prepared.mime == "image/jpeg"
    assert (prepared.original_width, prepared.original_height) == (4000, 3000)
    assert Image.open(io.BytesIO(prepared.data)).size == (1024, 768)


def test_transparency_is_kept_as_png_and_small_images_are_not_enlarged():
    prepared = prepare_image(samples.png_bytes((50, 40), color=(0, 0, 0, 0), mode="RGBA"), max_pixels=10**6)
    assert prepared.mime == "image/png" and (prepared.width, prepared.height) == (50, 40)


def test_image_bombs_and_bad_images_are_refused():
    assert problem(prepare_image, samples.huge_png_header(8000, 8000), max_pixels=50_000_000).kind == "too_many_pixels"
    assert problem(prepare_image, samples.huge_png_header(), max_pixels=50_000_000).kind == "too_many_pixels"
    assert problem(prepare_image, samples.jpeg_bytes()[:3000], max_pixels=10**8).kind == "corrupt"
    assert problem(prepare_image, samples.pdf_with_pages(["x"]), max_pixels=10**8).kind == "not_an_image"
    assert problem(prepare_image, b"", max_pixels=10**8).kind == "empty"
    bmp = io.BytesIO()
    Image.new("RGB", (10, 10)).save(bmp, format="BMP")
    assert problem(prepare_image, bmp.getvalue(), max_pixels=10**8).kind == "not_an_image"


def test_animated_gif_first_frame_with_a_note():
    prepared = prepare_image(samples.animated_gif(frames=5), max_pixels=10**6)
    assert "animated" in prepared.note and (prepared.width, prepared.height) == (40, 30)


def test_sizes_and_token_costs_follow_the_models_rules():
    assert target_size(8000, 5000) == (1229, 768)
    assert target_size(100, 5000) == (41, 2048)
    assert image_tokens(1024, 768) == 85 + 170 * 4
    assert image_tokens(512, 512) == 255


def test_image_parts_go_into_the_user_message_and_count_in_the_budget():
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "auto"}}
    prompt = build_prompt(
        "sys", [], "look", budget_tokens=2000, reserve_for_answer=100, user_parts=[part], parts_tokens=765
    )
    assert prompt.messages[-1]["content"] == [{"type": "text", "text": "look"}, part]
    squeezed = build_prompt(
        "sys", [], "word " * 2000, budget_tokens=2000, reserve_for_answer=100, user_parts=[part], parts_tokens=1500
    )
    assert squeezed.truncated_user_message


# ---------------------------------------------------------------- small rules


def test_image_urls_in_slack_text():
    text = (
        "see <https://example.com/a/cat.PNG> and <https://example.com/page|a page> "
        "and <http://x.test/p.jpg?x=1&amp;y=2|pic> and <ftp://files.test/z.gif> and https://bare.test/y.webp"
    )
    assert image_urls(text) == [
        "https://example.com/a/cat.PNG",
        "http://x.test/p.jpg?x=1&y=2",
        "ftp://files.test/z.gif",
        "https://bare.test/y.webp",
    ]


def test_documents_share_the_budget_and_long_ones_are_trimmed_with_a_note():
    small = Document("small.txt", TEXT, "tiny text", "1 lines")
    big = Document("big.txt", TEXT, "word " * 20_000, "1 lines")
    text, notes = fit_documents([small, big], 2000)
    assert "[Attached file: small.txt (text file, 1 lines)]\ntiny text\n[End of small.txt]" in text
    assert "big.txt was trimmed to fit the model's context" in text
    assert count_tokens(text) < 2100
    assert len(notes) == 1 and "**big.txt** is long: I could read only the first" in notes[0]


@pytest.mark.parametrize(
    "text,has_image,expected",
    [
        ("draw a cat on a skateboard", False, GENERATE),
        ("Please paint the sunset", False, GENERATE),
        ("can you generate an image of a robot", False, GENERATE),
        ("make me a logo for my bakery", False, GENERATE),
        ("create a detailed diagram of the water cycle", False, GENERATE),
        ("make it darker", True, EDIT),
        ("remove the background", True, EDIT),
        ("make it darker", False, None),
        ("what is in this image?", True, None),
        ("how do I draw attention to my post?", False, None),
        ("explain photosynthesis", False, None),
    ],
)
def test_fallback_rule(text, has_image, expected):
    assert decide_without_tools(text, has_image) == expected


def test_media_settings():
    env = {"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xapp-1", "OPENAI_API_KEY": "sk"}
    defaults = load_settings(env, dotenv_path=None)
    assert (defaults.media.max_file_mb, defaults.media.image_model, defaults.media.max_context_images) == (
        20.0,
        "gpt-image-2.5-sunburst",
        4,
    )
    assert defaults.media.allow_loopback_urls is False
    custom = load_settings(
        {
            **env,
            "MAX_FILE_MB": "5",
            "IMAGE_MODEL": "gpt-image-2",
            "IMAGE_SIZE": "1536x1024",
            "IMAGE_QUALITY": "high",
            "MAX_CONTEXT_IMAGES": "0",
            "ALLOW_LOOPBACK_URLS": "true",
        },
        dotenv_path=None,
    )
    assert (
        custom.media.max_file_mb,
        custom.media.image_model,
        custom.media.image_size,
        custom.media.image_quality,
    ) == (
        5.0,
        "gpt-image-2",
        "1536x1024",
        "high",
    )
    assert custom.media.max_context_images == 0 and custom.media.allow_loopback_urls is True
    for bad in (
        {"IMAGE_SIZE": "huge"},
        {"IMAGE_QUALITY": "hd"},
        {"MAX_FILE_MB": "0"},
        {"ALLOW_LOOPBACK_URLS": "maybe"},
    ):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            load_settings({**env, **bad}, dotenv_path=None)


@pytest.mark.parametrize("kind,name", [(DOCX, "bomb.docx"), (XLSX, "bomb.xlsx")])
def test_xml_entity_bombs_inside_office_files_are_refused(kind, name):
    """The XML parsers under python-docx (libxml2) and openpyxl (expat) cap entity
    amplification; without that this would expand to gigabytes."""
    assert problem(extract_document, name, samples.billion_laughs(kind), kind, LIMITS).kind == "corrupt"
