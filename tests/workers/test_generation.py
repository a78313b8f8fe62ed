"""/generate and the OpenAI images API with a real worker on the tiny model."""

from __future__ import annotations

import base64
import io
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from fastapi.testclient import TestClient
from PIL import Image

from service.auth import authenticate
from service.db import transaction
from service.registry import publish_version
from tests.conftest import Stack, wait_for
from tests.service.test_app import assert_problem

SETTINGS = {"num_inference_steps": 3, "guidance_scale": 5.0, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def lora_files(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from tests.fixtures.random_lora import RandomLoraSpec, RandomLoraWriter

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    writer = RandomLoraWriter(pipe)
    out = tmp_path_factory.mktemp("loras")
    return [
        writer.write(out / "a.safetensors", RandomLoraSpec(rank=4, alpha=8.0), seed=1),
        writer.write(out / "b.safetensors", RandomLoraSpec(rank=8), seed=2),
    ]


def publish(stack: Stack, auth: dict[str, str], name: str, path: Path) -> None:
    with transaction(stack.session_factory) as session:
        principal = authenticate(session, auth["Authorization"].split()[1])
        assert principal is not None
        store = stack.settings
        from service.storage import ArtifactStore

        stored = ArtifactStore(store.resolved_artifact_dir).put_file(
            path, prefix="adapters", suffix=".safetensors"
        )
        publish_version(
            session,
            tenant_id=principal.tenant_id,
            adapter_name=name,
            base_model="tiny",
            source="import",
            stored=stored,
        )


def png(client: TestClient, auth: dict[str, str], image: dict[str, Any]) -> np.ndarray:
    if image.get("b64_json"):
        data = base64.b64decode(image["b64_json"])
    else:
        response = client.get(image["url"].replace("http://testserver", ""), headers=auth)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        data = response.content
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def reference(tiny_model_dir: Path, loras: list[tuple[Path, float]], seed: int) -> np.ndarray:
    """A fresh diffusers pipeline with only these LoRAs loaded the standard way."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    names = []
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
        names.append(f"l{i}")
    if names:
        pipe.set_adapters(names, [w for _, w in loras])
    out = pipe("a red square", generator=torch.Generator().manual_seed(seed), **SETTINGS).images[0]
    return np.asarray(out.convert("RGB"), dtype=np.int16)


def test_generate_with_two_adapters_matches_plain_diffusers(
    client: TestClient,
    auth: dict[str, str],
    stack: Stack,
    worker: subprocess.Popen[bytes],
    lora_files: list[Path],
    tiny_model_dir: Path,
) -> None:
    publish(stack, auth, "alpha", lora_files[0])
    publish(stack, auth, "beta", lora_files[1])
    publish(stack, auth, "beta", lora_files[0])  # beta@2; beta@1 stays addressable
    body = {
        "prompt": "a red square",
        "seed": 7,
        **SETTINGS,
        "adapters": [{"ref": "alpha", "weight": 0.7}, {"ref": "beta@1", "weight": 0.3}],
    }
    response = client.post("/generate", headers=auth, json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["seed"] == 7 and answer["status"] == "succeeded"
    assert [(a["name"], a["version"], a["weight"]) for a in answer["adapters"]] == [
        ("alpha", 1, 0.7),
        ("beta", 1, 0.3),
    ]
    assert {"queue_wait_s", "adapter_switch_s", "denoise_s", "decode_s"} <= set(answer["timings"])
    # The answer (built from the worker's notification) is what SQL holds for the job.
    row = client.get(f"/jobs/{answer['job_id']}", headers=auth).json()
    assert row["status"] == "succeeded" and row["result"]["timings"] == answer["timings"]
    assert [{k: i[k] for k in ("id", "seed", "width", "height")} for i in answer["images"]] == row[
        "result"
    ]["images"]
    ours = png(client, auth, answer["images"][0])
    expected = reference(tiny_model_dir, [(lora_files[0], 0.7), (lora_files[1], 0.3)], 7)
    assert np.abs(ours - expected).max() <= 2
    # The base model is restored exactly after adapters were used.
    base = client.post(
        "/generate",
        headers=auth,
        json={"prompt": "a red square", "seed": 7, **SETTINGS, "response_format": "b64_json"},
    ).json()
    assert (
        np.abs(png(client, auth, base["images"][0]) - reference(tiny_model_dir, [], 7)).max() <= 1
    )
    assert np.abs(png(client, auth, base["images"][0]) - ours).max() > 2  # adapters mattered


def test_wait_zero_answers_202_and_the_job_completes(
    client: TestClient, auth: dict[str, str], worker: subprocess.Popen[bytes]
) -> None:
    response = client.post(
        "/generate", headers=auth, json={"prompt": "a cat", "wait": 0, "num_images": 2, **SETTINGS}
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}"
    done = wait_for(
        lambda: (
            (j := client.get(f"/jobs/{job['id']}", headers=auth).json())["status"] == "succeeded"
            and j
        ),
        timeout=120,
        what="generation",
    )
    images = done["result"]["images"]
    assert len(images) == 2 and images[0]["seed"] != images[1]["seed"]


@pytest.mark.parametrize(
    ("patch", "field", "code"),
    [
        ({"num_inference_steps": 10_000}, "num_inference_steps", "limit_exceeded"),
        ({"width": 4096, "height": 4096}, "width", "limit_exceeded"),
        ({"num_images": 99}, "num_images", "limit_exceeded"),
        ({"adapters": [{"ref": "nope"}]}, "adapters.0.ref", None),
        ({"adapters": [{"ref": "bad ref!!"}]}, "adapters.0.ref", None),
        ({"base_model": "sdxl"}, "base_model", "unknown_base_model"),
        ({"scheduler": "magic"}, "scheduler", "validation_error"),
        ({"width": 65}, "width", "validation_error"),
    ],
)
def test_bad_generate_requests_are_422(
    client: TestClient, auth: dict[str, str], patch: dict[str, Any], field: str, code: str | None
) -> None:
    response = client.post("/generate", headers=auth, json={"prompt": "x", **patch})
    body = assert_problem(response, 422, code or response.json()["code"])
    assert body["errors"][0]["field"] == field
    assert client.get("/jobs?kind=generate", headers=auth).json()["data"] == []


def test_openai_sdk_works_unchanged(
    client: TestClient,
    auth: dict[str, str],
    stack: Stack,
    worker: subprocess.Popen[bytes],
    lora_files: list[Path],
) -> None:
    import openai

    publish(stack, auth, "alpha", lora_files[0])
    sdk = openai.OpenAI(
        api_key=auth["Authorization"].split()[1],
        base_url="http://testserver/v1",
        http_client=client,
    )
    result = sdk.images.generate(
        model="alpha", prompt="a red square", n=1, size="64x64", response_format="b64_json"
    )
    assert result.data and result.data[0].b64_json
    picture = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert picture.size == (64, 64)
    by_url = sdk.images.generate(model="tiny", prompt="a red square", size="64x64")
    assert by_url.data[0].url and "/images/img_" in by_url.data[0].url
    with pytest.raises(openai.NotFoundError):
        sdk.images.generate(model="missing-adapter", prompt="x", size="64x64")


def test_images_and_workers(
    client: TestClient,
    auth: dict[str, str],
    other_auth: dict[str, str],
    worker: subprocess.Popen[bytes],
) -> None:
    answer = client.post("/generate", headers=auth, json={"prompt": "a dog", **SETTINGS}).json()
    image_id = answer["images"][0]["id"]
    assert client.get(f"/images/{image_id}", headers=auth).status_code == 200
    assert_problem(client.get(f"/images/{image_id}", headers=other_auth), 404, "not_found")
    wait_for(
        lambda: any(
            "inference" in w["info"] for w in client.get("/workers", headers=auth).json()["data"]
        ),
        timeout=30,
        what="the worker to report its cache",
    )
    info = next(
        w["info"]
        for w in client.get("/workers", headers=auth).json()["data"]
        if "inference" in w["info"]
    )
    assert set(info["inference"]["cache"]) >= {"disk", "cpu", "device"}


def test_idempotency_key_on_generate_and_jobs(client: TestClient, auth: dict[str, str]) -> None:
    from tests.conftest import upload_dataset

    key = {**auth, "Idempotency-Key": "req-1"}
    body = {"prompt": "a cat", "wait": 0, **SETTINGS}
    first = client.post("/generate", headers=key, json=body)
    again = client.post("/generate", headers=key, json=body)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert len(client.get("/jobs?kind=generate", headers=auth).json()["data"]) == 1
    reused = client.post("/generate", headers=key, json={**body, "prompt": "a dog"})
    assert_problem(reused, 422, "idempotency_key_reused")

    dataset_id = upload_dataset(client, auth, count=2)
    train = {
        "dataset_id": dataset_id,
        "adapter_name": "idem",
        "hyperparameters": {"max_steps": 1, "resolution": 64, "rank": 4},
    }
    one = client.post("/jobs", headers={**auth, "Idempotency-Key": "train-1"}, json=train)
    two = client.post("/jobs", headers={**auth, "Idempotency-Key": "train-1"}, json=train)
    assert one.status_code == two.status_code == 201 and one.json()["id"] == two.json()["id"]
    assert len(client.get("/jobs?kind=train", headers=auth).json()["data"]) == 1


def test_queued_compatible_jobs_share_one_pipeline_call(
    stack: Stack, client: TestClient, auth: dict[str, str]
) -> None:
    """Jobs queued while no worker runs are leased together when their shapes match."""
    for proc in list(stack.workers):
        stack.stop_worker(proc)
    small = {**SETTINGS, "width": 32, "height": 32}
    bodies = [
        {"prompt": f"a cat {i}", "seed": 10 + i, "wait": 0, "response_format": "b64_json", **small}
        for i in range(3)
    ]
    bodies.append({**bodies[0], "num_inference_steps": 2})  # another shape: its own call
    ids = []
    for body in bodies:
        response = client.post("/generate", headers=auth, json=body)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])

    stack.start_worker()
    jobs = [
        wait_for(
            lambda job_id=job_id: (
                (j := client.get(f"/jobs/{job_id}", headers=auth).json())["status"] == "succeeded"
                and j
            ),
            timeout=120,
            what=f"generation {job_id}",
        )
        for job_id in ids
    ]
    assert [j["result"]["batch_size"] for j in jobs] == [3, 3, 3, 1]
    assert len({j["result"]["timings"]["total_s"] for j in jobs[:3]}) == 1  # one call
    # A batched image is the image the same request makes alone.
    alone = client.post("/generate", headers=auth, json={**bodies[1], "wait": 60})
    assert alone.status_code == 200, alone.text
    batched = client.get(jobs[1]["result"]["images"][0]["id"].join(["/images/", ""]), headers=auth)
    assert batched.status_code == 200
    got = np.asarray(Image.open(io.BytesIO(batched.content)).convert("RGB"), dtype=np.int16)
    assert np.abs(got - png(client, auth, alone.json()["images"][0])).max() <= 2
