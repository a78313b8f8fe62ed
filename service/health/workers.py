"""Live workers as one tenant may see them.

Workers are shared by every tenant, and each reports what it holds (resident adapters by
artifact key, with weights, and the job it runs). A tenant sees the shared, non-identifying
figures (workers, their base models and devices, cache sizes, queue lengths) and, of what
identifies work, only its own: adapters whose files it owns and its own jobs.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.config import Settings
from service.fleet import live_workers
from service.models import AdapterVersion, Job, JobStatus


class WorkerOut(BaseModel):
    id: str
    hostname: str
    queues: list[str]
    base_model: str | None
    device: str | None
    current_job_id: str | None = Field(description="only when it is one of the caller's jobs")
    info: dict[str, Any] = Field(
        description="device details and the inference state: `inference.active` and each "
        "`inference.cache` tier's `entries` list only the caller's adapters; counts and bytes "
        "cover every tenant's"
    )
    started_at: datetime
    heartbeat_at: datetime


class WorkerList(BaseModel):
    data: list[WorkerOut]
    has_more: bool = False
    queue_lengths: dict[str, int] = Field(
        default_factory=dict, description="queued jobs of every tenant, per queue"
    )


def _adapter_entries(info: dict[str, Any]) -> Iterator[list[Any]]:
    """The lists in a worker's inference state whose items name an adapter by ``key``."""
    inference = info.get("inference")
    if not isinstance(inference, dict):
        return
    if isinstance(inference.get("active"), list):
        yield inference["active"]
    cache = inference.get("cache")
    if isinstance(cache, dict):
        for tier in cache.values():
            if isinstance(tier, dict) and isinstance(tier.get("entries"), list):
                yield tier["entries"]


def _keys(info: dict[str, Any]) -> set[str]:
    return {
        item["key"]
        for entries in _adapter_entries(info)
        for item in entries
        if isinstance(item, dict) and isinstance(item.get("key"), str)
    }


def _own_view(info: dict[str, Any], own_keys: set[str]) -> dict[str, Any]:
    """A copy of ``info`` whose adapter lists keep only the caller's adapters."""
    view: dict[str, Any] = {k: v for k, v in info.items() if k != "inference"}
    inference = info.get("inference")
    if not isinstance(inference, dict):
        return view
    copied = {k: v for k, v in inference.items() if k not in ("active", "cache")}
    if isinstance(inference.get("active"), list):
        copied["active"] = [a for a in inference["active"] if _owned(a, own_keys)]
    cache = inference.get("cache")
    if isinstance(cache, dict):
        copied["cache"] = {
            name: {
                **{k: v for k, v in tier.items() if k != "entries"},
                "entries": [e for e in tier.get("entries") or [] if _owned(e, own_keys)],
            }
            for name, tier in cache.items()
            if isinstance(tier, dict)
        }
    view["inference"] = copied
    return view


def _owned(item: Any, own_keys: set[str]) -> bool:
    return isinstance(item, dict) and item.get("key") in own_keys


def workers_for_tenant(session: Session, settings: Settings, *, tenant_id: str) -> WorkerList:
    """Live workers, showing only ``tenant_id``'s adapters and jobs, and queue lengths."""
    rows = live_workers(session, settings)
    keys = set().union(*(_keys(w.info or {}) for w in rows))
    own_keys = (
        set(
            session.scalars(
                select(AdapterVersion.storage_key).where(
                    AdapterVersion.tenant_id == tenant_id, AdapterVersion.storage_key.in_(keys)
                )
            )
        )
        if keys
        else set()
    )
    job_ids = {w.current_job_id for w in rows if w.current_job_id}
    own_jobs = (
        set(session.scalars(select(Job.id).where(Job.tenant_id == tenant_id, Job.id.in_(job_ids))))
        if job_ids
        else set()
    )
    queued = session.execute(
        select(Job.queue, func.count())
        .where(Job.status == JobStatus.QUEUED.value)
        .group_by(Job.queue)
    ).all()
    return WorkerList(
        data=[
            WorkerOut(
                id=w.id,
                hostname=w.hostname,
                queues=w.queues,
                base_model=w.base_model,
                device=w.device,
                current_job_id=w.current_job_id if w.current_job_id in own_jobs else None,
                info=_own_view(w.info or {}, own_keys),
                started_at=w.started_at,
                heartbeat_at=w.heartbeat_at,
            )
            for w in rows
        ],
        queue_lengths={queue: int(count) for queue, count in queued},
    )
