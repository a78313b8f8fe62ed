"""Caption sources in the layouts users bring, and matching them to images.

Layouts (any folder depth):
- ``pairs``: ``x.jpg`` + ``x.txt`` (or ``x.caption``) in the same folder;
- ``captions_jsonl``: ``captions.jsonl``, one object per line (file name under ``file_name``,
  ``image`` or ``file``; caption under ``text`` or ``caption``, a string or a list of strings);
- ``imagefolder``: Hugging Face ``metadata.jsonl`` / ``metadata.csv`` with ``file_name`` and a
  ``text`` (or ``caption``) column;
- ``flickr30k``: ``results.csv``, ``|``-delimited, columns ``image_name``, ``comment_number``,
  ``comment``; several captions per image, all kept;
- ``images_only``: no caption source; captions come from the fixed ``caption``/``trigger_word``.
File names in a metadata file are relative to its folder; when no image sits at that path, an
image whose path ends with it (in that folder's subtree), then one with that base name anywhere,
is used, provided exactly one matches.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from service.config import DatasetLimits

SIDECAR_EXTENSIONS = frozenset({"txt", "caption"})
METADATA_LAYOUTS: dict[str, str] = {
    "captions.jsonl": "captions_jsonl",
    "metadata.jsonl": "imagefolder",
    "metadata.csv": "imagefolder",
    "results.csv": "flickr30k",
}
_JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})
_FILE_NAME_KEYS = ("file_name", "image", "file")
_CAPTION_KEYS = ("text", "caption")
_KEEP_CONTROL = frozenset("\t\n\r")

EntryRole = Literal["junk", "sidecar", "metadata", "other"]


@dataclass(frozen=True)
class CaptionRecord:
    """Captions for one file name, from one place (a sidecar file or a metadata row)."""

    file_name: str  # as written in the source; for sidecars, the sidecar's own path
    base_dir: str  # folder the name is relative to ("" for the archive root)
    captions: tuple[str, ...]
    source: str  # "a/b.txt" or "a/metadata.jsonl:12"
    layout: str


@dataclass(frozen=True)
class CaptionIssue:
    """A caption that could not be used, with the reason."""

    file: str
    reason: str


@dataclass
class CaptionAssignment:
    """Captions matched to image candidates, and what matched nothing."""

    captions_by_path: dict[str, list[str]] = field(default_factory=dict)
    layouts_by_path: dict[str, set[str]] = field(default_factory=dict)
    unmatched: list[dict[str, str]] = field(default_factory=list)
    issues: list[CaptionIssue] = field(default_factory=list)


def entry_role(path: str) -> EntryRole:
    """How ingest treats an archive path, from its name alone."""
    parts = path.split("/")
    base = parts[-1].lower()
    if parts[0] == "__MACOSX" or base.startswith("._") or base in _JUNK_NAMES:
        return "junk"
    if base in METADATA_LAYOUTS:
        return "metadata"
    if extension_of(base) in SIDECAR_EXTENSIONS:
        return "sidecar"
    return "other"


def extension_of(path: str) -> str:
    """Lower-case extension without the dot ('' when none)."""
    base = posixpath.basename(path)
    stem, dot, extension = base.rpartition(".")
    return extension.lower() if dot and stem else ""


def clean_caption(text: str, *, limits: DatasetLimits) -> str:
    """A caption with whitespace collapsed; ValueError with the reason if it is unusable."""
    if len(text.encode("utf-8")) > limits.max_caption_bytes:
        raise ValueError(f"caption is longer than max_caption_bytes={limits.max_caption_bytes}")
    if any(unicodedata.category(char) == "Cc" and char not in _KEEP_CONTROL for char in text):
        raise ValueError("caption contains control characters")
    cleaned = " ".join(text.split())
    if not cleaned:
        raise ValueError("caption is empty")
    return cleaned


def decode_utf8(data: bytes) -> str:
    """Strict UTF-8 (a leading BOM is dropped); ValueError naming the first bad byte."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = data[exc.start : exc.start + 1].hex()
        raise ValueError(f"not valid UTF-8 (byte 0x{bad} at offset {exc.start})") from exc
    return text.removeprefix("\ufeff")


