"""Channels-last propagation: 4-D activations stay NHWC between the ops that allow it.

The exported graph is NCHW; XLA's convolutions (and the native models' `layers.conv2d`)
are NHWC. Transposing around every convolution costs little in inference, where XLA
folds the transposes into neighbouring fusions, but not in training: each transpose
has its transpose in the backward pass, and each splits an elementwise chain (BN,
activation, residual add) into more fusions: without this module the exported resnet50
train step ran well below the native model's (docs/benchmarks.md).

So a convolution returns a `ChannelsLast`: the logical NCHW tensor held as NHWC data.
Ops in `OPS` below accept it and keep it (elementwise ops, BatchNorm, max-pooling,
spatial means, channel concatenation/splits, padding, permutes); every other op gets
the NCHW array (`nchw()`, one transpose per tensor, cached), so semantics never depend
on this module, only the number of transposes does.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from torch2flax.export import ops
from torch2flax.registry import Registry

aten = ops.aten
Array = jax.Array

# Position of each NCHW dim in the NHWC data.
_POS = (0, 3, 1, 2)


class ChannelsLast:
    """A logical NCHW tensor whose data is NHWC (`data[n, h, w, c] == logical[n, c, h, w]`)."""

    __slots__ = ("data", "_nchw")

    def __init__(self, data: Array):
        self.data = data
        self._nchw = None

    @property
    def shape(self) -> tuple[int, ...]:
        n, h, w, c = self.data.shape
        return (n, c, h, w)

    @property
    def ndim(self) -> int:
        return 4

    @property
    def dtype(self) -> Any:
        return self.data.dtype

    def nchw(self) -> Array:
        if self._nchw is None:
            self._nchw = self.data.transpose(0, 3, 1, 2)
        return self._nchw


def materialize(value: Any) -> Any:
    """`value` with every ChannelsLast (also inside lists/tuples) as its NCHW array."""
    if isinstance(value, ChannelsLast):
        return value.nchw()
    if isinstance(value, (list, tuple)):
        return type(value)(materialize(v) for v in value)
    return value


def nhwc(x: Any) -> Array:
    """The NHWC data of a 4-D tensor, tagged or not."""
    return x.data if isinstance(x, ChannelsLast) else x.transpose(0, 2, 3, 1)


def _axis(dim: int) -> int:
    return _POS[dim % 4]


def _tagged(args: Any) -> bool:
    return any(isinstance(a, ChannelsLast) for a in args)


OPS: Registry[Callable[..., Any]] = Registry("channels-last op")
aware = OPS.register  # @aware(aten.op.overload, ...): an op that accepts and keeps ChannelsLast


def _fallback(target: Any, *args: Any) -> Any:
    return ops.OPS[target](*materialize(args))


# ------------------------------------------------------------------ pass-through


@aware(operator.getitem)
def _getitem(seq, i):
    # Picks one output of a tuple-returning op (BatchNorm, max_pool, split); a tensor index needs NCHW.
    return operator.getitem(materialize(seq) if isinstance(seq, ChannelsLast) else seq, i)


@aware(aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default, aten.contiguous.default)
def _identity(x, *_):
    return x


@aware(aten.detach.default)
def _detach(x):
    return ChannelsLast(lax.stop_gradient(x.data)) if isinstance(x, ChannelsLast) else ops.detach(x)


@aware(aten._to_copy.default)
def _to_copy(x, *rest):
    if isinstance(x, ChannelsLast):
        return ChannelsLast(ops.to_copy(x.data, *rest))
    return ops.to_copy(x, *rest)


# ------------------------------------------------------------------ elementwise


def _elementwise(target: Any) -> Callable:
    fn = ops.OPS[target]

    def run(*args):
        if not _tagged(args):
            return fn(*args)
        converted = []
        for a in args:
            if isinstance(a, ChannelsLast):
                converted.append(a.data)
            elif isinstance(a, (jax.Array, np.ndarray)) and a.ndim > 0:
                if a.ndim > 4:
                    return fn(*materialize(args))
                # Broadcast as torch would (align right, pad with 1s), then to NHWC: exact for any shape.
                converted.append(jnp.reshape(a, (1,) * (4 - a.ndim) + a.shape).transpose(0, 2, 3, 1))
            else:
                converted.append(a)
        return ChannelsLast(fn(*converted))

    return run


_ELEMENTWISE = [
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar, aten.rsub.Tensor,
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.pow.Tensor_Scalar,
    aten.pow.Tensor_Tensor, aten.minimum.default, aten.maximum.default, aten.where.self,
    aten.clamp.default, aten.clamp.Tensor, aten.clamp_min.default, aten.clamp_max.default,
    aten.hardtanh.default, aten.leaky_relu.default, aten.gelu.default, aten.elu.default, aten.softplus.default,
] + [getattr(aten, name).default for name in (
    "neg", "abs", "exp", "expm1", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "erf", "sign", "reciprocal",
    "relu", "silu", "mish", "hardsigmoid", "hardswish")] + [
    getattr(getattr(aten, name), overload) for name in ("eq", "ne", "lt", "le", "gt", "ge")
    for overload in ("Scalar", "Tensor")]
for _t in _ELEMENTWISE:
    OPS[_t] = _elementwise(_t)


# ------------------------------------------------------------------ convolution and normalisation


@aware(aten.convolution.default)
def _convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    if transposed or w.ndim != 4 or ops.CONV_LAYOUT != "NHWC":
        return _fallback(aten.convolution.default, x, w, b, stride, padding, dilation, transposed,
                         output_padding, groups)
    x = nhwc(x)
    y = ops.conv2d_nhwc(x, w.astype(x.dtype), stride, padding, dilation, groups)
    if b is not None:
        y = y + b.astype(y.dtype)
    return ChannelsLast(y)


def _batch_norm(target: Any) -> Callable:
    """BatchNorm on channels-last data: the op's own function with `channel_axis=-1`."""
    fn = ops.OPS[target]

    def run(x, *rest):
        if not isinstance(x, ChannelsLast):
            return fn(x, *rest)
        y, *stats = fn(x.data, *rest, channel_axis=-1)
        return (ChannelsLast(y), *stats)

    return run


