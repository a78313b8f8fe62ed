"""Aliases and deletes: moving names between versions (with history), removing versions and
whole adapters. Files left without a version are removed by the route after its commit."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import registry
from service.errors import Conflict, NotFound, field_error
from service.models import ACTIVE_JOB_STATUSES, Adapter, AdapterAlias, AdapterVersion, Job, JobKind


def set_alias(
    session: Session, *, adapter: Adapter, alias: str, version: int, actor: str | None
) -> AdapterAlias:
    """Point ``alias`` at an existing version (recorded in the history)."""
    registry.check_alias_name(alias)
    exists = session.scalar(
        select(AdapterVersion.id).where(
            AdapterVersion.adapter_id == adapter.id, AdapterVersion.version == version
        )
    )
    if exists is None:
        raise field_error(
            "version",
            f"adapter {adapter.name!r} has no version {version}",
            code="version_not_found",
        )
    registry.move_alias(session, adapter=adapter, alias=alias, version=version, actor=actor)
    row = session.scalar(
        select(AdapterAlias).where(
            AdapterAlias.adapter_id == adapter.id, AdapterAlias.alias == alias
        )
    )
    assert row is not None
    return row


def delete_alias(session: Session, *, adapter: Adapter, alias: str, actor: str | None) -> None:
    """Remove ``alias`` (recorded in the history); 404 when it does not exist."""
    registry.check_alias_name(alias)
    if registry.alias_target(session, adapter_id=adapter.id, alias=alias) is None:
        raise NotFound(f"adapter {adapter.name!r} has no alias {alias!r}", code="alias_not_found")
    registry.move_alias(session, adapter=adapter, alias=alias, version=None, actor=actor)


def delete_version(
    session: Session,
    *,
    adapter: Adapter,
    version: AdapterVersion,
    force: bool,
    actor: str | None,
) -> str:
    """Delete a version; 409 while an alias other than ``latest`` points at it, unless
    ``force`` (which removes those aliases too). Returns the version's storage key."""
    pinned = [
        row.alias
        for row in registry.aliases_of(session, adapter.id)
        if row.version == version.version and row.alias != registry.LATEST
    ]
    if pinned and not force:
        raise Conflict(
            f"version {version.version} of {adapter.name!r} is what alias(es) "
            f"{', '.join(pinned)} point at; move them first or pass ?force=true",
            code="version_aliased",
            extra={"aliases": pinned},
        )
    key = version.storage_key
    registry.remove_version(session, adapter=adapter, version=version, actor=actor)
    return key


def delete_adapter(session: Session, *, adapter: Adapter) -> list[str]:
    """Delete an adapter and everything under it; 409 while a job is training into it."""
    training = session.scalar(
        select(Job.id).where(
            Job.tenant_id == adapter.tenant_id,
            Job.kind == JobKind.TRAIN.value,
            Job.adapter_name == adapter.name,
            Job.status.in_([s.value for s in ACTIVE_JOB_STATUSES]),
        )
    )
    if training is not None:
        raise Conflict(
            f"job {training} is training into adapter {adapter.name!r}; cancel it first",
            code="adapter_in_training",
            extra={"job_id": training},
        )
    return registry.remove_adapter(session, adapter=adapter)
