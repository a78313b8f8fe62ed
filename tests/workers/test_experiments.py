"""Experiments with a real worker on the tiny model and tiny evaluators: a 2x2 grid of runs
ends with a 4-row table, the best run, and reports; bad grids are refused; the example
requests are valid."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.experiments.schemas import ExperimentCreate
from tests.conftest import REPO, Stack, upload_dataset, wait_for
from tests.service.test_app import assert_problem
from tests.workers.test_training_jobs import FAST

MAXIMA = {"max_steps": 1_000_000, "resolution": 4096, "batch_size": 256}
EVALUATION = {
    "prompts": ["a red square"],
    "control_prompts": ["a tree"],
    "seeds": [0],
    "num_inference_steps": 1,
    "metrics": ["clip_score", "strength", "leakage"],
    "select": {"metric": "strength", "mode": "max"},
}


def test_experiment_of_four_runs(
    client: TestClient, auth: dict[str, str], stack: Stack, worker: subprocess.Popen[bytes]
) -> None:
    dataset_id = upload_dataset(client, auth, count=2)
    body = {
        "dataset_id": dataset_id,
        "adapter_name": "exp",
        "hyperparameters": {**FAST, "max_steps": 2, "checkpoint_every": 2},
        "evaluation": EVALUATION,
        "grid": {"rank": [2, 4], "train_text_encoder": [False, True]},
    }
    response = client.post("/experiments", headers=auth, json=body)
    assert response.status_code == 201, response.text
    experiment = response.json()
    assert experiment["status"] in ("queued", "running")
    assert [r["parameters"] for r in experiment["runs"]] == [
        {"rank": 2, "train_text_encoder": False},
        {"rank": 2, "train_text_encoder": True},
        {"rank": 4, "train_text_encoder": False},
        {"rank": 4, "train_text_encoder": True},
    ]
    assert [r["adapter_name"] for r in experiment["runs"]] == ["exp-1", "exp-2", "exp-3", "exp-4"]
    jobs = client.get("/jobs?kind=train", headers=auth).json()["data"]
    assert {j["id"] for j in jobs} == {r["job_id"] for r in experiment["runs"]}

    def ended() -> dict[str, Any] | None:
        view: dict[str, Any] = client.get(f"/experiments/{experiment['id']}", headers=auth).json()
        return view if view["status"] not in ("queued", "running") else None

    view = wait_for(ended, timeout=300, what="the experiment's runs", interval=0.5)
    assert view["status"] == "succeeded", view
    runs = view["runs"]
    assert len(runs) == 4 and all(r["status"] == "succeeded" for r in runs)
    for run in runs:
        job = client.get(f"/jobs/{run['job_id']}", headers=auth).json()
        assert run["trainable_params"] == job["result"]["trainable_params"] > 0
        assert run["adapter_file_bytes"] == job["result"]["size_bytes"] > 0
        assert run["final_loss"] == job["result"]["final_loss"]
        assert run["duration_s"] > 0 and run["best_step"] == 2
        assert set(run["metrics"]) == {
            "clip_score",
            "clip_score_base",
            "clip_score_gain",
            "strength",
            "leakage",
        }
    # More rank, more parameters; the text encoder adds its own.
    params = [r["trainable_params"] for r in runs]
    assert params[0] < params[2] and params[0] < params[1] and params[2] < params[3]
    strength = [r["metrics"]["strength"] for r in runs]
    assert view["best_run"] == 1 + strength.index(max(strength))
    assert view["select"] == {"metric": "strength", "mode": "max"}

    report = client.get(f"/experiments/{experiment['id']}/report?format=csv", headers=auth)
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(report.text)))
    assert len(table) == 4
    assert [row["rank"] for row in table] == ["2", "2", "4", "4"]
    assert [row["train_text_encoder"] for row in table] == ["false", "true", "false", "true"]
    assert [row["best_run"] for row in table].count("yes") == 1
    assert table[view["best_run"] - 1]["best_run"] == "yes"
    assert float(table[0]["strength"]) == pytest.approx(strength[0], rel=1e-5)
    markdown = client.get(f"/experiments/{experiment['id']}/report?format=md", headers=auth)
    assert markdown.headers["content-type"].startswith("text/markdown")
    lines = [line for line in markdown.text.splitlines() if line.startswith("| ")]
    assert len(lines) == 5 and "strength" in lines[0]
    assert f"Best run: {view['best_run']} by strength (max)" in markdown.text


def test_experiment_refusals(
    client: TestClient, auth: dict[str, str], stack: Stack, worker: subprocess.Popen[bytes]
) -> None:
    dataset_id = upload_dataset(client, auth, count=2)
    base = {"dataset_id": dataset_id, "adapter_name": "bad"}
    cases = [
        ({**base, "grid": {"colour": [1]}}, "validation_error"),
        ({**base, "grid": {"rank": []}}, "validation_error"),
        ({**base, "grid": {}}, "validation_error"),
        ({**base, "grid": {"rank": [4, 0]}}, "validation_error"),
        ({**base, "grid": {"rank": list(range(1, 18))}}, "limit_exceeded"),
        ({**base, "dataset_id": "ds_nope", "grid": {"rank": [4]}}, "dataset_not_found"),
        # Every run is admitted by its plan, as POST /jobs admits one.
        (
            {**base, "hyperparameters": MAXIMA, "grid": {"rank": [4, 1024]}},
            "plan_over_memory",
        ),
    ]
    for body, code in cases:
        problem = assert_problem(client.post("/experiments", headers=auth, json=body), 422, code)
        if code == "validation_error" and "rank" in body["grid"] and body["grid"]["rank"]:
            assert problem["errors"][0]["field"] == "grid.rank"
    assert client.get("/jobs", headers=auth).json()["data"] == []
    assert_problem(client.get("/experiments/exp_nope", headers=auth), 404, "not_found")


def test_experiment_list_pages_newest_first_per_tenant(
    client: TestClient, auth: dict[str, str], other_auth: dict[str, str], stack: Stack
) -> None:
    dataset_id = upload_dataset(client, auth, count=2)
    created = []
    for index in range(3):
        body = {
            "dataset_id": dataset_id,
            "adapter_name": f"list{index}",
            "hyperparameters": {**FAST, "max_steps": 1},
            "grid": {"rank": [2]},
        }
        response = client.post("/experiments", headers=auth, json=body)
        assert response.status_code == 201, response.text
        created.append(response.json())
    first = client.get("/experiments?limit=2", headers=auth).json()
    assert [e["id"] for e in first["data"]] == [created[2]["id"], created[1]["id"]]
    assert first["has_more"] is True
    assert first["data"][0]["runs"][0]["adapter_name"] == "list2-1"
    assert first["data"][0]["grid"] == {"rank": [2]}
    rest = client.get(f"/experiments?limit=2&after={created[1]['id']}", headers=auth).json()
    assert [e["id"] for e in rest["data"]] == [created[0]["id"]]
    assert rest["has_more"] is False
    assert client.get("/experiments", headers=other_auth).json() == {"data": [], "has_more": False}
    assert_problem(client.get("/experiments?limit=0", headers=auth), 422, "validation_error")


@pytest.mark.parametrize("name", ["rank_8_vs_32.json", "unet_vs_text_encoder.json"])
def test_example_requests_are_valid(name: str) -> None:
    body = json.loads(Path(REPO, "examples", "experiments", name).read_text())
    request = ExperimentCreate.model_validate(body)
    assert request.evaluation is not None and request.evaluation.control_prompts
    assert len(request.grid) == 1 and len(next(iter(request.grid.values()))) == 2
