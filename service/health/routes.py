"""GET /healthz, GET /readyz, GET /workers."""

from __future__ import annotations

from typing import Any

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.config import Settings
from service.deps import Caller, UoW
from service.fleet import live_workers
from service.health.workers import WorkerList, workers_for_tenant
from service.problems import problem_responses
from service.strict_input import StrictInputRoute

router = APIRouter(
    tags=["health"], route_class=StrictInputRoute, responses=problem_responses(413, 422, 500)
)


@router.get("/healthz", operation_id="healthz")
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    operation_id="readyz",
    responses=problem_responses(503),
)
async def readyz(request: Request) -> JSONResponse:
    """Ready when the database and Redis answer and at least one worker heartbeats."""
    settings: Settings = request.app.state.settings
    checks: dict[str, dict[str, Any]] = {}

    def check_db() -> int:
        session: Session = request.app.state.session_factory()
        try:
            session.execute(text("SELECT 1"))
            return len(live_workers(session, settings))
        finally:
            session.close()

    workers = 0
    try:
        workers = await run_in_threadpool(check_db)
        checks["database"] = {"ok": True}
    except Exception as exc:
        checks["database"] = {"ok": False, "error": type(exc).__name__ + ": " + str(exc)[:200]}

    def check_redis() -> None:
        client = redis.Redis.from_url(
            settings.redis_client_url, socket_connect_timeout=2, socket_timeout=2
        )
        try:
            client.ping()
        finally:
            client.close()

    try:
        await run_in_threadpool(check_redis)
        checks["redis"] = {"ok": True}
    except Exception as exc:
        checks["redis"] = {"ok": False, "error": type(exc).__name__ + ": " + str(exc)[:200]}
    checks["workers"] = {"ok": workers > 0, "live": workers}
    if all(c["ok"] for c in checks.values()):
        return JSONResponse({"status": "ready", "checks": checks})
    failing = ", ".join(name for name, c in checks.items() if not c["ok"])
    return JSONResponse(
        {
            "type": "https://lorastack.dev/problems/not_ready",
            "title": "Service Unavailable",
            "status": 503,
            "code": "not_ready",
            "detail": f"not ready: {failing}",
            "checks": checks,
        },
        status_code=503,
        media_type="application/problem+json",
    )


@router.get(
    "/workers",
    operation_id="list_workers",
    response_model=WorkerList,
    responses=problem_responses(400, 401),
)
def list_workers(request: Request, uow: UoW, caller: Caller) -> WorkerList:
    """Live workers: base model, device, last heartbeat, queue lengths; of the adapters they
    hold and the jobs they run, only the caller's."""
    settings: Settings = request.app.state.settings
    return workers_for_tenant(uow.session, settings, tenant_id=caller.tenant_id)
