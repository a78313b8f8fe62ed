"""POST /generate, POST /v1/images/generations (OpenAI-compatible), GET /images/{id}."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from service import lifecycle
from service.db import new_id
from service.deps import AppSettings, Caller, Store, UoW
from service.errors import NotFound, ServiceUnavailable, Unprocessable, field_error
from service.generation.retries import OpenAIRetries
from service.generation.schemas import (
    GenerateOut,
    GenerateRequest,
    OpenAIImage,
    OpenAIImageRequest,
    OpenAIImagesResponse,
)
from service.generation.service import (
    create_generation_job,
    failed_job_problem,
    generation_answer,
    get_image,
)
from service.idempotency import REPLAYED_HEADER, IdempotencyKeyHeader, create_once
from service.jobs.schemas import JobOut
from service.jobs.service import get_job
from service.models import FINAL_JOB_STATUSES, Job, JobStatus
from service.notify import DoneListener, wait_for
from service.problems import COMMON_ERRORS, problem_responses
from service.storage import ArtifactStore
from service.strict_input import StrictInputRoute

router = APIRouter(
    tags=["generation"], route_class=StrictInputRoute, responses=problem_responses(*COMMON_ERRORS)
)


async def _run(
    request: Request,
    uow: UoW,
    *,
    tenant_id: str,
    body: GenerateRequest,
    wait_s: float,
    idempotency_key: str | None,
    attach_to: str | None = None,
    on_created: Callable[[str], Awaitable[None]] | None = None,
) -> tuple[Job, bool]:
    """Create the job, send it, and wait up to ``wait_s`` for it to finish; returns the job as
    committed then (succeeded, failed, or still queued or running) and whether the request
    was a replay of an earlier one with the same Idempotency-Key. With ``attach_to`` (a job an
    earlier attempt of this request created), wait for that job instead."""
    settings = request.app.state.settings
    listener: DoneListener = request.app.state.done_listener
    new_job_id = attach_to or new_id("job")

    def create_and_commit() -> tuple[str, Job | None]:
        """(id of the job to wait for, the job if this request created it)."""
        if attach_to is not None:
            return attach_to, None
        made: list[Job] = []

        def create() -> str:
            job = create_generation_job(
                uow.session,
                settings=settings,
                store=request.app.state.store,
                tenant_id=tenant_id,
                body=body,
                job_id=new_job_id,
            )
            made.append(job)  # kept: the session's identity map holds it only weakly
            return job.id

        job_id, is_new = create_once(
            uow.session,
            tenant_id=tenant_id,
            scope="POST /generate",
            key=idempotency_key,
            payload=body.model_dump(mode="json"),
            create=create,
        )
        uow.commit()  # sends the new job's task
        return job_id, made[0] if is_new else None

    def read() -> Job:
        """The job as committed now (the worker updates it from another process)."""
        uow.session.expire_all()
        job = get_job(uow.session, tenant_id=tenant_id, job_id=job_id)
        uow.session.commit()  # end the read; nothing is expired (expire_on_commit=False)
        return job

    # Wait for the notification registered before the message goes out, so it can't be missed.
    # A replayed Idempotency-Key names an earlier job, perhaps long finished: read it at once,
    # then poll it (its notification, if any, was for the first request).
    with listener.waiting(new_job_id) as waiter:
        job_id, created = await run_in_threadpool(create_and_commit)
        if created is not None and on_created is not None:
            await on_created(job_id)
        wait_first = created is not None
        deadline = time.monotonic() + wait_s
        while True:
            if wait_first:
                remaining = max(deadline - time.monotonic(), 0.0)
                await wait_for(waiter, min(remaining, settings.generate_poll_s))
                waiter.clear()
            wait_first = True
            notified = waiter.outcome
            if created is not None and notified and notified.status == JobStatus.SUCCEEDED.value:
                # The worker committed this success and said so: no need to read it back.
                notified.apply_to(created)
                return created, False
            job = await run_in_threadpool(read)
            if job.status in FINAL_JOB_STATUSES or time.monotonic() >= deadline:
                return job, created is None


async def _answer(
    request: Request, uow: UoW, store: ArtifactStore, *, job: Job, response_format: str
) -> GenerateOut:
    """The answer for a succeeded job. Image URLs need neither SQL nor files, so they are built
    on the event loop; base64 images are read in the thread pool."""
    base_url = str(request.base_url)

    def build() -> GenerateOut:
        return generation_answer(
            uow.session, job=job, store=store, response_format=response_format, base_url=base_url
        )

    if response_format == "url":
        return build()

    def build_and_end_read() -> GenerateOut:
        answer = build()
        uow.session.commit()  # end the read of the image rows
        return answer

    return await run_in_threadpool(build_and_end_read)


@router.post(
    "/generate",
    operation_id="generate",
    response_model=GenerateOut,
    responses={
        202: {"model": JobOut, "description": "not finished within `wait`: poll the job"},
        **problem_responses(404, 429, 503),
    },
)
async def generate_route(
    body: GenerateRequest,
    request: Request,
    uow: UoW,
    caller: Caller,
    settings: AppSettings,
    store: Store,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Generate images with any mix of adapters on the shared base model."""
    wait_s = settings.generate_default_wait_s if body.wait is None else body.wait
    if wait_s > settings.generate_max_wait_s:
        raise field_error(
            "wait",
            f"over the limit {settings.generate_max_wait_s} (LORASTACK_GENERATE_MAX_WAIT_S)",
            code="limit_exceeded",
        )
    job, replayed = await _run(
        request,
        uow,
        tenant_id=caller.tenant_id,
        body=body,
        wait_s=wait_s,
        idempotency_key=idempotency_key,
    )
    headers = {REPLAYED_HEADER: "true"} if replayed else {}
    if job.status == JobStatus.SUCCEEDED.value:
        answer = await _answer(request, uow, store, job=job, response_format=body.response_format)
        # Already a validated GenerateOut: serialize it once, without FastAPI validating it again.
        return Response(answer.model_dump_json(), media_type="application/json", headers=headers)
    if job.status == JobStatus.FAILED.value:
        problem = failed_job_problem(job)
        problem.headers.update(headers)
        raise problem

    def unfinished() -> JobOut:
        out = JobOut.from_row(job, queue_position=lifecycle.queue_position(uow.session, job))
        uow.session.commit()  # end the read
        return out

    out = await run_in_threadpool(unfinished)
    return JSONResponse(
        out.model_dump(mode="json"),
        status_code=202,
        headers={"Location": f"/jobs/{job.id}", **headers},
    )


