"""Batching for JAX: stack samples into NumPy arrays and reshape them for `pmap`.

torch's `default_collate` returns torch tensors; JAX wants NumPy (no torch
round-trip, strings kept), so these are written for that and nothing else.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from torch2flax.errors import ConfigError

__all__ = ["LAYOUTS", "numpy_collate", "pad_batch", "shard_batch"]

# How a batch is laid out on the devices (loaders.device): "pmap", `[devices, per_device, ...]`
# arrays for jax.pmap, or "jit", one global batch sharded along its first axis.
LAYOUTS = ("pmap", "jit")


def _stack(key: str, values: Sequence[Any]) -> np.ndarray:
    first = values[0]
    if isinstance(first, (str, bytes)):
        if any(not isinstance(v, type(first)) for v in values):
            raise TypeError(f"numpy_collate: field {key!r} mixes strings and other types")
        return np.asarray(values)  # '<U..' / 'S..' array
    if hasattr(first, "numpy") and not isinstance(first, np.ndarray):  # a torch tensor
        values = [v.numpy() for v in values]
    try:
        return np.stack([np.asarray(v) for v in values])
    except ValueError as e:
        shapes = sorted({np.shape(v) for v in values})
        raise ConfigError(
            f"numpy_collate: field {key!r} has samples of different shapes {shapes[:4]}; "
            "resize/crop images to one size in the transform"
        ) from e


def numpy_collate(samples: Sequence[Mapping[str, Any] | Sequence[Any]]) -> dict[str, np.ndarray]:
    """Stack a list of sample dicts (or tuples) into a dict of NumPy arrays.

    Dict samples keep their keys; tuple samples become keys "0", "1", ... .
    Strings (like `id`) become NumPy string arrays; nothing becomes a torch tensor.
    """
    if len(samples) == 0:
        raise ValueError("numpy_collate: empty list of samples")
    first = samples[0]
    if isinstance(first, Mapping):
        keys = list(first)
        for i, s in enumerate(samples):
            if set(s) != set(keys):
                raise KeyError(
                    f"numpy_collate: sample {i} has keys {sorted(s)}, sample 0 has {sorted(keys)}"
                )
        return {k: _stack(k, [s[k] for s in samples]) for k in keys}
    if isinstance(first, (tuple, list)):
        n = len(first)
        for i, s in enumerate(samples):
            if len(s) != n:
                raise ValueError(
                    f"numpy_collate: sample {i} has {len(s)} fields, sample 0 has {n}"
                )
        return {str(j): _stack(str(j), [s[j] for s in samples]) for j in range(n)}
    raise TypeError(
        f"numpy_collate: samples must be dicts or tuples, got {type(first).__name__}"
    )


def _pad_value(x: np.ndarray) -> Any:
    return "" if x.dtype.kind == "U" else (b"" if x.dtype.kind == "S" else 0)


def pad_batch(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pad every field's leading axis to `size` and add a bool `mask` (False on padding).

    Padding rows repeat zeros (strings: ""). An existing `mask` is padded with False.
    """
    n = _leading_size(batch)
    if size < n:
        raise ConfigError(f"pad_batch: batch of {n} is larger than the padded size {size}")
    out = {}
    for k, x in batch.items():
        pad = np.full((size - n,) + x.shape[1:], _pad_value(x), dtype=x.dtype)
        out[k] = np.concatenate([x, pad]) if size > n else x
    if "mask" not in batch:
        out["mask"] = np.arange(size) < n
    return out


def _leading_size(batch: Mapping[str, np.ndarray]) -> int:
    sizes = {k: np.shape(x)[0] if np.ndim(x) else None for k, x in batch.items()}
    distinct = set(sizes.values())
    if len(distinct) != 1 or None in distinct:
        raise ValueError(f"batch fields disagree on the leading (batch) axis: {sizes}")
    return distinct.pop()


def shard_batch(
    batch: Mapping[str, np.ndarray], num_devices: int, *, pad: bool = False, pad_to: int | None = None
) -> dict[str, np.ndarray]:
    """Reshape every field's leading axis B to [num_devices, B // num_devices, ...].

    With `pad=True` the batch is first padded to the next multiple of
    `num_devices` (or to `pad_to`, itself a multiple) and a bool `mask` of shape
    [num_devices, per_device] marks real rows (False on padding; `id` padded with "").
    Without padding, a B not divisible by `num_devices` is an error.
    """
    if num_devices < 1:
        raise ConfigError(f"shard_batch: num_devices must be >= 1, got {num_devices}")
    batch = {k: np.asarray(v) for k, v in batch.items()}
    n = _leading_size(batch)
    if pad:
        size = pad_to if pad_to is not None else -(-n // num_devices) * num_devices
        if size % num_devices:
            raise ConfigError(f"shard_batch: pad_to={size} is not a multiple of {num_devices} devices")
        batch = pad_batch(batch, size)
        n = size
    elif n % num_devices:
        raise ConfigError(
            f"shard_batch: batch of {n} cannot be split evenly over {num_devices} devices; "
            f"use a batch size that is a multiple of {num_devices} (e.g. {n - n % num_devices or num_devices}) "
            "or pass pad=True to pad it and get a `mask`"
        )
    per_device = n // num_devices
    # reshape of a C-contiguous array is a view: no copy on the host.
    return {k: x.reshape((num_devices, per_device) + x.shape[1:]) for k, x in batch.items()}
