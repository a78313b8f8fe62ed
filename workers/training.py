"""A training job in a worker: dataset and base model from the service, the engine's trainer,
progress and events into SQL (throttled), and the result published as an adapter version."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service import lifecycle
from service.base_models import local_folder
from service.db import transaction, utcnow
from service.errors import ServiceError
from service.job_params import TrainParams
from service.lifecycle import LeasedJob
from service.models import (
    AdapterVersion,
    Checkpoint,
    Dataset,
    DatasetStatus,
    Job,
    JobKind,
    JobStatus,
    VersionSource,
)
from service.publishing import StoredFile, publish_job_version, store_job_weights
from service.registry import get_or_create_adapter, move_alias
from workers.engine.training.callbacks import (
    CheckpointInfo,
    NullCallbacks,
    StepProgress,
    ValidationImage,
)
from workers.evaluation import EvaluationOutcome, JobEvaluation
from workers.images import store_png
from workers.runtime import WorkerRuntime

if TYPE_CHECKING:
    from workers.engine.training.config import TrainConfig
    from workers.engine.training.lora import TrainableParams

log = logging.getLogger("lorastack.worker")

# The trainer's checkpoint file name (workers/engine/training/lora.py: ADAPTER_WEIGHT_NAME).
CHECKPOINT_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
BEST_ALIAS = "best"
PROGRESS_INTERVAL_S = 1.0
METRICS_EVERY_STEPS = 10
METRICS_INTERVAL_S = 10.0


class JobFailure(Exception):
    """A failure with a code the client can act on."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class LeaseLost(Exception):
    """Another worker owns the job now (ours was presumed dead): stop without recording."""


class SqlCallbacks(NullCallbacks):
    """The trainer's reports, turned into throttled progress updates and job events."""

    def __init__(
        self,
        rt: WorkerRuntime,
        *,
        job_id: str,
        tenant_id: str,
        evaluation: JobEvaluation | None = None,
        output_dir: Path | None = None,
    ) -> None:
        self.rt = rt
        self.job_id = job_id
        self.tenant_id = tenant_id
        self.evaluation = evaluation
        self.output_dir = output_dir
        self._last_progress = 0.0
        self._last_metrics = 0.0
        self.last: StepProgress | None = None
        self.validation: list[dict[str, Any]] = []

    def on_step(self, progress: StepProgress) -> None:
        self.last = progress
        now = time.monotonic()
        final = progress.step >= progress.total_steps
        write_progress = final or now - self._last_progress >= PROGRESS_INTERVAL_S
        write_metrics = final or (
            progress.step % METRICS_EVERY_STEPS == 0
            or now - self._last_metrics >= METRICS_INTERVAL_S
        )
        if not (write_progress or write_metrics):
            return
        data = {
            "step": progress.step,
            "total_steps": progress.total_steps,
            "epoch": progress.epoch,
            "loss": round(progress.smoothed_loss, 6),
            "raw_loss": round(progress.loss, 6),
            "lr": progress.lr,
            "samples_per_s": round(progress.samples_per_s, 3),
            "eta_s": round(progress.eta_s, 1),
        }
        with transaction(self.rt.session_factory) as session:
            if write_progress:
                self._last_progress = now
                session.execute(
                    update(Job)
                    .where(Job.id == self.job_id, Job.lease_owner == self.rt.worker_id)
                    .values(progress=data)
                )
            if write_metrics:
                self._last_metrics = now
                lifecycle.add_event(session, job_id=self.job_id, type="metrics", data=data)

    def on_checkpoint(self, checkpoint: CheckpointInfo) -> None:
        key = str(checkpoint.path.relative_to(self.rt.store.root))
        with transaction(self.rt.session_factory) as session:
            existing = session.scalar(
                select(Checkpoint).where(
                    Checkpoint.job_id == self.job_id, Checkpoint.step == checkpoint.step
                )
            )
            if existing is None:
                session.add(
                    Checkpoint(
                        job_id=self.job_id,
                        step=checkpoint.step,
                        storage_key=key,
                        metrics={"loss": checkpoint.loss},
                    )
                )
            # Retention removed older checkpoint folders: drop their rows too.
            for row in session.scalars(select(Checkpoint).where(Checkpoint.job_id == self.job_id)):
                if row.step != checkpoint.step and not self.rt.store.exists(row.storage_key):
                    session.delete(row)
            lifecycle.add_event(
                session,
                job_id=self.job_id,
                type="checkpoint",
                data={"step": checkpoint.step, "loss": checkpoint.loss},
            )
        if self.evaluation is not None and self.evaluation.every:
            self.evaluation.evaluate_checkpoint(
                checkpoint.step, checkpoint.path / CHECKPOINT_WEIGHTS_NAME
            )

    def on_validation(self, step: int, images: list[ValidationImage]) -> None:
        with transaction(self.rt.session_factory) as session:
            for sample in images:
                ids = {}
                for which, picture in (("base", sample.base_image), ("lora", sample.lora_image)):
                    ids[f"{which}_image_id"] = store_png(
                        session,
                        self.rt.store,
                        tenant_id=self.tenant_id,
                        job_id=self.job_id,
                        picture=picture,
                        seed=sample.seed,
                    )
                entry = {"step": step, "prompt": sample.prompt, "seed": sample.seed, **ids}
                self.validation.append(entry)
                lifecycle.add_event(session, job_id=self.job_id, type="sample", data=entry)

    def on_resumed(self, step: int) -> None:
        with transaction(self.rt.session_factory) as session:
            lifecycle.add_event(
                session,
                job_id=self.job_id,
                type="resumed",
                level="warning",
                data={"step": step, "message": f"resumed from checkpoint {step}"},
            )
        if self.evaluation is not None and self.evaluation.every and self.output_dir is not None:
            # A worker lost while it evaluated this checkpoint left no record of it: do it now.
            from workers.engine.training.checkpoints import CHECKPOINT_PREFIX

            folder = self.output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
            self.evaluation.evaluate_if_missing(step, folder / CHECKPOINT_WEIGHTS_NAME)

    def should_stop(self) -> bool:
        """Checked before every step: a cancel stops within one step; a lost lease at once."""
        with self.rt.session_factory() as session:
            row = session.execute(
                select(Job.status, Job.lease_owner).where(Job.id == self.job_id)
            ).one()
        if row.lease_owner != self.rt.worker_id:
            raise LeaseLost(self.job_id)
        return bool(row.status == JobStatus.CANCEL_REQUESTED.value)


