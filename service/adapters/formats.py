"""LoRA adapter files: capped safetensors parsing, format detection and conversion.

The canonical form is the diffusers file that ``StableDiffusionPipeline.save_lora_weights``
writes after peft training: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` and
``text_encoder.text_model.<module>.lora_A.weight``, with the peft ``LoraConfig`` of each
component in the ``lora_adapter_metadata`` header entry, which is where diffusers reads alpha
from. Inputs may also be peft state dicts or kohya / A1111 / ComfyUI files (``lora_unet_*``,
``lora_te_*``, per-module ``.alpha``), including kohya's original-checkpoint UNet naming
(``input_blocks`` / ``middle_block`` / ``output_blocks``). Alpha is carried, never folded into
the weights.

This module runs inside the API process: numpy, safetensors (numpy/bytes API) and the stdlib
only.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal

import numpy as np
import numpy.typing as npt
from safetensors.numpy import save as save_numpy_safetensors

from service import __version__ as LORASTACK_VERSION

Array = npt.NDArray[Any]
AdapterFormat = Literal["diffusers", "peft", "kohya", "kohya_ldm"]
SourceFamily = Literal["diffusers", "peft", "kohya"]
AlphaSource = Literal["tensors", "header_metadata", "default_rank", "mixed"]


class AdapterErrorCode(StrEnum):
    """Machine-readable reasons an adapter file is refused."""

    TOO_LARGE = "too_large"
    NOT_SAFETENSORS = "not_safetensors"
    HEADER_EXCEEDS_FILE = "header_exceeds_file"
    HEADER_TOO_LARGE = "header_too_large"
    INVALID_HEADER = "invalid_header"
    TOO_MANY_TENSORS = "too_many_tensors"
    UNSUPPORTED_DTYPE = "unsupported_dtype"
    INVALID_TENSOR = "invalid_tensor"
    TRUNCATED = "truncated"
    OVERLAPPING_TENSORS = "overlapping_tensors"
    INVALID_LAYOUT = "invalid_layout"
    UNKNOWN_FORMAT = "unknown_format"
    UNSUPPORTED_ADAPTER = "unsupported_adapter"
    INCOMPLETE_PAIR = "incomplete_pair"
    SHAPE_MISMATCH = "shape_mismatch"
    INVALID_METADATA = "invalid_metadata"
    NEEDS_UNET_CONFIG = "needs_unet_config"
    NO_MATCHING_MODULES = "no_matching_modules"


class AdapterFileError(Exception):
    """Base of every refusal of an adapter file; ``code`` is an ``AdapterErrorCode``."""

    def __init__(self, code: AdapterErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class InvalidAdapterFile(AdapterFileError):
    """The bytes are not a safetensors LoRA file we can read."""


# ---------------------------------------------------------------------------------------------
# safetensors parsing with caps
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SafetensorsLimits:
    """Caps checked before any tensor data is read."""

    max_header_bytes: int = 1 << 20
    max_tensors: int = 4096
    max_total_bytes: int = 2 << 30

    def __post_init__(self) -> None:
        if min(self.max_header_bytes, self.max_tensors, self.max_total_bytes) <= 0:
            raise ValueError("safetensors limits must be positive")


ADAPTER_LIMITS: Final = SafetensorsLimits()

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


# ---------------------------------------------------------------------------------------------
# LoRA modules: one representation for every input format
# ---------------------------------------------------------------------------------------------

UNET: Final = "unet"
TEXT_ENCODER: Final = "text_encoder"
TEXT_ENCODER_2: Final = "text_encoder_2"
COMPONENTS: Final = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)
LORA_ADAPTER_METADATA_KEY: Final = "lora_adapter_metadata"  # diffusers' header entry

# peft's LoraConfig defaults, used when a diffusers header config leaves them out.
_PEFT_DEFAULT_RANK: Final = 8
_PEFT_DEFAULT_ALPHA: Final = 8

_KOHYA_PREFIXES: Final[Mapping[str, str]] = {
    "lora_unet_": UNET,
    "lora_te_": TEXT_ENCODER,
    "lora_te1_": TEXT_ENCODER,
    "lora_te2_": TEXT_ENCODER_2,
}
_KOHYA_WRITE_PREFIXES: Final[Mapping[str, str]] = {
    UNET: "lora_unet_",
    TEXT_ENCODER: "lora_te_",
    TEXT_ENCODER_2: "lora_te2_",
}
_KOHYA_SUFFIXES: Final[Mapping[str, str]] = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "alpha": "alpha",
}
# Diffusers-family key endings, longest first: peft's, diffusers' own and the old
# attention-processor form (``attn1.processor.to_q_lora.down.weight``).
_DIFFUSERS_SUFFIXES: Final[tuple[tuple[str, str], ...]] = (
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    ("_lora.down.weight", "down_processor"),
    ("_lora.up.weight", "up_processor"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".alpha", "alpha"),
)
_PEFT_PREFIX: Final = "base_model.model."
# Key fragments of adapter types other than plain LoRA: converting them as LoRA would be wrong.
_UNSUPPORTED_MARKERS: Final[Mapping[str, str]] = {
    "hada_": "LoHa (LyCORIS)",
    "lokr_": "LoKr (LyCORIS)",
    "lora_mid": "LoCon with CP decomposition (LyCORIS)",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "lora_B.bias": "LoRA with bias",
    "lora_up.bias": "LoRA with bias",
    "diff_b": "full bias difference",
    ".diff": "full weight difference",
}
# Names with an underscore inside one module name; kohya joins every path level with "_", so
# these must be put back together when the path is split again.
_COMPOUND_NAMES: Final = (
    # diffusers UNet
    "down_blocks",
    "up_blocks",
    "mid_block",
    "transformer_blocks",
    "proj_in",
    "proj_out",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "time_emb_proj",
    "conv_shortcut",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding",
    "linear_1",
    "linear_2",
    "add_embedding",
    # CLIP text encoder
    "text_model",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "final_layer_norm",
    "layer_norm1",
    "layer_norm2",
    "text_projection",
    "token_embedding",
    "position_embedding",
    # original (LDM) SD checkpoint UNet
    "input_blocks",
    "middle_block",
    "output_blocks",
    "in_layers",
    "emb_layers",
    "out_layers",
    "skip_connection",
    "time_embed",
)
_COMPOUNDS_BY_FIRST: Final[dict[str, list[tuple[str, ...]]]] = {}
for _name in sorted(_COMPOUND_NAMES, key=lambda n: -n.count("_")):
    _parts = tuple(_name.split("_"))
    _COMPOUNDS_BY_FIRST.setdefault(_parts[0], []).append(_parts)


@dataclass(frozen=True)
class LoraModule:
    """One LoRA pair: ``down`` is peft's lora_A, ``up`` is lora_B; scale = alpha / rank.

    ``path`` is the module inside its component; for text encoders it is relative to the
    CLIP text model (no ``text_model.`` prefix), since transformers 5 flattens that level.
    """

    component: str
    path: str
    down: Array
    up: Array
    alpha: float
    alpha_source: Literal["tensor", "header_metadata", "default_rank"]
    source_keys: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.component}.{self.path}"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def param_count(self) -> int:
        return int(self.down.size + self.up.size)


@dataclass
class LoraAdapter:
    """A parsed adapter: modules by name, plus what parsing learned on the way."""

    format: AdapterFormat
    modules: dict[str, LoraModule]
    metadata: dict[str, str]
    ignored_keys: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def alpha_source(self) -> AlphaSource:
        sources = {module.alpha_source for module in self.modules.values()}
        if len(sources) != 1:
            return "mixed"
        only = sources.pop()
        return "tensors" if only == "tensor" else only


@dataclass(frozen=True)
class AdapterSummary:
    """What an adapter version records about its weights."""

    rank: int
    alpha: float
    target_modules: list[str]
    param_count: int
    module_count: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "param_count": self.param_count,
            "module_count": self.module_count,
        }


def split_kohya_name(flat: str) -> str:
    """Turn a kohya module name (levels joined by ``_``) back into a dotted module path."""
    tokens = flat.split("_")
    parts: list[str] = []
    index = 0
    while index < len(tokens):
        for candidate in _COMPOUNDS_BY_FIRST.get(tokens[index], ()):
            if tuple(tokens[index : index + len(candidate)]) == candidate:
                parts.append("_".join(candidate))
                index += len(candidate)
                break
        else:
            parts.append(tokens[index])
            index += 1
    return ".".join(parts)


def kohya_module_name(component: str, path: str) -> str:
    """The kohya / A1111 name of a module (``lora_unet_down_blocks_0_..._to_q``)."""
    if component in (TEXT_ENCODER, TEXT_ENCODER_2):
        path = f"text_model.{path}"
    return _KOHYA_WRITE_PREFIXES[component] + path.replace(".", "_")


def _strip_text_model(path: str) -> str:
    return path.removeprefix("text_model.")


# --- kohya original-checkpoint (LDM) UNet naming ---------------------------------------------

_LDM_TOP_LEVEL: Final[Mapping[str, str]] = {
    "input_blocks.0.0": "conv_in",
    "out.2": "conv_out",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
}
_LDM_INNER_RENAMES: Final[Mapping[str, Mapping[str, str]]] = {
    "resnet": {
        "in_layers.2": "conv1",
        "emb_layers.1": "time_emb_proj",
        "out_layers.3": "conv2",
        "skip_connection": "conv_shortcut",
    },
    "downsampler": {"op": "conv"},
    "upsampler": {"conv": "conv"},
    "attention": {},
}


def ldm_block_map(unet_config: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Map original-checkpoint UNet blocks (``input_blocks.1.1``) to diffusers ones.

    Values are (diffusers prefix, kind); the layout follows the UNet config's block types and
    layers_per_block, as the original SD checkpoint numbered its blocks.
    """
    layers = unet_config.get("layers_per_block")
    down_types = unet_config.get("down_block_types")
    up_types = unet_config.get("up_block_types")
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise ValueError("UNet config needs a positive int layers_per_block")
    if not isinstance(down_types, list | tuple) or not isinstance(up_types, list | tuple):
        raise ValueError("UNet config needs down_block_types and up_block_types")
    mapping: dict[str, tuple[str, str]] = {}
    index = 1
    for block, block_type in enumerate(down_types):
        for layer in range(layers):
            mapping[f"input_blocks.{index}.0"] = (f"down_blocks.{block}.resnets.{layer}", "resnet")
            if "CrossAttn" in str(block_type):
                mapping[f"input_blocks.{index}.1"] = (
                    f"down_blocks.{block}.attentions.{layer}",
                    "attention",
                )
            index += 1
        if block < len(down_types) - 1:
            mapping[f"input_blocks.{index}.0"] = (
                f"down_blocks.{block}.downsamplers.0",
                "downsampler",
            )
            index += 1
    mapping["middle_block.0"] = ("mid_block.resnets.0", "resnet")
    mapping["middle_block.1"] = ("mid_block.attentions.0", "attention")
    mapping["middle_block.2"] = ("mid_block.resnets.1", "resnet")
    index = 0
    for block, block_type in enumerate(up_types):
        has_attention = "CrossAttn" in str(block_type)
        for layer in range(layers + 1):
            mapping[f"output_blocks.{index}.0"] = (f"up_blocks.{block}.resnets.{layer}", "resnet")
            position = 1
            if has_attention:
                mapping[f"output_blocks.{index}.1"] = (
                    f"up_blocks.{block}.attentions.{layer}",
                    "attention",
                )
                position = 2
            if layer == layers and block < len(up_types) - 1:
                mapping[f"output_blocks.{index}.{position}"] = (
                    f"up_blocks.{block}.upsamplers.0",
                    "upsampler",
                )
            index += 1
    return mapping


