"""Feeding host batches to JAX devices, and normalising uint8 images there.

Two layouts:
- "pmap": each numeric field `[D, b, ...]` becomes one jax.Array with one
  `[1, b, ...]` shard per device (a NamedSharding over a 1-D mesh of the
  devices, which is what `jax.pmap` consumes without moving data);
- "jit": each field becomes one global `(D * b, ...)` jax.Array sharded along
  the batch axis of a 1-D Mesh, assembled with
  `jax.make_array_from_process_local_data`, so the same code runs multi-host.
String fields (`id`) are not device data and stay NumPy on the host.
"""
from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from torch2flax.errors import ConfigError
from torch2flax.loaders.collate import LAYOUTS

__all__ = ["make_mesh", "normalize_on_device", "prefetch_to_device", "put_batch"]


def make_mesh(devices: Sequence[Any] | None = None, axis_name: str = "batch") -> jax.sharding.Mesh:
    """A 1-D `jax.sharding.Mesh` over `devices` (default: all devices, every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.sharding.Mesh(np.asarray(devices), (axis_name,))


def _is_device_data(x: Any) -> bool:
    return np.asarray(x).dtype.kind in "biufc"


def put_batch(
    batch: Mapping[str, Any],
    *,
    layout: str = "pmap",
    devices: Sequence[Any] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, Any]:
    """Put one host batch (fields `[D, b, ...]`) on the devices; see the module doc for layouts."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if layout == "pmap":
        if mesh is not None:
            raise ValueError("layout='pmap' takes `devices`, not `mesh`")
        devices = jax.local_devices() if devices is None else list(devices)
        sharding = NamedSharding(make_mesh(devices, "devices"), P("devices"))
        num_local = len(devices)
    else:
        if mesh is None:
            mesh = make_mesh(devices)
        elif devices is not None:
            raise ValueError("layout='jit' takes `mesh` or `devices`, not both")
        if len(mesh.axis_names) != 1:
            raise ValueError(f"layout='jit' needs a 1-D mesh, got axes {mesh.axis_names}")
        sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
        num_local = len(mesh.local_devices)
    out = {}
    for key, x in batch.items():
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim < 2 or x.shape[0] != num_local:
            raise ValueError(
                f"field {key!r} has shape {x.shape}; expected [{num_local} devices, per_device, ...] "
                "as make_loader / shard_batch produce"
            )
        flat = x.reshape((-1,) + x.shape[2:]) if layout == "jit" else x
        if not _is_device_data(x):
            out[key] = flat  # strings stay on the host, rows aligned with the arrays
        elif layout == "pmap":
            out[key] = jax.device_put(x, sharding)
        else:
            out[key] = jax.make_array_from_process_local_data(sharding, flat)
    return out


def prefetch_to_device(
    iterator: Iterable[Mapping[str, Any]],
    size: int = 2,
    *,
    layout: str = "pmap",
    devices: Sequence[Any] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield batches from `iterator` put on the devices, keeping `size` batches in flight.

    Transfers are asynchronous, so enqueuing `size` batches ahead overlaps the
    host->device copies with the training step. Hand-written rather than
    flax.jax_utils.prefetch_to_device because that one sends every leaf through
    device_put (string ids fail) and copies each batch through np.stack first.
    """
    if size < 1:
        raise ConfigError(f"prefetch size must be >= 1, got {size}")
    queue: collections.deque = collections.deque()
    iterator = iter(iterator)

    def enqueue(n: int) -> None:
        for batch in itertools.islice(iterator, n):
            queue.append(put_batch(batch, layout=layout, devices=devices, mesh=mesh))

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)


def normalize_on_device(
    images_uint8: jax.Array, mean: Sequence[float], std: Sequence[float], dtype: Any = jnp.float32
) -> jax.Array:
    """`(x / 255 - mean) / std` computed in float32, cast to `dtype`.

    `mean`/`std` are 0-1 scale per-channel tuples as in timm's `pretrained_cfg`;
    they become trace-time constants, so this is free to call inside `jax.jit`/`pmap`.
    """
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    x = jnp.asarray(images_uint8).astype(jnp.float32) / 255.0
    return ((x - mean) / std).astype(dtype)
