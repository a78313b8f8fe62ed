"""Noise schedulers by name, built from the base pipeline's scheduler config (no reload)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.utils import is_scipy_available


@dataclass(frozen=True)
class SchedulerSpec:
    """A diffusers scheduler class and the config overrides that make the named variant."""

    cls: Any
    overrides: Mapping[str, Any] = field(default_factory=dict)
    needs_scipy: bool = False


SCHEDULERS: Mapping[str, SchedulerSpec] = {
    "pndm": SchedulerSpec(PNDMScheduler),
    "ddim": SchedulerSpec(DDIMScheduler),
    "euler": SchedulerSpec(EulerDiscreteScheduler),
    "euler_a": SchedulerSpec(EulerAncestralDiscreteScheduler),
    "dpm++_2m": SchedulerSpec(
        DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}
    ),
    # LMS integrates its coefficients with scipy.
    "lms": SchedulerSpec(LMSDiscreteScheduler, needs_scipy=True),
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)


def make_scheduler(name: str, base_config: Mapping[str, Any]) -> Any:
    """A fresh scheduler ``name`` built from ``base_config`` (the model's own noise schedule)."""
    spec = SCHEDULERS.get(name)
    if spec is None:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}")
    if spec.needs_scipy and not is_scipy_available():
        raise RuntimeError(f"scheduler {name!r} needs scipy, which is not installed")
    return spec.cls.from_config(base_config, **spec.overrides)
