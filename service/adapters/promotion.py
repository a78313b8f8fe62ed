"""Promoting a training checkpoint to an adapter version: the same publish path as a finished
run (``service.publishing``), idempotent per (job, step)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from lorafile import STORED_LIMITS, InvalidAdapterFile, read_safetensors_header
from service.adapters.refs import CHECKPOINT_WEIGHTS_NAME, adapter_of
from service.config import Settings
from service.errors import NotFound, Unprocessable
from service.jobs.service import get_job
from service.models import Adapter, AdapterVersion, Checkpoint, JobKind, VersionSource
from service.publishing import (
    StoredFile,
    discard_on_failure,
    publish_job_version,
    store_job_weights,
)
from service.storage import ArtifactStore


@dataclass(frozen=True)
class PromotedVersion:
    adapter: Adapter
    version: AdapterVersion
    created: bool
    file: StoredFile | None


def promote_checkpoint(
    session: Session,
    *,
    store: ArtifactStore,
    settings: Settings,
    tenant_id: str,
    job_id: str,
    step: int,
    actor: str | None,
) -> PromotedVersion:
    """Publish a training checkpoint's LoRA weights as the adapter's next version.

    Promoting the same checkpoint again returns the version it made the first time.
    """
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    if job.kind != JobKind.TRAIN.value or not job.adapter_name or not job.base_model:
        raise NotFound(f"job {job_id!r} is not a training job", code="checkpoint_not_found")
    checkpoint = session.scalar(
        select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step == step)
    )
    if checkpoint is None:
        raise NotFound(
            f"job {job_id!r} has no checkpoint at step {step}", code="checkpoint_not_found"
        )
    earlier = _promoted_before(session, tenant_id=tenant_id, job_id=job.id, step=step)
    if earlier is not None:
        return PromotedVersion(
            adapter=adapter_of(session, earlier), version=earlier, created=False, file=None
        )
    weights = store.path(checkpoint.storage_key) / CHECKPOINT_WEIGHTS_NAME
    if not weights.is_file():
        raise NotFound(
            f"the files of checkpoint {step} of job {job_id!r} were removed by retention",
            code="checkpoint_not_found",
        )
    try:
        header = read_safetensors_header(weights, limits=STORED_LIMITS)
    except InvalidAdapterFile as exc:
        raise Unprocessable(
            f"checkpoint {step} of job {job_id!r} is unreadable: {exc.message}",
            code=str(exc.code),
        ) from exc
    file = store_job_weights(store, settings, base_model=job.base_model, weights=weights)
    with discard_on_failure(session, store, file):
        version = publish_job_version(
            session,
            settings,
            job=job,
            stored=file.stored,
            checkpoint_step=step,
            # Every tensor of a LoRA-only file is a trained parameter.
            trainable_params=sum(_numel(info.shape) for info in header.tensors.values()),
            metrics=dict(checkpoint.metrics),
            lineage={"job_id": job.id, "checkpoint_step": step},
            actor=actor,
        )
    return PromotedVersion(
        adapter=adapter_of(session, version), version=version, created=True, file=file
    )


def _promoted_before(
    session: Session, *, tenant_id: str, job_id: str, step: int
) -> AdapterVersion | None:
    """The version an earlier promotion of this checkpoint made, if any."""
    for candidate in session.scalars(
        select(AdapterVersion).where(
            AdapterVersion.tenant_id == tenant_id,
            AdapterVersion.source == VersionSource.CHECKPOINT.value,
            AdapterVersion.checkpoint_step == step,
        )
    ):
        if candidate.lineage.get("job_id") == job_id:
            return candidate
    return None


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
