"""timm's model names without importing timm (which imports torch: seconds on a cold start).

The command line uses this to refuse a mistyped model name at once. timm registers each
architecture with `@register_model` above a function of the same name; reading those from
its sources gives exactly `timm.list_models()` (1,371 names in timm 1.0.31, in ~40 ms). If a
future timm stops matching this pattern, the scan finds nothing and the check stands aside:
timm's own registry, consulted later, stays the authority.
"""
from __future__ import annotations

import difflib
import functools
import importlib.util
import os
import re

from torch2flax.errors import ConfigError

_REGISTERED = re.compile(r"^@register_model\s*\ndef\s+(\w+)\s*\(", re.M)


@functools.lru_cache(maxsize=1)
def timm_model_names() -> frozenset[str]:
    """Architecture names timm registers (empty if timm is missing or its layout changed)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    models = os.path.join(list(spec.submodule_search_locations)[0], "models")
    names: set[str] = set()
    for entry in os.scandir(models) if os.path.isdir(models) else ():
        if entry.name.endswith(".py"):
            with open(entry.path, encoding="utf-8") as f:
                names.update(_REGISTERED.findall(f.read()))
    return frozenset(names)


def check_model_name(name: str) -> None:
    """Raise ConfigError (a ValueError) for a name (optionally with a `.tag`) that timm does not know."""
    names = timm_model_names()
    architecture = name.split(".", 1)[0]
    if not names or architecture in names:
        return
    close = difflib.get_close_matches(architecture, sorted(names), n=5, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown model {name!r}: timm has no architecture {architecture!r}{hint}")
