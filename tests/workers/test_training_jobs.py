"""Training jobs through the API with real worker processes on the tiny model."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from service import lifecycle
from service.app import create_app
from service.auth import authenticate
from service.db import transaction
from service.models import AdapterVersion, Dataset, Job
from service.queue import TASK_TRAIN
from tests.conftest import Stack, upload_dataset, wait_for
from tests.service.test_app import assert_problem

FAST = {"resolution": 64, "rank": 4, "learning_rate": 1e-3, "seed": 0}


def submit(client: TestClient, auth: dict[str, str], **body: Any) -> dict[str, Any]:
    response = client.post("/jobs", headers=auth, json=body)
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


def wait_status(
    client: TestClient, auth: dict[str, str], job_id: str, statuses: set[str], timeout: float = 240
) -> dict[str, Any]:
    def poll() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/jobs/{job_id}", headers=auth).json()
        return job if job["status"] in statuses else None

    result: dict[str, Any] = wait_for(
        poll, timeout=timeout, what=f"job {job_id} -> {statuses}", interval=0.25
    )
    return result


def events(client: TestClient, auth: dict[str, str], job_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = client.get(
        f"/jobs/{job_id}/events?limit=1000", headers=auth
    ).json()["data"]
    return out


def test_training_job_end_to_end(
    client: TestClient, auth: dict[str, str], stack: Stack, worker: subprocess.Popen[bytes]
) -> None:
    dataset_id = upload_dataset(client, auth)
    hp = {
        **FAST,
        "max_steps": 6,
        "checkpoint_every": 3,
        "checkpoints_keep": 2,
        "validation_prompts": ["a red square"],
        "validation_every": 6,
    }
    job = submit(client, auth, dataset_id=dataset_id, adapter_name="squares", hyperparameters=hp)
    assert job["status"] in ("queued", "running") and job["kind"] == "train"
    done = wait_status(client, auth, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done["error"]
    progress = done["progress"]
    assert progress["step"] == progress["total_steps"] == 6
    assert {"loss", "lr", "samples_per_s", "eta_s", "epoch"} <= set(progress)
    result = done["result"]
    assert result["adapter_name"] == "squares" and result["version"] == 1
    assert result["validation"] and result["validation"][0]["lora_image_id"].startswith("img_")
    kinds = [e["type"] for e in events(client, auth, job["id"])]
    assert {"state", "metrics", "checkpoint", "sample"} <= set(kinds)
    checkpoints = client.get(f"/jobs/{job['id']}/checkpoints", headers=auth).json()["data"]
    assert [c["step"] for c in checkpoints] == [3, 6]
    with stack.session_factory() as session:
        version = session.scalar(select(AdapterVersion).where(AdapterVersion.job_id == job["id"]))
        assert version is not None and version.version == 1 and version.source == "job"
        assert version.lineage["hyperparameters"]["max_steps"] == 6
        assert (
            stack.settings.resolved_artifact_dir.joinpath(version.storage_key).stat().st_size
            == version.size_bytes
        )
    # The next run for the same adapter becomes version 2.
    job2 = submit(
        client,
        auth,
        dataset_id=dataset_id,
        adapter_name="squares",
        hyperparameters={**FAST, "max_steps": 2},
    )
    assert wait_status(client, auth, job2["id"], {"succeeded"})["result"]["version"] == 2


def test_dry_run_plans_without_queuing(
    client: TestClient, auth: dict[str, str], stack: Stack
) -> None:
    dataset_id = upload_dataset(client, auth, count=3)
    before = client.get("/jobs", headers=auth).json()["data"]
    response = client.post(
        "/jobs",
        headers=auth,
        json={
            "dataset_id": dataset_id,
            "adapter_name": "plan",
            "dry_run": True,
            "hyperparameters": {"rank": 4, "train_text_encoder": True, "epochs": 2},
        },
    )
    assert response.status_code == 200, response.text
    plan = response.json()
    assert plan["dry_run"] is True and plan["total_steps"] == 6
    params = plan["trainable_params"]
    assert params["unet"] > 0 and params["text_encoder"] > 0
    assert params["total"] == params["unet"] + params["text_encoder"]
    assert plan["adapter_file_bytes"] > params["total"] * 4
    assert plan["peak_memory_bytes"] > 0 and plan["seconds_per_step"] > 0
    assert client.get("/jobs", headers=auth).json()["data"] == before


@pytest.mark.parametrize(
    ("hyperparameters", "field"),
    [
        ({"rank": 0}, "hyperparameters.rank"),
        ({"learning_rate": -1}, "hyperparameters.learning_rate"),
        ({"bogus_setting": 1}, "hyperparameters.bogus_setting"),
        ({"target_modules": ["to_nothing"]}, "hyperparameters.target_modules"),
        ({"target_modules": "everything"}, "hyperparameters.target_modules"),
        ({"lr_scheduler": "exotic"}, "hyperparameters.lr_scheduler"),
        ({"resolution": 65}, "hyperparameters.resolution"),
        ({"max_steps": 5, "epochs": 1}, "hyperparameters"),
        (
            {"train_text_encoder": True, "text_encoder_target_modules": ["nope"]},
            "hyperparameters.text_encoder_target_modules",
        ),
    ],
)
def test_bad_hyperparameters_answer_422_naming_the_field(
    client: TestClient, auth: dict[str, str], hyperparameters: dict[str, Any], field: str
) -> None:
    dataset_id = upload_dataset(client, auth, count=2)
    response = client.post(
        "/jobs",
        headers=auth,
        json={
            "dataset_id": dataset_id,
            "adapter_name": "bad",
            "hyperparameters": hyperparameters,
        },
    )
    body = assert_problem(response, 422, response.json().get("code", ""))
    assert body["errors"][0]["field"].startswith(field), body
    assert client.get("/jobs", headers=auth).json()["data"] == []


def test_request_level_422s(
    client: TestClient,
    auth: dict[str, str],
    other_auth: dict[str, str],
    worker: subprocess.Popen[bytes],
) -> None:
    dataset_id = upload_dataset(client, auth, count=2)
    cases = [
        ({"dataset_id": "ds_missing", "adapter_name": "a"}, "dataset_id", "dataset_not_found"),
        (
            {"dataset_id": dataset_id, "adapter_name": "a", "base_model": "sdxl"},
            "base_model",
            "unknown_base_model",
        ),
        (
            {"dataset_id": dataset_id, "adapter_name": "Bad Name!"},
            "adapter_name",
            "validation_error",
        ),
        # The live worker is a CPU: fp16 mixed precision can't run there.
        (
            {
                "dataset_id": dataset_id,
                "adapter_name": "a",
                "hyperparameters": {"mixed_precision": "fp16"},
            },
            "hyperparameters.mixed_precision",
            "unsupported_mixed_precision",
        ),
    ]
    for body, field, code in cases:
        problem = assert_problem(client.post("/jobs", headers=auth, json=body), 422, code)
        assert problem["errors"][0]["field"] == field
    # Another tenant's dataset does not exist for this caller.
    problem = assert_problem(
        client.post(
            "/jobs", headers=other_auth, json={"dataset_id": dataset_id, "adapter_name": "a"}
        ),
        422,
        "dataset_not_found",
    )


def test_cancel_running_job_stops_within_a_step(
    client: TestClient, auth: dict[str, str], stack: Stack, worker: subprocess.Popen[bytes]
) -> None:
    dataset_id = upload_dataset(client, auth, count=2)
    job = submit(
        client,
        auth,
        dataset_id=dataset_id,
        adapter_name="cancelme",
        hyperparameters={**FAST, "max_steps": 5000, "checkpoint_every": 1000},
    )
    wait_for(
        lambda: (
            client.get(f"/jobs/{job['id']}", headers=auth).json()["progress"].get("step", 0) >= 2
        ),
        timeout=120,
        what="training to make progress",
    )
    asked = client.post(f"/jobs/{job['id']}/cancel", headers=auth).json()
    assert asked["status"] in ("cancel_requested", "cancelled")
    final = wait_status(client, auth, job["id"], {"cancelled", "failed", "succeeded"}, timeout=60)
    assert final["status"] == "cancelled"
    assert final["progress"]["step"] < 5000
    with stack.session_factory() as session:
        assert (
            session.scalar(
                select(func.count())
                .select_from(AdapterVersion)
                .where(AdapterVersion.job_id == job["id"])
            )
            == 0
        )


def _queue_raw_job(stack: Stack, auth: dict[str, str], **fields: Any) -> str:
    with transaction(stack.session_factory) as session:
        principal = authenticate(session, auth["Authorization"].split()[1])
        assert principal is not None
        job = lifecycle.create_job(
            session,
            tenant_id=principal.tenant_id,
            kind="train",
            queue="train",
            params={"hyperparameters": {**FAST, "max_steps": 2}},
            adapter_name="raw",
            **fields,
        )
        return job.id


def test_deleted_dataset_and_missing_base_model_fail_clearly(
    client: TestClient, auth: dict[str, str], stack: Stack, worker: subprocess.Popen[bytes]
) -> None:
    dataset_id = upload_dataset(client, auth, count=2)
    gone = _queue_raw_job(stack, auth, dataset_id=dataset_id, base_model="tiny")
    with transaction(stack.session_factory) as session:
        session.execute(update(Dataset).where(Dataset.id == dataset_id).values(status="deleted"))
    no_model = _queue_raw_job(
        stack, auth, dataset_id=upload_dataset(client, auth, count=2), base_model="not-configured"
    )
    sender = client.app.state.sender  # type: ignore[attr-defined]
    for job_id in (gone, no_model):
        sender.send(TASK_TRAIN, job_id=job_id, queue="train")
    assert wait_status(client, auth, gone, {"failed"})["error"]["code"] == "dataset_deleted"
    assert (
        wait_status(client, auth, no_model, {"failed"})["error"]["code"] == "base_model_not_found"
    )


def _holder_pid(stack: Stack, job_id: str) -> int | None:
    with stack.session_factory() as session:
        owner = session.scalar(select(Job.lease_owner).where(Job.id == job_id))
    return int(owner.rsplit(":", 1)[1]) if owner else None


def _sigkill_worker(stack: Stack, pid: int) -> None:
    """Kill a worker's whole process group with SIGKILL and forget it."""
    os.killpg(pid, signal.SIGKILL)
    victim = next(p for p in stack.workers if p.pid == pid)
    victim.wait()
    stack.workers.remove(victim)


