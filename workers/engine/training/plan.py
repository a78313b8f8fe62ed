"""Dry-run plans: exact LoRA sizes and rough memory and time estimates, without weights.

The UNet, text encoder and VAE are built on the meta device from their config.json only, the
LoRA layers are injected exactly as the trainer does, and one forward pass on meta tensors
counts FLOPs (torch's FlopCounterMode) and the bytes autograd keeps for the backward pass.

Heuristics, stated so that their figures can be judged:

- Memory peak = frozen weights (in the compute dtype) + LoRA weights, grads and AdamW moments
  (fp32: 16 bytes per trainable parameter) + activations kept for backward, measured on the meta
  pass in fp32 and scaled by the compute dtype's size (an upper bound: views are counted as
  copies) + the larger of nothing and the VAE encoder's transient peak (three feature maps of
  its widest first block at full resolution, only when latents are not cached) + a fixed 1 GiB
  for the CUDA context, allocator slack and cuDNN workspaces. With gradient checkpointing the
  activations are those saved outside checkpointed blocks plus one block's share.
- Time per step = FLOPs / assumed throughput. FLOPs: UNet forward x (2, or 3 with gradient
  checkpointing: forward, input-gradient backward, recompute; weight gradients of the frozen
  base are not computed), text encoder forward (x3 when trained), VAE encoder forward unless
  latents are cached; times samples per step. Assumed throughput, unless given: an A100-class
  GPU sustaining 40% of its dense peak: 125 TFLOP/s in fp16/bf16, 7.8 TFLOP/s in fp32.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

from workers.engine.training.config import TrainConfig
from workers.engine.training.errors import ConfigError
from workers.engine.training.lora import TrainableParams, inject_lora, save_adapter

ASSUMED_TFLOPS = {"no": 7.8, "fp16": 125.0, "bf16": 125.0}
FIXED_OVERHEAD_BYTES = 1 << 30
_TRAINABLE_STATE_BYTES_PER_PARAM = 16  # fp32 weight + grad + AdamW exp_avg + exp_avg_sq
_DTYPE_BYTES = {"no": 4, "fp16": 2, "bf16": 2}
_TOKENS = 77


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak device memory of training, in bytes, by part."""

    frozen_weights: int
    trainable_state: int
    activations: int
    vae_transient: int
    overhead: int

    @property
    def total(self) -> int:
        return (
            self.frozen_weights
            + self.trainable_state
            + max(self.activations, self.vae_transient)
            + self.overhead
        )


@dataclass(frozen=True)
class TrainingPlan:
    """What a training run would train, write and roughly cost."""

    trainable_params: TrainableParams
    adapter_bytes: int  # exact size of the fp32 diffusers-format safetensors file
    total_steps: int | None  # None when epochs are set and the item count is unknown
    memory: MemoryEstimate
    flops_per_step: float
    assumed_tflops: float
    seconds_per_step: float

    @property
    def estimated_duration_s(self) -> float | None:
        return None if self.total_steps is None else self.total_steps * self.seconds_per_step


def _read_configs(source: Path | Mapping[str, Any]) -> dict[str, dict[str, Any] | None]:
    """Component configs from a pipeline folder, a UNet config.json or a mapping."""
    if isinstance(source, Mapping):
        if "unet" in source:
            return {name: source.get(name) for name in ("unet", "text_encoder", "vae")}
        return {"unet": dict(source), "text_encoder": None, "vae": None}
    path = Path(source)
    if path.is_file():
        return {"unet": json.loads(path.read_text()), "text_encoder": None, "vae": None}
    configs: dict[str, dict[str, Any] | None] = {}
    for name in ("unet", "text_encoder", "vae"):
        config_path = path / name / "config.json"
        configs[name] = json.loads(config_path.read_text()) if config_path.is_file() else None
    if configs["unet"] is None:
        raise ConfigError("pipeline_dir", f"{path} has no unet/config.json")
    return configs


def _public(config: Mapping[str, Any]) -> dict[str, Any]:
    # config.json carries bookkeeping keys ("_class_name", "_diffusers_version").
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _materialise_lora(model: torch.nn.Module) -> None:
    # Only the small LoRA layers get real (uninitialised) CPU memory, to be serialised.
    for name, module in model.named_modules():
        if ".lora_" in f".{name}" and any(True for _ in module.parameters(recurse=False)):
            module.to_empty(device="cpu", recurse=False)


def _meta_pass(model: torch.nn.Module, inputs: tuple[Any, ...], *, train: bool) -> tuple[int, int]:
    """(FLOPs, bytes saved for backward) of one forward pass on meta tensors."""
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    model.train(train)
    with (
        FlopCounterMode(display=False) as counter,
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.set_grad_enabled(train),
    ):
        model(*inputs)
    return int(counter.get_total_flops()), saved


