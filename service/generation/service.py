"""Generation jobs: validate against limits and adapters, queue, and read the answer back."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.adapters.registry import check_base_model
from service.adapters.service import resolve_ref
from service.base_models import local_folder, native_size, resolve_base_model
from service.config import Settings
from service.generation.schemas import (
    GenerateOut,
    GenerateRequest,
    ImageOut,
    ResolvedAdapter,
)
from service.jobs import dispatch, lifecycle
from service.models import Image, Job, JobKind
from service.problems import NotFound, ServiceError, field_error
from service.queue import GENERATE_QUEUE
from service.storage import ArtifactStore


def _limit(field: str, value: float, maximum: float, setting: str) -> None:
    if value > maximum:
        raise field_error(
            field,
            f"{value} is over the limit {maximum} (LORASTACK_{setting.upper()})",
            code="limit_exceeded",
        )


def create_generation_job(
    session: Session,
    *,
    settings: Settings,
    tenant_id: str,
    body: GenerateRequest,
    job_id: str | None = None,
) -> Job:
    """Validate the request (limits, adapters, base model) and create its queued job."""
    base_model, source = resolve_base_model(settings, body.base_model)
    folder = local_folder(source)
    side = (native_size(folder) if folder else None) or 512
    width, height = body.width or side, body.height or side
    _limit(
        "prompt", len(body.prompt), settings.generate_max_prompt_chars, "generate_max_prompt_chars"
    )
    if body.negative_prompt:
        _limit(
            "negative_prompt",
            len(body.negative_prompt),
            settings.generate_max_prompt_chars,
            "generate_max_prompt_chars",
        )
    _limit(
        "num_inference_steps",
        body.num_inference_steps,
        settings.generate_max_steps,
        "generate_max_steps",
    )
    _limit("num_images", body.num_images, settings.generate_max_images, "generate_max_images")
    _limit("adapters", len(body.adapters), settings.generate_max_adapters, "generate_max_adapters")
    _limit("width", width, settings.generate_max_side, "generate_max_side")
    _limit("height", height, settings.generate_max_side, "generate_max_side")
    _limit("width", width * height, settings.generate_max_pixels, "generate_max_pixels")
    # Relative to the model's native size: a tiny model asked for 2048 px would keep a worker
    # busy for many minutes (docs/architecture.md, admission by cost).
    max_side = int(side * settings.generate_max_side_factor)
    _limit("width", width, max_side, "generate_max_side_factor")
    _limit("height", height, max_side, "generate_max_side_factor")
    _limit(
        "width",
        width * height,
        int(side * side * settings.generate_max_pixels_factor),
        "generate_max_pixels_factor",
    )

    adapters: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, item in enumerate(body.adapters):
        try:
            adapter, version = resolve_ref(session, tenant_id=tenant_id, ref=item.ref)
        except ServiceError as exc:
            raise field_error(f"adapters.{index}.ref", exc.detail, code=exc.code) from None
        check_base_model(adapter, base_model, field=f"adapters.{index}.ref")
        if version.id in seen:
            raise field_error(
                f"adapters.{index}.ref", f"{item.ref!r} is listed twice", code="duplicate_adapter"
            )
        seen.add(version.id)
        adapters.append(
            {
                "ref": item.ref,
                "name": adapter.name,
                "version": version.version,
                "version_id": version.id,
                "storage_key": version.storage_key,
                "sha256": version.sha256,
                "weight": item.weight,
            }
        )
    seed = body.seed if body.seed is not None else secrets.randbelow(2**32)
    request = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "num_inference_steps": body.num_inference_steps,
        "guidance_scale": body.guidance_scale,
        "width": width,
        "height": height,
        "seed": seed,
        "num_images": body.num_images,
        "scheduler": body.scheduler,
    }
    # Jobs with equal batch keys can share one pipeline call in the worker.
    shape = {
        k: request[k]
        for k in ("num_inference_steps", "guidance_scale", "width", "height", "scheduler")
    }
    batch_key = hashlib.sha256(
        json.dumps(
            [base_model, shape, [(a["version_id"], a["weight"]) for a in adapters]], sort_keys=True
        ).encode()
    ).hexdigest()[:32]
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
        params={"request": request, "adapters": adapters, "batch_key": batch_key},
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
    params = job.params
    return GenerateOut(
        job_id=job.id,
        status=job.status,
        base_model=job.base_model or "",
        images=images,
        adapters=[
            ResolvedAdapter(ref=a["ref"], name=a["name"], version=a["version"], weight=a["weight"])
            for a in params.get("adapters", [])
        ],
        seed=params["request"]["seed"],
        timings=result.get("timings", {}),
    )


def get_image(session: Session, *, tenant_id: str, image_id: str) -> Image:
    image = session.scalar(select(Image).where(Image.id == image_id, Image.tenant_id == tenant_id))
    if image is None:
        raise NotFound(f"image {image_id!r} not found")
    return image
