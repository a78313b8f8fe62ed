"""What a LoRA file format provides: a key test, a key grouper and, where one exists, a writer.

A format is one ``LoraFormat`` entry in the table of ``lorafile.formats``; parsing and
conversion look formats up there instead of branching on their names.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any, Final, Literal

from lorafile.adapter import AdapterFormat, LoraAdapter, describe, json_number
from lorafile.errors import AdapterErrorCode, InvalidAdapterFile
from lorafile.safetensors_io import Array

# The version written into every header we produce (the installed lorastack distribution).
LORASTACK_VERSION: Final = version("lorastack")

Role = Literal["down", "up", "alpha"]
Tensors = dict[str, Array]
Header = dict[str, str]


@dataclass
class PairKeys:
    """The file keys of one module's down, up and (optional) alpha tensors."""

    down: str | None = None
    up: str | None = None
    alpha: str | None = None


@dataclass
class KeyGroups:
    """A file's keys grouped by (component, module path), and the keys that are not LoRA."""

    format: AdapterFormat
    groups: dict[tuple[str, str], PairKeys] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    def add(self, component: str, path: str, role: Role, key: str) -> None:
        """Record ``key`` as the ``role`` tensor of a module; two keys for one role are refused."""
        pair = self.groups.setdefault((component, path), PairKeys())
        existing = getattr(pair, role)
        if existing is not None:
            raise InvalidAdapterFile(
                AdapterErrorCode.INVALID_HEADER,
                f"keys {existing!r} and {key!r} name the same {role} weight",
            )
        setattr(pair, role, key)


GroupKeys = Callable[[Iterable[str], Mapping[str, Any] | None], KeyGroups]
WriteAdapter = Callable[[LoraAdapter, str | None], tuple[Tensors, Header]]


@dataclass(frozen=True)
class LoraFormat:
    """One file format.

    ``claims`` says whether a key is this format's; ``group`` groups a file's keys (it gets the
    base UNet config, which only some namings need). ``header_configs`` marks formats whose
    header carries peft configs (alpha from ``lora_adapter_metadata``); ``ignored_alpha_key``
    names a header alpha that loaders of the format ignore (worth a warning when no module
    carries an alpha). ``write`` is the format's writer, where lorastack writes it.
    """

    name: Literal["diffusers", "peft", "kohya"]
    claims: Callable[[str], bool]
    group: GroupKeys
    header_configs: bool = False
    ignored_alpha_key: str | None = None
    write: WriteAdapter | None = None


def lorastack_metadata(adapter: LoraAdapter, base_model: str | None) -> Header:
    """The ``lorastack_*`` header entries every file lorastack writes carries."""
    summary = describe(adapter)
    metadata = {
        "lorastack_version": LORASTACK_VERSION,
        "lorastack_rank": str(summary.rank),
        "lorastack_alpha": str(json_number(summary.alpha)),
        "lorastack_target_modules": json.dumps(summary.target_modules),
    }
    if base_model:
        metadata["lorastack_base_model"] = base_model
    return metadata
