"""The import lint: check a LoRA file against a base model without loading either into torch.

The base model is known only from the safetensors headers of its UNet and text encoder
(module names and weight shapes), so the lint reads a few hundred kilobytes, never weights.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from service.adapters.formats import (
    ADAPTER_LIMITS,
    TEXT_ENCODER,
    UNET,
    AdapterErrorCode,
    AdapterFileError,
    AdapterFormat,
    AlphaSource,
    Array,
    InvalidAdapterFile,
    LoraAdapter,
    LoraModule,
    SafetensorsFile,
    SafetensorsLimits,
    describe,
    parse_adapter,
    read_safetensors,
    read_safetensors_header,
    to_diffusers,
)

# Base model files are trusted but big: their headers may be large and their data is never read.
_BASE_HEADER_LIMITS: Final = SafetensorsLimits(
    max_header_bytes=64 << 20, max_tensors=1 << 20, max_total_bytes=1 << 50
)
_COMPONENT_FILES: Final[Mapping[str, tuple[str, str]]] = {
    UNET: ("unet", "diffusion_pytorch_model.safetensors"),
    TEXT_ENCODER: ("text_encoder", "model.safetensors"),
}
_MAX_LISTED: Final = 10

Shape = tuple[int, ...]


@dataclass
class LintReport:
    """What the lint found; ``to_dict`` gives the JSON form stored with the import."""

    format: AdapterFormat | None = None
    alpha_source: AlphaSource | None = None
    rank: int | None = None
    alpha: float | None = None
    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    target_modules: list[str] = field(default_factory=list)
    param_count: int = 0
    matched_keys: list[str] = field(default_factory=list)
    unmatched_keys: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class AdapterLintError(AdapterFileError):
    """The adapter cannot be imported for this base model; ``report`` says what was found."""

    def __init__(self, code: AdapterErrorCode, message: str, report: LintReport) -> None:
        super().__init__(code, message)
        self.report = report


class BaseModelLayoutError(RuntimeError):
    """The base model folder lacks readable UNet / text encoder weights (a server problem)."""


@dataclass(frozen=True)
class BaseModelLayout:
    """Weight shapes of the base model's Linear/Conv modules, by component and module path."""

    modules: dict[str, dict[str, Shape]]
    unet_config: dict[str, Any] | None


def _weight_files(folder: Path, preferred: str) -> list[Path]:
    exact = folder / preferred
    if exact.is_file():
        return [exact]
    # Sharded (or variant-only) weights: the union of every safetensors file's header.
    return sorted(folder.glob("*.safetensors"))


def read_base_model_layout(base_model_dir: Path) -> BaseModelLayout:
    """Module shapes of the base UNet and text encoder, from safetensors headers only."""
    modules: dict[str, dict[str, Shape]] = {}
    for component, (subfolder, filename) in _COMPONENT_FILES.items():
        files = _weight_files(Path(base_model_dir) / subfolder, filename)
        if not files:
            raise BaseModelLayoutError(f"no safetensors weights in {base_model_dir / subfolder}")
        shapes: dict[str, Shape] = {}
        for path in files:
            try:
                header = read_safetensors_header(path, limits=_BASE_HEADER_LIMITS)
            except InvalidAdapterFile as exc:
                raise BaseModelLayoutError(f"{path}: {exc.message}") from exc
            for key, info in header.tensors.items():
                if key.endswith(".weight") and len(info.shape) in (2, 4):
                    module = key.removesuffix(".weight")
                    if component != UNET:
                        module = module.removeprefix("text_model.")
                    shapes[module] = info.shape
        modules[component] = shapes
    config_path = Path(base_model_dir) / "unet" / "config.json"
    unet_config: dict[str, Any] | None = None
    if config_path.is_file():
        try:
            loaded = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise BaseModelLayoutError(f"{config_path} is not JSON") from exc
        unet_config = loaded if isinstance(loaded, dict) else None
    return BaseModelLayout(modules=modules, unet_config=unet_config)


class _ShapeMismatch(Exception):
    pass


