"""The whole path with a real worker process: HTTP -> SQL -> Redis -> Celery -> SQL."""

from __future__ import annotations

import subprocess

from fastapi.testclient import TestClient
from sqlalchemy import select

from service import lifecycle
from service.auth import authenticate
from service.db import transaction
from service.models import JobEvent
from service.queue import TASK_PING
from tests.conftest import Stack


def test_ping_round_trips_through_a_real_worker(
    client: TestClient, auth: dict[str, str], worker: subprocess.Popen[bytes]
) -> None:
    for queue in ("generate", "train"):
        job = client.post(f"/ping?queue={queue}&wait=30", headers=auth).json()
        assert job["status"] == "succeeded", job
        assert job["result"]["pong"] is True
        assert job["result"]["worker"].endswith(f":{worker.pid}")
        assert job["attempts"] == 1 and job["queue"] == queue


def test_readyz_and_workers_see_the_live_worker(
    client: TestClient, auth: dict[str, str], worker: subprocess.Popen[bytes]
) -> None:
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["workers"]["live"] >= 1
    workers = client.get("/workers", headers=auth).json()["data"]
    mine = [w for w in workers if w["id"].endswith(f":{worker.pid}")]
    assert mine and mine[0]["queues"] == ["train", "generate"]
    assert mine[0]["base_model"] == "tiny"


def test_duplicate_delivery_runs_once(
    client: TestClient, auth: dict[str, str], stack: Stack, worker: subprocess.Popen[bytes]
) -> None:
    job = client.post("/ping?wait=30", headers=auth).json()
    assert job["status"] == "succeeded"
    # Deliver the same message twice more: the lease is taken, so nothing runs again.
    sender = client.app.state.sender  # type: ignore[attr-defined]
    sender.send(TASK_PING, job_id=job["id"], queue="generate")
    sender.send(TASK_PING, job_id=job["id"], queue="generate")
    follow = client.post("/ping?wait=30", headers=auth).json()  # queued behind the duplicates
    assert follow["status"] == "succeeded"
    again = client.get(f"/jobs/{job['id']}", headers=auth).json()
    assert again["attempts"] == 1 and again["finished_at"] == job["finished_at"]
    with stack.session_factory() as session:
        states = session.scalars(
            select(JobEvent.data)
            .where(JobEvent.job_id == job["id"], JobEvent.type == "state")
            .order_by(JobEvent.seq)
        ).all()
    assert [s["status"] for s in states] == ["queued", "running", "succeeded"]


def test_cancelled_queued_job_never_runs(
    client: TestClient, auth: dict[str, str], stack: Stack, worker: subprocess.Popen[bytes]
) -> None:
    # A queued job whose message is still on its way (a busy queue): cancel it first.
    with transaction(stack.session_factory) as session:
        principal = authenticate(session, auth["Authorization"].split()[1])
        assert principal is not None
        job_id = lifecycle.create_job(
            session, tenant_id=principal.tenant_id, kind="ping", queue="generate"
        ).id
    cancelled = client.post(f"/jobs/{job_id}/cancel", headers=auth).json()
    assert cancelled["status"] == "cancelled"
    sender = client.app.state.sender  # type: ignore[attr-defined]
    sender.send(TASK_PING, job_id=job_id, queue="generate")  # the message arrives late
    later = client.post("/ping?wait=30", headers=auth).json()  # consumed after the late one
    assert later["status"] == "succeeded"
    final = client.get(f"/jobs/{job_id}", headers=auth).json()
    assert final["status"] == "cancelled" and final["attempts"] == 0
    assert final["started_at"] is None


def test_events_page_and_stream(
    client: TestClient, auth: dict[str, str], worker: subprocess.Popen[bytes]
) -> None:
    job = client.post("/ping?wait=30", headers=auth).json()
    page = client.get(f"/jobs/{job['id']}/events?limit=2", headers=auth).json()
    assert [e["seq"] for e in page["data"]] == [1, 2] and page["has_more"] is True
    rest = client.get(f"/jobs/{job['id']}/events?after=2", headers=auth).json()
    assert [e["data"]["status"] for e in rest["data"]] == ["succeeded"]
    with client.stream(
        "GET", f"/jobs/{job['id']}/events", headers={**auth, "Accept": "text/event-stream"}
    ) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        body = "".join(stream.iter_text())
    assert body.count("event: state") == 3 and "id: 3" in body
    # An EventSource reconnecting sends the last id it saw: the stream goes on after it.
    resumed = {**auth, "Accept": "text/event-stream", "Last-Event-ID": "2"}
    with client.stream("GET", f"/jobs/{job['id']}/events", headers=resumed) as stream:
        body = "".join(stream.iter_text())
    assert body.count("event: state") == 1 and "id: 3" in body and "id: 2" not in body
