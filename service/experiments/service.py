"""Experiments: one training job per combination of the grid, and the comparison of runs."""

from __future__ import annotations

import csv
import functools
import io
import itertools
from collections.abc import Sequence
from typing import Any, get_args

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.config import Settings
from service.errors import NotFound, field_error
from service.experiments.schemas import ExperimentCreate, ExperimentOut, ExperimentRun
from service.jobs import training
from service.jobs.training_schemas import (
    Hyperparameters,
    SelectableMetric,
    TrainingPlanOut,
    TrainJobCreate,
)
from service.models import ACTIVE_JOB_STATUSES, Experiment, Job, JobStatus

# The order of the metric columns in tables and reports: the selectable metrics' own order.
METRIC_ORDER: tuple[str, ...] = get_args(SelectableMetric)


def combinations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the first key varying slowest."""
    names = list(grid)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*grid.values())]


def create_experiment(
    session: Session, *, settings: Settings, tenant_id: str, body: ExperimentCreate
) -> Experiment:
    """Validate and admit every run as ``POST /jobs`` would (its plan against the training
    workers' memory and the longest run accepted), then queue one job per run."""
    runs = combinations(body.grid)
    if len(runs) > settings.experiment_max_runs:
        raise field_error(
            "grid",
            f"{len(runs)} runs is over the limit {settings.experiment_max_runs} "
            "(LORASTACK_EXPERIMENT_MAX_RUNS)",
            code="limit_exceeded",
        )
    base = body.hyperparameters.model_dump(exclude_unset=True)
    requests: list[tuple[TrainJobCreate, TrainingPlanOut | None]] = []
    base_model = ""
    memory_limit = training.training_memory_limit(session, settings)
    for index, parameters in enumerate(runs, start=1):
        try:
            hyperparameters = Hyperparameters.model_validate({**base, **parameters})
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"]) or ",".join(parameters)
            raise field_error(
                f"grid.{where}",
                f"run {index} ({parameters}): {error['msg']}",
                code="validation_error",
            ) from None
        run = TrainJobCreate(
            dataset_id=body.dataset_id,
            adapter_name=f"{body.adapter_name}-{index}",
            base_model=body.base_model,
            hyperparameters=hyperparameters,
            evaluation=body.evaluation,
            publish=body.publish,
        )
        dataset, base_model, source = training.validate_training_request(
            session, settings=settings, tenant_id=tenant_id, body=run
        )
        plan = training.plan_for_admission(
            settings,
            functools.partial(
                training.plan_training,
                settings=settings,
                body=run,
                dataset=dataset,
                base_model=base_model,
                source=source,
            ),
        )
        if plan is not None:
            training.admit_by_plan(plan, settings=settings, memory_limit=memory_limit)
        requests.append((run, plan))
    experiment = Experiment(
        tenant_id=tenant_id,
        dataset_id=body.dataset_id,
        base_model=base_model,
        adapter_prefix=body.adapter_name,
        params={
            "hyperparameters": base,
            "evaluation": body.evaluation.model_dump(mode="json") if body.evaluation else None,
            "publish": body.publish,
            "grid": body.grid,
            "runs": [
                {"index": i, "adapter_name": r.adapter_name, "parameters": p}
                for i, ((r, _), p) in enumerate(zip(requests, runs, strict=True), start=1)
            ],
        },
    )
    session.add(experiment)
    session.flush()
    for run, plan in requests:
        training.create_training_job(
            session,
            settings=settings,
            tenant_id=tenant_id,
            body=run,
            dataset=dataset,
            base_model=base_model,
            plan=plan,
            experiment_id=experiment.id,
        )
    return experiment


def get_experiment(session: Session, *, tenant_id: str, experiment_id: str) -> Experiment:
    experiment = session.scalar(
        select(Experiment).where(Experiment.id == experiment_id, Experiment.tenant_id == tenant_id)
    )
    if experiment is None:
        raise NotFound(f"experiment {experiment_id!r} not found")
    return experiment


def list_experiments(
    session: Session, *, tenant_id: str, limit: int, after: str | None
) -> tuple[Sequence[Experiment], bool]:
    """The tenant's experiments, newest first (ids sort by creation), one page of them."""
    query = select(Experiment).where(Experiment.tenant_id == tenant_id)
    if after:
        query = query.where(Experiment.id < after)
    rows = session.scalars(query.order_by(Experiment.id.desc()).limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit


def experiment_views(session: Session, experiments: Sequence[Experiment]) -> list[ExperimentOut]:
    """Every experiment's view, reading all their runs' jobs in one query."""
    ids = [experiment.id for experiment in experiments]
    jobs: dict[str, list[Job]] = {experiment_id: [] for experiment_id in ids}
    if ids:
        for job in session.scalars(select(Job).where(Job.experiment_id.in_(ids))):
            jobs[str(job.experiment_id)].append(job)
    return [_view(experiment, jobs[experiment.id]) for experiment in experiments]


def experiment_view(session: Session, experiment: Experiment) -> ExperimentOut:
    """The experiment with one row per run, read from its training jobs."""
    return _view(
        experiment, list(session.scalars(select(Job).where(Job.experiment_id == experiment.id)))
    )


def _view(experiment: Experiment, run_jobs: list[Job]) -> ExperimentOut:
    jobs = {job.adapter_name: job for job in run_jobs}
    runs = [
        _run_row(entry, jobs[entry["adapter_name"]])
        for entry in experiment.params["runs"]
        if entry["adapter_name"] in jobs
    ]
    evaluation = experiment.params.get("evaluation") or {}
    select_by = evaluation.get("select")
    return ExperimentOut(
        id=experiment.id,
        status=_status([run.status for run in runs]),
        dataset_id=experiment.dataset_id,
        base_model=experiment.base_model,
        adapter_name=experiment.adapter_prefix,
        grid=experiment.params["grid"],
        select=select_by,
        runs=runs,
        best_run=_best_run(runs, select_by),
        created_at=experiment.created_at,
    )


def _run_row(entry: dict[str, Any], job: Job) -> ExperimentRun:
    result = job.result or {}
    summary = result.get("evaluation") or {}
    best_step = summary.get("best_step")
    metrics: dict[str, float] = next(
        (c["metrics"] for c in summary.get("checkpoints", []) if c["step"] == best_step), {}
    )
    return ExperimentRun(
        index=entry["index"],
        job_id=job.id,
        adapter_name=entry["adapter_name"],
        parameters=entry["parameters"],
        status=job.status,
        trainable_params=result.get("trainable_params"),
        adapter_file_bytes=result.get("size_bytes"),
        duration_s=result.get("duration_s"),
        final_loss=result.get("final_loss"),
        version=result.get("version"),
        best_step=best_step,
        best_version=summary.get("best_version"),
        metrics=metrics,
    )


def _status(statuses: list[str]) -> str:
    """succeeded once every run has ended and at least one succeeded."""
    if any(s in ACTIVE_JOB_STATUSES for s in statuses):
        queued = all(s == JobStatus.QUEUED.value for s in statuses)
        return JobStatus.QUEUED.value if queued else JobStatus.RUNNING.value
    if JobStatus.SUCCEEDED.value in statuses:
        return JobStatus.SUCCEEDED.value
    if statuses and all(s == JobStatus.CANCELLED.value for s in statuses):
        return JobStatus.CANCELLED.value
    return JobStatus.FAILED.value


def _best_run(runs: list[ExperimentRun], select_by: dict[str, str] | None) -> int | None:
    """The succeeded run whose best checkpoint is best by ``select`` (the first of equals)."""
    if not select_by:
        return None
    metric, sign = select_by["metric"], (1 if select_by["mode"] == "max" else -1)
    scored = [
        (sign * run.metrics[metric], -run.index, run.index)
        for run in runs
        if run.status == JobStatus.SUCCEEDED.value and metric in run.metrics
    ]
    return max(scored)[2] if scored else None


def report_table(view: ExperimentOut) -> tuple[list[str], list[list[str]]]:
    """The comparison table: a header and one row of text cells per run."""
    grid_names = list(view.grid)
    present = {name for run in view.runs for name in run.metrics}
    metric_names = [m for m in METRIC_ORDER if m in present]
    metric_names += sorted(present - set(METRIC_ORDER))
    header = [
        "run",
        "adapter",
        *grid_names,
        "status",
        "trainable_params",
        "adapter_file_bytes",
        "duration_s",
        "final_loss",
        "best_step",
        *metric_names,
        "best_run",
    ]
    rows = []
    for run in view.runs:
        cells: list[Any] = [
            run.index,
            run.adapter_name,
            *(run.parameters.get(name) for name in grid_names),
            run.status,
            run.trainable_params,
            run.adapter_file_bytes,
            run.duration_s,
            run.final_loss,
            run.best_step,
            *(run.metrics.get(name) for name in metric_names),
            "yes" if run.index == view.best_run else "",
        ]
        rows.append([_text(cell) for cell in cells])
    return header, rows


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def report_csv(view: ExperimentOut) -> str:
    header, rows = report_table(view)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def report_markdown(view: ExperimentOut) -> str:
    header, rows = report_table(view)
    select_by = view.select
    lines = [
        f"# Experiment {view.id}",
        "",
        f"Status: {view.status}. Dataset {view.dataset_id}, base model {view.base_model}, "
        f"adapters {view.adapter_name}-<run>.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows),
        "",
    ]
    if select_by and view.best_run is not None:
        lines.append(
            f"Best run: {view.best_run} by {select_by['metric']} ({select_by['mode']}); "
            "metrics are those of each run's best checkpoint."
        )
        lines.append("")
    return "\n".join(lines)