def parse_sidecar(
    path: str, data: bytes | None, *, limits: DatasetLimits
) -> tuple[list[CaptionRecord], list[CaptionIssue]]:
    """One caption from a sidecar file (None: it was longer than max_caption_bytes)."""
    if data is None:
        reason = f"caption file is longer than max_caption_bytes={limits.max_caption_bytes}"
        return [], [CaptionIssue(path, reason)]
    try:
        caption = clean_caption(decode_utf8(data), limits=limits)
    except ValueError as exc:
        return [], [CaptionIssue(path, str(exc))]
    record = CaptionRecord(
        file_name=path,
        base_dir=posixpath.dirname(path),
        captions=(caption,),
        source=path,
        layout="pairs",
    )
    return [record], []


def parse_metadata(
    path: str, data: bytes | None, *, limits: DatasetLimits
) -> tuple[list[CaptionRecord], list[CaptionIssue]]:
    """Caption records from captions.jsonl, metadata.jsonl, metadata.csv or results.csv."""
    if data is None:
        reason = f"metadata file is longer than max_metadata_bytes={limits.max_metadata_bytes}"
        return [], [CaptionIssue(path, reason)]
    name = posixpath.basename(path).lower()
    layout = METADATA_LAYOUTS[name]
    if name.endswith(".jsonl"):
        return _parse_jsonl(path, data, layout=layout, limits=limits)
    try:
        text = decode_utf8(data)
    except ValueError as exc:
        return [], [CaptionIssue(path, str(exc))]
    if name == "results.csv":
        return _parse_flickr_csv(path, text, limits=limits)
    return _parse_metadata_csv(path, text, limits=limits)


def assign_captions(
    records: Iterable[CaptionRecord], candidates: Iterable[str], *, limits: DatasetLimits
) -> CaptionAssignment:
    """Match caption records to candidate image paths (see the module docstring)."""
    candidate_list = sorted(candidates)
    by_stem: dict[tuple[str, str], list[str]] = defaultdict(list)
    by_base: dict[str, list[str]] = defaultdict(list)
    exact = set(candidate_list)
    for candidate in candidate_list:
        folder, base = posixpath.split(candidate)
        by_stem[(folder, _stem(base))].append(candidate)
        by_base[base].append(candidate)

    result = CaptionAssignment()
    for record in records:
        if record.layout == "pairs":
            folder, base = posixpath.split(record.file_name)
            targets = by_stem.get((folder, _stem(base)), [])
        else:
            targets = _resolve_name(record, exact=exact, by_base=by_base)
        if not targets:
            result.unmatched.append({"source": record.source, "file_name": record.file_name})
            continue
        if len(targets) > 1 and record.layout != "pairs":
            result.issues.append(
                CaptionIssue(
                    record.source,
                    f"file name {record.file_name!r} matches {len(targets)} images; "
                    "give the path relative to the metadata file",
                )
            )
            continue
        for target in targets:
            kept = result.captions_by_path.setdefault(target, [])
            result.layouts_by_path.setdefault(target, set()).add(record.layout)
            for caption in record.captions:
                if caption in kept:
                    continue
                if len(kept) >= limits.max_captions_per_image:
                    result.issues.append(
                        CaptionIssue(
                            record.source,
                            f"{target!r} already has max_captions_per_image="
                            f"{limits.max_captions_per_image} captions; this one is dropped",
                        )
                    )
                    continue
                kept.append(caption)
    return result


def _stem(base: str) -> str:
    stem, dot, _ = base.rpartition(".")
    return stem if dot and stem else base


def _resolve_name(
    record: CaptionRecord, *, exact: set[str], by_base: dict[str, list[str]]
) -> list[str]:
    name = record.file_name.strip().replace("\\", "/")
    joined = posixpath.normpath(posixpath.join(record.base_dir, name)).lstrip("/")
    if joined in exact:
        return [joined]
    relative = posixpath.normpath(name).lstrip("/")
    if relative.startswith("../") or relative in ("", ".", ".."):
        return []
    same_base = by_base.get(posixpath.basename(relative), [])
    prefix = f"{record.base_dir}/" if record.base_dir else ""
    in_subtree = [
        path
        for path in same_base
        if path.startswith(prefix) and (path == prefix + relative or path.endswith("/" + relative))
    ]
    if in_subtree:
        return in_subtree
    if "/" not in relative:
        return list(same_base)
    return []


