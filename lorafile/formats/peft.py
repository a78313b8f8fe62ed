"""peft ``save_pretrained`` files: ``base_model.model.<module>.lora_A.weight`` keys.

A peft file is one model's state dict; text-encoder modules are told apart by their CLIP
paths. The alpha lives in ``adapter_config.json`` beside it, which an upload does not carry,
so modules get alpha = rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from lorafile.formats.base import KeyGroups, LoraFormat
from lorafile.formats.diffusers import split_module_key
from lorafile.naming import TEXT_ENCODER, UNET

_PREFIX: Final = "base_model.model."


def _claims(key: str) -> bool:
    return key.startswith(_PREFIX) or ".lora_A." in key or ".lora_B." in key


def _group(keys: Iterable[str], unet_config: Mapping[str, Any] | None) -> KeyGroups:
    grouped = KeyGroups(format="peft")
    for key in keys:
        rest = key.removeprefix(_PREFIX)
        is_text = rest.startswith(("text_model.", "encoder.layers."))
        component = TEXT_ENCODER if is_text else UNET
        split = split_module_key(component, rest)
        if split is None:
            grouped.ignored.append(key)
            continue
        grouped.add(component, *split, key)
    return grouped


FORMAT: Final = LoraFormat(name="peft", claims=_claims, group=_group)