# The OpenAI body's names for GenerateRequest's fields, for errors found after translation.
_OPENAI_FIELDS = {"num_images": "n", "width": "size", "height": "size", "adapters": "model"}


def _as_generate_request(fields: dict[str, Any]) -> GenerateRequest:
    """The generation an OpenAI images request asks for; 422 naming the OpenAI field."""
    try:
        return GenerateRequest.model_validate(fields)
    except ValidationError as exc:
        errors = [
            {**err, "loc": ("body", _OPENAI_FIELDS.get(str(err["loc"][0]), err["loc"][0]))}
            for err in exc.errors()
        ]
        raise RequestValidationError(errors) from None


@router.post(
    "/v1/images/generations",
    operation_id="openai_images_generations",
    response_model=OpenAIImagesResponse,
    tags=["openai"],
    responses=problem_responses(*COMMON_ERRORS, 404, 429, 503, openai=True),
)
async def openai_images_route(
    body: OpenAIImageRequest,
    request: Request,
    uow: UoW,
    caller: Caller,
    settings: AppSettings,
    store: Store,
    idempotency_key: IdempotencyKeyHeader = None,
    retry_count: Annotated[
        str | None, Header(alias="x-stainless-retry-count", include_in_schema=False)
    ] = None,
) -> OpenAIImagesResponse:
    """OpenAI-compatible: `model` is an adapter ref (weight 1) or a base model name.

    Answers within LORASTACK_OPENAI_WAIT_S (else 503 with Retry-After). The OpenAI SDK retries
    a timed-out or failed request with the same body and an ``x-stainless-retry-count`` header
    but no idempotency key: such a retry waits for the job its first attempt created instead
    of running the request twice (service/generation/retries.py).
    """
    width, height = body.dimensions()
    adapters = []
    base_model = None
    if body.model and body.model in settings.model_sources:
        base_model = body.model
    elif body.model:
        adapters = [{"ref": body.model, "weight": 1.0}]
    generate = _as_generate_request(
        {
            "prompt": body.prompt,
            "negative_prompt": body.negative_prompt,
            "adapters": adapters,
            "base_model": base_model,
            "width": width,
            "height": height,
            "seed": body.seed,
            "num_images": body.n,
            "response_format": body.response_format,
            **(
                {"num_inference_steps": body.num_inference_steps}
                if body.num_inference_steps
                else {}
            ),
        }
    )
    retries = OpenAIRetries(
        request.app.state.redis,
        key_prefix=settings.redis_key_prefix,
        window_s=settings.openai_retry_window_s,
    )
    first_attempt = (
        await retries.find(tenant_id=caller.tenant_id, payload=body)
        if retry_count and retry_count != "0"
        else None
    )
    try:
        job, _ = await _run(
            request,
            uow,
            tenant_id=caller.tenant_id,
            body=generate,
            wait_s=settings.openai_wait_s,
            idempotency_key=idempotency_key,
            attach_to=first_attempt,
            on_created=lambda job_id: retries.remember(
                tenant_id=caller.tenant_id, payload=body, job_id=job_id
            ),
        )
    except Unprocessable as exc:
        fields = [e.get("field") for e in exc.extra.get("errors", [])]
        if adapters and fields == ["adapters.0.ref"]:
            # OpenAI clients expect an unknown model to be a 404.
            raise NotFound(f"model {body.model!r}: {exc.detail}", code="model_not_found") from None
        raise
    if job.status == JobStatus.FAILED.value:
        raise failed_job_problem(job)
    if job.status != JobStatus.SUCCEEDED.value:
        # The SDK retries a 503 (after Retry-After); its retry waits for this same job.
        raise ServiceUnavailable(
            f"generation did not finish within {settings.openai_wait_s:g} s "
            "(LORASTACK_OPENAI_WAIT_S); a retry of this request waits for the same job",
            code="generation_timeout",
            extra={"job_id": job.id},
            headers={"Retry-After": "1"},
        )
    answer = await _answer(request, uow, store, job=job, response_format=body.response_format)
    created = int(job.finished_at.timestamp()) if job.finished_at else int(time.time())
    return OpenAIImagesResponse(
        created=created,
        data=[OpenAIImage(url=i.url, b64_json=i.b64_json) for i in answer.images],
    )


@router.get(
    "/images/{image_id}",
    operation_id="get_image",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}}, **problem_responses(404)},
)
def image_route(image_id: str, uow: UoW, caller: Caller, store: Store) -> FileResponse:
    image = get_image(uow.session, tenant_id=caller.tenant_id, image_id=image_id)
    return FileResponse(
        store.path(image.storage_key),
        media_type="image/png",
        headers={"Cache-Control": "private, max-age=31536000, immutable"},
    )
