"""Training jobs: validate a request against what exists, then queue it (or plan it)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import dispatch, lifecycle
from service.base_models import linear_module_names, local_folder, missing_targets
from service.base_models import resolve_base_model as resolve_model
from service.config import Settings
from service.datasets.service import get_dataset
from service.errors import NotFound, ServiceUnavailable, Unprocessable, field_error
from service.fleet import live_workers
from service.job_params import TrainParams
from service.jobs.planner import PLANNER, PlannerUnavailable
from service.jobs.training_schemas import TrainingPlanOut, TrainJobCreate
from service.models import Adapter, Dataset, Job, JobKind
from service.queue import TRAIN_QUEUE
from service.registry import check_base_model

log = logging.getLogger(__name__)


def validate_training_request(
    session: Session, *, settings: Settings, tenant_id: str, body: TrainJobCreate
) -> tuple[Dataset, str, str]:
    """Check the request against the dataset, base model, adapter and live workers.

    Returns (dataset, base model name, base model source). Raises 422 naming the field.
    """
    try:
        # Locked until the job row commits, so a concurrent DELETE can't slip in between.
        dataset = get_dataset(
            session, tenant_id=tenant_id, dataset_id=body.dataset_id, for_update=True
        )
    except NotFound:
        raise field_error(
            "dataset_id", f"no dataset {body.dataset_id!r}", code="dataset_not_found"
        ) from None
    name, source = resolve_model(settings, body.base_model)
    adapter = session.scalar(
        select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == body.adapter_name)
    )
    if adapter is not None:
        check_base_model(adapter, name, field="adapter_name")
    hp = body.hyperparameters
    folder = local_folder(source)
    if folder is not None:
        missing = missing_targets(linear_module_names(folder, "unet"), hp.unet_targets())
        if missing:
            raise field_error(
                "hyperparameters.target_modules",
                f"the base model {name!r} has no module matching {missing}",
                code="unknown_target_module",
            )
        if hp.train_text_encoder:
            missing = missing_targets(
                linear_module_names(folder, "text_encoder"), tuple(hp.text_encoder_target_modules)
            )
            if missing:
                raise field_error(
                    "hyperparameters.text_encoder_target_modules",
                    f"the text encoder of {name!r} has no module matching {missing}",
                    code="unknown_target_module",
                )
    if hp.mixed_precision != "no":
        workers = [w for w in live_workers(session, settings) if TRAIN_QUEUE in w.queues]
        supported = [w for w in workers if hp.mixed_precision in w.info.get("mixed_precision", [])]
        if workers and not supported:
            devices = sorted({str(w.device) for w in workers})
            raise field_error(
                "hyperparameters.mixed_precision",
                f"{hp.mixed_precision} is not supported by any live training worker "
                f"(devices: {', '.join(devices)})",
                code="unsupported_mixed_precision",
            )
    return dataset, name, source


def create_training_job(
    session: Session,
    *,
    settings: Settings,
    tenant_id: str,
    body: TrainJobCreate,
    dataset: Dataset,
    base_model: str,
    experiment_id: str | None = None,
    plan: TrainingPlanOut | None = None,
) -> Job:
    dispatch.check_queued_quota(
        session, settings=settings, tenant_id=tenant_id, kind=JobKind.TRAIN.value
    )
    return lifecycle.create_job(
        session,
        tenant_id=tenant_id,
        kind=JobKind.TRAIN.value,
        queue=TRAIN_QUEUE,
        max_attempts=settings.job_max_attempts,
        dataset_id=dataset.id,
        base_model=base_model,
        adapter_name=body.adapter_name,
        experiment_id=experiment_id,
        params=TrainParams(
            hyperparameters=body.hyperparameters.resolved(),
            dataset_sha256=dataset.sha256,
            evaluation=body.evaluation.model_dump(mode="json") if body.evaluation else None,
            publish=body.publish,
            planned_peak_memory_bytes=plan.peak_memory_bytes if plan is not None else None,
        ).model_dump(mode="json"),
    )


def plan_training(
    *, settings: Settings, body: TrainJobCreate, dataset: Dataset, base_model: str, source: str
) -> TrainingPlanOut:
    """The run's dry-run plan from the resident planner (it needs torch; this process never
    imports it). 422 for a configuration the planner refuses, 503 when it can't answer."""
    folder = local_folder(source)
    if folder is None:
        raise field_error(
            "base_model",
            "a dry run needs a base model stored as a local folder",
            code="dry_run_unavailable",
        )
    request = {
        "pipeline_dir": str(folder),
        "hyperparameters": body.hyperparameters.resolved(),
        "num_items": dataset.pair_count,
    }
    try:
        answer = PLANNER.plan(request, timeout_s=settings.train_planner_timeout_s)
    except PlannerUnavailable as exc:
        raise ServiceUnavailable(exc.message, code=exc.code) from None
    if "error" in answer:
        err = answer["error"]
        raise field_error(f"hyperparameters.{err['field']}", err["message"], code="config_error")
    return TrainingPlanOut(
        base_model=base_model,
        dataset_id=dataset.id,
        hyperparameters=body.hyperparameters.resolved(),
        **answer["plan"],
    )


