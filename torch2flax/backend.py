"""The backend contract: how a finished timm model becomes a Flax module, and back.

A backend turns a `TimmSource` (the timm model `torch2flax.timm_source` built) into
`(module, variables)`, and answers everything later code asks of the modules it builds:
their variable shapes, their config (to save) and rebuilding from it (to load), the timm
model with their weights (to verify), a copy with a run's drop rates and input size, a
headless copy. Two ship: `native` (hand-written Flax twins, `torch2flax.native`) and `export`
(any timm model's `torch.export` graph, `torch2flax.export`). A third is one module that
subclasses `Backend`, decorates it with `@register_backend`, and is named in `_BUILTIN`
(or imported before use). Dispatch is by name or by the module's type, never by probing
attributes.
"""
from __future__ import annotations

import abc
import importlib
from collections.abc import Mapping
from typing import Any, ClassVar

from torch2flax.registry import Registry

# Where the shipped backends live, imported on first use: `import torch2flax` stays light, and no
# backend imports another (or this package's dispatch) to be found.
_BUILTIN = {"native": "torch2flax.native", "export": "torch2flax.export.backend"}
# Backends that wrap another backend's module rather than convert a timm model (an add-on head:
# `torch2flax.heads.HeadBackend`); found by module type like the others, never offered as `backend=`.
_WRAPPERS = {"head": "torch2flax.heads"}
_SHIPPED = {**_BUILTIN, **_WRAPPERS}
# A model file whose config has this key holds a wrapped model (its backbone's config beside it).
HEAD_KEY = "head"

BACKEND_REGISTRY: Registry[Backend] = Registry("backend")


class Backend(abc.ABC):
    """One way of building a Flax module from a timm model; instances are stateless."""

    name: ClassVar[str]
    module_types: ClassVar[tuple[type, ...]]  # the Flax module classes this backend builds
    # True when the modules run a graph of their own (not Flax submodules): their inner outputs
    # come from `module.intermediates(...)`, not from intercepting Flax methods (`features`).
    runs_own_graph: ClassVar[bool] = False
    # False for a backend that wraps another's modules (an add-on head) instead of converting timm models.
    converts: ClassVar[bool] = True

    @abc.abstractmethod
    def supports(self, architecture: str) -> bool:
        """Whether this backend can build timm architecture `architecture` (no `.tag`)."""

    def timm_kwargs(self, name: str, image_size: int | tuple[int, int] | None) -> dict[str, Any]:
        """Extra `timm.create_model` arguments this backend needs for `name` at `image_size`."""
        return {}

    @abc.abstractmethod
    def convert(self, source: Any, image_size: int | tuple[int, int] | None = None) -> tuple[Any, Any]:
        """`(module, variables)` for a `TimmSource`; variables: a FrozenDict of float32 collections."""

    @abc.abstractmethod
    def variable_shapes(self, module: Any) -> Any:
        """`{"params": ..., "batch_stats": ...}` as `jax.ShapeDtypeStruct`s, without running the model."""

    @abc.abstractmethod
    def to_timm(self, module: Any, variables: Mapping[str, Any]) -> Any:
        """The timm model (eval mode) carrying `variables`: the conversion run backwards."""

    def timm_create_kwargs(self, module: Any) -> dict[str, Any]:
        """The `timm.create_model(model_name(module), **kwargs)` arguments that build `module`'s
        architecture (class count included), for `torch2flax.save_timm`'s users."""
        from torch2flax.errors import ConfigError

        raise ConfigError(f"the {self.name} backend cannot say how timm builds {type(module).__name__}")

    @abc.abstractmethod
    def model_name(self, module: Any) -> str:
        """The timm architecture `module` was built for."""

    @abc.abstractmethod
    def config(self, module: Any) -> dict[str, Any]:
        """JSON-able constructor arguments: `from_config(model_name(m), config(m))` rebuilds `m`."""

    @abc.abstractmethod
    def from_config(self, model_name: str, config: Mapping[str, Any]) -> Any:
        """The module `config` describes."""

    @abc.abstractmethod
    def with_run_settings(self, module: Any, *, drop_rate: float, drop_path_rate: float,
                          image_size: int | None = None) -> Any:
        """`module` with a run's dropout / drop-path rates; raises if it cannot run at `image_size`."""

    def file_fields(self, module: Any) -> dict[str, Any]:
        """Extra top-level fields for a saved model file (provenance)."""
        return {}

    def mismatch_hint(self, config: Mapping[str, Any]) -> str:
        """What to tell a user whose saved variables do not fit the module rebuilt from `config`."""
        return ""

    def fixed_input_size(self, module: Any) -> tuple[int, int] | None:
        """The (H, W) `module` must be called at, or None if any size works."""
        return None

    def headless(self, module: Any) -> Any:
        """`module` without its classifier (`num_classes=0`), the other variables unchanged."""
        return module.clone(num_classes=0)

    def add_on_head(self, module: Any) -> Any:
        """The add-on head module on top of `module` (`torch2flax.heads`), or None."""
        return None

    def file_config(self, module: Any) -> dict[str, Any]:
        """The model part of a saved file's config (`torch2flax.io.module_config` adds the format)."""
        return {"backend": self.name, "model": self.model_name(module), "kwargs": self.config(module), **self.file_fields(module)}

    def from_file_config(self, config: Mapping[str, Any], source: str, head: Any = None) -> Any:
        """The module a `file_config` describes; `head`: an add-on head module to put on it."""
        from torch2flax.errors import ConfigError, DataError

        if head is not None:
            raise ConfigError(f"{source}: the model has no add-on head, but a head was passed; use "
                              "torch2flax.with_head to add one")
        try:
            return self.from_config(config["model"], config.get("kwargs", {}))
        except (KeyError, TypeError) as e:  # a field missing from the file, or one this version does not take
            raise DataError(f"{source}: its {config['model']} model config does not fit this torch2flax "
                            f"({type(e).__name__}: {e}); was it written by another version? Load it with that "
                            "version, or convert the model again") from e


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a `Backend` subclass available by its `name`."""
    BACKEND_REGISTRY.register(cls.name)(cls())
    return cls


def get_backend(name: str) -> Backend:
    """The backend called `name` ("native", "export", "head", or one registered by a plugin)."""
    if name not in BACKEND_REGISTRY and name in _SHIPPED:
        importlib.import_module(_SHIPPED[name])
    return BACKEND_REGISTRY.lookup(name)


def file_backend(config: Mapping[str, Any], source: str = "config") -> Backend:
    """The backend that rebuilds the model a saved file's config describes (`source`: the file, for errors)."""
    if HEAD_KEY in config:
        return get_backend("head")
    if "backend" not in config:
        from torch2flax.errors import DataError

        raise DataError(f"{source}: its model config names no backend (\"backend\": \"native\" or \"export\")")
    return get_backend(config["backend"])


