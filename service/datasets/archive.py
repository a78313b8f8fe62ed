"""Bounded, validating access to an uploaded zip archive.

Nothing here writes to disk: entries are read into memory one at a time, through caps that
count the bytes actually decompressed (header sizes are only used to refuse early). Member
names are validated but never used as paths on disk.
"""

from __future__ import annotations

import copy
import itertools
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from service.config import DatasetLimits
from service.datasets.limits import DatasetRejected

_READ_CHUNK = 256 * 1024
_EOCD = struct.Struct("<4s4H2LH")
_EOCD_SIGNATURE = b"PK\x05\x06"
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_ZIP64_EOCD_SIGNATURE = b"PK\x06\x06"
_CENTRAL_ENTRY_MIN_BYTES = 46
_LOCAL_HEADER_MIN_BYTES = 30
# Extra fields and comments a legitimate central-directory entry may carry on top of its name.
_CENTRAL_ENTRY_EXTRA_ALLOWANCE = 256
_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")
# bzip2 and lzma are refused: zipfile hands their decompressors unbounded output sizes, so a
# single read could expand without limit before our counters see a byte.
_SUPPORTED_COMPRESSION = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}


@dataclass(frozen=True)
class ArchiveMember:
    """A regular file in the archive: its normalised path and its (untrusted) header."""

    path: str
    info: zipfile.ZipInfo

    @property
    def declared_size(self) -> int:
        return self.info.file_size


class SafeArchive:
    """A validated zip: its file members and bounded readers for them."""

    def __init__(self, zip_file: zipfile.ZipFile, *, limits: DatasetLimits, archive_bytes: int):
        self._zip = zip_file
        self._limits = limits
        self.archive_bytes = archive_bytes
        self.entry_count = len(zip_file.infolist())
        self.members = _validated_members(zip_file, limits)
        self.uncompressed_bytes = 0

    def read(self, member: ArchiveMember, *, max_bytes: int | None = None) -> bytes | None:
        """Read a whole member; None when it is longer than ``max_bytes`` (a per-file cap).

        The archive-wide caps (max_file_bytes, max_total_bytes, max_compression_ratio) raise
        DatasetRejected; a member whose data does not match its header raises 422.
        """
        soft_cap = self._limits.max_file_bytes if max_bytes is None else max_bytes
        data, complete = self._read(member, stop_after=min(soft_cap, self._limits.max_file_bytes))
        if not complete:
            return None
        return data

    def read_head(self, member: ArchiveMember, size: int) -> bytes:
        """The first ``size`` bytes of a member (for content sniffing), without reading on."""
        data, _ = self._read(member, stop_after=size, head_only=True)
        return data[:size]

    def _check_caps(self, member: ArchiveMember, *, produced: int, ratio_base: int) -> None:
        """413 once an entry, or the archive, has decompressed past one of its caps."""
        limits = self._limits
        if produced > limits.max_file_bytes:
            raise DatasetRejected(
                413,
                "file_too_large",
                f"entry {member.path!r} decompresses to more than "
                f"max_file_bytes={limits.max_file_bytes} (its header declares "
                f"{member.declared_size} bytes)",
            )
        if self.uncompressed_bytes > limits.max_total_bytes:
            raise DatasetRejected(
                413,
                "total_too_large",
                f"the archive decompresses to more than max_total_bytes={limits.max_total_bytes}",
            )
        if (
            produced >= limits.compression_ratio_min_bytes
            and produced / ratio_base > limits.max_compression_ratio
        ):
            raise DatasetRejected(
                413,
                "compression_ratio_exceeded",
                f"entry {member.path!r} expands more than "
                f"max_compression_ratio={limits.max_compression_ratio:g} times",
            )

    def _read(
        self, member: ArchiveMember, *, stop_after: int, head_only: bool = False
    ) -> tuple[bytes, bool]:
        limits = self._limits
        # Let zipfile read well past the header's size (it stops, and checks the CRC, once it
        # has produced file_size bytes) so that our own count decides where to stop.
        unbounded = copy.copy(member.info)
        unbounded.file_size = max(stop_after, limits.max_file_bytes) + 2 * _READ_CHUNK
        chunks: list[bytes] = []
        produced = 0
        ratio_base = max(member.info.compress_size, 1)
        try:
            with self._zip.open(unbounded) as stream:
                while True:
                    chunk = stream.read(_READ_CHUNK)
                    if not chunk:
                        break
                    produced += len(chunk)
                    self.uncompressed_bytes += len(chunk)
                    self._check_caps(member, produced=produced, ratio_base=ratio_base)
                    chunks.append(chunk)
                    if produced > stop_after:
                        return b"".join(chunks), False
                    if head_only and produced >= stop_after:
                        return b"".join(chunks), False
        except DatasetRejected:
            raise
        except (
            zipfile.BadZipFile,
            zlib.error,
            EOFError,
            OSError,
            NotImplementedError,
            RuntimeError,
            ValueError,
            struct.error,
        ) as exc:
            raise DatasetRejected(
                422, "corrupt_entry", f"entry {member.path!r} could not be read: {exc}"
            ) from exc
        if produced != member.declared_size:
            raise DatasetRejected(
                422,
                "size_mismatch",
                f"entry {member.path!r} decompresses to {produced} bytes but its header "
                f"declares {member.declared_size}",
            )
        return b"".join(chunks), True