def plan_for_admission(
    settings: Settings, plan: Callable[[], TrainingPlanOut]
) -> TrainingPlanOut | None:
    """``plan()`` for admission, or None when it can't be had: admission off, a base model not
    stored as a local folder, a planner that can't answer (the worker then plans the run
    itself before it trains). A configuration the planner refuses is still a 422."""
    if not settings.train_admission:
        return None
    try:
        return plan()
    except ServiceUnavailable as exc:
        log.warning("training admission skipped: %s", exc.detail)
        return None
    except Unprocessable as exc:
        if exc.code == "dry_run_unavailable":
            return None
        raise


def training_memory_limit(session: Session, settings: Settings) -> tuple[str, int] | None:
    """(what it is, bytes): LORASTACK_TRAIN_MAX_MEMORY_BYTES when set, else the most memory a
    live training worker reports; None when neither is known."""
    if settings.train_max_memory_bytes is not None:
        return "LORASTACK_TRAIN_MAX_MEMORY_BYTES", settings.train_max_memory_bytes
    reported = [
        int(w.info["memory_bytes"])
        for w in live_workers(session, settings)
        if TRAIN_QUEUE in w.queues and isinstance(w.info.get("memory_bytes"), int)
    ]
    return ("live training workers' memory", max(reported)) if reported else None


def admit_by_plan(
    plan: TrainingPlanOut, *, settings: Settings, memory_limit: tuple[str, int] | None
) -> None:
    """Refuse (422 with the plan's figures) a run whose plan exceeds the training workers'
    memory or the longest run accepted (LORASTACK_TRAIN_MAX_DURATION_S)."""
    figures = {
        "peak_memory_bytes": plan.peak_memory_bytes,
        "memory": plan.memory,
        "estimated_duration_s": plan.estimated_duration_s,
        "total_steps": plan.total_steps,
        "seconds_per_step": plan.seconds_per_step,
    }
    if memory_limit is not None and plan.peak_memory_bytes > memory_limit[1]:
        name, cap = memory_limit
        raise Unprocessable(
            f"the plan's peak memory {plan.peak_memory_bytes} bytes is over the {cap} of the "
            f"{name}: lower the resolution, batch size or rank, or turn on gradient "
            "checkpointing",
            code="plan_over_memory",
            extra={"plan": figures, "limit": {"name": name, "value": cap}},
        )
    duration_cap = settings.train_max_duration_s
    duration = plan.estimated_duration_s
    if duration_cap is not None and duration is not None and duration > duration_cap:
        raise Unprocessable(
            f"the plan's estimated duration {duration:.0f} s is over the limit "
            f"{duration_cap:g} s (LORASTACK_TRAIN_MAX_DURATION_S): train fewer steps",
            code="plan_over_duration",
            extra={
                "plan": figures,
                "limit": {"name": "LORASTACK_TRAIN_MAX_DURATION_S", "value": duration_cap},
            },
        )
