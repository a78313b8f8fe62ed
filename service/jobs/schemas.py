"""Job resources as the API shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from service.models import Job, JobEvent


class JobError(BaseModel):
    code: str
    message: str | None = None


class JobOut(BaseModel):
    id: str
    kind: str
    status: str
    queue: str
    queue_position: int | None = Field(None, description="1-based, while queued")
    dataset_id: str | None = None
    base_model: str | None = None
    adapter_name: str | None = None
    params: dict[str, Any]
    progress: dict[str, Any]
    attempts: int
    max_attempts: int
    error: JobError | None = None
    result: dict[str, Any] | None = None
    created_at: datetime
    queued_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None

    @classmethod
    def from_row(cls, job: Job, *, queue_position: int | None = None) -> JobOut:
        return cls(
            id=job.id,
            kind=job.kind,
            status=job.status,
            queue=job.queue,
            queue_position=queue_position,
            dataset_id=job.dataset_id,
            base_model=job.base_model,
            adapter_name=job.adapter_name,
            params=job.params,
            progress=job.progress,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            error=JobError(code=job.error_code, message=job.error_message)
            if job.error_code
            else None,
            result=job.result,
            created_at=job.created_at,
            queued_at=job.queued_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            heartbeat_at=job.heartbeat_at,
        )


class JobList(BaseModel):
    data: list[JobOut]
    has_more: bool


class JobEventOut(BaseModel):
    seq: int
    type: str
    level: str
    data: dict[str, Any]
    created_at: datetime

    @classmethod
    def from_row(cls, event: JobEvent) -> JobEventOut:
        return cls(
            seq=event.seq,
            type=event.type,
            level=event.level,
            data=event.data,
            created_at=event.created_at,
        )


class JobEventList(BaseModel):
    data: list[JobEventOut]
    has_more: bool
