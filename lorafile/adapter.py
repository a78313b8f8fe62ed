"""The adapter model every format reads into and writes from, and the one rank/alpha rule.

The rule, for every reader and for the engine alike: a module's scale is ``alpha / rank``,
where rank is the first dimension of its ``down`` (lora_A) weight and alpha is, in order,

1. its own alpha tensor (kohya's ``.alpha``; 0 means "unset", as kohya and A1111 read it);
2. its component's peft ``LoraConfig`` in the diffusers ``lora_adapter_metadata`` header
   entry: ``alpha_pattern`` then ``lora_alpha`` (peft's default 8), after checking that
   ``rank_pattern`` then ``r`` (peft's default 8) equals the weights' rank;
3. the rank itself (scale 1.0), as diffusers and kohya assume.

Pattern keys are module-name suffixes (``^`` anchors at the start); real regular expressions
are refused rather than run. rsLoRA (``alpha / sqrt(rank)``), DoRA and LoRA bias terms are
refused: the canonical form cannot express them, and every stored file is canonical.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np

from lorafile.errors import AdapterErrorCode, InvalidAdapterFile
from lorafile.naming import COMPONENTS, short_module_name
from lorafile.safetensors_io import Array

AdapterFormat = Literal["diffusers", "peft", "kohya", "kohya_ldm"]
AlphaSource = Literal["tensors", "header_metadata", "default_rank", "mixed"]
ModuleAlphaSource = Literal["tensor", "header_metadata", "default_rank"]

LORA_ADAPTER_METADATA_KEY: Final = "lora_adapter_metadata"  # diffusers' header entry
# peft's LoraConfig defaults, used when a header config leaves them out.
PEFT_DEFAULT_RANK: Final = 8
PEFT_DEFAULT_ALPHA: Final = 8
_REGEX_CHARS: Final = frozenset("*+?[](){}|\\$")
_REFUSED_FLAGS: Final = (("use_dora", "DoRA"), ("use_rslora", "rsLoRA"), ("lora_bias", "bias"))


def _invalid(code: AdapterErrorCode, message: str) -> InvalidAdapterFile:
    return InvalidAdapterFile(code, message)


@dataclass(frozen=True)
class LoraModule:
    """One LoRA pair: ``down`` is peft's lora_A, ``up`` is lora_B; scale = alpha / rank.

    ``path`` is the module inside its component; for text encoders it is relative to the
    CLIP text model (no ``text_model.`` prefix), since transformers 5 flattens that level.
    """

    component: str
    path: str
    down: Array
    up: Array
    alpha: float
    alpha_source: ModuleAlphaSource
    source_keys: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.component}.{self.path}"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """The factor ``up @ down`` is multiplied by at adapter weight 1.0."""
        return self.alpha / self.rank

    @property
    def param_count(self) -> int:
        return int(self.down.size + self.up.size)


@dataclass
class LoraAdapter:
    """A parsed adapter: modules by name, plus what parsing learned on the way."""

    format: AdapterFormat
    modules: dict[str, LoraModule]
    metadata: dict[str, str]
    ignored_keys: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def alpha_source(self) -> AlphaSource:
        sources = {module.alpha_source for module in self.modules.values()}
        if len(sources) != 1:
            return "mixed"
        only = sources.pop()
        return "tensors" if only == "tensor" else only


@dataclass(frozen=True)
class AdapterSummary:
    """What an adapter version records about its weights."""

    rank: int
    alpha: float
    target_modules: list[str]
    param_count: int
    module_count: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "param_count": self.param_count,
            "module_count": self.module_count,
        }


def most_common(values: Iterable[float]) -> float:
    """The most frequent value; ties go to the smallest, so module order does not matter."""
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


def json_number(value: float) -> int | float:
    """``4`` rather than ``4.0`` in headers, as peft and kohya write whole alphas."""
    return int(value) if float(value).is_integer() else float(value)


def describe(adapter: LoraAdapter) -> AdapterSummary:
    """Rank and alpha (most common), peft-style target names and the parameter count."""
    modules = list(adapter.modules.values())
    return AdapterSummary(
        rank=int(most_common(m.rank for m in modules)),
        alpha=most_common(m.alpha for m in modules),
        target_modules=sorted({short_module_name(m.path) for m in modules}),
        param_count=sum(m.param_count for m in modules),
        module_count=len(modules),
    )


# --- the peft config of one component --------------------------------------------------------


def _pattern_value(patterns: Mapping[str, Any], path: str) -> Any:
    """peft's rank/alpha pattern lookup, with keys taken as module-name suffixes."""
    candidates = (path, f"text_model.{path}")
    for pattern, value in patterns.items():
        anchored = pattern.startswith("^")
        name = pattern.removeprefix("^")
        for candidate in candidates:
            if candidate == name or (not anchored and candidate.endswith("." + name)):
                return value
    return None


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(AdapterErrorCode.INVALID_METADATA, f"{what} is not a number: {value!r}")
    return float(value)


