"""Ingest throughput: images/s for a generated zip of small images and captions.

    .venv/bin/python bench/bench_ingest.py [--images 1000] [--side 64] [--repeats 3]

Builds the archive once per layout (pairs: x.jpg + x.txt; imagefolder: metadata.jsonl), then
times ``ingest_zip`` end to end (read, validate, decode, hash, write, report) and prints a table.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from service.config import DatasetLimits
from service.datasets.ingest import ingest_zip


def _encoded_images(count: int, side: int) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(0)
    images: list[tuple[str, bytes]] = []
    for index in range(count):
        # Smooth gradients plus noise: compresses like a photo, not like white noise.
        base = np.linspace(0, 255, side, dtype=np.float32)
        pixels = (base[None, :, None] + rng.normal(0, 12, (side, side, 3))).clip(0, 255)
        out = io.BytesIO()
        fmt, ext = ("JPEG", "jpg") if index % 4 else ("PNG", "png")
        Image.fromarray(pixels.astype(np.uint8), "RGB").save(out, format=fmt)
        images.append((f"img_{index:05d}.{ext}", out.getvalue()))
    return images


def _write_zip(path: Path, images: list[tuple[str, bytes]], layout: str) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        lines = []
        for name, data in images:
            caption = f"a photo of sample {name}, with a gradient and some noise"
            archive.writestr(f"data/{name}", data)
            if layout == "pairs":
                archive.writestr(f"data/{name.rsplit('.', 1)[0]}.txt", caption)
            else:
                lines.append(json.dumps({"file_name": name, "text": caption}))
        if layout == "imagefolder":
            archive.writestr("data/metadata.jsonl", "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    images = _encoded_images(args.images, args.side)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for layout in ("pairs", "imagefolder"):
            zip_path = root / f"{layout}.zip"
            _write_zip(zip_path, images, layout)
            seconds = []
            for repeat in range(args.repeats):
                start = time.perf_counter()
                result = ingest_zip(
                    zip_path=zip_path,
                    dest_dir=root / f"{layout}-{repeat}",
                    limits=DatasetLimits(),
                )
                seconds.append(time.perf_counter() - start)
                assert result.item_count == args.images
            best, median = min(seconds), statistics.median(seconds)
            rows.append(
                (
                    layout,
                    args.images,
                    f"{args.side}x{args.side}",
                    f"{zip_path.stat().st_size / 1e6:.2f}",
                    f"{median:.3f}",
                    f"{args.images / median:.0f}",
                    f"{args.images / best:.0f}",
                )
            )
    header = (
        "layout",
        "images",
        "size",
        "zip MB",
        "median s",
        "images/s (median)",
        "images/s (best)",
    )
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * width for width in widths), *rows]:
        print("  ".join(str(cell).rjust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
