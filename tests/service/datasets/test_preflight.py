"""Report statistics: tokens, duplicates, resolutions and aspect ratios."""

from __future__ import annotations

from pathlib import Path

from service.config import DatasetLimits
from service.datasets.ingest import ingest_zip
from service.datasets.preflight import CLIP_TOKEN_LIMIT, clip_token_estimate
from tests.service.datasets.conftest import image_bytes, write_zip


def test_clip_token_estimate_counts_words_punctuation_and_specials() -> None:
    assert clip_token_estimate("") == 2
    assert clip_token_estimate("A photo") == 4
    assert clip_token_estimate("a dog, running!") == 7  # a dog , running ! + 2
    assert clip_token_estimate("it's 2024") == 2 + 2 + 4  # it 's 2 0 2 4
    assert clip_token_estimate("caf\u00e9 ...") == 4


def test_caption_statistics_and_token_limit(
    tmp_path: Path, store: Path, limits: DatasetLimits
) -> None:
    long_caption = " ".join(["word"] * 80)  # 82 estimated tokens
    zip_path = write_zip(
        tmp_path / "up.zip",
        [
            ("a.png", image_bytes(1)),
            ("a.txt", b"short one"),
            ("b.png", image_bytes(2)),
            ("b.txt", long_caption.encode()),
        ],
    )
    report = ingest_zip(zip_path=zip_path, dest_dir=store / "ds", limits=limits).report
    stats = report["captions"]
    assert stats["token_counter"] == "clip_estimate"
    assert stats["token_limit"] == CLIP_TOKEN_LIMIT
    assert stats["count"] == 2
    assert stats["tokens"]["min"] == 4 and stats["tokens"]["max"] == 82
    assert stats["chars"]["min"] == len("short one")
    assert stats["over_token_limit"] == 1
    assert stats["over_token_limit_files"] == [{"file": "b.png", "tokens": 82}]
    assert any("77-token" in warning for warning in report["warnings"])


def test_custom_token_counter_is_used_and_named(
    tmp_path: Path, store: Path, limits: DatasetLimits
) -> None:
    zip_path = write_zip(tmp_path / "up.zip", [("a.png", image_bytes(1)), ("a.txt", b"abc")])
    report = ingest_zip(
        zip_path=zip_path, dest_dir=store / "ds", limits=limits, count_tokens=lambda text: 100
    ).report
    assert report["captions"]["token_counter"] == "custom"
    assert report["captions"]["over_token_limit"] == 1


def test_duplicates_resolution_histogram_and_aspect_ratios(
    tmp_path: Path, store: Path, limits: DatasetLimits
) -> None:
    same = image_bytes(7, size=(300, 200))
    zip_path = write_zip(
        tmp_path / "up.zip",
        [
            ("x/one.png", same),
            ("x/one.txt", b"one"),
            ("y/two.png", same),
            ("y/two.txt", b"two"),
            ("tall.png", image_bytes(8, size=(90, 160))),
            ("tall.txt", b"tall"),
            ("square.jpg", image_bytes(9, size=(600, 600), fmt="JPEG")),
            ("square.txt", b"square"),
        ],
    )
    report = ingest_zip(zip_path=zip_path, dest_dir=store / "ds", limits=limits).report
    assert report["counts"]["duplicate_images"] == 1
    [group] = report["duplicates"]
    assert group["files"] == ["x/one.png", "y/two.png"]
    histogram = report["resolution"]["min_side_histogram"]
    assert histogram["<256"] == 3  # 300x200 twice, 90x160
    assert histogram["512-767"] == 1
    assert sum(histogram.values()) == 4
    assert report["resolution"]["most_common_sizes"][0] == {"size": "300x200", "count": 2}
    buckets = report["aspect_ratios"]["buckets"]
    assert (buckets["3:2"], buckets["9:16"], buckets["1:1"]) == (2, 1, 1)
    assert report["aspect_ratios"]["min"] == round(90 / 160, 4)
    assert report["aspect_ratios"]["max"] == 1.5
    assert report["resolution"]["width"]["max"] == 600
    assert report["counts"]["pairs"] == 4  # duplicates are kept, and warned about
    assert any("duplicate" in warning for warning in report["warnings"])
