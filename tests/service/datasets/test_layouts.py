"""Each accepted layout, nested folders included, with an accurate report and manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from service.config import DatasetLimits
from service.datasets.ingest import canonical_json, ingest_zip
from service.datasets.limits import DatasetRejected
from tests.service.datasets.conftest import image_bytes, write_zip


def _manifest(dest: Path) -> dict:
    return json.loads((dest / "manifest.json").read_text())


def _captions_by_source(dest: Path) -> dict[str, list[str]]:
    return {item["source"]: item["captions"] for item in _manifest(dest)["items"]}


def test_pairs_in_nested_folders(tmp_path: Path, store: Path, limits: DatasetLimits) -> None:
    zip_path = write_zip(
        tmp_path / "up.zip",
        [
            ("set/a/one.jpg", image_bytes(1, fmt="JPEG", size=(16, 8))),
            ("set/a/one.txt", b"a red fox,\n  in snow "),
            ("set/b/deep/two.png", image_bytes(2)),
            ("set/b/deep/two.txt", "caf\u00e9 photo".encode()),
            ("set/b/three.webp", image_bytes(3, fmt="WEBP")),  # no caption
            ("set/b/four.txt", b"orphan caption"),  # no image
            ("set/b/", b""),
        ],
    )
    dest = store / "ds"
    result = ingest_zip(zip_path=zip_path, dest_dir=dest, limits=limits)

    report = result.report
    assert report["layout"] == "pairs"
    assert report["counts"] == {
        "entries": 7,
        "files": 6,
        "images": 3,
        "undecodable": 0,
        "captions": 3,
        "pairs": 2,
        "images_without_captions": 1,
        "captions_without_images": 1,
        "caption_errors": 0,
        "duplicate_images": 0,
        "ignored": 0,
    }
    assert report["images_without_captions"] == ["set/b/three.webp"]
    assert report["captions_without_images"] == [
        {"source": "set/b/four.txt", "file_name": "set/b/four.txt"}
    ]
    assert _captions_by_source(dest) == {
        "set/a/one.jpg": ["a red fox, in snow"],
        "set/b/deep/two.png": ["caf\u00e9 photo"],
    }
    manifest = _manifest(dest)
    assert [item["file"] for item in manifest["items"]] == [
        "images/000000.jpg",
        "images/000001.png",
    ]
    assert manifest["items"][0]["width"] == 16 and manifest["items"][0]["height"] == 8
    # Originals are stored byte for byte, and the hashes say so.
    stored = (dest / "images/000000.jpg").read_bytes()
    assert stored == image_bytes(1, fmt="JPEG", size=(16, 8))
    assert manifest["items"][0]["sha256"] == hashlib.sha256(stored).hexdigest()
    assert result.item_count == 2
    assert result.sha256 == hashlib.sha256((dest / "manifest.json").read_bytes()).hexdigest()
    assert result.sha256 == hashlib.sha256(canonical_json(manifest)).hexdigest()
    assert json.loads((dest / "report.json").read_text()) == report
    assert result.total_bytes == sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    assert report["total_bytes"] == sum(
        (dest / item["file"]).stat().st_size for item in manifest["items"]
    )
    assert sorted(p.name for p in store.iterdir()) == ["ds"]
    assert any("no caption" in warning for warning in report["warnings"])


def test_captions_jsonl_with_every_key_spelling(
    tmp_path: Path, store: Path, limits: DatasetLimits
) -> None:
    lines = [
        {"file_name": "a.png", "text": "first"},
        {"image": "sub/b.png", "caption": "second"},
        {"file": "c.png", "caption": ["third", "third again"]},
        {"file_name": "missing.png", "text": "nobody"},
        {"text": "no file name"},
    ]
    body = "\n".join(json.dumps(line) for line in lines) + "\nnot json\n"
    zip_path = write_zip(
        tmp_path / "up.zip",
        [
            ("data/captions.jsonl", body.encode()),
            ("data/a.png", image_bytes(1)),
            ("data/sub/b.png", image_bytes(2)),
            ("data/c.png", image_bytes(3)),
        ],
    )
    result = ingest_zip(zip_path=zip_path, dest_dir=store / "ds", limits=limits)
    assert result.report["layout"] == "captions_jsonl"
    assert result.report["metadata_files"] == ["data/captions.jsonl"]
    assert _captions_by_source(store / "ds") == {
        "data/a.png": ["first"],
        "data/sub/b.png": ["second"],
        "data/c.png": ["third", "third again"],
    }
    counts = result.report["counts"]
    assert (counts["pairs"], counts["captions"], counts["caption_errors"]) == (3, 5, 2)
    assert counts["captions_without_images"] == 1
    errors = {error["file"]: error["reason"] for error in result.report["caption_errors"]}
    assert set(errors) == {"data/captions.jsonl:5", "data/captions.jsonl:6"}
    assert "file_name" in errors["data/captions.jsonl:5"]


@pytest.mark.parametrize("metadata_name", ["metadata.jsonl", "metadata.csv"])
def test_huggingface_imagefolder(
    tmp_path: Path, store: Path, limits: DatasetLimits, metadata_name: str
) -> None:
    if metadata_name.endswith(".jsonl"):
        body = (
            '{"file_name": "train/0001.png", "text": "a cat", "extra": 1}\n'
            '{"file_name": "train/0002.png", "text": "a dog"}\n'
        )
    else:
        body = 'file_name,text,extra\ntrain/0001.png,a cat,1\ntrain/0002.png,"a dog, sitting",2\n'
    zip_path = write_zip(
        tmp_path / "up.zip",
        [
            (f"root/{metadata_name}", body.encode()),
            ("root/train/0001.png", image_bytes(1)),
            ("root/train/0002.png", image_bytes(2)),
        ],
    )
    result = ingest_zip(zip_path=zip_path, dest_dir=store / "ds", limits=limits)
    assert result.report["layout"] == "imagefolder"
    expected_dog = "a dog" if metadata_name.endswith(".jsonl") else "a dog, sitting"
    assert _captions_by_source(store / "ds") == {
        "root/train/0001.png": ["a cat"],
        "root/train/0002.png": [expected_dog],
    }
    assert result.report["counts"]["caption_errors"] == 0


def test_flickr30k_keeps_every_caption(tmp_path: Path, store: Path, limits: DatasetLimits) -> None:
    body = (
        "image_name| comment_number| comment\n"
        '10.jpg| 0| Two "young" guys with shaggy hair .\n'
        "10.jpg| 1| Two men in a yard | outdoors .\n"
        "10.jpg| 2| Two friends enjoy time spent together .\n"
        "11.jpg| 0| A dog runs .\n"
        "11.jpg| 1 A row missing its delimiter .\n"
    )
    zip_path = write_zip(
        tmp_path / "up.zip",
        [
            ("results.csv", body.encode()),
            ("flickr30k_images/10.jpg", image_bytes(1, fmt="JPEG")),
            ("flickr30k_images/11.jpg", image_bytes(2, fmt="JPEG")),
        ],
    )
    result = ingest_zip(zip_path=zip_path, dest_dir=store / "ds", limits=limits)
    assert result.report["layout"] == "flickr30k"
    assert _captions_by_source(store / "ds") == {
        "flickr30k_images/10.jpg": [
            'Two "young" guys with shaggy hair .',
            "Two men in a yard | outdoors .",
            "Two friends enjoy time spent together .",
        ],
        "flickr30k_images/11.jpg": ["A dog runs ."],
    }
    assert result.report["counts"]["captions"] == 4
    assert result.report["caption_errors"] == [
        {"file": "results.csv:6", "reason": "row has 2 of 3 columns"}
    ]
    assert result.report["captions"]["count"] == 4


def test_images_only_with_trigger_word_and_fixed_caption(
    tmp_path: Path, store: Path, limits: DatasetLimits
) -> None:
    zip_path = write_zip(
        tmp_path / "up.zip",
        [("pics/a.png", image_bytes(1)), ("pics/nested/b.jpg", image_bytes(2, fmt="JPEG"))],
    )
    only_trigger = ingest_zip(
        zip_path=zip_path, dest_dir=store / "t", limits=limits, trigger_word="sks"
    )
    assert only_trigger.report["layout"] == "images_only"
    assert _captions_by_source(store / "t") == {"pics/a.png": ["sks"], "pics/nested/b.jpg": ["sks"]}

    both = ingest_zip(
        zip_path=zip_path,
        dest_dir=store / "c",
        limits=limits,
        caption="a photo of a toy",
        trigger_word="sks",
    )
    assert {tuple(c) for c in _captions_by_source(store / "c").values()} == {
        ("sks, a photo of a toy",)
    }
    assert both.report["captioning"] == {
        "fixed_caption": "a photo of a toy",
        "trigger_word": "sks",
        "file_captions_used": False,
    }


def test_images_only_without_captions_is_rejected_with_report(
    tmp_path: Path, store: Path, limits: DatasetLimits
) -> None:
    zip_path = write_zip(tmp_path / "up.zip", [("a.png", image_bytes(1))])
    with pytest.raises(DatasetRejected) as caught:
        ingest_zip(zip_path=zip_path, dest_dir=store / "ds", limits=limits)
    assert (caught.value.status, caught.value.code) == (422, "no_usable_pairs")
    assert caught.value.report is not None
    assert caught.value.report["counts"]["images"] == 1
    assert caught.value.report["images_without_captions"] == ["a.png"]
    assert list(store.iterdir()) == []


def test_trigger_word_is_prepended_once_and_fixed_caption_replaces_files(
    tmp_path: Path, store: Path, limits: DatasetLimits
) -> None:
    zip_path = write_zip(
        tmp_path / "up.zip",
        [
            ("a.png", image_bytes(1)),
            ("a.txt", b"a toy on a desk"),
            ("b.png", image_bytes(2)),
            ("b.txt", b"sks toy in a garden"),
        ],
    )
    ingest_zip(zip_path=zip_path, dest_dir=store / "t", limits=limits, trigger_word="sks")
    assert _captions_by_source(store / "t") == {
        "a.png": ["sks, a toy on a desk"],
        "b.png": ["sks toy in a garden"],
    }
    fixed = ingest_zip(zip_path=zip_path, dest_dir=store / "f", limits=limits, caption="x")
    assert _captions_by_source(store / "f") == {"a.png": ["x"], "b.png": ["x"]}
    assert fixed.report["layout"] == "pairs"


def test_mixed_layouts_merge_captions(tmp_path: Path, store: Path, limits: DatasetLimits) -> None:
    zip_path = write_zip(
        tmp_path / "up.zip",
        [
            ("a.png", image_bytes(1)),
            ("a.txt", b"from the sidecar"),
            ("metadata.jsonl", b'{"file_name": "a.png", "text": "from metadata"}\n'),
        ],
    )
    result = ingest_zip(zip_path=zip_path, dest_dir=store / "ds", limits=limits)
    assert result.report["layout"] == "mixed"
    assert result.report["layouts"] == ["imagefolder", "pairs"]
    assert _captions_by_source(store / "ds") == {"a.png": ["from the sidecar", "from metadata"]}


def test_images_identified_by_content_not_extension(
    tmp_path: Path, store: Path, limits: DatasetLimits
) -> None:
    zip_path = write_zip(
        tmp_path / "up.zip",
        [
            ("looks.jpg", image_bytes(1, fmt="PNG")),  # a PNG under a .jpg name
            ("looks.txt", b"png really"),
            ("noext", image_bytes(2, fmt="WEBP")),
            ("noext.txt", b"webp really"),
            ("fake.png", b"this is text, not a picture"),
            ("fake.txt", b"caption of a fake"),
            ("notes.md", b"# readme"),
            ("__MACOSX/._looks.jpg", b"\x00\x05\x16\x07"),
            (".DS_Store", b"\x00\x00"),
        ],
    )
    result = ingest_zip(zip_path=zip_path, dest_dir=store / "ds", limits=limits)
    files = {item["source"]: item["file"] for item in _manifest(store / "ds")["items"]}
    assert files == {"looks.jpg": "images/000000.png", "noext": "images/000001.webp"}
    assert result.report["undecodable"] == [
        {"file": "fake.png", "reason": "content is not JPEG, PNG or WebP"}
    ]
    ignored = {entry["file"] for entry in result.report["ignored"]}
    assert ignored == {"notes.md", "__MACOSX/._looks.jpg", ".DS_Store"}
    # The fake image's caption is attached to it (an undecodable image), not an orphan.
    assert result.report["counts"]["captions_without_images"] == 0


def test_exif_orientation_sets_reported_size(
    tmp_path: Path, store: Path, limits: DatasetLimits
) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: a 16x8 file is shown as 8x16
    zip_path = write_zip(
        tmp_path / "up.zip",
        [("r.jpg", image_bytes(1, fmt="JPEG", size=(16, 8), exif=exif)), ("r.txt", b"rotated")],
    )
    ingest_zip(zip_path=zip_path, dest_dir=store / "ds", limits=limits)
    item = _manifest(store / "ds")["items"][0]
    assert (item["width"], item["height"]) == (8, 16)