def _ldm_to_diffusers_path(path: str, block_map: Mapping[str, tuple[str, str]]) -> str:
    """Rename an LDM UNet module path; an unknown block is returned unchanged."""
    for ldm_name, diffusers_name in _LDM_TOP_LEVEL.items():
        if path == ldm_name:
            return diffusers_name
    parts = path.split(".")
    depth = 2 if parts[0] == "middle_block" else 3
    block = ".".join(parts[:depth])
    inner = ".".join(parts[depth:])
    if block not in block_map or not inner:
        return path
    prefix, kind = block_map[block]
    for old, new in _LDM_INNER_RENAMES[kind].items():
        if inner == old or inner.startswith(old + "."):
            inner = new + inner[len(old) :]
            break
    return f"{prefix}.{inner}"


def _is_ldm_unet_name(flat: str) -> bool:
    return flat.startswith(
        ("input_blocks_", "middle_block_", "output_blocks_", "out_2", "time_embed_")
    )


# --- key grouping ----------------------------------------------------------------------------


@dataclass
class _PairKeys:
    down: str | None = None
    up: str | None = None
    alpha: str | None = None


def _key_family(key: str) -> SourceFamily | None:
    if key.startswith(tuple(_KOHYA_PREFIXES)):
        return "kohya"
    if key.split(".", 1)[0] in COMPONENTS:
        return "diffusers"
    if key.startswith(_PEFT_PREFIX) or ".lora_A." in key or ".lora_B." in key:
        return "peft"
    return None


