"""Generation jobs in a worker: one warm InferenceEngine per process, batching of compatible
queued jobs, images into the artifact store, results into SQL."""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import new_id, unit_of_work
from service.jobs import lifecycle
from service.models import Image, Job, JobKind, JobStatus
from service.notify import publish_done
from workers.runtime import WorkerRuntime

if TYPE_CHECKING:
    from workers.engine.inference.generation import GenerationRequest, InferenceEngine

log = logging.getLogger("lorastack.worker")

_engine: InferenceEngine | None = None


def get_engine(rt: WorkerRuntime) -> InferenceEngine:
    """The process's engine: the default base model, loaded once and kept warm."""
    global _engine
    if _engine is None:
        import torch

        from service.base_models import local_folder
        from workers.engine.inference.generation import InferenceEngine

        settings = rt.settings
        source = settings.model_sources[settings.default_base_model]
        device = rt.info.get("device", "cpu")
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        dtype = dtypes.get(settings.inference_dtype)
        if dtype is None:  # auto: half precision on a GPU, fp32 on a CPU
            dtype = torch.float16 if device == "cuda" else torch.float32
        _engine = InferenceEngine(
            pipeline_dir=local_folder(source) or source,  # type: ignore[arg-type]
            device=device,
            dtype=dtype,
            max_active=settings.generate_max_adapters,
            max_rank=settings.inference_max_rank,
            fetch=lambda key: rt.store.path(key),
            cpu_limit_bytes=settings.inference_cpu_cache_bytes,
            device_limit_count=max(
                settings.inference_device_cache_count, settings.generate_max_adapters
            ),
            disk_limit_bytes=settings.inference_disk_cache_bytes,
        )
        rt.info["inference"] = _engine.snapshot()
    return _engine


def _to_request(job: Job) -> GenerationRequest:
    from workers.engine.inference.generation import AdapterRef, GenerationRequest

    params = job.params["request"]
    return GenerationRequest(
        prompt=params["prompt"],
        negative_prompt=params.get("negative_prompt"),
        # The cache key is the artifact key: content-addressed, so equal files share an entry.
        adapters=tuple(
            AdapterRef(key=a["storage_key"], weight=float(a["weight"]))
            for a in job.params.get("adapters", [])
        ),
        num_inference_steps=params["num_inference_steps"],
        guidance_scale=params["guidance_scale"],
        width=params["width"],
        height=params["height"],
        seed=params["seed"],
        num_images=params["num_images"],
        scheduler=params["scheduler"],
    )


def _claim_batch(session: Session, rt: WorkerRuntime, first: Job) -> list[Job]:
    """Lease other queued jobs that can share the first one's pipeline call.

    Their own messages arrive later, find the lease taken and do nothing.
    """
    limit = rt.settings.generate_batch_max - 1
    if limit <= 0:
        return []
    claimed: list[Job] = []
    candidates = session.scalars(
        select(Job)
        .where(
            Job.kind == JobKind.GENERATE.value,
            Job.status == JobStatus.QUEUED.value,
            Job.base_model == first.base_model,
        )
        .order_by(Job.queued_at)
        .limit(64)
    ).all()
    for job in candidates:
        if len(claimed) >= limit:
            break
        if job.params.get("batch_key") != first.params.get("batch_key"):
            continue
        leased = lifecycle.take_lease(
            session, job_id=job.id, owner=rt.worker_id, lease_s=rt.settings.job_lease_s
        )
        if leased is not None:
            claimed.append(leased)
    return claimed


def run_generation_job(rt: WorkerRuntime, job_id: str) -> None:
    serves = rt.settings.default_base_model
    # One transaction leases the job and every queued job that can share its pipeline call.
    with unit_of_work(rt.session_factory) as session:
        job = lifecycle.take_lease(
            session, job_id=job_id, owner=rt.worker_id, lease_s=rt.settings.job_lease_s
        )
        batch = [job] if job is not None else []
        if job is not None and job.base_model == serves:
            batch += _claim_batch(session, rt, job)
    if job is None:
        log.info("generate %s: not queued any more (done, batched or cancelled)", job_id)
        return
    rt.current_job_id = job_id
    try:
        if job.base_model != serves:
            _fail(
                rt,
                batch,
                "base_model_unavailable",
                f"this worker serves {serves!r}, not {job.base_model!r}",
            )
            return
        engine = get_engine(rt)
        results = engine.generate_batch([_to_request(j) for j in batch])
        _record(rt, batch, results)
        rt.info["inference"] = engine.snapshot()
    except Exception as exc:
        log.exception("generate %s failed", job_id)
        code = "invalid_request" if isinstance(exc, ValueError) else "internal_error"
        _fail(rt, batch, code, f"{type(exc).__name__}: {exc}")
    finally:
        rt.current_job_id = None


def _record(rt: WorkerRuntime, batch: list[Job], results: list[Any]) -> None:
    """Store every image, finish every job in one transaction, then wake the waiters."""
    with unit_of_work(rt.session_factory) as session:
        for job, result in zip(batch, results, strict=True):
            images: list[dict[str, Any]] = []
            for picture, seed in zip(result.images, result.seeds, strict=True):
                buffer = io.BytesIO()
                # Level 1: several times faster than the default at large sizes, a bit bigger.
                picture.save(buffer, format="PNG", compress_level=1)
                stored = rt.store.put_bytes(buffer.getvalue(), prefix="images", suffix=".png")
                row = Image(
                    id=new_id("img"),  # known now: no flush per image
                    tenant_id=job.tenant_id,
                    job_id=job.id,
                    storage_key=stored.key,
                    seed=seed,
                    width=picture.width,
                    height=picture.height,
                )
                session.add(row)
                images.append(
                    {"id": row.id, "seed": seed, "width": row.width, "height": row.height}
                )
            timings = result.timings
            queue_wait = (job.started_at - job.queued_at).total_seconds() if job.started_at else 0.0
            lifecycle.finish_job(
                session,
                job_id=job.id,
                owner=rt.worker_id,
                status=JobStatus.SUCCEEDED,
                result={
                    "images": images,
                    "batch_size": len(batch),
                    "timings": {
                        "queue_wait_s": round(queue_wait, 4),
                        "adapter_load_s": round(timings.adapter_load_s, 4),
                        "adapter_switch_s": round(timings.adapter_switch_s, 4),
                        "denoise_s": round(timings.denoise_s, 4),
                        "decode_s": round(timings.decode_s, 4),
                        "total_s": round(timings.total_s, 4),
                    },
                },
            )
    for job in batch:
        publish_done(rt.redis, rt.settings, job.id)


def _fail(rt: WorkerRuntime, jobs: list[Job], code: str, message: str) -> None:
    with unit_of_work(rt.session_factory) as session:
        for job in jobs:
            lifecycle.finish_job(
                session,
                job_id=job.id,
                owner=rt.worker_id,
                status=JobStatus.FAILED,
                error_code=code,
                error_message=message,
            )
    for job in jobs:
        publish_done(rt.redis, rt.settings, job.id)
