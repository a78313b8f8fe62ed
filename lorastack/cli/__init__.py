"""The ``lorastack`` command.

The composition root: the only package that wires ``service`` (the API) and ``workers`` (the
torch side) together, each imported lazily by the command that needs it.
"""

from __future__ import annotations

import argparse

from lorastack.cli import remote, server


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorastack", description="Train LoRA adapters and serve them over HTTP."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    server.register(sub)
    remote.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)
