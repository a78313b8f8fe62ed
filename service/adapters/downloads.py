"""Downloads: a stored version as diffusers (as stored, lorastack header entries added when
missing) or kohya (converted once, then served from the store)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from lorafile import (
    STORED_LIMITS,
    InvalidAdapterFile,
    read_safetensors,
    read_safetensors_header,
    rewrite_header,
    safetensors_bytes,
    to_kohya,
)
from service import __version__ as LORASTACK_VERSION
from service.adapters.schemas import DownloadFormat
from service.errors import ServiceUnavailable, field_error
from service.models import Adapter, AdapterVersion
from service.publishing import DERIVED_PREFIX
from service.storage import ArtifactStore, StoredObject


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
        metadata = read_safetensors_header(path, limits=STORED_LIMITS).metadata
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
            build=lambda: rewrite_header(path, _lorastack_metadata(adapter, version)),
        )
    else:

        def build_kohya() -> bytes:
            try:
                tensors, metadata = to_kohya(
                    read_safetensors(path, limits=STORED_LIMITS), base_model=adapter.base_model
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
