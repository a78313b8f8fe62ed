"""Safetensors files read with caps, and written with a canonical header.

Every header check (size, header length, tensor count, dtypes, offsets, layout) runs before
any tensor data is read, so a hostile file costs at most its header. numpy has no bfloat16:
BF16 tensors are widened to float32 (the values are unchanged).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final

import numpy as np
import numpy.typing as npt
from safetensors.numpy import save as save_numpy_safetensors

from lorafile.errors import AdapterErrorCode, InvalidAdapterFile

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class SafetensorsLimits:
    """Caps checked before any tensor data is read."""

    max_header_bytes: int = 1 << 20
    max_tensors: int = 4096
    max_total_bytes: int = 2 << 30

    def __post_init__(self) -> None:
        if min(self.max_header_bytes, self.max_tensors, self.max_total_bytes) <= 0:
            raise ValueError("safetensors limits must be positive")


# Uploads: a LoRA file is small, and these caps bound what a hostile one can cost.
ADAPTER_LIMITS: Final = SafetensorsLimits()
# Adapter files already in the store were checked on the way in (or written by our trainer).
STORED_LIMITS: Final = SafetensorsLimits(
    max_header_bytes=64 << 20, max_tensors=1 << 20, max_total_bytes=1 << 40
)
# Base model weights are trusted but big: their headers may be large, their data is never read.
BASE_MODEL_LIMITS: Final = SafetensorsLimits(
    max_header_bytes=64 << 20, max_tensors=1 << 20, max_total_bytes=1 << 50
)

# Bytes per element of every dtype the safetensors format defines (sub-byte F4/F6 types are
# left out: their sizes are not checked, and they are never accepted as adapter weights).
DTYPE_SIZES: Final[Mapping[str, int]] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES: Final = ("F16", "BF16", "F32", "F64")
_NUMPY_FLOATS: Final[Mapping[str, str]] = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}
_HEADER_ENTRY_KEYS: Final = frozenset({"dtype", "shape", "data_offsets"})


@dataclass(frozen=True)
class TensorInfo:
    """One header entry; ``begin``/``end`` are offsets into the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int


@dataclass
class SafetensorsFile:
    """Tensors (numpy, BF16 widened to float32) and the header's ``__metadata__``."""

    tensors: dict[str, Array]
    metadata: dict[str, str] = field(default_factory=dict)
    # Dtype of each tensor as stored in the file (tells BF16 apart from widened F32).
    stored_dtypes: dict[str, str] = field(default_factory=dict)


def _invalid(code: AdapterErrorCode, message: str) -> InvalidAdapterFile:
    return InvalidAdapterFile(code, message)


