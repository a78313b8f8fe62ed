"""Reading diffusers-format LoRA safetensors files into plain tensors.

The files are what ``StableDiffusionPipeline.save_lora_weights`` writes after peft training:
keys ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight`` for the components ``unet``
and ``text_encoder``. Alpha comes from the header metadata diffusers writes under
``lora_adapter_metadata`` (flattened keys such as ``unet.lora_alpha``, ``unet.alpha_pattern``);
without metadata alpha defaults to the rank of each module (a scale of 1.0), which is what
diffusers' ``load_lora_weights`` assumes too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft.utils.other import get_pattern_key
from safetensors import safe_open

COMPONENTS: tuple[str, ...] = ("unet", "text_encoder")
# The header key diffusers (loaders/lora_base.py LORA_ADAPTER_METADATA_KEY) stores the peft
# LoraConfig of each component under, flattened as "<component>.<field>".
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
_WEIGHT_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}


class AdapterFormatError(ValueError):
    """The file is not a LoRA adapter this engine can serve."""


@dataclass(frozen=True)
class LoraModuleWeights:
    """One targeted module: its LoRA matrices and the scale peft would give them."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    rank: int
    alpha: float
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        """The factor peft multiplies ``B @ A`` by at adapter weight 1.0."""
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank


@dataclass(frozen=True)
class LoraAdapterWeights:
    """A whole adapter in CPU memory, keyed by (component, module name)."""

    modules: Mapping[tuple[str, str], LoraModuleWeights]
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes held by the adapter's tensors."""
        return sum(
            m.lora_A.numel() * m.lora_A.element_size() + m.lora_B.numel() * m.lora_B.element_size()
            for m in self.modules.values()
        )

    @property
    def max_rank(self) -> int:
        """The largest rank over the targeted modules."""
        return max((m.lora_A.shape[0] for m in self.modules.values()), default=0)

    def target_modules(self, component: str) -> list[str]:
        """Names of the modules of ``component`` this adapter targets."""
        return sorted(name for comp, name in self.modules if comp == component)


@dataclass(frozen=True)
class _ComponentConfig:
    r: int | None
    lora_alpha: float | None
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    use_rslora: bool

    def rank_for(self, module_name: str, tensor_rank: int) -> int:
        key = get_pattern_key(list(self.rank_pattern), module_name)
        rank = self.rank_pattern.get(key, self.r)
        return tensor_rank if rank is None else int(rank)

    def alpha_for(self, module_name: str, rank: int) -> float:
        key = get_pattern_key(list(self.alpha_pattern), module_name)
        alpha = self.alpha_pattern.get(key, self.lora_alpha)
        return float(rank) if alpha is None else float(alpha)


def _component_configs(raw_metadata: Mapping[str, str] | None) -> dict[str, _ComponentConfig]:
    packed = (raw_metadata or {}).get(LORA_ADAPTER_METADATA_KEY)
    if not packed:
        return {}
    try:
        flat: dict[str, Any] = json.loads(packed)
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"unreadable {LORA_ADAPTER_METADATA_KEY}: {exc}") from exc
    configs: dict[str, _ComponentConfig] = {}
    for component in COMPONENTS:
        prefix = f"{component}."
        fields = {k.removeprefix(prefix): v for k, v in flat.items() if k.startswith(prefix)}
        if not fields:
            continue
        if fields.get("use_dora"):
            raise AdapterFormatError(f"{component}: DoRA adapters are not supported")
        if fields.get("lora_bias"):
            raise AdapterFormatError(f"{component}: LoRA bias terms are not supported")
        configs[component] = _ComponentConfig(
            r=fields.get("r"),
            lora_alpha=fields.get("lora_alpha"),
            rank_pattern=fields.get("rank_pattern") or {},
            alpha_pattern=fields.get("alpha_pattern") or {},
            use_rslora=bool(fields.get("use_rslora", False)),
        )
    return configs


def parse_lora_state_dict(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> LoraAdapterWeights:
    """Group a diffusers LoRA state dict by module and resolve each module's rank and alpha."""
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        component, _, rest = key.partition(".")
        if component not in COMPONENTS:
            raise AdapterFormatError(
                f"unsupported key {key!r}: expected a unet. or text_encoder. key"
            )
        for suffix, which in _WEIGHT_SUFFIXES.items():
            if rest.endswith(suffix):
                pairs.setdefault((component, rest.removesuffix(suffix)), {})[which] = tensor
                break
        else:
            raise AdapterFormatError(
                f"unsupported key {key!r}: expected peft lora_A/lora_B weights"
            )
    if not pairs:
        raise AdapterFormatError("the file holds no LoRA weights")

    configs = _component_configs(metadata)
    modules: dict[tuple[str, str], LoraModuleWeights] = {}
    for (component, name), pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterFormatError(f"{component}.{name}: lora_A and lora_B must both be present")
        lora_A, lora_B = pair["A"], pair["B"]
        tensor_rank = lora_A.shape[0]
        if lora_B.shape[1] != tensor_rank:
            raise AdapterFormatError(f"{component}.{name}: lora_A and lora_B ranks differ")
        config = configs.get(component)
        if config is None:
            rank, alpha, rslora = tensor_rank, float(tensor_rank), False
        else:
            rank = config.rank_for(name, tensor_rank)
            alpha, rslora = config.alpha_for(name, rank), config.use_rslora
        if rank != tensor_rank:
            raise AdapterFormatError(
                f"{component}.{name}: metadata says rank {rank}, the weights have {tensor_rank}"
            )
        modules[(component, name)] = LoraModuleWeights(
            lora_A=lora_A, lora_B=lora_B, rank=rank, alpha=alpha, use_rslora=rslora
        )
    parsed_metadata = dict(metadata or {})
    return LoraAdapterWeights(modules=modules, metadata=parsed_metadata)


def load_lora_file(path: Path) -> LoraAdapterWeights:
    """Read a diffusers LoRA ``.safetensors`` file into CPU memory."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata()
        state_dict = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    return parse_lora_state_dict(state_dict, metadata)
