"""The import lint and the canonical form: check a LoRA file against a base model's layout
(without loading either into torch) and write it as the canonical diffusers file.

Every stored adapter version is canonical (see ``lorafile.formats.diffusers``), so the
engine reads one form whatever was uploaded or trained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from lorafile.adapter import AdapterFormat, AlphaSource, LoraAdapter, LoraModule, describe
from lorafile.base_layout import BaseModelLayout, Shape, read_base_model_layout
from lorafile.errors import AdapterErrorCode, AdapterFileError, InvalidAdapterFile
from lorafile.formats.base import Header, Tensors
from lorafile.parse import parse_adapter, write_adapter
from lorafile.safetensors_io import (
    ADAPTER_LIMITS,
    STORED_LIMITS,
    SafetensorsFile,
    SafetensorsLimits,
    read_safetensors,
    safetensors_bytes,
)

_MAX_LISTED: Final = 10


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


@dataclass
class _Match:
    kept: dict[str, LoraModule] = field(default_factory=dict)
    unmatched: list[LoraModule] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)


def _match(adapter: LoraAdapter, layout: BaseModelLayout) -> _Match:
    """Each module against its base weight: kept (maybe reshaped), unmatched or mismatched."""
    found = _Match()
    for name, module in adapter.modules.items():
        base = layout.modules.get(module.component, {}).get(module.path)
        if base is None:
            found.unmatched.append(module)
            continue
        try:
            fitted = _fit_to_base(module, base)
        except _ShapeMismatch as exc:
            found.mismatches.append(str(exc))
            continue
        if fitted is not module:
            kind = "1x1 conv" if fitted.down.ndim == 4 else "linear layer"
            found.reshaped.append(f"{name} (reshaped to fit a {kind})")
        found.kept[name] = fitted
    return found


def _refuse_unusable(found: _Match, report: LintReport) -> None:
    if found.mismatches:
        report.errors.extend(found.mismatches)
        raise AdapterLintError(
            AdapterErrorCode.SHAPE_MISMATCH,
            f"{len(found.mismatches)} module(s) do not fit the base model: "
            f"{_listed(found.mismatches)}",
            report,
        )
    if not found.kept:
        message = (
            "no LoRA module matches the base model, so loading it would change nothing: "
            + _listed([m.name for m in found.unmatched])
        )
        report.errors.append(message)
        raise AdapterLintError(AdapterErrorCode.NO_MATCHING_MODULES, message, report)


def _lint(file: SafetensorsFile, layout: BaseModelLayout) -> tuple[LoraAdapter, LintReport]:
    report = LintReport()
    try:
        adapter = parse_adapter(file, unet_config=layout.unet_config)
    except InvalidAdapterFile as exc:
        report.errors.append(exc.message)
        raise AdapterLintError(exc.code, exc.message, report) from exc
    report.format, report.alpha_source = adapter.format, adapter.alpha_source
    report.ignored_keys = list(adapter.ignored_keys)
    report.warnings.extend(adapter.warnings)
    found = _match(adapter, layout)
    report.matched_keys = sorted(k for m in found.kept.values() for k in m.source_keys)
    report.unmatched_keys = sorted(k for m in found.unmatched for k in m.source_keys)
    _refuse_unusable(found, report)
    if found.unmatched:
        report.warnings.append(
            f"{len(found.unmatched)} of {len(adapter.modules)} module(s) match nothing in the "
            f"base model and are dropped: {_listed([m.name for m in found.unmatched])}"
        )
    if found.reshaped:
        report.warnings.append(f"values unchanged, shapes adapted: {_listed(found.reshaped)}")
    matched = dataclasses.replace(adapter, modules=found.kept)
    summary = describe(matched)
    report.rank, report.alpha = summary.rank, summary.alpha
    report.target_modules = summary.target_modules
    report.param_count = summary.param_count
    report.ranks = {name: m.rank for name, m in found.kept.items()}
    report.alphas = {name: m.alpha for name, m in found.kept.items()}
    return matched, report


def canonicalize(
    source: SafetensorsFile | bytes | Path,
    *,
    base_model_dir: Path,
    base_model: str | None = None,
    limits: SafetensorsLimits | None = None,
) -> tuple[Tensors, Header, LintReport]:
    """Read, lint and convert an uploaded adapter to the canonical diffusers form.

    Returns the canonical tensors and header metadata (write them with safetensors_bytes) and
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
    tensors, metadata = write_adapter(
        matched, "diffusers", base_model=base_model or Path(base_model_dir).name
    )
    return tensors, metadata, report


def canonical_file_bytes(path: Path, *, base_model_dir: Path, base_model: str) -> bytes:
    """A trained adapter file in the canonical diffusers form every stored version uses.

    Adapters the canonical form can't express (DoRA) are kept as the trainer wrote them.
    """
    try:
        tensors, metadata, _ = canonicalize(
            path, base_model_dir=base_model_dir, base_model=base_model, limits=STORED_LIMITS
        )
    except AdapterLintError as exc:
        if exc.code != AdapterErrorCode.UNSUPPORTED_ADAPTER:
            raise
        return path.read_bytes()
    return safetensors_bytes(tensors, metadata)
