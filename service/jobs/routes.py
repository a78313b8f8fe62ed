"""HTTP routes for jobs (status, list, events, cancel) and the ping round trip."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from service import lifecycle
from service.deps import AppSettings, Caller, Paging, UoW
from service.idempotency import REPLAYED_HEADER, IdempotencyKeyHeader, create_once
from service.jobs import training
from service.jobs.schemas import JobEventList, JobEventOut, JobList, JobOut
from service.jobs.service import get_job, list_events, list_jobs
from service.jobs.training_schemas import (
    CheckpointList,
    CheckpointOut,
    TrainingPlanOut,
    TrainJobCreate,
)
from service.models import FINAL_JOB_STATUSES, Checkpoint, Dataset, JobKind, JobStatus
from service.problems import COMMON_ERRORS, problem_responses
from service.queue import QUEUES
from service.strict_input import SQL_INT_MAX, StrictInputRoute

router = APIRouter(
    tags=["jobs"], route_class=StrictInputRoute, responses=problem_responses(*COMMON_ERRORS)
)


@router.get("/jobs", operation_id="list_jobs", response_model=JobList)
def list_jobs_route(
    uow: UoW,
    caller: Caller,
    page: Paging,
    kind: Annotated[JobKind | None, Query()] = None,
    status: Annotated[JobStatus | None, Query()] = None,
) -> JobList:
    rows, has_more = list_jobs(
        uow.session,
        tenant_id=caller.tenant_id,
        limit=page.limit,
        after=page.after,
        kind=kind.value if kind else None,
        status=status.value if status else None,
    )
    return JobList(
        data=[
            JobOut.from_row(j, queue_position=lifecycle.queue_position(uow.session, j))
            for j in rows
        ],
        has_more=has_more,
    )


@router.post(
    "/jobs",
    operation_id="create_training_job",
    status_code=201,
    response_model=JobOut | TrainingPlanOut,
    responses={
        200: {"model": TrainingPlanOut, "description": "the plan, for dry_run"},
        **problem_responses(404, 409, 415, 429),
    },
)
async def create_job_route(
    body: TrainJobCreate,
    request: Request,
    response: Response,
    uow: UoW,
    caller: Caller,
    settings: AppSettings,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobOut | TrainingPlanOut:
    """Queue a LoRA training run on a dataset; its result becomes the adapter's next version."""

    def validate() -> tuple[Dataset, str, str]:
        return training.validate_training_request(
            uow.session, settings=settings, tenant_id=caller.tenant_id, body=body
        )

    dataset, base_model, source = await run_in_threadpool(validate)
    planning = functools.partial(
        training.plan_training,
        settings=settings,
        body=body,
        dataset=dataset,
        base_model=base_model,
        source=source,
    )
    if body.dry_run:
        response.status_code = 200
        return await run_in_threadpool(planning)

    def admit() -> TrainingPlanOut | None:
        plan = training.plan_for_admission(settings, planning)
        if plan is not None:
            limit = training.training_memory_limit(uow.session, settings)
            training.admit_by_plan(plan, settings=settings, memory_limit=limit)
        return plan

    plan = await run_in_threadpool(admit)

    def create() -> tuple[JobOut, bool]:
        job_id, created = create_once(
            uow.session,
            tenant_id=caller.tenant_id,
            scope="POST /jobs",
            key=idempotency_key,
            payload=body.model_dump(mode="json"),
            create=lambda: (
                training.create_training_job(
                    uow.session,
                    settings=settings,
                    tenant_id=caller.tenant_id,
                    body=body,
                    dataset=dataset,
                    base_model=base_model,
                    plan=plan,
                ).id
            ),
        )
        if created:
            uow.commit()  # sends the new job's task
        job = get_job(uow.session, tenant_id=caller.tenant_id, job_id=job_id)
        position = lifecycle.queue_position(uow.session, job)
        return JobOut.from_row(job, queue_position=position), created

    out, created = await run_in_threadpool(create)
    if not created:
        response.headers[REPLAYED_HEADER] = "true"
    return out


@router.get(
    "/jobs/{job_id}/checkpoints",
    operation_id="list_job_checkpoints",
    response_model=CheckpointList,
    responses=problem_responses(404),
)
def list_checkpoints_route(job_id: str, uow: UoW, caller: Caller) -> CheckpointList:
    job = get_job(uow.session, tenant_id=caller.tenant_id, job_id=job_id)
    rows = uow.session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == job.id).order_by(Checkpoint.step)
    ).all()
    return CheckpointList(
        data=[CheckpointOut(step=r.step, metrics=r.metrics, created_at=r.created_at) for r in rows]
    )


