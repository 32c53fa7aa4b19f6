"""Benchmark: the event loop's lag while a 200-page PDF and a 40-megapixel image are processed.

    python benchmarks/bench_loop_lag.py [--backend trio|asyncio|both] [--pages 200]
                                        [--megapixels 40] [--runs 3] [--inline]

A ticker task sleeps 5 ms at a time and records how late each wake-up is: that lateness
is what every other conversation, Socket Mode ack and ping would feel. Meanwhile the real
code path processes the files exactly as a request does — `attachments.in_worker` (a
worker thread behind the MEDIA_WORKERS limiter, with the cancellation checkpoint between
pages) running `documents.extract_document` on a PDF of `--pages` pages (~40 lines of
text each) and `images.prepare_image` on a `--megapixels` JPEG photo-like image and PNG,
all three at once — plus `fit_documents`, which trims the extracted text to a 100k-token
budget.

It prints, per backend and run: the work's wall time, the number of ticks, the max and
p99 tick lag, and how many ticks were over 50 ms (the target is none). `--inline` also
runs the same work directly in the event loop, to show what the worker threads save.

Like the real process (`bot/cli.py`), the bot's modules are imported and `gc.freeze()`d
before anything runs; the parsing libraries (pypdf, python-docx, openpyxl, Pillow's
plugins) are imported lazily, on first use, as in the bot, so run 1 includes that. The
worker threads still share the GIL with the loop: a full garbage collection over an
unfrozen heap holds it for 100+ ms, which is why `--no-freeze` shows the lag without
the freeze.

This is not a test: it prints figures. Exit status is 0 either way unless something broke.
"""

from __future__ import annotations

import argparse
import gc
import io
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import anyio  # noqa: E402
import anyio.from_thread  # noqa: E402

from bot.config import MediaSettings  # noqa: E402
from bot.processing.attachments import fit_documents, in_worker  # noqa: E402
from bot.processing.context import MediaServices  # noqa: E402
from bot.processing.documents import PDF, DocumentLimits, extract_document  # noqa: E402
from bot.processing.images import prepare_image  # noqa: E402
from tests.media_samples import pdf_with_pages  # noqa: E402

TICK = 0.005
TARGET_MS = 50.0
LINE = "The quarterly figures show revenue of {n} units, costs steady, margins improving (see table {n})."


def make_pdf(pages: int) -> bytes:
    return pdf_with_pages(["\n".join(LINE.format(n=p * 40 + i) for i in range(40)) for p in range(pages)])


def make_images(megapixels: int) -> tuple[bytes, bytes]:
    """A photo-like JPEG (noise over a gradient: hard to compress, like a real photo)
    and a PNG of the same size."""
    from PIL import Image

    width = int((megapixels * 1e6 * 8 / 5) ** 0.5)
    height = int(megapixels * 1e6 / width)
    base = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    noise = Image.effect_noise((width, height), 40).convert("RGB")
    photo = Image.blend(base, noise, 0.35)
    jpeg, png = io.BytesIO(), io.BytesIO()
    photo.save(jpeg, format="JPEG", quality=90)
    photo.save(png, format="PNG", compress_level=1)
    return jpeg.getvalue(), png.getvalue()


class Ticker:
    def __init__(self) -> None:
        self.lags: list[float] = []
        self.running = True

    async def run(self) -> None:
        while self.running:
            due = anyio.current_time() + TICK
            await anyio.sleep(TICK)
            self.lags.append(max(0.0, anyio.current_time() - due))