def _check_prefix(prefix: bytes, file_size: int, limits: SafetensorsLimits) -> int:
    """Check the size and the first 8 bytes; return the header length."""
    if file_size > limits.max_total_bytes:
        raise _invalid(
            AdapterErrorCode.TOO_LARGE,
            f"file is {file_size} bytes; the limit is {limits.max_total_bytes}",
        )
    if prefix.startswith(b"PK\x03\x04"):
        raise _invalid(
            AdapterErrorCode.NOT_SAFETENSORS,
            "this is a zip archive (a torch.save checkpoint?); only safetensors files are accepted",
        )
    if prefix[:1] == b"\x80" and prefix[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise _invalid(
            AdapterErrorCode.NOT_SAFETENSORS,
            "this is a pickle file; only safetensors files are accepted",
        )
    if file_size < 8 or len(prefix) < 8:
        raise _invalid(AdapterErrorCode.NOT_SAFETENSORS, "file is shorter than 8 bytes")
    header_len = int.from_bytes(prefix[:8], "little")
    if header_len < 2:
        raise _invalid(AdapterErrorCode.INVALID_HEADER, f"header length {header_len} is too short")
    if header_len > file_size - 8:
        raise _invalid(
            AdapterErrorCode.HEADER_EXCEEDS_FILE,
            f"header claims {header_len} bytes but the file has {file_size - 8} after the "
            "length prefix (truncated, or not a safetensors file)",
        )
    if header_len > limits.max_header_bytes:
        raise _invalid(
            AdapterErrorCode.HEADER_TOO_LARGE,
            f"header is {header_len} bytes; the limit is {limits.max_header_bytes}",
        )
    return header_len


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _invalid(AdapterErrorCode.INVALID_HEADER, f"duplicate header key {key!r}")
        result[key] = value
    return result


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(name: str, entry: Any) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != _HEADER_ENTRY_KEYS:
        raise _invalid(AdapterErrorCode.INVALID_HEADER, f"tensor {name!r}: malformed header entry")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise _invalid(AdapterErrorCode.INVALID_HEADER, f"tensor {name!r}: dtype is not a string")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _invalid(AdapterErrorCode.INVALID_TENSOR, f"tensor {name!r}: invalid shape {shape}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _invalid(
            AdapterErrorCode.INVALID_TENSOR, f"tensor {name!r}: invalid data_offsets {offsets}"
        )
    begin, end = offsets
    item_size = DTYPE_SIZES.get(dtype)
    if item_size is not None:
        expected = int(np.prod(shape, dtype=object)) * item_size
        if expected != end - begin:
            raise _invalid(
                AdapterErrorCode.INVALID_TENSOR,
                f"tensor {name!r}: shape {shape} of {dtype} needs {expected} bytes, "
                f"data_offsets give {end - begin}",
            )
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_layout(tensors: Mapping[str, TensorInfo], data_size: int) -> None:
    """Every range inside the data section, no overlaps, no holes (as safetensors requires)."""
    for name, info in tensors.items():
        if info.end > data_size:
            raise _invalid(
                AdapterErrorCode.TRUNCATED,
                f"tensor {name!r} ends at byte {info.end} of the data section, which has "
                f"only {data_size} bytes",
            )
    covered = 0
    previous = ""
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin < covered and info.end > info.begin:
            raise _invalid(
                AdapterErrorCode.OVERLAPPING_TENSORS,
                f"tensors {previous!r} and {name!r} share bytes",
            )
        if info.begin > covered:
            raise _invalid(
                AdapterErrorCode.INVALID_LAYOUT, f"unindexed bytes before tensor {name!r}"
            )
        if info.end > covered:
            covered, previous = info.end, name
    if covered != data_size:
        raise _invalid(
            AdapterErrorCode.INVALID_LAYOUT,
            f"{data_size - covered} trailing bytes after the last tensor",
        )


def _parse_header(
    raw: bytes, *, header_len: int, file_size: int, limits: SafetensorsLimits
) -> SafetensorsHeader:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid(AdapterErrorCode.INVALID_HEADER, "header is not UTF-8") from exc
    if not text.startswith("{"):
        raise _invalid(AdapterErrorCode.NOT_SAFETENSORS, "header is not a JSON object")
    try:
        parsed = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except (ValueError, RecursionError) as exc:
        raise _invalid(AdapterErrorCode.INVALID_HEADER, "header is not valid JSON") from exc
    if not isinstance(parsed, dict):
        raise _invalid(AdapterErrorCode.INVALID_HEADER, "header is not a JSON object")
    raw_metadata = parsed.pop("__metadata__", {})
    if not isinstance(raw_metadata, dict) or not all(
        isinstance(v, str) for v in raw_metadata.values()
    ):
        raise _invalid(AdapterErrorCode.INVALID_HEADER, "__metadata__ must map strings to strings")
    if len(parsed) > limits.max_tensors:
        raise _invalid(
            AdapterErrorCode.TOO_MANY_TENSORS,
            f"{len(parsed)} tensors; the limit is {limits.max_tensors}",
        )
    tensors = {name: _parse_entry(name, entry) for name, entry in parsed.items()}
    data_start = 8 + header_len
    _check_layout(tensors, file_size - data_start)
    return SafetensorsHeader(
        tensors=tensors, metadata=dict(raw_metadata), data_start=data_start, file_size=file_size
    )


def _read_header_from(
    handle: BinaryIO, file_size: int, limits: SafetensorsLimits
) -> SafetensorsHeader:
    header_len = _check_prefix(handle.read(8), file_size, limits)
    raw = handle.read(header_len)
    return _parse_header(raw, header_len=header_len, file_size=file_size, limits=limits)


def read_safetensors_header(
    source: bytes | Path, *, limits: SafetensorsLimits = ADAPTER_LIMITS
) -> SafetensorsHeader:
    """Read and validate only the header of a safetensors file or buffer."""
    if isinstance(source, bytes | bytearray | memoryview):
        view = memoryview(source)
        header_len = _check_prefix(bytes(view[:8]), len(view), limits)
        raw = bytes(view[8 : 8 + header_len])
        return _parse_header(raw, header_len=header_len, file_size=len(view), limits=limits)
    with Path(source).open("rb") as handle:
        return _read_header_from(handle, os.fstat(handle.fileno()).st_size, limits)


def _decode_tensor(data: memoryview, info: TensorInfo) -> Array:
    count = int(np.prod(info.shape, dtype=np.int64))
    if info.dtype == "BF16":
        # numpy has no bfloat16: its bits are the high half of a float32.
        bits = np.frombuffer(data, dtype="<u2", count=count, offset=info.begin)
        widened = bits.astype(np.uint32) << np.uint32(16)
        return widened.view(np.float32).reshape(info.shape)
    raw = np.frombuffer(data, dtype=_NUMPY_FLOATS[info.dtype], count=count, offset=info.begin)
    return raw.astype(raw.dtype.newbyteorder("="), copy=True).reshape(info.shape)


def _check_float_dtypes(header: SafetensorsHeader) -> None:
    non_float = sorted(
        f"{name} ({info.dtype})"
        for name, info in header.tensors.items()
        if info.dtype not in FLOAT_DTYPES
    )
    if non_float:
        shown = ", ".join(non_float[:5]) + (" ..." if len(non_float) > 5 else "")
        raise _invalid(
            AdapterErrorCode.UNSUPPORTED_DTYPE,
            f"adapter tensors must be F16, BF16, F32 or F64: {shown}",
        )


def read_safetensors(
    source: bytes | Path, *, limits: SafetensorsLimits = ADAPTER_LIMITS
) -> SafetensorsFile:
    """Read a safetensors adapter file; every header check runs before tensor data is read."""
    data: memoryview
    if isinstance(source, bytes | bytearray | memoryview):
        header = read_safetensors_header(source, limits=limits)
        _check_float_dtypes(header)
        data = memoryview(source)[header.data_start :]
    else:
        with Path(source).open("rb") as handle:
            header = _read_header_from(handle, os.fstat(handle.fileno()).st_size, limits)
            _check_float_dtypes(header)
            data = memoryview(handle.read(header.file_size - header.data_start))
        if len(data) != header.file_size - header.data_start:
            raise _invalid(AdapterErrorCode.TRUNCATED, "file shrank while it was being read")
    tensors = {name: _decode_tensor(data, info) for name, info in header.tensors.items()}
    return SafetensorsFile(
        tensors=tensors,
        metadata=header.metadata,
        stored_dtypes={name: info.dtype for name, info in header.tensors.items()},
    )


def write_safetensors(tensors: Mapping[str, Array], metadata: Mapping[str, str]) -> bytes:
    """Serialise numpy tensors and string metadata as safetensors bytes."""
    # asarray, not ascontiguousarray: the latter turns 0-d alphas into 1-d arrays.
    contiguous = {name: np.asarray(value, order="C") for name, value in tensors.items()}
    return save_numpy_safetensors(contiguous, metadata=dict(metadata))


def _canonical_header(header: SafetensorsHeader, extra: Mapping[str, str]) -> bytes:
    metadata = dict(sorted({**header.metadata, **extra}.items()))
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
    return len(encoded).to_bytes(8, "little") + encoded


def rewrite_header(
    source: bytes | Path,
    extra: Mapping[str, str] | None = None,
    *,
    limits: SafetensorsLimits = STORED_LIMITS,
) -> bytes:
    """The safetensors file ``source`` with a canonical header, ``extra`` added to its metadata.

    The tensor bytes are copied unchanged (dtypes included). Metadata keys are sorted and the
    tensors listed by offset: safetensors writes its metadata map in no fixed order, and a
    content-addressed store wants the same adapter to give the same bytes.
    """
    header = read_safetensors_header(source, limits=limits)
    if isinstance(source, Path):
        with source.open("rb") as handle:
            handle.seek(header.data_start)
            data = handle.read()
    else:
        data = source[header.data_start :]
    return _canonical_header(header, extra or {}) + data


def safetensors_bytes(tensors: Mapping[str, Array], metadata: Mapping[str, str]) -> bytes:
    """``write_safetensors`` with a canonical header: the same adapter gives the same bytes."""
    return rewrite_header(write_safetensors(tensors, metadata))