for _t in (aten._native_batch_norm_legit_no_training.default, aten._native_batch_norm_legit_functional.default):
    OPS[_t] = _batch_norm(_t)


# ------------------------------------------------------------------ pooling and reductions


@aware(aten.max_pool2d_with_indices.default)
def _max_pool2d(x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    if not isinstance(x, ChannelsLast) or max(ops._spatial(dilation, 2)) > 1:
        return _fallback(aten.max_pool2d_with_indices.default, x, kernel_size, stride, padding, dilation, ceil_mode)
    k = ops._spatial(kernel_size, 2)
    s, p = ops._spatial(stride or k, 2), ops._spatial(padding, 2)
    n, h, w, c = x.data.shape
    pads = [(0, 0)] + [ops._pool_pads(size, k[i], s[i], p[i], 1, ceil_mode) for i, size in enumerate((h, w))] + [(0, 0)]
    out = lax.reduce_window(x.data, -jnp.inf, lax.max, (1, *k, 1), (1, *s, 1), pads)
    return ChannelsLast(out), None


def _reduction(target: Any) -> Callable:
    def run(x, dim=None, keepdim=False, dtype=None):
        if not isinstance(x, ChannelsLast):
            return ops.OPS[target](x, dim, keepdim, dtype)
        dims = ops._dims(dim, 4)
        if not keepdim and not {2, 3} <= set(dims):
            # Dropping a spatial dim but not both would leave (.., H/W, .., C) out of NCHW order.
            return ops.OPS[target](x.nchw(), dim, keepdim, dtype)
        out = ops.OPS[target](x.data, [_axis(d) for d in dims], keepdim, dtype)
        return ChannelsLast(out) if keepdim else out

    return run


OPS[aten.mean.dim] = _reduction(aten.mean.dim)
OPS[aten.sum.dim_IntList] = _reduction(aten.sum.dim_IntList)


# ------------------------------------------------------------------ shapes


@aware(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(x, size):
    if isinstance(x, ChannelsLast):
        n, c, h, w = x.shape
        if c == 1 or h * w == 1:  # NCHW and NHWC orders coincide: a reshape of the data is exact
            return jnp.reshape(x.data, tuple(size))
        x = x.nchw()
    return ops.view(x, size)


@aware(aten.permute.default)
def _permute(x, dims):
    dims = [d % max(x.ndim, 1) for d in dims]
    if isinstance(x, ChannelsLast):
        return jnp.transpose(x.data, [_POS[d] for d in dims])
    if x.ndim == 4 and dims == [0, 3, 1, 2]:  # NHWC -> NCHW (ConvNeXt's blocks): just tag it
        return ChannelsLast(x)
    return ops.permute(x, dims)


@aware(aten.cat.default)
def _cat(tensors, dim=0):
    if not tensors or not all(isinstance(t, ChannelsLast) for t in tensors):
        return ops.cat(materialize(tensors), dim)
    return ChannelsLast(jnp.concatenate([t.data for t in tensors], axis=_axis(dim)))


@aware(aten.split_with_sizes.default)
def _split_with_sizes(x, sizes, dim=0):
    if not isinstance(x, ChannelsLast):
        return ops.split_with_sizes(x, sizes, dim)
    return [ChannelsLast(t) for t in ops.split_with_sizes(x.data, sizes, _axis(dim))]


@aware(aten.split.Tensor)
def _split(x, size, dim=0):
    if not isinstance(x, ChannelsLast):
        return ops.split(x, size, dim)
    return [ChannelsLast(t) for t in ops.split(x.data, size, _axis(dim))]


@aware(aten.slice.Tensor)
def _slice(x, dim=0, start=None, end=None, step=1):
    if not isinstance(x, ChannelsLast):
        return ops.slice_(x, dim, start, end, step)
    return ChannelsLast(ops.slice_(x.data, _axis(dim), start, end, step))


@aware(aten.constant_pad_nd.default)
def _constant_pad_nd(x, pad, value=0):
    if not isinstance(x, ChannelsLast):
        return ops.constant_pad_nd(x, pad, value)
    config = [(0, 0, 0)] * 4
    for i in range(len(pad) // 2):
        config[_axis(3 - i)] = (pad[2 * i], pad[2 * i + 1], 0)
    return ChannelsLast(lax.pad(x.data, jnp.asarray(value, x.dtype), config))
