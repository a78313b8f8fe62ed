"""Hostile and broken uploads: a clear 4xx naming the cap or problem, and nothing stored."""

from __future__ import annotations

import io
import stat
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest

from service.config import DatasetLimits
from service.datasets.ingest import ingest_zip
from service.datasets.limits import DatasetRejected, check_upload_size
from tests.service.datasets.conftest import (
    assert_nothing_stored,
    image_bytes,
    patch_member,
    write_zip,
    zip_bytes,
)

MiB = 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rejected(
    zip_path: Path, store: Path, limits: DatasetLimits, **options: str
) -> DatasetRejected:
    dest = store / "ds"
    with pytest.raises(DatasetRejected) as caught:
        ingest_zip(zip_path=zip_path, dest_dir=dest, limits=limits, **options)  # type: ignore[arg-type]
    assert_nothing_stored(store, dest)
    return caught.value


def _good_pair() -> list[tuple[str, bytes]]:
    return [("ok.png", image_bytes(100)), ("ok.txt", b"a good caption")]


@pytest.mark.parametrize(
    "name",
    [
        "../evil.png",
        "a/../../evil.png",
        "..\\evil.png",
        "/etc/evil.png",
        "\\\\server\\share\\evil.png",
        "C:/evil.png",
        "c:\\windows\\evil.png",
    ],
)
def test_unsafe_paths_are_refused(
    tmp_path: Path, store: Path, limits: DatasetLimits, name: str
) -> None:
    zip_path = write_zip(tmp_path / "up.zip", [*_good_pair(), (name, image_bytes(1))])
    error = _rejected(zip_path, store, limits)
    assert (error.status, error.code) == (422, "unsafe_path")
    assert error.report is None


def test_symlink_entry_is_refused(tmp_path: Path, store: Path, limits: DatasetLimits) -> None:
    link = zipfile.ZipInfo("link.png")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    zip_path = write_zip(tmp_path / "up.zip", [*_good_pair(), (link, b"/etc/passwd")])
    error = _rejected(zip_path, store, limits)
    assert (error.status, error.code) == (422, "symlink_entry")
    assert "link.png" in error.detail


