"""Adapter resources as the API shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.models import Adapter, AdapterAlias, AdapterAliasEvent, AdapterVersion

DownloadFormat = Literal["diffusers", "kohya"]


class LintReportOut(BaseModel):
    """What the import lint found in a file, checked against the base model."""

    format: str | None = Field(None, description="diffusers | peft | kohya | kohya_ldm")
    alpha_source: str | None = Field(
        None, description="where alpha came from: tensors | header_metadata | default_rank | mixed"
    )
    rank: int | None = None
    alpha: float | None = None
    ranks: dict[str, int] = Field(default_factory=dict, description="rank of each module")
    alphas: dict[str, float] = Field(default_factory=dict, description="alpha of each module")
    target_modules: list[str] = Field(default_factory=list)
    param_count: int = 0
    matched_keys: list[str] = Field(default_factory=list)
    unmatched_keys: list[str] = Field(default_factory=list)
    ignored_keys: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)


class AdapterVersionOut(BaseModel):
    adapter: str = Field(description="the adapter's name")
    version: int
    ref: str = Field(description="'name@version', usable wherever a ref is taken")
    base_model: str
    source: str = Field(description="job | import | checkpoint")
    job_id: str | None = None
    checkpoint_step: int | None = None
    sha256: str = Field(description="sha256 of the stored (canonical diffusers) file")
    size_bytes: int
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str]
    trainable_params: int | None = None
    lineage: dict[str, Any]
    metrics: dict[str, Any]
    aliases: list[str] = Field(description="aliases pointing at this version")
    created_at: datetime

    @classmethod
    def from_row(
        cls, adapter: Adapter, version: AdapterVersion, *, aliases: list[str]
    ) -> AdapterVersionOut:
        return cls(
            adapter=adapter.name,
            version=version.version,
            ref=f"{adapter.name}@{version.version}",
            base_model=adapter.base_model,
            source=version.source,
            job_id=version.job_id,
            checkpoint_step=version.checkpoint_step,
            sha256=version.sha256,
            size_bytes=version.size_bytes,
            rank=version.rank,
            alpha=version.alpha,
            target_modules=version.target_modules,
            trainable_params=version.trainable_params,
            lineage=version.lineage,
            metrics=version.metrics,
            aliases=aliases,
            created_at=version.created_at,
        )


class ImportedVersionOut(AdapterVersionOut):
    report: LintReportOut


class AliasOut(BaseModel):
    adapter: str
    alias: str
    version: int
    updated_at: datetime

    @classmethod
    def from_row(cls, adapter: Adapter, row: AdapterAlias) -> AliasOut:
        return cls(
            adapter=adapter.name, alias=row.alias, version=row.version, updated_at=row.updated_at
        )


class AliasEventOut(BaseModel):
    alias: str
    from_version: int | None = Field(None, description="null when the alias was created")
    to_version: int | None = Field(None, description="null when the alias was removed")
    actor: str | None = Field(None, description="id of the API key that moved it")
    created_at: datetime

    @classmethod
    def from_row(cls, row: AdapterAliasEvent) -> AliasEventOut:
        return cls(
            alias=row.alias,
            from_version=row.from_version,
            to_version=row.to_version,
            actor=row.actor,
            created_at=row.created_at,
        )


class AdapterSummaryOut(BaseModel):
    id: str
    name: str
    base_model: str
    latest_version: int | None = None
    version_count: int
    aliases: dict[str, int] = Field(description="alias -> version")
    created_at: datetime


class AdapterOut(AdapterSummaryOut):
    versions: list[AdapterVersionOut] = Field(description="oldest first")
    alias_history: list[AliasEventOut] = Field(description="the last 100 alias moves, newest first")


class AdapterList(BaseModel):
    data: list[AdapterSummaryOut]
    has_more: bool


class AliasPut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, description="the version number the alias points at")


class PromotedVersionOut(AdapterVersionOut):
    created: bool = Field(description="false when this checkpoint was promoted before")