def _check_flags_and_patterns(component: str, options: Mapping[str, Any]) -> None:
    for flag, what in _REFUSED_FLAGS:
        if options.get(flag):
            raise _invalid(
                AdapterErrorCode.UNSUPPORTED_ADAPTER,
                f"{component} uses {what} ({flag}=true), which lorastack does not convert",
            )
    for option in ("rank_pattern", "alpha_pattern"):
        patterns = options.get(option) or {}
        if not isinstance(patterns, dict):
            raise _invalid(AdapterErrorCode.INVALID_METADATA, f"{component}.{option}: not a map")
        # peft reads these keys as regular expressions; lorastack reads them as module-name
        # suffixes and refuses real regexes rather than run untrusted patterns.
        for pattern in patterns:
            if _REGEX_CHARS & set(str(pattern).removeprefix("^")):
                raise _invalid(
                    AdapterErrorCode.INVALID_METADATA,
                    f"{component}.{option} key {pattern!r} is a regular expression; "
                    "only module names are supported",
                )


@dataclass(frozen=True)
class PeftComponentConfig:
    """The peft ``LoraConfig`` fields of one component that decide its ranks and alphas.

    Read from the diffusers header by ``component_configs`` and written by the diffusers
    writer (``from_modules`` / ``to_header``), so both sides share one meaning.
    """

    component: str
    options: Mapping[str, Any]

    def alpha(self, path: str, rank: int) -> float:
        """Alpha of one module; checks the rank the config records against the weights'."""
        rank_value = _pattern_value(self.options.get("rank_pattern") or {}, path)
        if rank_value is None:
            rank_value = self.options.get("r", PEFT_DEFAULT_RANK)
        if _number(rank_value, f"{self.component}.r") != rank:
            raise _invalid(
                AdapterErrorCode.INVALID_METADATA,
                f"header says rank {rank_value} for {self.component}.{path} but its weights "
                f"have rank {rank}",
            )
        alpha_value = _pattern_value(self.options.get("alpha_pattern") or {}, path)
        if alpha_value is None:
            alpha_value = self.options.get("lora_alpha", PEFT_DEFAULT_ALPHA)
        return _number(alpha_value, f"{self.component}.lora_alpha")

    def covers(self, path: str) -> bool:
        """Whether ``target_modules`` names the module (a regex string is not checked)."""
        targets = self.options.get("target_modules")
        if not isinstance(targets, list):
            return True
        candidates = (path, f"text_model.{path}")
        return any(c == t or c.endswith(f".{t}") for t in map(str, targets) for c in candidates)

    @classmethod
    def from_modules(cls, component: str, modules: list[LoraModule]) -> PeftComponentConfig:
        """The LoraConfig fields diffusers needs to rebuild one component's adapter exactly."""
        rank = int(most_common(m.rank for m in modules))
        alpha = most_common(m.alpha for m in modules)
        options = {
            "r": rank,
            "lora_alpha": json_number(alpha),
            "rank_pattern": {m.path: m.rank for m in modules if m.rank != rank},
            "alpha_pattern": {m.path: json_number(m.alpha) for m in modules if m.alpha != alpha},
            # Full paths, so only these modules get LoRA layers; suffix matching keeps them
            # valid whether or not the CLIP model has its text_model level.
            "target_modules": sorted(m.path for m in modules),
            "use_dora": False,
            "use_rslora": False,
            "lora_bias": False,
        }
        return cls(component=component, options=options)


