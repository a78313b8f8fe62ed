"""Mixed-adapter batches with a real worker: queued jobs of one shape from several tenants share
a pipeline call whatever their adapters, within the image, slot and wait limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from fastapi.testclient import TestClient

from tests.conftest import Stack, wait_for
from tests.workers.test_generation import png, publish

# A shape of its own, so that jobs other tests leave queued never join these batches.
SHAPE = {"num_inference_steps": 2, "guidance_scale": 4.5, "width": 40, "height": 40}
# The worker's limits for the first test: 4 images a call, 2 adapter files in slots.
LIMITS = {
    "LORASTACK_GENERATE_BATCH_MAX": "4",
    "LORASTACK_GENERATE_MAX_ADAPTERS": "2",
    "LORASTACK_INFERENCE_SLOTS": "2",
}


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from tests.fixtures.random_lora import RandomLoraSpec, RandomLoraWriter

    writer = RandomLoraWriter(StableDiffusionPipeline.from_pretrained(tiny_model_dir))
    out = tmp_path_factory.mktemp("mixed-loras")
    return [
        writer.write(out / f"{name}.safetensors", RandomLoraSpec(rank=4, alpha=4.0), seed=seed)
        for seed, name in enumerate(("alpha", "beta", "gamma"), start=31)
    ]


def _queue(client: TestClient, auth: dict[str, str], seed: int, **body: Any) -> str:
    response = client.post(
        "/generate",
        headers=auth,
        json={"prompt": f"a cat {seed}", "seed": seed, "wait": 0, **SHAPE, **body},
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _finished(client: TestClient, auth: dict[str, str], job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = wait_for(
        lambda: (
            (j := client.get(f"/jobs/{job_id}", headers=auth).json())["status"]
            in ("succeeded", "failed")
            and j
        ),
        timeout=180,
        what=f"generation {job_id}",
    )
    assert job["status"] == "succeeded", job
    return job


def _stop_workers(stack: Stack) -> None:
    for proc in list(stack.workers):
        stack.stop_worker(proc)


def test_jobs_with_different_adapters_from_two_tenants_share_a_call(
    stack: Stack,
    client: TestClient,
    auth: dict[str, str],
    other_auth: dict[str, str],
    adapters: list[Path],
) -> None:
    for tenant in (auth, other_auth):
        for name, path in zip(("alpha", "beta", "gamma"), adapters, strict=True):
            publish(stack, tenant, name, path)
    publish(stack, other_auth, "gamma-copy", adapters[2])  # the same file under another name
    _stop_workers(stack)
    one, two = auth, other_auth
    queued = [
        (one, _queue(client, one, 1, adapters=[{"ref": "alpha"}])),
        (one, _queue(client, one, 2, adapters=[{"ref": "beta", "weight": 0.8}])),
        (one, _queue(client, one, 3)),  # the base model
        (two, _queue(client, two, 4, adapters=[{"ref": "alpha", "weight": 0.3}])),
        # One file in one slot; the two weights add up, as loading the file twice would.
        (
            two,
            _queue(
                client,
                two,
                5,
                adapters=[{"ref": "gamma", "weight": 0.6}, {"ref": "gamma-copy", "weight": 0.4}],
            ),
        ),
        (one, _queue(client, one, 6, num_images=2)),
    ]

    stack.start_worker(extra_env=LIMITS, log_name="mixed-worker")
    jobs = [_finished(client, tenant, job_id) for tenant, job_id in queued]

    # The first call: tenant one's oldest, then round robin: two's alpha@0.3, one's beta, then
    # gamma's job would be a third file in two slots (skipped) and one's base job fills the 4
    # images. The second call: gamma's job and the two-image base job.
    assert [j["result"]["batch_size"] for j in jobs] == [4, 4, 4, 4, 2, 2]
    assert len({j["result"]["timings"]["total_s"] for j in jobs[:4]}) == 1
    assert {j["result"]["timings"]["batch_wait_s"] for j in jobs} == {0.0}

    # Each image is the image of the same request run alone: adapters, weights, none at all.
    for index, (tenant, body) in {
        1: (one, {"adapters": [{"ref": "beta", "weight": 0.8}]}),
        2: (one, {}),
        3: (two, {"adapters": [{"ref": "alpha", "weight": 0.3}]}),
        4: (two, {"adapters": [{"ref": "gamma", "weight": 1.0}]}),
    }.items():
        alone = client.post(
            "/generate",
            headers=tenant,
            json={"prompt": f"a cat {index + 1}", "seed": index + 1, **SHAPE, **body, "wait": 60},
        )
        assert alone.status_code == 200, alone.text
        image_id = jobs[index]["result"]["images"][0]["id"]
        batched = png(client, tenant, {"url": f"/images/{image_id}"})
        assert np.abs(batched - png(client, tenant, alone.json()["images"][0])).max() <= 2
    _stop_workers(stack)


def test_a_worker_waits_for_batch_mates_no_longer_than_the_setting(
    stack: Stack, client: TestClient, auth: dict[str, str], adapters: list[Path]
) -> None:
    for name, path in zip(("alpha", "beta"), adapters[:2], strict=True):
        publish(stack, auth, name, path)
    _stop_workers(stack)
    wait_s = 3.0  # generous: the second job must be queued within it on a loaded machine
    stack.start_worker(
        extra_env={"LORASTACK_GENERATE_BATCH_WAIT_S": str(wait_s)}, log_name="waiting-worker"
    )
    _finished(client, auth, _queue(client, auth, 40))  # the engine is loaded and warm

    first = _queue(client, auth, 41, adapters=[{"ref": "alpha"}])
    second = _queue(client, auth, 42, adapters=[{"ref": "beta"}])
    together = [_finished(client, auth, job_id) for job_id in (first, second)]
    alone = _finished(client, auth, _queue(client, auth, 43))

    # The second job, queued within the first one's wait, joined its call.
    assert [j["result"]["batch_size"] for j in together] == [2, 2]
    # A job no mate came for waited, but never longer than the setting.
    assert alone["result"]["batch_size"] == 1
    assert 0 < alone["result"]["timings"]["batch_wait_s"] <= wait_s
    for job in together:
        assert 0 <= job["result"]["timings"]["batch_wait_s"] <= wait_s
    _stop_workers(stack)