def run_training_job(rt: WorkerRuntime, message_job_id: str) -> None:
    """Lease the fairest queued training job (service/jobs/dispatch.py; usually the message's
    own), train (resuming from its last checkpoint), publish, record the outcome."""
    with transaction(rt.session_factory) as session:
        job = rt.lease_fair(
            session, kind=JobKind.TRAIN.value, base_model=None, hint_job_id=message_job_id
        )
    if job is None:
        log.info("train %s: nothing queued any more (duplicate or cancelled)", message_job_id)
        return
    job_id = job.id
    rt.hold([job_id])
    try:
        _train_and_publish(rt, job)
    except LeaseLost:
        log.warning("train %s: lease lost to another worker; stopping", job_id)
    except JobFailure as failure:
        _finish(rt, job_id, JobStatus.FAILED, error=(failure.code, failure.message))
    except Exception as exc:
        code, message = _classify(exc)
        if code == "cancelled":
            _finish(rt, job_id, JobStatus.CANCELLED)
        else:
            if code == "internal_error":
                log.exception("train %s failed", job_id)
            _finish(rt, job_id, JobStatus.FAILED, error=(code, message))
    finally:
        rt.hold([])


def _classify(exc: Exception) -> tuple[str, str]:
    from workers.engine.training.errors import (
        ConfigError,
        TrainingCancelled,
        TrainingDataError,
        TrainingOutOfMemory,
    )

    if isinstance(exc, TrainingCancelled):
        return "cancelled", str(exc)
    if isinstance(exc, ConfigError):
        return "config_error", str(exc)
    if isinstance(exc, TrainingOutOfMemory):
        return "out_of_memory", f"{exc}. {exc.hint}"
    if isinstance(exc, TrainingDataError):
        return "dataset_error", str(exc)
    if isinstance(exc, ServiceError):  # e.g. the adapter moved to another base model meanwhile
        return exc.code, exc.detail
    return "internal_error", f"{type(exc).__name__}: {exc}"


def _finish(
    rt: WorkerRuntime, job_id: str, status: JobStatus, *, error: tuple[str, str] | None = None
) -> None:
    with transaction(rt.session_factory) as session:
        lifecycle.finish_job(
            session,
            job_id=job_id,
            owner=rt.worker_id,
            status=status,
            error_code=error[0] if error else None,
            error_message=error[1] if error else None,
        )


