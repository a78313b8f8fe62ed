"""Property: arbitrary captions and member names never raise anything but DatasetRejected,
and nothing is ever written outside the dataset folder."""

from __future__ import annotations

import tempfile
import warnings
import zipfile
from pathlib import Path

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from service.config import DatasetLimits
from service.datasets.ingest import ingest_zip
from service.datasets.limits import DatasetRejected
from tests.service.datasets.conftest import image_bytes, zip_bytes

_IMAGES = [image_bytes(seed) for seed in range(3)]
_LIMITS = DatasetLimits(max_caption_bytes=256, max_entries=16)

_name_fragments = st.sampled_from(
    [
        "..",
        ".",
        "",
        "a",
        "b.png",
        "c.txt",
        "captions.jsonl",
        "metadata.csv",
        "results.csv",
        "C:",
        "\\",
        "__MACOSX",
        "._x",
        "\u00fc\u00df",
        " ",
        "x.jpg",
        "dir/",
    ]
)
_free_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"),
    max_size=12,
)
member_names = st.one_of(
    st.lists(st.one_of(_name_fragments, _free_text), min_size=1, max_size=4).map("/".join),
    _free_text.filter(bool),
)
caption_payloads = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda text: text.encode("utf-8", "surrogatepass")),
)
members = st.lists(
    st.tuples(member_names, st.one_of(st.sampled_from(_IMAGES), caption_payloads)),
    min_size=1,
    max_size=6,
)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    entries=members,
    with_good_pair=st.booleans(),
    caption=st.one_of(st.none(), st.none(), st.text(max_size=40)),
    trigger_word=st.one_of(st.none(), st.none(), st.text(max_size=12)),
)
def test_fuzzed_archives_only_raise_dataset_rejected(
    entries: list[tuple[str, bytes]],
    with_good_pair: bool,
    caption: str | None,
    trigger_word: str | None,
) -> None:
    if with_good_pair:
        entries = [*entries, ("good/z.png", image_bytes(9)), ("good/z.txt", b"a caption")]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        zip_path = root / "upload.zip"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # duplicate names
                zip_path.write_bytes(zip_bytes(entries))
        except (UnicodeEncodeError, ValueError, IndexError, zipfile.BadZipFile):
            return  # zipfile itself cannot write this name; nothing to ingest
        store = root / "store"
        dest = store / "dataset"
        try:
            result = ingest_zip(
                zip_path=zip_path,
                dest_dir=dest,
                limits=_LIMITS,
                caption=caption,
                trigger_word=trigger_word,
            )
        except DatasetRejected as rejected:
            event(f"rejected {rejected.code}")
            assert 400 <= rejected.status < 500
            assert rejected.code and rejected.detail
            assert not dest.exists()
            assert not store.exists() or list(store.iterdir()) == []
        else:
            event("accepted")
            assert result.item_count >= 1
            assert [p.name for p in store.iterdir()] == ["dataset"]
            assert {p.name for p in dest.iterdir()} == {"images", "manifest.json", "report.json"}
            stored = sorted(p.name for p in (dest / "images").iterdir())
            assert len(stored) == result.item_count
        assert sorted(p.name for p in root.iterdir()) == sorted(
            ["upload.zip", *(["store"] if store.exists() else [])]
        )


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(
    entries=members,
    caption=st.one_of(st.none(), st.text(max_size=40)),
    name=st.text(max_size=30),
)
def test_fuzzed_uploads_over_http_never_answer_5xx(
    client: TestClient,
    auth: dict[str, str],
    entries: list[tuple[str, bytes]],
    caption: str | None,
    name: str,
) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # duplicate names
            body = zip_bytes(entries)
    except (UnicodeEncodeError, ValueError, IndexError, zipfile.BadZipFile):
        return
    data = {"name": name} | ({"caption": caption} if caption is not None else {})
    response = client.post(
        "/datasets",
        headers=auth,
        data=data,
        files={"file": ("upload.zip", body, "application/zip")},
    )
    event(f"status {response.status_code}")
    assert response.status_code in (201, 400, 413, 415, 422), response.text
    if response.status_code != 201:
        assert response.headers["content-type"].startswith("application/problem+json")
