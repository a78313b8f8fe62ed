"""Job queries and commands, scoped by tenant."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import NotFound
from service.models import Job, JobEvent


def get_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))
    if job is None:
        raise NotFound(f"job {job_id!r} not found")
    return job


def list_jobs(
    session: Session,
    *,
    tenant_id: str,
    limit: int,
    after: str | None,
    kind: str | None = None,
    status: str | None = None,
) -> tuple[Sequence[Job], bool]:
    query = select(Job).where(Job.tenant_id == tenant_id)
    if kind:
        query = query.where(Job.kind == kind)
    if status:
        query = query.where(Job.status == status)
    if after:
        query = query.where(Job.id < after)
    rows = session.scalars(query.order_by(Job.id.desc()).limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit


def list_events(
    session: Session, *, job_id: str, after: int, limit: int
) -> tuple[Sequence[JobEvent], bool]:
    rows = session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.seq > after)
        .order_by(JobEvent.seq)
        .limit(limit + 1)
    ).all()
    return rows[:limit], len(rows) > limit
