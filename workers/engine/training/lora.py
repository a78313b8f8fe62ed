"""LoRA layers on the UNet and text encoder: injection, counting, saving and reloading.

Shared by the trainer, the checkpoints and the dry-run plan so that all three agree on which
modules get LoRA layers and on the file layout (diffusers format, read by
``StableDiffusionPipeline.load_lora_weights``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from workers.engine.training.config import TrainConfig
from workers.engine.training.errors import ConfigError

ADAPTER_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_NAME = "default"
UNET_PREFIX = "unet."
TEXT_ENCODER_PREFIX = "text_encoder."
_MAGNITUDE = "lora_magnitude_vector"

# Layer types peft's LoRA can wrap; a target suffix that names anything else (a whole attention
# block, a norm) is a configuration mistake we report by field name.
_LORA_LAYER_TYPES: tuple[type[torch.nn.Module], ...] = (
    torch.nn.Linear,
    torch.nn.Conv2d,
    torch.nn.Conv1d,
    torch.nn.Embedding,
)


@dataclass(frozen=True)
class TrainableParams:
    """Trainable (LoRA) parameter counts, the UNet and the text encoder apart."""

    unet: int
    text_encoder: int

    @property
    def total(self) -> int:
        return self.unet + self.text_encoder


def _matches(module_name: str, suffix: str) -> bool:
    # peft's own rule for a plain list of target names.
    return module_name == suffix or module_name.endswith("." + suffix)


def check_target_modules(
    model: torch.nn.Module, *, suffixes: tuple[str, ...], field: str, model_name: str
) -> None:
    """Raise `ConfigError(field)` unless every suffix names at least one LoRA-capable layer."""
    modules = dict(model.named_modules())
    for suffix in suffixes:
        matched = [name for name in modules if name and _matches(name, suffix)]
        if not matched:
            raise ConfigError(field, f"the {model_name} has no module named *{suffix!r}")
        wrong = [name for name in matched if not isinstance(modules[name], _LORA_LAYER_TYPES)]
        if wrong:
            kind = type(modules[wrong[0]]).__name__
            raise ConfigError(
                field,
                f"{suffix!r} matches {wrong[0]!r} of the {model_name}, a {kind}; LoRA wraps "
                "Linear, Conv and Embedding layers only",
            )


def unet_lora_config(config: TrainConfig) -> LoraConfig:
    """The peft LoraConfig of the UNet (gaussian init as in the diffusers recipe)."""
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # peft takes a float alpha
        init_lora_weights="gaussian",
        target_modules=list(config.unet_target_modules),
        use_dora=config.use_dora,
    )


def text_encoder_lora_config(config: TrainConfig) -> LoraConfig:
    """The peft LoraConfig of the CLIP text encoder."""
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # peft takes a float alpha
        init_lora_weights="gaussian",
        target_modules=list(config.text_encoder_target_modules),
        use_dora=config.use_dora,
    )


def inject_lora(
    *, unet: torch.nn.Module, text_encoder: torch.nn.Module | None, config: TrainConfig
) -> TrainableParams:
    """Freeze both models, add LoRA layers (text encoder only when trained), count the params."""
    unet.requires_grad_(False)
    check_target_modules(
        unet, suffixes=config.unet_target_modules, field="target_modules", model_name="UNet"
    )
    unet.add_adapter(unet_lora_config(config))  # type: ignore[operator]
    text_encoder_params = 0
    if text_encoder is not None:
        text_encoder.requires_grad_(False)
        if config.train_text_encoder:
            check_target_modules(
                text_encoder,
                suffixes=config.text_encoder_target_modules,
                field="text_encoder_target_modules",
                model_name="text encoder",
            )
            text_encoder.add_adapter(text_encoder_lora_config(config))  # type: ignore[operator]
            text_encoder_params = count_trainable(text_encoder)
    elif config.train_text_encoder:
        raise ConfigError("train_text_encoder", "the base model has no text encoder config")
    return TrainableParams(unet=count_trainable(unet), text_encoder=text_encoder_params)


def count_trainable(model: torch.nn.Module) -> int:
    """Number of parameters with requires_grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _adapter_metadata(model: torch.nn.Module) -> dict[str, Any]:
    # diffusers rebuilds the LoraConfig from this when loading, so alpha != rank (and DoRA)
    # load at the strength they were trained with.
    peft_config: Any = model.peft_config[ADAPTER_NAME]  # type: ignore[index]
    metadata: dict[str, Any] = peft_config.to_dict()
    return metadata


def lora_layers(
    *, unet: torch.nn.Module, text_encoder: torch.nn.Module | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The LoRA tensors of both models in diffusers naming (no base weights)."""
    # save_embedding_layers=False: LoRA tensors only (and no vocabulary probing on disk).
    unet_layers = convert_state_dict_to_diffusers(
        get_peft_model_state_dict(unet, save_embedding_layers=False)
    )
    text_layers = None
    if text_encoder is not None and getattr(text_encoder, "peft_config", None):
        text_layers = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(text_encoder, save_embedding_layers=False)
        )
    return unet_layers, text_layers


def save_adapter(
    directory: Path,
    *,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the diffusers-format LoRA file into ``directory``; return its path."""
    unet_layers, text_layers = lora_layers(unet=unet, text_encoder=text_encoder)
    unet_layers = {k: v.detach().to("cpu", dtype).contiguous() for k, v in unet_layers.items()}
    if text_layers is not None:
        # transformers 5 loads a text encoder's DoRA magnitude only under "<...>.weight" (what
        # diffusers 0.42 hands it unchanged); peft's state dict leaves the suffix off.
        text_layers = {
            (k + ".weight" if k.endswith(_MAGNITUDE) else k): v.detach()
            .to("cpu", dtype)
            .contiguous()
            for k, v in text_layers.items()
        }
    StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=unet_layers,
        text_encoder_lora_layers=text_layers,
        unet_lora_adapter_metadata=_adapter_metadata(unet),
        text_encoder_lora_adapter_metadata=(
            _adapter_metadata(text_encoder)
            if text_layers is not None and text_encoder is not None
            else None
        ),
        weight_name=ADAPTER_WEIGHT_NAME,
    )
    return directory / ADAPTER_WEIGHT_NAME


def load_adapter_into(
    path: Path, *, unet: torch.nn.Module, text_encoder: torch.nn.Module | None
) -> None:
    """Set the LoRA weights of models that already carry the same adapter from ``path``."""
    state = load_file(str(path))
    unet_state = {
        k.removeprefix(UNET_PREFIX): v for k, v in state.items() if k.startswith(UNET_PREFIX)
    }
    _set_exactly(unet, convert_unet_state_dict_to_peft(unet_state))
    text_state = {
        k.removeprefix(TEXT_ENCODER_PREFIX): v
        for k, v in state.items()
        if k.startswith(TEXT_ENCODER_PREFIX)
    }
    if text_state:
        text_state = {_peft_magnitude_key(k): v for k, v in text_state.items()}
        if text_encoder is None:
            raise ValueError(f"{path} holds text encoder LoRA layers but none is being trained")
        _set_exactly(text_encoder, convert_state_dict_to_peft(text_state))


def _peft_magnitude_key(key: str) -> str:
    if key.endswith(_MAGNITUDE + ".weight"):
        return key.removesuffix(".weight")
    return key


def _set_exactly(model: torch.nn.Module, peft_state: dict[str, torch.Tensor]) -> None:
    result: Any = set_peft_model_state_dict(model, peft_state, adapter_name=ADAPTER_NAME)
    missing = [k for k in result.missing_keys if "lora_" in k]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(
            f"LoRA weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
