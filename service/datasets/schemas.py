"""Dataset resources as the API shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from service.models import Dataset


class DatasetSummary(BaseModel):
    """A dataset as lists show it (no report)."""

    id: str
    name: str
    status: str
    layout: str | None = Field(None, description="pairs, captions_jsonl, imagefolder, ...")
    sha256: str = Field(description="sha256 of the dataset's canonical manifest.json")
    image_count: int = Field(description="files in the archive that decoded as images")
    caption_count: int = Field(description="captions on the stored items")
    pair_count: int = Field(description="stored items: images with at least one caption")
    total_bytes: int = Field(description="bytes stored (images, manifest, report)")
    created_at: datetime

    @classmethod
    def from_row(cls, dataset: Dataset) -> DatasetSummary:
        return cls(**_fields(dataset))


class DatasetOut(DatasetSummary):
    """A dataset with its preflight report (see docs/datasets.md)."""

    report: dict[str, Any]

    @classmethod
    def from_row(cls, dataset: Dataset) -> DatasetOut:
        return cls(**_fields(dataset), report=dataset.report)


class DatasetList(BaseModel):
    data: list[DatasetSummary]
    has_more: bool


def _fields(dataset: Dataset) -> dict[str, Any]:
    return {
        "id": dataset.id,
        "name": dataset.name,
        "status": dataset.status,
        "layout": dataset.layout,
        "sha256": dataset.sha256,
        "image_count": dataset.image_count,
        "caption_count": dataset.caption_count,
        "pair_count": dataset.pair_count,
        "total_bytes": dataset.total_bytes,
        "created_at": dataset.created_at,
    }
