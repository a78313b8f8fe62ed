"""Grid jobs in a worker: every cell rendered on the warm InferenceEngine (in batches: cells
with the same adapters share a pipeline call), composed into one labeled PNG; the cells are
stored as images too."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from service import lifecycle
from service.db import transaction
from service.job_params import GridParams
from service.lifecycle import LeasedJob
from service.models import Job, JobKind, JobStatus
from service.notify import publish_done
from workers.generation import get_engine
from workers.images import store_png
from workers.runtime import WorkerRuntime

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

    from workers.engine.inference.generation import GenerationProgress, GenerationRequest

log = logging.getLogger("lorastack.worker")

CANCEL_CHECK_S = 0.5


def run_grid_job(rt: WorkerRuntime, message_job_id: str) -> None:
    from workers.engine.inference.generation import GenerationCancelled

    serves = rt.settings.default_base_model
    with transaction(rt.session_factory) as session:
        job = rt.lease_fair(
            session, kind=JobKind.GRID.value, base_model=serves, hint_job_id=message_job_id
        )
    if job is None:
        log.info("grid %s: nothing queued any more (done or cancelled)", message_job_id)
        return
    rt.hold([job.id])
    try:
        if job.base_model != serves:
            _finish(
                rt,
                job,
                JobStatus.FAILED,
                error=(
                    "base_model_unavailable",
                    f"this worker serves {serves!r}, not {job.base_model!r}",
                ),
            )
            return
        _render(rt, job)
    except GenerationCancelled:
        _finish(rt, job, JobStatus.CANCELLED)
    except Exception as exc:
        log.exception("grid %s failed", job.id)
        code = "invalid_request" if isinstance(exc, ValueError) else "internal_error"
        _finish(rt, job, JobStatus.FAILED, error=(code, f"{type(exc).__name__}: {exc}"))
    finally:
        rt.hold([])


def _requests(params: GridParams) -> list[GenerationRequest]:
    from workers.engine.inference.generation import AdapterRef, GenerationRequest

    return [
        GenerationRequest(
            prompt=cell.prompt,
            negative_prompt=params.negative_prompt,
            adapters=tuple(AdapterRef(key=a.storage_key, weight=a.weight) for a in cell.adapters),
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            width=params.width,
            height=params.height,
            seed=cell.seed,
            scheduler=params.scheduler,
        )
        for row in params.cells
        for cell in row
    ]


def _render(rt: WorkerRuntime, job: LeasedJob) -> None:
    from workers.engine.grid import compose_grid

    params = GridParams.model_validate(job.params)
    engine = get_engine(rt)
    requests = _requests(params)
    stop = _CancelCheck(rt, job.id)
    pictures: list[PILImage] = []
    size = max(1, rt.settings.generate_batch_max)
    for start in range(0, len(requests), size):
        results = engine.generate_batch(requests[start : start + size], on_step=stop.on_step)
        pictures.extend(result.images[0] for result in results)
    columns = len(params.columns)
    cells = [pictures[r * columns : (r + 1) * columns] for r in range(len(params.cells))]
    grid, layout = compose_grid(cells, row_labels=params.rows, column_labels=params.columns)
    with transaction(rt.session_factory) as session:
        cell_out: list[list[dict[str, Any]]] = []
        for r, row in enumerate(params.cells):
            out_row = []
            for c, cell in enumerate(row):
                image_id = _store(rt, session, job, cells[r][c], seed=cell.seed)
                out_row.append(
                    {
                        "image_id": image_id,
                        "prompt": cell.prompt,
                        "seed": cell.seed,
                        "adapters": [{"ref": a.ref, "weight": a.weight} for a in cell.adapters],
                    }
                )
            cell_out.append(out_row)
        grid_id = _store(rt, session, job, grid, seed=None)
        outcome = lifecycle.finish_job(
            session,
            job_id=job.id,
            owner=rt.worker_id,
            status=JobStatus.SUCCEEDED,
            result={
                "image_id": grid_id,
                "rows": params.rows,
                "columns": params.columns,
                "cells": cell_out,
                "layout": layout.to_json(),
            },
        )
    rt.info["inference"] = engine.snapshot()
    publish_done(rt.redis, rt.settings, job.id, outcome)


def _store(rt: WorkerRuntime, session: Any, job: LeasedJob, picture: Any, seed: int | None) -> str:
    return store_png(
        session, rt.store, tenant_id=job.tenant_id, job_id=job.id, picture=picture, seed=seed
    )


class _CancelCheck:
    """Stops the pipeline (GenerationCancelled) when the job asked to cancel."""

    def __init__(self, rt: WorkerRuntime, job_id: str) -> None:
        self.rt = rt
        self.job_id = job_id
        self._last = time.monotonic()

    def on_step(self, progress: GenerationProgress) -> bool:
        now = time.monotonic()
        if now - self._last < CANCEL_CHECK_S:
            return False
        self._last = now
        with self.rt.session_factory() as session:
            status = session.scalar(select(Job.status).where(Job.id == self.job_id))
        return status == JobStatus.CANCEL_REQUESTED.value


def _finish(
    rt: WorkerRuntime,
    job: LeasedJob,
    status: JobStatus,
    *,
    error: tuple[str, str] | None = None,
) -> None:
    with transaction(rt.session_factory) as session:
        outcome = lifecycle.finish_job(
            session,
            job_id=job.id,
            owner=rt.worker_id,
            status=status,
            error_code=error[0] if error else None,
            error_message=error[1] if error else None,
        )
    publish_done(rt.redis, rt.settings, job.id, outcome)
