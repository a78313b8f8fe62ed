"""The table of LoRA file formats: a new format is a module with a ``FORMAT`` and one entry here.

Order matters for detection: a key belongs to the first format that claims it (a kohya key
``lora_unet_...`` is checked before the looser peft test).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from lorafile.errors import AdapterErrorCode, InvalidAdapterFile
from lorafile.formats import diffusers, kohya, peft
from lorafile.formats.base import KeyGroups, LoraFormat, PairKeys, WriteAdapter

FORMATS: Final[Mapping[str, LoraFormat]] = {
    fmt.name: fmt for fmt in (kohya.FORMAT, diffusers.FORMAT, peft.FORMAT)
}
# Formats lorastack writes (the download formats), by name.
WRITERS: Final[Mapping[str, WriteAdapter]] = {
    name: fmt.write for name, fmt in FORMATS.items() if fmt.write is not None
}


def _claimant(key: str) -> str | None:
    return next((name for name, fmt in FORMATS.items() if fmt.claims(key)), None)


def detect_format(keys: Iterable[str]) -> LoraFormat:
    """The one format every key belongs to; refuses unknown and mixed files."""
    found = {_claimant(key) for key in keys}
    if len(found) == 1:
        (name,) = found
        if name is not None:
            return FORMATS[name]
    listed = sorted(name or "unknown" for name in found)
    raise InvalidAdapterFile(
        AdapterErrorCode.UNKNOWN_FORMAT,
        "keys are neither all diffusers (unet./text_encoder.), all peft (base_model.model.) "
        f"nor all kohya (lora_unet_/lora_te_); found: {', '.join(listed)}",
    )


__all__ = ["FORMATS", "WRITERS", "KeyGroups", "LoraFormat", "PairKeys", "detect_format"]