async def workload(pdf: bytes, jpeg: bytes, png: bytes, *, inline: bool, workers: int) -> None:
    media = MediaServices(url_client=None, workers=anyio.CapacityLimiter(workers))  # type: ignore[arg-type]
    limits = DocumentLimits(max_pdf_pages=1000)
    results: dict[str, object] = {}

    async def pdf_job() -> None:
        if inline:
            document = extract_document("report.pdf", pdf, PDF, limits)
            results["text"] = fit_documents([document], 100_000)
        else:
            document = await in_worker(
                media, extract_document, "report.pdf", pdf, PDF, limits, checkpoint=anyio.from_thread.check_cancelled
            )
            results["text"] = await in_worker(media, fit_documents, [document], 100_000)

    async def image_job(name: str, data: bytes) -> None:
        if inline:
            results[name] = prepare_image(data, max_pixels=100_000_000)
        else:
            results[name] = await in_worker(media, prepare_image, data, max_pixels=100_000_000)

    async with anyio.create_task_group() as tg:
        tg.start_soon(pdf_job)
        tg.start_soon(image_job, "jpeg", jpeg)
        tg.start_soon(image_job, "png", png)
    assert "page 200" in results["text"][0] or "page" in results["text"][0]


async def measure(pdf: bytes, jpeg: bytes, png: bytes, *, inline: bool, workers: int) -> dict:
    ticker = Ticker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        await anyio.sleep(0.05)  # the ticker is running before the work starts
        started = time.perf_counter()
        await workload(pdf, jpeg, png, inline=inline, workers=workers)
        wall = time.perf_counter() - started
        await anyio.sleep(0.02)
        ticker.running = False
    lags = sorted(ticker.lags)
    return {
        "wall_s": wall,
        "ticks": len(lags),
        "max_ms": lags[-1] * 1000 if lags else 0.0,
        "p99_ms": lags[int(0.99 * (len(lags) - 1))] * 1000 if lags else 0.0,
        "median_ms": statistics.median(lags) * 1000 if lags else 0.0,
        "over_50ms": sum(1 for lag in lags if lag * 1000 > TARGET_MS),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["trio", "asyncio", "both"], default="both")
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--megapixels", type=int, default=40)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=MediaSettings.media_workers, help="MEDIA_WORKERS")
    parser.add_argument("--inline", action="store_true", help="also run the work in the event loop, for contrast")
    parser.add_argument("--no-freeze", action="store_true", help="skip the gc.freeze() that bot/cli.py does")
    args = parser.parse_args()
    if not args.no_freeze:
        import bot.startup  # noqa: F401 - everything the bot imports before it runs, as in cli.main

        gc.collect()
        gc.freeze()

    print(f"building a {args.pages}-page PDF and a {args.megapixels}-megapixel JPEG and PNG…", flush=True)
    pdf = make_pdf(args.pages)
    jpeg, png = make_images(args.megapixels)
    print(
        f"  PDF {len(pdf) / 1e6:.1f} MB, JPEG {len(jpeg) / 1e6:.1f} MB, PNG {len(png) / 1e6:.1f} MB; "
        f"{args.workers} worker thread(s)"
    )
    backends = ["trio", "asyncio"] if args.backend == "both" else [args.backend]
    modes = [False, True] if args.inline else [False]
    worst = 0.0
    print(
        f"{'backend':8} {'mode':14} {'run':>3} {'work s':>7} {'ticks':>6} {'median ms':>9} {'p99 ms':>7} "
        f"{'max ms':>7} {'>50ms':>5}"
    )
    for backend in backends:
        for inline in modes:
            for run in range(1, args.runs + 1):
                r = anyio.run(
                    lambda inline=inline: measure(pdf, jpeg, png, inline=inline, workers=args.workers), backend=backend
                )
                mode = "inline (no)" if inline else "worker threads"
                print(
                    f"{backend:8} {mode:14} {run:>3} {r['wall_s']:>7.2f} {r['ticks']:>6} {r['median_ms']:>9.2f} "
                    f"{r['p99_ms']:>7.2f} {r['max_ms']:>7.2f} {r['over_50ms']:>5}",
                    flush=True,
                )
                if not inline:
                    worst = max(worst, r["max_ms"])
    verdict = "met" if worst <= TARGET_MS else "MISSED"
    print(
        f"\nworst tick lag with worker threads: {worst:.1f} ms (target: no tick over {TARGET_MS:.0f} ms) — {verdict}"
        f"{' (without gc.freeze)' if args.no_freeze else ''}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
