"""Per-architecture LoRA defaults for sequence classifiers: one table entry per model type."""

from __future__ import annotations

from dataclasses import dataclass

from workers.engine.training.errors import ConfigError


@dataclass(frozen=True)
class TextArchitecture:
    """Where LoRA goes in an encoder, and which head modules train in full beside it."""

    lora_targets: tuple[str, ...]
    head_modules: tuple[str, ...]


ARCHITECTURES: dict[str, TextArchitecture] = {
    "distilbert": TextArchitecture(
        lora_targets=("q_lin", "v_lin"), head_modules=("pre_classifier", "classifier")
    ),
    # BERT and its small relatives (MiniLM checkpoints are BertModel with fewer layers).
    "bert": TextArchitecture(lora_targets=("query", "value"), head_modules=("classifier",)),
    "roberta": TextArchitecture(lora_targets=("query", "value"), head_modules=("classifier",)),
}


def architecture_for(model_type: str) -> TextArchitecture:
    """The table entry of ``model_type`` (a transformers config's ``model_type``)."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        message = f"no LoRA defaults for {model_type!r}; known: {known}"
        raise ConfigError("model_dir", message) from None
