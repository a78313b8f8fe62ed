"""Training jobs with evaluation, on the tiny model and tiny evaluator models with a real
worker: metrics for every checkpoint and the final version, the `best` alias, `publish: best`,
numbers that repeat at fixed seeds and that equal a computation from the stored images."""

from __future__ import annotations

import io
import subprocess
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import Stack, upload_dataset
from tests.service.test_app import assert_problem
from tests.workers.test_training_jobs import FAST, events, submit, wait_status

EVALUATION = {
    "prompts": ["a red square"],
    "control_prompts": ["a city at night"],
    "seeds": [0, 1],
    "num_inference_steps": 2,
    # The least-moved step: with these seeds not the final one, so `best` is a checkpoint.
    "select": {"metric": "strength", "mode": "min"},
}
HP = {**FAST, "learning_rate": 5e-2, "max_steps": 6, "checkpoint_every": 2, "checkpoints_keep": 2}
AGGREGATES = {
    "clip_score",
    "clip_score_base",
    "clip_score_gain",
    "fidelity_dino",
    "fidelity_clip_i",
    "strength",
    "leakage",
    "cmmd",
}


def evaluations(client: TestClient, auth: dict[str, str], job_id: str) -> dict[int, Any]:
    found = [e["data"] for e in events(client, auth, job_id) if e["type"] == "metrics"]
    return {d["step"]: d for d in found if "evaluation" in d}


def picture(client: TestClient, auth: dict[str, str], image_id: str) -> Image.Image:
    response = client.get(f"/images/{image_id}", headers=auth)
    assert response.status_code == 200
    return Image.open(io.BytesIO(response.content)).convert("RGB")


