"""Images for the model: check, downscale and re-encode with Pillow (blocking; run in a
worker thread, see `attachments.py`).

Why downscale here: the model itself shrinks a high-detail image to fit 2048×2048 and
then to 768 px on the short side, so anything larger is bytes sent for nothing (and a
40-megapixel photo as a data URL is ~15 MB of base64). Re-encoding also strips metadata
(EXIF location) and turns every accepted format into PNG (when there is transparency)
or JPEG, which every vision endpoint takes.

Safety: only PNG, JPEG, GIF and WebP decoders are allowed; the pixel count is checked
from the header, before anything is decoded (decompression bombs); animated images use
their first frame only (`is_animated` looks at two frames, never walks them all).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from bot.file_problem import FileProblem

FORMATS = ("PNG", "JPEG", "GIF", "WEBP")
IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "jpe", "gif", "webp"})
IMAGE_MIMETYPES = frozenset({"image/png", "image/jpeg", "image/jpg", "image/gif", "image/webp"})
LONG_SIDE = 2048
SHORT_SIDE = 768
JPEG_QUALITY = 85


@dataclass(frozen=True)
class PreparedImage:
    """An image ready to send: re-encoded bytes and what the user should know."""

    data: bytes
    mime: str  # image/png or image/jpeg
    width: int
    height: int
    original_width: int
    original_height: int
    note: str = ""  # completes "<name> …", e.g. "is animated: I looked at its first frame only"

    @property
    def data_url(self) -> str:
        import base64

        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"

    @property
    def tokens(self) -> int:
        return image_tokens(self.width, self.height)


def image_tokens(width: int, height: int) -> int:
    """What a high-detail image costs in the context (OpenAI's published rule: 85 plus
    170 per 512-px tile after fitting 2048 and 768 px), for the budget."""
    scale = min(1.0, LONG_SIDE / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, SHORT_SIDE / max(1.0, min(w, h)))
    w, h = w * scale, h * scale
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


def target_size(width: int, height: int) -> tuple[int, int]:
    """Fit the long side to LONG_SIDE and the short side to SHORT_SIDE, never enlarging."""
    scale = min(1.0, LONG_SIDE / max(width, height), SHORT_SIDE / min(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def is_image_file(name: str, mimetype: str = "", filetype: str = "") -> bool:
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return (
        ext in IMAGE_EXTENSIONS
        or (mimetype or "").lower() in IMAGE_MIMETYPES
        or (filetype or "").lower() in IMAGE_EXTENSIONS
    )


def prepare_image(data: bytes, *, max_pixels: int) -> PreparedImage:
    """Downscale and re-encode `data`. Raises FileProblem (empty, not an image of an
    accepted kind, damaged, or more than `max_pixels` pixels)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise FileProblem("is empty", "empty")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise FileProblem(
                    f"is too large to process ({width:,}×{height:,} pixels; the limit is "
                    f"{max_pixels / 1e6:g} megapixels)",
                    "too_many_pixels",
                )
            note = ""
            if getattr(image, "is_animated", False):
                note = "is animated: I looked at its first frame only"
            image.seek(0)
            size = target_size(width, height)
            if image.format == "JPEG":
                image.draft("RGB", size)  # let the decoder scale by 1/2..1/8 while decoding: far less work
            image.load()
            frame = ImageOps.exif_transpose(image)
            has_alpha = frame.mode in ("RGBA", "LA", "PA") or (frame.mode == "P" and "transparency" in frame.info)
            frame = frame.convert("RGBA" if has_alpha else "RGB")
            size = target_size(*frame.size)
            if frame.size != size:
                frame = frame.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
            out = io.BytesIO()
            if has_alpha:
                frame.save(out, format="PNG", optimize=False)
                mime = "image/png"
            else:
                frame.save(out, format="JPEG", quality=JPEG_QUALITY, optimize=True)
                mime = "image/jpeg"
    except FileProblem:
        raise
    except Image.DecompressionBombError:
        raise FileProblem(
            f"is too large to process (over {max_pixels / 1e6:g} megapixels)", "too_many_pixels"
        ) from None
    except UnidentifiedImageError:
        raise FileProblem("is not a PNG, JPEG, GIF or WebP image I can read", "not_an_image") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise FileProblem("is damaged: the image could not be decoded", "corrupt") from None
    return PreparedImage(out.getvalue(), mime, size[0], size[1], width, height, note)
