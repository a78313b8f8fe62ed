"""Finding adapters and versions: names, refs (``name``, ``name@3``, ``name@prod``) and the
checkpoint refs (``name@ckpt:400``, ``<job id>@ckpt:400``) that serve a training checkpoint
without promoting it."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import registry
from service.errors import NotFound, field_error
from service.models import Adapter, AdapterVersion, Checkpoint, Job, JobKind
from service.registry import ADAPTER_NAME_PATTERN
from service.storage import ArtifactStore

_NAME_RE: Final = re.compile(ADAPTER_NAME_PATTERN)
_MAX_VERSION: Final = 2**31 - 1
_SELECTOR: Final = r"[a-z0-9._-]{1,100}"
_SELECTOR_RE: Final = re.compile(_SELECTOR)
_REF_RE: Final = re.compile(
    rf"(?P<name>{ADAPTER_NAME_PATTERN[1:-1]})(?:@(?P<selector>{_SELECTOR}))?"
)
# ``<adapter name or training job id>@ckpt:<step>``: a job id matches the name pattern too.
_CHECKPOINT_REF_RE: Final = re.compile(
    rf"(?P<subject>{ADAPTER_NAME_PATTERN[1:-1]})@ckpt:(?P<step>[0-9]{{1,10}})"
)
# The file a training checkpoint folder holds its LoRA weights in (diffusers' default name,
# written by the worker's trainer; the service does not import the worker package).
CHECKPOINT_WEIGHTS_NAME: Final = "pytorch_lora_weights.safetensors"


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


@dataclass(frozen=True)
class CheckpointUse:
    """A training checkpoint named by a checkpoint ref, with its weights file in the store."""

    job: Job
    adapter: Adapter | None
    step: int
    weights_key: str
    sha256: str

    @property
    def use_id(self) -> str:
        """Stands for a version id where a checkpoint is used instead (batch keys, repeats)."""
        return f"{self.job.id}@ckpt:{self.step}"


def is_checkpoint_ref(ref: str) -> bool:
    """True for the ``...@ckpt:<step>`` form (well formed or not)."""
    return "@ckpt:" in ref


def resolve_checkpoint_ref(
    session: Session, *, store: ArtifactStore, tenant_id: str, ref: str
) -> CheckpointUse:
    """The checkpoint ``<job id>@ckpt:<step>`` or ``<adapter name>@ckpt:<step>`` names (the
    adapter's newest training job that kept a checkpoint at that step).

    Raises 422 for a malformed ref and 404 when no kept checkpoint matches.
    """
    match = _CHECKPOINT_REF_RE.fullmatch(ref)
    if match is None:
        raise field_error(
            "ref",
            f"invalid checkpoint ref {ref!r}: use '<adapter name>@ckpt:<step>' or "
            "'<training job id>@ckpt:<step>'",
            code="invalid_adapter_ref",
        )
    subject, step = match["subject"], int(match["step"])
    missing = NotFound(f"adapter ref {ref!r} matches no kept checkpoint", code="adapter_not_found")
    if step > _MAX_VERSION:
        raise missing
    trains = select(Job, Checkpoint).join(Checkpoint, Checkpoint.job_id == Job.id)
    trains = trains.where(
        Job.tenant_id == tenant_id, Job.kind == JobKind.TRAIN.value, Checkpoint.step == step
    )
    found = (
        session.execute(trains.where(Job.id == subject)).first()
        or session.execute(
            trains.where(Job.adapter_name == subject).order_by(Job.id.desc()).limit(1)
        ).first()
    )
    if found is None:
        raise missing
    job, checkpoint = found
    weights_key = f"{checkpoint.storage_key}/{CHECKPOINT_WEIGHTS_NAME}"
    try:
        data = store.path(weights_key).read_bytes()
    except FileNotFoundError:  # removed by retention after its row was read
        raise missing from None
    adapter = session.scalar(
        select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == job.adapter_name)
    )
    return CheckpointUse(
        job=job,
        adapter=adapter,
        step=step,
        weights_key=weights_key,
        sha256=hashlib.sha256(data).hexdigest(),
    )
