"""Adapter registry logic behind the routes: refs, imports, promotions, downloads, deletes.

Everything here flushes and never commits; the route commits. Files go into the artifact
store content-addressed before the commit, so a failed request removes the files it added
(see ``discard_unreferenced``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service import __version__ as LORASTACK_VERSION
from service import registry
from service.adapters.formats import (
    ADAPTER_LIMITS,
    AdapterErrorCode,
    InvalidAdapterFile,
    SafetensorsLimits,
    read_safetensors,
    read_safetensors_header,
    to_kohya,
    write_safetensors,
)
from service.adapters.lint import AdapterLintError, BaseModelLayoutError, LintReport, canonicalize
from service.adapters.schemas import (
    AdapterOut,
    AdapterSummaryOut,
    AdapterVersionOut,
    AliasEventOut,
    DownloadFormat,
    LintReportOut,
)
from service.base_models import local_folder, resolve_base_model
from service.config import Settings
from service.errors import (
    Conflict,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    ServiceUnavailable,
    Unprocessable,
    UnsupportedMediaType,
    field_error,
)
from service.jobs.service import get_job
from service.jobs.training_schemas import ADAPTER_NAME_PATTERN, Hyperparameters
from service.models import (
    ACTIVE_JOB_STATUSES,
    Adapter,
    AdapterAlias,
    AdapterVersion,
    Checkpoint,
    Job,
    JobKind,
    VersionSource,
)
from service.storage import ArtifactStore, StoredObject

ADAPTER_PREFIX: Final = "adapters"
DERIVED_PREFIX: Final = "adapters/derived"
# The file a training checkpoint folder holds its LoRA weights in (diffusers' default name,
# written by the worker's trainer; the service does not import the worker package).
CHECKPOINT_WEIGHTS_NAME: Final = "pytorch_lora_weights.safetensors"
# Files already in the store were checked on the way in (or written by our trainer): roomy caps.
_STORED_LIMITS: Final = SafetensorsLimits(
    max_header_bytes=64 << 20, max_tensors=1 << 20, max_total_bytes=1 << 40
)
_NAME_RE: Final = re.compile(ADAPTER_NAME_PATTERN)
_MAX_VERSION: Final = 2**31 - 1
_SELECTOR: Final = r"[a-z0-9._-]{1,100}"
_SELECTOR_RE: Final = re.compile(_SELECTOR)
_REF_RE: Final = re.compile(
    rf"(?P<name>{ADAPTER_NAME_PATTERN[1:-1]})(?:@(?P<selector>{_SELECTOR}))?"
)


# --- lookups and refs ------------------------------------------------------------------------


def check_adapter_name(name: str, *, field: str = "name") -> None:
    """422 unless ``name`` is a valid adapter name (lowercase a-z 0-9 . _ -, 1-100 chars)."""
    if not _NAME_RE.fullmatch(name):
        raise field_error(
            field,
            f"invalid adapter name {name!r}: use 1-100 of a-z 0-9 . _ -, starting with a "
            "letter or digit",
            code="invalid_adapter_name",
        )


def get_adapter(session: Session, *, tenant_id: str, name: str) -> Adapter:
    """The tenant's adapter ``name``; 404 otherwise (another tenant's adapter included)."""
    adapter = session.scalar(
        select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
    )
    if adapter is None:
        raise NotFound(f"adapter {name!r} not found", code="adapter_not_found")
    return adapter


def resolve_version(
    session: Session, *, adapter: Adapter, selector: str, field: str = "version"
) -> AdapterVersion:
    """The version a number (``3``) or an alias (``prod``, ``latest``) names; 404 if none."""
    if not _SELECTOR_RE.fullmatch(selector):
        raise field_error(
            field,
            f"{selector!r} is neither a version number nor an alias",
            code="invalid_version",
        )
    number = (
        int(selector)
        if selector.isdigit()
        else registry.alias_target(session, adapter_id=adapter.id, alias=selector)
    )
    if number is not None and number > _MAX_VERSION:
        number = None  # no such version; and too big for an SQL integer
    version = (
        None
        if number is None
        else session.scalar(
            select(AdapterVersion).where(
                AdapterVersion.adapter_id == adapter.id, AdapterVersion.version == number
            )
        )
    )
    if version is None:
        raise NotFound(
            f"adapter {adapter.name!r} has no version {selector!r}", code="version_not_found"
        )
    return version


def parse_ref(ref: str) -> tuple[str, str]:
    """Split ``name``, ``name@3`` or ``name@prod`` into (name, selector); 422 if malformed."""
    match = _REF_RE.fullmatch(ref)
    if match is None:
        raise field_error(
            "ref",
            f"invalid adapter ref {ref!r}: use 'name', 'name@<version>' or 'name@<alias>'",
            code="invalid_adapter_ref",
        )
    return match["name"], match["selector"] or registry.LATEST


def resolve_ref(session: Session, *, tenant_id: str, ref: str) -> tuple[Adapter, AdapterVersion]:
    """The adapter and version a ref names (``name`` alone means ``name@latest``).

    Raises 422 for a malformed ref and 404 (naming the ref) when nothing matches.
    """
    name, selector = parse_ref(ref)
    adapter = session.scalar(
        select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
    )
    version = None
    if adapter is not None:
        try:
            version = resolve_version(session, adapter=adapter, selector=selector)
        except NotFound:
            version = None
    if adapter is None or version is None:
        raise NotFound(f"adapter ref {ref!r} matches no adapter version", code="adapter_not_found")
    return adapter, version


# --- views -----------------------------------------------------------------------------------


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


# --- storing files ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredFile:
    """A file put in the store by this request; ``created`` when it was not there before."""

    stored: StoredObject
    created: bool


def _store_bytes(store: ArtifactStore, data: bytes) -> StoredFile:
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
def _discard_on_failure(session: Session, store: ArtifactStore, file: StoredFile) -> Iterator[None]:
    """Remove a file this request added when what follows fails (the request stores nothing)."""
    try:
        yield
    except BaseException:
        if file.created:
            session.rollback()
            discard_unreferenced(session, store, [file.stored.key])
        raise


# --- import ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportedVersion:
    adapter: Adapter
    version: AdapterVersion
    report: LintReport
    file: StoredFile


def lint_problem(error: AdapterLintError) -> ServiceError:
    """The problem+json for a refused adapter file, with the lint report under ``report``."""
    extra = {"report": LintReportOut(**error.report.to_dict()).model_dump(mode="json")}
    status_class: type[ServiceError] = Unprocessable
    if error.code == AdapterErrorCode.TOO_LARGE:
        status_class = PayloadTooLarge
    elif error.code == AdapterErrorCode.NOT_SAFETENSORS:
        status_class = UnsupportedMediaType
    return status_class(f"file: {error.message}", code=str(error.code), extra=extra)


def read_upload(stream: BinaryIO, *, max_bytes: int) -> bytes:
    """Read an uploaded file, refusing it (413 with a report) once it passes ``max_bytes``."""
    chunks: list[bytes] = []
    received = 0
    while chunk := stream.read(1 << 20):
        received += len(chunk)
        if received > max_bytes:
            message = f"file is larger than {max_bytes} bytes"
            raise lint_problem(
                AdapterLintError(AdapterErrorCode.TOO_LARGE, message, LintReport(errors=[message]))
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
    except AdapterLintError as exc:
        raise lint_problem(exc) from None
    except BaseModelLayoutError as exc:
        raise ServiceUnavailable(
            f"base model {model_name!r} cannot be read: {exc}", code="base_model_unavailable"
        ) from exc
    report_dict = LintReportOut(**report.to_dict()).model_dump(mode="json")
    file = _store_bytes(store, safetensors_bytes(tensors, metadata))
    with _discard_on_failure(session, store, file):
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


def stored_report(version: AdapterVersion) -> LintReportOut:
    """The lint report an imported version was stored with (empty for other sources)."""
    return LintReportOut(**version.lineage.get("lint", {}))


def get_version_by_id(session: Session, *, tenant_id: str, version_id: str) -> AdapterVersion:
    version = session.scalar(
        select(AdapterVersion).where(
            AdapterVersion.id == version_id, AdapterVersion.tenant_id == tenant_id
        )
    )
    if version is None:
        raise NotFound(
            f"adapter version {version_id!r} (created by this Idempotency-Key) was deleted",
            code="version_not_found",
        )
    return version


def adapter_of(session: Session, version: AdapterVersion) -> Adapter:
    adapter = session.get(Adapter, version.adapter_id)
    assert adapter is not None
    return adapter


# --- promote a training checkpoint -----------------------------------------------------------


@dataclass(frozen=True)
class PromotedVersion:
    adapter: Adapter
    version: AdapterVersion
    created: bool
    file: StoredFile | None


def _hyperparameter_targets(hyperparameters: dict[str, Any]) -> list[str]:
    try:
        return list(Hyperparameters.model_validate(hyperparameters).unet_targets())
    except ValidationError:
        return []


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
    for candidate in session.scalars(
        select(AdapterVersion).where(
            AdapterVersion.tenant_id == tenant_id,
            AdapterVersion.source == VersionSource.CHECKPOINT.value,
            AdapterVersion.checkpoint_step == step,
        )
    ):
        if candidate.lineage.get("job_id") == job.id:
            return PromotedVersion(
                adapter=adapter_of(session, candidate), version=candidate, created=False, file=None
            )
    weights = store.path(checkpoint.storage_key) / CHECKPOINT_WEIGHTS_NAME
    if not weights.is_file():
        raise NotFound(
            f"the files of checkpoint {step} of job {job_id!r} were removed by retention",
            code="checkpoint_not_found",
        )
    try:
        header = read_safetensors_header(weights, limits=_STORED_LIMITS)
    except InvalidAdapterFile as exc:
        raise Unprocessable(
            f"checkpoint {step} of job {job_id!r} is unreadable: {exc.message}",
            code=str(exc.code),
        ) from exc
    source = settings.model_sources.get(job.base_model)
    folder = local_folder(source) if source else None
    data = (
        canonical_file_bytes(weights, base_model_dir=folder, base_model=job.base_model)
        if folder is not None
        else weights.read_bytes()
    )
    file = _store_bytes(store, data)
    hyperparameters: dict[str, Any] = dict(job.params.get("hyperparameters") or {})
    rank = hyperparameters.get("rank")
    alpha = hyperparameters.get("alpha") or rank
    with _discard_on_failure(session, store, file):
        version = registry.publish_version(
            session,
            tenant_id=tenant_id,
            adapter_name=job.adapter_name,
            base_model=job.base_model,
            source=VersionSource.CHECKPOINT.value,
            stored=file.stored,
            job_id=job.id,
            checkpoint_step=step,
            rank=int(rank) if rank is not None else None,
            alpha=float(alpha) if alpha is not None else None,
            target_modules=_hyperparameter_targets(hyperparameters),
            # Every tensor of a LoRA-only file is a trained parameter.
            trainable_params=sum(_numel(info.shape) for info in header.tensors.values()),
            lineage={
                "job_id": job.id,
                "checkpoint_step": step,
                "dataset_id": job.dataset_id,
                "dataset_sha256": job.params.get("dataset_sha256"),
                "base_model": job.base_model,
                "base_model_source": source,
                "hyperparameters": hyperparameters,
            },
            metrics=dict(checkpoint.metrics),
            actor=actor,
        )
    return PromotedVersion(
        adapter=adapter_of(session, version), version=version, created=True, file=file
    )


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


# --- aliases and deletes ---------------------------------------------------------------------


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


# --- downloads -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DownloadFile:
    """The bytes to serve for a download: where they are, their sha256 and size."""

    key: str
    sha256: str
    size: int
    filename: str


def _cached_conversion(
    store: ArtifactStore, *, kind: str, source_sha: str, build: Callable[[], bytes]
) -> StoredObject:
    """A file derived from a stored adapter, converted once and then read from the store.

    Kept under ``derived/<lorastack version>/<kind>/<source sha256>/<own sha256>``: found by
    its source, named by its content (the ETag), rebuilt when lorastack's version changes.
    """
    prefix = f"{DERIVED_PREFIX}/{LORASTACK_VERSION}/{kind}/{source_sha}"
    folder = store.path(prefix)
    if folder.is_dir():
        for path in sorted(folder.glob("*.safetensors")):
            return StoredObject(
                key=f"{prefix}/{path.name}", sha256=path.stem, size=path.stat().st_size
            )
    return store.put_bytes(build(), prefix=prefix, suffix=".safetensors")


def _json_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _lorastack_metadata(adapter: Adapter, version: AdapterVersion) -> dict[str, str]:
    metadata = {
        "lorastack_format": "diffusers",
        "lorastack_version": LORASTACK_VERSION,
        "lorastack_base_model": adapter.base_model,
        "lorastack_target_modules": json.dumps(sorted(version.target_modules)),
    }
    if version.rank is not None:
        metadata["lorastack_rank"] = str(version.rank)
    if version.alpha is not None:
        metadata["lorastack_alpha"] = str(_json_number(version.alpha))
    return metadata


def _rewrite_header(source: bytes | Path, extra: dict[str, str] | None = None) -> bytes:
    """The safetensors file ``source`` with a canonical header, ``extra`` added to its metadata.

    The tensor bytes are copied unchanged (dtypes included). Metadata keys are sorted and the
    tensors listed by offset: safetensors writes its metadata map in no fixed order, and a
    content-addressed store wants the same adapter to give the same bytes.
    """
    header = read_safetensors_header(source, limits=_STORED_LIMITS)
    metadata = dict(sorted({**header.metadata, **(extra or {})}.items()))
    entries: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    for name, info in sorted(header.tensors.items(), key=lambda item: (item[1].begin, item[0])):
        entries[name] = {
            "dtype": info.dtype,
            "shape": list(info.shape),
            "data_offsets": [info.begin, info.end],
        }
    encoded = json.dumps(entries, separators=(",", ":")).encode()
    # safetensors pads the header with spaces so the data starts 8-byte aligned.
    encoded += b" " * (-len(encoded) % 8)
    if isinstance(source, Path):
        with source.open("rb") as handle:
            handle.seek(header.data_start)
            data = handle.read()
    else:
        data = source[header.data_start :]
    return len(encoded).to_bytes(8, "little") + encoded + data


def safetensors_bytes(tensors: dict[str, Any], metadata: dict[str, str]) -> bytes:
    """``write_safetensors`` with a canonical header: the same adapter gives the same bytes."""
    return _rewrite_header(write_safetensors(tensors, metadata))


def canonical_file_bytes(path: Path, *, base_model_dir: Path, base_model: str) -> bytes:
    """A trained adapter file in the canonical diffusers form every stored version uses.

    Adapters the canonical form can't express (DoRA) are kept as the trainer wrote them.
    """
    try:
        tensors, metadata, _ = canonicalize(
            path, base_model_dir=base_model_dir, base_model=base_model, limits=_STORED_LIMITS
        )
    except AdapterLintError as exc:
        if exc.code != "unsupported_adapter":
            raise
        return path.read_bytes()
    return safetensors_bytes(tensors, metadata)


def download_file(
    store: ArtifactStore, *, adapter: Adapter, version: AdapterVersion, fmt: DownloadFormat
) -> DownloadFile:
    """The file to serve for a download in ``fmt``, converting (once) when needed."""
    filename = f"{adapter.name}-v{version.version}-{fmt}.safetensors"
    path = store.path(version.storage_key)
    if not path.is_file():
        raise ServiceUnavailable(
            f"the file of {adapter.name}@{version.version} is missing from the artifact store",
            code="artifact_missing",
        )
    if fmt == "diffusers":
        metadata = read_safetensors_header(path, limits=_STORED_LIMITS).metadata
        if "lorastack_version" in metadata:
            return DownloadFile(
                key=version.storage_key,
                sha256=version.sha256,
                size=version.size_bytes,
                filename=filename,
            )
        # Trained versions are stored as the trainer wrote them: add our header entries.
        stored = _cached_conversion(
            store,
            kind="diffusers",
            source_sha=version.sha256,
            build=lambda: _rewrite_header(path, _lorastack_metadata(adapter, version)),
        )
    else:

        def build_kohya() -> bytes:
            try:
                tensors, metadata = to_kohya(
                    read_safetensors(path, limits=_STORED_LIMITS), base_model=adapter.base_model
                )
            except InvalidAdapterFile as exc:
                raise field_error(
                    "format",
                    f"{adapter.name}@{version.version} cannot be converted to kohya: {exc.message}",
                    code=str(exc.code),
                ) from exc
            return safetensors_bytes(tensors, metadata)

        stored = _cached_conversion(
            store, kind="kohya", source_sha=version.sha256, build=build_kohya
        )
    return DownloadFile(key=stored.key, sha256=stored.sha256, size=stored.size, filename=filename)
