"""The dataset HTTP API on real SQL and a real artifact store: upload, read, thumbnails, delete."""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from service.app import create_app
from service.auth import get_or_create_tenant
from service.config import DatasetLimits
from service.datasets.service import (
    DatasetCreation,
    DatasetUploadRejected,
    NewDataset,
    create_dataset,
    spooled_upload,
)
from service.db import transaction
from service.deps import UnitOfWork
from service.models import Dataset, IdempotencyKey, Job, JobStatus
from service.storage import ArtifactStore
from tests.conftest import Stack
from tests.service.datasets.conftest import Entry, image_bytes, zip_bytes
from tests.service.test_app import assert_problem

PAIRS: list[Entry] = [
    ("shoot/a/1.png", image_bytes(1, size=(48, 32))),
    ("shoot/a/1.txt", b"a red fox in snow"),
    ("shoot/b/2.jpg", image_bytes(2, size=(16, 16), fmt="JPEG")),
    ("shoot/b/2.txt", b"a blue bird"),
]

# layout -> (entries, form fields, pair_count, caption_count)
LAYOUTS: dict[str, tuple[list[Entry], dict[str, str], int, int]] = {
    "pairs": (PAIRS, {}, 2, 2),
    "captions_jsonl": (
        [
            ("1.png", image_bytes(3)),
            ("sub/2.png", image_bytes(4)),
            (
                "captions.jsonl",
                b'{"file_name": "1.png", "text": "a fox"}\n'
                b'{"image": "sub/2.png", "caption": ["a cat", "a grey cat"]}\n',
            ),
        ],
        {},
        2,
        3,
    ),
    "imagefolder": (
        [
            ("train/0001.png", image_bytes(5)),
            ("train/0002.png", image_bytes(6)),
            (
                "metadata.csv",
                b'file_name,text\ntrain/0001.png,a cat\ntrain/0002.png,"a dog, sat"\n',
            ),
        ],
        {},
        2,
        2,
    ),
    "flickr30k": (
        [
            ("flickr30k_images/100.jpg", image_bytes(7, fmt="JPEG")),
            (
                "results.csv",
                b"image_name| comment_number| comment\n"
                b"100.jpg| 0| Two dogs play .\n100.jpg| 1| Dogs in a park .\n",
            ),
        ],
        {},
        1,
        2,
    ),
    "images_only": (
        [("a.png", image_bytes(8)), ("b.png", image_bytes(9))],
        {"trigger_word": "sks"},
        2,
        2,
    ),
}


def _upload(
    client: TestClient,
    headers: dict[str, str],
    data: bytes,
    *,
    name: str = "my set",
    **fields: str,
) -> httpx2.Response:
    return client.post(
        "/datasets",
        headers=headers,
        files={"file": ("set.zip", data, "application/zip")},
        data={"name": name, **fields},
    )


def _created(client: TestClient, headers: dict[str, str], entries: list[Entry] = PAIRS) -> dict:
    response = _upload(client, headers, zip_bytes(entries))
    assert response.status_code == 201, response.text
    return response.json()


def _store(client: TestClient) -> ArtifactStore:
    store: ArtifactStore = client.app.state.store  # type: ignore[attr-defined]
    return store


def _stored(client: TestClient, stack: Stack) -> tuple[int, int, list[str], list[str]]:
    """Dataset rows, idempotency rows, the store's datasets folder and its scratch folder."""
    root = _store(client).root
    with stack.session_factory() as session:
        datasets = session.scalar(select(func.count()).select_from(Dataset)) or 0
        keys = session.scalar(select(func.count()).select_from(IdempotencyKey)) or 0

    def listing(folder: Path) -> list[str]:
        return sorted(p.name for p in folder.iterdir()) if folder.exists() else []

    return datasets, keys, listing(root / "datasets"), listing(root / ".tmp")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_uploads_and_reads_back(
    client: TestClient, auth: dict[str, str], layout: str
) -> None:
    entries, fields, pairs, captions = LAYOUTS[layout]
    response = _upload(client, auth, zip_bytes(entries), name=f"  {layout} set ", **fields)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["id"].startswith("ds_")
    assert response.headers["location"] == f"/datasets/{created['id']}"
    assert "idempotent-replayed" not in response.headers
    assert created["name"] == f"{layout} set"
    assert (created["status"], created["layout"]) == ("ready", layout)
    assert (created["pair_count"], created["caption_count"]) == (pairs, captions)
    assert created["image_count"] == created["report"]["counts"]["images"]
    assert created["report"]["layout"] == layout
    assert created["report"]["counts"]["pairs"] == pairs

    read = client.get(f"/datasets/{created['id']}", headers=auth)
    assert read.status_code == 200
    assert read.json() == created

    folder = _store(client).path(f"datasets/{created['id']}")
    manifest = (folder / "manifest.json").read_bytes()
    assert hashlib.sha256(manifest).hexdigest() == created["sha256"]
    assert len(json.loads(manifest)["items"]) == pairs
    assert json.loads((folder / "report.json").read_bytes()) == created["report"]
    assert created["total_bytes"] == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_fixed_caption_and_trigger_word_reach_the_report(
    client: TestClient, auth: dict[str, str]
) -> None:
    response = _upload(client, auth, zip_bytes(PAIRS), caption="a photo", trigger_word="zwx")
    assert response.status_code == 201, response.text
    captioning = response.json()["report"]["captioning"]
    assert captioning == {
        "fixed_caption": "a photo",
        "trigger_word": "zwx",
        "file_captions_used": False,
    }


