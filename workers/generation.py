"""Generation jobs in a worker: one warm InferenceEngine per process, batching of compatible
queued jobs, images into the artifact store, results into SQL."""

from __future__ import annotations

import io
import logging
import time
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.orm import Session

from service import lifecycle
from service.db import new_id, transaction, utcnow
from service.dispatch import BatchCandidate, choose_batch_mates, running_counts
from service.job_params import GenerateParams
from service.lifecycle import LeasedJob
from service.models import Image, JobKind, JobStatus
from service.notify import publish_done
from service.storage import ArtifactStore
from workers.runtime import WorkerRuntime

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

    from workers.engine.inference.generation import (
        GenerationProgress,
        GenerationRequest,
        InferenceEngine,
    )

log = logging.getLogger("lorastack.worker")

# Built once, run with bound parameters (see lifecycle: these are on every request's path).
_job = lifecycle.JOB_TABLE.c
_BATCH_MATES = (
    select(_job.id, _job.tenant_id, _job.params)
    .where(
        _job.status == JobStatus.QUEUED.value,
        _job.kind == JobKind.GENERATE.value,
        _job.base_model == bindparam("base_model"),
        _job.params["batch_key"].as_string() == bindparam("batch_key"),
    )
    .order_by(_job.queued_at, _job.id)
    .limit(bindparam("limit"))
)
# How many queued jobs of the batch's shape one lease looks at (the oldest), per batch image.
_CANDIDATES_PER_IMAGE = 4
# How often a worker waiting for batch mates (LORASTACK_GENERATE_BATCH_WAIT_S) looks again.
BATCH_WAIT_POLL_S = 0.05
_INSERT_IMAGES = insert(cast(Table, Image.__table__))
_held = (_job.id.in_(bindparam("job_ids", expanding=True)), _job.lease_owner == bindparam("owner"))
_BATCH_STATUS = select(_job.id, _job.status).where(*_held)
_WRITE_PROGRESS = (
    update(lifecycle.JOB_TABLE)
    .where(*_held)
    .values(progress=bindparam("progress"))
    .execution_options(synchronize_session=False)
)

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
            max_active=settings.inference_slot_count,
            max_rank=settings.inference_max_rank,
            fetch=lambda key: rt.store.path(key),
            cpu_limit_bytes=settings.inference_cpu_cache_bytes,
            device_limit_count=max(
                settings.inference_device_cache_count, settings.inference_slot_count
            ),
            disk_limit_bytes=settings.inference_disk_cache_bytes,
        )
        rt.info["inference"] = _engine.snapshot()
    return _engine


def _to_request(job: LeasedJob) -> GenerationRequest:
    from workers.engine.inference.generation import AdapterRef, GenerationRequest

    params = GenerateParams.model_validate(job.params)
    spec = params.request
    return GenerationRequest(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        adapters=tuple(AdapterRef(key, weight=w) for key, w in _weights_by_file(params).items()),
        num_inference_steps=spec.num_inference_steps,
        guidance_scale=spec.guidance_scale,
        width=spec.width,
        height=spec.height,
        seed=spec.seed,
        num_images=spec.num_images,
        scheduler=spec.scheduler,
    )


def _weights_by_file(params: GenerateParams) -> dict[str, float]:
    """Each adapter file's weight. The cache key is the artifact key: content-addressed, so two
    versions with the same file share an entry, and their weights add up (as loading the file
    twice would), rather than the request failing its whole batch."""
    weights: dict[str, float] = {}
    for adapter in params.adapters:
        weights[adapter.storage_key] = weights.get(adapter.storage_key, 0.0) + adapter.weight
    return weights


def _lease_batch(session: Session, rt: WorkerRuntime, message_job_id: str) -> list[LeasedJob]:
    """Lease the fairest queued job for this worker's base model (service/dispatch.py;
    usually the message's own) and the queued jobs that can share its pipeline call (same base
    model and shape, adapters that fit the slots). Messages naming a job leased here lease the
    next fair job instead."""
    first = rt.lease_fair(
        session,
        kind=JobKind.GENERATE.value,
        base_model=rt.settings.default_base_model,
        hint_job_id=message_job_id,
    )
    if first is None:
        return []
    if first.base_model != rt.settings.default_base_model:
        return [first]
    return [first, *_lease_mates(session, rt, [first])]


def _candidate(job_id: str, tenant_id: str, params: dict[str, Any]) -> BatchCandidate:
    typed = GenerateParams.model_validate(params)
    return BatchCandidate(
        id=job_id,
        tenant_id=tenant_id,
        images=typed.request.num_images,
        adapter_files=typed.adapter_files,
    )


