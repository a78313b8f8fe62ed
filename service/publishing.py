"""Adapter files in the artifact store, and the one path that publishes a training job's weights
as an adapter version: the finished run (in the worker) and a promoted checkpoint (the jobs
domain) both go through ``store_job_weights`` then ``publish_job_version``.

Every stored version is in the canonical diffusers form (lora_A/lora_B, alpha in the header),
content-addressed under ``adapters/<sha256>.safetensors``; identical files are stored once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from lorafile import canonical_file_bytes
from service import registry
from service.base_models import local_folder
from service.config import Settings
from service.job_params import TrainParams
from service.models import AdapterVersion, VersionSource
from service.storage import ArtifactStore, StoredObject

ADAPTER_PREFIX: Final = "adapters"
# Conversions served by downloads (kohya, ...), cached per source file and lorastack version.
DERIVED_PREFIX: Final = "adapters/derived"


@dataclass(frozen=True)
class StoredFile:
    """A file put in the store by this call; ``created`` when it was not there before."""

    stored: StoredObject
    created: bool


def store_adapter_bytes(store: ArtifactStore, data: bytes) -> StoredFile:
    sha = hashlib.sha256(data).hexdigest()
    existed = store.exists(f"{ADAPTER_PREFIX}/{sha}.safetensors")
    stored = store.put_bytes(data, prefix=ADAPTER_PREFIX, suffix=".safetensors")
    return StoredFile(stored=stored, created=not existed)


def discard_unreferenced(session: Session, store: ArtifactStore, keys: Sequence[str]) -> None:
    """Delete stored adapter files (and their cached conversions) no version refers to.

    Called after a rollback (a failed import) or a commit (a deleted version). The reference
    check spans tenants: identical files are stored once.
    """
    if not keys:
        return
    referenced = set(
        session.scalars(
            select(AdapterVersion.storage_key).where(AdapterVersion.storage_key.in_(keys))
        )
    )
    for key in set(keys) - referenced:
        store.delete(key)
        sha = Path(key).stem
        derived_root = store.path(DERIVED_PREFIX)
        if derived_root.is_dir():
            for folder in derived_root.glob(f"*/*/{sha}"):
                store.delete(str(folder.relative_to(store.root)))


@contextmanager
def discard_on_failure(session: Session, store: ArtifactStore, file: StoredFile) -> Iterator[None]:
    """Remove a file this call added when what follows fails (the request stores nothing)."""
    try:
        yield
    except BaseException:
        if file.created:
            session.rollback()
            discard_unreferenced(session, store, [file.stored.key])
        raise


class TrainingJob(Protocol):
    """What publishing needs of a training job (a leased job in a worker, a row in the API)."""

    @property
    def id(self) -> str: ...
    @property
    def tenant_id(self) -> str: ...
    @property
    def adapter_name(self) -> str | None: ...
    @property
    def base_model(self) -> str | None: ...
    @property
    def dataset_id(self) -> str | None: ...
    @property
    def params(self) -> dict[str, Any]: ...


def store_job_weights(
    store: ArtifactStore, settings: Settings, *, base_model: str, weights: Path
) -> StoredFile:
    """A trained LoRA file, in the canonical form when its base model is a local folder."""
    source = settings.model_sources.get(base_model)
    folder = local_folder(source) if source else None
    data = (
        canonical_file_bytes(weights, base_model_dir=folder, base_model=base_model)
        if folder is not None
        else weights.read_bytes()
    )
    return store_adapter_bytes(store, data)


def publish_job_version(
    session: Session,
    settings: Settings,
    *,
    job: TrainingJob,
    stored: StoredObject,
    trainable_params: int,
    metrics: dict[str, Any],
    checkpoint_step: int | None = None,
    lineage: dict[str, Any] | None = None,
    actor: str | None = None,
) -> AdapterVersion:
    """Record the job's weights as the adapter's next version (``latest`` moves to it).

    The finished run is version ``source=job`` (one per job); a checkpoint is ``checkpoint``.
    Rank, alpha, targets and lineage come from the job's own parameters.
    """
    params = TrainParams.model_validate(job.params)
    base_model = job.base_model or ""
    source = VersionSource.JOB if checkpoint_step is None else VersionSource.CHECKPOINT
    return registry.publish_version(
        session,
        tenant_id=job.tenant_id,
        adapter_name=job.adapter_name or "",
        base_model=base_model,
        source=source.value,
        stored=stored,
        job_id=job.id,
        checkpoint_step=checkpoint_step,
        rank=params.rank,
        alpha=params.alpha,
        target_modules=params.unet_targets,
        trainable_params=trainable_params,
        lineage={
            "dataset_id": job.dataset_id,
            "dataset_sha256": params.dataset_sha256,
            "base_model": base_model,
            "base_model_source": settings.model_sources.get(base_model),
            "hyperparameters": params.hyperparameters,
            **(lineage or {}),
        },
        metrics=metrics,
        actor=actor,
    )