def backend_names() -> tuple[str, ...]:
    """The backends that convert timm models (what `backend=` takes, with "auto")."""
    return tuple(dict.fromkeys([*_BUILTIN, *(n for n in BACKEND_REGISTRY if BACKEND_REGISTRY.lookup(n).converts)]))


def backend_choices() -> tuple[str, ...]:
    """What `backend=` accepts: "auto" (native where one exists) and every backend's name."""
    return ("auto", *backend_names())


def find_backend(module: Any, load: bool = True) -> Backend | None:
    """The backend that built `module` (by the module's type), or None for any other object.
    `load=False` looks only among backends already imported (no imports at trace time)."""
    for attempt in range(2 if load else 1):
        for backend in BACKEND_REGISTRY.values():
            if isinstance(module, backend.module_types):
                return backend
        if attempt == 0 and any(name not in BACKEND_REGISTRY for name in _SHIPPED):
            for name in _SHIPPED:
                get_backend(name)
        else:
            break
    return None


def backend_of(module: Any) -> Backend:
    """The backend that built `module` (by the module's type); TypeError for anything else."""
    backend = find_backend(module)
    if backend is not None:
        return backend
    raise TypeError(f"{type(module).__name__} is not a module any torch2flax backend builds "
                    f"(backends: {', '.join(backend_names())})")


def init_shapes(module: Any, input_hw: tuple[int, int] = (64, 64)) -> Any:
    """The variable shapes of any Flax module taking an NHWC batch (`module.in_chans` channels),
    from `jax.eval_shape` of its `init`: no FLOPs spent."""
    import jax
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct((1, *input_hw, module.in_chans), jnp.float32)
    return jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)


def variable_shapes(module: Any) -> Any:
    """Variable shapes of a backend's module, or of any other Flax image model (`init_shapes`)."""
    backend = find_backend(module)
    return backend.variable_shapes(module) if backend is not None else init_shapes(module)


def fixed_input_size(module: Any) -> tuple[int, int] | None:
    """The (H, W) `module` must be called at, or None (any size; also for modules no backend built)."""
    backend = find_backend(module)
    return backend.fixed_input_size(module) if backend is not None else None


def input_hw(module: Any, size: int | tuple[int, int] | None = None) -> tuple[int, int]:
    """The (H, W) to run `module` at: its fixed size if it has one, else `size`, else its pretrained size."""
    fixed = fixed_input_size(module)
    if fixed is not None:
        return fixed
    if size:
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    _, h, w = (module.pretrained_cfg or {}).get("input_size", (3, 224, 224))
    return (int(h), int(w))
