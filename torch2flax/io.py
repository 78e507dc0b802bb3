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
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

FORMAT = "torch2flax"
FORMAT_VERSION = 1
COLLECTIONS = ("params", "batch_stats")


def sidecar_path(path: str | os.PathLike) -> str:
    """Where `save` writes the JSON sidecar of `path`."""
    return os.fspath(path) + ".json"


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it into place: a reader
    (or a run killed mid-write) sees the old file or the new one, never a torn one."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def module_config(module: Any) -> dict[str, Any]:
    """Registry name and constructor arguments of a Flax model, JSON-ready.

    An exported-graph model (`torch2flax.export`) records `"backend": "export"` and what
    rebuilding it needs (timm name and kwargs, image size): `load` re-exports it from timm.
    A model with an add-on head (`torch2flax.heads.HeadModel`) is its backbone's config plus
    `"head"`: the head's class (module and qualname) and its fields.
    """
    from torch2flax.heads import HeadModel
    from torch2flax.models import model_name

    if isinstance(module, HeadModel):
        return {**module_config(module.backbone), "head": head_config(module.head)}
    if hasattr(module, "variable_shapes"):  # an ExportedModel
        config = module.config()
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "backend": "export",
                "model": config["model_name"], "kwargs": config, "exported_with": export_versions()}

    kwargs = {}
    for f in dataclasses.fields(module):
        if f.name in ("parent", "name"):
            continue
        v = getattr(module, f.name)
        if f.name == "dtype":
            v = np.dtype(v).name
        elif f.name == "pretrained_cfg":
            v = dict(v.to_dict() if hasattr(v, "to_dict") else (v or {}))
        elif isinstance(v, tuple):
            v = list(v)
        kwargs[f.name] = v
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model_name(module), "kwargs": kwargs}


def export_versions() -> dict[str, str]:
    """The torch and timm an exported model's graph comes from: `load` re-exports it with the
    loading side's, so a file records them to name both sides when the graphs disagree."""
    import timm
    import torch

    return {"torch": torch.__version__.split("+")[0], "timm": timm.__version__}


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
            raise ValueError(f"{cls.__qualname__}.{f.name}={v!r} cannot be saved: head fields must be "
                             "JSON values (numbers, strings, bools, None, lists/tuples of them)") from None
        kwargs[f.name] = list(v) if isinstance(v, tuple) else v
    return {"module": cls.__module__, "qualname": cls.__qualname__, "kwargs": kwargs}


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def head_from_config(config: Mapping[str, Any], source: str = "config") -> Any:
    """The head `head_config` describes; a class this process cannot import raises, saying how to pass it."""
    import importlib

    import jax.numpy as jnp

    module_name, qualname = config["module"], config["qualname"]
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        where = ("the __main__ of the process that saved it (a notebook or script)" if module_name == "__main__"
                 else f"module {module_name!r}")
        raise ValueError(f"{source}: its head class {qualname} was defined in {where} and cannot be imported "
                         f"here; pass the head module: torch2flax.load(path, head={qualname}(...)), or define "
                         "the class in an importable module") from None
    kwargs = {k: getattr(jnp, v) if k.endswith("dtype") else _tuples(v) for k, v in config.get("kwargs", {}).items()}
    return obj(**kwargs)


def module_from_config(config: Mapping[str, Any], source: str = "config", head: Any = None) -> Any:
    """The Flax module a `module_config` describes. `head`: the add-on head module to use instead
    of rebuilding the saved one (a head class defined in a notebook cannot be imported elsewhere)."""
    import jax.numpy as jnp

    from torch2flax.models import create_model

    if config.get("format") != FORMAT or "model" not in config:
        raise ValueError(f"{source}: not a torch2flax model config (format={config.get('format')!r})")
    if "head" in config or head is not None:
        from torch2flax.heads import HeadModel

        if "head" not in config:
            raise ValueError(f"{source}: the model has no add-on head, but a head was passed; use "
                             "torch2flax.with_head to add one")
        backbone = module_from_config({k: v for k, v in config.items() if k != "head"}, source)
        if head is None:
            head = head_from_config(config["head"], source)
        return HeadModel(backbone, head, dtype=backbone.dtype, axis_name=backbone.axis_name)
    kwargs = dict(config.get("kwargs", {}))
    if config.get("backend", "native") == "export":
        from torch2flax.export.model import ExportedModel

        return ExportedModel.from_config(kwargs)
    if "dtype" in kwargs:
        # The scalar type (jnp.float32), not np.dtype: equal either way, but only
        # this keeps the module's hash equal to the saved one's (jit caches on it).
        kwargs["dtype"] = getattr(jnp, str(kwargs["dtype"]))
    return create_model(config["model"], **kwargs)


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
        raise ValueError(f"{source}: variable tree does not fit the model: missing {missing[:10]}, "
                         f"unexpected {extra[:10]}")
    lead = set()
    for k, ref in want.items():
        shape, ref_shape = tuple(np.shape(got[k])), tuple(ref.shape)
        if shape == ref_shape:
            lead.add(None)
        elif shape[1:] == ref_shape and len(shape) == len(ref_shape) + 1:
            lead.add(shape[0])
        else:
            raise ValueError(f"{source}: {'/'.join(k)} has shape {shape}, the model expects {ref_shape}")
    if lead == {None}:
        return unflatten_dict(got), 0
    if len(lead) == 1:
        (n,) = lead
        return unflatten_dict({k: v[0] for k, v in got.items()}), int(n)
    raise ValueError(f"{source}: some variables carry a leading device axis and others do not")


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
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    with open(path, "rb") as f:
        try:
            state = serialization.msgpack_restore(f.read())
        except Exception as e:
            raise ValueError(f"{path}: not a msgpack checkpoint ({e})") from e
    if isinstance(state, dict) and "config" in state:
        return state
    side = sidecar_path(path)
    if not os.path.isfile(side):
        raise ValueError(f"{path}: carries no model config and there is no sidecar {side}")
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
        raise ValueError(f"{source}: no 'params' in the stored variables")
    config = json.loads(payload["config"])
    module = module_from_config(config, source=source, head=head)
    shapes = variable_shapes(module)
    tree = {k: v for k, v in tree.items() if k in COLLECTIONS}
    try:
        tree, _ = unreplicate_like(tree, dict(shapes), source=source)
    except ValueError as e:
        if config.get("backend") != "export":
            raise
        # The graph was exported again here, from this side's torch and timm; the file's variables
        # fit the graph the writing side's versions gave.
        versions = lambda v: ", ".join(f"{k} {x}" for k, x in v.items())
        written = config.get("exported_with")
        raise ValueError(f"{e}. The file's {config['model']} graph was exported with "
                         f"{versions(written) if written else 'unrecorded versions (an older file)'}; this "
                         f"process re-exported it with {versions(export_versions())}, whose graph differs: load "
                         "it with the writing side's torch and timm, or convert the model again here") from None
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
