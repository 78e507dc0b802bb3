"""The op table: core-ATen overloads -> JAX functions with PyTorch semantics.

Every function takes its arguments positionally in the order of the overload's
schema, defaults filled in by the interpreter (`interpreter.bind_arguments`),
so keyword-only schema arguments (`dtype=`, `layout=`, ...) arrive positionally
too. Tensors are `jax.Array`s in PyTorch's layout (NCHW); symbolic sizes arrive
as Python ints, because the interpreter runs shape-static under each trace.

State an op needs beyond its arguments (the dropout key, the sync-BN axis, the
compute dtype) is read from `current()`, set by the interpreter per graph run.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from torch2flax import layers
from torch2flax.registry import Registry

Array = jax.Array
aten = torch.ops.aten

# The op table: ATen overload -> its JAX implementation.
OPS: Registry[Callable[..., Any]] = Registry("ATen op")

# Whether `aten.convolution` runs in NHWC (transposes around each conv, `layers.conv2d`) or
# directly in NCHW (`lax.conv_general_dilated` on the graph's layout). XLA folds the transposes
# into neighbouring ops, so dense convs tie and grouped-conv gradients are faster in NHWC
# (docs/benchmarks.md); NHWC also shares the small-map path with the native models.
CONV_LAYOUT = "NHWC"


@dataclasses.dataclass
class RunContext:
    """Per-run state: the dropout key, the sync-BN axis and the compute dtype."""

    rng: Array | None = None
    axis_name: str | None = None
    float_dtype: Any = jnp.float32
    node_index: int = 0

    def next_key(self) -> Array:
        if self.rng is None:
            raise ValueError("this graph draws random numbers: pass rngs={'dropout': key} in training")
        return jax.random.fold_in(self.rng, self.node_index)


_CONTEXT: contextvars.ContextVar[RunContext] = contextvars.ContextVar("torch2flax_export_ctx")


def current() -> RunContext:
    return _CONTEXT.get(None) or RunContext()


@contextlib.contextmanager
def running(ctx: RunContext) -> Iterator[RunContext]:
    token = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(token)


register = OPS.register  # @register(aten.op.overload, ...): file an implementation under each target


# ------------------------------------------------------------------ dtypes

_DTYPES = {
    torch.float32: jnp.float32, torch.float64: jnp.float64, torch.float16: jnp.float16,
    torch.bfloat16: jnp.bfloat16, torch.int64: jnp.int64, torch.int32: jnp.int32, torch.int16: jnp.int16,
    torch.int8: jnp.int8, torch.uint8: jnp.uint8, torch.bool: jnp.bool_, torch.complex64: jnp.complex64,
}


def jax_dtype(dtype: torch.dtype | None, like: Any = None) -> Any:
    """The JAX dtype for a torch dtype; float32 becomes the run's compute dtype (bf16 runs stay bf16)."""
    if dtype is None:
        return like
    if dtype == torch.float32:
        return current().float_dtype
    return jax.dtypes.canonicalize_dtype(_DTYPES[dtype])


def _scalar_dtype(value: Any) -> Any:
    """The dtype torch gives a tensor created from a Python scalar."""
    if isinstance(value, bool):
        return jnp.bool_
    if isinstance(value, int):
        return jax.dtypes.canonicalize_dtype(jnp.int64)
    return current().float_dtype