def _detect_format(keys: Iterable[str]) -> SourceFamily:
    families = {_key_family(key) for key in keys}
    if len(families) == 1:
        (family,) = families
        if family is not None:
            return family
    found = sorted(family or "unknown" for family in families)
    raise _invalid(
        AdapterErrorCode.UNKNOWN_FORMAT,
        "keys are neither all diffusers (unet./text_encoder.), all peft (base_model.model.) "
        f"nor all kohya (lora_unet_/lora_te_); found: {', '.join(found)}",
    )


def _processor_path(component: str, path: str) -> str:
    """Module path of an old attention-processor key (``attn1.processor.to_q``)."""
    parts = [part for part in path.split(".") if part != "processor"]
    leaf = parts[-1]
    if component == UNET:
        parts[-1:] = ["to_out", "0"] if leaf == "to_out" else [leaf]
    else:
        renamed = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
        parts[-1] = renamed.get(leaf, leaf)
    return ".".join(parts)


def _split_diffusers_key(component: str, rest: str) -> tuple[str, str] | None:
    for suffix, role in _DIFFUSERS_SUFFIXES:
        if rest.endswith(suffix) and len(rest) > len(suffix):
            path = rest[: -len(suffix)]
            if role.endswith("_processor"):
                return _processor_path(component, path), role.removesuffix("_processor")
            return path, role
    return None