def test_evaluated_training_job(
    client: TestClient, auth: dict[str, str], stack: Stack, worker: subprocess.Popen[bytes]
) -> None:
    dataset_id = upload_dataset(client, auth, count=4)
    job = submit(
        client,
        auth,
        dataset_id=dataset_id,
        adapter_name="evsq",
        hyperparameters=HP,
        evaluation=EVALUATION,
    )
    assert job["params"]["evaluation"]["metrics"] == [
        "clip_score",
        "fidelity",
        "strength",
        "leakage",
        "cmmd",
    ]
    done = wait_status(client, auth, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done["error"]

    # Every checkpoint is evaluated once (the last one is the final weights: not twice).
    records = evaluations(client, auth, job["id"])
    assert sorted(records) == [2, 4, 6]
    for record in records.values():
        assert set(record["evaluation"]) == AGGREGATES
        assert record["methods"]["distance"] == "dino_cosine"
        assert [p["kind"] for p in record["per_prompt"]] == ["target", "control"]
        assert len(record["images"]) == 4
    summary = done["result"]["evaluation"]
    assert [c["step"] for c in summary["checkpoints"]] == [2, 4, 6]
    assert summary["final_step"] == 6
    kept = client.get(f"/jobs/{job['id']}/checkpoints", headers=auth).json()["data"]
    assert [c["step"] for c in kept] == [4, 6]
    for row in kept:
        assert row["metrics"]["evaluation"] == records[row["step"]]["evaluation"]
        assert row["metrics"]["evaluation_per_prompt"] == records[row["step"]]["per_prompt"]

    # The best step by strength (min) gets `best`; `latest` stays on the final weights.
    strength = {step: r["evaluation"]["strength"] for step, r in records.items()}
    best_step = min(sorted(strength), key=lambda s: strength[s])
    assert summary["best_step"] == best_step
    adapter = client.get("/adapters/evsq", headers=auth).json()
    latest = client.get("/adapters/evsq/versions/latest", headers=auth).json()
    best = client.get("/adapters/evsq/versions/best", headers=auth).json()
    assert latest["version"] == done["result"]["version"] and latest["source"] == "job"
    assert latest["metrics"]["evaluation"] == records[6]["evaluation"]
    assert best["metrics"]["evaluation"] == records[best_step]["evaluation"]
    assert adapter["aliases"]["best"] == best["version"]
    assert summary["best_version"] == best["version"]
    assert best_step != 6, "these seeds no longer make an earlier step best"
    assert best["source"] == "checkpoint" and best["checkpoint_step"] == best_step
    assert best["version"] < latest["version"] and best["sha256"] != latest["sha256"]
    assert best["metrics"]["evaluation_step"] == best_step
    # The best checkpoint's version is the one a promotion of that checkpoint gives.
    promoted = client.post(f"/jobs/{job['id']}/checkpoints/{best_step}/promote", headers=auth)
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["version"] == best["version"]

    # A figure computed here from the stored images equals the stored one: the strength at
    # step 4 is the mean DINO cosine distance of the target prompt's base and LoRA images.
    from workers.engine.evaluation.models import EvaluatorModels

    folder = stack.settings.tiny_evaluators_dir
    models = EvaluatorModels({"clip": str(folder / "clip"), "dino": str(folder / "dino")})
    targets = [i for i in records[4]["images"] if i["kind"] == "target"]
    base = models.dino_images([picture(client, auth, i["base_image_id"]) for i in targets])
    lora = models.dino_images([picture(client, auth, i["lora_image_id"]) for i in targets])
    by_hand = float((1 - (base * lora).sum(dim=-1)).mean())
    assert records[4]["evaluation"]["strength"] == pytest.approx(by_hand, abs=1e-5)
    # The base images are rendered once per run: every step shows the same ones.
    assert {i["base_image_id"] for r in records.values() for i in r["images"]} == {
        i["base_image_id"] for i in records[2]["images"]
    }

    # Each step's same-seed grid: a row per prompt, a column for the base model and one per
    # step so far, each cell the stored image of that prompt at the first seed.
    import numpy as np

    for step, columns in ((2, ["base", "step 2"]), (6, ["base", "step 2", "step 4", "step 6"])):
        grid = records[step]["grid"]
        assert grid["columns"] == columns and grid["seed"] == 0
        assert grid["rows"] == ["a red square", "(control) a city at night"]
        layout = grid["layout"]
        assert (layout["rows"], layout["columns"]) == (2, len(columns))
        pixels = np.asarray(picture(client, auth, grid["image_id"]))
        assert pixels.shape[:2] == (
            layout["origin_y"] + 2 * layout["cell_height"],
            layout["origin_x"] + len(columns) * layout["cell_width"],
        )
        for r, prompt in enumerate(["a red square", "a city at night"]):
            for c, label in enumerate(columns):
                source = records[int(label.split()[1])] if c else records[2]
                entry = next(
                    i for i in source["images"] if i["prompt"] == prompt and i["seed"] == 0
                )
                expected = picture(client, auth, entry["lora_image_id" if c else "base_image_id"])
                left = layout["origin_x"] + c * layout["cell_width"]
                top = layout["origin_y"] + r * layout["cell_height"]
                cell = pixels[top : top + expected.height, left : left + expected.width]
                assert np.array_equal(cell, np.asarray(expected)), (step, prompt, label)

    # The same run again (same seeds), publishing the best checkpoint: the same numbers, and
    # `latest` is the best step's weights.
    again = submit(
        client,
        auth,
        dataset_id=dataset_id,
        adapter_name="evsq-best",
        hyperparameters=HP,
        evaluation=EVALUATION,
        publish="best",
    )
    done_again = wait_status(client, auth, again["id"], {"succeeded", "failed"})
    assert done_again["status"] == "succeeded", done_again["error"]
    repeated = evaluations(client, auth, again["id"])
    assert {s: r["evaluation"] for s, r in repeated.items()} == {
        s: r["evaluation"] for s, r in records.items()
    }
    latest_best = client.get("/adapters/evsq-best/versions/latest", headers=auth).json()
    assert latest_best["aliases"] == ["best", "latest"]
    assert latest_best["lineage"]["checkpoint_step"] == best_step
    assert latest_best["sha256"] == best["sha256"]


def test_final_only_and_unevaluable_runs(
    client: TestClient, auth: dict[str, str], stack: Stack, worker: subprocess.Popen[bytes]
) -> None:
    dataset_id = upload_dataset(client, auth, count=2)
    hp = {**FAST, "max_steps": 2, "checkpoint_every": 1}
    # every: false evaluates the final weights only.
    final_only = submit(
        client,
        auth,
        dataset_id=dataset_id,
        adapter_name="evfinal",
        hyperparameters=hp,
        evaluation={**EVALUATION, "every": False, "metrics": ["clip_score"], "select": {}},
    )
    done = wait_status(client, auth, final_only["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done["error"]
    assert sorted(evaluations(client, auth, final_only["id"])) == [2]
    assert done["result"]["evaluation"]["best_step"] == 2
    checkpoints = client.get(f"/jobs/{final_only['id']}/checkpoints", headers=auth).json()
    assert all("evaluation" not in c["metrics"] for c in checkpoints["data"])
    latest = client.get("/adapters/evfinal/versions/latest", headers=auth).json()
    assert latest["aliases"] == ["best", "latest"]
    assert set(latest["metrics"]["evaluation"]) == {
        "clip_score",
        "clip_score_base",
        "clip_score_gain",
    }

    # A rank over the inference engine's slots cannot be evaluated: the run still trains and
    # publishes, with a warning per step and no `best`.
    too_big = submit(
        client,
        auth,
        dataset_id=dataset_id,
        adapter_name="evbig",
        hyperparameters={**hp, "rank": stack.settings.inference_max_rank + 1},
        evaluation=EVALUATION,
    )
    done = wait_status(client, auth, too_big["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done["error"]
    assert "evaluation" not in done["result"]
    warnings = [e["data"] for e in events(client, auth, too_big["id"]) if e["level"] == "warning"]
    assert [w["step"] for w in warnings] == [1, 2, 2]
    assert all(w["message"].startswith("evaluation skipped") for w in warnings)
    adapter = client.get("/adapters/evbig", headers=auth).json()
    assert "best" not in adapter["aliases"] and adapter["aliases"]["latest"] == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"evaluation": {"prompts": []}}, "evaluation.prompts"),
        ({"evaluation": {"prompts": ["a"], "metrics": ["beauty"]}}, "evaluation.metrics.0"),
        (
            {"evaluation": {"prompts": ["a"], "select": {"metric": "leakage"}}},
            "evaluation",
        ),
        (
            {"evaluation": {"prompts": ["a"], "metrics": ["cmmd"]}},
            "evaluation",
        ),
        ({"evaluation": {"prompts": ["a"] * 16, "seeds": list(range(8))}}, "evaluation"),
        ({"publish": "best"}, "body"),
    ],
)
def test_evaluation_refusals(
    client: TestClient, auth: dict[str, str], body: dict[str, Any], field: str
) -> None:
    request = {"dataset_id": "ds_x", "adapter_name": "x", **body}
    problem = assert_problem(
        client.post("/jobs", headers=auth, json=request), 422, "validation_error"
    )
    assert problem["errors"][0]["field"] == field, problem
    assert client.get("/jobs", headers=auth).json()["data"] == []


def test_an_evaluation_cut_by_a_lost_worker_is_done_on_resume(
    client: TestClient, auth: dict[str, str], stack: Stack, worker: subprocess.Popen[bytes]
) -> None:
    from tests.conftest import wait_for
    from tests.workers.test_training_jobs import _holder_pid, _sigkill_worker

    dataset_id = upload_dataset(client, auth, count=4)
    job = submit(
        client,
        auth,
        dataset_id=dataset_id,
        adapter_name="evlost",
        hyperparameters={**HP, "max_steps": 4},
        # More images than the other tests: seconds of evaluation to be killed in.
        evaluation={**EVALUATION, "seeds": [0, 1, 2, 3], "num_inference_steps": 8},
    )
    wait_for(
        lambda: any(e["type"] == "checkpoint" for e in events(client, auth, job["id"])),
        timeout=180,
        what="the first checkpoint",
        interval=0.05,
    )
    pid = _holder_pid(stack, job["id"])
    assert pid is not None
    _sigkill_worker(stack, pid)  # while it evaluates step 2
    assert 2 not in evaluations(client, auth, job["id"])

    stack.start_worker()  # reaps the lease, resumes from step 2 and evaluates it first
    done = wait_status(client, auth, job["id"], {"succeeded", "failed"}, timeout=300)
    assert done["status"] == "succeeded", done["error"]
    assert done["result"]["resumed_from_step"] == 2
    records = evaluations(client, auth, job["id"])
    assert set(records) == {2, 4}
    summary = done["result"]["evaluation"]["checkpoints"]
    assert [entry["step"] for entry in summary] == [2, 4]
