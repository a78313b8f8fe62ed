"""diffusers files: ``<component>.<module>.lora_A.weight`` keys, alpha in the header config.

The canonical form is the diffusers file that ``StableDiffusionPipeline.save_lora_weights``
writes after peft training: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` and
``text_encoder.text_model.<module>.lora_A.weight``, with the peft ``LoraConfig`` of each
component in the ``lora_adapter_metadata`` header entry, which is where diffusers reads alpha
from. The reader also takes diffusers' older spellings (``lora.down``, ``lora_linear_layer``
and the attention-processor form).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from lorafile.adapter import (
    LORA_ADAPTER_METADATA_KEY,
    LoraAdapter,
    PeftComponentConfig,
    configs_to_header,
)
from lorafile.formats.base import Header, KeyGroups, LoraFormat, Role, Tensors, lorastack_metadata
from lorafile.naming import COMPONENTS, UNET, strip_text_model, with_text_model

# Diffusers-family key endings, longest first: peft's, diffusers' own and the old
# attention-processor form (``attn1.processor.to_q_lora.down.weight``).
_SUFFIXES: Final[tuple[tuple[str, Role, bool], ...]] = (
    (".lora_linear_layer.down.weight", "down", False),
    (".lora_linear_layer.up.weight", "up", False),
    (".lora.down.weight", "down", False),
    (".lora.up.weight", "up", False),
    ("_lora.down.weight", "down", True),
    ("_lora.up.weight", "up", True),
    (".lora_A.weight", "down", False),
    (".lora_B.weight", "up", False),
    (".alpha", "alpha", False),
)
_PROCESSOR_RENAMES: Final = {
    "to_q": "q_proj",
    "to_k": "k_proj",
    "to_v": "v_proj",
    "to_out": "out_proj",
}


def _processor_path(component: str, path: str) -> str:
    """Module path of an old attention-processor key (``attn1.processor.to_q``)."""
    parts = [part for part in path.split(".") if part != "processor"]
    leaf = parts[-1]
    if component == UNET:
        parts[-1:] = ["to_out", "0"] if leaf == "to_out" else [leaf]
    else:
        parts[-1] = _PROCESSOR_RENAMES.get(leaf, leaf)
    return ".".join(parts)


def split_module_key(component: str, rest: str) -> tuple[str, Role] | None:
    """(module path, role) of a diffusers-family key inside its component; None if not LoRA."""
    for suffix, role, processor in _SUFFIXES:
        if rest.endswith(suffix) and len(rest) > len(suffix):
            path = rest[: -len(suffix)]
            if processor:
                path = _processor_path(component, path)
            if component != UNET:
                path = strip_text_model(path)
            return path, role
    return None


def _claims(key: str) -> bool:
    return key.split(".", 1)[0] in COMPONENTS


def _group(keys: Iterable[str], unet_config: Mapping[str, Any] | None) -> KeyGroups:
    grouped = KeyGroups(format="diffusers")
    for key in keys:
        component, _, rest = key.partition(".")
        split = split_module_key(component, rest)
        if split is None:
            grouped.ignored.append(key)
            continue
        grouped.add(component, *split, key)
    return grouped


def to_diffusers(adapter: LoraAdapter, base_model: str | None = None) -> tuple[Tensors, Header]:
    """The canonical diffusers tensors and header for an adapter (loads with load_lora_weights)."""
    tensors: Tensors = {}
    by_component: dict[str, list] = {}
    for module in sorted(adapter.modules.values(), key=lambda m: m.name):
        path = with_text_model(module.component, module.path)
        tensors[f"{module.component}.{path}.lora_A.weight"] = module.down
        tensors[f"{module.component}.{path}.lora_B.weight"] = module.up
        by_component.setdefault(module.component, []).append(module)
    configs = [PeftComponentConfig.from_modules(c, m) for c, m in by_component.items()]
    metadata = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: configs_to_header(configs),
        "lorastack_format": "diffusers",
        **lorastack_metadata(adapter, base_model),
    }
    return tensors, metadata


FORMAT: Final = LoraFormat(
    name="diffusers", claims=_claims, group=_group, header_configs=True, write=to_diffusers
)
