"""The settings of one text-classifier training run, validated on construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from workers.engine.training.errors import ConfigError

TextMethod = Literal["lora", "full"]
TEXT_METHODS: tuple[TextMethod, ...] = ("lora", "full")
LR_SCHEDULES = ("constant", "linear", "cosine")

# Settings that change the trained weights' shapes or meaning: a resume must not change them.
RESUME_FIXED_FIELDS = ("method", "rank", "alpha", "target_modules", "seed", "validation_split")


@dataclass(frozen=True)
class TextTrainConfig:
    """Hyperparameters of `train_text_classifier`; ``max_steps`` wins over ``epochs``."""

    method: TextMethod = "lora"
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None  # None: the architecture's defaults
    learning_rate: float = 1e-3
    lr_schedule: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_length: int = 64
    seed: int = 0
    validation_split: float = 0.2
    eval_every: int | None = None  # steps; None: only at the end
    checkpoint_every: int | None = None
    checkpoints_keep: int = 2
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if self.method not in TEXT_METHODS:
            raise ConfigError("method", f"must be one of {', '.join(TEXT_METHODS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError("lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}")
        positive = {
            "rank": self.rank,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "max_length": self.max_length,
            "checkpoints_keep": self.checkpoints_keep,
        }
        for field, value in positive.items():
            if value < 1:
                raise ConfigError(field, "must be at least 1")
        for field, maybe in (
            ("max_steps", self.max_steps),
            ("eval_every", self.eval_every),
            ("checkpoint_every", self.checkpoint_every),
        ):
            if maybe is not None and maybe < 1:
                raise ConfigError(field, "must be at least 1 when set")
        if not self.learning_rate > 0:
            raise ConfigError("learning_rate", "must be positive")
        if not 0 <= self.dropout < 1:
            raise ConfigError("dropout", "must be in [0, 1)")
        if not 0 <= self.validation_split < 1:
            raise ConfigError("validation_split", "must be in [0, 1)")

    def total_steps(self, num_train_items: int) -> int:
        """Optimizer steps of the whole run."""
        if self.max_steps is not None:
            return self.max_steps
        batches = math.ceil(num_train_items / self.batch_size)
        return max(1, math.ceil(self.epochs * batches / self.gradient_accumulation_steps))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.target_modules is not None:
            data["target_modules"] = list(self.target_modules)
        return data