def _fit_to_base(module: LoraModule, base: Shape) -> LoraModule:
    """Check a LoRA pair against its base weight; reshape 1x1 conv <-> linear losslessly."""
    down, up = module.down, module.up
    if len(base) == 4 and tuple(base[2:]) == (1, 1) and down.ndim == 2:
        down, up = down[:, :, None, None], up[:, :, None, None]
    elif len(base) == 2 and down.ndim == 4 and tuple(down.shape[2:]) == (1, 1):
        down, up = down[:, :, 0, 0], up[:, :, 0, 0]
    out_features, in_features = base[0], base[1]
    expected_down: Shape = (module.rank, in_features, *base[2:])
    expected_up: Shape = (out_features, module.rank) + ((1, 1) if len(base) == 4 else ())
    if tuple(down.shape) != expected_down or tuple(up.shape) != expected_up:
        raise _ShapeMismatch(
            f"{module.name}: base weight {list(base)} needs lora_A {list(expected_down)} and "
            f"lora_B {list(expected_up)}, file has {list(module.down.shape)} and "
            f"{list(module.up.shape)}"
        )
    if down is module.down:
        return module
    return dataclasses.replace(module, down=down, up=up)


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" ... ({len(items)} in all)" if len(items) > _MAX_LISTED else "")


def _describe_into(report: LintReport, adapter: LoraAdapter) -> None:
    report.format = adapter.format
    report.alpha_source = adapter.alpha_source
    report.ignored_keys = list(adapter.ignored_keys)
    report.warnings.extend(adapter.warnings)


def _lint(file: SafetensorsFile, layout: BaseModelLayout) -> tuple[LoraAdapter, LintReport]:
    report = LintReport()
    try:
        adapter = parse_adapter(file, unet_config=layout.unet_config)
    except InvalidAdapterFile as exc:
        report.errors.append(exc.message)
        raise AdapterLintError(exc.code, exc.message, report) from exc
    _describe_into(report, adapter)
    kept: dict[str, LoraModule] = {}
    unmatched: list[LoraModule] = []
    mismatches: list[str] = []
    reshaped: list[str] = []
    for name, module in adapter.modules.items():
        base = layout.modules.get(module.component, {}).get(module.path)
        if base is None:
            unmatched.append(module)
            continue
        try:
            fitted = _fit_to_base(module, base)
        except _ShapeMismatch as exc:
            mismatches.append(str(exc))
            continue
        if fitted is not module:
            kind = "1x1 conv" if fitted.down.ndim == 4 else "linear layer"
            reshaped.append(f"{name} (reshaped to fit a {kind})")
        kept[name] = fitted
    report.matched_keys = sorted(k for m in kept.values() for k in m.source_keys)
    report.unmatched_keys = sorted(k for m in unmatched for k in m.source_keys)
    if mismatches:
        report.errors.extend(mismatches)
        raise AdapterLintError(
            AdapterErrorCode.SHAPE_MISMATCH,
            f"{len(mismatches)} module(s) do not fit the base model: {_listed(mismatches)}",
            report,
        )
    if not kept:
        message = (
            "no LoRA module matches the base model, so loading it would change nothing: "
            + _listed([m.name for m in unmatched])
        )
        report.errors.append(message)
        raise AdapterLintError(AdapterErrorCode.NO_MATCHING_MODULES, message, report)
    if unmatched:
        report.warnings.append(
            f"{len(unmatched)} of {len(adapter.modules)} module(s) match nothing in the base "
            f"model and are dropped: {_listed([m.name for m in unmatched])}"
        )
    if reshaped:
        report.warnings.append(f"values unchanged, shapes adapted: {_listed(reshaped)}")
    matched = dataclasses.replace(adapter, modules=kept)
    summary = describe(matched)
    report.rank, report.alpha = summary.rank, summary.alpha
    report.target_modules = summary.target_modules
    report.param_count = summary.param_count
    report.ranks = {name: m.rank for name, m in kept.items()}
    report.alphas = {name: m.alpha for name, m in kept.items()}
    return matched, report


def lint_adapter(file: SafetensorsFile, *, base_model_dir: Path) -> LintReport:
    """Check an adapter against a base model folder; raise AdapterLintError if unusable."""
    _, report = _lint(file, read_base_model_layout(base_model_dir))
    return report


def canonicalize(
    source: SafetensorsFile | bytes | Path,
    *,
    base_model_dir: Path,
    base_model: str | None = None,
    limits: SafetensorsLimits | None = None,
) -> tuple[dict[str, Array], dict[str, str], LintReport]:
    """Read, lint and convert an uploaded adapter to the canonical diffusers form.

    Returns the canonical tensors and header metadata (write them with write_safetensors) and
    the lint report. Every refusal is an AdapterLintError carrying the report so far.
    """
    if isinstance(source, SafetensorsFile):
        file = source
    else:
        try:
            file = read_safetensors(source, limits=limits or ADAPTER_LIMITS)
        except InvalidAdapterFile as exc:
            raise AdapterLintError(exc.code, exc.message, LintReport(errors=[exc.message])) from exc
    matched, report = _lint(file, read_base_model_layout(base_model_dir))
    tensors, metadata = to_diffusers(matched, base_model=base_model or Path(base_model_dir).name)
    return tensors, metadata, report
