"""Registry of the timm architectures torch2flax can convert: name -> Flax constructor.

Each family module (`resnet.py`, ...) exports `MODELS` (timm name -> Flax
constructor arguments) and `TORCH_MODULE_TYPES` (the torch module types its
Flax modules reproduce). Registry names are timm's, so the same name builds
the timm model and its Flax twin.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch2flax.errors import ConfigError
from torch2flax.models import resnet
from torch2flax.registry import Registry
from torch2flax.utils import freeze_value


class PretrainedCfg(Mapping):
    """Immutable, hashable mapping of timm `pretrained_cfg` facts (Flax module fields must hash)."""

    __slots__ = ("_items",)

    def __init__(self, data: Mapping[str, Any] | None = None, **kwargs: Any):
        merged = dict(data or {}, **kwargs)
        self._items = tuple(sorted((str(k), freeze_value(v)) for k, v in merged.items()))

    def __getitem__(self, key: str) -> Any:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self) == dict(other)

    def __repr__(self) -> str:
        return f"PretrainedCfg({dict(self)!r})"

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self._items}


# Only plain values are kept: the facts a trainer needs, plus provenance.
_CFG_KEYS = ("architecture", "tag", "hf_hub_id", "input_size", "test_input_size", "interpolation",
             "crop_pct", "test_crop_pct", "crop_mode", "mean", "std", "num_classes", "first_conv", "classifier")


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    name: str
    constructor: type
    kwargs: Mapping[str, Any]
    torch_module_types: frozenset[str]
    flax_kwargs: Callable[[Any], dict[str, Any]]  # timm model -> family-specific Flax arguments
    timm_kwargs: Callable[[Any], dict[str, Any]]  # Flax module -> timm arguments rebuilding it


_REGISTRY: Registry[ModelEntry] = Registry("native model")


def _register_family(module: Any) -> None:
    for name, kwargs in module.MODELS.items():
        _REGISTRY.register(name)(ModelEntry(name, module.MODEL_CLASS, dict(kwargs), module.TORCH_MODULE_TYPES,
                                            module.flax_kwargs, module.timm_kwargs))


_register_family(resnet)


def model_classes() -> tuple[type, ...]:
    """The Flax module classes of the registered families."""
    return tuple(dict.fromkeys(e.constructor for e in _REGISTRY.values()))


def list_models(pattern: str = "*") -> list[str]:
    """Supported timm names matching an fnmatch `pattern`, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_entry(name: str) -> ModelEntry:
    """The registry entry for `name`; an unknown name raises listing close supported names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown model {name!r}: torch2flax supports {len(_REGISTRY)} timm models "
            f"(`torch2flax list`).{hint}"
        ) from None


def pretrained_cfg_from_timm(cfg: Mapping[str, Any] | Any) -> PretrainedCfg:
    """Keep the plain facts of a timm pretrained_cfg (dict or timm `PretrainedCfg`)."""
    if not isinstance(cfg, Mapping):
        cfg = cfg.to_dict()
    return PretrainedCfg({k: cfg[k] for k in _CFG_KEYS if cfg.get(k) is not None})


def create_model(name: str, **kwargs: Any):
    """The Flax module for timm model `name`; kwargs as timm's (num_classes, drop_rate, ...).

    `pretrained_cfg` defaults to timm's default config for `name` (read from
    timm's registry, without downloading anything).
    """
    entry = get_entry(name)
    cfg = kwargs.pop("pretrained_cfg", None)
    if cfg is None:
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
        cfg = pretrained_cfg_from_timm(cfg) if cfg is not None else PretrainedCfg()
    elif not isinstance(cfg, PretrainedCfg):
        cfg = PretrainedCfg(cfg)
    for key in ("layers", "channels"):  # JSON (a saved model's config) has lists; module fields are hashable
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    fields = {f.name for f in dataclasses.fields(entry.constructor)} - {"parent", "name"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise TypeError(f"{name}: unknown argument(s) {unknown}; the Flax module takes {sorted(fields)}")
    return entry.constructor(**{**entry.kwargs, **kwargs, "pretrained_cfg": cfg})


def registry_name(module: Any) -> str:
    """The registry name a native Flax module was built for (from its pretrained_cfg, else by arguments)."""
    cfg = getattr(module, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if arch in _REGISTRY:
        return arch
    for name, entry in _REGISTRY.items():
        if isinstance(module, entry.constructor) and all(getattr(module, k) == v for k, v in entry.kwargs.items()):
            return name
    raise ConfigError(f"{type(module).__name__} matches no registered model: build it with "
                      "torch2flax.create_model(name, ...) or torch2flax.convert, which record its timm name")


__all__ = ["PretrainedCfg", "ModelEntry", "list_models", "create_model", "get_entry", "model_classes"]