def _group_keys(
    keys: Iterable[str],
    fmt: SourceFamily,
    unet_config: Mapping[str, Any] | None,
) -> tuple[dict[tuple[str, str], _PairKeys], list[str], bool]:
    """Group file keys by (component, module path); return groups, ignored keys, LDM naming."""
    groups: dict[tuple[str, str], _PairKeys] = {}
    ignored: list[str] = []
    uses_ldm = False
    block_map: dict[str, tuple[str, str]] | None = None
    for key in keys:
        component: str
        if fmt == "kohya":
            flat, _, suffix = key.partition(".")
            role = _KOHYA_SUFFIXES.get(suffix)
            prefix = next(p for p in _KOHYA_PREFIXES if flat.startswith(p))
            component = _KOHYA_PREFIXES[prefix]
            flat = flat[len(prefix) :]
            if role is None or not flat:
                ignored.append(key)
                continue
            path = split_kohya_name(flat)
            if component == UNET and _is_ldm_unet_name(flat):
                uses_ldm = True
                if unet_config is None:
                    raise _invalid(
                        AdapterErrorCode.NEEDS_UNET_CONFIG,
                        "kohya file uses the original SD checkpoint UNet naming "
                        "(input_blocks/middle_block/output_blocks); converting it needs the "
                        "base model's UNet config",
                    )
                if block_map is None:
                    try:
                        block_map = ldm_block_map(unet_config)
                    except ValueError as exc:
                        raise _invalid(AdapterErrorCode.NEEDS_UNET_CONFIG, str(exc)) from exc
                path = _ldm_to_diffusers_path(path, block_map)
            elif component != UNET:
                path = _strip_text_model(path)
        else:
            if fmt == "diffusers":
                component, _, rest = key.partition(".")
            else:
                rest = key.removeprefix(_PEFT_PREFIX)
                is_text = rest.startswith(("text_model.", "encoder.layers."))
                component = TEXT_ENCODER if is_text else UNET
            split = _split_diffusers_key(component, rest)
            if split is None:
                ignored.append(key)
                continue
            path, role = split
            if component != UNET:
                path = _strip_text_model(path)
        pair = groups.setdefault((component, path), _PairKeys())
        if getattr(pair, role) is not None:
            raise _invalid(
                AdapterErrorCode.INVALID_HEADER,
                f"keys {getattr(pair, role)!r} and {key!r} name the same {role} weight",
            )
        setattr(pair, role, key)
    return groups, ignored, uses_ldm


