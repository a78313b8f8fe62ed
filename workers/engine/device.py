"""Which device a worker trains and generates on, and what precision it supports."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceInfo:
    device: str  # "cuda" or "cpu"
    name: str
    mixed_precision: tuple[str, ...]  # modes accepted for training on this device


def detect_device() -> DeviceInfo:
    if torch.cuda.is_available():
        modes = ["no", "fp16"]
        if torch.cuda.is_bf16_supported():
            modes.append("bf16")
        return DeviceInfo("cuda", torch.cuda.get_device_name(0), tuple(modes))
    # accelerate refuses fp16 mixed precision on a CPU; bf16 autocast works there.
    return DeviceInfo("cpu", "cpu", ("no", "bf16"))
