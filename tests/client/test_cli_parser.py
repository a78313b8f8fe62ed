"""The remote commands' parser: every command has an example in its help, and the small
grammars (`--adapter name@ref:weight`, `-p key=value`) read as documented."""

from __future__ import annotations

import argparse

import pytest

from lorastack.cli import build_parser
from lorastack.cli.output import (
    UsageError,
    parse_adapter,
    parse_axis,
    parse_grid,
    parse_params,
    parse_select,
)

REMOTE = {
    "login",
    "datasets",
    "train",
    "jobs",
    "generate",
    "grid",
    "experiments",
    "adapters",
    "workers",
}


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple]:
    found: list[tuple] = [(path, parser)] if path else []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if path or name in REMOTE:
                    found += _commands(sub, (*path, name))
    return found


def test_every_remote_command_has_an_example_and_the_exit_codes() -> None:
    commands = _commands(build_parser())
    names = {" ".join(path) for path, _ in commands}
    assert {"train", "jobs logs", "adapters download", "datasets upload", "workers"} <= names
    assert {"grid", "experiments create", "experiments list", "experiments report"} <= names
    for path, parser in commands:
        assert parser.epilog and "example:\n  lorastack " in parser.epilog, path
        assert "130" in parser.epilog, path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("squares", ("squares", 1.0)),
        ("squares@3", ("squares@3", 1.0)),
        ("squares@prod:0.8", ("squares@prod", 0.8)),
        ("squares:-0.5", ("squares", -0.5)),
        # A checkpoint ref keeps its colon.
        ("squares@ckpt:400", ("squares@ckpt:400", 1.0)),
        ("squares@ckpt:400:0.8", ("squares@ckpt:400", 0.8)),
        ("job_0123@ckpt:2:-1", ("job_0123@ckpt:2", -1.0)),
    ],
)
def test_adapter_option(text: str, expected: tuple[str, float]) -> None:
    assert parse_adapter(text) == expected


def test_param_values_are_json_when_they_parse() -> None:
    assert parse_params(
        ["rank=8", "learning_rate=1e-4", "random_flip=true", "lr_scheduler=cosine"]
    ) == {
        "rank": 8,
        "learning_rate": 1e-4,
        "random_flip": True,
        "lr_scheduler": "cosine",
    }
    assert parse_params(['validation_prompts=["a", "b"]']) == {"validation_prompts": ["a", "b"]}
    with pytest.raises(UsageError):
        parse_params(["rank"])


def test_grid_axes_experiment_grids_and_select() -> None:
    assert parse_axis("adapter=none,sq@ckpt:400,sq@best", "--x") == {
        "axis": "adapter",
        "values": [None, "sq@ckpt:400", "sq@best"],
    }
    assert parse_axis("seed=1,2", "--y") == {"axis": "seed", "values": [1, 2]}
    assert parse_axis("weight=0.5,1", "--y") == {"axis": "weight", "values": [0.5, 1.0]}
    assert parse_axis("prompt=a cat, a dog", "--x") == {
        "axis": "prompt",
        "values": ["a cat", "a dog"],
    }
    for bad in ("colour=red", "seed=one", "seed=", "prompt=a,,b", "seed"):
        with pytest.raises(UsageError):
            parse_axis(bad, "--x")
    assert parse_grid(["rank=8,32", "train_text_encoder=false,true"]) == {
        "rank": [8, 32],
        "train_text_encoder": [False, True],
    }
    for bad_grid in (["rank"], ["rank="], ["=8"]):
        with pytest.raises(UsageError):
            parse_grid(bad_grid)
    assert parse_select("leakage:min") == {"metric": "leakage", "mode": "min"}
    with pytest.raises(UsageError):
        parse_select("leakage:lowest")
