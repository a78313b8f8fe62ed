"""Thumbnails and the training-side image opener."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from service.datasets.images import (
    ImageDecodeError,
    make_thumbnail,
    open_image_rgb,
    sniff_image_kind,
)
from tests.service.datasets.conftest import image_bytes


def test_thumbnail_is_a_bounded_oriented_jpeg(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 270: a 600x300 file is shown as 300x600
    path = tmp_path / "img.jpg"
    path.write_bytes(image_bytes(1, size=(600, 300), fmt="JPEG", exif=exif))
    thumbnail = Image.open(io.BytesIO(make_thumbnail(path, max_side=64)))
    assert thumbnail.format == "JPEG"
    assert thumbnail.size == (32, 64)


def test_open_image_rgb_converts_modes(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("LA", (5, 4), (120, 200)).save(path)
    image = open_image_rgb(path)
    assert (image.mode, image.size) == ("RGB", (5, 4))


def test_open_image_rgb_refuses_non_images_and_oversize(tmp_path: Path) -> None:
    text = tmp_path / "t.png"
    text.write_bytes(b"hello")
    with pytest.raises(ImageDecodeError, match="not JPEG, PNG or WebP"):
        open_image_rgb(text)
    big = tmp_path / "big.png"
    big.write_bytes(image_bytes(1, size=(20, 20)))
    with pytest.raises(ImageDecodeError, match="max_image_pixels=100"):
        open_image_rgb(big, max_pixels=100)


def test_truncated_image_is_a_decode_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    path.write_bytes(image_bytes(1, size=(32, 32))[:100])
    with pytest.raises(ImageDecodeError, match="could not decode"):
        open_image_rgb(path)


def test_sniffing() -> None:
    assert sniff_image_kind(image_bytes(1, fmt="JPEG")) == "jpeg"
    assert sniff_image_kind(image_bytes(1, fmt="WEBP")) == "webp"
    assert sniff_image_kind(image_bytes(1, fmt="GIF")) is None
