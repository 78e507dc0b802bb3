"""The `torch2flax` console command.

Each subcommand lives beside the code it drives (``loaders``, ``torch2flax``,
``train``) in a module exposing ``register(subparsers)``; this file only lists
them. Command modules keep heavy imports (jax, torch) inside their handlers so
that ``torch2flax --help`` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence

from torch2flax import __version__
from torch2flax.errors import UserError, from_worker

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


def is_user_error(e: BaseException) -> bool:
    """A mistake the user can fix (`torch2flax.errors`), or a path the OS could not find for
    them: the file or folder a user named (our own files are never missing but by a bug)."""
    return isinstance(e, UserError) or (isinstance(e, FileNotFoundError) and e.filename is not None)


def bug_report_line(e: BaseException) -> str:
    return (f"torch2flax: internal error ({type(e).__name__}): this is a bug in torch2flax {__version__}, not a "
            "mistake in your input. Please report it with the command you ran, the traceback above and the "
            "output of `torch2flax doctor`.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:  # a second Ctrl-C during training (train.preemption), or one elsewhere
        print(f"torch2flax: aborted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    except Exception as e:
        if not is_user_error(e):
            traceback.print_exc()
            print(bug_report_line(e), file=sys.stderr)
            return 1
        if os.environ.get("TORCH2FLAX_DEBUG"):  # the traceback of a user error too
            traceback.print_exc()
        print(f"torch2flax: error: {from_worker(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
