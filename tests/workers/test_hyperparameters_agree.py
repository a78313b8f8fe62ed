"""The API's training schema and the trainer's config describe the same settings.

The API cannot import the engine (torch side), so each side keeps its own definition; this
test holds them together: same fields, same defaults, same target-module presets.
"""

from __future__ import annotations

import dataclasses
import typing

from service import job_params
from service.jobs.training_schemas import Hyperparameters, TargetPreset
from workers.engine.training.config import (
    DEFAULT_MAX_STEPS,
    LR_SCHEDULERS,
    MIXED_PRECISIONS,
    TARGET_MODULE_PRESETS,
    TrainConfig,
)

# Trainer settings the API does not expose (fixed at the trainer's defaults).
ENGINE_ONLY = {"validation_inference_steps", "weight_decay", "max_grad_norm"}


def test_fields_agree() -> None:
    api = set(Hyperparameters.model_fields)
    engine = {f.name for f in dataclasses.fields(TrainConfig)}
    assert api == engine - ENGINE_ONLY
    assert engine >= ENGINE_ONLY


def test_defaults_agree() -> None:
    resolved = Hyperparameters().resolved()
    engine = TrainConfig().to_dict()
    assert {k: engine[k] for k in resolved} == resolved
    assert resolved["max_steps"] == DEFAULT_MAX_STEPS


def test_a_resolved_request_is_a_valid_config() -> None:
    """What the API queues, the trainer accepts unchanged (and reads back the same)."""
    body = Hyperparameters(rank=8, target_modules="cross-attn-qkv", epochs=2, snr_gamma=5.0)
    config = TrainConfig.from_dict(body.resolved())
    assert {k: config.to_dict()[k] for k in body.resolved()} == body.resolved()


def test_presets_and_choices_agree() -> None:
    assert set(typing.get_args(TargetPreset)) == set(TARGET_MODULE_PRESETS)
    assert job_params.TARGET_MODULE_PRESETS == TARGET_MODULE_PRESETS
    assert job_params.DEFAULT_MAX_STEPS == DEFAULT_MAX_STEPS
    for name, suffixes in TARGET_MODULE_PRESETS.items():
        assert Hyperparameters(target_modules=name).unet_targets() == suffixes
    fields = Hyperparameters.model_fields
    assert set(typing.get_args(fields["lr_scheduler"].annotation)) == set(LR_SCHEDULERS)
    assert set(typing.get_args(fields["mixed_precision"].annotation)) == set(MIXED_PRECISIONS)
