"""Job state in SQL, the only source of truth: leases, heartbeats, events, the reaper.

Every transition is a conditional UPDATE, so two workers (or a duplicate delivery of one
message) can never both run a job, and a terminal state is never left.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Executable, Table, bindparam, func, insert, select, update
from sqlalchemy.orm import Session, make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.sql.elements import BindParameter

from service.db import new_id, utcnow
from service.models import FINAL_JOB_STATUSES, Job, JobEvent, JobStatus
from service.queue import enqueue_after_commit


def _changed(session: Session, statement: Executable) -> int:
    """Rows matched by a conditional UPDATE (1 = we won the transition)."""
    result = cast(CursorResult[Any], session.execute(statement))
    return int(result.rowcount)


RUNNING_STATES = (JobStatus.RUNNING.value, JobStatus.CANCEL_REQUESTED.value)


# Creating, leasing and finishing a job are on every generation request's path, so they are
# Core statements on the tables, built once and run with bound parameters: building a statement
# and its cache key per call, or the ORM's unit-of-work flush and bulk UPDATE ... RETURNING,
# cost more than the SQL itself here (docs/benchmarks.md, service overhead).
JOB_TABLE = cast(Table, Job.__table__)
EVENT_TABLE = cast(Table, JobEvent.__table__)
_job = JOB_TABLE.c
_INSERT_JOB = insert(JOB_TABLE)
_INSERT_EVENTS = insert(EVENT_TABLE)


def create_job(
    session: Session,
    *,
    tenant_id: str,
    kind: str,
    queue: str,
    params: dict[str, Any] | None = None,
    max_attempts: int = 3,
    dataset_id: str | None = None,
    base_model: str | None = None,
    adapter_name: str | None = None,
    job_id: str | None = None,
    experiment_id: str | None = None,
) -> Job:
    """Insert a queued job and its first event; returns the job, persistent in ``session``.
    Its task is sent when the session commits.

    Every column is given here, so the rows go in as two Core INSERTs and the instance joins
    the session as already persistent, with nothing left to load or flush.
    """
    now = utcnow()
    job = Job(
        id=job_id or new_id("job"),
        tenant_id=tenant_id,
        kind=kind,
        status=JobStatus.QUEUED.value,
        queue=queue,
        dataset_id=dataset_id,
        base_model=base_model,
        adapter_name=adapter_name,
        params=params or {},
        attempts=0,
        max_attempts=max_attempts,
        lease_owner=None,
        lease_expires_at=None,
        heartbeat_at=None,
        progress={},
        error_code=None,
        error_message=None,
        result=None,
        event_seq=1,  # its first event, inserted with it: no sequence UPDATE
        created_at=now,
        queued_at=now,
        started_at=None,
        finished_at=None,
        cancel_requested_at=None,
        experiment_id=experiment_id,
    )
    session.flush()  # a Core statement doesn't autoflush: rows it refers to go in first
    # Columns left out are SQL NULL (a JSON column given None would hold JSON null).
    values = {c.key: getattr(job, c.key) for c in JOB_TABLE.columns}
    session.execute(_INSERT_JOB, {k: v for k, v in values.items() if v is not None})
    _insert_state_events(
        session, [(job.id, 1, {"status": JobStatus.QUEUED.value}, "info")], now=now
    )
    make_transient_to_detached(job)
    session.add(job)
    enqueue_after_commit(session, job_id=job.id, kind=kind, queue=queue)
    return job


def _insert_state_events(
    session: Session, events: Sequence[tuple[str, int, dict[str, Any], str]], *, now: datetime
) -> None:
    """State events (job id, reserved seq, data, level) in one INSERT."""
    session.execute(
        _INSERT_EVENTS,
        [
            {
                "job_id": job_id,
                "seq": seq,
                "type": "state",
                "level": level,
                "data": data,
                "created_at": now,
            }
            for job_id, seq, data, level in events
        ],
    )


def add_event(
    session: Session, *, job_id: str, type: str, data: dict[str, Any], level: str = "info"
) -> int:
    """Append an event with the job's next sequence number (atomic across processes)."""
    seq = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(event_seq=Job.event_seq + 1)
        .returning(Job.event_seq)
    ).scalar_one()
    session.add(JobEvent(job_id=job_id, seq=seq, type=type, level=level, data=data))
    session.flush()
    return int(seq)


@dataclass(frozen=True)
class LeasedJob:
    """What a worker needs of a job it has just leased (read by the leasing statement)."""

    id: str
    tenant_id: str
    kind: str
    base_model: str | None
    dataset_id: str | None
    adapter_name: str | None
    params: dict[str, Any]
    attempts: int
    queued_at: datetime
    started_at: datetime


