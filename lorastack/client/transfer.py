"""Uploads and downloads: folders zipped on the fly, progress callbacks, resumable downloads.

A download is written to ``<path>.part`` and renamed when complete, so a file at ``path`` is
always whole. An interrupted download leaves the ``.part`` file; the next download of the same
file resumes it with a ``Range`` request, and the result is checked against the server's ETag
(the sha256 of the bytes served) before the rename.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

TransferCallback = Callable[[int, int | None], None]
"""Called with (bytes done, total bytes or None) as a transfer goes."""

CHUNK = 1 << 16


class ProgressReader:
    """A binary file that reports how much of it was read; rewinds for a retried upload."""

    def __init__(self, file: IO[bytes], *, size: int, on_progress: TransferCallback | None):
        self._file = file
        self.size = size
        self._on_progress = on_progress
        self._done = 0

    def read(self, n: int = -1) -> bytes:
        chunk = self._file.read(n)
        self._done += len(chunk)
        if self._on_progress is not None:
            self._on_progress(self._done, self.size)
        return chunk

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        position = self._file.seek(offset, whence)
        self._done = position
        return position

    def tell(self) -> int:
        return self._file.tell()

    def rewind(self) -> ProgressReader:
        self.seek(0)
        return self


@dataclass
class UploadFile:
    """A dataset zip ready to send: an existing zip, or a folder zipped into a temp file."""

    filename: str
    file: IO[bytes]
    size: int

    def reader(self, on_progress: TransferCallback | None) -> ProgressReader:
        return ProgressReader(self.file, size=self.size, on_progress=on_progress)

    def close(self) -> None:
        self.file.close()


def open_upload(path: str | os.PathLike[str]) -> UploadFile:
    """Open a file to upload; a folder is zipped (files under it, relative names) first."""
    source = Path(path)
    if source.is_dir():
        spool = tempfile.TemporaryFile()  # noqa: SIM115 (closed by UploadFile.close)
        with zipfile.ZipFile(spool, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for item in sorted(source.rglob("*")):
                if item.is_file():
                    archive.write(item, item.relative_to(source).as_posix())
        size = spool.tell()
        spool.seek(0)
        return UploadFile(filename=f"{source.name or 'dataset'}.zip", file=spool, size=size)
    handle = source.open("rb")
    return UploadFile(filename=source.name, file=handle, size=os.fstat(handle.fileno()).st_size)


@dataclass(frozen=True)
class Downloaded:
    """A finished download: where it is, its size and sha256, and where it resumed from."""

    path: Path
    size: int
    sha256: str
    resumed_from: int


_FILENAME = re.compile(r'filename="([^"]+)"')


def target_path(
    path: str | os.PathLike[str] | None, *, name: str, version: str | int, fmt: str
) -> Path:
    """Where a download goes: ``path``, or a file named after the adapter in a folder."""
    default = f"{name}-{version}{'-kohya' if fmt == 'kohya' else ''}.safetensors"
    if path is None:
        return Path.cwd() / default
    target = Path(path)
    return target / default if target.is_dir() else target


def part_path(target: Path) -> Path:
    return target.with_name(target.name + ".part")


def resume_offset(target: Path) -> int:
    """How many bytes of ``target`` an earlier, interrupted download left."""
    try:
        return part_path(target).stat().st_size
    except FileNotFoundError:
        return 0


class DownloadWriter:
    """Appends answer bytes to ``<target>.part`` and completes it once the sha256 matches."""

    def __init__(
        self,
        target: Path,
        *,
        status: int,
        headers: Any,
        offset: int,
        on_progress: TransferCallback | None,
    ) -> None:
        self.target = target
        self.part = part_path(target)
        self.on_progress = on_progress
        self.etag = str(headers.get("etag", "")).strip('"') or None
        # 206: the server sent the rest; 200: it sent everything (a fresh start).
        self.resumed_from = offset if status == 206 else 0
        length = headers.get("content-length")
        self.total = self.resumed_from + int(length) if length is not None else None
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._digest = hashlib.sha256()
        if self.resumed_from:
            with self.part.open("rb") as existing:
                for block in iter(lambda: existing.read(CHUNK), b""):
                    self._digest.update(block)
        self._out = self.part.open("ab" if self.resumed_from else "wb")
        self.done = self.resumed_from

    def write(self, chunk: bytes) -> None:
        self._out.write(chunk)
        self._digest.update(chunk)
        self.done += len(chunk)
        if self.on_progress is not None:
            self.on_progress(self.done, self.total)

    def close(self) -> None:
        self._out.close()

    def complete(self) -> Downloaded | None:
        """Rename the part file into place; None (part removed) when the bytes don't match the
        ETag, i.e. the resumed part belonged to other bytes than the ones served now."""
        self.close()
        sha256 = self._digest.hexdigest()
        if self.etag is not None and sha256 != self.etag:
            self.part.unlink(missing_ok=True)
            return None
        os.replace(self.part, self.target)
        return Downloaded(
            path=self.target, size=self.done, sha256=sha256, resumed_from=self.resumed_from
        )
