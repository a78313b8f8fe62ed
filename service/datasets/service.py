"""Dataset commands and queries, scoped by tenant: upload, read, thumbnails, delete."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.config import DatasetLimits
from service.datasets.images import make_thumbnail
from service.datasets.ingest import IngestResult, ingest_zip
from service.datasets.limits import DatasetRejected, check_upload_size
from service.db import new_id
from service.deps import UnitOfWork
from service.errors import Conflict, NotFound, ServiceError
from service.idempotency import IdempotentRequest
from service.models import ACTIVE_JOB_STATUSES, Dataset, DatasetStatus, Job
from service.storage import ArtifactStore

CREATE_SCOPE = "POST /datasets"
DATASETS_PREFIX = "datasets"
IN_USE_CODE = "dataset_in_use"
_SPOOL_CHUNK = 1024 * 1024
# Job ids named in a 409, enough to act on without listing every job.
_IN_USE_LIST_LIMIT = 10


class DatasetUploadRejected(ServiceError):
    """An upload ingest refused: status and code from DatasetRejected, its report attached."""

    @classmethod
    def from_rejection(cls, rejection: DatasetRejected) -> DatasetUploadRejected:
        extra = {"report": rejection.report} if rejection.report is not None else {}
        return cls(rejection.detail, status=rejection.status, code=rejection.code, extra=extra)


@dataclass(frozen=True)
class SpooledUpload:
    """The uploaded zip, copied to the store's filesystem."""

    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class NewDataset:
    """The form fields of an upload."""

    name: str
    caption: str | None = None
    trigger_word: str | None = None

    def idempotency_payload(self, upload: SpooledUpload) -> dict[str, str | None]:
        """What makes two uploads "the same request" for Idempotency-Key."""
        return {
            "name": self.name,
            "caption": self.caption,
            "trigger_word": self.trigger_word,
            "file_sha256": upload.sha256,
        }


@dataclass(frozen=True)
class DatasetCreation:
    """The dataset a POST answers with; ``replayed`` when an Idempotency-Key repeat found it."""

    dataset: Dataset
    replayed: bool


@contextmanager
def spooled_upload(
    source: BinaryIO, *, store: ArtifactStore, limits: DatasetLimits
) -> Iterator[SpooledUpload]:
    """Copy ``source`` into a scratch folder of the store, counting and hashing; removed on exit.

    Over ``max_upload_bytes`` it stops reading and raises 413 ``upload_too_large``.
    """
    folder = store.tempdir(prefix="upload")
    try:
        path = folder / "upload.zip"
        digest = hashlib.sha256()
        size = 0
        with path.open("wb") as out:
            while chunk := source.read(_SPOOL_CHUNK):
                size += len(chunk)
                try:
                    check_upload_size(size, limits)
                except DatasetRejected as exc:
                    raise DatasetUploadRejected.from_rejection(exc) from exc
                digest.update(chunk)
                out.write(chunk)
        yield SpooledUpload(path=path, size=size, sha256=digest.hexdigest())
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sweep_ingest_leftovers(store: ArtifactStore, *, started_at: float) -> list[str]:
    """Remove ingest folders an earlier version staged beside the datasets (``.<id>.*.ingest``)
    and a crash left behind; ingest now stages in the store's scratch folder."""
    root = store.path(DATASETS_PREFIX)
    if not root.is_dir():
        return []
    removed = []
    for entry in root.glob(".*.ingest"):
        if entry.is_dir() and entry.stat().st_mtime < started_at:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(f"{DATASETS_PREFIX}/{entry.name}")
    return removed


def create_dataset(
    uow: UnitOfWork,
    *,
    store: ArtifactStore,
    tenant_id: str,
    request: NewDataset,
    upload: SpooledUpload,
    limits: DatasetLimits,
    idempotency_key: str | None = None,
) -> DatasetCreation:
    """Ingest the upload into ``datasets/<id>`` and record its row; commits the unit of work.

    It commits itself (unlike other services) because the files it wrote must be removed when
    the commit fails: a failed upload leaves no row and no files. With an Idempotency-Key, a
    repeat of the same request answers the first dataset and stores nothing.
    """
    session = uow.session
    idempotent = IdempotentRequest.of(
        tenant_id=tenant_id,
        scope=CREATE_SCOPE,
        key=idempotency_key,
        payload=request.idempotency_payload(upload),
    )
    if idempotent is not None and (first_id := idempotent.find(session)) is not None:
        return DatasetCreation(_replayed(session, tenant_id=tenant_id, dataset_id=first_id), True)
    # Ingest can take minutes: end the read transaction so no connection idles inside one.
    session.rollback()

    dataset_id = new_id("ds")
    storage_key = f"{DATASETS_PREFIX}/{dataset_id}"
    try:
        result = ingest_zip(
            zip_path=upload.path,
            dest_dir=store.path(storage_key),
            limits=limits,
            caption=request.caption,
            trigger_word=request.trigger_word,
            # In the store's scratch folder: a crash mid-ingest leaves nothing in datasets/.
            work_dir=store.tempdir(prefix="ingest"),
        )
    except DatasetRejected as exc:
        raise DatasetUploadRejected.from_rejection(exc) from exc
    try:
        dataset = _dataset_row(
            result, dataset_id=dataset_id, tenant_id=tenant_id, name=request.name
        )
        session.add(dataset)
        session.flush()
        if idempotent is not None:
            owner_id = idempotent.remember(session, resource_id=dataset_id)
            if owner_id != dataset_id:
                # A concurrent first request with this key won; ours was rolled back.
                store.delete(storage_key)
                winner = _replayed(session, tenant_id=tenant_id, dataset_id=owner_id)
                return DatasetCreation(winner, True)
        uow.commit()
    except BaseException:
        store.delete(storage_key)
        raise
    return DatasetCreation(dataset, False)