def _dims(dim: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    """A reduction's axes; None or [] means all, as in ATen."""
    if dim is None:
        return tuple(range(ndim))
    if isinstance(dim, int):
        dim = (dim,)
    return tuple(d % max(ndim, 1) for d in dim) or tuple(range(ndim))


# ------------------------------------------------------------------ graph plumbing and symbolic ints

register(operator.getitem)(operator.getitem)
for _fn in (operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
            operator.pow, operator.neg, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
            operator.ge, operator.and_, operator.or_, operator.not_, math.ceil, math.floor, math.trunc, math.sqrt):
    register(_fn)(_fn)
register(torch.sym_float)(float)
register(torch.sym_int)(int)
register(torch.sym_max)(max)
register(torch.sym_min)(min)
register(torch.sym_not)(operator.not_)


@register(aten.sym_size.int)
def sym_size(x, dim):
    return x.shape[dim]


@register(aten.sym_numel.default)
def sym_numel(x):
    return x.size


@register(aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range.default,
          aten.sym_constrain_range_for_size.default, aten._assert_async.msg)
def _no_op(*_):
    """Runtime asserts on shapes that are static here."""
    return None


# ------------------------------------------------------------------ views and shape ops


@register(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def view(x, size):
    return jnp.reshape(x, tuple(size))


@register(aten.permute.default)
def permute(x, dims):
    return jnp.transpose(x, tuple(dims))


@register(aten.expand.default)
def expand(x, size, implicit=False):
    lead = len(size) - x.ndim
    shape = tuple(x.shape[i - lead] if s == -1 else s for i, s in enumerate(size))
    return jnp.broadcast_to(x, shape)


@register(aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default, aten.contiguous.default)
def identity(x, *_):
    return x


@register(aten.detach.default)
def detach(x):
    return lax.stop_gradient(x)


@register(aten._to_copy.default)
def to_copy(x, dtype=None, *_):
    return x.astype(jax_dtype(dtype, x.dtype))


@register(aten.copy.default)
def copy(dst, src, non_blocking=False):
    return jnp.broadcast_to(src, dst.shape).astype(dst.dtype)


def _index(x, dim, start, end, step) -> tuple:
    """The index of torch's `x[..., start:end:step]` on `dim`. torch.export writes an open end as
    2**63 - 1; clamped here to the dimension's size, because under a symbolic batch size
    (`torch2flax.portable`) jnp indexing converts the bounds to int32 and refuses it."""
    idx = [slice(None)] * x.ndim
    n = x.shape[dim]
    if isinstance(n, int):
        idx[dim] = slice(*slice(start, end, step).indices(n))
    else:  # the symbolic batch: an open end stays open
        idx[dim] = slice(start, None if end is not None and end >= 2**62 else end, step)
    return tuple(idx)


@register(aten.slice.Tensor)
def slice_(x, dim=0, start=None, end=None, step=1):
    return x[_index(x, dim, start, end, step)]


@register(aten.slice_scatter.default)
def slice_scatter(x, src, dim=0, start=None, end=None, step=1):
    return x.at[_index(x, dim, start, end, step)].set(src.astype(x.dtype))


@register(aten.select.int)
def select(x, dim, index):
    return lax.index_in_dim(x, index, axis=dim % x.ndim, keepdims=False)


@register(aten.select_scatter.default)
def select_scatter(x, src, dim, index):
    idx = [slice(None)] * x.ndim
    idx[dim] = index
    return x.at[tuple(idx)].set(src.astype(x.dtype))


@register(aten.squeeze.dims, aten.squeeze.dim, aten.squeeze.default)
def squeeze(x, dims=None):
    axes = _dims(dims, x.ndim) if x.ndim else ()
    return jnp.squeeze(x, tuple(a for a in axes if x.shape[a] == 1))


@register(aten.unsqueeze.default)
def unsqueeze(x, dim):
    return jnp.expand_dims(x, dim % (x.ndim + 1))


@register(aten.cat.default)
def cat(tensors, dim=0):
    # ATen still skips legacy empty 1-D tensors in cat.
    tensors = [t for t in tensors if not (t.ndim == 1 and t.shape[0] == 0)]
    return jnp.concatenate(tensors, axis=dim)


@register(aten.split_with_sizes.default)
def split_with_sizes(x, sizes, dim=0):
    return jnp.split(x, np.cumsum(sizes)[:-1].tolist(), axis=dim)


@register(aten.split.Tensor)
def split(x, size, dim=0):
    n = x.shape[dim]
    return jnp.split(x, list(range(size, n, size)), axis=dim)


@register(aten.unbind.int)
def unbind(x, dim=0):
    return [lax.index_in_dim(x, i, axis=dim, keepdims=False) for i in range(x.shape[dim])]


@register(aten.repeat.default)
def repeat(x, repeats):
    return jnp.tile(x, tuple(repeats))


@register(aten.flip.default)
def flip(x, dims):
    return jnp.flip(x, tuple(dims))


@register(aten.roll.default)
def roll(x, shifts, dims=()):
    if not dims:
        return jnp.roll(x.reshape(-1), shifts[0]).reshape(x.shape)
    return jnp.roll(x, tuple(shifts), tuple(dims))


@register(aten.as_strided.default)
def as_strided(x, size, stride, storage_offset=None):
    """Gather from the row-major flattening of `x`: exact when `x` is contiguous, which the
    functional graphs timm exports give it (it follows a view/clone of a dense tensor)."""
    if size and not isinstance(size[0], int):
        # A symbolic batch (torch2flax.portable): one gather per sample, when samples are whole
        # blocks of the flattening (the view of a dense batch).
        per_sample = math.prod(x.shape[1:])
        if stride[0] != per_sample or (storage_offset or 0) >= per_sample:
            raise NotImplementedError(f"as_strided over a symbolic batch with strides {tuple(stride)} of an input "
                                      f"shaped {tuple(x.shape)}")
        return jnp.reshape(x, (x.shape[0], -1))[:, _strided_index(size[1:], stride[1:], storage_offset)]
    return jnp.reshape(x, (-1,))[_strided_index(size, stride, storage_offset)]


def _strided_index(size, stride, storage_offset) -> np.ndarray:
    index = np.full(tuple(size), storage_offset or 0, dtype=np.int64)
    for d, (n, s) in enumerate(zip(size, stride)):
        shape = [1] * len(size)
        shape[d] = n
        index = index + np.arange(n).reshape(shape) * s
    return index


@register(aten.index.Tensor, aten._unsafe_index.Tensor)
def index(x, indices):
    # ATen's advanced indexing is NumPy's, which jnp follows (including where a
    # split group of index tensors puts its broadcast dimensions).
    return x[tuple(slice(None) if i is None else i for i in indices)]


@register(aten.index_put.default, aten._unsafe_index_put.default)
def index_put(x, indices, values, accumulate=False):
    ref = x.at[tuple(slice(None) if i is None else i for i in indices)]
    values = values.astype(x.dtype)
    return ref.add(values) if accumulate else ref.set(values)


@register(aten.index_select.default)
def index_select(x, dim, idx):
    return jnp.take(x, idx, axis=dim)


@register(aten.gather.default)
def gather(x, dim, idx, sparse_grad=False):
    return jnp.take_along_axis(x, idx, axis=dim)


@register(aten.embedding.default)
def embedding(weight, idx, padding_idx=-1, *_):
    out = jnp.take(weight, idx, axis=0)
    if padding_idx >= 0:  # ATen sends no gradient to the padding row (-1: no padding row)
        out = jnp.where((idx == padding_idx)[..., None], lax.stop_gradient(out), out)
    return out


@register(aten.constant_pad_nd.default)
def constant_pad_nd(x, pad, value=0):
    # `pad` lists (before, after) pairs from the last dim backwards; negative pads crop (lax.pad does both).
    config = [(0, 0, 0)] * x.ndim
    for i in range(len(pad) // 2):
        config[x.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1], 0)
    return lax.pad(x, jnp.asarray(value, x.dtype), config)


# ------------------------------------------------------------------ creation


def _creation_dtype(dtype, fill):
    return jax_dtype(dtype) if dtype is not None else _scalar_dtype(fill)


@register(aten.full.default)
def full(size, fill_value, dtype=None, *_):
    return jnp.full(tuple(size), fill_value, _creation_dtype(dtype, fill_value))


@register(aten.full_like.default)
def full_like(x, fill_value, dtype=None, *_):
    return jnp.full(x.shape, fill_value, jax_dtype(dtype, x.dtype))


@register(aten.zeros.default)
def zeros(size, dtype=None, *_):
    return jnp.zeros(tuple(size), jax_dtype(dtype, current().float_dtype))


@register(aten.ones.default)
def ones(size, dtype=None, *_):
    return jnp.ones(tuple(size), jax_dtype(dtype, current().float_dtype))


@register(aten.empty.memory_format)
def empty(size, dtype=None, *_):
    # Uninitialised memory in PyTorch: every use overwrites it (drop-path fills it with bernoulli_).
    return jnp.zeros(tuple(size), jax_dtype(dtype, current().float_dtype))


@register(aten.zeros_like.default, aten.empty_like.default)
def zeros_like(x, dtype=None, *_):
    return jnp.zeros(x.shape, jax_dtype(dtype, x.dtype))


@register(aten.ones_like.default)
def ones_like(x, dtype=None, *_):
    return jnp.ones(x.shape, jax_dtype(dtype, x.dtype))


@register(aten.scalar_tensor.default)
def scalar_tensor(s, dtype=None, *_):
    # Unlike `full`, ATen's scalar_tensor defaults to the float dtype whatever the scalar's type.
    return jnp.asarray(s, jax_dtype(dtype) if dtype is not None else current().float_dtype)


@register(aten.arange.start_step)
def arange(start, end, step=1, dtype=None, *_):
    ints = all(isinstance(v, int) for v in (start, end, step))
    dt = jax_dtype(dtype) if dtype is not None else (_scalar_dtype(0) if ints else current().float_dtype)
    return jnp.arange(start, end, step, dtype=dt)


@register(aten.arange.default)
def arange_end(end, dtype=None, *_):
    return arange(0, end, 1, dtype)


@register(aten.arange.start)
def arange_start(start, end, dtype=None, *_):
    return arange(start, end, 1, dtype)


# ------------------------------------------------------------------ elementwise


def _alpha(b, alpha):
    return b if alpha == 1 else b * alpha


register(aten.add.Tensor, aten.add.Scalar)(lambda a, b, alpha=1: a + _alpha(b, alpha))
register(aten.sub.Tensor, aten.sub.Scalar)(lambda a, b, alpha=1: a - _alpha(b, alpha))
register(aten.rsub.Scalar, aten.rsub.Tensor)(lambda a, b, alpha=1: b - _alpha(a, alpha))
register(aten.mul.Tensor, aten.mul.Scalar)(operator.mul)
register(aten.div.Tensor, aten.div.Scalar)(jnp.true_divide)


@register(aten.div.Tensor_mode, aten.div.Scalar_mode)
def div_mode(a, b, rounding_mode=None):
    if rounding_mode is None:
        return jnp.true_divide(a, b)
    if rounding_mode == "floor":
        return jnp.floor_divide(a, b)
    q = jnp.true_divide(a, b)  # "trunc"
    out = jnp.trunc(q)
    return out.astype(jnp.result_type(a, b)) if not jnp.issubdtype(jnp.result_type(a, b), jnp.floating) else out


register(aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor)(jnp.power)
register(aten.pow.Scalar)(lambda base, exp: jnp.power(jnp.asarray(base, exp.dtype), exp))
register(aten.fmod.Scalar, aten.fmod.Tensor)(jnp.fmod)
register(aten.remainder.Scalar, aten.remainder.Tensor)(jnp.remainder)
register(aten.minimum.default)(jnp.minimum)
register(aten.maximum.default)(jnp.maximum)
register(aten.atan2.default)(jnp.arctan2)

for _op, _fn in {
    aten.neg: jnp.negative, aten.abs: jnp.abs, aten.exp: jnp.exp, aten.expm1: jnp.expm1, aten.log: jnp.log,
    aten.log1p: jnp.log1p, aten.log2: jnp.log2, aten.sqrt: jnp.sqrt, aten.rsqrt: lax.rsqrt, aten.sin: jnp.sin,
    aten.cos: jnp.cos, aten.tan: jnp.tan, aten.tanh: jnp.tanh, aten.atan: jnp.arctan, aten.asin: jnp.arcsin,
    aten.acos: jnp.arccos, aten.sinh: jnp.sinh, aten.cosh: jnp.cosh, aten.sigmoid: jax.nn.sigmoid,
    aten.erf: jax.scipy.special.erf, aten.erfinv: jax.scipy.special.erfinv, aten.sign: jnp.sign,
    aten.reciprocal: jnp.reciprocal, aten.floor: jnp.floor, aten.ceil: jnp.ceil, aten.trunc: jnp.trunc,
    aten.round: jnp.round, aten.isnan: jnp.isnan, aten.isinf: jnp.isinf, aten.logical_not: jnp.logical_not,
    aten.relu: jax.nn.relu, aten.silu: jax.nn.silu, aten.mish: lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    aten.hardsigmoid: lambda x: jnp.clip(x / 6 + 0.5, 0, 1), aten.hardswish: lambda x: x * jnp.clip(x / 6 + 0.5, 0, 1),
}.items():
    register(_op.default)(_fn)

for _op, _fn in {aten.eq: jnp.equal, aten.ne: jnp.not_equal, aten.lt: jnp.less, aten.le: jnp.less_equal,
                 aten.gt: jnp.greater, aten.ge: jnp.greater_equal}.items():
    register(_op.Scalar, _op.Tensor)(_fn)

register(aten.logical_and.default)(jnp.logical_and)
register(aten.logical_or.default)(jnp.logical_or)
register(aten.logical_xor.default)(jnp.logical_xor)
register(aten.bitwise_not.default)(jnp.invert)  # logical not on bool, ~ on ints: as ATen
register(aten.bitwise_and.Tensor, aten.bitwise_and.Scalar)(jnp.bitwise_and)
register(aten.bitwise_or.Tensor, aten.bitwise_or.Scalar)(jnp.bitwise_or)
register(aten.where.self)(jnp.where)


@register(aten.clamp.default, aten.clamp.Tensor)
def clamp(x, min=None, max=None):  # noqa: A002 - ATen's argument names
    if min is not None:
        x = jnp.maximum(x, jnp.asarray(min, x.dtype) if not hasattr(min, "shape") else min)
    if max is not None:
        x = jnp.minimum(x, jnp.asarray(max, x.dtype) if not hasattr(max, "shape") else max)
    return x


register(aten.clamp_min.default)(lambda x, m: clamp(x, m, None))
register(aten.clamp_max.default)(lambda x, m: clamp(x, None, m))
register(aten.hardtanh.default)(lambda x, lo=-1, hi=1: clamp(x, lo, hi))
register(aten.leaky_relu.default)(lambda x, slope=0.01: jnp.where(x > 0, x, x * slope))


@register(aten.gelu.default)
def gelu(x, approximate="none"):
    return _gelu(x, approximate == "tanh")


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _gelu(x, tanh):
    # ATen's formula (erf, not jax.nn.gelu's erfc): XLA on a TPU fused erfc poorly, keeping its
    # float32 argument in HBM.
    if tanh:
        return jax.nn.gelu(x, approximate=True)
    return x * 0.5 * (1 + lax.erf(x * (1 / math.sqrt(2))))


@_gelu.defjvp
def _gelu_jvp(tanh, primals, tangents):
    """GELU's derivative as one array, where differentiating `jax.nn.gelu` keeps three
    input-sized arrays for the backward pass (its product, erfc and exp).

    The derivative is computed in the input's dtype, as autodiff of `jax.nn.gelu` would: computed
    in float32 from a bf16 input, XLA kept float32 MLP-wide arrays in HBM. vit_small's bf16 train
    step on a v5e-1 at batch 32 (docs/benchmarks.md): 1.49 GiB of temporaries with jax.nn.gelu,
    1.34 with this rule in float32, 1.00 in the input's dtype (0.91 for a plain Flax ViT-S/16).
    A custom JVP, not VJP, so that forward-mode differentiation still works; the two measured the same.
    """
    (x,), (g,) = primals, tangents
    if tanh:
        k = math.sqrt(2 / math.pi)
        th = jnp.tanh(k * (x + 0.044715 * x**3))
        d = 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * k * (1 + 3 * 0.044715 * x * x)
    else:
        d = 0.5 * (1 + lax.erf(x * (1 / math.sqrt(2)))) + x * jnp.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
    return _gelu(x, tanh), g * d.astype(g.dtype)


@register(aten.elu.default)
def elu(x, alpha=1, scale=1, input_scale=1):
    return scale * jnp.where(x > 0, x, alpha * jnp.expm1(x * input_scale))


@register(aten.softplus.default)
def softplus(x, beta=1, threshold=20):
    return jnp.where(x * beta > threshold, x, jax.nn.softplus(x * beta) / beta)


# ------------------------------------------------------------------ reductions


def _acc(x, dtype):
    return x.astype(jax_dtype(dtype)) if dtype is not None else x


@register(aten.mean.dim)
def mean(x, dim=None, keepdim=False, dtype=None):
    return jnp.mean(_acc(x, dtype), axis=_dims(dim, x.ndim), keepdims=keepdim)


@register(aten.mean.default)
def mean_all(x, dtype=None):
    return jnp.mean(_acc(x, dtype))


@register(aten.sum.dim_IntList)
def sum_(x, dim=None, keepdim=False, dtype=None):
    return jnp.sum(_acc(x, dtype), axis=_dims(dim, x.ndim), keepdims=keepdim)


@register(aten.sum.default)
def sum_all(x, dtype=None):
    return jnp.sum(_acc(x, dtype))


@register(aten.prod.dim_int)
def prod(x, dim, keepdim=False, dtype=None):
    return jnp.prod(_acc(x, dtype), axis=dim, keepdims=keepdim)


@register(aten.amax.default)
def amax(x, dim=(), keepdim=False):
    return jnp.max(x, axis=_dims(dim, x.ndim), keepdims=keepdim)


@register(aten.amin.default)
def amin(x, dim=(), keepdim=False):
    return jnp.min(x, axis=_dims(dim, x.ndim), keepdims=keepdim)


@register(aten.max.dim)
def max_dim(x, dim, keepdim=False):
    return jnp.max(x, axis=dim, keepdims=keepdim), jnp.argmax(x, axis=dim, keepdims=keepdim)


@register(aten.min.dim)
def min_dim(x, dim, keepdim=False):
    return jnp.min(x, axis=dim, keepdims=keepdim), jnp.argmin(x, axis=dim, keepdims=keepdim)


register(aten.max.default)(jnp.max)
register(aten.min.default)(jnp.min)
register(aten.argmax.default)(lambda x, dim=None, keepdim=False: jnp.argmax(x, axis=dim, keepdims=keepdim))
register(aten.argmin.default)(lambda x, dim=None, keepdim=False: jnp.argmin(x, axis=dim, keepdims=keepdim))


@register(aten.any.dim, aten.any.dims)
def any_(x, dim=None, keepdim=False):
    return jnp.any(x, axis=_dims(dim, x.ndim), keepdims=keepdim)


@register(aten.any.default)
def any_all(x):
    return jnp.any(x)


@register(aten.var.correction)
def var(x, dim=None, correction=None, keepdim=False):
    axes = _dims(dim, x.ndim)
    n = math.prod(x.shape[a] for a in axes)
    ddof = 1 if correction is None else correction
    v = layers.moments(x, axes)[1] * (n / (n - ddof) if n > ddof else jnp.inf)  # ATen divides by max(0, n - ddof)
    return jnp.expand_dims(v, axes) if keepdim else v


@register(aten.cumsum.default)
def cumsum(x, dim, dtype=None):
    return jnp.cumsum(_acc(x, dtype), axis=dim)


@register(aten.linalg_vector_norm.default)
def vector_norm(x, ord=2, dim=None, keepdim=False, dtype=None):  # noqa: A002
    x = _acc(x, dtype)
    axes = _dims(dim, x.ndim)
    if ord == 2:
        return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=keepdim))
    if ord == math.inf:
        return jnp.max(jnp.abs(x), axis=axes, keepdims=keepdim)
    if ord == -math.inf:  # the general formula gives 1 here, and divides by zero for ord=0
        return jnp.min(jnp.abs(x), axis=axes, keepdims=keepdim)
    if ord == 0:
        return jnp.sum(x != 0, axis=axes, keepdims=keepdim).astype(x.dtype)
    return jnp.sum(jnp.abs(x) ** ord, axis=axes, keepdims=keepdim) ** (1.0 / ord)


