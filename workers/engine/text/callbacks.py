"""How the text trainer reports progress and evaluations and learns that it should stop.

The same shape as the image trainer's callbacks (`on_step` with `StepProgress`, `on_checkpoint`,
`on_resumed`, `should_stop`), with `on_evaluation` in place of validation images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from workers.engine.training.callbacks import CheckpointInfo, StepProgress


@dataclass(frozen=True)
class EvalMetrics:
    """Validation figures at ``step``; ``f1`` is the macro F1 over the labels."""

    step: int
    accuracy: float
    f1: float
    loss: float
    count: int


class TextTrainingCallbacks(Protocol):
    """What `train_text_classifier` calls (should_stop before every step)."""

    def on_step(self, progress: StepProgress) -> None: ...

    def on_checkpoint(self, checkpoint: CheckpointInfo) -> None: ...

    def on_evaluation(self, metrics: EvalMetrics) -> None: ...

    def on_resumed(self, step: int) -> None: ...

    def should_stop(self) -> bool: ...


class NullTextCallbacks:
    """Callbacks that do nothing; subclass it and override what you need."""

    def on_step(self, progress: StepProgress) -> None:
        """Called after every optimizer step."""

    def on_checkpoint(self, checkpoint: CheckpointInfo) -> None:
        """Called after a checkpoint is complete on disk."""

    def on_evaluation(self, metrics: EvalMetrics) -> None:
        """Called after each evaluation on the validation split."""

    def on_resumed(self, step: int) -> None:
        """Called once when training continues from the checkpoint of ``step``."""

    def should_stop(self) -> bool:
        """Checked before every step; True ends training with `TrainingCancelled`."""
        return False
