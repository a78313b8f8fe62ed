"""A base model's layout (module names and weight shapes) from its safetensors headers alone.

The lint and the training-request checks know the base model only this way: they read a few
hundred kilobytes of headers, never weights, and never load torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

from lorafile.errors import InvalidAdapterFile
from lorafile.naming import TEXT_ENCODER, UNET, strip_text_model
from lorafile.safetensors_io import BASE_MODEL_LIMITS, read_safetensors_header

Shape = tuple[int, ...]

# Where each component's weights live in a diffusers pipeline folder.
COMPONENT_WEIGHTS: Final[Mapping[str, tuple[str, str]]] = {
    UNET: ("unet", "diffusion_pytorch_model.safetensors"),
    TEXT_ENCODER: ("text_encoder", "model.safetensors"),
}


class BaseModelLayoutError(RuntimeError):
    """The base model folder lacks readable UNet / text encoder weights (a server problem)."""


@dataclass(frozen=True)
class BaseModelLayout:
    """Weight shapes of the base model's Linear/Conv modules, by component and module path."""

    modules: dict[str, dict[str, Shape]]
    unet_config: dict[str, Any] | None


def weight_shapes(weights: Path) -> dict[str, Shape]:
    """Shapes of the 2-D (Linear) and 4-D (Conv) weights in a file, by module name."""
    header = read_safetensors_header(weights, limits=BASE_MODEL_LIMITS)
    return {
        key.removesuffix(".weight"): info.shape
        for key, info in header.tensors.items()
        if key.endswith(".weight") and len(info.shape) in (2, 4)
    }


def _weight_files(folder: Path, preferred: str) -> list[Path]:
    exact = folder / preferred
    if exact.is_file():
        return [exact]
    # Sharded (or variant-only) weights: the union of every safetensors file's header.
    return sorted(folder.glob("*.safetensors"))


def _component_shapes(base_model_dir: Path, component: str) -> dict[str, Shape]:
    subfolder, filename = COMPONENT_WEIGHTS[component]
    files = _weight_files(base_model_dir / subfolder, filename)
    if not files:
        raise BaseModelLayoutError(f"no safetensors weights in {base_model_dir / subfolder}")
    shapes: dict[str, Shape] = {}
    for path in files:
        try:
            found = weight_shapes(path)
        except InvalidAdapterFile as exc:
            raise BaseModelLayoutError(f"{path}: {exc.message}") from exc
        for module, shape in found.items():
            shapes[module if component == UNET else strip_text_model(module)] = shape
    return shapes


def _unet_config(base_model_dir: Path) -> dict[str, Any] | None:
    config_path = base_model_dir / "unet" / "config.json"
    if not config_path.is_file():
        return None
    try:
        loaded = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise BaseModelLayoutError(f"{config_path} is not JSON") from exc
    return loaded if isinstance(loaded, dict) else None


def read_base_model_layout(base_model_dir: Path) -> BaseModelLayout:
    """Module shapes of the base UNet and text encoder, from safetensors headers only."""
    folder = Path(base_model_dir)
    modules = {component: _component_shapes(folder, component) for component in COMPONENT_WEIGHTS}
    return BaseModelLayout(modules=modules, unet_config=_unet_config(folder))


def linear_module_names(folder: Path, component: str) -> frozenset[str]:
    """Names of the 2-D weight modules (Linear layers) of a component, from its file header."""
    subfolder, filename = COMPONENT_WEIGHTS[component]
    weights = folder / subfolder / filename
    if not weights.exists():
        return frozenset()
    stat = weights.stat()
    return _linear_names(str(weights), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=32)
def _linear_names(path: str, _mtime_ns: int, _size: int) -> frozenset[str]:
    return frozenset(name for name, shape in weight_shapes(Path(path)).items() if len(shape) == 2)
