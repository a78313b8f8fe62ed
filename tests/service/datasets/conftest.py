"""Builders for tiny images and (sometimes hostile) zip archives, made with PIL and zipfile."""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.config import DatasetLimits

_CENTRAL_SIGNATURE = b"PK\x01\x02"


def image_bytes(
    seed: int, *, size: tuple[int, int] = (8, 8), fmt: str = "PNG", exif: Image.Exif | None = None
) -> bytes:
    """A small image of random pixels (distinct per seed) encoded as fmt."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    kwargs = {"exif": exif} if exif is not None else {}
    Image.fromarray(pixels, "RGB").save(out, format=fmt, **kwargs)
    return out.getvalue()


Entry = tuple[str | zipfile.ZipInfo, bytes]


def zip_bytes(entries: Iterable[Entry], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip holding the entries in order (names kept exactly as given)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compression) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return out.getvalue()


def write_zip(path: Path, entries: Iterable[Entry], **kwargs: int) -> Path:
    path.write_bytes(zip_bytes(entries, **kwargs))
    return path


def patch_member(
    data: bytes,
    name: str,
    *,
    file_size: int | None = None,
    set_flags: int = 0,
    header_offset: int | None = None,
) -> bytes:
    """Rewrite one member's size or flag bits (both headers), or where its record points."""
    patched = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = archive.getinfo(name)
        local = info.header_offset
        central = archive.start_dir
    # Walk the central directory to this member's record.
    while patched[central : central + 4] == _CENTRAL_SIGNATURE:
        name_len, extra_len, comment_len = struct.unpack_from("<3H", patched, central + 28)
        record_name = bytes(patched[central + 46 : central + 46 + name_len]).decode()
        if record_name == name:
            break
        central += 46 + name_len + extra_len + comment_len
    else:
        raise AssertionError(f"{name} not found in the central directory")
    if file_size is not None:
        struct.pack_into("<L", patched, local + 22, file_size)
        struct.pack_into("<L", patched, central + 24, file_size)
    if header_offset is not None:
        struct.pack_into("<L", patched, central + 42, header_offset)
    if set_flags:
        for flags_at in (local + 6, central + 8):
            (flags,) = struct.unpack_from("<H", patched, flags_at)
            struct.pack_into("<H", patched, flags_at, flags | set_flags)
    return bytes(patched)


def assert_nothing_stored(store: Path, dest: Path) -> None:
    """dest was never created and no temporary folder was left beside it."""
    assert not dest.exists()
    assert list(store.iterdir()) == []


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """An empty folder that holds dataset folders (and nothing else)."""
    folder = tmp_path / "store"
    folder.mkdir()
    return folder


@pytest.fixture
def limits() -> DatasetLimits:
    return DatasetLimits()