def _lease_mates(session: Session, rt: WorkerRuntime, batch: list[LeasedJob]) -> list[LeasedJob]:
    """Lease the queued jobs that fit into ``batch`` (dispatch.choose_batch_mates), oldest
    first; none when it is full."""
    settings = rt.settings
    current = [_candidate(job.id, job.tenant_id, job.params) for job in batch]
    room = settings.generate_batch_max - sum(job.images for job in current)
    if room <= 0:
        return []
    # Ids and parameters, matched on the shape in SQL: usually there are none, and that costs
    # little.
    rows = session.execute(
        _BATCH_MATES,
        {
            "base_model": batch[0].base_model,
            "batch_key": batch[0].params.get("batch_key"),
            "limit": room * _CANDIDATES_PER_IMAGE,
        },
    ).all()
    if not rows:
        return []
    candidates = [_candidate(*row) for row in rows]
    kind = JobKind.GENERATE.value
    chosen = choose_batch_mates(
        current,
        candidates,
        max_images=settings.generate_batch_max,
        max_adapter_files=settings.inference_slot_count,
        running=running_counts(session, kind=kind, tenants=[c.tenant_id for c in candidates]),
        max_running=settings.tenant_max_running(kind),
    )
    if not chosen:
        return []
    # A job another worker leased meanwhile is simply not in the answer.
    others = lifecycle.take_leases(
        session, job_ids=chosen, owner=rt.worker_id, lease_s=settings.job_lease_s
    )
    return sorted(others, key=lambda j: j.queued_at)


def _wait_for_mates(rt: WorkerRuntime, batch: list[LeasedJob]) -> float:
    """With LORASTACK_GENERATE_BATCH_WAIT_S set, lease more batch mates as they are queued
    until the batch is full or the oldest job has waited that long since it was queued.
    Extends ``batch`` in place; returns the seconds spent waiting."""
    wait_s = rt.settings.generate_batch_wait_s
    if wait_s <= 0 or batch[0].base_model != rt.settings.default_base_model:
        return 0.0
    started = time.monotonic()
    oldest = min(job.queued_at for job in batch)
    remaining = wait_s - (utcnow() - oldest).total_seconds()
    deadline = started + min(wait_s, remaining)
    while time.monotonic() < deadline:
        images = sum(GenerateParams.model_validate(j.params).request.num_images for j in batch)
        if images >= rt.settings.generate_batch_max:
            break
        time.sleep(min(BATCH_WAIT_POLL_S, max(0.0, deadline - time.monotonic())))
        with transaction(rt.session_factory) as session:
            added = _lease_mates(session, rt, batch)
        if added:
            batch.extend(added)
            rt.hold([job.id for job in batch])
    return time.monotonic() - started


def run_generation_job(rt: WorkerRuntime, message_job_id: str) -> None:
    from workers.engine.inference.generation import GenerationCancelled

    serves = rt.settings.default_base_model
    with transaction(rt.session_factory) as session:
        batch = _lease_batch(session, rt, message_job_id)
    if not batch:
        log.info(
            "generate %s: nothing queued any more (done, batched or cancelled)", message_job_id
        )
        return
    job_id = batch[0].id
    rt.hold([job.id for job in batch])
    try:
        if batch[0].base_model != serves:
            _fail(
                rt,
                batch,
                "base_model_unavailable",
                f"this worker serves {serves!r}, not {batch[0].base_model!r}",
            )
            return
        engine = get_engine(rt)
        batch_wait_s = _wait_for_mates(rt, batch)
        progress = _ProgressReporter(rt, [job.id for job in batch])
        results = engine.generate_batch(
            [_to_request(job) for job in batch], on_step=progress.on_step
        )
        _record(rt, batch, results, cancelled=progress.cancelled, batch_wait_s=batch_wait_s)
        rt.info["inference"] = engine.snapshot()
    except GenerationCancelled:
        _finish_all(rt, batch, JobStatus.CANCELLED)
    except Exception as exc:
        log.exception("generate %s failed", job_id)
        code = "invalid_request" if isinstance(exc, ValueError) else "internal_error"
        _fail(rt, batch, code, f"{type(exc).__name__}: {exc}")
    finally:
        rt.hold([])


# A cancel is seen within one denoising step, or this long when steps are shorter (tiny
# models on a CPU take milliseconds a step: a read per step would cost more than the step).
CANCEL_CHECK_S = 0.1
PROGRESS_INTERVAL_S = 0.5


