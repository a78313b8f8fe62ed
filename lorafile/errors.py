"""Typed refusals of LoRA files: a machine-readable code and a message, no transport notion."""

from __future__ import annotations

from enum import StrEnum


class AdapterErrorCode(StrEnum):
    """Machine-readable reasons an adapter file is refused."""

    TOO_LARGE = "too_large"
    NOT_SAFETENSORS = "not_safetensors"
    HEADER_EXCEEDS_FILE = "header_exceeds_file"
    HEADER_TOO_LARGE = "header_too_large"
    INVALID_HEADER = "invalid_header"
    TOO_MANY_TENSORS = "too_many_tensors"
    UNSUPPORTED_DTYPE = "unsupported_dtype"
    INVALID_TENSOR = "invalid_tensor"
    TRUNCATED = "truncated"
    OVERLAPPING_TENSORS = "overlapping_tensors"
    INVALID_LAYOUT = "invalid_layout"
    UNKNOWN_FORMAT = "unknown_format"
    UNSUPPORTED_ADAPTER = "unsupported_adapter"
    INCOMPLETE_PAIR = "incomplete_pair"
    SHAPE_MISMATCH = "shape_mismatch"
    INVALID_METADATA = "invalid_metadata"
    NEEDS_UNET_CONFIG = "needs_unet_config"
    NO_MATCHING_MODULES = "no_matching_modules"


class AdapterFileError(ValueError):
    """Base of every refusal of an adapter file; ``code`` is an ``AdapterErrorCode``.

    A ``ValueError``: the file is bad input, which is how the worker classifies a job failure.
    """

    def __init__(self, code: AdapterErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class InvalidAdapterFile(AdapterFileError):
    """The bytes are not a safetensors LoRA file we can read."""