@register(aten._softmax.default)
def softmax(x, dim, half_to_float=False):
    return jax.nn.softmax(x, axis=dim)


@register(aten._safe_softmax.default)
def safe_softmax(x, dim, dtype=None):
    """`scaled_dot_product_attention`'s softmax: rows that are all -inf (fully masked) give zeros,
    and so does their gradient.

    Kept whole at export (`capture.decompositions`): torch's decomposition compares every score
    with -inf and reduces the boolean map, an attention-sized mask that training keeps for the
    backward pass (vit_small's train step on a v5e: +65% HBM traffic against a plain Flax ViT,
    docs/benchmarks.md). A row is all -inf exactly when its max is, which softmax computes anyway.
    """
    if dtype is not None:
        x = x.astype(jax_dtype(dtype))
    return _row_safe_softmax(x, dim)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _row_safe_softmax(x, axis):
    # Not jnp.where(all -inf, 0, jax.nn.softmax(x)): softmax's rule differentiates through the NaN
    # row that where hides, and with jax 0.7.2 a fully masked row's gradient came out NaN
    # (tests/test_ops.py). Here an all -inf row is exp(-inf) / 1 = 0, and the rule below uses only
    # the output, as softmax's own does.
    m = jnp.max(x, axis=axis, keepdims=True)
    e = jnp.exp(x - lax.stop_gradient(jnp.where(jnp.isneginf(m), jnp.zeros((), m.dtype), m)))
    s = jnp.sum(e, axis=axis, keepdims=True)
    return e / jnp.where(s == 0, jnp.ones((), s.dtype), s)


