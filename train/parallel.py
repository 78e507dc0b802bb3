"""The two ways to spread a step over devices, behind one small interface.

`pmap`: the state is replicated (`flax.jax_utils.replicate`), batches arrive as
`[devices, per_device, ...]` and collectives use the axis name "batch".
`jit`: the state is replicated through a `NamedSharding` over a 1-D mesh, batches are
global arrays sharded along the batch axis, and XLA inserts the collectives.

Multi-host (`jax.distributed`), both layouts span every process's devices: `pmap` maps
over the global device list (each process feeds and reads its own devices' slices; the
collectives reduce over all hosts), `jit`'s mesh holds every device. The device list is
process-major, so process p's rows are the p-th slice of each global batch, as the
loader slices them.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from flax import jax_utils
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from torch2flax.errors import ConfigError
from torch2flax.loaders import make_mesh, prefetch_to_device
from torch2flax.loaders.collate import LAYOUTS

AXIS = "batch"


def select_devices(num_devices: int | None) -> list[jax.Device]:
    """The first `num_devices` local devices (all of them for None)."""
    local = jax.local_devices()
    if num_devices is not None and not 1 <= num_devices <= len(local):
        raise ConfigError(f"num_devices={num_devices}, but process {jax.process_index()} sees "
                          f"{len(local)} devices: give 1..{len(local)}, or leave it unset for all of them")
    return local[: num_devices or len(local)]


def global_devices(local: list[jax.Device]) -> list[jax.Device]:
    """The devices at `local`'s positions on every process, process by process."""
    if jax.process_count() == 1:
        return list(local)
    positions = [jax.local_devices().index(d) for d in local]
    by_process: dict[int, list[jax.Device]] = {}
    for d in jax.devices():
        by_process.setdefault(d.process_index, []).append(d)
    return [by_process[p][i] for p in sorted(by_process) for i in positions]


def _first_replica(x: jax.Array) -> np.ndarray:
    """Replica 0 of a `[devices, ...]` array, as a host array of shape `x.shape[1:]`."""
    shard = np.asarray(x.addressable_shards[0].data)  # on the host: no program per leaf shape
    # jax < 0.8 (pmap not yet built on shard_map): a jnp op on pmap outputs, such as the sum
    # evaluate() accumulates, returns one array on one device whose shard is the whole thing.
    return (shard[0] if shard.shape == x.shape else shard).reshape(x.shape[1:])


class Parallel:
    def __init__(self, layout: str, devices: list[jax.Device]):
        if layout not in LAYOUTS:
            raise ConfigError(f"parallel layout {layout!r}: expected one of {LAYOUTS}")
        self.layout = layout
        self.devices = list(devices)  # this process's
        self.global_devices = global_devices(self.devices)
        self.mesh = make_mesh(self.global_devices, axis_name=AXIS) if layout == "jit" else None

    @property
    def axis_name(self) -> str | None:
        """The collective axis a step function must reduce over (None: XLA does it)."""
        return AXIS if self.layout == "pmap" else None

    def compile(self, fn: Callable, *, donate_state: bool = False) -> Callable:
        """Wrap `fn(state_like, batch)`; the first argument is replicated."""
        donate = (0,) if donate_state else ()
        if self.layout == "pmap":
            # Multi-host pmap takes every process's devices; each process runs its own.
            return jax.pmap(fn, axis_name=AXIS, devices=self.global_devices, donate_argnums=donate)
        return jax.jit(fn, donate_argnums=donate)

    def replicate(self, tree: Any) -> Any:
        if self.layout == "pmap":
            # Host arrays: flax stacks device arrays with jnp.stack, one compile per leaf shape.
            return jax_utils.replicate(jax.device_get(tree), devices=self.devices)
        # From host values: each process supplies its (identical) copy of every replica.
        return jax.device_put(jax.device_get(tree), NamedSharding(self.mesh, PartitionSpec()))

    def unreplicate(self, tree: Any) -> Any:
        """A host copy of a replicated tree, or of metrics every device holds identically
        (one replica's bytes cross to the host, not all)."""
        if self.layout == "pmap":
            # Not flax.jax_utils.unreplicate: for pmap outputs on a subset of the local
            # devices (e.g. 1 of 8) it returns the shard with its leading axis kept.
            # The reshape happens on the host: on device it would compile one program per leaf shape.
            return jax.tree_util.tree_map(_first_replica, tree)
        return jax.device_get(tree)

    def feed(self, batches: Iterable[dict], size: int = 2) -> Iterator[dict]:
        if self.layout == "pmap":
            return prefetch_to_device(iter(batches), size, layout="pmap", devices=self.devices)
        return prefetch_to_device(iter(batches), size, layout="jit", mesh=self.mesh)

    def gather(self, array: Any) -> np.ndarray:
        """This process's rows of a per-sample output, on the host in sample order, `[b, ...]`."""
        if self.layout == "jit" and jax.process_count() > 1:
            array = multihost_utils.global_array_to_host_local_array(array, self.mesh, PartitionSpec(AXIS))
        array = np.asarray(jax.device_get(array))
        return array.reshape(-1, *array.shape[2:]) if self.layout == "pmap" else array