# --- alpha from the diffusers header ---------------------------------------------------------

_REGEX_CHARS: Final = frozenset("*+?[](){}|\\$")


def _component_configs(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if raw is None:
        return {}
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _invalid(
            AdapterErrorCode.INVALID_METADATA, f"{LORA_ADAPTER_METADATA_KEY} is not JSON"
        ) from exc
    if not isinstance(parsed, dict):
        raise _invalid(
            AdapterErrorCode.INVALID_METADATA, f"{LORA_ADAPTER_METADATA_KEY} is not an object"
        )
    configs: dict[str, dict[str, Any]] = {}
    for key, value in parsed.items():
        component, _, option = str(key).partition(".")
        if component in COMPONENTS and option:
            configs.setdefault(component, {})[option] = value
    for component, config in configs.items():
        for flag, what in (("use_dora", "DoRA"), ("use_rslora", "rsLoRA"), ("lora_bias", "bias")):
            if config.get(flag):
                raise _invalid(
                    AdapterErrorCode.UNSUPPORTED_ADAPTER,
                    f"{component} uses {what} ({flag}=true), which lorastack does not convert",
                )
        for option in ("rank_pattern", "alpha_pattern"):
            patterns = config.get(option) or {}
            if not isinstance(patterns, dict):
                raise _invalid(
                    AdapterErrorCode.INVALID_METADATA, f"{component}.{option}: not a map"
                )
            # peft reads these keys as regular expressions; lorastack reads them as module-name
            # suffixes and refuses real regexes rather than run untrusted patterns.
            for pattern in patterns:
                if _REGEX_CHARS & set(str(pattern).removeprefix("^")):
                    raise _invalid(
                        AdapterErrorCode.INVALID_METADATA,
                        f"{component}.{option} key {pattern!r} is a regular expression; "
                        "only module names are supported",
                    )
    return configs


def _pattern_value(patterns: Mapping[str, Any], path: str) -> Any:
    """peft's rank/alpha pattern lookup, with keys taken as module-name suffixes."""
    candidates = (path, f"text_model.{path}")
    for pattern, value in patterns.items():
        anchored = pattern.startswith("^")
        name = pattern.removeprefix("^")
        for candidate in candidates:
            if candidate == name or (not anchored and candidate.endswith("." + name)):
                return value
    return None


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(AdapterErrorCode.INVALID_METADATA, f"{what} is not a number: {value!r}")
    return float(value)


def _header_alpha(config: Mapping[str, Any], component: str, path: str, rank: int) -> float:
    """Alpha of one module from its component's peft config; checks the recorded rank."""
    rank_value = _pattern_value(config.get("rank_pattern") or {}, path)
    if rank_value is None:
        rank_value = config.get("r", _PEFT_DEFAULT_RANK)
    if _number(rank_value, f"{component}.r") != rank:
        raise _invalid(
            AdapterErrorCode.INVALID_METADATA,
            f"header says rank {rank_value} for {component}.{path} but its weights have rank "
            f"{rank}",
        )
    alpha_value = _pattern_value(config.get("alpha_pattern") or {}, path)
    if alpha_value is None:
        alpha_value = config.get("lora_alpha", _PEFT_DEFAULT_ALPHA)
    return _number(alpha_value, f"{component}.lora_alpha")


def _targets_cover(targets: Any, path: str) -> bool:
    if not isinstance(targets, list):
        return True  # a regex string (or absent): not checked
    candidates = (path, f"text_model.{path}")
    return any(c == t or c.endswith(f".{t}") for t in map(str, targets) for c in candidates)


# --- parsing ---------------------------------------------------------------------------------


def _check_pair(name: str, down: Array, up: Array) -> None:
    for role, array in (("down", down), ("up", up)):
        if not np.issubdtype(array.dtype, np.floating):
            raise _invalid(
                AdapterErrorCode.UNSUPPORTED_DTYPE, f"{name} {role} weight has dtype {array.dtype}"
            )
        if not np.isfinite(array).all():
            raise _invalid(AdapterErrorCode.INVALID_TENSOR, f"{name} {role} weight is not finite")
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise _invalid(
            AdapterErrorCode.SHAPE_MISMATCH,
            f"{name}: LoRA weights must both be 2-D (Linear) or 4-D (Conv2d), got "
            f"{list(down.shape)} and {list(up.shape)}",
        )
    if down.shape[0] != up.shape[1] or down.shape[0] == 0:
        raise _invalid(
            AdapterErrorCode.SHAPE_MISMATCH,
            f"{name}: down {list(down.shape)} and up {list(up.shape)} disagree on the rank",
        )
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise _invalid(
            AdapterErrorCode.SHAPE_MISMATCH, f"{name}: conv up weight must be 1x1, got {up.shape}"
        )


def _tensor_alpha(name: str, value: Array) -> float | None:
    if value.size != 1 or not np.issubdtype(value.dtype, np.floating):
        raise _invalid(AdapterErrorCode.INVALID_TENSOR, f"{name}: alpha must be one float")
    alpha = float(value.reshape(()))
    if not np.isfinite(alpha) or alpha < 0:
        raise _invalid(AdapterErrorCode.INVALID_TENSOR, f"{name}: invalid alpha {alpha}")
    # kohya and A1111 read alpha 0 as "unset", i.e. alpha = rank.
    return alpha or None


def parse_adapter(
    file: SafetensorsFile, *, unet_config: Mapping[str, Any] | None = None
) -> LoraAdapter:
    """Detect the format of a LoRA file and read its modules, ranks and alphas.

    ``unet_config`` (the base UNet's config.json) is needed only for kohya files that use the
    original SD checkpoint UNet naming.
    """
    if not file.tensors:
        raise _invalid(AdapterErrorCode.UNKNOWN_FORMAT, "the file holds no tensors")
    for key in file.tensors:
        for marker, kind in _UNSUPPORTED_MARKERS.items():
            if marker in key:
                raise _invalid(
                    AdapterErrorCode.UNSUPPORTED_ADAPTER,
                    f"{kind} adapters are not supported (key {key!r}); only plain LoRA is",
                )
    base_format = _detect_format(file.tensors)
    groups, ignored, uses_ldm = _group_keys(file.tensors, base_format, unet_config)
    configs = _component_configs(file.metadata) if base_format == "diffusers" else {}
    warnings: list[str] = []
    modules: dict[str, LoraModule] = {}
    uncovered: list[str] = []
    for (component, path), pair in sorted(groups.items()):
        name = f"{component}.{path}"
        if pair.down is None or pair.up is None:
            present = pair.down or pair.up or pair.alpha
            raise _invalid(
                AdapterErrorCode.INCOMPLETE_PAIR,
                f"{name}: needs both down (lora_A) and up (lora_B) weights; found {present!r}",
            )
        down, up = file.tensors[pair.down], file.tensors[pair.up]
        _check_pair(name, down, up)
        rank = int(down.shape[0])
        alpha: float | None = None
        source: Literal["tensor", "header_metadata", "default_rank"] = "default_rank"
        if pair.alpha is not None:
            alpha = _tensor_alpha(pair.alpha, file.tensors[pair.alpha])
            source = "tensor" if alpha is not None else "default_rank"
        elif component in configs:
            alpha = _header_alpha(configs[component], component, path, rank)
            source = "header_metadata"
            if not _targets_cover(configs[component].get("target_modules"), path):
                uncovered.append(name)
        keys = tuple(k for k in (pair.down, pair.up, pair.alpha) if k is not None)
        modules[name] = LoraModule(
            component=component,
            path=path,
            down=down,
            up=up,
            alpha=float(rank) if alpha is None else alpha,
            alpha_source=source,
            source_keys=keys,
        )
    if not modules:
        raise _invalid(AdapterErrorCode.UNKNOWN_FORMAT, "no LoRA weights found in the file")
    defaulted = [m.name for m in modules.values() if m.alpha_source == "default_rank"]
    if defaulted:
        warnings.append(
            f"{len(defaulted)} module(s) carry no alpha; using alpha = rank (scale 1.0), as "
            "diffusers and kohya do"
        )
        header_alpha = file.metadata.get("ss_network_alpha")
        if base_format == "kohya" and header_alpha is not None:
            warnings.append(
                f"header says ss_network_alpha={header_alpha} but the modules have no .alpha "
                "tensors; kohya loaders ignore the header, and so does lorastack"
            )
    if uncovered:
        warnings.append(
            f"{len(uncovered)} module(s) are missing from the header's target_modules (diffusers "
            f"would skip them); lorastack keeps them: {', '.join(uncovered[:5])}"
        )
    if ignored:
        shown = ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else "")
        warnings.append(f"{len(ignored)} key(s) are not LoRA weights and were ignored: {shown}")
    bf16 = sorted(k for k, dtype in file.stored_dtypes.items() if dtype == "BF16")
    if bf16:
        warnings.append(f"{len(bf16)} BF16 tensor(s) were widened to float32 (values unchanged)")
    fmt: AdapterFormat = "kohya_ldm" if uses_ldm else base_format
    return LoraAdapter(
        format=fmt,
        modules=modules,
        metadata=dict(file.metadata),
        ignored_keys=ignored,
        warnings=warnings,
    )


