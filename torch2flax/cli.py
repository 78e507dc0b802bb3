"""The `torch2flax` console command.

Each subcommand lives beside the code it drives (``loaders``, ``torch2flax``,
``train``) in a module exposing ``register(subparsers)``; this file only lists
them. Command modules keep heavy imports (jax, torch) inside their handlers so
that ``torch2flax --help`` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from torch2flax import __version__

# Modules providing subcommands, in the order `--help` lists them.
COMMAND_MODULES: tuple[str, ...] = ("torch2flax.loaders.cli", "torch2flax.commands", "torch2flax.train.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torch2flax",
        description="Port timm backbones to Flax and train them on TFRecord data "
        "read through PyTorch DataLoaders, on TPU, GPU or CPU.",
    )
    parser.add_argument("--version", action="version", version=f"torch2flax {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