@pytest.mark.parametrize("second_name", ["dup.png", "./dup.png", "x//../dup.png"])
def test_duplicate_names_are_refused(
    tmp_path: Path, store: Path, limits: DatasetLimits, second_name: str
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicate
        data = zip_bytes(
            [*_good_pair(), ("dup.png", image_bytes(1)), (second_name, image_bytes(2))]
        )
    zip_path = tmp_path / "up.zip"
    zip_path.write_bytes(data)
    error = _rejected(zip_path, store, limits)
    if ".." in second_name:
        assert error.code == "unsafe_path"
    else:
        assert (error.status, error.code) == (422, "duplicate_entry")


def test_too_many_entries(tmp_path: Path, store: Path) -> None:
    limits = DatasetLimits(max_entries=10)
    entries = [(f"img{i}.png", image_bytes(i)) for i in range(11)]
    error = _rejected(write_zip(tmp_path / "up.zip", entries), store, limits)
    assert (error.status, error.code) == (413, "too_many_entries")
    assert "max_entries=10" in error.detail


def test_member_that_decompresses_past_cap_while_header_lies(tmp_path: Path, store: Path) -> None:
    limits = DatasetLimits(max_file_bytes=1 * MiB, max_compression_ratio=1e9)
    bomb = PNG_SIGNATURE + bytes(4 * MiB)
    honest = zip_bytes([*_good_pair(), ("bomb.png", bomb)])
    lying = patch_member(honest, "bomb.png", file_size=1000)
    zip_path = tmp_path / "up.zip"
    zip_path.write_bytes(lying)
    error = _rejected(zip_path, store, limits)
    assert (error.status, error.code) == (413, "file_too_large")
    assert "max_file_bytes=1048576" in error.detail
    assert "declares 1000 bytes" in error.detail


def test_member_whose_header_overstates_its_size(
    tmp_path: Path, store: Path, limits: DatasetLimits
) -> None:
    honest = zip_bytes([*_good_pair(), ("short.png", image_bytes(1))])
    zip_path = tmp_path / "up.zip"
    zip_path.write_bytes(patch_member(honest, "short.png", file_size=100_000))
    error = _rejected(zip_path, store, limits)
    assert (error.status, error.code) == (422, "size_mismatch")


def test_header_declaring_a_huge_member_is_refused_before_reading(
    tmp_path: Path, store: Path
) -> None:
    limits = DatasetLimits(max_file_bytes=1 * MiB)
    honest = zip_bytes([*_good_pair(), ("big.png", image_bytes(1))])
    zip_path = tmp_path / "up.zip"
    zip_path.write_bytes(patch_member(honest, "big.png", file_size=2 * MiB))
    error = _rejected(zip_path, store, limits)
    assert (error.status, error.code) == (413, "file_too_large")
    assert "declares 2097152 bytes" in error.detail


def test_compression_ratio_bomb(tmp_path: Path, store: Path) -> None:
    limits = DatasetLimits(max_compression_ratio=100, compression_ratio_min_bytes=1 * MiB)
    bomb = PNG_SIGNATURE + bytes(8 * MiB)  # deflates about 1000:1, within max_file_bytes
    zip_path = write_zip(tmp_path / "up.zip", [*_good_pair(), ("bomb.png", bomb)])
    error = _rejected(zip_path, store, limits)
    assert (error.status, error.code) == (413, "compression_ratio_exceeded")
    assert "max_compression_ratio=100" in error.detail


def test_total_decompressed_bytes_cap(tmp_path: Path, store: Path) -> None:
    limits = DatasetLimits(max_total_bytes=2000)
    entries = [(f"{i}.png", image_bytes(i, size=(16, 16))) for i in range(4)]
    error = _rejected(write_zip(tmp_path / "up.zip", entries), store, limits)
    assert (error.status, error.code) == (413, "total_too_large")
    assert "max_total_bytes=2000" in error.detail


def test_nested_zip_is_not_expanded(tmp_path: Path, store: Path, limits: DatasetLimits) -> None:
    inner = zip_bytes([("inner.png", image_bytes(1)), ("inner.txt", b"inside")])
    zip_path = write_zip(
        tmp_path / "up.zip",
        [*_good_pair(), ("nested.zip", inner), ("disguised.png", inner)],
    )
    result = ingest_zip(zip_path=zip_path, dest_dir=store / "ds", limits=limits)
    assert result.item_count == 1
    assert result.report["ignored"] == [
        {"file": "disguised.png", "reason": "nested zip archive, not expanded"},
        {"file": "nested.zip", "reason": "nested zip archive, not expanded"},
    ]
    assert not any("inner" in path.name for path in (store / "ds").rglob("*"))


def test_nested_zip_alone_is_rejected(tmp_path: Path, store: Path, limits: DatasetLimits) -> None:
    inner = zip_bytes([("inner.png", image_bytes(1)), ("inner.txt", b"inside")])
    error = _rejected(write_zip(tmp_path / "up.zip", [("nested.zip", inner)]), store, limits)
    assert (error.status, error.code) == (422, "no_usable_pairs")
    assert error.report is not None and error.report["counts"]["ignored"] == 1


def test_image_over_pixel_cap(tmp_path: Path, store: Path) -> None:
    limits = DatasetLimits(max_image_pixels=1000)
    zip_path = write_zip(
        tmp_path / "up.zip", [("big.png", image_bytes(1, size=(40, 40))), ("big.txt", b"big")]
    )
    error = _rejected(zip_path, store, limits)
    assert (error.status, error.code) == (422, "no_usable_pairs")
    assert error.report is not None
    [failure] = error.report["undecodable"]
    assert failure["file"] == "big.png"
    assert "max_image_pixels=1000" in failure["reason"]
    assert "40x40" in failure["reason"]


def test_image_over_pixel_cap_is_a_warning_beside_good_pairs(tmp_path: Path, store: Path) -> None:
    limits = DatasetLimits(max_image_pixels=1000)
    zip_path = write_zip(
        tmp_path / "up.zip",
        [*_good_pair(), ("big.png", image_bytes(1, size=(40, 40))), ("big.txt", b"big")],
    )
    result = ingest_zip(zip_path=zip_path, dest_dir=store / "ds", limits=limits)
    assert result.item_count == 1
    assert result.report["counts"]["undecodable"] == 1
    assert any("could not be decoded" in warning for warning in result.report["warnings"])


def _png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header claims width x height (Pillow's bomb guard reads it)."""
    data = bytearray(image_bytes(1, size=(1, 1)))
    ihdr = data.index(b"IHDR")
    struct.pack_into(">II", data, ihdr + 4, width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    struct.pack_into(">I", data, ihdr + 17, crc)
    return bytes(data)


@pytest.mark.parametrize("side", [10_000, 20_000])  # Pillow warns at 89 MP, errors at 179 MP
def test_pillow_decompression_bomb_is_a_per_file_error(
    tmp_path: Path, store: Path, side: int
) -> None:
    limits = DatasetLimits(max_image_pixels=10**9)  # let Pillow's own guard speak first
    zip_path = write_zip(
        tmp_path / "up.zip", [*_good_pair(), ("bomb.png", _png_claiming(side, side))]
    )
    result = ingest_zip(zip_path=zip_path, dest_dir=store / "ds", limits=limits)
    [failure] = result.report["undecodable"]
    assert failure["file"] == "bomb.png"
    assert "decompression bomb" in failure["reason"]


def test_non_utf8_caption(tmp_path: Path, store: Path, limits: DatasetLimits) -> None:
    zip_path = write_zip(
        tmp_path / "up.zip", [("a.png", image_bytes(1)), ("a.txt", b"caf\xe9 latin-1")]
    )
    error = _rejected(zip_path, store, limits)
    assert (error.status, error.code) == (422, "no_usable_pairs")
    assert error.report is not None
    assert error.report["caption_errors"] == [
        {"file": "a.txt", "reason": "not valid UTF-8 (byte 0xe9 at offset 3)"}
    ]
    assert error.report["images_without_captions"] == ["a.png"]


def test_non_utf8_caption_beside_good_pairs_is_reported(
    tmp_path: Path, store: Path, limits: DatasetLimits
) -> None:
    zip_path = write_zip(
        tmp_path / "up.zip",
        [*_good_pair(), ("a.png", image_bytes(1)), ("a.txt", b"\xff\xfebad")],
    )
    result = ingest_zip(zip_path=zip_path, dest_dir=store / "ds", limits=limits)
    assert result.item_count == 1
    assert result.report["caption_errors"][0]["file"] == "a.txt"


def test_caption_over_cap(tmp_path: Path, store: Path) -> None:
    limits = DatasetLimits(max_caption_bytes=100)
    zip_path = write_zip(tmp_path / "up.zip", [("a.png", image_bytes(1)), ("a.txt", b"w " * 100)])
    error = _rejected(zip_path, store, limits)
    assert (error.status, error.code) == (422, "no_usable_pairs")
    assert error.report is not None
    [problem] = error.report["caption_errors"]
    assert problem["file"] == "a.txt"
    assert "max_caption_bytes=100" in problem["reason"]


def test_fixed_caption_over_cap(tmp_path: Path, store: Path) -> None:
    limits = DatasetLimits(max_caption_bytes=10)
    zip_path = write_zip(tmp_path / "up.zip", [("a.png", image_bytes(1))])
    error = _rejected(zip_path, store, limits, caption="a caption that is too long")
    assert (error.status, error.code) == (422, "invalid_caption")
    assert "max_caption_bytes=10" in error.detail


@pytest.mark.parametrize(
    "payload", [image_bytes(1), b"just some text\n", b"", b"\x1f\x8b\x08\x00gzip-ish"]
)
def test_not_a_zip(tmp_path: Path, store: Path, limits: DatasetLimits, payload: bytes) -> None:
    zip_path = tmp_path / "up.zip"
    zip_path.write_bytes(payload)
    error = _rejected(zip_path, store, limits)
    assert (error.status, error.code) == (415, "not_a_zip")


def test_truncated_zip_is_corrupt(tmp_path: Path, store: Path, limits: DatasetLimits) -> None:
    data = zip_bytes(_good_pair())
    zip_path = tmp_path / "up.zip"
    zip_path.write_bytes(data[: len(data) // 2])
    error = _rejected(zip_path, store, limits)
    assert (error.status, error.code) == (422, "corrupt_archive")


def test_upload_over_size_cap(tmp_path: Path, store: Path) -> None:
    limits = DatasetLimits(max_upload_bytes=100)
    error = _rejected(write_zip(tmp_path / "up.zip", _good_pair()), store, limits)
    assert (error.status, error.code) == (413, "upload_too_large")
    assert "max_upload_bytes=100" in error.detail
    check_upload_size(100, limits)
    with pytest.raises(DatasetRejected, match="max_upload_bytes=100"):
        check_upload_size(101, limits)


def test_encrypted_entry(tmp_path: Path, store: Path, limits: DatasetLimits) -> None:
    data = patch_member(zip_bytes(_good_pair()), "ok.png", set_flags=0x1)
    zip_path = tmp_path / "up.zip"
    zip_path.write_bytes(data)
    error = _rejected(zip_path, store, limits)
    assert (error.status, error.code) == (422, "encrypted_entry")


def test_entries_sharing_data_are_refused(
    tmp_path: Path, store: Path, limits: DatasetLimits
) -> None:
    data = zip_bytes([*_good_pair(), ("a.png", image_bytes(1))])
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        first_offset = archive.getinfo("ok.png").header_offset
    zip_path = tmp_path / "up.zip"
    zip_path.write_bytes(patch_member(data, "a.png", header_offset=first_offset))
    error = _rejected(zip_path, store, limits)
    assert (error.status, error.code) == (422, "overlapping_entries")


def test_bzip2_entry_is_refused(tmp_path: Path, store: Path, limits: DatasetLimits) -> None:
    zip_path = write_zip(tmp_path / "up.zip", _good_pair(), compression=zipfile.ZIP_BZIP2)
    error = _rejected(zip_path, store, limits)
    assert (error.status, error.code) == (422, "unsupported_compression")


def test_failure_midway_leaves_nothing(tmp_path: Path, store: Path, limits: DatasetLimits) -> None:
    entries = [(f"{i}.png", image_bytes(i)) for i in range(4)]
    entries += [(f"{i}.txt", f"caption {i}".encode()) for i in range(4)]
    good = zip_bytes(entries, compression=zipfile.ZIP_STORED)
    # The same archive is accepted as is: images 0-2 are written before 3.png is reached.
    (tmp_path / "good.zip").write_bytes(good)
    accepted = ingest_zip(zip_path=tmp_path / "good.zip", dest_dir=tmp_path / "ok", limits=limits)
    assert accepted.item_count == 4
    # Flip one stored byte of the last image (sorted order): its CRC fails mid-ingest.
    corrupt = bytearray(good)
    with zipfile.ZipFile(tmp_path / "good.zip") as archive:
        info = archive.getinfo("3.png")
    corrupt[info.header_offset + 30 + len("3.png") + 40] ^= 0xFF
    zip_path = tmp_path / "up.zip"
    zip_path.write_bytes(bytes(corrupt))
    error = _rejected(zip_path, store, limits)
    assert (error.status, error.code) == (422, "corrupt_entry")
    assert "3.png" in error.detail


def test_existing_destination_is_never_overwritten(
    tmp_path: Path, store: Path, limits: DatasetLimits
) -> None:
    dest = store / "ds"
    dest.mkdir()
    (dest / "keep").write_text("mine")
    with pytest.raises(FileExistsError):
        ingest_zip(
            zip_path=write_zip(tmp_path / "up.zip", _good_pair()), dest_dir=dest, limits=limits
        )
    assert [p.name for p in store.iterdir()] == ["ds"]
    assert (dest / "keep").read_text() == "mine"


def test_limits_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        DatasetLimits(max_entries=0)