# --- writing ---------------------------------------------------------------------------------


def _most_common(values: Iterable[float]) -> float:
    counts = Counter(values)
    # Ties go to the smallest value so that the choice does not depend on module order.
    return min(counts, key=lambda v: (-counts[v], v))


def _json_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


# Generic leaf names that say little alone; the short module name keeps walking up past them.
_GENERIC_LEAVES: Final = frozenset({"proj", "net", "conv"})


def short_module_name(path: str) -> str:
    """peft-style target name of a module path (``to_out.0``, ``q_proj``, ``ff.net.0.proj``)."""
    parts = path.split(".")
    taken: list[str] = []
    for part in reversed(parts):
        taken.append(part)
        if not part.isdigit() and part not in _GENERIC_LEAVES:
            break
    return ".".join(reversed(taken))


def describe(adapter: LoraAdapter) -> AdapterSummary:
    """Rank and alpha (most common), peft-style target names and the parameter count."""
    modules = list(adapter.modules.values())
    return AdapterSummary(
        rank=int(_most_common(m.rank for m in modules)),
        alpha=_most_common(m.alpha for m in modules),
        target_modules=sorted({short_module_name(m.path) for m in modules}),
        param_count=sum(m.param_count for m in modules),
        module_count=len(modules),
    )


def _peft_config(modules: list[LoraModule]) -> dict[str, Any]:
    """The LoraConfig fields diffusers needs to rebuild one component's adapter exactly."""
    rank = int(_most_common(m.rank for m in modules))
    alpha = _most_common(m.alpha for m in modules)
    return {
        "r": rank,
        "lora_alpha": _json_number(alpha),
        "rank_pattern": {m.path: m.rank for m in modules if m.rank != rank},
        "alpha_pattern": {m.path: _json_number(m.alpha) for m in modules if m.alpha != alpha},
        # Full paths, so only these modules get LoRA layers; suffix matching keeps them valid
        # whether or not the CLIP model has its text_model level.
        "target_modules": sorted(m.path for m in modules),
        "use_dora": False,
        "use_rslora": False,
        "lora_bias": False,
    }


