"""What the adapter routes answer: an adapter with its versions and aliases, pages of them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service import registry
from service.adapters.schemas import (
    AdapterOut,
    AdapterSummaryOut,
    AdapterVersionOut,
    AliasEventOut,
    LintReportOut,
)
from service.models import Adapter, AdapterAlias, AdapterVersion


def _aliases_by_version(session: Session, adapter_id: str) -> dict[int, list[str]]:
    by_version: dict[int, list[str]] = {}
    for row in registry.aliases_of(session, adapter_id):
        by_version.setdefault(row.version, []).append(row.alias)
    return by_version


def version_view(session: Session, adapter: Adapter, version: AdapterVersion) -> AdapterVersionOut:
    aliases = _aliases_by_version(session, adapter.id).get(version.version, [])
    return AdapterVersionOut.from_row(adapter, version, aliases=aliases)


def _summary_fields(
    adapter: Adapter, *, aliases: Sequence[AdapterAlias], version_count: int
) -> dict[str, Any]:
    alias_map = {row.alias: row.version for row in aliases}
    return {
        "id": adapter.id,
        "name": adapter.name,
        "base_model": adapter.base_model,
        "latest_version": alias_map.get(registry.LATEST),
        "version_count": version_count,
        "aliases": alias_map,
        "created_at": adapter.created_at,
    }


def adapter_view(session: Session, adapter: Adapter) -> AdapterOut:
    """One adapter with its versions (oldest first), aliases and recent alias history."""
    versions = session.scalars(
        select(AdapterVersion)
        .where(AdapterVersion.adapter_id == adapter.id)
        .order_by(AdapterVersion.version)
    ).all()
    aliases = registry.aliases_of(session, adapter.id)
    by_version: dict[int, list[str]] = {}
    for row in aliases:
        by_version.setdefault(row.version, []).append(row.alias)
    return AdapterOut(
        **_summary_fields(adapter, aliases=aliases, version_count=len(versions)),
        versions=[
            AdapterVersionOut.from_row(adapter, v, aliases=by_version.get(v.version, []))
            for v in versions
        ],
        alias_history=[
            AliasEventOut.from_row(e) for e in registry.alias_history(session, adapter.id)
        ],
    )


def list_adapters(
    session: Session,
    *,
    tenant_id: str,
    limit: int,
    after: str | None,
    base_model: str | None = None,
    prefix: str | None = None,
) -> tuple[list[AdapterSummaryOut], bool]:
    """The tenant's adapters, newest first, paged by id."""
    query = select(Adapter).where(Adapter.tenant_id == tenant_id)
    if base_model:
        query = query.where(Adapter.base_model == base_model)
    if prefix:
        query = query.where(Adapter.name.startswith(prefix, autoescape=True))
    if after:
        query = query.where(Adapter.id < after)
    rows = session.scalars(query.order_by(Adapter.id.desc()).limit(limit + 1)).all()
    page = rows[:limit]
    ids = [a.id for a in page]
    counts: dict[str, int] = {
        adapter_id: count
        for adapter_id, count in session.execute(
            select(AdapterVersion.adapter_id, func.count())
            .where(AdapterVersion.adapter_id.in_(ids))
            .group_by(AdapterVersion.adapter_id)
        )
    }
    aliases: dict[str, list[AdapterAlias]] = {}
    for alias in session.scalars(select(AdapterAlias).where(AdapterAlias.adapter_id.in_(ids))):
        aliases.setdefault(alias.adapter_id, []).append(alias)
    summaries = [
        AdapterSummaryOut(
            **_summary_fields(
                a,
                aliases=sorted(aliases.get(a.id, []), key=lambda r: r.alias),
                version_count=counts.get(a.id, 0),
            )
        )
        for a in page
    ]
    return summaries, len(rows) > limit


def stored_report(version: AdapterVersion) -> LintReportOut:
    """The lint report an imported version was stored with (empty for other sources)."""
    return LintReportOut(**version.lineage.get("lint", {}))
