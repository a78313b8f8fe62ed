"""Image content sniffing, guarded decoding, and thumbnails (Pillow only)."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from PIL import Image, ImageOps

from service.config import DatasetLimits

# Enough for every signature below, tar's "ustar" at offset 257 included.
SNIFF_BYTES = 512
THUMBNAIL_MEDIA_TYPE = "image/jpeg"

# kind -> (Pillow format name, file extension of the stored original)
IMAGE_KINDS: dict[str, tuple[str, str]] = {
    "jpeg": ("JPEG", "jpg"),
    "png": ("PNG", "png"),
    "webp": ("WEBP", "webp"),
}
# Extensions that say "this was meant to be an image"; a file with one of these names whose
# content is not JPEG, PNG or WebP is reported as undecodable rather than silently ignored.
IMAGE_LIKE_EXTENSIONS = frozenset(
    {
        "jpg",
        "jpeg",
        "jpe",
        "jfif",
        "png",
        "webp",
        "gif",
        "bmp",
        "tif",
        "tiff",
        "heic",
        "heif",
        "avif",
    }
)
_ARCHIVE_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"PK\x03\x04", "zip"),
    (0, b"PK\x05\x06", "zip"),
    (0, b"\x1f\x8b", "gzip"),
    (0, b"BZh", "bzip2"),
    (0, b"\xfd7zXZ\x00", "xz"),
    (0, b"7z\xbc\xaf\x27\x1c", "7z"),
    (0, b"Rar!\x1a\x07", "rar"),
    (0, b"\x28\xb5\x2f\xfd", "zstd"),
    (257, b"ustar", "tar"),
)


class ImageDecodeError(Exception):
    """One file that is not a usable image; the message is the reason shown in the report."""


@dataclass(frozen=True)
class ImageFacts:
    """What ingest records about a decoded image (size after EXIF orientation)."""

    kind: str
    extension: str
    width: int
    height: int


def sniff_image_kind(head: bytes) -> str | None:
    """'jpeg', 'png' or 'webp' from the leading bytes, or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def sniff_archive_kind(head: bytes) -> str | None:
    """The archive format named by the leading bytes (zip, gzip, tar, ...), or None."""
    for offset, signature, kind in _ARCHIVE_SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            return kind
    return None


def inspect_image(data: bytes, *, max_pixels: int) -> ImageFacts:
    """Decode an image fully (as training will) and return its facts; ImageDecodeError if not."""
    kind = sniff_image_kind(data[:SNIFF_BYTES])
    if kind is None:
        raise ImageDecodeError("content is not JPEG, PNG or WebP")
    rgb = _decode_rgb(io.BytesIO(data), allowed_kind=kind, max_pixels=max_pixels)
    return ImageFacts(kind=kind, extension=IMAGE_KINDS[kind][1], width=rgb.width, height=rgb.height)


def open_image_rgb(path: Path, *, max_pixels: int | None = None) -> Image.Image:
    """Open a stored dataset image as training sees it: EXIF orientation applied, RGB."""
    pixel_cap = DatasetLimits().max_image_pixels if max_pixels is None else max_pixels
    with path.open("rb") as file:
        kind = sniff_image_kind(file.read(SNIFF_BYTES))
        if kind is None:
            raise ImageDecodeError("content is not JPEG, PNG or WebP")
        file.seek(0)
        return _decode_rgb(file, allowed_kind=kind, max_pixels=pixel_cap)


def make_thumbnail(image_path: Path, *, max_side: int = 256) -> bytes:
    """A JPEG (THUMBNAIL_MEDIA_TYPE) no larger than ``max_side`` on either side."""
    if max_side <= 0:
        raise ValueError("max_side must be positive")
    with image_path.open("rb") as file:
        kind = sniff_image_kind(file.read(SNIFF_BYTES))
        if kind is None:
            raise ImageDecodeError("content is not JPEG, PNG or WebP")
        file.seek(0)
        thumbnail = _decode_rgb(
            file,
            allowed_kind=kind,
            max_pixels=DatasetLimits().max_image_pixels,
            draft_side=max_side,
        )
    thumbnail.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    thumbnail.save(out, format="JPEG", quality=85)
    return out.getvalue()


def _decode_rgb(
    file: IO[bytes],
    *,
    allowed_kind: str,
    max_pixels: int,
    draft_side: int | None = None,
) -> Image.Image:
    pillow_format = IMAGE_KINDS[allowed_kind][0]
    try:
        # Pillow's own decompression-bomb guard warns before it errors; make the warning an
        # error here so an oversized image is a per-file failure, never a crash or a log line.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file, formats=[pillow_format]) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        f"image is {width}x{height} = {width * height} pixels, more than "
                        f"max_image_pixels={max_pixels}"
                    )
                if draft_side is not None and pillow_format == "JPEG":
                    # JPEG can decode at 1/2..1/8 scale directly: cheap thumbnails.
                    image.draft("RGB", (draft_side, draft_side))
                image.load()
                oriented = ImageOps.exif_transpose(image)
                return oriented.convert("RGB")
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(
            f"Pillow refused it as a decompression bomb ({exc}); max_image_pixels={max_pixels}"
        ) from exc
    except MemoryError as exc:
        raise ImageDecodeError("decoding it ran out of memory") from exc
    # Pillow's decoders raise many types on hostile input (OSError, SyntaxError, ValueError,
    # struct.error, IndexError, ...); every one of them means "this file is unusable".
    except Exception as exc:
        raise ImageDecodeError(f"could not decode as {pillow_format}: {exc}") from exc