def _lorastack_metadata(adapter: LoraAdapter, base_model: str | None) -> dict[str, str]:
    summary = describe(adapter)
    metadata = {
        "lorastack_version": LORASTACK_VERSION,
        "lorastack_rank": str(summary.rank),
        "lorastack_alpha": str(_json_number(summary.alpha)),
        "lorastack_target_modules": json.dumps(summary.target_modules),
    }
    if base_model:
        metadata["lorastack_base_model"] = base_model
    return metadata


def to_diffusers(
    adapter: LoraAdapter, *, base_model: str | None = None
) -> tuple[dict[str, Array], dict[str, str]]:
    """The canonical diffusers tensors and header for an adapter (loads with load_lora_weights)."""
    tensors: dict[str, Array] = {}
    by_component: dict[str, list[LoraModule]] = {}
    for module in sorted(adapter.modules.values(), key=lambda m: m.name):
        path = module.path if module.component == UNET else f"text_model.{module.path}"
        tensors[f"{module.component}.{path}.lora_A.weight"] = module.down
        tensors[f"{module.component}.{path}.lora_B.weight"] = module.up
        by_component.setdefault(module.component, []).append(module)
    peft_metadata = {
        f"{component}.{option}": value
        for component, modules in by_component.items()
        for option, value in _peft_config(modules).items()
    }
    metadata = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps(peft_metadata, indent=2, sort_keys=True),
        "lorastack_format": "diffusers",
        **_lorastack_metadata(adapter, base_model),
    }
    return tensors, metadata


