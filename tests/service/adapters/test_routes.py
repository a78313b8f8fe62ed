"""The adapter registry over HTTP: real SQL, real files on the tiny model, real diffusers loads."""

from __future__ import annotations

import hashlib
import io
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from fastapi.testclient import TestClient
from safetensors import safe_open
from safetensors.numpy import load as load_numpy
from safetensors.numpy import save as save_numpy
from safetensors.torch import save as save_torch
from sqlalchemy import func, select

from lorafile import AdapterLintError
from service.adapters.imports import read_upload
from service.adapters.refs import resolve_ref
from service.adapters.routes import lint_problem
from service.auth import authenticate
from service.db import transaction
from service.errors import NotFound, PayloadTooLarge, Unprocessable
from service.models import (
    Adapter,
    AdapterAlias,
    AdapterAliasEvent,
    AdapterVersion,
    IdempotencyKey,
    Job,
    JobKind,
    JobStatus,
)
from tests.conftest import Stack, upload_dataset, wait_for
from tests.fixtures.lora_sources import (
    UNET_ALPHA,
    UNET_RANK,
    Pipeline,
    SourceLora,
    fresh_pipeline,
    model_output,
)
from tests.service.test_app import assert_problem

ATOL = 1e-5
MID_TO_K = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"  # Linear 32 -> 64
Headers = dict[str, str]


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack_pipe(tiny_model_dir: Path) -> Pipeline:
    """The base model the stack serves as "tiny", loaded by plain diffusers."""
    return StableDiffusionPipeline.from_pretrained(tiny_model_dir)


def import_file(
    client: TestClient,
    auth: Headers,
    data: bytes,
    *,
    name: str,
    base_model: str = "tiny",
    filename: str = "lora.safetensors",
    headers: Headers | None = None,
) -> Any:
    return client.post(
        "/adapters/import",
        headers={**auth, **(headers or {})},
        data={"name": name, "base_model": base_model},
        files={"file": (filename, data, "application/octet-stream")},
    )


def imported(client: TestClient, auth: Headers, data: bytes, *, name: str) -> dict[str, Any]:
    response = import_file(client, auth, data, name=name)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def download(
    client: TestClient, auth: Headers, name: str, version: str | int, fmt: str = "diffusers"
) -> bytes:
    response = client.get(
        f"/adapters/{name}/versions/{version}/download?format={fmt}", headers=auth
    )
    assert response.status_code == 200, response.text
    return response.content


def header_metadata(data: bytes) -> dict[str, str]:
    length = struct.unpack("<Q", data[:8])[0]
    metadata: dict[str, str] = json.loads(data[8 : 8 + length]).get("__metadata__", {})
    return metadata


def load_into(pipe: Pipeline, path: Path) -> torch.Tensor:
    """UNet + text encoder output with the LoRA file loaded by plain ``load_lora_weights``."""
    fresh = fresh_pipeline(pipe)
    fresh.load_lora_weights(str(path.parent), weight_name=path.name)
    return model_output(fresh)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def kohya_from(source: SourceLora, *, alpha: float) -> dict[str, np.ndarray]:
    """The source adapter renamed to kohya keys by hand, every module with the same alpha."""
    tensors: dict[str, np.ndarray] = {}
    for key, value in source.tensors.items():
        component, rest = key.split(".", 1)
        module, role, _ = rest.rsplit(".", 2)
        if component == "unet":
            name = "lora_unet_" + module.replace(".", "_")
        else:
            name = "lora_te_text_model_" + module.removeprefix("text_model.").replace(".", "_")
        suffix = "lora_down.weight" if role == "lora_A" else "lora_up.weight"
        tensors[f"{name}.{suffix}"] = value.numpy()
        tensors[f"{name}.alpha"] = np.asarray(alpha, dtype=np.float32)
    return tensors


def key_id(stack: Stack, auth: Headers) -> str:
    with stack.session_factory() as session:
        principal = authenticate(session, auth["Authorization"].removeprefix("Bearer "))
        assert principal is not None
        return principal.key_id


