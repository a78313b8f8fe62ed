"""Celery tasks: ids in, load, lease, call the engine, record. Nothing else lives here."""

from __future__ import annotations

import logging
import socket

from service import lifecycle
from service.db import transaction
from service.models import JobStatus
from service.queue import TASK_GENERATE, TASK_GRID, TASK_PING, TASK_TRAIN
from workers.celery_app import app
from workers.runtime import get_runtime

log = logging.getLogger("lorastack.worker")


@app.task(name=TASK_PING)
def ping(job_id: str) -> None:
    """Round trip through Redis and SQL: lease the job and answer pong."""
    rt = get_runtime()
    with transaction(rt.session_factory) as session:
        job = lifecycle.take_lease(
            session, job_id=job_id, owner=rt.worker_id, lease_s=rt.settings.job_lease_s
        )
        if job is None:
            log.info("ping %s: not queued any more, skipping", job_id)
            return
        lifecycle.finish_job(
            session,
            job_id=job_id,
            owner=rt.worker_id,
            status=JobStatus.SUCCEEDED,
            result={"pong": True, "worker": rt.worker_id, "hostname": socket.gethostname()},
        )


@app.task(name=TASK_TRAIN)
def train(job_id: str) -> None:
    """Train a LoRA for the job and publish it as the adapter's next version."""
    from workers.training import run_training_job

    run_training_job(get_runtime(), job_id)


@app.task(name=TASK_GENERATE)
def generate(job_id: str) -> None:
    """Generate images for the job (and compatible queued ones) on the warm base model."""
    from workers.generation import run_generation_job

    run_generation_job(get_runtime(), job_id)


@app.task(name=TASK_GRID)
def grid(job_id: str) -> None:
    """Render a labeled grid for the job on the warm base model."""
    from workers.grids import run_grid_job

    run_grid_job(get_runtime(), job_id)
