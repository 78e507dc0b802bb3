"""Small helpers every torch2flax package shares (no jax, flax or torch at import time)."""
from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import IO, Any


def lazy_exports(module_name: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for a package whose public names load on first use (PEP 562), so
    `import torch2flax` and the CLI's `--help` do not pay for jax, flax and torch.

    `exports` maps a public name to the module (absolute, or relative to `module_name` when it
    starts with ".") that defines it.
    """
    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        target = exports[name]
        module = importlib.import_module(module_name + target if target.startswith(".") else target)
        value = getattr(module, name)
        import sys

        setattr(sys.modules[module_name], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        import sys

        return sorted({*vars(sys.modules[module_name]), *exports})

    return __getattr__, __dir__


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[IO[bytes]], None]) -> None:
    """Write a file so that a reader, or a run killed mid-write, sees the old file or the new one,
    never a torn one: a temporary file beside `path`, flushed and fsynced, renamed into place.

    `data`: bytes, text (UTF-8), or a function that writes into the open binary file.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def freeze_value(value: Any) -> Any:
    """A hashable copy of plain data: lists and tuples become tuples, mappings sorted (key, value)
    tuples (Flax module fields and cache keys must hash)."""
    if isinstance(value, (list, tuple)):
        return tuple(freeze_value(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, freeze_value(v)) for k, v in value.items()))
    return value


def thaw_value(value: Any) -> Any:
    """The JSON-able form of a `freeze_value`d sequence: tuples become lists (mappings stay pairs)."""
    return [thaw_value(v) for v in value] if isinstance(value, tuple) else value


def add_deprecated_alias(parser: Any, old: str, new: str, dest: str, **kwargs: Any) -> None:
    """`old`, a hidden spelling of flag `new` (same `dest`): it still works, and says once, on
    stderr, what to type instead."""
    import argparse
    import sys

    class Deprecated(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"torch2flax: {option_string} is deprecated; use {new}", file=sys.stderr)
            setattr(namespace, self.dest, values)

    if kwargs.get("action") == "store_true":  # an old boolean switch
        kwargs.pop("action")
        kwargs.update(nargs=0, const=True)
    parser.add_argument(old, dest=dest, action=Deprecated, help=argparse.SUPPRESS, **kwargs)