def _dataset_row(result: IngestResult, *, dataset_id: str, tenant_id: str, name: str) -> Dataset:
    report = result.report
    return Dataset(
        id=dataset_id,
        tenant_id=tenant_id,
        name=name,
        status=DatasetStatus.READY.value,
        sha256=result.sha256,
        image_count=report["counts"]["images"],
        caption_count=report["captions"]["count"],
        pair_count=result.item_count,
        total_bytes=result.total_bytes,
        layout=report["layout"],
        report=report,
        storage_key=f"{DATASETS_PREFIX}/{dataset_id}",
    )


def _replayed(session: Session, *, tenant_id: str, dataset_id: str) -> Dataset:
    try:
        return get_dataset(session, tenant_id=tenant_id, dataset_id=dataset_id)
    except NotFound:
        raise NotFound(
            f"the dataset this Idempotency-Key created ({dataset_id!r}) was deleted"
        ) from None


def get_dataset(
    session: Session, *, tenant_id: str, dataset_id: str, for_update: bool = False
) -> Dataset:
    """The caller's dataset; 404 for another tenant's, a deleted one, or no such id."""
    query = select(Dataset).where(
        Dataset.id == dataset_id,
        Dataset.tenant_id == tenant_id,
        Dataset.status != DatasetStatus.DELETED.value,
    )
    if for_update:
        query = query.with_for_update()
    dataset = session.scalar(query)
    if dataset is None:
        raise NotFound(f"dataset {dataset_id!r} not found")
    return dataset


def list_datasets(
    session: Session, *, tenant_id: str, limit: int, after: str | None
) -> tuple[Sequence[Dataset], bool]:
    """The caller's datasets, newest first (ids are time-ordered), deleted ones hidden."""
    query = select(Dataset).where(
        Dataset.tenant_id == tenant_id, Dataset.status != DatasetStatus.DELETED.value
    )
    if after:
        query = query.where(Dataset.id < after)
    rows = session.scalars(query.order_by(Dataset.id.desc()).limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit


def delete_dataset(session: Session, *, tenant_id: str, dataset_id: str) -> Dataset:
    """Mark the dataset deleted (flushed); 409 ``dataset_in_use`` while an active job uses it.

    The caller removes its files once this is committed; the row stays so a job that names
    the dataset later fails with a clear reason instead of a dangling id.
    """
    # The row lock (PostgreSQL) serialises this with a job being created for the dataset.
    dataset = get_dataset(session, tenant_id=tenant_id, dataset_id=dataset_id, for_update=True)
    active_job_ids = session.scalars(
        select(Job.id)
        .where(
            Job.dataset_id == dataset.id,
            Job.status.in_([status.value for status in ACTIVE_JOB_STATUSES]),
        )
        .order_by(Job.id)
        .limit(_IN_USE_LIST_LIMIT)
    ).all()
    if active_job_ids:
        raise Conflict(
            f"dataset {dataset_id!r} is used by an active job; cancel it or wait for it to "
            "finish, then delete",
            code=IN_USE_CODE,
            extra={"job_ids": list(active_job_ids)},
        )
    dataset.status = DatasetStatus.DELETED.value
    session.flush()
    return dataset


def dataset_thumbnail(
    store: ArtifactStore, dataset: Dataset, *, index: int, max_side: int
) -> bytes:
    """A JPEG thumbnail of item ``index`` of the dataset's manifest; 404 past the end."""
    manifest: dict[str, Any] = json.loads(
        store.path(f"{dataset.storage_key}/manifest.json").read_bytes()
    )
    items = manifest["items"]
    if index >= len(items):
        raise NotFound(
            f"dataset {dataset.id!r} has {len(items)} image(s); index {index} is past the end"
        )
    return make_thumbnail(
        store.path(f"{dataset.storage_key}/{items[index]['file']}"), max_side=max_side
    )
