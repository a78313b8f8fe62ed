"""Typed parameters of each job kind: written by the API when it creates a job, read back by
the worker that runs it and by the routes that answer about it.

A job row stores them as JSON (``job.params``); these models are the only code that knows that
JSON's shape. The shape that lets generation jobs share a pipeline call is defined here, once:
``batch_key`` (the limits on a batch's images and adapters are the worker's, in ``dispatch``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The trainer's UNet target-module presets and default length, repeated here because the API
# never imports the engine; tests/workers/test_hyperparameters_agree.py holds them equal.
TARGET_MODULE_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "cross-attn-qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}
DEFAULT_MAX_STEPS = 1000


def unet_targets(target_modules: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """UNet module-name suffixes of a ``target_modules`` setting (a preset name or a list)."""
    if isinstance(target_modules, str):
        return TARGET_MODULE_PRESETS[target_modules]
    return tuple(target_modules)


class TrainParams(_Params):
    """A training job: every hyperparameter resolved, the dataset's content hash, and the
    evaluation asked for (``service/jobs/training_schemas.py: Evaluation``, defaults filled)."""

    hyperparameters: dict[str, Any]
    dataset_sha256: str | None = None
    evaluation: dict[str, Any] | None = None
    publish: str = "final"  # "final" or "best" (the best checkpoint by evaluation.select)
    # The peak memory of the plan the API admitted the run by; None when it could not plan
    # (then the worker plans the run itself before it trains).
    planned_peak_memory_bytes: int | None = None

    @property
    def rank(self) -> int | None:
        rank = self.hyperparameters.get("rank")
        return int(rank) if rank is not None else None

    @property
    def alpha(self) -> float | None:
        """The LoRA alpha in use: the rank when unset (scale 1)."""
        alpha = self.hyperparameters.get("alpha") or self.rank
        return float(alpha) if alpha is not None else None

    @property
    def unet_targets(self) -> list[str]:
        try:
            return list(unet_targets(self.hyperparameters.get("target_modules", "attn")))
        except (KeyError, TypeError):
            return []


class GenerationSpec(_Params):
    """What to render: the request with its defaults (size, seed) resolved."""

    prompt: str
    negative_prompt: str | None
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    seed: int
    num_images: int
    scheduler: str


class AdapterUse(_Params):
    """One adapter of a generation, resolved to the version (and file) it names now; for a
    checkpoint ref, to the training checkpoint (``version`` None, ``version_id`` standing for
    ``<job id>@ckpt:<step>``)."""

    ref: str
    name: str
    version: int | None
    version_id: str
    storage_key: str
    sha256: str
    weight: float
    job_id: str | None = None
    checkpoint_step: int | None = None


# The settings that make two generations share one pipeline call. Adapters are not among them:
# a batch mixes adapters, each image with its own (the worker bounds the union of a batch's
# adapters by its slot count when it leases the batch).
BATCH_SHAPE_FIELDS = ("num_inference_steps", "guidance_scale", "width", "height", "scheduler")
# Part of the key, so that keys of the earlier format (which hashed the adapters too) never
# equal a new one: jobs queued before an upgrade still batch among themselves, never wrongly.
_BATCH_KEY_FORMAT = "shape-v2"


def batch_key(base_model: str, spec: GenerationSpec) -> str:
    """Equal keys <=> the jobs can be denoised together: same base model and same shape."""
    shape = {name: getattr(spec, name) for name in BATCH_SHAPE_FIELDS}
    material = [_BATCH_KEY_FORMAT, base_model, shape]
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


class GenerateParams(_Params):
    """A generation job: the spec, its adapters, and the key of the batches it may join."""

    request: GenerationSpec
    adapters: list[AdapterUse]
    batch_key: str

    @classmethod
    def build(
        cls, *, base_model: str, request: GenerationSpec, adapters: list[AdapterUse]
    ) -> GenerateParams:
        return cls(
            request=request,
            adapters=adapters,
            batch_key=batch_key(base_model, request),
        )

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @property
    def adapter_files(self) -> frozenset[str]:
        """The adapter files the job needs in slots (equal files share one)."""
        return frozenset(a.storage_key for a in self.adapters)


class GridCell(_Params):
    """One cell of a grid: what it renders."""

    prompt: str
    seed: int
    adapters: list[AdapterUse]


class GridParams(_Params):
    """A grid job: the settings every cell shares, the axis labels and the cells (rows of
    columns), each resolved to the adapter versions it names now."""

    negative_prompt: str | None
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str
    x_axis: str
    y_axis: str | None
    columns: list[str]
    rows: list[str]
    cells: list[list[GridCell]]

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
