"""Save and load converted (or fine-tuned) models: flax.serialization msgpack + a JSON sidecar.

`save(path, module, variables)` writes two files:

* `path` (e.g. `r50.msgpack`): `flax.serialization.msgpack_serialize` of
  `{"config": <json str>, "variables": <state dict>}`. It is self-contained and
  authoritative: `load` needs nothing else.
  With `portable=True` it also holds `"portable"`: the eval forward as a serialized
  `jax.export` program (`torch2flax.portable`), which `load` runs without torch or timm.
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

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from torch2flax.backend import backend_of, file_backend, variable_shapes
from torch2flax.errors import DataError, MissingFileError
from torch2flax.utils import atomic_write

FORMAT = "torch2flax"
# 2: every file names its backend, and its training state (`train`) has a version of its own. No
# release wrote version 1 (0.1.0 development files); readers take only this version.
FORMAT_VERSION = 2
COLLECTIONS = ("params", "batch_stats")


def sidecar_path(path: str | os.PathLike) -> str:
    """Where `save` writes the JSON sidecar of `path`."""
    return os.fspath(path) + ".json"


def module_config(module: Any) -> dict[str, Any]:
    """The JSON-ready config of a Flax model: format and version, then what its backend says
    rebuilds it (`Backend.file_config`: registry name and constructor arguments; a backend other
    than "native" adds its name and what rebuilding needs, an exported graph its timm name, image
    size and the torch/timm that exported it; an add-on head, `torch2flax.heads`, adds `"head"`)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **backend_of(module).file_config(module)}


def check_format(config: Mapping[str, Any], source: str) -> None:
    """A torch2flax model config of a format version this release reads, or a DataError saying
    which versions are which."""
    if not isinstance(config, Mapping) or config.get("format") != FORMAT or "model" not in config:
        got = config.get("format") if isinstance(config, Mapping) else type(config).__name__
        raise DataError(f"{source}: not a torch2flax model config (format={got!r})")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        from torch2flax import __version__

        known = isinstance(version, int) and not isinstance(version, bool)
        why = (": it was written by a newer torch2flax, upgrade to load it (pip install -U torch2flax)"
               if known and version > FORMAT_VERSION else
               ": it was written by a development version before the first release; convert the model again"
               if known else ": not a file any torch2flax release wrote")
        raise DataError(f"{source}: model file format version {version!r}; torch2flax {__version__} reads "
                        f"version {FORMAT_VERSION}{why}")


def module_from_config(config: Mapping[str, Any], source: str = "config", head: Any = None) -> Any:
    """The Flax module a `module_config` describes. `head`: the add-on head module to use instead
    of rebuilding the saved one (a head class defined in a notebook cannot be imported elsewhere)."""
    check_format(config, source)
    return file_backend(config, source).from_file_config(config, source, head=head)


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


def model_payload(module: Any, variables: Mapping, source: str = "variables", *, portable: bool = False,
                  image_size: int | tuple[int, int] | None = None) -> dict[str, Any]:
    """The model part of a file: config and `variables` (unreplicated, on the host); with
    `portable`, the eval forward program at `image_size` too (`torch2flax.portable.portable_program`)."""
    import jax
    from flax import serialization

    shapes = variable_shapes(module)
    state = serialization.to_state_dict(variables)
    state = {k: v for k, v in state.items() if k in COLLECTIONS}
    state, _ = unreplicate_like(state, dict(shapes), source=source)
    payload = {"config": json.dumps(module_config(module)), "variables": jax.device_get(state)}
    if portable:
        from torch2flax.portable import portable_program

        payload["portable"] = portable_program(module, payload["variables"], image_size=image_size)
    return payload


def write_payload(path: str | os.PathLike, payload: Mapping[str, Any]) -> tuple[str, str]:
    """Write a payload holding a model `config` to `path` and its JSON sidecar, both atomically."""
    from flax import serialization

    path = os.fspath(path)
    side = sidecar_path(path)
    atomic_write(side, (json.dumps(json.loads(payload["config"]), indent=2) + "\n").encode())
    atomic_write(path, serialization.msgpack_serialize(dict(payload)))
    return path, side


