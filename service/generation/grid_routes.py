"""POST /grids: a labeled image grid, rendered as a job (202 + poll, or wait for it)."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service import lifecycle
from service.deps import AppSettings, Caller, Store, UoW
from service.generation.grids import GridCreate, GridOut, create_grid_job, grid_answer
from service.generation.service import failed_job_problem
from service.idempotency import REPLAYED_HEADER, IdempotencyKeyHeader, create_once
from service.jobs.schemas import JobOut
from service.jobs.service import get_job
from service.models import FINAL_JOB_STATUSES, Job, JobStatus
from service.problems import COMMON_ERRORS, problem_responses
from service.strict_input import StrictInputRoute

router = APIRouter(
    tags=["generation"], route_class=StrictInputRoute, responses=problem_responses(*COMMON_ERRORS)
)

_POLL_S = 0.1


@router.post(
    "/grids",
    operation_id="create_grid",
    response_model=GridOut,
    responses={
        202: {"model": JobOut, "description": "not finished within `wait`: poll the job"},
        **problem_responses(404, 429),
    },
)
async def create_grid_route(
    body: GridCreate,
    request: Request,
    uow: UoW,
    caller: Caller,
    settings: AppSettings,
    store: Store,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Render one labeled PNG of cells over two axes (prompts, seeds, adapter refs, weights)."""

    def create() -> tuple[str, bool]:
        job_id, created = create_once(
            uow.session,
            tenant_id=caller.tenant_id,
            scope="POST /grids",
            key=idempotency_key,
            payload=body.model_dump(mode="json"),
            create=lambda: (
                create_grid_job(
                    uow.session,
                    settings=settings,
                    store=store,
                    tenant_id=caller.tenant_id,
                    body=body,
                ).id
            ),
        )
        uow.commit()  # sends the new job's task
        return job_id, created

    def read(job_id: str) -> Job:
        uow.session.expire_all()
        job = get_job(uow.session, tenant_id=caller.tenant_id, job_id=job_id)
        uow.session.commit()  # end the read
        return job

    job_id, created = await run_in_threadpool(create)
    headers = {} if created else {REPLAYED_HEADER: "true"}
    deadline = time.monotonic() + body.wait
    while True:
        job = await run_in_threadpool(read, job_id)
        if job.status in FINAL_JOB_STATUSES or time.monotonic() >= deadline:
            break
        await asyncio.sleep(_POLL_S)
    if job.status == JobStatus.SUCCEEDED.value:
        answer = grid_answer(job, base_url=str(request.base_url))
        return Response(answer.model_dump_json(), media_type="application/json", headers=headers)
    if job.status == JobStatus.FAILED.value:
        problem = failed_job_problem(job)
        problem.headers.update(headers)
        raise problem

    def unfinished() -> JobOut:
        out = JobOut.from_row(job, queue_position=lifecycle.queue_position(uow.session, job))
        uow.session.commit()
        return out

    out = await run_in_threadpool(unfinished)
    return JSONResponse(
        out.model_dump(mode="json"),
        status_code=202,
        headers={**headers, "Location": f"/jobs/{job.id}"},
    )
