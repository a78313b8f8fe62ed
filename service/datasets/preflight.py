"""The preflight report: what ingest found, summarised before any GPU time is spent."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.config import DatasetLimits

REPORT_SCHEMA_VERSION = 1
CLIP_TOKEN_LIMIT = 77
# Long lists in the report stop here; the counts stay exact.
REPORT_LIST_LIMIT = 200
CLIP_ESTIMATE_COUNTER = "clip_estimate"
CUSTOM_COUNTER = "custom"

# CLIP's pre-tokenizer pattern (open_clip / transformers CLIPTokenizer) with stdlib `re`:
# contractions, runs of letters, single digits, runs of other non-space symbols.
_CLIP_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+")
_MIN_SIDE_BUCKETS: tuple[tuple[int, str], ...] = (
    (256, "<256"),
    (512, "256-511"),
    (768, "512-767"),
    (1024, "768-1023"),
    (1536, "1024-1535"),
    (2048, "1536-2047"),
)
_ASPECT_BUCKETS: tuple[tuple[str, float], ...] = tuple(
    (f"{w}:{h}", w / h)
    for w, h in (
        (9, 21),
        (9, 16),
        (2, 3),
        (3, 4),
        (4, 5),
        (1, 1),
        (5, 4),
        (4, 3),
        (3, 2),
        (16, 9),
        (21, 9),
    )
)


def clip_token_estimate(text: str) -> int:
    """CLIP-like token count: words, digits and punctuation runs after lower-casing, + 2.

    A lower bound on CLIP's BPE count (rare words split into several tokens); the +2 is the
    start and end tokens, so it compares directly with the 77-token limit.
    """
    return len(_CLIP_PIECES.findall(text.lower())) + 2


@dataclass
class PreflightFindings:
    """Everything ingest observed; ``build_report`` turns it into the report dict."""

    layouts: set[str] = field(default_factory=set)
    metadata_files: list[str] = field(default_factory=list)
    entry_count: int = 0
    file_count: int = 0
    archive_bytes: int = 0
    uncompressed_bytes: int = 0
    stored_image_bytes: int = 0
    image_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    image_hashes: dict[str, str] = field(default_factory=dict)
    undecodable: list[dict[str, str]] = field(default_factory=list)
    ignored: list[dict[str, str]] = field(default_factory=list)
    caption_errors: list[dict[str, str]] = field(default_factory=list)
    captions_found: int = 0
    images_without_captions: list[str] = field(default_factory=list)
    captions_without_images: list[dict[str, str]] = field(default_factory=list)
    # final captions per stored image, by source path
    item_captions: dict[str, list[str]] = field(default_factory=dict)
    fixed_caption: str | None = None
    trigger_word: str | None = None


def detected_layout(layouts: set[str]) -> str:
    """One name for the layout: the single one found, 'mixed', or 'images_only'."""
    if not layouts:
        return "images_only"
    if len(layouts) == 1:
        return next(iter(layouts))
    return "mixed"


def build_report(
    findings: PreflightFindings,
    *,
    limits: DatasetLimits,
    count_tokens: Callable[[str], int] | None,
) -> dict[str, Any]:
    """The preflight report as a JSON-ready dict."""
    counter = clip_token_estimate if count_tokens is None else count_tokens
    counter_name = CLIP_ESTIMATE_COUNTER if count_tokens is None else CUSTOM_COUNTER
    duplicates = _duplicate_groups(findings.image_hashes)
    caption_stats = _caption_statistics(findings.item_captions, counter, counter_name)
    counts = {
        "entries": findings.entry_count,
        "files": findings.file_count,
        "images": len(findings.image_sizes),
        "undecodable": len(findings.undecodable),
        "captions": findings.captions_found,
        "pairs": len(findings.item_captions),
        "images_without_captions": len(findings.images_without_captions),
        "captions_without_images": len(findings.captions_without_images),
        "caption_errors": len(findings.caption_errors),
        "duplicate_images": sum(len(group["files"]) - 1 for group in duplicates),
        "ignored": len(findings.ignored),
    }
    report: dict[str, Any] = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "layout": detected_layout(findings.layouts),
        "layouts": sorted(findings.layouts),
        "metadata_files": _first(findings.metadata_files),
        "captioning": {
            "fixed_caption": findings.fixed_caption,
            "trigger_word": findings.trigger_word,
            "file_captions_used": findings.fixed_caption is None,
        },
        "counts": counts,
        "undecodable": _first(findings.undecodable),
        "images_without_captions": _first(findings.images_without_captions),
        "captions_without_images": _first(findings.captions_without_images),
        "caption_errors": _first(findings.caption_errors),
        "ignored": _first(findings.ignored),
        "duplicates": _first(duplicates),
        "resolution": _resolution_summary(list(findings.image_sizes.values())),
        "aspect_ratios": _aspect_summary(list(findings.image_sizes.values())),
        "captions": caption_stats,
        "archive_bytes": findings.archive_bytes,
        "uncompressed_bytes": findings.uncompressed_bytes,
        "total_bytes": findings.stored_image_bytes,
        "list_limit": REPORT_LIST_LIMIT,
        "limits": limits.as_dict(),
    }
    report["warnings"] = _warnings(counts, caption_stats, findings)
    return report


def _first(items: Sequence[Any]) -> list[Any]:
    return list(items[:REPORT_LIST_LIMIT])


def _duplicate_groups(hashes: dict[str, str]) -> list[dict[str, Any]]:
    files_by_hash: dict[str, list[str]] = {}
    for path, digest in sorted(hashes.items()):
        files_by_hash.setdefault(digest, []).append(path)
    return [
        {"sha256": digest, "files": files}
        for digest, files in sorted(files_by_hash.items(), key=lambda item: item[1][0])
        if len(files) > 1
    ]


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    array = np.asarray(values, dtype=np.float64)
    return {
        "min": float(array.min()),
        "max": float(array.max()),
        "mean": round(float(array.mean()), 3),
        "p50": float(np.percentile(array, 50)),
        "p95": float(np.percentile(array, 95)),
    }


def _resolution_summary(sizes: list[tuple[int, int]]) -> dict[str, Any]:
    histogram = {label: 0 for _, label in _MIN_SIDE_BUCKETS}
    histogram[">=2048"] = 0
    for width, height in sizes:
        short_side = min(width, height)
        label = next((name for bound, name in _MIN_SIDE_BUCKETS if short_side < bound), ">=2048")
        histogram[label] += 1
    common = Counter(f"{width}x{height}" for width, height in sizes).most_common(10)
    return {
        "min_side_histogram": histogram,
        "width": _stats([width for width, _ in sizes]),
        "height": _stats([height for _, height in sizes]),
        "megapixels": _stats([round(width * height / 1e6, 4) for width, height in sizes]),
        "most_common_sizes": [{"size": size, "count": count} for size, count in common],
    }


def _aspect_summary(sizes: list[tuple[int, int]]) -> dict[str, Any]:
    buckets = {name: 0 for name, _ in _ASPECT_BUCKETS}
    ratios = [width / height for width, height in sizes]
    for ratio in ratios:
        nearest = min(_ASPECT_BUCKETS, key=lambda bucket: abs(math.log(ratio / bucket[1])))
        buckets[nearest[0]] += 1
    return {
        "buckets": buckets,
        "min": round(min(ratios), 4) if ratios else None,
        "max": round(max(ratios), 4) if ratios else None,
    }


def _caption_statistics(
    item_captions: dict[str, list[str]],
    counter: Callable[[str], int],
    counter_name: str,
) -> dict[str, Any]:
    chars: list[int] = []
    tokens: list[int] = []
    over_limit: list[dict[str, Any]] = []
    for path, captions in sorted(item_captions.items()):
        for caption in captions:
            token_count = int(counter(caption))
            chars.append(len(caption))
            tokens.append(token_count)
            if token_count > CLIP_TOKEN_LIMIT:
                over_limit.append({"file": path, "tokens": token_count})
    return {
        "count": len(tokens),
        "chars": _stats(chars),
        "tokens": _stats(tokens),
        "token_counter": counter_name,
        "token_limit": CLIP_TOKEN_LIMIT,
        "over_token_limit": len(over_limit),
        "over_token_limit_files": _first(over_limit),
    }


def _warnings(
    counts: dict[str, int], caption_stats: dict[str, Any], findings: PreflightFindings
) -> list[str]:
    messages: list[str] = []

    def add(count: int, text: str) -> None:
        if count:
            messages.append(f"{count} {text}")

    add(counts["undecodable"], "file(s) could not be decoded as images and are left out")
    if findings.fixed_caption is None and findings.trigger_word is None:
        add(counts["images_without_captions"], "image(s) have no caption and are left out")
    elif findings.fixed_caption is None:
        add(
            counts["images_without_captions"],
            "image(s) have no caption file; they get the trigger word only",
        )
    add(counts["captions_without_images"], "caption(s) name no image in the archive")
    add(counts["caption_errors"], "caption(s) or metadata row(s) could not be used")
    add(counts["duplicate_images"], "image(s) duplicate another image byte for byte")
    add(counts["ignored"], "file(s) are neither images nor caption files and are ignored")
    add(
        caption_stats["over_token_limit"],
        f"caption(s) exceed the {CLIP_TOKEN_LIMIT}-token CLIP limit and will be truncated",
    )
    return messages