@contextmanager
def open_archive(zip_path: Path, limits: DatasetLimits) -> Iterator[SafeArchive]:
    """Open and validate the zip at ``zip_path``; DatasetRejected (413/415/422) if refused."""
    archive_bytes = zip_path.stat().st_size
    if archive_bytes > limits.max_upload_bytes:
        raise DatasetRejected(
            413,
            "upload_too_large",
            f"the upload is larger than max_upload_bytes={limits.max_upload_bytes}",
        )
    with zip_path.open("rb") as raw:
        starts_like_zip = raw.read(4) in (b"PK\x03\x04", b"PK\x05\x06")
        _check_central_directory_extent(raw, archive_bytes, limits)
    try:
        zip_file = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as exc:
        if starts_like_zip:
            raise DatasetRejected(
                422, "corrupt_archive", f"the zip archive could not be read: {exc}"
            ) from exc
        raise DatasetRejected(415, "not_a_zip", "the upload is not a zip archive") from exc
    with zip_file:
        yield SafeArchive(zip_file, limits=limits, archive_bytes=archive_bytes)


def _check_central_directory_extent(
    raw: BinaryIO, archive_bytes: int, limits: DatasetLimits
) -> None:
    """Refuse a central directory too large for max_entries before zipfile parses all of it.

    zipfile builds a ZipInfo per central-directory record up front, so a hostile archive with
    millions of records would cost memory before our entry count could be checked.
    """
    tail_size = min(archive_bytes, _EOCD.size + 0xFFFF)
    raw.seek(archive_bytes - tail_size)
    tail: bytes = raw.read(tail_size)
    at = tail.rfind(_EOCD_SIGNATURE)
    if at < 0 or len(tail) - at < _EOCD.size:
        return  # not a zip we can read; zipfile gives the verdict
    fields = _EOCD.unpack_from(tail, at)
    entries, directory_bytes = fields[4], fields[5]
    locator_at = at - _ZIP64_LOCATOR.size
    if locator_at >= 0 and tail[locator_at : locator_at + 4] == _ZIP64_LOCATOR_SIGNATURE:
        zip64_offset = _ZIP64_LOCATOR.unpack_from(tail, locator_at)[2]
        if zip64_offset + _ZIP64_EOCD.size <= archive_bytes:
            raw.seek(zip64_offset)
            record = raw.read(_ZIP64_EOCD.size)
            if record[:4] == _ZIP64_EOCD_SIGNATURE:
                zip64_fields = _ZIP64_EOCD.unpack(record)
                entries, directory_bytes = zip64_fields[7], zip64_fields[8]
    per_entry = _CENTRAL_ENTRY_MIN_BYTES + limits.max_name_bytes + _CENTRAL_ENTRY_EXTRA_ALLOWANCE
    if entries > limits.max_entries or directory_bytes > limits.max_entries * per_entry:
        raise DatasetRejected(
            413,
            "too_many_entries",
            f"the archive lists more entries than max_entries={limits.max_entries}",
        )


