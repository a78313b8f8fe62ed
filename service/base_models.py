"""Configured base models: name -> hub id or local folder, and what we can read without torch."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

# Re-exported: the training-request checks read Linear names next to the other base-model facts.
from lorafile import linear_module_names as linear_module_names
from service.config import Settings
from service.errors import Unprocessable


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
