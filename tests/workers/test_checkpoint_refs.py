"""Checkpoint refs in /generate: a training checkpoint serves without being promoted."""

from __future__ import annotations

import io
import subprocess
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import Stack, upload_dataset
from tests.service.test_app import assert_problem
from tests.workers.test_training_jobs import FAST, submit, wait_status

RENDER = {"prompt": "a red square", "num_inference_steps": 3, "seed": 7, "width": 64, "height": 64}


def render(client: TestClient, auth: dict[str, str], ref: str | None) -> tuple[Any, np.ndarray]:
    adapters = [{"ref": ref, "weight": 1.0}] if ref else []
    response = client.post("/generate", headers=auth, json={**RENDER, "adapters": adapters})
    assert response.status_code == 200, response.text
    body = response.json()
    png = client.get(f"/images/{body['images'][0]['id']}", headers=auth)
    assert png.status_code == 200
    return body, np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB"), dtype=np.int16)


def test_checkpoint_refs_generate(
    client: TestClient,
    auth: dict[str, str],
    other_auth: dict[str, str],
    stack: Stack,
    worker: subprocess.Popen[bytes],
) -> None:
    dataset_id = upload_dataset(client, auth, count=3)
    hp = {**FAST, "learning_rate": 5e-2, "max_steps": 4, "checkpoint_every": 2}
    job = submit(client, auth, dataset_id=dataset_id, adapter_name="ckref", hyperparameters=hp)
    done = wait_status(client, auth, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done["error"]

    _, base = render(client, auth, None)
    _, published = render(client, auth, "ckref@1")
    body, by_job = render(client, auth, f"{job['id']}@ckpt:4")
    assert body["adapters"] == [
        {
            "ref": f"{job['id']}@ckpt:4",
            "name": "ckref",
            "version": None,
            "weight": 1.0,
            "job_id": job["id"],
            "checkpoint_step": 4,
        }
    ]
    _, by_name = render(client, auth, "ckref@ckpt:4")
    _, earlier = render(client, auth, "ckref@ckpt:2")
    # The last checkpoint holds the published weights; the LoRA moves the image.
    assert np.abs(by_job - published).max() <= 1
    assert np.array_equal(by_job, by_name)
    assert np.abs(by_job - base).max() > 1
    assert np.abs(earlier - by_job).max() > 0

    bad = {**RENDER, "adapters": [{"ref": "ckref@ckpt:3"}]}
    response = client.post("/generate", headers=auth, json=bad)
    problem = assert_problem(response, 422, "adapter_not_found")
    assert problem["errors"][0]["field"] == "adapters.0.ref"
    bad["adapters"] = [{"ref": "ckref@ckpt:x"}]
    assert_problem(client.post("/generate", headers=auth, json=bad), 422, "invalid_adapter_ref")
    # Another tenant's job is not found, by job id or by name.
    for ref in (f"{job['id']}@ckpt:4", "ckref@ckpt:4"):
        other = {**RENDER, "adapters": [{"ref": ref}]}
        assert_problem(
            client.post("/generate", headers=other_auth, json=other), 422, "adapter_not_found"
        )
    twice = {**RENDER, "adapters": [{"ref": "ckref@ckpt:4"}, {"ref": f"{job['id']}@ckpt:4"}]}
    assert_problem(client.post("/generate", headers=auth, json=twice), 422, "duplicate_adapter")