_now = bindparam("now", type_=_job.heartbeat_at.type)  # typed: it also stands in coalesce()
_LEASE = (
    update(JOB_TABLE)
    .where(_job.status == JobStatus.QUEUED.value, _job.id.in_(bindparam("job_ids", expanding=True)))
    .values(
        status=JobStatus.RUNNING.value,
        lease_owner=bindparam("owner"),
        lease_expires_at=bindparam("lease_expires_at"),
        heartbeat_at=_now,
        attempts=_job.attempts + 1,
        started_at=func.coalesce(_job.started_at, _now),
        event_seq=_job.event_seq + 1,
    )
    .returning(*(_job[f.name] for f in fields(LeasedJob)), _job.event_seq)
)


def take_lease(session: Session, *, job_id: str, owner: str, lease_s: float) -> LeasedJob | None:
    """Claim a queued job. Returns None when it is not queued (taken, cancelled, finished)."""
    jobs = take_leases(session, job_ids=[job_id], owner=owner, lease_s=lease_s)
    return jobs[0] if jobs else None


def take_leases(
    session: Session, *, job_ids: Sequence[str], owner: str, lease_s: float
) -> list[LeasedJob]:
    """Claim every job of ``job_ids`` that is still queued, in one statement; returns those
    claimed (in no particular order), each with its "running" event added."""
    now = utcnow()
    rows = session.execute(
        _LEASE,
        {
            "job_ids": list(job_ids),
            "owner": owner,
            "lease_expires_at": now + timedelta(seconds=lease_s),
            "now": now,
        },
    ).all()
    if not rows:
        return []
    jobs = [LeasedJob(*row[:-1]) for row in rows]
    _insert_state_events(
        session,
        [
            (
                job.id,
                row[-1],
                {"status": JobStatus.RUNNING.value, "attempt": job.attempts, "worker": owner},
                "info",
            )
            for job, row in zip(jobs, rows, strict=True)
        ],
        now=now,
    )
    return jobs


def renew_lease(session: Session, *, job_id: str, owner: str, lease_s: float) -> str | None:
    """Heartbeat a held job; returns its status (to see a cancel), or None if the lease was lost."""
    now = utcnow()
    renewed = _changed(
        session,
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status.in_(RUNNING_STATES))
        .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False),
    )
    if renewed != 1:
        return None
    return session.scalar(select(Job.status).where(Job.id == job_id))


@functools.cache
def _finish_statement(with_result: bool, with_error: bool) -> Executable:
    """The finishing UPDATE; ``result`` and the error are set only when given, so a column not
    given keeps SQL NULL rather than JSON null."""
    extra: dict[str, BindParameter[Any]] = {}
    if with_result:
        extra["result"] = bindparam("result")
    if with_error:
        extra["error_code"] = bindparam("error_code")
        extra["error_message"] = bindparam("error_message")
    return (
        update(JOB_TABLE)
        .where(
            _job.id == bindparam("job_id"),
            _job.lease_owner == bindparam("owner"),
            _job.status.in_(RUNNING_STATES),
        )
        .values(
            status=bindparam("status"),
            finished_at=bindparam("finished_at"),
            lease_owner=None,
            lease_expires_at=None,
            event_seq=_job.event_seq + 1,
            **extra,
        )
        .returning(_job.event_seq)
    )


@dataclass(frozen=True)
class JobOutcome:
    """A job's final state as committed by ``finish_job``; the job-done notification carries it
    so the request waiting for the job can answer without reading the row back."""

    status: str
    finished_at: datetime
    result: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "finished_at": self.finished_at.isoformat()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobOutcome:
        return cls(**{**data, "finished_at": datetime.fromisoformat(data["finished_at"])})

    def apply_to(self, job: Job) -> None:
        """Set these values on ``job`` as loaded state (no change to flush): the row as
        committed, for a session that holds the job from before it finished."""
        for name, value in asdict(self).items():
            set_committed_value(job, name, value)


