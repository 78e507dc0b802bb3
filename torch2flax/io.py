"""Save and load converted (or fine-tuned) models: flax.serialization msgpack + a JSON sidecar.

`save(path, ...)` writes two files:

* `path` (e.g. `r50.msgpack`): `flax.serialization.msgpack_serialize` of
  `{"config": <json str>, "variables": <state dict>, "extra": <state dict | None>}`.
  It is self-contained and authoritative: `load` needs nothing else.
* `path + ".json"` (e.g. `r50.msgpack.json`): the same config, human-readable
  (registry name, constructor arguments, format version).

Both are written atomically (temporary file in the same directory, fsync,
`os.replace`), the msgpack last, so a kill at any moment leaves either the old
or the new checkpoint, never a truncated one.
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
    """Registry name and constructor arguments of a Flax model, JSON-ready."""
    from torch2flax.models import model_name

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


def module_from_config(config: Mapping[str, Any], source: str = "config") -> Any:
    import jax.numpy as jnp

    from torch2flax.models import create_model

    if config.get("format") != FORMAT or "model" not in config:
        raise ValueError(f"{source}: not a torch2flax model config (format={config.get('format')!r})")
    kwargs = dict(config.get("kwargs", {}))
    if "dtype" in kwargs:
        # The scalar type (jnp.float32), not np.dtype: equal either way, but only
        # this keeps the module's hash equal to the saved one's (jit caches on it).
        kwargs["dtype"] = getattr(jnp, str(kwargs["dtype"]))
    return create_model(config["model"], **kwargs)


def _flat(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def _unflat(flat: Mapping[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for k, v in flat.items():
        d = out
        for part in k[:-1]:
            d = d.setdefault(part, {})
        d[k[-1]] = v
    return out


def unreplicate_like(variables: Mapping, shapes: Mapping, source: str = "variables") -> tuple[dict, int]:
    """Check `variables` against the module's variable `shapes`, dropping a device axis if replicated.

    A tree from `flax.jax_utils.replicate` has every leaf shaped `(n, *expected)`;
    it is detected and copy 0 is kept. Returns `(tree, n)` (`n == 0`: not replicated).
    Any other mismatch raises, naming the variable path and both shapes.
    """
    got, want = _flat(variables), _flat(shapes)
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
        return _unflat(got), 0
    if len(lead) == 1:
        (n,) = lead
        return _unflat({k: v[0] for k, v in got.items()}), int(n)
    raise ValueError(f"{source}: some variables carry a leading device axis and others do not")


def _unreplicate_extra(extra: Any, n: int) -> Any:
    """Leaves laid out like a replicated tree (n identical copies over n devices) become one copy."""
    import jax

    def one(x):
        if (isinstance(x, jax.Array) and x.ndim >= 1 and x.shape[0] == n
                and len(x.sharding.device_set) == n):
            host = np.asarray(jax.device_get(x))
            if all(np.array_equal(host[0], host[i]) for i in range(1, n)):
                return host[0]
        return x

    return jax.tree.map(one, extra)


def save(path: str | os.PathLike, module: Any, variables: Mapping, *, extra: Any = None) -> tuple[str, str]:
    """Write `variables` (unreplicated, on host) and `extra` to `path`, config to `path + ".json"`.

    `extra` is any pytree of arrays/scalars (optimizer state, step, RNG, ...);
    `load(path, with_extra=True)` returns it as a state dict, to restore with
    `flax.serialization.from_state_dict`. Returns the two paths written.
    """
    import jax
    from flax import serialization

    from torch2flax.convert import flax_layers

    path = os.fspath(path)
    config = module_config(module)
    shapes, _ = flax_layers(module)
    state = serialization.to_state_dict(variables)
    state = {k: v for k, v in state.items() if k in ("params", "batch_stats")}
    state, n = unreplicate_like(state, dict(shapes), source=f"save({path})")
    if n and extra is not None:
        extra = _unreplicate_extra(extra, n)
    state = jax.device_get(state)
    extra_state = jax.device_get(serialization.to_state_dict(extra)) if extra is not None else None
    payload = serialization.msgpack_serialize({
        "config": json.dumps(config), "variables": state, "extra": extra_state,
    })
    side = sidecar_path(path)
    atomic_write(side, (json.dumps(config, indent=2) + "\n").encode())
    atomic_write(path, payload)
    return path, side


def load(path: str | os.PathLike, *, with_extra: bool = False):
    """`(module, variables)` from a `save`d file, or `(module, variables, extra)` with `with_extra=True`.

    Also reads a bare `flax.serialization.to_bytes(variables)` file if a sidecar
    `path + ".json"` names the model. A replicated tree is detected and unreplicated.
    """
    import jax.numpy as jnp
    from flax import serialization
    from flax.core import freeze

    from torch2flax.convert import flax_layers

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    with open(path, "rb") as f:
        try:
            state = serialization.msgpack_restore(f.read())
        except Exception as e:
            raise ValueError(f"{path}: not a msgpack checkpoint ({e})") from e
    extra = None
    if isinstance(state, dict) and "config" in state:
        config = json.loads(state["config"])
        tree, extra = state.get("variables"), state.get("extra")
    else:
        side = sidecar_path(path)
        if not os.path.isfile(side):
            raise ValueError(f"{path}: carries no model config and there is no sidecar {side}")
        with open(side) as f:
            config = json.load(f)
        tree = state
    if not isinstance(tree, dict) or "params" not in tree:
        raise ValueError(f"{path}: no 'params' in the stored variables")
    module = module_from_config(config, source=path)
    shapes, _ = flax_layers(module)
    tree = {k: v for k, v in tree.items() if k in ("params", "batch_stats")}
    tree, _ = unreplicate_like(tree, dict(shapes), source=path)
    variables = freeze(_map(tree, jnp.asarray))
    if with_extra:
        return module, variables, extra
    return module, variables


def _map(tree: Mapping, fn: Any) -> dict:
    return {k: _map(v, fn) if isinstance(v, Mapping) else fn(v) for k, v in tree.items()}