@_row_safe_softmax.defjvp
def _row_safe_softmax_jvp(axis, primals, tangents):
    (x,), (t,) = primals, tangents
    y = _row_safe_softmax(x, axis)
    return y, y * (t - jnp.sum(y * t, axis=axis, keepdims=True))


@register(aten._log_softmax.default)
def log_softmax(x, dim, half_to_float=False):
    return jax.nn.log_softmax(x, axis=dim)


# ------------------------------------------------------------------ matmuls and convolution

register(aten.mm.default, aten.bmm.default)(jnp.matmul)


@register(aten.addmm.default)
def addmm(bias, a, b, beta=1, alpha=1):
    return _alpha(bias, beta) + _alpha(jnp.matmul(a, b), alpha)


@register(aten.linear.default)
def linear(x, weight, bias=None):
    """`nn.Linear`, kept whole at export (`capture.decompositions`) so that the TPU's program need
    not flatten the leading dims.

    torch's decomposition flattens them (`view` to 2-D, `addmm`, `view` back). Where a dim is not
    a multiple of the TPU's tile (197 tokens), each view is a relayout copy, forward and backward:
    one `dot_general` over the last dim took vit_small's bf16 train step on a v5e from 0.640 to
    0.543 GB of HBM traffic per image and 0.99 to 0.88 GiB of temporaries (docs/benchmarks.md).
    Elsewhere the flattened form stays: on XLA:CPU the 3-D contraction compiled vit_tiny's
    gradient in 9.4-10.3 s against 5.4-6.2 s, steps equal (2026-12-07); a row-major reshape is free there.
    """
    dtype = jnp.result_type(x, weight)
    x, weight = x.astype(dtype), weight.astype(dtype)
    if x.ndim <= 2:
        y = jnp.matmul(x, weight.T)
    else:
        y = lax.platform_dependent(x, weight, tpu=_contract_last, default=_flattened_matmul)
    return y if bias is None else y + bias


