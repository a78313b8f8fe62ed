"""What the remote commands share: exit codes, usage errors, JSON or human output, and the
small grammars of their arguments (``-p key=value``, ``--adapter name@ref:weight``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lorastack.cli import display

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_SERVER = 3
EXIT_REFUSED = 4
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """exit codes:
  0    success
  1    the job failed or was cancelled
  2    usage error (bad arguments, no server configured)
  3    server error, or the server could not be reached
  4    the server refused the request (not found, invalid, conflict)
  130  interrupted (a followed job keeps running unless you cancelled it)"""


class UsageError(Exception):
    """A command line that can't be run as given (exit 2)."""


def fail(args: argparse.Namespace, code: int, message: str) -> int:
    if args.json:
        print(json.dumps({"error": {"detail": message}}))
    else:
        display.err(message)
    return code


def jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def emit(args: argparse.Namespace, value: Any, human: Callable[[], None]) -> None:
    """Print ``value`` as JSON with ``--json``, else the human form."""
    if args.json:
        print(json.dumps(jsonable(value), indent=2))
    else:
        human()


def parse_value(text: str) -> Any:
    """``-p`` values: JSON when they parse as JSON (numbers, booleans, lists), else text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_params(pairs: Sequence[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"-p {pair!r}: expected key=value (e.g. -p rank=8)")
        params[key.strip()] = parse_value(value)
    return params


def parse_adapter(text: str) -> tuple[str, float]:
    """``name``, ``name@ref``, ``name@ref:0.8`` -> (ref, weight)."""
    ref, sep, weight = text.rpartition(":")
    if sep:
        try:
            return ref, float(weight)
        except ValueError:
            pass
    return text, 1.0


def split_ref(text: str) -> tuple[str, str]:
    """``name@version`` -> (name, version); ``name`` -> (name, "latest")."""
    name, _, version = text.partition("@")
    return name, version or "latest"