@dataclass(frozen=True)
class _Inputs:
    """What a run reads before it trains: its dataset's items and its base model's folder."""

    items: list[Any]
    pipeline_dir: Path


def _inputs(rt: WorkerRuntime, job: LeasedJob) -> _Inputs:
    """The job's dataset items and base model, or a JobFailure saying which is gone."""
    from workers.engine.training.data import TrainItem

    with rt.session_factory() as session:
        dataset = session.get(Dataset, job.dataset_id) if job.dataset_id else None
        if dataset is None or dataset.status != DatasetStatus.READY.value:
            raise JobFailure(
                "dataset_deleted", f"dataset {job.dataset_id} was deleted before training started"
            )
    source = rt.settings.model_sources.get(job.base_model or "")
    if source is None:
        raise JobFailure(
            "base_model_not_found",
            f"base model {job.base_model!r} is not configured on this worker",
        )
    folder = local_folder(source)
    if folder is None and (Path(source).is_absolute() or Path(source).exists()):
        raise JobFailure(
            "base_model_not_found", f"base model {job.base_model!r}: no pipeline at {source}"
        )
    dataset_dir = rt.store.path(dataset.storage_key)
    try:
        manifest = json.loads((dataset_dir / "manifest.json").read_text())
    except FileNotFoundError:
        raise JobFailure("dataset_deleted", f"dataset {dataset.id} files are gone") from None
    items = [
        TrainItem(image_path=dataset_dir / item["file"], captions=tuple(item["captions"]))
        for item in manifest["items"]
    ]
    return _Inputs(items=items, pipeline_dir=folder if folder is not None else Path(source))


def _admit_here(rt: WorkerRuntime, inputs: _Inputs, config: TrainConfig) -> None:
    """The API admitted this run without a plan (no planner there): plan it here, and refuse
    it before it trains when its peak memory is over this worker's."""
    from workers.engine.training.plan import plan_training

    if not rt.settings.train_admission or not inputs.pipeline_dir.is_dir():
        return
    plan = plan_training(
        pipeline_dir_or_config=inputs.pipeline_dir, config=config, num_items=len(inputs.items)
    )
    limit = rt.settings.train_max_memory_bytes or rt.info.get("memory_bytes")
    if isinstance(limit, int) and plan.memory.total > limit:
        raise JobFailure(
            "plan_over_memory",
            f"the plan's peak memory {plan.memory.total} bytes is over this worker's {limit}: "
            "lower the resolution, batch size or rank, or turn on gradient checkpointing",
        )


def _train_and_publish(rt: WorkerRuntime, job: LeasedJob) -> None:
    from workers.engine.training.config import TrainConfig
    from workers.engine.training.trainer import train_lora

    inputs = _inputs(rt, job)
    params = TrainParams.model_validate(job.params)
    config = TrainConfig.from_dict(params.hyperparameters)
    if params.planned_peak_memory_bytes is None:
        _admit_here(rt, inputs, config)
    evaluation = (
        JobEvaluation(rt, job, training_images=[item.image_path for item in inputs.items])
        if params.evaluation
        else None
    )
    output_dir = rt.store.path(f"jobs/{job.id}")
    callbacks = SqlCallbacks(
        rt, job_id=job.id, tenant_id=job.tenant_id, evaluation=evaluation, output_dir=output_dir
    )
    result = train_lora(
        pipeline_dir=inputs.pipeline_dir,
        items=inputs.items,
        config=config,
        output_dir=output_dir,
        callbacks=callbacks,
        device=rt.info.get("device"),
    )
    file = store_job_weights(
        rt.store, rt.settings, base_model=job.base_model or "", weights=result.adapter_path
    )
    outcome = (
        evaluation.conclude(final_step=result.steps, final_weights=result.adapter_path)
        if evaluation is not None
        else None
    )
    with transaction(rt.session_factory) as session:
        started = session.scalar(select(Job.started_at).where(Job.id == job.id)) or utcnow()
        metrics: dict[str, Any] = {
            "final_loss": result.final_loss,
            "steps": result.steps,
            "duration_s": round((utcnow() - started).total_seconds(), 3),
            "validation": callbacks.validation,
        }
        published = _publish(
            session,
            rt,
            job,
            outcome,
            publish=params.publish,
            final=file,
            metrics=metrics,
            trainable_params=result.trainable_params,
        )
        version = published.version
        evaluation_result: dict[str, Any] = {}
        if outcome is not None:
            evaluation_result = {
                "evaluation": {
                    **outcome.summary(),
                    "best_version": published.best.version if published.best else None,
                }
            }
        done = lifecycle.finish_job(
            session,
            job_id=job.id,
            owner=rt.worker_id,
            status=JobStatus.SUCCEEDED,
            result={
                "adapter_name": job.adapter_name,
                "version": version.version,
                "adapter_version_id": version.id,
                "sha256": version.sha256,
                "size_bytes": version.size_bytes,
                "trainable_params": result.trainable_params.total,
                "resumed_from_step": result.resumed_from_step,
                **metrics,
                **evaluation_result,
            },
        )
        if not done:
            # Our lease was lost meanwhile: roll back, the new owner publishes.
            raise LeaseLost(job.id)