# (entries or raw bytes, form fields, status, code)
REFUSALS: dict[str, tuple[bytes, dict[str, str], int, str]] = {
    "traversal": (
        zip_bytes([("../evil.png", image_bytes(1)), ("../evil.txt", b"x")]),
        {},
        422,
        "unsafe_path",
    ),
    "absolute": (zip_bytes([("/etc/evil.png", image_bytes(1))]), {}, 422, "unsafe_path"),
    "not_a_zip": (b"just some text, not an archive", {}, 415, "not_a_zip"),
    "truncated": (zip_bytes(PAIRS)[:200], {}, 422, "corrupt_archive"),
    "bad_caption": (zip_bytes(PAIRS), {"caption": "bad\x07bell"}, 422, "invalid_caption"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_uploads_store_nothing(
    client: TestClient, stack: Stack, auth: dict[str, str], case: str
) -> None:
    data, fields, status, code = REFUSALS[case]
    before = _stored(client, stack)
    assert_problem(_upload(client, auth, data, **fields), status, code)
    assert _stored(client, stack) == before


def test_no_usable_pairs_is_422_with_the_report(
    client: TestClient, stack: Stack, auth: dict[str, str]
) -> None:
    before = _stored(client, stack)
    response = _upload(client, auth, zip_bytes([("a.png", image_bytes(1)), ("b.png", b"nope")]))
    body = assert_problem(response, 422, "no_usable_pairs")
    assert body["report"]["counts"]["images"] == 1
    assert body["report"]["counts"]["undecodable"] == 1
    assert body["report"]["counts"]["pairs"] == 0
    assert _stored(client, stack) == before


def test_upload_over_the_size_cap_is_413_and_stores_nothing(
    client: TestClient, stack: Stack, auth: dict[str, str]
) -> None:
    big = zip_bytes([("big.png", image_bytes(1, size=(80, 80)))], compression=zipfile.ZIP_STORED)
    assert len(big) > 10_000
    settings = stack.settings.model_copy(update={"max_upload_bytes": 10_000})
    with TestClient(create_app(settings)) as small:
        before = _stored(client, stack)
        body = assert_problem(_upload(small, auth, big), 413, "upload_too_large")
        assert body["max_upload_bytes"] == 10_000
        assert _stored(client, stack) == before
        # The same app takes an upload under the cap.
        assert _upload(small, auth, zip_bytes(PAIRS)).status_code == 201


def test_spooling_stops_at_the_upload_cap(tmp_path: Path) -> None:
    """The route's own count (behind the middleware, which normally refuses first)."""
    store = ArtifactStore(tmp_path / "artifacts")
    limits = DatasetLimits(max_upload_bytes=1000)
    source = io.BytesIO(b"x" * 1001)
    with (
        pytest.raises(DatasetUploadRejected) as refused,
        spooled_upload(source, store=store, limits=limits),
    ):
        pass
    assert (refused.value.status, refused.value.code) == (413, "upload_too_large")
    assert list((store.root / ".tmp").iterdir()) == []
    with spooled_upload(io.BytesIO(b"y" * 1000), store=store, limits=limits) as upload:
        assert upload.size == 1000 and upload.path.read_bytes() == b"y" * 1000
        assert upload.sha256 == hashlib.sha256(b"y" * 1000).hexdigest()
    assert list((store.root / ".tmp").iterdir()) == []


def test_malformed_requests_are_problem_json(client: TestClient, auth: dict[str, str]) -> None:
    assert_problem(
        client.post("/datasets", headers=auth, json={"name": "x"}), 415, "unsupported_media_type"
    )
    missing = client.post("/datasets", headers=auth, files={"file": ("a.zip", zip_bytes(PAIRS))})
    assert assert_problem(missing, 422, "validation_error")["errors"][0]["field"] == "name"
    blank = _upload(client, auth, zip_bytes(PAIRS), name="   ")
    assert assert_problem(blank, 422, "validation_error")["errors"][0]["field"] == "name"
    no_boundary = client.post(
        "/datasets", headers={**auth, "content-type": "multipart/form-data"}, content=b"--x\r\n"
    )
    assert no_boundary.status_code == 400
    assert no_boundary.headers["content-type"].startswith("application/problem+json")


def test_dataset_routes_need_a_key(client: TestClient) -> None:
    for method, path in [
        ("POST", "/datasets"),
        ("GET", "/datasets"),
        ("GET", "/datasets/ds_x"),
        ("GET", "/datasets/ds_x/images/0"),
        ("DELETE", "/datasets/ds_x"),
    ]:
        assert_problem(client.request(method, path), 401, "unauthorized")


def test_thumbnails(client: TestClient, auth: dict[str, str]) -> None:
    entries: list[Entry] = [
        ("a.png", image_bytes(1, size=(600, 300))),
        ("a.txt", b"wide"),
        ("b.jpg", image_bytes(2, size=(40, 80), fmt="JPEG")),
        ("b.txt", b"tall"),
    ]
    dataset = _created(client, auth, entries)
    first = client.get(f"/datasets/{dataset['id']}/images/0", headers=auth)
    assert first.status_code == 200
    assert first.headers["content-type"] == "image/jpeg"
    assert "private" in first.headers["cache-control"]
    with Image.open(io.BytesIO(first.content)) as thumb:
        assert (thumb.format, thumb.size) == ("JPEG", (256, 128))
    small = client.get(f"/datasets/{dataset['id']}/images/0?size=64", headers=auth)
    with Image.open(io.BytesIO(small.content)) as thumb:
        assert thumb.size == (64, 32)
    with Image.open(
        io.BytesIO(client.get(f"/datasets/{dataset['id']}/images/1", headers=auth).content)
    ) as thumb:
        assert thumb.size == (40, 80)  # never enlarged
    past = client.get(f"/datasets/{dataset['id']}/images/2", headers=auth)
    assert "2 image(s)" in assert_problem(past, 404, "not_found")["detail"]
    negative = client.get(f"/datasets/{dataset['id']}/images/-1", headers=auth)
    assert_problem(negative, 422, "validation_error")
    assert_problem(client.get("/datasets/ds_nope/images/0", headers=auth), 404, "not_found")


def test_delete_removes_files_and_hides_the_dataset(
    client: TestClient, stack: Stack, auth: dict[str, str]
) -> None:
    dataset = _created(client, auth)
    folder = _store(client).path(f"datasets/{dataset['id']}")
    assert folder.is_dir()
    response = client.delete(f"/datasets/{dataset['id']}", headers=auth)
    assert response.status_code == 204 and response.content == b""
    assert not folder.exists()
    with stack.session_factory() as session:
        row = session.get(Dataset, dataset["id"])
        assert row is not None and row.status == "deleted"
    for method, path in [
        ("GET", f"/datasets/{dataset['id']}"),
        ("GET", f"/datasets/{dataset['id']}/images/0"),
        ("DELETE", f"/datasets/{dataset['id']}"),
    ]:
        assert_problem(client.request(method, path, headers=auth), 404, "not_found")
    listed = client.get("/datasets", headers=auth).json()["data"]
    assert dataset["id"] not in [d["id"] for d in listed]


@pytest.mark.parametrize("status", ["queued", "running", "cancel_requested"])
def test_delete_while_an_active_job_uses_it_is_409(
    client: TestClient, stack: Stack, auth: dict[str, str], status: str
) -> None:
    dataset = _created(client, auth)
    with stack.session_factory() as session:
        row = session.get(Dataset, dataset["id"])
        assert row is not None
        job = Job(
            tenant_id=row.tenant_id, kind="train", queue="train", dataset_id=row.id, status=status
        )
        session.add(job)
        session.commit()
        job_id = job.id
    body = assert_problem(
        client.delete(f"/datasets/{dataset['id']}", headers=auth), 409, "dataset_in_use"
    )
    assert body["job_ids"] == [job_id]
    assert client.get(f"/datasets/{dataset['id']}", headers=auth).status_code == 200
    assert _store(client).path(f"datasets/{dataset['id']}/manifest.json").is_file()

    with stack.session_factory() as session:
        finished = session.get(Job, job_id)
        assert finished is not None
        finished.status = JobStatus.FAILED.value
        session.commit()
    assert client.delete(f"/datasets/{dataset['id']}", headers=auth).status_code == 204
    with stack.session_factory() as session:
        still = session.get(Job, job_id)
        assert still is not None and still.dataset_id == dataset["id"]


def test_idempotency_key_repeats_answer_the_first_dataset(
    client: TestClient, stack: Stack, auth: dict[str, str], other_auth: dict[str, str]
) -> None:
    data = zip_bytes(PAIRS)
    keyed = {**auth, "Idempotency-Key": "upload-1"}
    first = _upload(client, keyed, data)
    assert first.status_code == 201
    before = _stored(client, stack)

    again = _upload(client, keyed, data)
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert _stored(client, stack) == before

    changed = _upload(client, keyed, data, name="another name")
    assert_problem(changed, 422, "idempotency_key_reused")
    other_zip = _upload(client, keyed, zip_bytes(PAIRS[:2]))
    assert_problem(other_zip, 422, "idempotency_key_reused")
    assert _stored(client, stack) == before

    # Keys belong to a tenant: the same key elsewhere is a new request.
    theirs = _upload(client, {**other_auth, "Idempotency-Key": "upload-1"}, data)
    assert theirs.status_code == 201 and theirs.json()["id"] != first.json()["id"]

    # After a delete, the key answers 404 rather than re-creating the dataset.
    assert client.delete(f"/datasets/{first.json()['id']}", headers=auth).status_code == 204
    assert_problem(_upload(client, keyed, data), 404, "not_found")

    too_long = _upload(client, {**auth, "Idempotency-Key": "k" * 201}, data)
    assert_problem(too_long, 422, "validation_error")


def test_another_tenants_dataset_is_404_everywhere(
    client: TestClient, auth: dict[str, str], other_auth: dict[str, str]
) -> None:
    dataset = _created(client, auth)
    for method, path in [
        ("GET", f"/datasets/{dataset['id']}"),
        ("GET", f"/datasets/{dataset['id']}/images/0"),
        ("DELETE", f"/datasets/{dataset['id']}"),
    ]:
        assert_problem(client.request(method, path, headers=other_auth), 404, "not_found")
    assert client.get("/datasets", headers=other_auth).json() == {"data": [], "has_more": False}
    assert client.get(f"/datasets/{dataset['id']}", headers=auth).status_code == 200


def test_list_pages_newest_first(client: TestClient, auth: dict[str, str]) -> None:
    ids = [_created(client, auth)["id"] for _ in range(3)]
    first = client.get("/datasets?limit=2", headers=auth).json()
    assert [d["id"] for d in first["data"]] == ids[::-1][:2]
    assert first["has_more"] is True
    assert all("report" not in d for d in first["data"])
    rest = client.get(f"/datasets?limit=2&after={first['data'][-1]['id']}", headers=auth).json()
    assert [d["id"] for d in rest["data"]] == [ids[0]]
    assert rest["has_more"] is False


def _tenant(stack: Stack) -> str:
    with transaction(stack.session_factory) as session:
        return get_or_create_tenant(session, f"ds-{secrets.token_hex(4)}").id


def _create_directly(
    client: TestClient, *, tenant_id: str, data: bytes, idempotency_key: str | None = None
) -> DatasetCreation:
    """create_dataset with the app's own store and sessions, as the route calls it."""
    state = client.app.state  # type: ignore[attr-defined]
    uow = UnitOfWork(session=state.session_factory())
    limits = DatasetLimits()
    try:
        with spooled_upload(io.BytesIO(data), store=state.store, limits=limits) as upload:
            return create_dataset(
                uow,
                store=state.store,
                tenant_id=tenant_id,
                request=NewDataset(name="direct"),
                upload=upload,
                limits=limits,
                idempotency_key=idempotency_key,
            )
    finally:
        uow.session.close()


def test_a_failed_insert_removes_the_written_files(client: TestClient, stack: Stack) -> None:
    before = _stored(client, stack)
    # No such tenant: the row's foreign key fails after ingest has written the folder.
    with pytest.raises(IntegrityError):
        _create_directly(client, tenant_id="tn_missing", data=zip_bytes(PAIRS))
    assert _stored(client, stack) == before


def test_concurrent_uploads_with_one_key_store_one_dataset(
    client: TestClient, stack: Stack
) -> None:
    tenant_id = _tenant(stack)
    entries: list[Entry] = [(f"{i}.png", image_bytes(i, size=(64, 64))) for i in range(12)]
    data = zip_bytes([*entries, *((f"{i}.txt", b"a caption") for i in range(12))])
    before = _stored(client, stack)
    barrier = threading.Barrier(2)

    def upload_once() -> DatasetCreation:
        barrier.wait()
        return _create_directly(client, tenant_id=tenant_id, data=data, idempotency_key="same")

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = [f.result() for f in [pool.submit(upload_once) for _ in range(2)]]
    assert results[0].dataset.id == results[1].dataset.id
    assert sorted(r.replayed for r in results) == [False, True]
    after = _stored(client, stack)
    assert after[0] == before[0] + 1 and after[1] == before[1] + 1
    assert after[2] == sorted([*before[2], results[0].dataset.id]) and after[3] == before[3]