def finish_job(
    session: Session,
    *,
    job_id: str,
    owner: str,
    status: JobStatus,
    result: dict[str, Any] | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
) -> JobOutcome | None:
    """Move a held job to a terminal state; returns its outcome, or None if this owner no
    longer holds it."""
    assert status in FINAL_JOB_STATUSES
    outcome = JobOutcome(
        status=status.value,
        finished_at=utcnow(),
        result=result,
        error_code=error_code,
        error_message=error_message if error_code is not None else None,
    )
    # Only the statement's own parameters: a key named like a column would be SET as well.
    params: dict[str, Any] = {
        "job_id": job_id,
        "owner": owner,
        "status": outcome.status,
        "finished_at": outcome.finished_at,
    }
    if result is not None:
        params["result"] = result
    if error_code is not None:
        params |= {"error_code": error_code, "error_message": error_message}
    seq = session.execute(
        _finish_statement(result is not None, error_code is not None), params
    ).scalar()
    if seq is None:
        return None
    data: dict[str, Any] = {"status": status.value}
    if error_code:
        data["error"] = {"code": error_code, "message": error_message}
    level = "error" if status is JobStatus.FAILED else "info"
    _insert_state_events(session, [(job_id, seq, data, level)], now=outcome.finished_at)
    return outcome


def request_cancel(session: Session, *, job: Job) -> None:
    """Cancel a queued job at once; ask a running one to stop at its next step."""
    now = utcnow()
    if job.status == JobStatus.QUEUED.value:
        changed = _changed(
            session,
            update(Job)
            .where(Job.id == job.id, Job.status == JobStatus.QUEUED.value)
            .values(status=JobStatus.CANCELLED.value, finished_at=now, cancel_requested_at=now)
            .execution_options(synchronize_session=False),
        )
        if changed:
            add_event(
                session, job_id=job.id, type="state", data={"status": JobStatus.CANCELLED.value}
            )
            session.refresh(job)
            return
        session.refresh(job)
    if job.status == JobStatus.RUNNING.value:
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == JobStatus.RUNNING.value)
            .values(status=JobStatus.CANCEL_REQUESTED.value, cancel_requested_at=now)
            .execution_options(synchronize_session=False)
        )
        add_event(
            session, job_id=job.id, type="state", data={"status": JobStatus.CANCEL_REQUESTED.value}
        )
        session.refresh(job)


@dataclass(frozen=True)
class Requeued:
    job_id: str
    queue: str
    kind: str


def reap_stale_jobs(session: Session, *, now: datetime | None = None) -> list[Requeued]:
    """Requeue running jobs whose lease expired (their worker died); fail those out of attempts.

    Returns the requeued jobs; their tasks are sent again when the session commits.
    """
    now = now or utcnow()
    stale = session.scalars(
        select(Job).where(Job.status.in_(RUNNING_STATES), Job.lease_expires_at < now)
    ).all()
    requeued: list[Requeued] = []
    for job in stale:
        lost: dict[str, Any] = {"worker": job.lease_owner, "attempt": job.attempts}
        values: dict[str, Any]
        if job.status == JobStatus.CANCEL_REQUESTED.value:
            values, level = {"status": JobStatus.CANCELLED.value, "finished_at": now}, "info"
        elif job.attempts >= job.max_attempts:
            values, level = (
                {
                    "status": JobStatus.FAILED.value,
                    "finished_at": now,
                    "error_code": "worker_lost",
                    "error_message": (
                        f"the worker running this job was lost {job.attempts} times "
                        f"(attempt cap {job.max_attempts})"
                    ),
                },
                "error",
            )
        else:
            values, level = {"status": JobStatus.QUEUED.value, "queued_at": now}, "warning"
            lost["reason"] = "worker_lost"
        # Conditional on the state we read: a concurrent reaper or a late heartbeat wins.
        taken = _changed(
            session,
            update(Job)
            .where(
                Job.id == job.id,
                Job.status == job.status,
                Job.lease_owner == job.lease_owner,
                Job.lease_expires_at < now,
            )
            .values(lease_owner=None, lease_expires_at=None, **values)
            .execution_options(synchronize_session=False),
        )
        if not taken:
            continue
        add_event(
            session,
            job_id=job.id,
            type="state",
            level=level,
            data={"status": values["status"], **lost},
        )
        if values["status"] == JobStatus.QUEUED.value:
            requeued.append(Requeued(job_id=job.id, queue=job.queue, kind=job.kind))
            enqueue_after_commit(session, job_id=job.id, kind=job.kind, queue=job.queue)
    return requeued


def queue_position(session: Session, job: Job) -> int | None:
    """1-based position among queued jobs of the same queue (None unless queued)."""
    if job.status != JobStatus.QUEUED.value:
        return None
    ahead = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(
            Job.queue == job.queue,
            Job.status == JobStatus.QUEUED.value,
            Job.queued_at < job.queued_at,
        )
    )
    return int(ahead or 0) + 1
