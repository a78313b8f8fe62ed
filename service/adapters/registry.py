"""Adapter versions in SQL: publishing (atomic version numbers, idempotent per job) and aliases."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db import utcnow
from service.models import Adapter, AdapterAlias, AdapterAliasEvent, AdapterVersion
from service.problems import field_error
from service.storage import StoredObject

LATEST = "latest"


def get_or_create_adapter(
    session: Session, *, tenant_id: str, name: str, base_model: str
) -> Adapter:
    """The tenant's adapter ``name``; created on first use (safe against a concurrent create)."""
    query = select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
    adapter = session.scalar(query)
    if adapter is None:
        try:
            with session.begin_nested():
                adapter = Adapter(tenant_id=tenant_id, name=name, base_model=base_model)
                session.add(adapter)
        except IntegrityError:
            adapter = session.scalar(query)
            assert adapter is not None
    if adapter.base_model != base_model:
        raise field_error(
            "base_model",
            f"adapter {name!r} belongs to base model {adapter.base_model!r}, not {base_model!r}",
            code="base_model_mismatch",
        )
    return adapter


def _next_version(session: Session, adapter_id: str) -> int:
    """Hand out the next version number with one atomic UPDATE (row lock on PostgreSQL)."""
    version = session.execute(
        update(Adapter)
        .where(Adapter.id == adapter_id)
        .values(version_counter=Adapter.version_counter + 1)
        .returning(Adapter.version_counter)
    ).scalar_one()
    return int(version)


def publish_version(
    session: Session,
    *,
    tenant_id: str,
    adapter_name: str,
    base_model: str,
    source: str,
    stored: StoredObject,
    job_id: str | None = None,
    checkpoint_step: int | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    target_modules: list[str] | None = None,
    trainable_params: int | None = None,
    lineage: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    actor: str | None = None,
) -> AdapterVersion:
    """Record a new version and move ``latest`` to it. One version per job: a second call with
    the same job (and no checkpoint step) returns the first version."""
    if job_id is not None and checkpoint_step is None:
        existing = session.scalar(select(AdapterVersion).where(AdapterVersion.job_id == job_id))
        if existing is not None:
            return existing
    adapter = get_or_create_adapter(
        session, tenant_id=tenant_id, name=adapter_name, base_model=base_model
    )
    version = AdapterVersion(
        tenant_id=tenant_id,
        adapter_id=adapter.id,
        version=_next_version(session, adapter.id),
        source=source,
        job_id=job_id if checkpoint_step is None else None,
        checkpoint_step=checkpoint_step,
        sha256=stored.sha256,
        size_bytes=stored.size,
        storage_key=stored.key,
        rank=rank,
        alpha=alpha,
        target_modules=target_modules or [],
        trainable_params=trainable_params,
        lineage=lineage or {},
        metrics=metrics or {},
    )
    session.add(version)
    session.flush()
    move_alias(session, adapter=adapter, alias=LATEST, version=version.version, actor=actor)
    return version


def move_alias(
    session: Session, *, adapter: Adapter, alias: str, version: int | None, actor: str | None
) -> None:
    """Point ``alias`` at ``version`` (None removes it), keeping the move in the history."""
    row = session.scalar(
        select(AdapterAlias)
        .where(AdapterAlias.adapter_id == adapter.id, AdapterAlias.alias == alias)
        .with_for_update()
    )
    previous = row.version if row is not None else None
    if previous == version:
        return
    if version is None:
        if row is not None:
            session.delete(row)
    elif row is None:
        session.add(AdapterAlias(adapter_id=adapter.id, alias=alias, version=version))
    else:
        row.version = version
        row.updated_at = utcnow()
    session.add(
        AdapterAliasEvent(
            adapter_id=adapter.id,
            alias=alias,
            from_version=previous,
            to_version=version,
            actor=actor,
        )
    )
    session.flush()