def _captions_from_value(value: object, *, limits: DatasetLimits) -> tuple[str, ...]:
    """A caption field: a string or a list of strings; ValueError if unusable."""
    values = value if isinstance(value, list) else [value]
    texts = [item for item in values if isinstance(item, str)]
    if not texts or len(texts) != len(values):
        raise ValueError("caption must be a string or a list of strings")
    return tuple(clean_caption(text, limits=limits) for text in texts)


def _parse_jsonl(
    path: str, data: bytes, *, layout: str, limits: DatasetLimits
) -> tuple[list[CaptionRecord], list[CaptionIssue]]:
    records: list[CaptionRecord] = []
    issues: list[CaptionIssue] = []
    base_dir = posixpath.dirname(path)
    for number, raw_line in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            line = decode_utf8(raw_line).strip()
            if not line:
                continue
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:
            issues.append(CaptionIssue(where, _short(f"not a JSON object: {exc}")))
            continue
        if not isinstance(row, dict):
            issues.append(CaptionIssue(where, "line is not a JSON object"))
            continue
        file_name = next(
            (row[key] for key in _FILE_NAME_KEYS if isinstance(row.get(key), str)), None
        )
        caption_value = next((row[key] for key in _CAPTION_KEYS if key in row), None)
        if file_name is None:
            issues.append(CaptionIssue(where, "no file name under file_name, image or file"))
            continue
        if caption_value is None:
            issues.append(CaptionIssue(where, "no caption under text or caption"))
            continue
        try:
            captions = _captions_from_value(caption_value, limits=limits)
        except ValueError as exc:
            issues.append(CaptionIssue(where, str(exc)))
            continue
        records.append(CaptionRecord(file_name, base_dir, captions, where, layout))
    return records, issues


def _parse_metadata_csv(
    path: str, text: str, *, limits: DatasetLimits
) -> tuple[list[CaptionRecord], list[CaptionIssue]]:
    return _parse_csv(
        path,
        text,
        delimiter=",",
        name_column="file_name",
        caption_columns=_CAPTION_KEYS,
        layout="imagefolder",
        limits=limits,
    )


def _parse_flickr_csv(
    path: str, text: str, *, limits: DatasetLimits
) -> tuple[list[CaptionRecord], list[CaptionIssue]]:
    first_line = text.split("\n", 1)[0]
    return _parse_csv(
        path,
        text,
        delimiter="|" if "|" in first_line else ",",
        name_column="image_name",
        caption_columns=("comment",),
        layout="flickr30k",
        limits=limits,
    )


def _parse_csv(
    path: str,
    text: str,
    *,
    delimiter: str,
    name_column: str,
    caption_columns: tuple[str, ...],
    layout: str,
    limits: DatasetLimits,
) -> tuple[list[CaptionRecord], list[CaptionIssue]]:
    records: list[CaptionRecord] = []
    issues: list[CaptionIssue] = []
    base_dir = posixpath.dirname(path)
    # Flickr30k's pipe-delimited file does not quote; its captions contain stray quotes.
    buffer = io.StringIO(text, newline="")
    if delimiter == "|":
        reader = csv.reader(buffer, delimiter=delimiter, quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(buffer, delimiter=delimiter)
    try:
        header = [column.strip().lower() for column in next(reader, [])]
        if name_column not in header:
            return [], [CaptionIssue(path, f"no {name_column} column in the header")]
        caption_column = next((column for column in caption_columns if column in header), None)
        if caption_column is None:
            wanted = " or ".join(caption_columns)
            return [], [CaptionIssue(path, f"no {wanted} column in the header")]
        name_at = header.index(name_column)
        caption_at = header.index(caption_column)
        last_column = caption_at == len(header) - 1
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < len(header):
                issues.append(CaptionIssue(where, f"row has {len(row)} of {len(header)} columns"))
                continue
            # An unquoted caption that itself contains the delimiter spills into extra cells.
            caption_text = delimiter.join(row[caption_at:]) if last_column else row[caption_at]
            try:
                captions = _captions_from_value(caption_text, limits=limits)
            except ValueError as exc:
                issues.append(CaptionIssue(where, str(exc)))
                continue
            records.append(CaptionRecord(row[name_at].strip(), base_dir, captions, where, layout))
    except csv.Error as exc:
        issues.append(CaptionIssue(f"{path}:{reader.line_num}", f"CSV parsing stopped here: {exc}"))
    return records, issues


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
