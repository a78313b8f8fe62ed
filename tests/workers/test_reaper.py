"""Jobs whose worker died are requeued by the heartbeat's reaper, up to the attempt cap."""

from __future__ import annotations

import subprocess
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import select, update

from service import lifecycle
from service.auth import authenticate
from service.db import transaction, utcnow
from service.models import Job, JobEvent
from tests.conftest import Stack, wait_for


def _tenant(stack: Stack, auth: dict[str, str]) -> str:
    with stack.session_factory() as session:
        principal = authenticate(session, auth["Authorization"].split()[1])
        assert principal is not None
        return principal.tenant_id


def _orphan(stack: Stack, auth: dict[str, str], *, attempts: int, max_attempts: int) -> str:
    """A ping job 'running' on a worker that died: its lease expired a while ago."""
    with transaction(stack.session_factory) as session:
        job = lifecycle.create_job(
            session,
            tenant_id=_tenant(stack, auth),
            kind="ping",
            queue="generate",
            max_attempts=max_attempts,
        )
        session.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(
                status="running",
                attempts=attempts,
                lease_owner="dead-host:1",
                lease_expires_at=utcnow() - timedelta(seconds=30),
                started_at=utcnow(),
            )
        )
        return job.id


def test_stale_job_is_requeued_and_completes(
    client: TestClient, auth: dict[str, str], stack: Stack, worker: subprocess.Popen[bytes]
) -> None:
    job_id = _orphan(stack, auth, attempts=1, max_attempts=3)
    done = wait_for(
        lambda: (
            (j := client.get(f"/jobs/{job_id}", headers=auth).json())["status"] == "succeeded" and j
        ),
        timeout=60,
        what="the reaper to requeue the job",
    )
    assert done["attempts"] == 2
    with stack.session_factory() as session:
        events = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
        ).all()
    requeue = [e for e in events if e.data.get("reason") == "worker_lost"]
    assert len(requeue) == 1 and requeue[0].data["worker"] == "dead-host:1"


def test_job_out_of_attempts_fails(
    client: TestClient, auth: dict[str, str], stack: Stack, worker: subprocess.Popen[bytes]
) -> None:
    job_id = _orphan(stack, auth, attempts=2, max_attempts=2)
    failed = wait_for(
        lambda: (
            (j := client.get(f"/jobs/{job_id}", headers=auth).json())["status"] == "failed" and j
        ),
        timeout=60,
        what="the reaper to fail the job",
    )
    assert failed["error"]["code"] == "worker_lost"
    assert "attempt cap 2" in failed["error"]["message"]
