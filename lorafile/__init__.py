"""LoRA files: capped safetensors I/O, the formats (diffusers/peft, kohya, LDM) in one table,
the one rank/alpha rule, the import lint and the canonical form.

Pure: the stdlib, numpy and safetensors only, so the API process, the workers and the torch
engine all read LoRA files through this package and nothing else parses them.
"""

from lorafile.adapter import (
    AdapterFormat,
    AdapterSummary,
    AlphaSource,
    LoraAdapter,
    LoraModule,
    PeftComponentConfig,
    component_configs,
    describe,
)
from lorafile.base_layout import (
    BaseModelLayout,
    BaseModelLayoutError,
    linear_module_names,
    read_base_model_layout,
)
from lorafile.errors import AdapterErrorCode, AdapterFileError, InvalidAdapterFile
from lorafile.formats import FORMATS, WRITERS, LoraFormat
from lorafile.formats.base import LORASTACK_VERSION
from lorafile.lint import AdapterLintError, LintReport, canonical_file_bytes, canonicalize
from lorafile.parse import parse_adapter, read_adapter, to_kohya, write_adapter
from lorafile.safetensors_io import (
    ADAPTER_LIMITS,
    BASE_MODEL_LIMITS,
    STORED_LIMITS,
    SafetensorsFile,
    SafetensorsHeader,
    SafetensorsLimits,
    read_safetensors,
    read_safetensors_header,
    rewrite_header,
    safetensors_bytes,
    write_safetensors,
)

__all__ = [
    "ADAPTER_LIMITS",
    "BASE_MODEL_LIMITS",
    "FORMATS",
    "LORASTACK_VERSION",
    "STORED_LIMITS",
    "WRITERS",
    "AdapterErrorCode",
    "AdapterFileError",
    "AdapterFormat",
    "AdapterLintError",
    "AdapterSummary",
    "AlphaSource",
    "BaseModelLayout",
    "BaseModelLayoutError",
    "InvalidAdapterFile",
    "LintReport",
    "LoraAdapter",
    "LoraFormat",
    "LoraModule",
    "PeftComponentConfig",
    "SafetensorsFile",
    "SafetensorsHeader",
    "SafetensorsLimits",
    "canonical_file_bytes",
    "canonicalize",
    "component_configs",
    "describe",
    "linear_module_names",
    "parse_adapter",
    "read_adapter",
    "read_base_model_layout",
    "read_safetensors",
    "read_safetensors_header",
    "rewrite_header",
    "safetensors_bytes",
    "to_kohya",
    "write_adapter",
    "write_safetensors",
]
