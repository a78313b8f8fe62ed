"""Adapter versions in SQL: publishing (atomic version numbers, idempotent per job), aliases
with their history, and removing versions."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db import utcnow
from service.errors import field_error
from service.models import Adapter, AdapterAlias, AdapterAliasEvent, AdapterVersion
from service.storage import StoredObject

LATEST: Final = "latest"
# Adapter names: lowercase, 1-100 of a-z 0-9 . _ -, starting with a letter or digit.
ADAPTER_NAME_PATTERN: Final = r"^[a-z0-9][a-z0-9._-]{0,99}$"
# Lowercase, not purely numeric (a number in a ref means a version), never ``latest``.
ALIAS_PATTERN: Final = re.compile(r"^[a-z0-9._-]{1,100}$")


def check_alias_name(alias: str, *, field: str = "alias") -> None:
    """Raise 422 unless ``alias`` is a name a client may set (``latest`` is the system's)."""
    if not ALIAS_PATTERN.fullmatch(alias) or alias.isdigit():
        raise field_error(
            field,
            f"invalid alias {alias!r}: use 1-100 of a-z 0-9 . _ - and not only digits",
            code="invalid_alias",
        )
    if alias == LATEST:
        raise field_error(
            field,
            "'latest' always points at the newest version and cannot be set or removed; "
            "use another alias (e.g. 'prod') to pin a version",
            code="reserved_alias",
        )


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
    check_base_model(adapter, base_model)
    return adapter


def check_base_model(adapter: Adapter, base_model: str, *, field: str = "base_model") -> None:
    """422 naming ``field`` unless ``adapter`` belongs to ``base_model`` (its versions share it)."""
    if adapter.base_model != base_model:
        raise field_error(
            field,
            f"adapter {adapter.name!r} belongs to base model {adapter.base_model!r}, "
            f"not {base_model!r}",
            code="base_model_mismatch",
        )


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
    current = alias_target(session, adapter_id=adapter.id, alias=LATEST)
    # Version numbers only grow, so the new one is the newest; the guard keeps `latest` on
    # the maximum even if two publishes ever reach this point out of order.
    if current is None or current < version.version:
        move_alias(session, adapter=adapter, alias=LATEST, version=version.version, actor=actor)
    return version


def alias_target(session: Session, *, adapter_id: str, alias: str) -> int | None:
    """The version ``alias`` points at, or None."""
    return session.scalar(
        select(AdapterAlias.version).where(
            AdapterAlias.adapter_id == adapter_id, AdapterAlias.alias == alias
        )
    )


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


def aliases_of(session: Session, adapter_id: str) -> Sequence[AdapterAlias]:
    """Every alias of an adapter, by name."""
    return session.scalars(
        select(AdapterAlias)
        .where(AdapterAlias.adapter_id == adapter_id)
        .order_by(AdapterAlias.alias)
    ).all()


def alias_history(
    session: Session, adapter_id: str, *, limit: int = 100
) -> Sequence[AdapterAliasEvent]:
    """The most recent alias moves of an adapter, newest first."""
    return session.scalars(
        select(AdapterAliasEvent)
        .where(AdapterAliasEvent.adapter_id == adapter_id)
        .order_by(AdapterAliasEvent.id.desc())
        .limit(limit)
    ).all()


def remove_version(
    session: Session, *, adapter: Adapter, version: AdapterVersion, actor: str | None
) -> list[str]:
    """Delete ``version``, dropping every alias on it (recorded) and moving ``latest`` back to
    the newest remaining version. Returns the aliases (other than latest) that were removed.

    The caller decides whether removing aliases is allowed (the route's ``force``).
    """
    removed: list[str] = []
    for row in aliases_of(session, adapter.id):
        if row.version == version.version and row.alias != LATEST:
            move_alias(session, adapter=adapter, alias=row.alias, version=None, actor=actor)
            removed.append(row.alias)
    session.delete(version)
    session.flush()
    newest = session.scalar(
        select(func.max(AdapterVersion.version)).where(AdapterVersion.adapter_id == adapter.id)
    )
    move_alias(session, adapter=adapter, alias=LATEST, version=newest, actor=actor)
    return removed


def remove_adapter(session: Session, *, adapter: Adapter) -> list[str]:
    """Delete an adapter with its versions, aliases and history; returns the versions' keys."""
    keys = list(
        session.scalars(
            select(AdapterVersion.storage_key).where(AdapterVersion.adapter_id == adapter.id)
        )
    )
    # Explicit deletes rather than relying on ON DELETE CASCADE, which SQLite only honours
    # with its foreign_keys pragma on.
    session.execute(delete(AdapterAliasEvent).where(AdapterAliasEvent.adapter_id == adapter.id))
    session.execute(delete(AdapterAlias).where(AdapterAlias.adapter_id == adapter.id))
    session.execute(delete(AdapterVersion).where(AdapterVersion.adapter_id == adapter.id))
    session.delete(adapter)
    session.flush()
    return keys
