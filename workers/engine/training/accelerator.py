"""The accelerate setup of one training run, and out-of-memory errors that say what to lower."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from workers.engine.training.config import TrainConfig
from workers.engine.training.errors import ConfigError, TrainingOutOfMemory


def make_accelerator(config: TrainConfig, device: str | None) -> Accelerator:
    """An Accelerator for ``device`` (None: CUDA when available, else the CPU)."""
    device_type = check_device(config, device)
    if device and device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(device))
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps its state in process-wide singletons; a long-lived worker runs jobs
        # with different precisions and devices one after another, so each starts afresh.
        # (Under `accelerate launch` on several processes the launcher's state must stay.)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=device_type == "cpu",
    )


def check_device(config: TrainConfig, device: str | None) -> str:
    """The device type the run will use; precision it does not support is a ConfigError."""
    if device is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device_type = torch.device(device).type
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "CUDA was asked for but is not available")
    if config.mixed_precision == "fp16" and device_type not in ("cuda", "mps", "xpu", "npu"):
        raise ConfigError("mixed_precision", f"fp16 needs a GPU; this run is on {device_type}")
    if (
        config.mixed_precision == "bf16"
        and device_type == "cuda"
        and not torch.cuda.is_bf16_supported()
    ):
        raise ConfigError("mixed_precision", "this GPU does not support bf16; use fp16")
    return device_type


def out_of_memory(exc: BaseException, config: TrainConfig) -> TrainingOutOfMemory:
    """The TrainingOutOfMemory for ``exc``, with hints on which settings to lower."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    hints = []
    if config.batch_size > 1:
        hints.append(
            f"lower batch_size (now {config.batch_size}; raise gradient_accumulation_steps "
            "to keep the effective batch)"
        )
    if not config.gradient_checkpointing:
        hints.append("enable gradient_checkpointing")
    if config.mixed_precision == "no":
        hints.append("use mixed_precision fp16 or bf16")
    hints.append(f"lower resolution (now {config.resolution})")
    if not config.cache_latents:
        hints.append("enable cache_latents")
    return TrainingOutOfMemory(f"the device ran out of memory: {exc}", "; ".join(hints))
