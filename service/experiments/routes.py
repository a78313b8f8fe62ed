"""HTTP routes for experiments: create (one training job per grid combination), read, report."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from starlette.concurrency import run_in_threadpool

from service.deps import AppSettings, Caller, Paging, UoW
from service.experiments.schemas import ExperimentCreate, ExperimentList, ExperimentOut
from service.experiments.service import (
    create_experiment,
    experiment_view,
    experiment_views,
    get_experiment,
    list_experiments,
    report_csv,
    report_markdown,
)
from service.idempotency import REPLAYED_HEADER, IdempotencyKeyHeader, create_once
from service.problems import COMMON_ERRORS, problem_responses
from service.strict_input import StrictInputRoute

router = APIRouter(
    tags=["experiments"],
    route_class=StrictInputRoute,
    responses=problem_responses(*COMMON_ERRORS),
)


@router.get("/experiments", operation_id="list_experiments", response_model=ExperimentList)
def list_experiments_route(uow: UoW, caller: Caller, page: Paging) -> ExperimentList:
    """The caller's experiments, newest first; page on with ``after`` (the last id seen)."""
    rows, has_more = list_experiments(
        uow.session, tenant_id=caller.tenant_id, limit=page.limit, after=page.after
    )
    return ExperimentList(data=experiment_views(uow.session, rows), has_more=has_more)


@router.post(
    "/experiments",
    operation_id="create_experiment",
    status_code=201,
    response_model=ExperimentOut,
    responses=problem_responses(404, 429),
)
async def create_experiment_route(
    body: ExperimentCreate,
    response: Response,
    uow: UoW,
    caller: Caller,
    settings: AppSettings,
    idempotency_key: IdempotencyKeyHeader = None,
) -> ExperimentOut:
    """Queue one training run per combination of ``grid``; compare them when they end."""

    def create() -> tuple[ExperimentOut, bool]:
        experiment_id, created = create_once(
            uow.session,
            tenant_id=caller.tenant_id,
            scope="POST /experiments",
            key=idempotency_key,
            payload=body.model_dump(mode="json"),
            create=lambda: (
                create_experiment(
                    uow.session, settings=settings, tenant_id=caller.tenant_id, body=body
                ).id
            ),
        )
        if created:
            uow.commit()  # sends the runs' tasks
        experiment = get_experiment(
            uow.session, tenant_id=caller.tenant_id, experiment_id=experiment_id
        )
        return experiment_view(uow.session, experiment), created

    out, created = await run_in_threadpool(create)
    if not created:
        response.headers[REPLAYED_HEADER] = "true"
    return out


@router.get(
    "/experiments/{experiment_id}",
    operation_id="get_experiment",
    response_model=ExperimentOut,
    responses=problem_responses(404),
)
def get_experiment_route(experiment_id: str, uow: UoW, caller: Caller) -> ExperimentOut:
    experiment = get_experiment(
        uow.session, tenant_id=caller.tenant_id, experiment_id=experiment_id
    )
    return experiment_view(uow.session, experiment)


@router.get(
    "/experiments/{experiment_id}/report",
    operation_id="get_experiment_report",
    response_class=Response,
    responses={
        200: {"content": {"text/csv": {}, "text/markdown": {}}},
        **problem_responses(404),
    },
)
def experiment_report_route(
    experiment_id: str,
    uow: UoW,
    caller: Caller,
    format: Annotated[Literal["csv", "md"], Query()] = "md",
) -> Response:
    """The comparison table: one row per run, best checkpoint's metrics, the best run."""
    experiment = get_experiment(
        uow.session, tenant_id=caller.tenant_id, experiment_id=experiment_id
    )
    view = experiment_view(uow.session, experiment)
    if format == "csv":
        return Response(report_csv(view), media_type="text/csv; charset=utf-8")
    return Response(report_markdown(view), media_type="text/markdown; charset=utf-8")