def plan_training(
    *,
    pipeline_dir_or_config: Path | Mapping[str, Any],
    config: TrainConfig,
    num_items: int | None = None,
    assumed_tflops: float | None = None,
) -> TrainingPlan:
    """Plan a run from model configs alone; bad target modules raise `ConfigError`.

    ``pipeline_dir_or_config``: a diffusers pipeline folder (unet/, text_encoder/, vae/
    config.json files; weights are not read), a UNet config.json, or a mapping, either a UNet
    config or ``{"unet": ..., "text_encoder": ..., "vae": ...}``.
    """
    models = _meta_models(_read_configs(pipeline_dir_or_config), config)
    unet_flops, unet_activations = _unet_cost(models.unet, config)
    te_flops, te_activations = _text_encoder_cost(models.text_encoder, config)
    vae_flops, vae_transient = _vae_cost(models.vae, config)
    memory = _memory_estimate(
        models,
        config,
        activations=unet_activations + te_activations,
        vae_transient=vae_transient,
    )
    tflops = assumed_tflops or ASSUMED_TFLOPS[config.mixed_precision]
    samples = config.batch_size * config.gradient_accumulation_steps
    step_flops = float((unet_flops + te_flops + vae_flops) * samples)
    total_steps = (
        config.total_steps(num_items=num_items or 0)
        if num_items is not None or config.max_steps is not None
        else None
    )
    return TrainingPlan(
        trainable_params=models.trainable,
        adapter_bytes=_adapter_bytes(models, config),
        total_steps=total_steps,
        memory=memory,
        flops_per_step=step_flops,
        assumed_tflops=tflops,
        seconds_per_step=step_flops / (tflops * 1e12),
    )


@dataclass(frozen=True)
class _MetaModels:
    # diffusers' models are untyped for mypy; Any keeps the attribute access honest at runtime.
    unet: Any
    text_encoder: CLIPTextModel | None
    vae: Any
    trainable: TrainableParams


def _meta_models(configs: dict[str, dict[str, Any] | None], config: TrainConfig) -> _MetaModels:
    """The models on the meta device, with LoRA injected as the trainer does."""
    unet_config = configs["unet"]
    assert unet_config is not None
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(_public(unet_config))
        text_encoder = (
            CLIPTextModel(CLIPTextConfig(**_public(configs["text_encoder"])))
            if configs["text_encoder"] is not None
            else None
        )
        vae = AutoencoderKL.from_config(_public(configs["vae"])) if configs["vae"] else None
        trainable = inject_lora(unet=unet, text_encoder=text_encoder, config=config)
    return _MetaModels(unet=unet, text_encoder=text_encoder, vae=vae, trainable=trainable)


def _unet_cost(unet: Any, config: TrainConfig) -> tuple[int, int]:
    """(FLOPs per sample and step, fp32 bytes of activations kept for backward)."""
    latent_size = config.resolution // 8
    unet_inputs = (
        torch.empty(1, unet.config.in_channels, latent_size, latent_size, device="meta"),
        torch.zeros(1, dtype=torch.long, device="meta"),
        torch.empty(1, _TOKENS, unet.config.cross_attention_dim, device="meta"),
    )
    flops, saved = _meta_pass(unet, unet_inputs, train=True)
    activations = saved
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        _, outside = _meta_pass(unet, unet_inputs, train=True)
        blocks = len(unet.down_blocks) + len(unet.up_blocks) + 1
        activations = outside + saved // blocks
    return flops * (3 if config.gradient_checkpointing else 2), activations


def _text_encoder_cost(text_encoder: CLIPTextModel | None, config: TrainConfig) -> tuple[int, int]:
    """(FLOPs per sample and step, fp32 bytes kept for backward when it is trained)."""
    if text_encoder is None:
        return 0, 0
    ids = torch.zeros(1, _TOKENS, dtype=torch.long, device="meta")
    flops, saved = _meta_pass(text_encoder, (ids,), train=config.train_text_encoder)
    if config.train_text_encoder:
        return flops * 3, saved
    return flops, 0


def _vae_cost(vae: Any, config: TrainConfig) -> tuple[int, int]:
    """(FLOPs per sample of encoding, bytes of the encoder's transient peak); 0 when cached."""
    if vae is None or config.cache_latents:
        return 0, 0
    pixels = torch.empty(1, 3, config.resolution, config.resolution, device="meta")
    flops, _ = _meta_pass(vae.encoder, (pixels,), train=False)
    widest = vae.config.block_out_channels[0]
    dtype_bytes = _DTYPE_BYTES[config.mixed_precision]
    return flops, 3 * config.batch_size * widest * config.resolution**2 * dtype_bytes


def _memory_estimate(
    models: _MetaModels, config: TrainConfig, *, activations: int, vae_transient: int
) -> MemoryEstimate:
    """The peak memory heuristic of the module docstring, part by part."""
    dtype_bytes = _DTYPE_BYTES[config.mixed_precision]
    base_params = sum(p.numel() for p in models.unet.parameters())
    if models.text_encoder is not None:
        base_params += sum(p.numel() for p in models.text_encoder.parameters())
    vae_params = sum(p.numel() for p in models.vae.parameters()) if models.vae is not None else 0
    trainable = models.trainable.total
    return MemoryEstimate(
        frozen_weights=(base_params - trainable + vae_params) * dtype_bytes,
        trainable_state=trainable * _TRAINABLE_STATE_BYTES_PER_PARAM,
        activations=activations * config.batch_size * dtype_bytes // 4,
        vae_transient=vae_transient,
        overhead=FIXED_OVERHEAD_BYTES,
    )


def _adapter_bytes(models: _MetaModels, config: TrainConfig) -> int:
    """The exact size of the adapter file, written from uninitialised LoRA weights."""
    text_encoder = models.text_encoder if config.train_text_encoder else None
    _materialise_lora(models.unet)
    if text_encoder is not None:
        _materialise_lora(text_encoder)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = save_adapter(Path(tmp), unet=models.unet, text_encoder=text_encoder)
        return adapter.stat().st_size