@dataclass(frozen=True)
class _Published:
    version: AdapterVersion  # the job's version (``latest``)
    best: AdapterVersion | None  # what ``best`` points at


def _publish(
    session: Session,
    rt: WorkerRuntime,
    job: LeasedJob,
    outcome: EvaluationOutcome | None,
    *,
    publish: str,
    final: StoredFile,
    metrics: dict[str, Any],
    trainable_params: TrainableParams,
) -> _Published:
    """Publish the job's version and, with an evaluation, point ``best`` at the best step.

    ``publish: final``: the final weights are the job's version (``latest``); a better earlier
    checkpoint is published first, as a checkpoint version, so ``latest`` stays on the final
    step. ``publish: best``: the best step's weights are the job's version.
    """
    total = trainable_params.total
    counts: dict[str, Any] = {
        "trainable_params": {
            "unet": trainable_params.unet,
            "text_encoder": trainable_params.text_encoder,
        }
    }
    best_step = outcome.best_step if outcome is not None else None
    if outcome is None or best_step is None:
        version = publish_job_version(
            session,
            rt.settings,
            job=job,
            stored=final.stored,
            metrics=metrics,
            trainable_params=total,
            lineage=counts,
        )
        return _Published(version=version, best=None)
    best_record = outcome.records[best_step]
    final_record = outcome.records[outcome.final_step]
    best_version = None
    if publish == "best":
        version = publish_job_version(
            session,
            rt.settings,
            job=job,
            stored=outcome.stored_weights(best_step),
            trainable_params=total,
            metrics={**metrics, **_evaluation_metrics(best_record)},
            lineage={**counts, "checkpoint_step": best_step},
        )
        best_version = version
    else:
        if best_step != outcome.final_step:
            best_version = _promoted_checkpoint(session, job, best_step) or publish_job_version(
                session,
                rt.settings,
                job=job,
                stored=outcome.stored_weights(best_step),
                checkpoint_step=best_step,
                trainable_params=total,
                metrics=_evaluation_metrics(best_record),
                lineage={**counts, "job_id": job.id, "checkpoint_step": best_step},
            )
        version = publish_job_version(
            session,
            rt.settings,
            job=job,
            stored=final.stored,
            metrics={**metrics, **_evaluation_metrics(final_record)},
            trainable_params=total,
            lineage=counts,
        )
        best_version = best_version or version
    adapter = get_or_create_adapter(
        session,
        tenant_id=job.tenant_id,
        name=job.adapter_name or "",
        base_model=job.base_model or "",
    )
    move_alias(
        session,
        adapter=adapter,
        alias=BEST_ALIAS,
        version=best_version.version,
        actor=f"job:{job.id}",
    )
    return _Published(version=version, best=best_version)


def _promoted_checkpoint(session: Session, job: LeasedJob, step: int) -> AdapterVersion | None:
    """The version an earlier promotion of this checkpoint made (POST .../promote), if any."""
    for candidate in session.scalars(
        select(AdapterVersion).where(
            AdapterVersion.tenant_id == job.tenant_id,
            AdapterVersion.source == VersionSource.CHECKPOINT.value,
            AdapterVersion.checkpoint_step == step,
        )
    ):
        if candidate.lineage.get("job_id") == job.id:
            return candidate
    return None


def _evaluation_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """What a version's ``metrics`` keep of the evaluation of its weights."""
    return {
        "evaluation": record["evaluation"],
        "evaluation_step": record["step"],
        "evaluation_methods": record.get("methods", {}),
        "evaluation_per_prompt": record.get("per_prompt", []),
    }
