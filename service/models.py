"""SQL data model (SQLAlchemy 2, typed). Every tenant-owned row carries ``tenant_id``."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from service.db import Base, new_id, utcnow


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCEL_REQUESTED = "cancel_requested"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_JOB_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE_JOB_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCEL_REQUESTED})


class JobKind(enum.StrEnum):
    TRAIN = "train"
    GENERATE = "generate"
    PING = "ping"
    GRID = "grid"


class DatasetStatus(enum.StrEnum):
    READY = "ready"
    DELETED = "deleted"


class VersionSource(enum.StrEnum):
    JOB = "job"
    IMPORT = "import"
    CHECKPOINT = "checkpoint"


def _status_check(name: str, column: str, values: type[enum.StrEnum]) -> CheckConstraint:
    allowed = ", ".join(f"'{v.value}'" for v in values)
    return CheckConstraint(f"{column} IN ({allowed})", name=name)


class Tenant(Base):
    __tablename__ = "tenant"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("tn"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_key"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"), index=True)
    # sha256 of the secret; the secret itself is never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(200))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]

    tenant: Mapped[Tenant] = relationship(lazy="joined")


class Dataset(Base):
    __tablename__ = "dataset"
    __table_args__ = (_status_check("status", "status", DatasetStatus),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ds"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default=DatasetStatus.READY.value)
    sha256: Mapped[str] = mapped_column(String(64))
    image_count: Mapped[int] = mapped_column(Integer, default=0)
    caption_count: Mapped[int] = mapped_column(Integer, default=0)
    pair_count: Mapped[int] = mapped_column(Integer, default=0)
    total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    layout: Mapped[str | None] = mapped_column(String(40))
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    storage_key: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "job"
    __table_args__ = (
        _status_check("status", "status", JobStatus),
        _status_check("kind", "kind", JobKind),
        Index("ix_job_status_queued_at", "status", "queued_at"),
        # Quota counts (queued per tenant and kind) and the fair lease read by these three.
        Index("ix_job_tenant_id_kind_status", "tenant_id", "kind", "status"),
        # The fair lease's "last start per tenant": one index probe per tenant.
        Index("ix_job_tenant_id_kind_started_at", "tenant_id", "kind", "started_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.QUEUED.value)
    queue: Mapped[str] = mapped_column(String(40))
    dataset_id: Mapped[str | None] = mapped_column(
        ForeignKey("dataset.id", ondelete="SET NULL"), index=True
    )
    base_model: Mapped[str | None] = mapped_column(String(200))
    adapter_name: Mapped[str | None] = mapped_column(String(200))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    event_seq: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    cancel_requested_at: Mapped[datetime | None]
    # The experiment this training job is a run of, if any.
    experiment_id: Mapped[str | None] = mapped_column(
        ForeignKey("experiment.id", ondelete="SET NULL"), index=True
    )


class Experiment(Base):
    """A grid of training runs over hyperparameters; its runs are training jobs
    (``job.experiment_id``). ``params`` is the request with its defaults filled in."""

    __tablename__ = "experiment"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("exp"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"), index=True)
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("dataset.id", ondelete="SET NULL"))
    base_model: Mapped[str] = mapped_column(String(200))
    adapter_prefix: Mapped[str] = mapped_column(String(200))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobEvent(Base):
    __tablename__ = "job_event"
    __table_args__ = (UniqueConstraint("job_id", "seq"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    level: Mapped[str] = mapped_column(String(10), default="info")
    type: Mapped[str] = mapped_column(String(20))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Checkpoint(Base):
    __tablename__ = "checkpoint"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ckpt"))
    job_id: Mapped[str] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(300))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Adapter(Base):
    __tablename__ = "adapter"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ad"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    base_model: Mapped[str] = mapped_column(String(200))
    # Last version number handed out; bumped with an atomic UPDATE so concurrent publishes differ.
    version_counter: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AdapterVersion(Base):
    __tablename__ = "adapter_version"
    __table_args__ = (
        UniqueConstraint("adapter_id", "version"),
        _status_check("source", "source", VersionSource),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("av"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"), index=True)
    adapter_id: Mapped[str] = mapped_column(ForeignKey("adapter.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(20))
    job_id: Mapped[str | None] = mapped_column(
        ForeignKey("job.id", ondelete="SET NULL"), unique=True
    )
    checkpoint_step: Mapped[int | None] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(300))
    rank: Mapped[int | None] = mapped_column(Integer)
    alpha: Mapped[float | None] = mapped_column(Float)
    target_modules: Mapped[list[str]] = mapped_column(JSON, default=list)
    trainable_params: Mapped[int | None] = mapped_column(BigInteger)
    lineage: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AdapterAlias(Base):
    __tablename__ = "adapter_alias"
    __table_args__ = (UniqueConstraint("adapter_id", "alias"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("al"))
    adapter_id: Mapped[str] = mapped_column(ForeignKey("adapter.id", ondelete="CASCADE"))
    alias: Mapped[str] = mapped_column(String(100))
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AdapterAliasEvent(Base):
    """History of alias moves (who, when, from, to), so a rollback is one PUT."""

    __tablename__ = "adapter_alias_event"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    adapter_id: Mapped[str] = mapped_column(
        ForeignKey("adapter.id", ondelete="CASCADE"), index=True
    )
    alias: Mapped[str] = mapped_column(String(100))
    from_version: Mapped[int | None] = mapped_column(Integer)
    to_version: Mapped[int | None] = mapped_column(Integer)
    actor: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Image(Base):
    __tablename__ = "image"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("img"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    storage_key: Mapped[str] = mapped_column(String(300))
    seed: Mapped[int | None] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyKey(Base):
    """Maps (tenant, route, Idempotency-Key) to the resource a first request created."""

    __tablename__ = "idempotency_key"
    __table_args__ = (UniqueConstraint("tenant_id", "scope", "key"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"))
    scope: Mapped[str] = mapped_column(String(100))
    key: Mapped[str] = mapped_column(String(200))
    request_hash: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Worker(Base):
    """A live worker process, kept fresh by its heartbeat."""

    __tablename__ = "worker"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(200))
    queues: Mapped[list[str]] = mapped_column(JSON, default=list)
    base_model: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str | None] = mapped_column(String(100))
    current_job_id: Mapped[str | None] = mapped_column(String(40))
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
