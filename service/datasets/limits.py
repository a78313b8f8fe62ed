"""Caps applied to an uploaded dataset, and the error raised when one is crossed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MiB = 1024 * 1024


@dataclass(frozen=True)
class DatasetLimits:
    """Every cap on a dataset upload; each is named in the error that enforces it."""

    # Size of the uploaded zip itself (the route enforces it while streaming the body).
    max_upload_bytes: int = 512 * MiB
    # Entries in the zip's central directory (files and folders).
    max_entries: int = 5000
    # Bytes actually decompressed from any one entry (counted while streaming).
    max_file_bytes: int = 32 * MiB
    # Bytes actually decompressed from the whole archive.
    max_total_bytes: int = 2048 * MiB
    # Decompressed / compressed bytes of one entry; checked once an entry has produced
    # compression_ratio_min_bytes, so small, very repetitive text files still pass.
    max_compression_ratio: float = 200.0
    compression_ratio_min_bytes: int = 1 * MiB
    # Width * height of one image (after the header is read, before pixels are decoded).
    max_image_pixels: int = 40_000_000
    # One caption file (.txt / .caption), in bytes of UTF-8.
    max_caption_bytes: int = 16 * 1024
    # One metadata file (captions.jsonl, metadata.jsonl, metadata.csv, results.csv); a file
    # over max_file_bytes is refused whole before this per-file cap applies.
    max_metadata_bytes: int = 32 * MiB
    # A zip member name, in bytes of UTF-8.
    max_name_bytes: int = 1024
    # Captions kept for one image (Flickr30k has 5).
    max_captions_per_image: int = 64

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DatasetLimits.{field.name} must be a positive number")

    def as_dict(self) -> dict[str, Any]:
        """The caps as a plain dict (for the report)."""
        return dataclasses.asdict(self)


class DatasetRejected(Exception):
    """An upload that is refused; nothing was stored.

    ``status`` is the HTTP status (413, 415 or 422), ``code`` a short snake_case reason,
    ``detail`` a sentence naming the cap or problem, ``report`` the preflight report when one
    was built (e.g. a dataset with no usable image-caption pair).
    """

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        report: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.report = report

    def __repr__(self) -> str:
        return f"DatasetRejected(status={self.status}, code={self.code!r}, detail={self.detail!r})"


def check_upload_size(received_bytes: int, limits: DatasetLimits) -> None:
    """Raise 413 once a streamed upload has passed ``max_upload_bytes`` (for the route)."""
    if received_bytes > limits.max_upload_bytes:
        raise DatasetRejected(
            413,
            "upload_too_large",
            f"the upload is larger than max_upload_bytes={limits.max_upload_bytes}",
        )
