"""LoRA training for Stable Diffusion 1.x: config, trainer, checkpoints and dry-run plans."""

from workers.engine.training.callbacks import (
    CheckpointInfo,
    NullCallbacks,
    StepProgress,
    TrainingCallbacks,
    ValidationImage,
)
from workers.engine.training.config import TARGET_MODULE_PRESETS, TrainConfig
from workers.engine.training.data import TrainItem
from workers.engine.training.errors import (
    ConfigError,
    TrainingCancelled,
    TrainingDataError,
    TrainingError,
    TrainingOutOfMemory,
)
from workers.engine.training.lora import ADAPTER_WEIGHT_NAME, TrainableParams
from workers.engine.training.trainer import TrainResult, train_lora

__all__ = [
    "ADAPTER_WEIGHT_NAME",
    "TARGET_MODULE_PRESETS",
    "CheckpointInfo",
    "ConfigError",
    "NullCallbacks",
    "StepProgress",
    "TrainConfig",
    "TrainItem",
    "TrainResult",
    "TrainableParams",
    "TrainingCallbacks",
    "TrainingCancelled",
    "TrainingDataError",
    "TrainingError",
    "TrainingOutOfMemory",
    "ValidationImage",
    "train_lora",
]
