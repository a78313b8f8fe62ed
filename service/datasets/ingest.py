"""Ingest an uploaded zip into a dataset folder, atomically, with a preflight report.

The folder written at ``dest_dir``::

    images/000000.png ...   originals, renamed by index, extension from the detected content
    manifest.json           {"version", "layout", "items": [{file, source, captions, width,
                            height, sha256}]}, canonical JSON (its sha256 is the dataset's)
    report.json             the preflight report

Everything is written into a temporary folder (the caller's scratch folder, or a hidden one
beside ``dest_dir``) and renamed into place only when the whole archive has been read and
accepted; on any error the temporary folder is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.config import DatasetLimits
from service.datasets.archive import ArchiveMember, SafeArchive, open_archive
from service.datasets.images import (
    IMAGE_LIKE_EXTENSIONS,
    SNIFF_BYTES,
    ImageDecodeError,
    inspect_image,
    sniff_archive_kind,
    sniff_image_kind,
)
from service.datasets.layouts import (
    METADATA_LAYOUTS,
    CaptionRecord,
    assign_captions,
    clean_caption,
    entry_role,
    extension_of,
    parse_metadata,
    parse_sidecar,
)
from service.datasets.limits import DatasetRejected
from service.datasets.preflight import PreflightFindings, build_report

MANIFEST_VERSION = 1
_STAGING = "staging"
_IMAGES = "images"


@dataclass(frozen=True)
class IngestResult:
    """An accepted dataset: its report, item count, manifest sha256 and bytes written."""

    report: dict[str, Any]
    item_count: int
    sha256: str
    total_bytes: int


@dataclass(frozen=True)
class _StagedImage:
    source: str
    staged: Path
    extension: str
    width: int
    height: int
    sha256: str
    size: int


def ingest_zip(
    *,
    zip_path: Path,
    dest_dir: Path,
    limits: DatasetLimits,
    caption: str | None = None,
    trigger_word: str | None = None,
    count_tokens: Callable[[str], int] | None = None,
    work_dir: Path | None = None,
) -> IngestResult:
    """Validate the zip at ``zip_path`` and write the dataset folder ``dest_dir`` atomically.

    The folder is built in ``work_dir`` (an empty folder on ``dest_dir``'s filesystem, such as
    the artifact store's scratch folder; default: a hidden folder beside ``dest_dir``) and
    renamed into place. Raises DatasetRejected (413/415/422) with nothing stored; a dataset
    without a usable image-caption pair is 422 ``no_usable_pairs`` with the preflight report
    attached.
    """
    if work_dir is None:
        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        work_dir = Path(
            tempfile.mkdtemp(prefix=f".{dest_dir.name}.", suffix=".ingest", dir=dest_dir.parent)
        )
    try:
        fixed_caption = _clean_option("caption", caption, limits)
        trigger = _clean_option("trigger_word", trigger_word, limits)
        if dest_dir.exists():
            raise FileExistsError(f"dataset folder {dest_dir} already exists")
        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        with open_archive(zip_path, limits) as archive:
            report, manifest = _ingest_into(
                archive,
                work_dir=work_dir,
                limits=limits,
                fixed_caption=fixed_caption,
                trigger_word=trigger,
                count_tokens=count_tokens,
            )
        manifest_bytes = canonical_json(manifest)
        (work_dir / "manifest.json").write_bytes(manifest_bytes)
        (work_dir / "report.json").write_bytes(canonical_json(report))
        total_bytes = sum(path.stat().st_size for path in work_dir.rglob("*") if path.is_file())
        if dest_dir.exists():
            raise FileExistsError(f"dataset folder {dest_dir} appeared while ingesting")
        os.replace(work_dir, dest_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return IngestResult(
        report=report,
        item_count=len(manifest["items"]),
        sha256=hashlib.sha256(manifest_bytes).hexdigest(),
        total_bytes=total_bytes,
    )


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8: the bytes a manifest's sha256 is taken over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _clean_option(name: str, value: str | None, limits: DatasetLimits) -> str | None:
    if value is None or not value.strip():
        return None
    try:
        return clean_caption(value, limits=limits)
    except ValueError as exc:
        raise DatasetRejected(422, f"invalid_{name}", f"{name}: {exc}") from exc


def _ingest_into(
    archive: SafeArchive,
    *,
    work_dir: Path,
    limits: DatasetLimits,
    fixed_caption: str | None,
    trigger_word: str | None,
    count_tokens: Callable[[str], int] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    findings = PreflightFindings(
        entry_count=archive.entry_count,
        file_count=len(archive.members),
        archive_bytes=archive.archive_bytes,
        fixed_caption=fixed_caption,
        trigger_word=trigger_word,
    )
    records = _read_caption_sources(archive, findings=findings, limits=limits)
    staged = _stage_images(archive, work_dir=work_dir / _STAGING, findings=findings, limits=limits)
    assignment = assign_captions(
        records,
        [image.source for image in staged] + [entry["file"] for entry in findings.undecodable],
        limits=limits,
    )
    findings.captions_without_images = assignment.unmatched
    findings.caption_errors.extend(
        {"file": issue.file, "reason": issue.reason} for issue in assignment.issues
    )

    items = _place_images(
        staged,
        work_dir=work_dir,
        captions_by_path=assignment.captions_by_path,
        findings=findings,
        fixed_caption=fixed_caption,
        trigger_word=trigger_word,
    )
    (work_dir / _STAGING).rmdir()
    findings.uncompressed_bytes = archive.uncompressed_bytes

    report = build_report(findings, limits=limits, count_tokens=count_tokens)
    if not items:
        raise DatasetRejected(
            422,
            "no_usable_pairs",
            "the archive has no usable image-caption pair "
            f"({report['counts']['images']} decodable images, "
            f"{report['counts']['captions']} captions); see the report",
            report=report,
        )
    manifest = {"version": MANIFEST_VERSION, "layout": report["layout"], "items": items}
    return report, manifest


def _place_images(
    staged: list[_StagedImage],
    *,
    work_dir: Path,
    captions_by_path: dict[str, list[str]],
    findings: PreflightFindings,
    fixed_caption: str | None,
    trigger_word: str | None,
) -> list[dict[str, Any]]:
    """Move each captioned staged image to its numbered place; the manifest's items."""
    (work_dir / _IMAGES).mkdir()
    items: list[dict[str, Any]] = []
    for image in staged:
        file_captions = captions_by_path.get(image.source, [])
        if not file_captions:
            findings.images_without_captions.append(image.source)
        captions = _final_captions(
            file_captions, fixed_caption=fixed_caption, trigger_word=trigger_word
        )
        if not captions:
            image.staged.unlink()
            continue
        relative = f"{_IMAGES}/{len(items):06d}.{image.extension}"
        image.staged.rename(work_dir / relative)
        findings.item_captions[image.source] = captions
        findings.stored_image_bytes += image.size
        items.append(
            {
                "file": relative,
                "source": image.source,
                "captions": captions,
                "width": image.width,
                "height": image.height,
                "sha256": image.sha256,
            }
        )
    return items


def _read_caption_sources(
    archive: SafeArchive, *, findings: PreflightFindings, limits: DatasetLimits
) -> list[CaptionRecord]:
    records: list[CaptionRecord] = []
    for member in archive.members:
        role = entry_role(member.path)
        if role == "sidecar":
            data = archive.read(member, max_bytes=limits.max_caption_bytes)
            found, issues = parse_sidecar(member.path, data, limits=limits)
            findings.layouts.add("pairs")
        elif role == "metadata":
            data = archive.read(member, max_bytes=limits.max_metadata_bytes)
            found, issues = parse_metadata(member.path, data, limits=limits)
            findings.layouts.add(METADATA_LAYOUTS[posixpath.basename(member.path).lower()])
            findings.metadata_files.append(member.path)
        else:
            continue
        records.extend(found)
        findings.captions_found += sum(len(record.captions) for record in found)
        findings.caption_errors.extend(
            {"file": issue.file, "reason": issue.reason} for issue in issues
        )
    return records


def _stage_images(
    archive: SafeArchive, *, work_dir: Path, findings: PreflightFindings, limits: DatasetLimits
) -> list[_StagedImage]:
    work_dir.mkdir()
    staged: list[_StagedImage] = []
    for member in archive.members:
        role = entry_role(member.path)
        if role == "junk":
            findings.ignored.append({"file": member.path, "reason": "operating-system metadata"})
            continue
        if role != "other":
            continue
        image = _stage_one(archive, member, work_dir=work_dir, findings=findings, limits=limits)
        if image is not None:
            staged.append(image)
    return staged


def _stage_one(
    archive: SafeArchive,
    member: ArchiveMember,
    *,
    work_dir: Path,
    findings: PreflightFindings,
    limits: DatasetLimits,
) -> _StagedImage | None:
    head = archive.read_head(member, SNIFF_BYTES)
    if sniff_image_kind(head) is None:
        nested = sniff_archive_kind(head)
        if nested is not None:
            reason = f"nested {nested} archive, not expanded"
            findings.ignored.append({"file": member.path, "reason": reason})
        elif extension_of(member.path) in IMAGE_LIKE_EXTENSIONS:
            reason = "content is not JPEG, PNG or WebP"
            findings.undecodable.append({"file": member.path, "reason": reason})
        else:
            findings.ignored.append({"file": member.path, "reason": "not an image or caption"})
        return None
    data = archive.read(member)
    assert data is not None  # no per-file cap below max_file_bytes was asked for
    try:
        facts = inspect_image(data, max_pixels=limits.max_image_pixels)
    except ImageDecodeError as exc:
        findings.undecodable.append({"file": member.path, "reason": str(exc)})
        return None
    digest = hashlib.sha256(data).hexdigest()
    staged_path = work_dir / f"{len(findings.image_sizes):06d}.{facts.extension}"
    staged_path.write_bytes(data)
    findings.image_sizes[member.path] = (facts.width, facts.height)
    findings.image_hashes[member.path] = digest
    return _StagedImage(
        source=member.path,
        staged=staged_path,
        extension=facts.extension,
        width=facts.width,
        height=facts.height,
        sha256=digest,
        size=len(data),
    )


def _final_captions(
    file_captions: list[str], *, fixed_caption: str | None, trigger_word: str | None
) -> list[str]:
    """The fixed caption replaces file captions; the trigger word is prepended to each."""
    captions = [fixed_caption] if fixed_caption is not None else list(file_captions)
    if trigger_word is None:
        return captions
    if not captions:
        return [trigger_word]
    return [
        caption if _starts_with_word(caption, trigger_word) else f"{trigger_word}, {caption}"
        for caption in captions
    ]


def _starts_with_word(caption: str, word: str) -> bool:
    if not caption.startswith(word):
        return False
    rest = caption[len(word) :]
    return not rest or not rest[0].isalnum()
