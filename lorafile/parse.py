"""Parsing a LoRA file of any registered format into a ``LoraAdapter``, and converting it.

Alpha is carried, never folded into the weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from lorafile.adapter import (
    LoraAdapter,
    LoraModule,
    PeftComponentConfig,
    check_pair,
    component_configs,
    module_alpha,
)
from lorafile.errors import AdapterErrorCode, InvalidAdapterFile
from lorafile.formats import WRITERS, LoraFormat, PairKeys, detect_format
from lorafile.formats.base import Header, Tensors
from lorafile.safetensors_io import (
    STORED_LIMITS,
    SafetensorsFile,
    SafetensorsLimits,
    read_safetensors,
)

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
_LISTED: Final = 5


def _invalid(code: AdapterErrorCode, message: str) -> InvalidAdapterFile:
    return InvalidAdapterFile(code, message)


def _refuse_other_adapter_types(file: SafetensorsFile) -> None:
    if not file.tensors:
        raise _invalid(AdapterErrorCode.UNKNOWN_FORMAT, "the file holds no tensors")
    for key in file.tensors:
        for marker, kind in _UNSUPPORTED_MARKERS.items():
            if marker in key:
                raise _invalid(
                    AdapterErrorCode.UNSUPPORTED_ADAPTER,
                    f"{kind} adapters are not supported (key {key!r}); only plain LoRA is",
                )


def _module(
    file: SafetensorsFile,
    component: str,
    path: str,
    pair: PairKeys,
    config: PeftComponentConfig | None,
) -> LoraModule:
    name = f"{component}.{path}"
    if pair.down is None or pair.up is None:
        present = pair.down or pair.up or pair.alpha
        raise _invalid(
            AdapterErrorCode.INCOMPLETE_PAIR,
            f"{name}: needs both down (lora_A) and up (lora_B) weights; found {present!r}",
        )
    down, up = file.tensors[pair.down], file.tensors[pair.up]
    check_pair(name, down, up)
    alpha, source = module_alpha(
        path=path,
        rank=int(down.shape[0]),
        alpha_tensor=None if pair.alpha is None else (pair.alpha, file.tensors[pair.alpha]),
        config=config,
    )
    keys = tuple(k for k in (pair.down, pair.up, pair.alpha) if k is not None)
    return LoraModule(
        component=component,
        path=path,
        down=down,
        up=up,
        alpha=alpha,
        alpha_source=source,
        source_keys=keys,
    )


def _shown(keys: list[str]) -> str:
    return ", ".join(keys[:_LISTED]) + (" ..." if len(keys) > _LISTED else "")


def _warnings(
    file: SafetensorsFile,
    fmt: LoraFormat,
    modules: Mapping[str, LoraModule],
    *,
    uncovered: list[str],
    ignored: list[str],
) -> list[str]:
    warnings: list[str] = []
    if any(m.alpha_source == "default_rank" for m in modules.values()):
        defaulted = sum(m.alpha_source == "default_rank" for m in modules.values())
        warnings.append(
            f"{defaulted} module(s) carry no alpha; using alpha = rank (scale 1.0), as "
            "diffusers and kohya do"
        )
        header_alpha = file.metadata.get(fmt.ignored_alpha_key or "")
        if fmt.ignored_alpha_key and header_alpha is not None:
            warnings.append(
                f"header says {fmt.ignored_alpha_key}={header_alpha} but the modules have no "
                ".alpha tensors; kohya loaders ignore the header, and so does lorastack"
            )
    if uncovered:
        warnings.append(
            f"{len(uncovered)} module(s) are missing from the header's target_modules (diffusers "
            f"would skip them); lorastack keeps them: {', '.join(uncovered[:_LISTED])}"
        )
    if ignored:
        warnings.append(
            f"{len(ignored)} key(s) are not LoRA weights and were ignored: {_shown(ignored)}"
        )
    bf16 = sorted(k for k, dtype in file.stored_dtypes.items() if dtype == "BF16")
    if bf16:
        warnings.append(f"{len(bf16)} BF16 tensor(s) were widened to float32 (values unchanged)")
    return warnings


def parse_adapter(
    file: SafetensorsFile, *, unet_config: Mapping[str, Any] | None = None
) -> LoraAdapter:
    """Detect the format of a LoRA file and read its modules, ranks and alphas.

    ``unet_config`` (the base UNet's config.json) is needed only for kohya files that use the
    original SD checkpoint UNet naming.
    """
    _refuse_other_adapter_types(file)
    fmt = detect_format(file.tensors)
    grouped = fmt.group(file.tensors, unet_config)
    configs = component_configs(file.metadata) if fmt.header_configs else {}
    modules: dict[str, LoraModule] = {}
    uncovered: list[str] = []
    for (component, path), pair in sorted(grouped.groups.items()):
        config = configs.get(component)
        module = _module(file, component, path, pair, config)
        modules[module.name] = module
        if config is not None and pair.alpha is None and not config.covers(path):
            uncovered.append(module.name)
    if not modules:
        raise _invalid(AdapterErrorCode.UNKNOWN_FORMAT, "no LoRA weights found in the file")
    return LoraAdapter(
        format=grouped.format,
        modules=modules,
        metadata=dict(file.metadata),
        ignored_keys=grouped.ignored,
        warnings=_warnings(file, fmt, modules, uncovered=uncovered, ignored=grouped.ignored),
    )


def write_adapter(
    adapter: LoraAdapter, fmt: str, *, base_model: str | None = None
) -> tuple[Tensors, Header]:
    """Tensors and header of ``adapter`` in a format lorastack writes (``diffusers``, ``kohya``)."""
    return WRITERS[fmt](adapter, base_model)


def to_kohya(
    canonical: SafetensorsFile, *, base_model: str | None = None
) -> tuple[Tensors, Header]:
    """Convert a canonical (diffusers) adapter file to kohya tensors and header metadata."""
    adapter = parse_adapter(canonical)
    return write_adapter(
        adapter, "kohya", base_model=base_model or canonical.metadata.get("lorastack_base_model")
    )


def read_adapter(source: bytes | Path, *, limits: SafetensorsLimits = STORED_LIMITS) -> LoraAdapter:
    """Read and parse a LoRA file; the default caps are those for files already stored."""
    return parse_adapter(read_safetensors(source, limits=limits))
