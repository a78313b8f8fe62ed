"""Job rows written by the lifecycle's Core statements, read back through the ORM (real SQL)."""

from __future__ import annotations

import secrets

from sqlalchemy import select

from service import lifecycle
from service.auth import get_or_create_tenant
from service.db import transaction
from service.models import Job, JobEvent, JobStatus
from tests.conftest import Stack


def _tenant(stack: Stack) -> str:
    with transaction(stack.session_factory) as session:
        return get_or_create_tenant(session, f"t-{secrets.token_hex(4)}").id


def _columns(job: Job) -> dict[str, object]:
    return {c.key: getattr(job, c.key) for c in lifecycle.JOB_TABLE.columns}


def test_a_created_job_is_the_committed_row_with_its_first_event(stack: Stack) -> None:
    tenant_id = _tenant(stack)
    with transaction(stack.session_factory) as session:
        job = lifecycle.create_job(
            session, tenant_id=tenant_id, kind="ping", queue="generate", params={"a": [1, 2]}
        )
        assert job in session and not session.dirty and not session.new
        created = _columns(job)
    with stack.session_factory() as session:
        row = session.get_one(Job, job.id)
        assert _columns(row) == created
        assert row.status == JobStatus.QUEUED.value and row.progress == {} and row.attempts == 0
        # Absent JSON is SQL NULL, not JSON null.
        assert session.scalar(select(Job.id).where(Job.id == job.id, Job.result.is_(None)))
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job.id)).all()
        assert [(e.seq, e.type, e.data) for e in events] == [(1, "state", {"status": "queued"})]


def test_lease_and_finish_move_the_row_and_number_their_events(stack: Stack) -> None:
    tenant_id = _tenant(stack)
    with transaction(stack.session_factory) as session:
        ids = [
            lifecycle.create_job(session, tenant_id=tenant_id, kind="ping", queue="generate").id
            for _ in range(3)
        ]
    with transaction(stack.session_factory) as session:
        leased = lifecycle.take_leases(session, job_ids=ids[:2], owner="w1", lease_s=60)
        assert sorted(j.id for j in leased) == ids[:2] and {j.attempts for j in leased} == {1}
        # Taken jobs can't be taken again; the third still can.
        assert lifecycle.take_leases(session, job_ids=ids, owner="w2", lease_s=60)[0].id == ids[2]
    with transaction(stack.session_factory) as session:
        failed = lifecycle.finish_job(
            session,
            job_id=ids[0],
            owner="w1",
            status=JobStatus.FAILED,
            error_code="bad",
            error_message="no",
        )
        assert failed is not None and failed.result is None
        assert (
            lifecycle.finish_job(session, job_id=ids[1], owner="w2", status=JobStatus.FAILED)
            is None
        )
    with stack.session_factory() as session:
        row = session.get_one(Job, ids[0])
        assert (row.status, row.error_code, row.error_message, row.lease_owner) == (
            "failed",
            "bad",
            "no",
            None,
        )
        assert session.scalar(select(Job.id).where(Job.id == ids[0], Job.result.is_(None)))
        events = session.scalars(
            select(JobEvent).where(JobEvent.job_id == ids[0]).order_by(JobEvent.seq)
        ).all()
        assert [(e.seq, e.data["status"]) for e in events] == [
            (1, "queued"),
            (2, "running"),
            (3, "failed"),
        ]
        assert events[-1].level == "error" and events[-1].data["error"]["code"] == "bad"


def test_an_applied_outcome_is_the_committed_row_and_writes_nothing(stack: Stack) -> None:
    tenant_id = _tenant(stack)
    with transaction(stack.session_factory) as session:
        job = lifecycle.create_job(session, tenant_id=tenant_id, kind="ping", queue="generate")
    with transaction(stack.session_factory) as session:
        assert lifecycle.take_lease(session, job_id=job.id, owner="w", lease_s=60) is not None
        outcome = lifecycle.finish_job(
            session,
            job_id=job.id,
            owner="w",
            status=JobStatus.SUCCEEDED,
            result={"images": [{"id": "img_9", "seed": 3}]},
        )
    assert outcome is not None
    # `job` is as this process created it (queued); the outcome brings it to the committed row.
    with stack.session_factory() as session:
        session.add(job)
        outcome.apply_to(job)
        assert not session.dirty
        session.commit()
    with stack.session_factory() as session:
        row = session.get_one(Job, job.id)
        committed = (row.status, row.result, row.finished_at, row.error_code)
    assert (job.status, job.result, job.finished_at, job.error_code) == committed
    # Finishing again is refused: the lease is gone.
    with transaction(stack.session_factory) as session:
        assert (
            lifecycle.finish_job(session, job_id=job.id, owner="w", status=JobStatus.FAILED) is None
        )
