"""Randomly initialised LoRA adapter files for tests and benchmarks.

Each file is made the way a trained adapter is: peft LoRA injected into the pipeline's UNet
(and optionally its text encoder) with ``add_adapter``, then written with
``StableDiffusionPipeline.save_lora_weights`` (alpha in the header metadata unless told not to).
The weights are random, with a non-zero ``lora_B``, so every adapter changes the output.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict


@dataclass(frozen=True)
class RandomLoraSpec:
    """The shape of a random adapter."""

    rank: int = 4
    alpha: float | None = None
    unet_targets: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0")
    text_encoder_targets: Sequence[str] = ()
    # Standard deviation of lora_B: large enough for a visible effect on a random tiny model.
    b_std: float = 0.5
    with_metadata: bool = True


class RandomLoraWriter:
    """Writes random diffusers-format LoRA files for one base pipeline."""

    def __init__(self, pipeline: Any) -> None:
        """``pipeline``: a loaded ``StableDiffusionPipeline`` (its UNet and text encoder)."""
        self._unet = pipeline.unet
        self._text_encoder = pipeline.text_encoder
        self._injected: dict[tuple[Any, ...], torch.nn.Module] = {}

    def _model(self, component: str, spec: RandomLoraSpec, targets: Sequence[str]) -> Any:
        key = (component, spec.rank, spec.alpha, tuple(targets))
        model = self._injected.get(key)
        if model is None:
            base = self._unet if component == "unet" else self._text_encoder
            model = copy.deepcopy(base)
            config = LoraConfig(
                r=spec.rank,
                lora_alpha=spec.alpha if spec.alpha is not None else spec.rank,  # type: ignore[arg-type]
                target_modules=list(targets),
            )
            with warnings.catch_warnings():
                # diffusers registers peft_config before peft injects, and peft warns about it.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                model.add_adapter(config)
            self._injected[key] = model
        return model

    def _randomise(self, model: Any, *, std_b: float, generator: torch.Generator) -> None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_A." in name:
                    fan_in = param[0].numel()
                    param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
                elif ".lora_B." in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * std_b)

    def write(self, out_file: Path, spec: RandomLoraSpec, *, seed: int) -> Path:
        """Write one adapter with random weights drawn from ``seed`` to ``out_file``."""
        generator = torch.Generator().manual_seed(seed)
        layers: dict[str, Any] = {}
        for component, targets in (
            ("unet", spec.unet_targets),
            ("text_encoder", spec.text_encoder_targets),
        ):
            if not targets:
                continue
            model = self._model(component, spec, targets)
            self._randomise(model, std_b=spec.b_std, generator=generator)
            layers[f"{component}_lora_layers"] = {
                k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()
            }
            if spec.with_metadata:
                layers[f"{component}_lora_adapter_metadata"] = model.peft_config[
                    "default"
                ].to_dict()
        out_file = Path(out_file)
        StableDiffusionPipeline.save_lora_weights(
            save_directory=out_file.parent, weight_name=out_file.name, **layers
        )
        return out_file