def adapter_to_kohya(
    adapter: LoraAdapter, *, base_model: str | None = None
) -> tuple[dict[str, Array], dict[str, str]]:
    """kohya / A1111 / ComfyUI tensors (with per-module .alpha) and header for an adapter."""
    tensors: dict[str, Array] = {}
    for module in sorted(adapter.modules.values(), key=lambda m: m.name):
        name = kohya_module_name(module.component, module.path)
        tensors[f"{name}.lora_down.weight"] = module.down
        tensors[f"{name}.lora_up.weight"] = module.up
        tensors[f"{name}.alpha"] = np.asarray(module.alpha, dtype=np.float32)
    summary = describe(adapter)
    metadata = {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(summary.rank),
        "ss_network_alpha": str(_json_number(summary.alpha)),
        "ss_base_model_version": "sd_v1",
        "lorastack_format": "kohya",
        **_lorastack_metadata(adapter, base_model),
    }
    if base_model:
        metadata["ss_sd_model_name"] = base_model
    return tensors, metadata


def to_kohya(
    canonical: SafetensorsFile, *, base_model: str | None = None
) -> tuple[dict[str, Array], dict[str, str]]:
    """Convert a canonical (diffusers) adapter file to kohya tensors and header metadata."""
    adapter = parse_adapter(canonical)
    return adapter_to_kohya(
        adapter, base_model=base_model or canonical.metadata.get("lorastack_base_model")
    )


def summarize(canonical: SafetensorsFile) -> AdapterSummary:
    """Rank, alpha, target modules and parameter count of a canonical adapter file."""
    return describe(parse_adapter(canonical))
