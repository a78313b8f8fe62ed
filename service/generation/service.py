"""Generation jobs: validate against limits and adapters, queue, and read the answer back."""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import dispatch, lifecycle
from service.adapters.refs import is_checkpoint_ref, resolve_checkpoint_ref, resolve_ref
from service.base_models import local_folder, native_size, resolve_base_model
from service.config import Settings
from service.errors import NotFound, ServiceError, field_error
from service.generation.schemas import (
    GenerateOut,
    GenerateRequest,
    ImageOut,
    ResolvedAdapter,
)
from service.job_params import AdapterUse, GenerateParams, GenerationSpec
from service.models import Image, Job, JobKind
from service.queue import GENERATE_QUEUE
from service.storage import ArtifactStore


def _limit(
    settings: Settings, field: str, value: float, setting: str, *, maximum: float | None = None
) -> None:
    """422 when ``value`` is over ``setting`` (or over ``maximum`` derived from it)."""
    maximum = getattr(settings, setting) if maximum is None else maximum
    if value > maximum:
        raise field_error(
            field,
            f"{value} is over the limit {maximum} (LORASTACK_{setting.upper()})",
            code="limit_exceeded",
        )


def _check_limits(
    settings: Settings, body: GenerateRequest, *, width: int, height: int, native: int
) -> None:
    """422 naming the first field over its configured limit."""
    _limit(settings, "prompt", len(body.prompt), "generate_max_prompt_chars")
    if body.negative_prompt:
        _limit(settings, "negative_prompt", len(body.negative_prompt), "generate_max_prompt_chars")
    _limit(settings, "num_inference_steps", body.num_inference_steps, "generate_max_steps")
    _limit(settings, "num_images", body.num_images, "generate_max_images")
    _limit(settings, "adapters", len(body.adapters), "generate_max_adapters")
    _limit(settings, "width", width, "generate_max_side")
    _limit(settings, "height", height, "generate_max_side")
    _limit(settings, "width", width * height, "generate_max_pixels")
    # Relative to the model's native size too: cost grows with pixels (a tiny model asked for
    # 2048 px kept a worker busy for many minutes), see docs/architecture.md, admission.
    max_side = int(native * settings.generate_max_side_factor)
    for field, value in (("width", width), ("height", height)):
        _limit(settings, field, value, "generate_max_side_factor", maximum=max_side)
    max_pixels = int(native * native * settings.generate_max_pixels_factor)
    _limit(settings, "width", width * height, "generate_max_pixels_factor", maximum=max_pixels)


def _resolve_adapters(
    session: Session,
    *,
    store: ArtifactStore,
    tenant_id: str,
    base_model: str,
    body: GenerateRequest,
) -> list[AdapterUse]:
    """Each requested ref resolved to the version (or checkpoint) it names now; 422 naming the
    bad one."""
    adapters: list[AdapterUse] = []
    seen: set[str] = set()
    for index, item in enumerate(body.adapters):
        field = f"adapters.{index}.ref"
        try:
            use = resolve_adapter_use(
                session, store=store, tenant_id=tenant_id, ref=item.ref, weight=item.weight
            )
        except ServiceError as exc:
            raise field_error(field, exc.detail, code=exc.code) from None
        if use.base_model != base_model:
            raise field_error(
                field,
                f"{item.ref!r} belongs to base model {use.base_model!r}, not {base_model!r}",
                code="base_model_mismatch",
            )
        if use.adapter.version_id in seen:
            raise field_error(field, f"{item.ref!r} is listed twice", code="duplicate_adapter")
        seen.add(use.adapter.version_id)
        adapters.append(use.adapter)
    return adapters


@dataclass(frozen=True)
class ResolvedUse:
    adapter: AdapterUse
    base_model: str


