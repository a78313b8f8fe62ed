"""LoRA files as the engine holds them: ``lorafile`` parses, this module makes torch tensors.

Ranks, alphas and formats are decided by ``lorafile`` (its one rank/alpha rule), exactly as
the service decided them when it stored the file; the engine parses nothing itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafile import STORED_LIMITS, LoraAdapter, read_adapter


class AdapterFormatError(ValueError):
    """The adapter does not fit what this engine serves (its slot pool's modules or rank)."""


@dataclass(frozen=True)
class LoraModuleWeights:
    """One targeted module: its LoRA matrices and the scale ``lorafile`` gave them."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    rank: int
    alpha: float

    @property
    def scaling(self) -> float:
        """The factor peft multiplies ``B @ A`` by at adapter weight 1.0."""
        return self.alpha / self.rank


@dataclass(frozen=True)
class LoraAdapterWeights:
    """A whole adapter in CPU memory, keyed by (component, module path)."""

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


def to_torch(adapter: LoraAdapter) -> LoraAdapterWeights:
    """The parsed adapter's matrices as CPU tensors (sharing the arrays' memory)."""
    modules = {
        (module.component, module.path): LoraModuleWeights(
            lora_A=torch.from_numpy(module.down),
            lora_B=torch.from_numpy(module.up),
            rank=module.rank,
            alpha=module.alpha,
        )
        for module in adapter.modules.values()
    }
    return LoraAdapterWeights(modules=modules, metadata=dict(adapter.metadata))


def load_lora_file(path: Path) -> LoraAdapterWeights:
    """Read a LoRA ``.safetensors`` file into CPU memory (``lorafile.AdapterFileError`` if bad)."""
    return to_torch(read_adapter(Path(path), limits=STORED_LIMITS))
