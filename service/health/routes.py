"""GET /healthz, GET /readyz, GET /workers."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.config import Settings
from service.deps import Caller, UoW
from service.fleet import live_workers

router = APIRouter(tags=["health"])


class WorkerOut(BaseModel):
    id: str
    hostname: str
    queues: list[str]
    base_model: str | None
    device: str | None
    current_job_id: str | None
    info: dict[str, Any]
    started_at: datetime
    heartbeat_at: datetime


class WorkerList(BaseModel):
    data: list[WorkerOut]
    has_more: bool = False


@router.get("/healthz", operation_id="healthz")
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    operation_id="readyz",
    responses={503: {"content": {"application/problem+json": {}}}},
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


@router.get("/workers", operation_id="list_workers", response_model=WorkerList)
def list_workers(request: Request, uow: UoW, caller: Caller) -> WorkerList:
    """Live workers: base model, device, current job, resident adapters, last heartbeat."""
    settings: Settings = request.app.state.settings
    rows = live_workers(uow.session, settings)
    return WorkerList(
        data=[
            WorkerOut(
                id=w.id,
                hostname=w.hostname,
                queues=w.queues,
                base_model=w.base_model,
                device=w.device,
                current_job_id=w.current_job_id,
                info=w.info,
                started_at=w.started_at,
                heartbeat_at=w.heartbeat_at,
            )
            for w in rows
        ]
    )