def read_payload(path: str | os.PathLike) -> dict[str, Any]:
    """The raw top-level mapping of a file `save` (or the trainer) wrote: its `config` (the model's,
    checked by `module_from_config`), `variables` and, in a training checkpoint, `train`."""
    from flax import serialization

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"no checkpoint at {path!r}")
    with open(path, "rb") as f:
        try:
            state = serialization.msgpack_restore(f.read())
        except Exception as e:
            raise DataError(f"{path}: not a msgpack checkpoint ({e})") from e
    if not (isinstance(state, dict) and isinstance(state.get("config"), str)):
        raise DataError(f"{path}: a msgpack file, but not a torch2flax model (it carries no model config): "
                        "pass a file torch2flax.save, `torch2flax convert` or the trainer wrote (variables saved "
                        "with flax.serialization: restore them and write them with torch2flax.save(path, module, "
                        "variables))")
    return state


def model_from_payload(payload: Mapping[str, Any], source: str, head: Any = None,
                       portable: bool | None = False) -> tuple[Any, Any]:
    """`(module, variables)` from `read_payload`'s mapping; a replicated tree is unreplicated.
    `head`: as in `module_from_config`. `portable`: as in `load`."""
    import jax
    import jax.numpy as jnp
    from flax.core import freeze

    tree = payload.get("variables")
    if not isinstance(tree, dict) or "params" not in tree:
        raise DataError(f"{source}: no 'params' in the stored variables")
    try:
        config = json.loads(payload["config"])
    except ValueError as e:  # a hand-edited or truncated JSON sidecar
        raise DataError(f"{source}: its model config is not valid JSON ({e})") from None
    tree = {k: v for k, v in tree.items() if k in COLLECTIONS}
    if portable is True and "portable" not in payload:
        raise DataError(f"{source}: holds no portable program; write one with `torch2flax convert ... --portable`, "
                        "`train --portable` or torch2flax.save(path, module, variables, portable=True)")
    if portable is not False and "portable" in payload:
        from torch2flax.portable import PortableModule, check_record, check_variables

        check_format(config, source)
        record = payload["portable"]
        check_record(record, source)
        check_variables(record, tree, source)
        module = PortableModule(record, record.get("pretrained_cfg", {}), config, source=source)
    else:
        module = module_from_config(config, source=source, head=head)
        try:
            tree, _ = unreplicate_like(tree, dict(variable_shapes(module)), source=source)
        except DataError as e:
            hint = file_backend(config, source).mismatch_hint(config)
            if not hint:
                raise
            raise DataError(f"{e}. {hint}") from None
    return module, freeze(jax.tree.map(jnp.asarray, tree))


def save(path: str | os.PathLike, module: Any, variables: Mapping, *, portable: bool = False,
         image_size: int | tuple[int, int] | None = None) -> tuple[str, str]:
    """Write `variables` (unreplicated, on host) to `path`, the config to `path + ".json"`.

    A pmap-replicated tree (every leaf with a leading device axis) is saved as one copy.
    `portable=True` adds the eval forward as a `jax.export` program for cpu, cuda and tpu, at
    `image_size` (default: the model's fixed or pretrained size), in float32 and bfloat16, which
    `load` runs with no torch or timm installed (`torch2flax.portable`). Returns the two paths written.
    """
    return write_payload(path, model_payload(module, variables, source=f"save({os.fspath(path)})",
                                             portable=portable, image_size=image_size))


def load(path: str | os.PathLike, *, head: Any = None, portable: bool | None = None) -> tuple[Any, Any]:
    """`(module, variables)` from a `save`d file (or any training checkpoint).

    A file with a portable program (`save(..., portable=True)`) loads as a
    `torch2flax.portable.PortableModule` that runs it: no torch, no timm, no re-export; it predicts
    (`module.apply(variables, x)`) but does not train. `portable=False` rebuilds the full Flax
    module instead, `portable=True` insists on the program.

    A model with an add-on head rebuilds its head from the saved class and fields; a head class
    that cannot be imported here (defined in a notebook's `__main__`) is passed as `head=`.
    """
    return model_from_payload(read_payload(path), source=os.fspath(path), head=head, portable=portable)


def add_portable(path: str | os.PathLike, image_size: int | tuple[int, int] | None = None) -> str:
    """Add (or replace) the portable program of the model file `path`, at `image_size` (see
    `save`); the rest of the file (a training checkpoint's `train` state too) is kept as it is."""
    from torch2flax.portable import portable_program

    payload = read_payload(path)
    module, variables = model_from_payload(payload, source=os.fspath(path), portable=False)
    payload["portable"] = portable_program(module, variables, image_size=image_size)
    write_payload(path, payload)
    return os.fspath(path)