def _contract_last(x, w):
    return lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))


def _flattened_matmul(x, w):
    rows = math.prod(x.shape[:-1])  # symbolic where the batch is
    return jnp.matmul(x.reshape(rows, x.shape[-1]), w.T).reshape(*x.shape[:-1], w.shape[0])


@register(aten.convolution.default)
def convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    nd = x.ndim - 2
    stride, dilation = tuple(stride) * (nd // len(stride)), tuple(dilation) * (nd // len(dilation))
    padding = tuple(padding) * (nd // len(padding))
    w = w.astype(x.dtype)
    if transposed:
        y = _conv_transpose(x, w, stride, padding, dilation, tuple(output_padding), groups)
    elif nd == 2 and CONV_LAYOUT == "NHWC":
        y = conv2d_nhwc(x.transpose(0, 2, 3, 1), w, stride, padding, dilation, groups).transpose(0, 3, 1, 2)
    else:
        y = lax.conv_general_dilated(x, w, stride, [(p, p) for p in padding], rhs_dilation=dilation,
                                     feature_group_count=groups)
    if b is not None:
        y = y + b.astype(y.dtype).reshape((-1,) + (1,) * nd)
    return y


def conv2d_nhwc(x, w, stride, padding, dilation, groups):
    """A 2-D convolution on NHWC input with torch's (O, I/g, kH, kW) kernel, via `layers.conv2d`."""
    stride, dilation, padding = (tuple(v) * (2 // len(v)) for v in (stride, dilation, padding))
    # The small-map path (one einsum per kernel tap) is kept for what it was measured on: dense
    # convs of at most 3x3 taps (a ViT's 16x16 patch embedding on a 2x2 map would become 256
    # einsums, and compile many times slower). Depthwise convs take `layers.depthwise_conv`
    # (elementwise taps: no einsums) at every map size.
    shifted_ok = w.shape[2] * w.shape[3] <= 9
    return layers.conv2d(x, w.transpose(2, 3, 1, 0), stride, tuple((p, p) for p in padding), dilation, groups,
                         small_map_max_pixels=None if shifted_ok else 0)


def _conv_transpose(x, w, stride, padding, dilation, output_padding, groups):
    """ConvTranspose as the gradient of a conv: dilate the input, flip the kernel, pad by d*(k-1)-p."""
    nd = x.ndim - 2
    cin, cout_g = w.shape[0], w.shape[1]
    ks = w.shape[2:]
    # (Cin, Cout/g, *k) -> (Cout, Cin/g, *k), flipped spatially.
    w = w.reshape(groups, cin // groups, cout_g, *ks).swapaxes(1, 2).reshape(groups * cout_g, cin // groups, *ks)
    w = jnp.flip(w, tuple(range(2, 2 + nd)))
    pads = [(d * (k - 1) - p, d * (k - 1) - p + op) for k, p, d, op in zip(ks, padding, dilation, output_padding)]
    return lax.conv_general_dilated(x, w, (1,) * nd, pads, lhs_dilation=stride, rhs_dilation=dilation,
                                    feature_group_count=groups)


# ------------------------------------------------------------------ normalisation


def _channel_shape(x, axis=1):
    """Broadcast shape of per-channel values: -1 at the channel axis (1; -1 for channels-last data)."""
    shape = [1] * x.ndim
    shape[axis] = -1
    return tuple(shape)


def _affine(y, weight, bias, x_dtype, axis=1):
    if weight is not None:
        y = y * weight.astype(jnp.float32).reshape(_channel_shape(y, axis))
    if bias is not None:
        y = y + bias.astype(jnp.float32).reshape(_channel_shape(y, axis))
    return y.astype(x_dtype)


def _bn_axes(x, axis=1):
    return tuple(a for a in range(x.ndim) if a != axis % x.ndim)


@register(aten._native_batch_norm_legit_no_training.default)
def batch_norm_eval(x, weight, bias, running_mean, running_var, momentum, eps, channel_axis=1):
    cs = _channel_shape(x, channel_axis)
    y = (x.astype(jnp.float32) - running_mean.reshape(cs)) * lax.rsqrt(running_var.reshape(cs) + eps)
    empty = jnp.zeros((0,), jnp.float32)
    return _affine(y, weight, bias, x.dtype, channel_axis), empty, empty


def _batch_norm_train(x, weight, bias, eps, sync, axis=1):
    """Batch-statistics BatchNorm (`layers.batch_norm_train`, shared with the native models):
    (y, mean, biased var, rstd, element count over the whole, synced, batch)."""
    axes = _bn_axes(x, axis)
    axis_name = current().axis_name if sync else None
    n = layers.batch_count(x, axes, axis_name)
    y, mean, var = layers.batch_norm_train(x, weight, bias, eps, axes, axis_name)
    return y, mean, var, lax.rsqrt(var + eps), n


@register(aten._native_batch_norm_legit_functional.default)
def native_batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, channel_axis=1):
    """Training BatchNorm: batch statistics, and running stats updated as PyTorch does
    (new = (1 - momentum) * old + momentum * stat, with the unbiased batch variance).
    `channel_axis=-1` takes channels-last data (`layout.ChannelsLast`)."""
    if not training:
        y, _, _ = batch_norm_eval(x, weight, bias, running_mean, running_var, momentum, eps, channel_axis)
        return y, running_mean, running_var, running_mean, running_var
    y, mean, var, rstd, n = _batch_norm_train(x, weight, bias, eps, True, channel_axis)
    unbiased = var * (n / jnp.maximum(n - 1, 1))
    new_mean = (1 - momentum) * running_mean + momentum * lax.stop_gradient(mean).astype(running_mean.dtype)
    new_var = (1 - momentum) * running_var + momentum * lax.stop_gradient(unbiased).astype(running_var.dtype)
    return y, mean, rstd, new_mean, new_var


@register(aten._native_batch_norm_legit.no_stats)
def batch_norm_no_stats(x, weight, bias, training, momentum, eps):
    # Used by weight-standardised convs (NFNet, BiT) on the *weights*: never synchronised.
    y, mean, _, rstd, _ = _batch_norm_train(x, weight, bias, eps, sync=False)
    return y, mean, rstd


@register(aten.native_layer_norm.default)
def layer_norm(x, normalized_shape, weight, bias, eps):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    xf = x.astype(jnp.float32)
    mean, var = layers.moments(xf, axes, keepdims=True)
    rstd = lax.rsqrt(var + eps)
    y = (xf - mean) * rstd
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype), mean, rstd


@register(aten.native_group_norm.default)
def group_norm(x, weight, bias, n, c, hw, group, eps):
    xf = x.astype(jnp.float32).reshape(x.shape[0], group, -1)
    mean, var = layers.moments(xf, (2,), keepdims=True)
    rstd = lax.rsqrt(var + eps)
    y = ((xf - mean) * rstd).reshape(x.shape)
    return _affine(y, weight, bias, x.dtype), mean[..., 0], rstd[..., 0]


# ------------------------------------------------------------------ pooling and resampling


def _pool_pads(size, k, s, p, d, ceil_mode):
    """(low, high) padding of one spatial dim, with the extra end padding of ceil_mode."""
    eff = d * (k - 1) + 1
    out = (size + 2 * p - eff) // s + 1
    if ceil_mode:
        out = -(-(size + 2 * p - eff) // s) + 1
        if (out - 1) * s >= size + p:  # the last window must start inside the input or left padding
            out -= 1
    return p, max(0, (out - 1) * s + eff - size - p)


def _spatial(v, nd):
    v = [v] if isinstance(v, int) else list(v)
    return tuple(v * nd if len(v) == 1 else v)


@register(aten.max_pool2d_with_indices.default, aten.max_pool3d_with_indices.default)
def max_pool_with_indices(x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    nd = x.ndim - 2
    k = _spatial(kernel_size, nd)
    s, p, d = _spatial(stride or k, nd), _spatial(padding, nd), _spatial(dilation, nd)
    pads = [(0, 0), (0, 0)] + [_pool_pads(x.shape[2 + i], k[i], s[i], p[i], d[i], ceil_mode) for i in range(nd)]
    if max(d) > 1:
        # JAX cannot differentiate a dilated max reduce_window: take the max over the kernel taps'
        # strided slices instead, the first maximal tap winning ties (ATen's gradient goes to the first max).
        xp = lax.pad(x, jnp.asarray(-jnp.inf, x.dtype), [(lo, hi, 0) for lo, hi in pads])
        sizes = [(xp.shape[2 + i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(nd)]
        out = None
        for tap in itertools.product(*map(range, k)):
            start = (0, 0) + tuple(t * di for t, di in zip(tap, d))
            limit = x.shape[:2] + tuple(st + (o - 1) * si + 1 for st, o, si in zip(start[2:], sizes, s))
            v = lax.slice(xp, start, limit, (1, 1) + s)
            out = v if out is None else jnp.where(v > out, v, out)
        return out, None
    out = lax.reduce_window(x, -jnp.inf, lax.max, (1, 1) + k, (1, 1) + s, pads,
                            window_dilation=(1, 1) + d)
    return out, None  # indices feed only max_unpool/backward, which these graphs do not contain


@register(aten.avg_pool2d.default, aten.avg_pool3d.default)
def avg_pool_nd(x, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    nd = x.ndim - 2
    k = _spatial(kernel_size, nd)
    s, p = _spatial(stride or k, nd), _spatial(padding, nd)
    pads = [_pool_pads(x.shape[2 + i], k[i], s[i], p[i], 1, ceil_mode) for i in range(nd)]
    window, strides = (1, 1) + k, (1, 1) + s
    # Python-scalar init values: JAX recognises the add monoid and can differentiate reduce_window.
    total = lax.reduce_window(x, 0.0, lax.add, window, strides, [(0, 0), (0, 0)] + pads)
    if divisor_override:
        return total / divisor_override
    # Divisor: window cells inside the input, plus the explicit padding when
    # count_include_pad, never the ceil_mode overhang (as ATen).
    ones = jnp.ones(x.shape[2:], x.dtype)
    if count_include_pad:
        ones = jnp.pad(ones, [(pi, pi) for pi in p], constant_values=1)
        pads = [(0, hi - lo) for lo, hi in pads]
    count = lax.reduce_window(ones, 0.0, lax.add, k, s, pads)
    return total / count


def _adaptive_matrix(size, out):
    """(out, size) averaging matrix of adaptive pooling: bins [floor(i*n/o), ceil((i+1)*n/o))."""
    m = np.zeros((out, size), np.float32)
    for i in range(out):
        lo, hi = (i * size) // out, -(-((i + 1) * size) // out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


@register(aten._adaptive_avg_pool2d.default)
def adaptive_avg_pool2d(x, output_size):
    oh, ow = _spatial(output_size, 2)
    mh = jnp.asarray(_adaptive_matrix(x.shape[2], oh), x.dtype)
    mw = jnp.asarray(_adaptive_matrix(x.shape[3], ow), x.dtype)
    return jnp.einsum("nchw,ih,jw->ncij", x, mh, mw)


def _out_sizes(x, output_size, scale_factors):
    if output_size is not None:
        return tuple(output_size), [None] * len(output_size)
    return tuple(int(math.floor(n * f)) for n, f in zip(x.shape[2:], scale_factors)), list(scale_factors)


@register(aten.upsample_nearest2d.vec)
def upsample_nearest(x, output_size, scale_factors):
    sizes, scales = _out_sizes(x, output_size, scale_factors)
    for i, (out, f) in enumerate(zip(sizes, scales)):
        n = x.shape[2 + i]
        ratio = 1.0 / f if f else n / out
        src = np.minimum(np.floor(np.arange(out) * np.float32(ratio)).astype(np.int64), n - 1)
        x = jnp.take(x, src, axis=2 + i)
    return x


@register(aten.upsample_bilinear2d.vec)
def upsample_bilinear(x, output_size, align_corners, scale_factors):
    sizes, scales = _out_sizes(x, output_size, scale_factors)
    for i, (out, f) in enumerate(zip(sizes, scales)):
        n, axis = x.shape[2 + i], 2 + i
        dst = np.arange(out, dtype=np.float64)
        if align_corners:
            src = dst * ((n - 1) / (out - 1)) if out > 1 else np.zeros_like(dst)
        else:
            ratio = 1.0 / f if f else n / out
            src = np.maximum((dst + 0.5) * ratio - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), n - 1)
        i1 = np.minimum(i0 + 1, n - 1)
        lam = jnp.asarray((src - i0).astype(np.float32), x.dtype).reshape((-1,) + (1,) * (x.ndim - 1 - axis))
        x = jnp.take(x, i0, axis=axis) * (1 - lam) + jnp.take(x, i1, axis=axis) * lam
    return x


def _cubic(t, a):
    """Keys' cubic convolution kernel: a=-0.75 for ATen's bicubic, a=-0.5 for its antialiased one (PIL's)."""
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((t - 5) * t + 8) * t * a - 4 * a, 0.0))


def _source_scale(n, out, align_corners, f):
    if align_corners:
        return (n - 1) / (out - 1) if out > 1 else 0.0
    return 1.0 / f if f else n / out


def _bicubic_matrix(n, out, align_corners, f):
    """(out, n) matrix of ATen's upsample_bicubic2d along one axis: 4 taps, borders replicated."""
    scale = _source_scale(n, out, align_corners, f)
    m = np.zeros((out, n), np.float64)
    for i in range(out):
        src = i * scale if align_corners else (i + 0.5) * scale - 0.5
        base = math.floor(src)
        t = src - base
        for k, w in zip(range(-1, 3), _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)):
            m[i, min(max(base + k, 0), n - 1)] += w
    return m


def _antialias_matrix(n, out, align_corners, f, kernel, support):
    """(out, n) matrix of ATen's antialiased (PIL-style) resampling along one axis: the kernel
    widened by the downscale factor, taps inside the input only, weights normalised to 1."""
    scale = _source_scale(n, out, align_corners, f)
    width = max(scale, 1.0)
    m = np.zeros((out, n), np.float64)
    for i in range(out):
        center = scale * (i + 0.5)
        lo = max(int(center - support * width + 0.5), 0)
        hi = min(int(center + support * width + 0.5), n)
        w = kernel((np.arange(lo, hi) - center + 0.5) / width)
        m[i, lo:hi] = w / w.sum() if w.sum() != 0 else w
    return m


def _resample(x, output_size, scale_factors, matrix):
    sizes, scales = _out_sizes(x, output_size, scale_factors)
    if output_size is not None and scale_factors:  # ATen maps indices with the given scales
        scales = list(scale_factors)
    mh, mw = (jnp.asarray(matrix(x.shape[2 + i], sizes[i], scales[i]).astype(np.float32), x.dtype) for i in range(2))
    return jnp.einsum("nchw,ih,jw->ncij", x, mh, mw)


def _resample_args(output_size, scales):
    """`.default` overloads take (scales_h, scales_w); `.vec` ones a scale_factors list."""
    if len(scales) == 2:
        return output_size, None if scales[0] is None and scales[1] is None else list(scales)
    return output_size, scales[0] if scales else None


@register(aten.upsample_bicubic2d.vec, aten.upsample_bicubic2d.default)
def upsample_bicubic(x, output_size, align_corners, *scales):
    size, factors = _resample_args(output_size, scales)
    return _resample(x, size, factors, lambda n, o, f: _bicubic_matrix(n, o, align_corners, f))


@register(aten._upsample_bicubic2d_aa.vec, aten._upsample_bicubic2d_aa.default)
def upsample_bicubic_aa(x, output_size, align_corners, *scales):
    # timm resamples ViT position embeddings with this (F.interpolate(bicubic, antialias=True)).
    size, factors = _resample_args(output_size, scales)
    return _resample(x, size, factors, lambda n, o, f: _antialias_matrix(
        n, o, align_corners, f, lambda t: _cubic(t, -0.5), 2.0))


@register(aten._upsample_bilinear2d_aa.vec, aten._upsample_bilinear2d_aa.default)
def upsample_bilinear_aa(x, output_size, align_corners, *scales):
    size, factors = _resample_args(output_size, scales)
    return _resample(x, size, factors, lambda n, o, f: _antialias_matrix(
        n, o, align_corners, f, lambda t: np.maximum(0.0, 1.0 - np.abs(t)), 1.0))


# ------------------------------------------------------------------ random ops (Flax "dropout" stream)


@register(aten.native_dropout.default)
def native_dropout(x, p, train):
    if train is False or p == 0:
        return x, jnp.ones(x.shape, jnp.bool_)
    if p >= 1:
        return jnp.zeros_like(x), jnp.zeros(x.shape, jnp.bool_)
    keep = jax.random.bernoulli(current().next_key(), 1.0 - p, x.shape)
    return jnp.where(keep, x / (1.0 - p), jnp.zeros((), x.dtype)), keep


@register(aten.bernoulli.p)
def bernoulli(x, p=0.5, generator=None):
    return jax.random.bernoulli(current().next_key(), p, x.shape).astype(x.dtype)


@register(aten.bernoulli.default)
def bernoulli_probs(x, generator=None):
    return jax.random.bernoulli(current().next_key(), x, x.shape).astype(x.dtype)


RANDOM_OPS = frozenset({aten.native_dropout.default, aten.bernoulli.p, aten.bernoulli.default})
