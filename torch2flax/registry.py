"""`Registry`: a name -> object table filled by a decorator, the one used throughout torch2flax
(backends, the export op table, its layout-aware ops, the native model families)."""
from __future__ import annotations

import difflib
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from torch2flax.errors import ConfigError

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """A dict whose entries are added by `@registry.register(key, ...)`; `lookup(key)` raises
    naming close keys when `key` is missing (`[]` and `.get` behave as for any dict)."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, *keys: Hashable) -> Callable[[T], T]:
        """Decorator: file the decorated object under every key given."""
        def deco(obj: T) -> T:
            for key in keys:
                self[key] = obj
            return obj
        return deco

    def lookup(self, key: Hashable) -> T:
        """The entry for `key`; a ConfigError (a ValueError) naming the close keys if there is none."""
        if key in self:
            return self[key]
        names = [str(k) for k in self]
        close = difflib.get_close_matches(str(key), names, n=5, cutoff=0.5)
        hint = f"; did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown {self.what} {key!r} (known: {', '.join(sorted(names)[:20])}){hint}")