class _ProgressReporter:
    """After denoising steps: read the batch's cancel flags (the pipeline stops once every job
    of the batch asked to cancel) and write progress into SQL, throttled as training's is."""

    def __init__(self, rt: WorkerRuntime, job_ids: list[str]) -> None:
        self.rt = rt
        self.job_ids = job_ids
        self.cancelled: set[str] = set()
        self._last_check = time.monotonic()
        self._last_write = self._last_check

    def on_step(self, progress: GenerationProgress) -> bool:
        now = time.monotonic()
        if now - self._last_check < CANCEL_CHECK_S:
            return False
        self._last_check = now
        write = now - self._last_write >= PROGRESS_INTERVAL_S
        data = {
            "step": progress.step,
            "total_steps": progress.total_steps,
            "images_done": progress.images_done,
            "images_total": progress.images_total,
        }
        with transaction(self.rt.session_factory) as session:
            statuses = session.execute(
                _BATCH_STATUS, {"job_ids": self.job_ids, "owner": self.rt.worker_id}
            ).all()
            if write:
                self._last_write = now
                session.execute(
                    _WRITE_PROGRESS,
                    {"job_ids": self.job_ids, "owner": self.rt.worker_id, "progress": data},
                )
        self.cancelled = {
            job_id for job_id, status in statuses if status == JobStatus.CANCEL_REQUESTED.value
        }
        return len(self.cancelled) == len(self.job_ids)


def _store_png(store: ArtifactStore, key: str, picture: PILImage) -> None:
    buffer = io.BytesIO()
    # Level 1: several times faster than the default at large sizes, a bit bigger.
    picture.save(buffer, format="PNG", compress_level=1)
    store.write_bytes(key, buffer.getvalue(), sync=False)


def _record(
    rt: WorkerRuntime,
    batch: list[LeasedJob],
    results: list[Any],
    *,
    cancelled: set[str],
    batch_wait_s: float,
) -> None:
    """Store every image, finish every job in one transaction, then wake the waiters. A job
    that asked to cancel while its batch mates carried on ends cancelled, without images.

    Each file is in place (renamed whole) before its row is committed; the fsync that makes it
    durable comes after the waiters are woken, off the request's path.
    """
    keys: list[str] = []
    image_rows: list[dict[str, Any]] = []
    outcomes: dict[str, lifecycle.JobOutcome | None] = {}
    now = utcnow()
    with transaction(rt.session_factory) as session:
        for job, result in zip(batch, results, strict=True):
            if job.id in cancelled:
                outcomes[job.id] = lifecycle.finish_job(
                    session, job_id=job.id, owner=rt.worker_id, status=JobStatus.CANCELLED
                )
                continue
            images: list[dict[str, Any]] = []
            for picture, seed in zip(result.images, result.seeds, strict=True):
                image = {
                    "id": new_id("img"),
                    "seed": seed,
                    "width": picture.width,
                    "height": picture.height,
                }
                key = f"images/{image['id']}.png"
                _store_png(rt.store, key, picture)
                keys.append(key)
                images.append(image)
                image_rows.append(
                    {
                        **image,
                        "tenant_id": job.tenant_id,
                        "job_id": job.id,
                        "storage_key": key,
                        "created_at": now,
                    }
                )
            outcomes[job.id] = lifecycle.finish_job(
                session,
                job_id=job.id,
                owner=rt.worker_id,
                status=JobStatus.SUCCEEDED,
                result=_job_result(job, images, result, len(batch), batch_wait_s),
            )
        if image_rows:
            session.execute(_INSERT_IMAGES, image_rows)
    for job_id, outcome in outcomes.items():
        publish_done(rt.redis, rt.settings, job_id, outcome)
    rt.store.sync(keys)


def _job_result(
    job: LeasedJob, images: list[dict[str, Any]], result: Any, batch_size: int, batch_wait_s: float
) -> dict[str, Any]:
    """A succeeded job's result: its images, the batch it ran in and the timings."""
    timings = result.timings
    return {
        "images": images,
        "batch_size": batch_size,
        "timings": {
            "queue_wait_s": round((job.started_at - job.queued_at).total_seconds(), 4),
            "batch_wait_s": round(batch_wait_s, 4),
            "adapter_load_s": round(timings.adapter_load_s, 4),
            "adapter_switch_s": round(timings.adapter_switch_s, 4),
            "denoise_s": round(timings.denoise_s, 4),
            "decode_s": round(timings.decode_s, 4),
            "total_s": round(timings.total_s, 4),
        },
    }


def _fail(rt: WorkerRuntime, jobs: list[LeasedJob], code: str, message: str) -> None:
    _finish_all(rt, jobs, JobStatus.FAILED, error=(code, message))


def _finish_all(
    rt: WorkerRuntime,
    jobs: list[LeasedJob],
    status: JobStatus,
    *,
    error: tuple[str, str] | None = None,
) -> None:
    with transaction(rt.session_factory) as session:
        outcomes = {
            job.id: lifecycle.finish_job(
                session,
                job_id=job.id,
                owner=rt.worker_id,
                status=status,
                error_code=error[0] if error else None,
                error_message=error[1] if error else None,
            )
            for job in jobs
        }
    for job_id, outcome in outcomes.items():
        publish_done(rt.redis, rt.settings, job_id, outcome)