def _validated_members(zip_file: zipfile.ZipFile, limits: DatasetLimits) -> list[ArchiveMember]:
    infos = zip_file.infolist()
    if len(infos) > limits.max_entries:
        raise DatasetRejected(
            413,
            "too_many_entries",
            f"the archive has {len(infos)} entries, more than max_entries={limits.max_entries}",
        )
    _reject_overlapping_entries(infos)
    members: list[ArchiveMember] = []
    seen: set[str] = set()
    declared_total = 0
    for info in infos:
        path = _safe_member_path(info, limits)
        if path in seen:
            raise DatasetRejected(
                422, "duplicate_entry", f"the archive holds {path!r} more than once"
            )
        seen.add(path)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise DatasetRejected(
                422, "symlink_entry", f"entry {path!r} is a symbolic link; links are refused"
            )
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise DatasetRejected(
                422, "special_entry", f"entry {path!r} is not a regular file or folder"
            )
        if info.is_dir() or stat.S_ISDIR(mode):
            continue
        if info.flag_bits & 0x1:
            raise DatasetRejected(
                422, "encrypted_entry", f"entry {path!r} is encrypted; encryption is refused"
            )
        if info.compress_type not in _SUPPORTED_COMPRESSION:
            raise DatasetRejected(
                422,
                "unsupported_compression",
                f"entry {path!r} uses compression method {info.compress_type}; "
                "only stored and deflate entries are accepted",
            )
        if info.file_size > limits.max_file_bytes:
            raise DatasetRejected(
                413,
                "file_too_large",
                f"entry {path!r} declares {info.file_size} bytes, more than "
                f"max_file_bytes={limits.max_file_bytes}",
            )
        declared_total += info.file_size
        if declared_total > limits.max_total_bytes:
            raise DatasetRejected(
                413,
                "total_too_large",
                "the archive declares more than "
                f"max_total_bytes={limits.max_total_bytes} of uncompressed data",
            )
        members.append(ArchiveMember(path=path, info=info))
    members.sort(key=lambda member: member.path)
    return members


def _safe_member_path(info: zipfile.ZipInfo, limits: DatasetLimits) -> str:
    """The member's name as a clean relative POSIX path; 422 for anything that could escape."""
    raw_name = info.orig_filename
    shown = raw_name[:200]
    if len(raw_name.encode("utf-8", "surrogatepass")) > limits.max_name_bytes:
        raise DatasetRejected(
            422,
            "name_too_long",
            f"entry {shown!r} has a name longer than max_name_bytes={limits.max_name_bytes}",
        )
    if "\x00" in raw_name:
        raise DatasetRejected(422, "unsafe_path", f"entry {shown!r} has a NUL byte in its name")
    # Windows tools write backslashes; treat them as separators so "..\\x" is caught too.
    name = raw_name.replace("\\", "/")
    if name.startswith("/"):
        raise DatasetRejected(422, "unsafe_path", f"entry {shown!r} has an absolute path")
    if _DRIVE_LETTER.match(name):
        raise DatasetRejected(422, "unsafe_path", f"entry {shown!r} starts with a drive letter")
    parts = name.split("/")
    if ".." in parts:
        raise DatasetRejected(
            422, "unsafe_path", f"entry {shown!r} refers to a parent folder ('..')"
        )
    clean = "/".join(part for part in parts if part not in ("", "."))
    if not clean:
        if info.is_dir():
            return "./"
        raise DatasetRejected(422, "unsafe_path", f"entry {shown!r} has an empty name")
    return clean + "/" if info.is_dir() else clean


def _reject_overlapping_entries(infos: list[zipfile.ZipInfo]) -> None:
    """Refuse entries whose data overlap (the trick behind non-recursive zip bombs)."""
    spans = sorted(
        (
            info.header_offset,
            info.header_offset
            + _LOCAL_HEADER_MIN_BYTES
            # characters <= encoded bytes, so this never overstates the span
            + len(info.orig_filename)
            + info.compress_size,
            info.orig_filename,
        )
        for info in infos
    )
    for (_, end, name), (next_start, _, _) in itertools.pairwise(spans):
        if next_start < end:
            raise DatasetRejected(
                422,
                "overlapping_entries",
                f"entry {name[:200]!r} overlaps the next entry's data",
            )
