"""Which device a worker trains and generates on, and what precision it supports."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceInfo:
    device: str  # "cuda" or "cpu"
    name: str
    mixed_precision: tuple[str, ...]  # modes accepted for training on this device
    memory_bytes: int  # the device's memory: the GPU's, or the host's RAM on a CPU


def detect_device() -> DeviceInfo:
    if torch.cuda.is_available():
        modes = ["no", "fp16"]
        if torch.cuda.is_bf16_supported():
            modes.append("bf16")
        memory = torch.cuda.get_device_properties(0).total_memory
        return DeviceInfo("cuda", torch.cuda.get_device_name(0), tuple(modes), memory)
    # accelerate refuses fp16 mixed precision on a CPU; bf16 autocast works there.
    return DeviceInfo("cpu", "cpu", ("no", "bf16"), host_memory_bytes())


def host_memory_bytes() -> int:
    """Physical RAM of this host."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
