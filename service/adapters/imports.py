"""Importing a LoRA file: read the upload (capped), lint it against the base model, store its
canonical form and publish it as the adapter's next version (source ``import``).

Lint failures are raised as ``lorafile.AdapterLintError``; the route turns them into HTTP.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from lorafile import (
    ADAPTER_LIMITS,
    AdapterErrorCode,
    AdapterLintError,
    BaseModelLayoutError,
    LintReport,
    canonicalize,
    safetensors_bytes,
)
from service import registry
from service.adapters.refs import check_adapter_name, get_adapter
from service.adapters.schemas import LintReportOut
from service.base_models import local_folder, resolve_base_model
from service.config import Settings
from service.errors import ServiceUnavailable, field_error
from service.models import Adapter, AdapterVersion, VersionSource
from service.publishing import StoredFile, discard_on_failure, store_adapter_bytes
from service.storage import ArtifactStore


@dataclass(frozen=True)
class ImportedVersion:
    adapter: Adapter
    version: AdapterVersion
    report: LintReport
    file: StoredFile


def read_upload(stream: BinaryIO, *, max_bytes: int) -> bytes:
    """Read an uploaded file, refusing it (``too_large``, with a report) once it passes
    ``max_bytes``."""
    chunks: list[bytes] = []
    received = 0
    while chunk := stream.read(1 << 20):
        received += len(chunk)
        if received > max_bytes:
            message = f"file is larger than {max_bytes} bytes"
            raise AdapterLintError(
                AdapterErrorCode.TOO_LARGE, message, LintReport(errors=[message])
            )
        chunks.append(chunk)
    return b"".join(chunks)


def import_upload_cap(settings: Settings) -> int:
    """The largest adapter file an import reads."""
    return min(settings.max_upload_bytes, ADAPTER_LIMITS.max_total_bytes)


def _base_model_folder(settings: Settings, base_model: str) -> tuple[str, str, Path]:
    name, source = resolve_base_model(settings, base_model)
    folder = local_folder(source)
    if folder is None:
        raise field_error(
            "base_model",
            f"base model {name!r} is not a local folder, so its layout cannot be read",
            code="base_model_not_local",
        )
    return name, source, folder


def import_adapter(
    session: Session,
    *,
    store: ArtifactStore,
    settings: Settings,
    tenant_id: str,
    name: str,
    base_model: str,
    data: bytes,
    filename: str | None,
    actor: str | None,
) -> ImportedVersion:
    """Lint an uploaded LoRA file against the base model, store its canonical diffusers form
    and publish it as the adapter's next version (source ``import``)."""
    check_adapter_name(name)
    model_name, source, folder = _base_model_folder(settings, base_model)
    existing = session.scalar(
        select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
    )
    if existing is not None:
        registry.check_base_model(existing, model_name)
    try:
        tensors, metadata, report = canonicalize(
            data, base_model_dir=folder, base_model=model_name, limits=ADAPTER_LIMITS
        )
    except BaseModelLayoutError as exc:
        raise ServiceUnavailable(
            f"base model {model_name!r} cannot be read: {exc}", code="base_model_unavailable"
        ) from exc
    report_dict = LintReportOut(**report.to_dict()).model_dump(mode="json")
    file = store_adapter_bytes(store, safetensors_bytes(tensors, metadata))
    with discard_on_failure(session, store, file):
        version = registry.publish_version(
            session,
            tenant_id=tenant_id,
            adapter_name=name,
            base_model=model_name,
            source=VersionSource.IMPORT.value,
            stored=file.stored,
            rank=report.rank,
            alpha=report.alpha,
            target_modules=report.target_modules,
            trainable_params=report.param_count,
            lineage={
                "base_model": model_name,
                "base_model_source": source,
                "upload": {
                    "filename": filename,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "size_bytes": len(data),
                    "format": report.format,
                },
                "lint": report_dict,
            },
            actor=actor,
        )
    adapter = get_adapter(session, tenant_id=tenant_id, name=name)
    return ImportedVersion(adapter=adapter, version=version, report=report, file=file)
