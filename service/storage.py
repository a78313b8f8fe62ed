"""Artifact store: datasets, checkpoints, adapter files and images.

A local directory by default. Files are content-addressed (``<prefix>/<sha256>``) and
written atomically (temp file in the same directory, fsync, rename), so a reader never sees
half a file and a crash leaves no partial artifact.

Everything half-written lives in the scratch folder ``.tmp/``, named after the process writing
it (``<kind>-<host>.<pid>-<random>``). A process killed mid-write (``kill -9``, a lost
machine) leaves its scratch entries behind; :meth:`ArtifactStore.sweep_scratch`, run when the
API starts, removes those that no live process can still be writing.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK = 1024 * 1024
SCRATCH_DIR = ".tmp"
# Scratch entries of another host cannot be checked for a live writer: removed after a day.
FOREIGN_SCRATCH_MAX_AGE_S = 24 * 3600
_OWNER_RE = re.compile(r"^[a-z]+-(?P<host>[A-Za-z0-9.-]+)\.(?P<pid>\d+)-[^-]+$")


@dataclass(frozen=True)
class StoredObject:
    key: str
    sha256: str
    size: int


class InvalidKey(ValueError):
    pass


class ArtifactStore:
    """Keys are relative POSIX paths under ``root``; ``..`` and absolute keys are refused."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        if not key or key.startswith("/") or "\\" in key or ".." in key.split("/"):
            raise InvalidKey(f"invalid artifact key {key!r}")
        return self.root / key

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def scratch_root(self) -> Path:
        """The folder for everything half-written (on the store's filesystem)."""
        tmp_root = self.root / SCRATCH_DIR
        tmp_root.mkdir(exist_ok=True)
        return tmp_root

    def tempdir(self, *, prefix: str = "tmp") -> Path:
        """A scratch directory on the store's filesystem (so a rename into place is atomic)."""
        return Path(tempfile.mkdtemp(prefix=scratch_prefix(prefix), dir=self.scratch_root()))

    def sweep_scratch(self, *, started_at: float) -> list[str]:
        """Remove scratch entries left by dead processes; returns their names.

        An entry goes when it was last written before ``started_at`` (this process's start,
        so none is this process's) and its writer is gone: a process of this host that no
        longer runs, an untagged entry, or another host's entry older than a day. A live
        process's entries, in flight or idle, stay.
        """
        removed = []
        host = _host_tag()
        for entry in sorted(self.scratch_root().iterdir()):
            modified = _last_modified(entry)
            if modified >= started_at:
                continue
            owner = _OWNER_RE.match(entry.name)
            if owner is None:
                stale = True
            elif owner["host"] == host:
                stale = not _pid_alive(int(owner["pid"]))
            else:
                stale = time.time() - modified > FOREIGN_SCRATCH_MAX_AGE_S
            if stale:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry.name)
        return removed

    def _place(self, write: Callable[[BinaryIO], str], *, sync: bool = True) -> str:
        """Fill a temp file with ``write`` (which returns the key), fsync it unless told not
        to, and rename it to that key; nothing is left behind if anything fails."""
        fd, tmp_name = tempfile.mkstemp(prefix=scratch_prefix("file"), dir=self.scratch_root())
        try:
            with os.fdopen(fd, "wb") as out:
                key = write(out)
                out.flush()
                if sync:
                    os.fsync(out.fileno())
            dest = self.path(key)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp_name, dest)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return key

    def put_stream(self, stream: BinaryIO, *, prefix: str, suffix: str = "") -> StoredObject:
        """Store a stream under ``prefix/<sha256><suffix>``; identical content is stored once."""
        digest = hashlib.sha256()
        size = 0

        def write(out: BinaryIO) -> str:
            nonlocal size
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
            return f"{prefix}/{digest.hexdigest()}{suffix}"

        key = self._place(write)
        return StoredObject(key=key, sha256=digest.hexdigest(), size=size)

    def write_bytes(self, key: str, data: bytes, *, sync: bool = True) -> None:
        """Store ``data`` under the caller's key, atomically (temp file, rename).

        ``sync=False`` leaves the fsync to a later :meth:`sync` call, so a caller can make the
        file durable after it has answered; readers see the whole file either way.
        """

        def write(out: BinaryIO) -> str:
            out.write(data)
            return key

        self._place(write, sync=sync)

    def sync(self, keys: Iterable[str]) -> None:
        """Flush files written with ``sync=False`` to disk."""
        for key in keys:
            fd = os.open(self.path(key), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def put_bytes(self, data: bytes, *, prefix: str, suffix: str = "") -> StoredObject:
        import io

        return self.put_stream(io.BytesIO(data), prefix=prefix, suffix=suffix)

    def put_file(self, src: Path, *, prefix: str, suffix: str = "") -> StoredObject:
        with open(src, "rb") as fh:
            return self.put_stream(fh, prefix=prefix, suffix=suffix)

    def open(self, key: str) -> BinaryIO:
        return open(self.path(key), "rb")

    def iter_bytes(self, key: str, *, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Yield the bytes [start, end] (inclusive end, as in HTTP ranges)."""
        with self.open(key) as fh:
            fh.seek(start)
            remaining = None if end is None else end - start + 1
            while remaining is None or remaining > 0:
                chunk = fh.read(CHUNK if remaining is None else min(CHUNK, remaining))
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    def delete(self, key: str) -> None:
        target = self.path(key)
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"


def scratch_prefix(kind: str) -> str:
    """The name prefix of a scratch entry written by this process (``kind`` is a-z)."""
    return f"{kind}-{_host_tag()}.{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _last_modified(entry: Path) -> float:
    """The newest modification time of ``entry`` and, for a folder, of anything in it."""
    try:
        newest = entry.lstat().st_mtime
        if entry.is_dir() and not entry.is_symlink():
            for path in entry.rglob("*"):
                newest = max(newest, path.lstat().st_mtime)
    except FileNotFoundError:
        return float("inf")  # removed while we looked: its owner is alive
    return newest