def component_configs(metadata: Mapping[str, str]) -> dict[str, PeftComponentConfig]:
    """The peft config of each component in the ``lora_adapter_metadata`` header entry."""
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if raw is None:
        return {}
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _invalid(
            AdapterErrorCode.INVALID_METADATA, f"{LORA_ADAPTER_METADATA_KEY} is not JSON"
        ) from exc
    if not isinstance(parsed, dict):
        raise _invalid(
            AdapterErrorCode.INVALID_METADATA, f"{LORA_ADAPTER_METADATA_KEY} is not an object"
        )
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in parsed.items():
        component, _, option = str(key).partition(".")
        if component in COMPONENTS and option:
            grouped.setdefault(component, {})[option] = value
    for component, options in grouped.items():
        _check_flags_and_patterns(component, options)
    return {c: PeftComponentConfig(component=c, options=o) for c, o in grouped.items()}


def configs_to_header(configs: Iterable[PeftComponentConfig]) -> str:
    """The ``lora_adapter_metadata`` header value for these component configs."""
    flat = {
        f"{config.component}.{option}": value
        for config in configs
        for option, value in config.options.items()
    }
    return json.dumps(flat, indent=2, sort_keys=True)


# --- one module's weights and alpha ----------------------------------------------------------


def check_pair(name: str, down: Array, up: Array) -> None:
    """Refuse LoRA weights that are not finite float 2-D/4-D matrices agreeing on the rank."""
    for role, array in (("down", down), ("up", up)):
        if not np.issubdtype(array.dtype, np.floating):
            raise _invalid(
                AdapterErrorCode.UNSUPPORTED_DTYPE, f"{name} {role} weight has dtype {array.dtype}"
            )
        if not np.isfinite(array).all():
            raise _invalid(AdapterErrorCode.INVALID_TENSOR, f"{name} {role} weight is not finite")
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise _invalid(
            AdapterErrorCode.SHAPE_MISMATCH,
            f"{name}: LoRA weights must both be 2-D (Linear) or 4-D (Conv2d), got "
            f"{list(down.shape)} and {list(up.shape)}",
        )
    if down.shape[0] != up.shape[1] or down.shape[0] == 0:
        raise _invalid(
            AdapterErrorCode.SHAPE_MISMATCH,
            f"{name}: down {list(down.shape)} and up {list(up.shape)} disagree on the rank",
        )
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise _invalid(
            AdapterErrorCode.SHAPE_MISMATCH, f"{name}: conv up weight must be 1x1, got {up.shape}"
        )


def tensor_alpha(name: str, value: Array) -> float | None:
    """A module's alpha tensor; None when it says 0 (unset, as kohya and A1111 read it)."""
    if value.size != 1 or not np.issubdtype(value.dtype, np.floating):
        raise _invalid(AdapterErrorCode.INVALID_TENSOR, f"{name}: alpha must be one float")
    alpha = float(value.reshape(()))
    if not np.isfinite(alpha) or alpha < 0:
        raise _invalid(AdapterErrorCode.INVALID_TENSOR, f"{name}: invalid alpha {alpha}")
    return alpha or None


def module_alpha(
    *,
    path: str,
    rank: int,
    alpha_tensor: tuple[str, Array] | None,
    config: PeftComponentConfig | None,
) -> tuple[float, ModuleAlphaSource]:
    """The rule of this module's docstring: alpha tensor, else header config, else rank."""
    if alpha_tensor is not None:
        alpha = tensor_alpha(*alpha_tensor)
        return (alpha, "tensor") if alpha is not None else (float(rank), "default_rank")
    if config is not None:
        return config.alpha(path, rank), "header_metadata"
    return float(rank), "default_rank"