def test_sigkill_mid_training_resumes_from_checkpoint(
    client: TestClient, auth: dict[str, str], stack: Stack, worker: subprocess.Popen[bytes]
) -> None:
    dataset_id = upload_dataset(client, auth, count=4)
    job = submit(
        client,
        auth,
        dataset_id=dataset_id,
        adapter_name="survivor",
        hyperparameters={**FAST, "max_steps": 24, "checkpoint_every": 4},
    )
    wait_for(
        lambda: len(client.get(f"/jobs/{job['id']}/checkpoints", headers=auth).json()["data"]) >= 1,
        timeout=180,
        what="a first checkpoint",
    )
    pid = _holder_pid(stack, job["id"])
    assert pid is not None
    _sigkill_worker(stack, pid)  # the worker dies mid-training, no goodbye
    stack.start_worker()  # a replacement worker reaps the stale lease and resumes the job
    done = wait_status(client, auth, job["id"], {"succeeded", "failed"}, timeout=300)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    assert done["progress"]["step"] == done["progress"]["total_steps"] == 24
    assert done["result"]["resumed_from_step"] >= 4
    evs = events(client, auth, job["id"])
    resumed = [e for e in evs if e["type"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["data"]["step"] >= 4
    assert any(e["data"].get("reason") == "worker_lost" for e in evs)
    with stack.session_factory() as session:
        assert (
            session.scalar(
                select(func.count())
                .select_from(AdapterVersion)
                .where(AdapterVersion.job_id == job["id"])
            )
            == 1
        )


def test_duplicate_train_message_runs_once(
    client: TestClient, auth: dict[str, str], worker: subprocess.Popen[bytes]
) -> None:
    dataset_id = upload_dataset(client, auth, count=2)
    job = submit(
        client,
        auth,
        dataset_id=dataset_id,
        adapter_name="once",
        hyperparameters={**FAST, "max_steps": 2},
    )
    sender = client.app.state.sender  # type: ignore[attr-defined]
    sender.send(TASK_TRAIN, job_id=job["id"], queue="train")
    done = wait_status(client, auth, job["id"], {"succeeded"})
    follow = submit(
        client,
        auth,
        dataset_id=dataset_id,
        adapter_name="once",
        hyperparameters={**FAST, "max_steps": 1},
    )
    wait_status(client, auth, follow["id"], {"succeeded"})  # the duplicate was consumed first
    again = client.get(f"/jobs/{job['id']}", headers=auth).json()
    assert again["attempts"] == 1 and again["result"]["version"] == done["result"]["version"]


def test_job_that_keeps_killing_its_worker_fails_and_the_queue_drains(
    client: TestClient, auth: dict[str, str], stack: Stack, worker: subprocess.Popen[bytes]
) -> None:
    dataset_id = upload_dataset(client, auth, count=2)
    doomed = submit(
        client,
        auth,
        dataset_id=dataset_id,
        adapter_name="doomed",
        hyperparameters={**FAST, "max_steps": 5000, "checkpoint_every": 1000},
    )
    behind = submit(
        client,
        auth,
        dataset_id=dataset_id,
        adapter_name="behind",
        hyperparameters={**FAST, "max_steps": 2},
    )
    max_attempts = doomed["max_attempts"]
    for attempt in range(1, max_attempts + 1):

        def running_attempt(attempt: int = attempt) -> int | None:
            job = client.get(f"/jobs/{doomed['id']}", headers=auth).json()
            if job["status"] == "running" and job["attempts"] == attempt:
                return _holder_pid(stack, doomed["id"])
            return None

        pid: int = wait_for(running_attempt, timeout=120, what=f"attempt {attempt} to start")
        _sigkill_worker(stack, pid)  # this job "crashes" every worker that runs it
        if not any(p.poll() is None for p in stack.workers):
            stack.start_worker()
    failed = wait_status(client, auth, doomed["id"], {"failed", "succeeded"}, timeout=120)
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost"
    assert failed["attempts"] == max_attempts
    assert wait_status(client, auth, behind["id"], {"succeeded", "failed"})["status"] == "succeeded"


SCHEMA_MAXIMA = {"max_steps": 1_000_000, "resolution": 4096, "batch_size": 256, "rank": 1024}


def test_a_run_no_worker_can_hold_is_refused_by_its_plan(
    client: TestClient, auth: dict[str, str], stack: Stack, worker: subprocess.Popen[bytes]
) -> None:
    """By default: the API plans every run against the live training workers' memory; a run
    admitted without a plan (the API could not plan it) is planned and refused by the worker
    before it trains."""
    dataset_id = upload_dataset(client, auth, count=2)
    body = {"dataset_id": dataset_id, "adapter_name": "maxima", "hyperparameters": SCHEMA_MAXIMA}
    problem = assert_problem(client.post("/jobs", headers=auth, json=body), 422, "plan_over_memory")
    row = stack.worker_row(worker.pid)
    assert row is not None and row.info["memory_bytes"] > 0
    assert problem["limit"] == {
        "name": "live training workers' memory",
        "value": row.info["memory_bytes"],
    }
    assert problem["plan"]["peak_memory_bytes"] > row.info["memory_bytes"]
    assert client.get("/jobs", headers=auth).json()["data"] == []

    # A small run is admitted: its job carries the plan it was admitted by.
    small = submit(
        client,
        auth,
        dataset_id=dataset_id,
        adapter_name="small",
        hyperparameters={**FAST, "max_steps": 1},
    )
    with stack.session_factory() as session:
        params = session.get(Job, small["id"]).params  # type: ignore[union-attr]
    assert 0 < params["planned_peak_memory_bytes"] < row.info["memory_bytes"]
    wait_status(client, auth, small["id"], {"succeeded"})

    unplanned = stack.settings.model_copy(update={"train_admission": False})
    with TestClient(create_app(unplanned)) as no_planner:
        job = submit(no_planner, auth, **body)
    failed = wait_status(client, auth, job["id"], {"failed"}, timeout=120)
    assert failed["error"]["code"] == "plan_over_memory", failed
    assert "lower the resolution" in failed["error"]["message"]
