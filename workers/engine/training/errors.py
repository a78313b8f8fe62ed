"""Typed errors of the LoRA trainer."""

from __future__ import annotations


class TrainingError(Exception):
    """Base class of every error the trainer raises on purpose."""


class ConfigError(TrainingError, ValueError):
    """A training setting is invalid; ``field`` names the setting."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class TrainingDataError(TrainingError, ValueError):
    """The training items cannot be used (none given, an unreadable image)."""


class TrainingCancelled(TrainingError):
    """Training stopped because the callbacks asked it to (cooperative cancel)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"training cancelled after step {step}")
        self.step = step


class TrainingOutOfMemory(TrainingError):
    """The device ran out of memory; ``hint`` says which setting to lower."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(f"{message} ({hint})")
        self.hint = hint