@router.get(
    "/jobs/{job_id}",
    operation_id="get_job",
    response_model=JobOut,
    responses=problem_responses(404),
)
def get_job_route(job_id: str, uow: UoW, caller: Caller) -> JobOut:
    job = get_job(uow.session, tenant_id=caller.tenant_id, job_id=job_id)
    return JobOut.from_row(job, queue_position=lifecycle.queue_position(uow.session, job))


@router.post(
    "/jobs/{job_id}/cancel",
    operation_id="cancel_job",
    response_model=JobOut,
    responses=problem_responses(404, 409),
)
def cancel_job_route(job_id: str, uow: UoW, caller: Caller) -> JobOut:
    job = get_job(uow.session, tenant_id=caller.tenant_id, job_id=job_id)
    lifecycle.request_cancel(uow.session, job=job)
    uow.commit()
    return JobOut.from_row(job, queue_position=lifecycle.queue_position(uow.session, job))


@router.get(
    "/jobs/{job_id}/events",
    operation_id="list_job_events",
    response_model=JobEventList,
    responses={200: {"content": {"text/event-stream": {}}}, **problem_responses(404)},
)
def job_events_route(
    request: Request,
    job_id: str,
    uow: UoW,
    caller: Caller,
    after: Annotated[
        int, Query(ge=0, le=SQL_INT_MAX, description="return events with seq > after")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    last_event_id: Annotated[
        int | None,
        Header(
            alias="Last-Event-ID",
            ge=0,
            le=SQL_INT_MAX,
            description="SSE reconnection: stream events with seq > this (overrides `after`)",
        ),
    ] = None,
) -> JobEventList | StreamingResponse:
    job = get_job(uow.session, tenant_id=caller.tenant_id, job_id=job_id)
    if "text/event-stream" in request.headers.get("accept", ""):
        # An EventSource that reconnects sends the id of the last event it received.
        if last_event_id is not None:
            after = last_event_id
        factory = request.app.state.session_factory
        return StreamingResponse(
            _stream_events(factory, job_id=job.id, after=after, request=request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    rows, has_more = list_events(uow.session, job_id=job.id, after=after, limit=limit)
    return JobEventList(data=[JobEventOut.from_row(e) for e in rows], has_more=has_more)


async def _stream_events(
    factory: object, *, job_id: str, after: int, request: Request, poll_s: float = 0.5
) -> AsyncIterator[str]:
    """Server-sent events read from SQL; ends after the job's terminal state event."""
    from sqlalchemy.orm import Session, sessionmaker

    assert isinstance(factory, sessionmaker)

    def fetch(cursor: int) -> tuple[list[JobEventOut], str]:
        session: Session = factory()
        try:
            rows, _ = list_events(session, job_id=job_id, after=cursor, limit=500)
            status = get_status(session)
            return [JobEventOut.from_row(r) for r in rows], status
        finally:
            session.close()

    def get_status(session: Session) -> str:
        from service.models import Job

        job = session.get(Job, job_id)
        return job.status if job else JobStatus.FAILED.value

    cursor = after
    last_beat = time.monotonic()
    while True:
        events, status = await run_in_threadpool(fetch, cursor)
        for event in events:
            cursor = event.seq
            yield f"id: {event.seq}\nevent: {event.type}\ndata: {event.model_dump_json()}\n\n"
        if not events and status in FINAL_JOB_STATUSES:
            return
        if await request.is_disconnected():
            return
        if time.monotonic() - last_beat > 15:
            last_beat = time.monotonic()
            yield ": keep-alive\n\n"
        await asyncio.sleep(poll_s)


@router.post(
    "/ping",
    operation_id="ping",
    response_model=JobOut,
    status_code=200,
    tags=["health"],
    responses=problem_responses(503),
)
async def ping_route(
    uow: UoW,
    caller: Caller,
    queue: Annotated[Literal["train", "generate"], Query()] = "generate",
    wait: Annotated[float, Query(ge=0, le=60, description="seconds to wait for the pong")] = 10,
) -> JobOut:
    """Send a trivial task through Redis to a worker and back through SQL."""
    assert queue in QUEUES

    def create() -> str:
        job = lifecycle.create_job(
            uow.session,
            tenant_id=caller.tenant_id,
            kind=JobKind.PING.value,
            queue=queue,
            max_attempts=1,
        )
        uow.commit()  # sends its task
        return job.id

    job_id = await run_in_threadpool(create)
    deadline = time.monotonic() + wait
    while True:

        def read() -> JobOut:
            uow.session.expire_all()
            job = get_job(uow.session, tenant_id=caller.tenant_id, job_id=job_id)
            out = JobOut.from_row(job)
            uow.session.rollback()
            return out

        out = await run_in_threadpool(read)
        if out.status in FINAL_JOB_STATUSES or time.monotonic() >= deadline:
            return out
        await asyncio.sleep(0.05)
