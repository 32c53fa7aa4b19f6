"""Real sample files, made in memory by the tests (no binary fixtures in the repo).

Each builder returns the bytes a user would attach: a multi-page PDF with text (written
by hand, with a correct xref table, so pypdf reads it strictly), an encrypted PDF
(pypdf's own RC4 encryption), a corrupt PDF, a DOCX with a table (python-docx), an
XLSX with two sheets (openpyxl), a CSV, a zip bomb named .docx, a PNG whose header
claims a huge size, an animated GIF, and plain images (Pillow).
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib


def pdf_with_pages(pages: list[str]) -> bytes:
    """A PDF with each page's text in Helvetica, one PDF text line per line of text."""
    objects: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"",  # pages, filled in below
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    kids = []
    for text in pages:
        lines = [
            line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)").encode("latin-1")
            for line in text.split("\n")
        ]
        stream = b"BT /F1 11 Tf 14 TL 72 740 Td " + b" T* ".join(b"(" + line + b") Tj" for line in lines) + b" ET"
        content_number = len(objects) + 2
        page_number = len(objects) + 1
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >>"
            b" /Contents %d 0 R >>" % content_number
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        kids.append(b"%d 0 R" % page_number)
    objects[1] = b"<< /Type /Pages /Kids [" + b" ".join(kids) + b"] /Count %d >>" % len(pages)
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def encrypted_pdf(text: str = "top secret", password: str = "hunter2") -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf_with_pages([text]))))
    writer.encrypt(user_password=password, owner_password=password + "-owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def corrupt_pdf() -> bytes:
    return b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R\n" + bytes(range(256)) * 8 + b"\ngarbage"


def docx_with_table() -> bytes:
    import docx

    document = docx.Document()
    document.add_heading("Quarterly report", level=1)
    document.add_paragraph("Revenue grew in every region.")
    table = document.add_table(rows=3, cols=2)
    for row, (region, value) in zip(
        table.rows, [("Region", "Revenue"), ("North", "120"), ("South", "95")], strict=False
    ):
        row.cells[0].text, row.cells[1].text = region, value
    document.add_paragraph("Outlook: steady.")
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def xlsx_two_sheets() -> bytes:
    import openpyxl

    workbook = openpyxl.Workbook()
    first = workbook.active
    first.title = "Sales"
    for row in [("Month", "Units"), ("Jan", 10), ("Feb", 12)]:
        first.append(row)
    second = workbook.create_sheet("Costs")
    for row in [("Item", "EUR"), ("Rent", 1500.5), ("Power", 210)]:
        second.append(row)
    out = io.BytesIO()
    workbook.save(out)
    return out.getvalue()


def csv_bytes() -> bytes:
    return b"name,score\nada,91\nlinus,87\n"


def zip_bomb(entry_mb: int = 300) -> bytes:
    """A small .docx-looking zip that declares (and would inflate to) `entry_mb` MB."""
    out = io.BytesIO()
    chunk = b"\0" * (1024 * 1024)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        with archive.open("word/document.xml", "w", force_zip64=True) as entry:
            for _ in range(entry_mb):
                entry.write(chunk)
    return out.getvalue()


def many_entries_zip(count: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for i in range(count):
            archive.writestr(f"x/{i}", b"")
    return out.getvalue()


def png_bytes(size: tuple[int, int] = (64, 48), color=(200, 30, 30), mode: str = "RGB") -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format="PNG")
    return out.getvalue()


def jpeg_bytes(size: tuple[int, int] = (3000, 2000)) -> bytes:
    from PIL import Image

    image = Image.linear_gradient("L").resize(size).convert("RGB")
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def huge_png_header(width: int = 30_000, height: int = 30_000) -> bytes:
    """A tiny PNG whose header claims width×height pixels: a decompression bomb that must
    be refused from its header, before any pixel is decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def animated_gif(frames: int = 3, size: tuple[int, int] = (40, 30)) -> bytes:
    from PIL import Image

    images = [Image.new("RGB", size, (i * 60 % 256, 255 - i * 60 % 256, 90)) for i in range(frames)]
    out = io.BytesIO()
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=100, loop=0)
    return out.getvalue()


def _rezip(data: bytes, member: str, change) -> bytes:
    source, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for info in source.infolist():
            body = source.read(info.filename)
            archive.writestr(info.filename, change(body) if info.filename == member else body)
    return out.getvalue()


def billion_laughs(kind: str) -> bytes:
    """A DOCX or XLSX whose XML defines nested entities that would expand to ~3 GB of text
    (an XML bomb inside a small, well-formed zip)."""
    dtd = (
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol0 "'
        + "lol" * 30
        + '">'
        + "".join(f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 9))
        + "]>"
    )

    def bomb(xml: bytes, marker: str) -> bytes:
        body = xml.decode().split("?>", 1)[-1]
        return (dtd + body.replace(marker, "&lol8;", 1)).encode()

    if kind == "docx":
        return _rezip(docx_with_table(), "word/document.xml", lambda b: bomb(b, "Outlook: steady."))
    return _rezip(xlsx_two_sheets(), "xl/worksheets/sheet1.xml", lambda b: bomb(b, "<v>10</v>"))