def resolve_adapter_use(
    session: Session, *, store: ArtifactStore, tenant_id: str, ref: str, weight: float
) -> ResolvedUse:
    if is_checkpoint_ref(ref):
        checkpoint = resolve_checkpoint_ref(session, store=store, tenant_id=tenant_id, ref=ref)
        return ResolvedUse(
            adapter=AdapterUse(
                ref=ref,
                name=checkpoint.job.adapter_name or "",
                version=None,
                version_id=checkpoint.use_id,
                storage_key=checkpoint.weights_key,
                sha256=checkpoint.sha256,
                weight=weight,
                job_id=checkpoint.job.id,
                checkpoint_step=checkpoint.step,
            ),
            base_model=checkpoint.job.base_model or "",
        )
    adapter, version = resolve_ref(session, tenant_id=tenant_id, ref=ref)
    return ResolvedUse(
        adapter=AdapterUse(
            ref=ref,
            name=adapter.name,
            version=version.version,
            version_id=version.id,
            storage_key=version.storage_key,
            sha256=version.sha256,
            weight=weight,
        ),
        base_model=adapter.base_model,
    )


def create_generation_job(
    session: Session,
    *,
    settings: Settings,
    store: ArtifactStore,
    tenant_id: str,
    body: GenerateRequest,
    job_id: str | None = None,
) -> Job:
    """Validate the request (limits, adapters, base model) and create its queued job."""
    base_model, source = resolve_base_model(settings, body.base_model)
    folder = local_folder(source)
    side = (native_size(folder) if folder else None) or 512
    width, height = body.width or side, body.height or side
    _check_limits(settings, body, width=width, height=height, native=side)
    adapters = _resolve_adapters(
        session, store=store, tenant_id=tenant_id, base_model=base_model, body=body
    )
    spec = GenerationSpec(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        num_inference_steps=body.num_inference_steps,
        guidance_scale=body.guidance_scale,
        width=width,
        height=height,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**32),
        num_images=body.num_images,
        scheduler=body.scheduler,
    )
    params = GenerateParams.build(base_model=base_model, request=spec, adapters=adapters)
    dispatch.check_queued_quota(
        session, settings=settings, tenant_id=tenant_id, kind=JobKind.GENERATE.value
    )
    return lifecycle.create_job(
        session,
        tenant_id=tenant_id,
        kind=JobKind.GENERATE.value,
        queue=GENERATE_QUEUE,
        max_attempts=settings.job_max_attempts,
        base_model=base_model,
        params=params.to_json(),
        job_id=job_id,
    )


def generation_answer(
    session: Session,
    *,
    job: Job,
    store: ArtifactStore,
    response_format: str,
    base_url: str,
) -> GenerateOut:
    """The answer for a finished (or still running) generation job."""
    images: list[ImageOut] = []
    result = job.result or {}
    for entry in result.get("images", []):
        image = ImageOut(
            id=entry["id"], seed=entry.get("seed"), width=entry["width"], height=entry["height"]
        )
        if response_format == "b64_json":
            row = session.get(Image, entry["id"])
            assert row is not None
            image.b64_json = base64.b64encode(store.path(row.storage_key).read_bytes()).decode()
        else:
            image.url = f"{base_url}images/{entry['id']}"
        images.append(image)
    params = GenerateParams.model_validate(job.params)
    return GenerateOut(
        job_id=job.id,
        status=job.status,
        base_model=job.base_model or "",
        images=images,
        adapters=[
            ResolvedAdapter(
                ref=a.ref,
                name=a.name,
                version=a.version,
                weight=a.weight,
                job_id=a.job_id,
                checkpoint_step=a.checkpoint_step,
            )
            for a in params.adapters
        ],
        seed=params.request.seed,
        timings=result.get("timings", {}),
    )


# A failed generation job answers with the status its error code calls for; any other code
# means the request could not be rendered as asked.
FAILED_JOB_STATUS: dict[str, int] = {"internal_error": 500}


def failed_job_problem(job: Job) -> ServiceError:
    """The problem+json a route answers for a generation job that failed."""
    code = job.error_code or "generation_failed"
    return ServiceError(
        f"generation failed: {job.error_message}",
        status=FAILED_JOB_STATUS.get(code, 422),
        code=code,
        extra={"job_id": job.id},
    )


def get_image(session: Session, *, tenant_id: str, image_id: str) -> Image:
    image = session.scalar(select(Image).where(Image.id == image_id, Image.tenant_id == tenant_id))
    if image is None:
        raise NotFound(f"image {image_id!r} not found")
    return image
