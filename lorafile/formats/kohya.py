"""kohya / A1111 / ComfyUI files: ``lora_unet_<flat module>.lora_down.weight`` and ``.alpha``.

kohya joins every module path level with ``_`` and carries alpha per module. Its files for
SD 1.x may use the original-checkpoint UNet naming (``input_blocks`` / ``middle_block`` /
``output_blocks``), which only the base UNet's config maps to diffusers blocks (format
``kohya_ldm``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

import numpy as np

from lorafile.adapter import LoraAdapter, describe, json_number
from lorafile.errors import AdapterErrorCode, InvalidAdapterFile
from lorafile.formats.base import Header, KeyGroups, LoraFormat, Role, Tensors, lorastack_metadata
from lorafile.naming import (
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    is_ldm_unet_name,
    ldm_block_map,
    ldm_to_diffusers_path,
    split_kohya_name,
    strip_text_model,
    with_text_model,
)

_READ_PREFIXES: Final[Mapping[str, str]] = {
    "lora_unet_": UNET,
    "lora_te_": TEXT_ENCODER,
    "lora_te1_": TEXT_ENCODER,
    "lora_te2_": TEXT_ENCODER_2,
}
_WRITE_PREFIXES: Final[Mapping[str, str]] = {
    UNET: "lora_unet_",
    TEXT_ENCODER: "lora_te_",
    TEXT_ENCODER_2: "lora_te2_",
}
_SUFFIXES: Final[Mapping[str, Role]] = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "alpha": "alpha",
}


def kohya_module_name(component: str, path: str) -> str:
    """The kohya / A1111 name of a module (``lora_unet_down_blocks_0_..._to_q``)."""
    return _WRITE_PREFIXES[component] + with_text_model(component, path).replace(".", "_")


def _claims(key: str) -> bool:
    return key.startswith(tuple(_READ_PREFIXES))


class _LdmPaths:
    """Maps LDM UNet paths to diffusers ones; the block map is built on first use."""

    def __init__(self, unet_config: Mapping[str, Any] | None) -> None:
        self._unet_config = unet_config
        self._block_map: dict[str, tuple[str, str]] | None = None

    def __call__(self, path: str) -> str:
        if self._unet_config is None:
            raise InvalidAdapterFile(
                AdapterErrorCode.NEEDS_UNET_CONFIG,
                "kohya file uses the original SD checkpoint UNet naming "
                "(input_blocks/middle_block/output_blocks); converting it needs the "
                "base model's UNet config",
            )
        if self._block_map is None:
            try:
                self._block_map = ldm_block_map(self._unet_config)
            except ValueError as exc:
                raise InvalidAdapterFile(AdapterErrorCode.NEEDS_UNET_CONFIG, str(exc)) from exc
        return ldm_to_diffusers_path(path, self._block_map)


def _group(keys: Iterable[str], unet_config: Mapping[str, Any] | None) -> KeyGroups:
    grouped = KeyGroups(format="kohya")
    ldm_paths = _LdmPaths(unet_config)
    for key in keys:
        flat, _, suffix = key.partition(".")
        role = _SUFFIXES.get(suffix)
        prefix = next(p for p in _READ_PREFIXES if flat.startswith(p))
        component = _READ_PREFIXES[prefix]
        flat = flat[len(prefix) :]
        if role is None or not flat:
            grouped.ignored.append(key)
            continue
        path = split_kohya_name(flat)
        if component == UNET and is_ldm_unet_name(flat):
            grouped.format = "kohya_ldm"
            path = ldm_paths(path)
        elif component != UNET:
            path = strip_text_model(path)
        grouped.add(component, path, role, key)
    return grouped


def adapter_to_kohya(adapter: LoraAdapter, base_model: str | None = None) -> tuple[Tensors, Header]:
    """kohya / A1111 / ComfyUI tensors (with per-module .alpha) and header for an adapter."""
    tensors: Tensors = {}
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
        "ss_network_alpha": str(json_number(summary.alpha)),
        "ss_base_model_version": "sd_v1",
        "lorastack_format": "kohya",
        **lorastack_metadata(adapter, base_model),
    }
    if base_model:
        metadata["ss_sd_model_name"] = base_model
    return tensors, metadata


FORMAT: Final = LoraFormat(
    name="kohya",
    claims=_claims,
    group=_group,
    ignored_alpha_key="ss_network_alpha",
    write=adapter_to_kohya,
)
