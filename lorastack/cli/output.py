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
    """``name``, ``name@ref``, ``name@ref:0.8`` -> (ref, weight). A checkpoint ref keeps its
    own colon: ``name@ckpt:400`` is weight 1.0, ``name@ckpt:400:0.8`` weight 0.8."""
    ref, sep, weight = text.rpartition(":")
    if sep and not ref.endswith("@ckpt"):
        try:
            return ref, float(weight)
        except ValueError:
            pass
    return text, 1.0


def parse_list(text: str, flag: str) -> list[Any]:
    """``v1,v2,...`` -> values, each as ``-p`` reads it (JSON when it parses, else text)."""
    values = [parse_value(part.strip()) for part in text.split(",")]
    if not text.strip() or any(value == "" for value in values):
        raise UsageError(f"{flag} {text!r}: expected comma-separated values")
    return values


def parse_axis(text: str, flag: str) -> dict[str, Any]:
    """``KIND=v1,v2`` -> a grid axis. Seeds are integers, weights numbers, prompts and adapter
    refs text; the adapter value ``none`` (or ``base``) is the base model."""
    kind, sep, values = text.partition("=")
    kinds = ("prompt", "seed", "adapter", "weight")
    if not sep or kind not in kinds:
        raise UsageError(f"{flag} {text!r}: expected KIND=v1,v2,... with KIND one of {kinds}")
    parts = [part.strip() for part in values.split(",")]
    if not values.strip() or any(not part for part in parts):
        raise UsageError(f"{flag} {text!r}: expected comma-separated values")
    try:
        if kind == "seed":
            return {"axis": kind, "values": [int(part) for part in parts]}
        if kind == "weight":
            return {"axis": kind, "values": [float(part) for part in parts]}
    except ValueError:
        raise UsageError(f"{flag} {text!r}: {kind} values must be numbers") from None
    if kind == "adapter":
        base = {"none", "base"}
        return {"axis": kind, "values": [None if p.lower() in base else p for p in parts]}
    return {"axis": kind, "values": parts}


def parse_grid(pairs: Sequence[str]) -> dict[str, list[Any]]:
    """``--grid rank=8,32 --grid learning_rate=1e-4,1e-3`` -> the experiment's grid."""
    grid: dict[str, list[Any]] = {}
    for pair in pairs:
        key, sep, values = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--grid {pair!r}: expected key=v1,v2 (e.g. --grid rank=8,32)")
        grid[key.strip()] = parse_list(values, "--grid")
    return grid


def parse_select(text: str | None) -> dict[str, str] | None:
    """``clip_score:max`` -> {"metric": "clip_score", "mode": "max"}."""
    if text is None:
        return None
    metric, _, mode = text.partition(":")
    if not metric or mode not in ("max", "min"):
        raise UsageError(f"--select {text!r}: expected METRIC:max or METRIC:min")
    return {"metric": metric, "mode": mode}


def evaluation_from(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``evaluation`` object from ``--eval-prompt/--control-prompt/--eval-seed/--eval-steps/
    --select``
    (None without an evaluation prompt; the server fills in the rest)."""
    if not args.eval_prompt:
        if args.control_prompt or args.eval_seed or args.select or args.eval_steps:
            raise UsageError(
                "--control-prompt, --eval-seed, --eval-steps and --select need --eval-prompt"
            )
        return None
    evaluation: dict[str, Any] = {"prompts": args.eval_prompt}
    if args.control_prompt:
        evaluation["control_prompts"] = args.control_prompt
    if args.eval_seed:
        evaluation["seeds"] = args.eval_seed
    if args.eval_steps:
        evaluation["num_inference_steps"] = args.eval_steps
    select = parse_select(args.select)
    if select:
        evaluation["select"] = select
    return evaluation


def split_ref(text: str) -> tuple[str, str]:
    """``name@version`` -> (name, version); ``name`` -> (name, "latest")."""
    name, _, version = text.partition("@")
    return name, version or "latest"