def registry_rows(stack: Stack) -> dict[str, int]:
    with stack.session_factory() as session:
        return {
            model.__tablename__: session.scalar(select(func.count()).select_from(model)) or 0
            for model in (Adapter, AdapterVersion, AdapterAlias, AdapterAliasEvent, IdempotencyKey)
        }


def stored_files(stack: Stack) -> set[str]:
    root = stack.settings.resolved_artifact_dir
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# --- import and download ---------------------------------------------------------------------


def test_import_diffusers_file_publishes_a_version_with_its_report(
    client: TestClient, auth: Headers, source_lora: SourceLora, stack: Stack
) -> None:
    data = source_lora.path.read_bytes()
    # The extension says nothing: the content decides.
    body = import_file(client, auth, data, name="style", filename="weights.ckpt").json()
    assert body["version"] == 1 and body["ref"] == "style@1"
    assert body["source"] == "import" and body["base_model"] == "tiny"
    assert body["aliases"] == ["latest"]
    report = body["report"]
    assert report["format"] == "diffusers" and report["alpha_source"] == "header_metadata"
    assert (report["rank"], report["alpha"]) == (UNET_RANK, UNET_ALPHA)
    assert sorted(report["matched_keys"]) == sorted(source_lora.tensors)
    assert report["errors"] == [] and report["unmatched_keys"] == []
    assert (body["rank"], body["alpha"]) == (UNET_RANK, UNET_ALPHA)
    assert body["trainable_params"] == sum(v.numel() for v in source_lora.tensors.values())
    assert "to_out.0" in body["target_modules"]

    # The stored report comes back with the version, and the file is the canonical one.
    version = client.get("/adapters/style/versions/1", headers=auth).json()
    assert version["lineage"]["lint"] == report
    assert version["lineage"]["upload"]["filename"] == "weights.ckpt"
    assert version["lineage"]["upload"]["format"] == "diffusers"
    stored = stack.settings.resolved_artifact_dir / f"adapters/{body['sha256']}.safetensors"
    assert stored.is_file() and stored.stat().st_size == body["size_bytes"]

    adapter = client.get("/adapters/style", headers=auth).json()
    assert adapter["latest_version"] == 1 and adapter["version_count"] == 1
    assert [v["version"] for v in adapter["versions"]] == [1]
    assert adapter["alias_history"][0]["alias"] == "latest"
    assert adapter["alias_history"][0]["to_version"] == 1


def test_downloaded_diffusers_file_loads_in_plain_diffusers(
    client: TestClient,
    auth: Headers,
    source_lora: SourceLora,
    stack_pipe: Pipeline,
    tmp_path: Path,
) -> None:
    imported(client, auth, source_lora.path.read_bytes(), name="plain")
    data = download(client, auth, "plain", "latest")
    metadata = header_metadata(data)
    assert metadata["lorastack_base_model"] == "tiny"
    assert metadata["lorastack_rank"] == str(UNET_RANK)
    assert metadata["lorastack_alpha"] == str(UNET_ALPHA)
    assert "to_q" in json.loads(metadata["lorastack_target_modules"])
    assert metadata["lorastack_version"]

    base_output = model_output(fresh_pipeline(stack_pipe))
    downloaded_output = load_into(stack_pipe, write(tmp_path, "dl.safetensors", data))
    assert (downloaded_output - base_output).abs().max() > 100 * ATOL
    # The download is the canonical file (its own key names and alpha), not the uploaded bytes:
    # float32 rounding differs by up to ~1.5e-5 on this output (seen once in CI at 1e-5).
    torch.testing.assert_close(
        downloaded_output, load_into(stack_pipe, source_lora.path), atol=4 * ATOL, rtol=1e-5
    )


