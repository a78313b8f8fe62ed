"""Configured base models: name -> hub id or local folder, and what we can read without torch."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from service.adapters.formats import read_safetensors_header
from service.config import Settings
from service.errors import Unprocessable

WEIGHT_FILES = {
    "unet": ("unet/diffusion_pytorch_model.safetensors",),
    "text_encoder": ("text_encoder/model.safetensors",),
}


def resolve_base_model(settings: Settings, name: str | None) -> tuple[str, str]:
    """(name, source) of a configured base model; the default when ``name`` is None."""
    sources = settings.model_sources
    name = name or settings.default_base_model
    if name not in sources:
        raise Unprocessable(
            f"base_model: unknown base model {name!r}; configured: {', '.join(sources)}",
            code="unknown_base_model",
            extra={"errors": [{"field": "base_model", "message": "unknown base model"}]},
        )
    return name, sources[name]


def local_folder(source: str) -> Path | None:
    """The folder of a base model given as a local path (None for a hub id)."""
    path = Path(source)
    return path if (path / "model_index.json").exists() else None


def linear_module_names(folder: Path, component: str) -> frozenset[str]:
    """Names of the 2-D weight modules (Linear layers) of a component, from its file header."""
    for rel in WEIGHT_FILES[component]:
        weights = folder / rel
        if weights.exists():
            stat = weights.stat()
            return _linear_names(str(weights), stat.st_mtime_ns, stat.st_size)
    return frozenset()


@lru_cache(maxsize=32)
def _linear_names(path: str, _mtime_ns: int, _size: int) -> frozenset[str]:
    from service.adapters.formats import SafetensorsLimits

    header = read_safetensors_header(
        Path(path),
        limits=SafetensorsLimits(
            max_header_bytes=64 * 1024 * 1024, max_tensors=100_000, max_total_bytes=1 << 40
        ),
    )
    return frozenset(
        name[: -len(".weight")]
        for name, info in header.tensors.items()
        if name.endswith(".weight") and len(info.shape) == 2
    )


def missing_targets(modules: frozenset[str], suffixes: tuple[str, ...]) -> list[str]:
    """Suffixes that match no module (peft matches a suffix on a '.' boundary)."""
    return [s for s in suffixes if not any(m == s or m.endswith("." + s) for m in modules)]


@lru_cache(maxsize=32)
def native_size(folder: Path) -> int | None:
    """The image side the model was trained at: UNet sample size x the VAE's downscale."""
    import json

    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
