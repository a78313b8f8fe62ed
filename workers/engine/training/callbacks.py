"""How the trainer reports progress and learns that it should stop.

The trainer knows nothing of jobs or databases: a worker passes an object with these methods
and turns the reports into rows and events.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

from PIL import Image


@dataclass(frozen=True)
class StepProgress:
    """Figures after one optimizer step (``step`` counts from 1 across resumes)."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    smoothed_loss: float  # bias-corrected exponential moving average of ``loss``
    lr: float
    samples_per_s: float
    eta_s: float


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint that has just been written."""

    step: int
    path: Path
    loss: float


class ValidationImage(NamedTuple):
    """One validation prompt rendered without and with the LoRA, from the same seed."""

    prompt: str
    seed: int
    base_image: Image.Image
    lora_image: Image.Image


class TrainingCallbacks(Protocol):
    """What the trainer calls (on the main process only; should_stop on every process)."""

    def on_step(self, progress: StepProgress) -> None: ...

    def on_checkpoint(self, checkpoint: CheckpointInfo) -> None: ...

    def on_validation(self, step: int, images: list[ValidationImage]) -> None: ...

    def on_resumed(self, step: int) -> None: ...

    def should_stop(self) -> bool: ...


class NullCallbacks:
    """Callbacks that do nothing; subclass it and override what you need."""

    def on_step(self, progress: StepProgress) -> None:
        """Called after every optimizer step."""

    def on_checkpoint(self, checkpoint: CheckpointInfo) -> None:
        """Called after a checkpoint is complete on disk."""

    def on_validation(self, step: int, images: list[ValidationImage]) -> None:
        """Called with the validation images of a step."""

    def on_resumed(self, step: int) -> None:
        """Called once when training continues from the checkpoint of ``step``."""

    def should_stop(self) -> bool:
        """Checked before every step; True ends training with `TrainingCancelled`."""
        return False