def test_kohya_download_imports_back_to_the_same_tensors_and_alphas(
    client: TestClient, auth: Headers, source_lora: SourceLora
) -> None:
    original = imported(client, auth, source_lora.path.read_bytes(), name="orig")
    kohya = download(client, auth, "orig", 1, fmt="kohya")
    metadata = header_metadata(kohya)
    assert metadata["lorastack_base_model"] == "tiny"
    assert metadata["ss_network_alpha"] == str(UNET_ALPHA)
    assert metadata["lorastack_version"] and metadata["lorastack_target_modules"]
    kohya_tensors = load_numpy(kohya)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in kohya_tensors)

    again = imported(client, auth, kohya, name="again")
    assert again["report"]["format"] == "kohya"
    assert again["report"]["alpha_source"] == "tensors"
    assert again["report"]["alphas"] == original["report"]["alphas"]
    assert again["report"]["ranks"] == original["report"]["ranks"]
    first, second = (load_numpy(download(client, auth, n, 1)) for n in ("orig", "again"))
    assert first.keys() == second.keys()
    for key, value in first.items():
        np.testing.assert_array_equal(second[key], value)
    # Same bytes, same metadata: the round trip reproduces the canonical file exactly.
    assert again["sha256"] == original["sha256"]


def test_kohya_import_loads_like_diffusers_own_kohya_loader(
    client: TestClient,
    auth: Headers,
    source_lora: SourceLora,
    stack_pipe: Pipeline,
    tmp_path: Path,
) -> None:
    kohya = save_numpy(kohya_from(source_lora, alpha=2.0))
    body = imported(client, auth, kohya, name="from-kohya")
    assert body["report"]["format"] == "kohya" and body["alpha"] == 2.0
    canonical = download(client, auth, "from-kohya", 1)
    ours = load_into(stack_pipe, write(tmp_path, "canonical.safetensors", canonical))
    theirs = load_into(stack_pipe, write(tmp_path, "kohya.safetensors", kohya))
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=1e-5)
    assert (ours - model_output(fresh_pipeline(stack_pipe))).abs().max() > 100 * ATOL


def test_a_second_kohya_download_reads_the_cached_file(
    client: TestClient, auth: Headers, source_lora: SourceLora, stack: Stack
) -> None:
    body = imported(client, auth, source_lora.path.read_bytes(), name="cached")
    first = client.get("/adapters/cached/versions/1/download?format=kohya", headers=auth)
    # Found by the source file's sha256, named by its own (the ETag).
    derived = [
        p
        for p in stack.settings.resolved_artifact_dir.rglob("*.safetensors")
        if p.stem == first.headers["etag"].strip('"')
    ]
    assert len(derived) == 1
    assert derived[0].parent.name == body["sha256"] and derived[0].parent.parent.name == "kohya"
    mtime = derived[0].stat().st_mtime_ns
    second = client.get("/adapters/cached/versions/1/download?format=kohya", headers=auth)
    assert second.content == first.content and second.headers["etag"] == first.headers["etag"]
    assert derived[0].stat().st_mtime_ns == mtime  # read, not rewritten


# --- refused files ---------------------------------------------------------------------------


def _torch_zip() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buffer)
    return buffer.getvalue()


def _torch_legacy_pickle() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def _huge_header() -> bytes:
    header = {
        f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
        for i in range(100_000)
    }
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + bytes(400_000)


def _wrong_shapes(source: SourceLora) -> bytes:
    tensors = {k: v.clone() for k, v in source.tensors.items()}
    # in_features 64 does not fit the base's 32.
    tensors[f"{MID_TO_K}.lora_A.weight"] = torch.ones(UNET_RANK, 64)
    return save_torch(tensors)


def _no_matching_keys(source: SourceLora) -> bytes:
    renamed = {k.replace("unet.", "unet.sdxl_only.", 1): v for k, v in source.tensors.items()}
    return save_torch({k: v for k, v in renamed.items() if k.startswith("unet.")})


