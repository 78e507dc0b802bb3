"""Save and load converted (or fine-tuned) models: flax.serialization msgpack + a JSON sidecar.

`save(path, module, variables)` writes two files:

* `path` (e.g. `r50.msgpack`): `flax.serialization.msgpack_serialize` of
  `{"config": <json str>, "variables": <state dict>}`. It is self-contained and
  authoritative: `load` needs nothing else.
* `path + ".json"` (e.g. `r50.msgpack.json`): the same config, human-readable
  (registry name, constructor arguments, format version; a model with an add-on head,
  `torch2flax.heads`, adds `"head"`: the head's class and fields).

Both are written atomically (temporary file in the same directory, fsync,
`os.replace`), the msgpack last, so a kill at any moment leaves either the old
or the new file, never a truncated one. This module knows models only: a file
may carry more top-level keys (the trainer's checkpoints add `"train"`), which
`load` ignores, so every training checkpoint is also a model file.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from torch2flax.backend import backend_of, get_backend
from torch2flax.errors import ConfigError, DataError, MissingFileError
from torch2flax.utils import atomic_write, freeze_value

FORMAT = "torch2flax"
FORMAT_VERSION = 1
COLLECTIONS = ("params", "batch_stats")


def sidecar_path(path: str | os.PathLike) -> str:
    """Where `save` writes the JSON sidecar of `path`."""
    return os.fspath(path) + ".json"


def module_config(module: Any) -> dict[str, Any]:
    """Registry name, backend and constructor arguments of a Flax model, JSON-ready.

    A backend other than "native" records its name (`"backend": "export"`) and what rebuilding
    the module needs (an exported graph: timm name and kwargs, image size, and the torch/timm
    that exported it): `load` asks that backend to rebuild it. A model with an add-on head
    (`torch2flax.heads.HeadModel`) is its backbone's config plus `"head"`: the head's class
    (module and qualname) and its fields.
    """
    from torch2flax.heads import HeadModel

    if isinstance(module, HeadModel):
        return {**module_config(module.backbone), "head": head_config(module.head)}
    backend = backend_of(module)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION}
    if backend.name != "native":  # files from before the backends had no "backend": native
        config["backend"] = backend.name
    return {**config, "model": backend.model_name(module), "kwargs": backend.config(module),
            **backend.file_fields(module)}


# Head fields that follow the HeadModel (its dtype and BatchNorm sync axis), not saved with the head.
_HEAD_MODEL_FIELDS = ("parent", "name", "dtype", "axis_name")


def head_config(head: Any) -> dict[str, Any]:
    """The class (module path + qualname) and JSON-able fields of an add-on head."""
    cls = type(head)
    kwargs = {}
    for f in dataclasses.fields(head):
        if f.name in _HEAD_MODEL_FIELDS:
            continue
        v = getattr(head, f.name)
        if f.name.endswith("dtype"):
            v = np.dtype(v).name
        try:
            json.dumps(v)
        except TypeError:
            raise ConfigError(f"{cls.__qualname__}.{f.name}={v!r} cannot be saved: head fields must be "
                             "JSON values (numbers, strings, bools, None, lists/tuples of them)") from None
        kwargs[f.name] = list(v) if isinstance(v, tuple) else v
    return {"module": cls.__module__, "qualname": cls.__qualname__, "kwargs": kwargs}


def head_from_config(config: Mapping[str, Any], source: str = "config") -> Any:
    """The head `head_config` describes; a class this process cannot import raises, saying how to pass it."""
    import importlib

    import jax.numpy as jnp

    try:
        module_name, qualname = config["module"], config["qualname"]
    except KeyError as e:
        raise DataError(f"{source}: the add-on head's config lacks {e}: the file is damaged") from None
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        where = ("the __main__ of the process that saved it (a notebook or script)" if module_name == "__main__"
                 else f"module {module_name!r}")
        raise DataError(f"{source}: its head class {qualname} was defined in {where} and cannot be imported "
                         f"here; pass the head module: torch2flax.load(path, head={qualname}(...)), or define "
                         "the class in an importable module") from None
    kwargs = {k: getattr(jnp, v) if k.endswith("dtype") else freeze_value(v) for k, v in config.get("kwargs", {}).items()}
    return obj(**kwargs)


def module_from_config(config: Mapping[str, Any], source: str = "config", head: Any = None) -> Any:
    """The Flax module a `module_config` describes. `head`: the add-on head module to use instead
    of rebuilding the saved one (a head class defined in a notebook cannot be imported elsewhere)."""
    if config.get("format") != FORMAT or "model" not in config:
        raise DataError(f"{source}: not a torch2flax model config (format={config.get('format')!r})")
    if "head" in config or head is not None:
        from torch2flax.heads import HeadModel

        if "head" not in config:
            raise ConfigError(f"{source}: the model has no add-on head, but a head was passed; use "
                             "torch2flax.with_head to add one")
        backbone = module_from_config({k: v for k, v in config.items() if k != "head"}, source)
        if head is None:
            head = head_from_config(config["head"], source)
        return HeadModel(backbone, head, dtype=backbone.dtype, axis_name=backbone.axis_name)
    backend = get_backend(config.get("backend", "native"))
    try:
        return backend.from_config(config["model"], config.get("kwargs", {}))
    except (KeyError, TypeError) as e:  # a field missing from the file, or one this version does not take
        raise DataError(f"{source}: its {config['model']} model config does not fit this torch2flax "
                        f"({type(e).__name__}: {e}); was it written by another version? Load it with that "
                        "version, or convert the model again") from e


def unreplicate_like(variables: Mapping, shapes: Mapping, source: str = "variables") -> tuple[dict, int]:
    """Check `variables` against the module's variable `shapes`, dropping a device axis if replicated.

    A tree from `flax.jax_utils.replicate` has every leaf shaped `(n, *expected)`;
    it is detected and copy 0 is kept. Returns `(tree, n)` (`n == 0`: not replicated).
    Any other mismatch raises, naming the variable path and both shapes.
    """
    from flax.traverse_util import flatten_dict, unflatten_dict

    got, want = flatten_dict(variables), flatten_dict(shapes)
    missing = ["/".join(k) for k in want if k not in got]
    extra = ["/".join(k) for k in got if k not in want]
    if missing or extra:
        raise DataError(f"{source}: variable tree does not fit the model: missing {missing[:10]}, "
                         f"unexpected {extra[:10]}")
    lead = set()
    for k, ref in want.items():
        shape, ref_shape = tuple(np.shape(got[k])), tuple(ref.shape)
        if shape == ref_shape:
            lead.add(None)
        elif shape[1:] == ref_shape and len(shape) == len(ref_shape) + 1:
            lead.add(shape[0])
        else:
            raise DataError(f"{source}: {'/'.join(k)} has shape {shape}, the model expects {ref_shape}")
    if lead == {None}:
        return unflatten_dict(got), 0
    if len(lead) == 1:
        (n,) = lead
        return unflatten_dict({k: v[0] for k, v in got.items()}), int(n)
    raise DataError(f"{source}: some variables carry a leading device axis and others do not")


def model_payload(module: Any, variables: Mapping, source: str = "variables") -> dict[str, Any]:
    """The model part of a file: config and `variables` (unreplicated, on the host)."""
    import jax
    from flax import serialization

    from torch2flax.heads import variable_shapes

    shapes = variable_shapes(module)
    state = serialization.to_state_dict(variables)
    state = {k: v for k, v in state.items() if k in COLLECTIONS}
    state, _ = unreplicate_like(state, dict(shapes), source=source)
    return {"config": json.dumps(module_config(module)), "variables": jax.device_get(state)}


def write_payload(path: str | os.PathLike, payload: Mapping[str, Any]) -> tuple[str, str]:
    """Write a payload holding a model `config` to `path` and its JSON sidecar, both atomically."""
    from flax import serialization

    path = os.fspath(path)
    side = sidecar_path(path)
    atomic_write(side, (json.dumps(json.loads(payload["config"]), indent=2) + "\n").encode())
    atomic_write(path, serialization.msgpack_serialize(dict(payload)))
    return path, side


def read_payload(path: str | os.PathLike) -> dict[str, Any]:
    """The raw top-level mapping of a file `save` (or the trainer) wrote.

    A bare `flax.serialization.to_bytes(variables)` file is accepted when a sidecar
    `path + ".json"` names the model.
    """
    from flax import serialization

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"no checkpoint at {path!r}")
    with open(path, "rb") as f:
        try:
            state = serialization.msgpack_restore(f.read())
        except Exception as e:
            raise DataError(f"{path}: not a msgpack checkpoint ({e})") from e
    if isinstance(state, dict) and "config" in state:
        return state
    side = sidecar_path(path)
    if not os.path.isfile(side):
        raise DataError(f"{path}: carries no model config and there is no sidecar {side}: pass a file "
                        "torch2flax.save, `torch2flax convert` or the trainer wrote")
    with open(side) as f:
        return {"config": f.read(), "variables": state}


def model_from_payload(payload: Mapping[str, Any], source: str, head: Any = None) -> tuple[Any, Any]:
    """`(module, variables)` from `read_payload`'s mapping; a replicated tree is unreplicated.
    `head`: as in `module_from_config`."""
    import jax
    import jax.numpy as jnp
    from flax.core import freeze

    from torch2flax.heads import variable_shapes

    tree = payload.get("variables")
    if not isinstance(tree, dict) or "params" not in tree:
        raise DataError(f"{source}: no 'params' in the stored variables")
    try:
        config = json.loads(payload["config"])
    except ValueError as e:  # a hand-edited or truncated JSON sidecar
        raise DataError(f"{source}: its model config is not valid JSON ({e})") from None
    module = module_from_config(config, source=source, head=head)
    shapes = variable_shapes(module)
    tree = {k: v for k, v in tree.items() if k in COLLECTIONS}
    try:
        tree, _ = unreplicate_like(tree, dict(shapes), source=source)
    except DataError as e:
        hint = get_backend(config.get("backend", "native")).mismatch_hint(config)
        if not hint:
            raise
        raise DataError(f"{e}. {hint}") from None
    return module, freeze(jax.tree.map(jnp.asarray, tree))


def save(path: str | os.PathLike, module: Any, variables: Mapping) -> tuple[str, str]:
    """Write `variables` (unreplicated, on host) to `path`, the config to `path + ".json"`.

    A pmap-replicated tree (every leaf with a leading device axis) is saved as one copy.
    Returns the two paths written.
    """
    return write_payload(path, model_payload(module, variables, source=f"save({os.fspath(path)})"))


def load(path: str | os.PathLike, *, head: Any = None) -> tuple[Any, Any]:
    """`(module, variables)` from a `save`d file (or any training checkpoint).

    A model with an add-on head rebuilds its head from the saved class and fields; a head class
    that cannot be imported here (defined in a notebook's `__main__`) is passed as `head=`.
    """
    return model_from_payload(read_payload(path), source=os.fspath(path), head=head)