BAD_FILES: dict[str, tuple[Any, int, str]] = {
    "truncated": (lambda s: s.path.read_bytes()[:-10], 422, "truncated"),
    "header_longer_than_file": (
        lambda s: struct.pack("<Q", 10_000) + b'{"a": {"dtype": "F32"',
        422,
        "header_exceeds_file",
    ),
    "renamed_torch_zip": (lambda s: _torch_zip(), 415, "not_safetensors"),
    "renamed_legacy_pickle": (lambda s: _torch_legacy_pickle(), 415, "not_safetensors"),
    "100k_tensor_header": (lambda s: _huge_header(), 422, "header_too_large"),
    "wrong_shapes": (_wrong_shapes, 422, "shape_mismatch"),
    "no_matching_keys": (_no_matching_keys, 422, "no_matching_modules"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_refused_with_a_report_and_nothing_is_stored(
    case: str, client: TestClient, auth: Headers, source_lora: SourceLora, stack: Stack
) -> None:
    make, status, code = BAD_FILES[case]
    data = make(source_lora)
    rows, files = registry_rows(stack), stored_files(stack)
    response = import_file(
        client, auth, data, name="bad", headers={"Idempotency-Key": f"bad-{case}"}
    )
    body = assert_problem(response, status, code)
    assert body["report"]["errors"], body
    assert body["detail"].startswith("file:")
    assert registry_rows(stack) == rows
    assert stored_files(stack) == files
    assert_problem(client.get("/adapters/bad", headers=auth), 404, "adapter_not_found")


def test_an_oversized_upload_is_refused_while_it_is_read() -> None:
    with pytest.raises(AdapterLintError) as caught:
        read_upload(io.BytesIO(bytes(3 << 20)), max_bytes=2 << 20)
    problem = lint_problem(caught.value)
    assert isinstance(problem, PayloadTooLarge)
    assert problem.code == "too_large"
    assert problem.extra["report"]["errors"]
    assert read_upload(io.BytesIO(b"12345"), max_bytes=5) == b"12345"


def test_import_validates_name_and_base_model(
    client: TestClient, auth: Headers, source_lora: SourceLora, stack: Stack
) -> None:
    data = source_lora.path.read_bytes()
    body = assert_problem(
        import_file(client, auth, data, name="Bad Name"), 422, "invalid_adapter_name"
    )
    assert body["errors"][0]["field"] == "name"
    body = assert_problem(
        import_file(client, auth, data, name="ok", base_model="sdxl"), 422, "unknown_base_model"
    )
    assert body["errors"][0]["field"] == "base_model"
    imported(client, auth, data, name="on-tiny")
    with transaction(stack.session_factory) as session:
        adapter = session.scalar(select(Adapter).where(Adapter.name == "on-tiny"))
        assert adapter is not None
        adapter.base_model = "sd15"  # as if it had been made for another base model
    body = assert_problem(
        import_file(client, auth, data, name="on-tiny"), 422, "base_model_mismatch"
    )
    assert "sd15" in body["detail"]


def test_import_with_an_idempotency_key_publishes_once(
    client: TestClient, auth: Headers, source_lora: SourceLora
) -> None:
    data = source_lora.path.read_bytes()
    key = {"Idempotency-Key": "import-once"}
    first = import_file(client, auth, data, name="idem", headers=key)
    again = import_file(client, auth, data, name="idem", headers=key)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert client.get("/adapters/idem", headers=auth).json()["version_count"] == 1
    other = import_file(client, auth, data, name="idem-2", headers=key)
    assert_problem(other, 422, "idempotency_key_reused")


# --- conditional and range requests ----------------------------------------------------------


def test_download_etag_range_and_disposition(
    client: TestClient, auth: Headers, source_lora: SourceLora
) -> None:
    body = imported(client, auth, source_lora.path.read_bytes(), name="ranged")
    url = "/adapters/ranged/versions/latest/download"
    full = client.get(url, headers=auth)
    assert full.status_code == 200
    etag = full.headers["etag"]
    assert etag == f'"{body["sha256"]}"'
    assert hashlib.sha256(full.content).hexdigest() == body["sha256"]
    assert full.headers["accept-ranges"] == "bytes"
    assert full.headers["content-length"] == str(body["size_bytes"])
    assert full.headers["content-disposition"] == (
        'attachment; filename="ranged-v1-diffusers.safetensors"'
    )
    kohya = client.get(url + "?format=kohya", headers=auth)
    assert kohya.headers["content-disposition"].endswith('"ranged-v1-kohya.safetensors"')
    assert kohya.headers["etag"] == f'"{hashlib.sha256(kohya.content).hexdigest()}"'
    assert kohya.headers["etag"] != etag

    not_modified = client.get(url, headers={**auth, "If-None-Match": etag})
    assert not_modified.status_code == 304 and not_modified.content == b""
    assert not_modified.headers["etag"] == etag
    changed = client.get(url, headers={**auth, "If-None-Match": '"something-else"'})
    assert changed.status_code == 200

    size = len(full.content)
    part = client.get(url, headers={**auth, "Range": "bytes=10-109"})
    assert part.status_code == 206
    assert part.content == full.content[10:110]
    assert part.headers["content-range"] == f"bytes 10-109/{size}"
    assert part.headers["content-length"] == "100"
    tail = client.get(url, headers={**auth, "Range": "bytes=-16"})
    assert tail.status_code == 206 and tail.content == full.content[-16:]
    rest = client.get(url, headers={**auth, "Range": f"bytes={size - 5}-"})
    assert rest.content == full.content[-5:]
    stale = client.get(url, headers={**auth, "Range": "bytes=0-9", "If-Range": '"old"'})
    assert stale.status_code == 200 and stale.content == full.content

    outside = client.get(url, headers={**auth, "Range": f"bytes={size}-"})
    assert_problem(outside, 416, "range_not_satisfiable")
    assert outside.headers["content-range"] == f"bytes */{size}"
    bad_format = client.get(url + "?format=ckpt", headers=auth)
    assert_problem(bad_format, 422, "validation_error")


# --- aliases and refs ------------------------------------------------------------------------


def test_aliases_move_with_history_and_refs_resolve(
    client: TestClient, auth: Headers, source_lora: SourceLora, stack: Stack
) -> None:
    data = source_lora.path.read_bytes()
    for _ in range(3):
        imported(client, auth, data, name="aliased")
    put = client.put("/adapters/aliased/aliases/prod", headers=auth, json={"version": 1})
    assert put.status_code == 200, put.text
    assert put.json()["version"] == 1 and put.json()["alias"] == "prod"
    assert (
        client.put("/adapters/aliased/aliases/prod", headers=auth, json={"version": 2}).json()[
            "version"
        ]
        == 2
    )
    assert client.get("/adapters/aliased/versions/prod", headers=auth).json()["version"] == 2

    adapter = client.get("/adapters/aliased", headers=auth).json()
    assert adapter["aliases"] == {"latest": 3, "prod": 2}
    prod_moves = [e for e in adapter["alias_history"] if e["alias"] == "prod"]
    assert [(e["from_version"], e["to_version"]) for e in prod_moves] == [(1, 2), (None, 1)]
    assert prod_moves[0]["actor"] == key_id(stack, auth)

    # Rollback is one PUT to the version the history names.
    rollback = client.put(
        "/adapters/aliased/aliases/prod",
        headers=auth,
        json={"version": prod_moves[0]["from_version"]},
    )
    assert rollback.json()["version"] == 1
    with transaction(stack.session_factory) as session:
        tenant_id = session.scalar(select(Adapter.tenant_id).where(Adapter.id == adapter["id"]))
        assert tenant_id is not None
        for ref, expected in [("aliased", 3), ("aliased@2", 2), ("aliased@prod", 1)]:
            _, version = resolve_ref(session, tenant_id=tenant_id, ref=ref)
            assert version.version == expected, ref
        with pytest.raises(NotFound) as missing:
            resolve_ref(session, tenant_id=tenant_id, ref="aliased@staging")
        assert "aliased@staging" in missing.value.detail
        with pytest.raises(NotFound):
            resolve_ref(session, tenant_id=tenant_id, ref="aliased@9")
        for malformed in ("Aliased", "aliased@", "aliased@prod@1", "a b", ""):
            with pytest.raises(Unprocessable):
                resolve_ref(session, tenant_id=tenant_id, ref=malformed)

    version_one = client.get("/adapters/aliased/versions/1", headers=auth).json()
    assert version_one["aliases"] == ["prod"]
    for alias, code in [("latest", "reserved_alias"), ("123", "invalid_alias")]:
        response = client.put(
            f"/adapters/aliased/aliases/{alias}", headers=auth, json={"version": 1}
        )
        assert_problem(response, 422, code)
    assert_problem(
        client.delete("/adapters/aliased/aliases/latest", headers=auth), 422, "reserved_alias"
    )
    assert_problem(
        client.put("/adapters/aliased/aliases/Prod", headers=auth, json={"version": 1}),
        422,
        "invalid_alias",
    )
    missing_version = client.put(
        "/adapters/aliased/aliases/prod", headers=auth, json={"version": 9}
    )
    assert_problem(missing_version, 422, "version_not_found")
    assert client.delete("/adapters/aliased/aliases/prod", headers=auth).status_code == 204
    assert_problem(
        client.get("/adapters/aliased/versions/prod", headers=auth), 404, "version_not_found"
    )
    assert_problem(
        client.delete("/adapters/aliased/aliases/prod", headers=auth), 404, "alias_not_found"
    )
    history = client.get("/adapters/aliased", headers=auth).json()["alias_history"]
    assert (history[0]["alias"], history[0]["from_version"], history[0]["to_version"]) == (
        "prod",
        1,
        None,
    )


# --- deletes ---------------------------------------------------------------------------------


def test_delete_version_refuses_pinned_versions_unless_forced(
    client: TestClient, auth: Headers, source_lora: SourceLora, stack: Stack
) -> None:
    unique = {k: v * 1.5 for k, v in source_lora.tensors.items()}
    first = imported(client, auth, save_torch(unique), name="deleting")
    imported(client, auth, source_lora.path.read_bytes(), name="deleting")
    imported(client, auth, source_lora.path.read_bytes(), name="deleting")
    client.put("/adapters/deleting/aliases/prod", headers=auth, json={"version": 1})
    client.put("/adapters/deleting/aliases/canary", headers=auth, json={"version": 1})

    conflict = assert_problem(
        client.delete("/adapters/deleting/versions/1", headers=auth), 409, "version_aliased"
    )
    assert conflict["aliases"] == ["canary", "prod"]
    forced = client.delete("/adapters/deleting/versions/prod?force=true", headers=auth)
    assert forced.status_code == 204
    adapter = client.get("/adapters/deleting", headers=auth).json()
    assert [v["version"] for v in adapter["versions"]] == [2, 3]
    assert adapter["aliases"] == {"latest": 3}
    removed = {e["alias"] for e in adapter["alias_history"] if e["to_version"] is None}
    assert removed == {"prod", "canary"}
    # The file only version 1 used is gone; the shared one stays.
    assert f"adapters/{first['sha256']}.safetensors" not in stored_files(stack)

    # Deleting the newest moves latest back; numbers are never reused.
    assert client.delete("/adapters/deleting/versions/latest", headers=auth).status_code == 204
    assert client.get("/adapters/deleting", headers=auth).json()["aliases"] == {"latest": 2}
    assert client.delete("/adapters/deleting/versions/2", headers=auth).status_code == 204
    emptied = client.get("/adapters/deleting", headers=auth).json()
    assert emptied["aliases"] == {} and emptied["latest_version"] is None
    assert imported(client, auth, source_lora.path.read_bytes(), name="deleting")["version"] == 4
    assert_problem(
        client.delete("/adapters/deleting/versions/2", headers=auth), 404, "version_not_found"
    )


def test_delete_adapter_waits_for_its_training_job(
    client: TestClient, auth: Headers, source_lora: SourceLora, stack: Stack
) -> None:
    imported(client, auth, source_lora.path.read_bytes(), name="doomed")
    with transaction(stack.session_factory) as session:
        tenant_id = session.scalar(select(Adapter.tenant_id).where(Adapter.name == "doomed"))
        job = Job(
            tenant_id=tenant_id,
            kind=JobKind.TRAIN.value,
            queue="train",
            status=JobStatus.RUNNING.value,
            base_model="tiny",
            adapter_name="doomed",
        )
        session.add(job)
        session.flush()
        job_id = job.id
    conflict = assert_problem(
        client.delete("/adapters/doomed", headers=auth), 409, "adapter_in_training"
    )
    assert conflict["job_id"] == job_id
    with transaction(stack.session_factory) as session:
        row = session.get(Job, job_id)
        assert row is not None
        row.status = JobStatus.CANCELLED.value
    assert client.delete("/adapters/doomed", headers=auth).status_code == 204
    assert_problem(client.get("/adapters/doomed", headers=auth), 404, "adapter_not_found")
    with stack.session_factory() as session:
        left = session.scalar(
            select(func.count())
            .select_from(AdapterVersion)
            .where(AdapterVersion.tenant_id == tenant_id)
        )
        assert left == 0


# --- lists and tenancy -----------------------------------------------------------------------


def test_list_pages_and_filters(client: TestClient, auth: Headers, source_lora: SourceLora) -> None:
    data = source_lora.path.read_bytes()
    for name in ("cat-a", "cat-b", "dog"):
        imported(client, auth, data, name=name)
    first = client.get("/adapters?limit=2", headers=auth).json()
    assert [a["name"] for a in first["data"]] == ["dog", "cat-b"] and first["has_more"]
    assert first["data"][0]["latest_version"] == 1 and first["data"][0]["version_count"] == 1
    rest = client.get(f"/adapters?limit=2&after={first['data'][-1]['id']}", headers=auth).json()
    assert [a["name"] for a in rest["data"]] == ["cat-a"] and not rest["has_more"]
    cats = client.get("/adapters?prefix=cat-", headers=auth).json()
    assert [a["name"] for a in cats["data"]] == ["cat-b", "cat-a"]
    assert client.get("/adapters?prefix=c%25", headers=auth).json()["data"] == []
    assert len(client.get("/adapters?base_model=tiny", headers=auth).json()["data"]) == 3
    assert client.get("/adapters?base_model=other", headers=auth).json()["data"] == []


def test_another_tenants_adapter_is_404_on_every_route(
    client: TestClient,
    auth: Headers,
    other_auth: Headers,
    source_lora: SourceLora,
) -> None:
    data = source_lora.path.read_bytes()
    imported(client, auth, data, name="mine")
    client.put("/adapters/mine/aliases/prod", headers=auth, json={"version": 1})
    routes: list[tuple[str, str, dict[str, int] | None]] = [
        ("GET", "/adapters/mine", None),
        ("GET", "/adapters/mine/versions/1", None),
        ("GET", "/adapters/mine/versions/prod", None),
        ("GET", "/adapters/mine/versions/1/download", None),
        ("GET", "/adapters/mine/versions/1/download?format=kohya", None),
        ("PUT", "/adapters/mine/aliases/prod", {"version": 1}),
        ("DELETE", "/adapters/mine/aliases/prod", None),
        ("DELETE", "/adapters/mine/versions/1?force=true", None),
        ("DELETE", "/adapters/mine", None),
    ]
    for method, path, body in routes:
        response = client.request(method, path, headers=other_auth, json=body)
        assert_problem(response, 404, "adapter_not_found")
    assert client.get("/adapters", headers=other_auth).json()["data"] == []
    # Names are per tenant: the other tenant's "mine" is its own adapter.
    theirs = imported(client, other_auth, data, name="mine")
    assert theirs["version"] == 1
    assert client.get("/adapters/mine", headers=auth).json()["aliases"] == {
        "latest": 1,
        "prod": 1,
    }


# --- promoting a checkpoint of a real training job -------------------------------------------


@pytest.fixture
def trained_job(
    client: TestClient, auth: Headers, worker: Any, stack: Stack
) -> Iterator[dict[str, Any]]:
    dataset_id = upload_dataset(client, auth, count=2)
    response = client.post(
        "/jobs",
        headers=auth,
        json={
            "dataset_id": dataset_id,
            "base_model": "tiny",
            "adapter_name": "trained",
            "hyperparameters": {
                "resolution": 64,
                "rank": 4,
                "max_steps": 2,
                "checkpoint_every": 1,
                "seed": 0,
            },
        },
    )
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]

    def finished() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/jobs/{job_id}", headers=auth).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    job = wait_for(finished, timeout=180, what=f"training job {job_id}", interval=0.5)
    assert job["status"] == "succeeded", job
    yield job


def test_promote_a_training_checkpoint(
    client: TestClient,
    auth: Headers,
    other_auth: Headers,
    trained_job: dict[str, Any],
    stack: Stack,
) -> None:
    job_id = trained_job["id"]
    steps = [
        c["step"] for c in client.get(f"/jobs/{job_id}/checkpoints", headers=auth).json()["data"]
    ]
    assert 1 in steps, steps
    assert trained_job["result"]["version"] == 1

    promoted = client.post(f"/jobs/{job_id}/checkpoints/1/promote", headers=auth)
    assert promoted.status_code == 201, promoted.text
    body = promoted.json()
    assert (body["adapter"], body["version"], body["created"]) == ("trained", 2, True)
    assert body["source"] == "checkpoint" and body["checkpoint_step"] == 1
    assert body["lineage"]["job_id"] == job_id
    assert body["lineage"]["dataset_id"] == trained_job["dataset_id"]
    assert body["lineage"]["hyperparameters"]["rank"] == 4
    assert body["rank"] == 4 and body["alpha"] == 4.0
    assert body["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]
    assert body["aliases"] == ["latest"]

    # The promoted file is the checkpoint's weights in the canonical diffusers form.
    weights = (
        stack.settings.resolved_artifact_dir
        / f"jobs/{job_id}/checkpoints/checkpoint-1/pytorch_lora_weights.safetensors"
    )
    stored_path = stack.settings.resolved_artifact_dir / f"adapters/{body['sha256']}.safetensors"
    with safe_open(str(weights), "np") as ckpt, safe_open(str(stored_path), "np") as canon:
        assert len(list(canon.keys())) == len(list(ckpt.keys()))
        for key in canon.keys():  # noqa: SIM118 (safe_open is not a mapping)
            assert key.endswith((".lora_A.weight", ".lora_B.weight"))
            source = key.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")
            if source not in ckpt.keys():  # noqa: SIM118
                source = key
            np.testing.assert_array_equal(canon.get_tensor(key), ckpt.get_tensor(source))
    served = download(client, auth, "trained", 2)
    metadata = header_metadata(served)
    assert metadata["lorastack_base_model"] == "tiny" and metadata["lorastack_rank"] == "4"
    stored = stack.settings.resolved_artifact_dir / f"adapters/{body['sha256']}.safetensors"
    with safe_open(str(stored), "np") as original:
        served_tensors = load_numpy(served)
        assert set(served_tensors) == set(original.keys())
        for key in original.keys():  # noqa: SIM118 (safe_open is not a mapping)
            np.testing.assert_array_equal(served_tensors[key], original.get_tensor(key))
    load_numpy(download(client, auth, "trained", 2, fmt="kohya"))

    again = client.post(f"/jobs/{job_id}/checkpoints/1/promote", headers=auth)
    assert again.status_code == 200 and again.json()["version"] == 2
    assert again.json()["created"] is False
    assert_problem(
        client.post(f"/jobs/{job_id}/checkpoints/99/promote", headers=auth),
        404,
        "checkpoint_not_found",
    )
    assert_problem(
        client.post(f"/jobs/{job_id}/checkpoints/1/promote", headers=other_auth), 404, "not_found"
    )
    adapter = client.get("/adapters/trained", headers=auth).json()
    assert [(v["version"], v["source"]) for v in adapter["versions"]] == [
        (1, "job"),
        (2, "checkpoint"),
    ]
    assert adapter["latest_version"] == 2


def test_version_selectors_that_name_nothing(
    client: TestClient, auth: Headers, source_lora: SourceLora
) -> None:
    imported(client, auth, source_lora.path.read_bytes(), name="selectors")
    for selector in ("2", "0", "9" * 40, "staging"):
        response = client.get(f"/adapters/selectors/versions/{selector}", headers=auth)
        assert_problem(response, 404, "version_not_found")
    body = assert_problem(
        client.get("/adapters/selectors/versions/Prod", headers=auth), 422, "invalid_version"
    )
    assert body["errors"][0]["field"] == "version"
