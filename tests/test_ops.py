"""Each op of the export op table (`torch2flax.export.ops.OPS`) against ATen itself.

Every case calls `torch.ops.aten.<op>.<overload>` and our table entry with the same
arguments (ours bound by the interpreter's `bind_arguments`, so defaults and
keyword-only arguments arrive as they do from a graph) on small random float32
NCHW inputs. Forward outputs must agree to 1e-5 of max(1, max|ref|) (integer and
boolean outputs exactly, with the same dtype kind); cases marked `grad` also
compare `jax.vjp` of our op with `torch.autograd.grad` under one random cotangent
(relative error in norm <= 1e-5). Tiny shapes, one XLA compile per case: the file runs in seconds.

`test_every_registered_op_is_tested_or_excused` keeps it that way: an op added to the table
needs a case here (or a NOT_TESTED reason).
"""
from __future__ import annotations

import math
import operator

import numpy as np
import pytest
import torch

A = torch.ops.aten
TOL = 1e-5
BIG = 2**63 - 1  # ATen's "to the end" slice bound
_rng = np.random.default_rng(0)


def rnd(*shape, lo=None, hi=None):
    """float32 standard normal, or uniform in [lo, hi)."""
    x = _rng.standard_normal(shape) if lo is None else _rng.uniform(lo, hi, shape)
    return torch.from_numpy(x.astype(np.float32))


def ints(hi, *shape, lo=0):
    return torch.from_numpy(_rng.integers(lo, hi, shape))


def case(op, *args, id=None, grad=False, outs=None, tol=TOL, **kwargs):
    """One table row. `grad`: True (every float tensor argument) or the positions of the
    arguments to differentiate; `outs`: the outputs to compare (default all)."""
    name = str(op).removeprefix("aten.")
    return pytest.param(op, args, kwargs, grad, outs, tol, id=f"{name}-{id}" if id else name)


X = rnd(2, 3, 4, 5)
POS = rnd(2, 3, 4, 5, lo=0.2, hi=3.0)
UNIT = rnd(2, 3, 4, 5, lo=-0.9, hi=0.9)
WIDE = rnd(2, 3, 4, 5, lo=-5.0, hi=5.0)  # reaches the kinks of hard* and the softplus threshold
HALVES = torch.round(rnd(2, 3, 4, 5) * 4) / 2  # exact ties for round and the comparisons
SPECIAL = torch.tensor([0.0, -1.5, math.nan, math.inf, -math.inf, 2.0])
MASK = rnd(2, 3, 4, 5) > 0
IX = ints(7, 2, 3, lo=-6)

UNARY = {  # op -> input; the VJP is checked for the activations and what norms and attention use
    A.neg: X, A.abs: X, A.exp: X, A.expm1: X, A.log: POS, A.log1p: POS, A.log2: POS, A.sqrt: POS, A.rsqrt: POS,
    A.sin: X, A.cos: X, A.tan: UNIT, A.tanh: X, A.atan: X, A.asin: UNIT, A.acos: UNIT, A.sinh: X, A.cosh: X,
    A.sigmoid: X, A.erf: X, A.erfinv: UNIT, A.sign: X, A.reciprocal: POS, A.floor: WIDE, A.ceil: WIDE,
    A.trunc: WIDE, A.round: HALVES, A.isnan: SPECIAL, A.isinf: SPECIAL, A.logical_not: HALVES, A.relu: X,
    A.silu: X, A.mish: X, A.hardsigmoid: WIDE, A.hardswish: WIDE,
}
UNARY_GRAD = {A.exp, A.log, A.sqrt, A.rsqrt, A.tanh, A.sigmoid, A.erf, A.relu, A.silu, A.mish, A.hardsigmoid,
              A.hardswish}
ELEMENTWISE = [case(op.default, x, grad=op in UNARY_GRAD) for op, x in UNARY.items()] + [
    case(A.add.Tensor, X, rnd(3, 1, 1), grad=True, id="broadcast"),
    case(A.add.Tensor, X, rnd(5), alpha=0.5, grad=True, id="alpha"),
    case(A.add.Scalar, X, 2.5),
    case(A.add.Tensor, IX, ints(3, 2, 3), id="int"),
    case(A.sub.Tensor, X, rnd(4, 5), alpha=2, grad=True),
    case(A.sub.Scalar, X, 1.5),
    case(A.rsub.Tensor, X, rnd(5), alpha=3, grad=True),
    case(A.rsub.Scalar, X, 2.0),
    case(A.mul.Tensor, X, rnd(3, 1, 5), grad=True),
    case(A.mul.Scalar, X, -0.5),
    case(A.div.Tensor, X, POS, grad=True),
    case(A.div.Scalar, X, 4.0),
    case(A.div.Tensor_mode, WIDE, POS, rounding_mode="floor", id="floor"),
    case(A.div.Tensor_mode, WIDE, POS, rounding_mode="trunc", id="trunc"),
    case(A.div.Tensor_mode, X, POS, rounding_mode=None, id="none"),
    case(A.div.Tensor_mode, IX, ints(4, 2, 3, lo=1), rounding_mode="floor", id="int-floor"),
    case(A.div.Tensor_mode, IX, ints(4, 2, 3, lo=1), rounding_mode="trunc", id="int-trunc"),
    case(A.div.Scalar_mode, WIDE, 0.75, rounding_mode="floor"),
    case(A.pow.Tensor_Scalar, POS, 2.5, grad=True, id="float"),
    case(A.pow.Tensor_Scalar, X, 3, id="int"),
    case(A.pow.Tensor_Tensor, POS, X, grad=True),
    case(A.pow.Scalar, 2.0, X),
    case(A.fmod.Tensor, WIDE, POS, id="float"),
    case(A.fmod.Scalar, WIDE, 1.5),
    case(A.fmod.Tensor, IX, ints(4, 2, 3, lo=1), id="int"),
    case(A.remainder.Tensor, WIDE, POS),
    case(A.remainder.Scalar, WIDE, -1.5),
    case(A.minimum.default, X, rnd(4, 5), grad=True),
    case(A.maximum.default, X, rnd(4, 5), grad=True),
    case(A.atan2.default, X, rnd(2, 3, 4, 5)),
    case(A.where.self, MASK, X, rnd(4, 5), grad=True),
    case(A.clamp.default, X, -0.5, 0.8, grad=True),
    case(A.clamp.default, X, None, 0.3, id="max-only"),
    case(A.clamp.Tensor, X, rnd(5) - 1, rnd(4, 1) + 1, grad=(0,)),
    case(A.clamp_min.default, X, 0.2, grad=True),
    case(A.clamp_max.default, X, 0.2, grad=True),
    case(A.hardtanh.default, WIDE),
    case(A.hardtanh.default, WIDE, 0.0, 6.0, grad=True, id="relu6"),
    case(A.leaky_relu.default, X),
    case(A.leaky_relu.default, X, 0.2, grad=True, id="0.2"),
    case(A.gelu.default, X, grad=True),
    case(A.gelu.default, X, approximate="tanh", grad=True, id="tanh"),
    case(A.elu.default, X),
    case(A.elu.default, X, 0.5, 1.5, 2.0, grad=True, id="scaled"),
    case(A.softplus.default, X),
    case(A.softplus.default, WIDE, 2.0, 3.0, grad=True, id="threshold"),
]
for _op in (A.eq, A.ne, A.lt, A.le, A.gt, A.ge):
    ELEMENTWISE += [case(_op.Tensor, HALVES, torch.round(rnd(4, 5) * 4) / 2), case(_op.Scalar, HALVES, 0.5)]
ELEMENTWISE += [
    case(A.logical_and.default, MASK, X > 0.5),
    case(A.logical_or.default, MASK, X),
    case(A.logical_xor.default, MASK, X > 0.5),
    case(A.bitwise_not.default, MASK, id="bool"),
    case(A.bitwise_not.default, IX, id="int"),
    case(A.bitwise_and.Tensor, MASK, X > 0.5),
    case(A.bitwise_and.Scalar, IX, 6),
    case(A.bitwise_or.Tensor, IX, ints(8, 2, 3)),
    case(A.bitwise_or.Scalar, MASK, True),
]

REDUCTIONS = [
    case(A.mean.dim, X, [2, 3], True, grad=True, id="hw-keepdim"),
    case(A.mean.dim, X, [-1], id="last"),
    case(A.mean.dim, X, None, dtype=torch.float32, id="all-dtype"),
    case(A.mean.default, X, grad=True),
    case(A.sum.dim_IntList, X, [1], True),
    case(A.sum.dim_IntList, X, [0, 2], grad=True, id="0-2"),
    case(A.sum.dim_IntList, MASK, [1], dtype=torch.int64, id="bool-int64"),
    case(A.sum.default, X, grad=True),
    case(A.prod.dim_int, POS, 2, True, grad=True),
    case(A.amax.default, X, [1, 2], True, grad=True),
    case(A.amax.default, X, id="all"),
    case(A.amin.default, X, [-1]),
    case(A.max.dim, X, 1, True, grad=True),
    case(A.min.dim, X, -1),
    case(A.max.default, X, grad=True),
    case(A.min.default, X),
    case(A.argmax.default, X),
    case(A.argmax.default, X, 1, True, id="dim"),
    case(A.argmin.default, X, -1),
    case(A.any.dim, MASK, 1, True),
    case(A.any.dims, X > 1.5, [2, 3]),
    case(A.any.default, X > 3),
    case(A.var.correction, X, [0, 2, 3], correction=0, keepdim=True, grad=True, id="biased-keepdim"),
    case(A.var.correction, X, [1], id="default"),
    case(A.var.correction, X, None, correction=2, id="all-2"),
    case(A.var.correction, X, [0], correction=2, id="no-dof"),  # 2 samples, correction 2: ATen divides by 0
    case(A.cumsum.default, X, 1, grad=True),
    case(A.cumsum.default, MASK, -1, dtype=torch.int64, id="bool"),
    case(A.linalg_vector_norm.default, X, 2, [-1], True, grad=True),
    case(A.linalg_vector_norm.default, X, math.inf, [1, 2], grad=True, id="inf"),
    case(A.linalg_vector_norm.default, X, 1, id="1-all"),
    case(A.linalg_vector_norm.default, X, 3, [1], grad=True, id="3"),
    case(A.linalg_vector_norm.default, X, -math.inf, [0, 3], True, grad=True, id="-inf"),
    case(A.linalg_vector_norm.default, torch.relu(X), 0, [1], id="0"),
    case(A._softmax.default, X, 1, False, grad=True),
    case(A._log_softmax.default, X, -1, False, grad=True),
    case(A._safe_softmax.default, X, -1, grad=True),
    # a fully masked row (all -inf) gives zeros, a partly masked one a softmax over the rest; the
    # gradient is torch's (zero on a masked row, not NaN)
    case(A._safe_softmax.default, torch.where(torch.arange(5) < 2, -math.inf, X).index_fill(2, torch.tensor([1]),
                                                                                          -math.inf), -1, id="masked",
         grad=True),
]

SHAPES = [
    case(A.view.default, X, [6, 20], grad=True),
    case(A._unsafe_view.default, X, [2, 3, 20]),
    case(A.reshape.default, X, [-1, 10]),
    case(A.permute.default, X, [0, 2, 3, 1], grad=True),
    case(A.permute.default, X, [-1, 0, -2, 1], id="negative"),
    case(A.expand.default, rnd(3, 1, 5), [2, 3, 4, 5], grad=True),
    case(A.expand.default, rnd(3, 1, 1), [2, -1, 4, 5], grad=True, id="minus1"),
    case(A.clone.default, X),
    case(A.alias.default, X),
    case(A.lift_fresh_copy.default, X),
    case(A.contiguous.default, X),
    case(A.detach.default, X),
    case(A._to_copy.default, WIDE, dtype=torch.int64, id="int64"),
    case(A._to_copy.default, X, dtype=torch.bool, id="bool"),
    case(A._to_copy.default, IX, dtype=torch.float32, id="float"),
    case(A._to_copy.default, X, id="same"),
    case(A.copy.default, X, rnd(4, 5)),  # ATen has no derivative for copy
    case(A.slice.Tensor, X, 1, 1, BIG, grad=True),
    case(A.slice.Tensor, X, -1, -4, -1, 2, grad=True, id="negative-step2"),
    case(A.slice_scatter.default, X, rnd(2, 3, 2, 5), 2, 1, 3, grad=True),
    case(A.slice_scatter.default, X, rnd(2, 3, 4, 3), 3, 0, BIG, 2, grad=True, id="step2"),
    case(A.select.int, X, 1, 2, grad=True),
    case(A.select.int, X, -1, -1, grad=True, id="negative"),
    case(A.select_scatter.default, X, rnd(2, 3, 5), 2, 1, grad=True),
    case(A.select_scatter.default, X, rnd(2, 3, 4), -1, -2, grad=True, id="negative"),
    case(A.squeeze.dims, rnd(2, 1, 4, 1), [1, -1]),
    case(A.squeeze.dims, rnd(2, 1, 4, 1), [0, 1], id="non-unit"),
    case(A.squeeze.dim, rnd(2, 1, 4, 1), -1),
    case(A.squeeze.default, rnd(2, 1, 4, 1)),
    case(A.unsqueeze.default, X, -1),
    case(A.unsqueeze.default, X, 1, id="1"),
    case(A.cat.default, [X, rnd(2, 2, 4, 5)], 1, grad=True),
    case(A.cat.default, [rnd(3, 2), torch.zeros(0), rnd(1, 2)], grad=True, id="legacy-empty"),
    case(A.split_with_sizes.default, X, [1, 2], 1, grad=True),
    case(A.split.Tensor, X, 2, -1, grad=True),
    case(A.unbind.int, X, 1, grad=True),
    case(A.repeat.default, X, [2, 1, 1, 2], grad=True),
    case(A.repeat.default, rnd(4, 5), [2, 1, 3], grad=True, id="new-dim"),
    case(A.flip.default, X, [1, -1], grad=True),
    case(A.roll.default, X, [1, -2], [1, 3], grad=True),
    case(A.roll.default, X, [7], grad=True, id="flat"),
    case(A.as_strided.default, X, [2, 3, 3, 2], [60, 20, 5, 2], grad=True, id="overlapping"),
    case(A.as_strided.default, X, [4, 5], [1, 4], 7, grad=True, id="offset"),
    case(A.constant_pad_nd.default, X, [1, 2], grad=True),
    case(A.constant_pad_nd.default, X, [1, 1, 2, 0], 0.5, grad=True, id="value"),
    case(A.constant_pad_nd.default, X, [-1, 2, 1, -2], grad=True, id="crop"),
    case(A.sym_size.int, X, 2),
    case(A.sym_numel.default, X),
]

INDEXING = [
    case(A.index.Tensor, X, [None, ints(3, 4)], grad=True, id="dim1"),
    case(A.index.Tensor, X, [ints(2, 3), None, ints(4, 3)], grad=True, id="split"),
    case(A.index.Tensor, X, [ints(2, 2, 1), ints(3, 4)], grad=True, id="broadcast"),
    case(A._unsafe_index.Tensor, X, [None, None, ints(4, 6), ints(5, 1, 1)], grad=True),
    case(A.index_put.default, X, [None, torch.tensor([2, 0])], rnd(2, 2, 4, 5), grad=True),
    case(A.index_put.default, X, [torch.tensor([1, 0, 1])], rnd(3, 4, 5), True, grad=True, id="accumulate"),
    case(A._unsafe_index_put.default, X, [None, None, torch.tensor([3, 1])], rnd(5), grad=True),
    case(A.index_select.default, X, 2, torch.tensor([3, 0, 3]), grad=True),
    case(A.gather.default, X, 1, ints(3, 2, 2, 4, 5), grad=True),
    case(A.embedding.default, rnd(10, 4), torch.tensor([[1, 3, 1], [9, 0, 2]]), grad=True),
    case(A.embedding.default, rnd(10, 4), torch.tensor([[1, 3, 1], [9, 0, 2]]), 1, grad=True, id="padding-idx"),
]

CREATION = [
    case(A.full.default, [2, 3], 1.5),
    case(A.full.default, [2, 3], 7, id="int"),
    case(A.full.default, [2, 3], True, id="bool"),
    case(A.full.default, [2, 3], 2, dtype=torch.float32, id="dtype"),
    case(A.full_like.default, X, 2.5),
    case(A.full_like.default, X, 3, dtype=torch.int64, id="int"),
    case(A.zeros.default, [2, 3]),
    case(A.zeros.default, [3], dtype=torch.int64, id="int"),
    case(A.ones.default, [2, 3]),
    case(A.ones.default, [4], dtype=torch.bool, id="bool"),
    case(A.zeros_like.default, X),
    case(A.zeros_like.default, X, dtype=torch.bool, id="bool"),
    case(A.ones_like.default, IX),
    case(A.scalar_tensor.default, 2.5),
    case(A.scalar_tensor.default, 3, id="int"),
    case(A.scalar_tensor.default, 3, dtype=torch.int64, id="dtype"),
    case(A.arange.default, 5),
    case(A.arange.default, 4.5, id="float"),
    case(A.arange.start, 2, 9),
    case(A.arange.start_step, 0, 1, 0.25),
    case(A.arange.start_step, 1, 10, 3, dtype=torch.float32, id="dtype"),
    case(A.arange.start_step, 5, -4, -2, id="down"),
]
UNINITIALISED = [  # uninitialised memory in ATen: only shape and dtype compare
    case(A.empty.memory_format, [2, 3]),
    case(A.empty.memory_format, [3], dtype=torch.int64, id="int"),
    case(A.empty_like.default, X),
]


def conv(x, w, b=None, stride=(1,), padding=(0,), dilation=(1,), groups=1, transposed=False, out_pad=(0,), id=None):
    return case(A.convolution.default, x, w, b, list(stride), list(padding), list(dilation), transposed,
                list(out_pad), groups, grad=True, id=id)


CONVS = [  # the small-map path is taken by dense 2D convs with <= 3x3 taps and <= 9 output pixels
    conv(rnd(2, 4, 3, 3), rnd(6, 4, 3, 3), rnd(6), padding=(1, 1), id="3x3-small-map"),
    conv(rnd(2, 4, 7, 6), rnd(6, 4, 3, 3), stride=(2, 2), padding=(1, 1), id="3x3-s2"),
    conv(rnd(2, 4, 5, 5), rnd(6, 2, 3, 3), rnd(6), padding=(2, 2), dilation=(2, 2), groups=2, id="grouped-dilated"),
    conv(rnd(2, 4, 2, 3), rnd(8, 2, 3, 3), rnd(8), padding=(1, 1), groups=2, id="grouped-small-map"),
    conv(rnd(2, 4, 4, 4), rnd(4, 1, 3, 3), rnd(4), padding=(1, 1), groups=4, id="depthwise"),
    conv(rnd(2, 8, 6, 6), rnd(8, 1, 5, 5), stride=(2, 2), padding=(2, 2), groups=8, id="depthwise-5x5-s2"),
    conv(rnd(1, 3, 8, 7), rnd(4, 3, 5, 3), rnd(4), (2, 1), (2, 0), (1, 2), id="asymmetric"),
    conv(rnd(2, 4, 4, 4), rnd(6, 4, 1, 1), rnd(6), stride=(2, 2), id="1x1-s2"),
    conv(rnd(1, 3, 8, 8), rnd(4, 3, 4, 4), rnd(4), stride=(4, 4), id="patchify"),
    conv(rnd(2, 4, 9), rnd(6, 2, 3), rnd(6), (2,), (1,), (2,), groups=2, id="1d"),
    conv(rnd(1, 2, 3, 4, 4), rnd(3, 2, 2, 2, 2), rnd(3), padding=(1,), id="3d"),
    conv(rnd(2, 4, 3, 3), rnd(4, 3, 3, 3), rnd(3), (2, 2), (1, 1), transposed=True, out_pad=(1, 1), id="transposed"),
    conv(rnd(1, 4, 3, 4), rnd(4, 2, 2, 3), None, (2, 1), (0, 1), (1, 2), groups=2, transposed=True, out_pad=(1, 0),
         id="transposed-grouped"),
    conv(rnd(2, 3, 5), rnd(3, 2, 4), rnd(2), (3,), (1,), transposed=True, id="transposed-1d"),
]
MATMULS = [
    case(A.mm.default, rnd(3, 4), rnd(4, 5), grad=True),
    case(A.bmm.default, rnd(2, 3, 4), rnd(2, 4, 5), grad=True),
    case(A.addmm.default, rnd(5), rnd(3, 4), rnd(4, 5), grad=True),
    case(A.addmm.default, rnd(3, 5), rnd(3, 4), rnd(4, 5), beta=0.5, alpha=2.0, grad=True, id="beta-alpha"),
    # kept whole at export: one dot_general over the last dim of an N-D input, no flattening views
    case(A.linear.default, rnd(2, 3, 4), rnd(5, 4), rnd(5), grad=True),
    case(A.linear.default, rnd(3, 4), rnd(5, 4), grad=True, id="no-bias"),
]

W, B, RM, RV = rnd(3), rnd(3), rnd(3), rnd(3, lo=0.5, hi=2.0)
NORMS = [
    case(A.native_layer_norm.default, rnd(2, 3, 8), [8], rnd(8), rnd(8), 1e-5, grad=True),
    case(A.native_layer_norm.default, X, [4, 5], None, None, 1e-6, grad=True, id="2d-no-affine"),
    case(A.native_group_norm.default, rnd(2, 6, 3, 4), rnd(6), rnd(6), 2, 6, 12, 3, 1e-5, grad=True),
    case(A.native_group_norm.default, rnd(2, 4, 5), None, None, 2, 4, 5, 1, 1e-3, grad=True, id="1-group"),
    case(A._native_batch_norm_legit_no_training.default, X, W, B, RM, RV, 0.1, 1e-5, grad=(0, 1, 2)),
    case(A._native_batch_norm_legit_no_training.default, rnd(4, 3), None, None, RM, RV, 0.1, 1e-3, grad=(0,),
         id="2d"),
    case(A._native_batch_norm_legit_functional.default, X, W, B, RM, RV, True, 0.1, 1e-5, grad=(0, 1, 2)),
    case(A._native_batch_norm_legit_functional.default, rnd(5, 3, 4), None, None, RM, RV, True, 0.3, 1e-3,
         grad=(0,), id="1d-no-affine"),
    # Eval through the functional op: ATen's saved mean/rstd outputs (1, 2) are empty, ours unused.
    case(A._native_batch_norm_legit_functional.default, X, W, B, RM, RV, False, 0.1, 1e-5, grad=(0, 1, 2),
         outs=(0, 3, 4), id="eval"),
    case(A._native_batch_norm_legit.no_stats, rnd(4, 3, 2, 2), W, B, True, 0.1, 1e-5, grad=(0, 1, 2)),
]

TIES = torch.relu(rnd(1, 2, 8, 8) - 1)
POOLS = [  # max_pool's indices (output 1) feed only max_unpool and backward: we do not compute them
    case(A.max_pool2d_with_indices.default, rnd(2, 3, 7, 6), [3, 3], [2, 2], [1, 1], grad=True, outs=(0,)),
    case(A.max_pool2d_with_indices.default, rnd(1, 2, 6, 6), [3, 3], [2, 2], [0, 0], [1, 1], True, grad=True,
         outs=(0,), id="ceil"),
    case(A.max_pool2d_with_indices.default, rnd(1, 2, 8, 7) - 5, [3, 2], [2, 3], [1, 1], [2, 2], True, grad=True,
         outs=(0,), id="dilated-ceil-negative"),
    case(A.max_pool2d_with_indices.default, X, [2, 2], grad=True, outs=(0,), id="default-stride"),
    # Post-ReLU zeros tie within windows: ATen's gradient goes to the first maximum.
    case(A.max_pool2d_with_indices.default, TIES, [3, 3], [1, 1], [1, 1], grad=True, outs=(0,), id="ties"),
    case(A.max_pool2d_with_indices.default, TIES, [2, 3], [2, 1], [1, 1], [2, 2], grad=True, outs=(0,),
         id="ties-dilated"),
    case(A.max_pool3d_with_indices.default, rnd(1, 2, 4, 5, 5), [2, 2, 2], [2, 2, 2], [0, 1, 1], grad=True, outs=(0,)),
    case(A.avg_pool2d.default, rnd(2, 3, 7, 6), [3, 3], [2, 2], [1, 1], grad=True),
    case(A.avg_pool2d.default, rnd(2, 3, 7, 6), [3, 3], [2, 2], [1, 1], False, False, grad=True, id="exclude-pad"),
    case(A.avg_pool2d.default, rnd(1, 2, 6, 7), [3, 3], [2, 2], [1, 1], True, True, grad=True, id="ceil-include"),
    case(A.avg_pool2d.default, rnd(1, 2, 6, 7), [3, 2], [2, 2], [1, 0], True, False, grad=True, id="ceil-exclude"),
    case(A.avg_pool2d.default, rnd(1, 2, 5, 5), [2, 2], [2, 2], [0, 0], True, grad=True, id="ceil-overhang"),
    case(A.avg_pool2d.default, rnd(1, 2, 6, 6), [3, 3], [2, 2], [1, 1], False, True, 4, grad=True, id="divisor"),
    case(A.avg_pool2d.default, X, [2, 2], grad=True, id="default-stride"),
    case(A.avg_pool3d.default, rnd(1, 2, 4, 5, 5), [2, 3, 3], [2, 2, 2], [0, 1, 1], True, False, grad=True),
    case(A._adaptive_avg_pool2d.default, rnd(2, 3, 5, 7), [3, 4], grad=True),
    case(A._adaptive_avg_pool2d.default, X, [1, 1], grad=True, id="global"),
    case(A._adaptive_avg_pool2d.default, rnd(1, 2, 2, 3), [3, 5], grad=True, id="up"),
    case(A.upsample_nearest2d.vec, X, [7, 9], None, grad=True),
    case(A.upsample_nearest2d.vec, X, None, [2.0, 1.5], grad=True, id="scales"),
    case(A.upsample_nearest2d.vec, rnd(1, 2, 6, 7), None, [0.5, 1.7], grad=True, id="scales-odd"),
    case(A.upsample_nearest2d.vec, X, [3, 2], None, grad=True, id="down"),
]
for _ac in (False, True):
    POOLS += [
        case(A.upsample_bilinear2d.vec, X, [7, 9], _ac, None, grad=True, id=f"align{_ac:d}"),
        case(A.upsample_bilinear2d.vec, X, None, _ac, [2.0, 1.5], grad=True, id=f"align{_ac:d}-scales"),
        case(A.upsample_bilinear2d.vec, rnd(1, 2, 6, 7), None, _ac, [0.5, 1.7], grad=True, id=f"align{_ac:d}-odd"),
        case(A.upsample_bilinear2d.vec, X, [3, 2], _ac, None, grad=True, id=f"align{_ac:d}-down"),
        case(A.upsample_bicubic2d.vec, X, [7, 9], _ac, None, grad=True, id=f"align{_ac:d}"),
        case(A.upsample_bicubic2d.vec, rnd(1, 2, 6, 7), None, _ac, [0.5, 1.7], grad=True, id=f"align{_ac:d}-odd"),
        case(A.upsample_bicubic2d.default, X, [3, 2], _ac, grad=True, id=f"align{_ac:d}-down"),
        case(A._upsample_bicubic2d_aa.vec, X, [7, 9], _ac, None, grad=True, id=f"align{_ac:d}"),
        case(A._upsample_bicubic2d_aa.default, rnd(1, 2, 14, 14), [5, 9], _ac, grad=True, id=f"align{_ac:d}-down"),
        case(A._upsample_bilinear2d_aa.vec, rnd(1, 2, 9, 8), None, _ac, [0.4, 0.75], grad=True, id=f"align{_ac:d}-down"),
        case(A._upsample_bilinear2d_aa.default, X, [6, 11], _ac, grad=True, id=f"align{_ac:d}-up"),
    ]

MISC = [  # runtime asserts (no-ops on static shapes) and the deterministic corners of the random ops
    case(A._assert_tensor_metadata.default, X, [2, 3, 4, 5], None, torch.float32),
    case(A._assert_scalar.default, True, "x > 0"),
    case(A._assert_async.msg, torch.tensor(True), "x > 0"),
    case(A.sym_constrain_range.default, 3, min=0, max=5),
    case(A.sym_constrain_range_for_size.default, 3),
    case(A.native_dropout.default, X, 0.5, False, grad=True, id="eval"),
    case(A.native_dropout.default, X, 0.0, True, grad=True, id="p0"),
    case(A.native_dropout.default, X, 1.0, True, id="p1"),
    case(A.bernoulli.p, X, 1.0, id="p1"),
    case(A.bernoulli.p, X, 0.0, id="p0"),
    case(A.bernoulli.default, (X > 0).float(), id="binary-probs"),
]

CASES = ELEMENTWISE + REDUCTIONS + SHAPES + INDEXING + CREATION + CONVS + MATMULS + NORMS + POOLS + MISC

# Python and SymInt plumbing the interpreter runs on sizes: registered as themselves (or builtins).
PLUMBING = {
    operator.getitem: ((4, 5, 6), 1), operator.add: (7, 2), operator.sub: (7, 2), operator.mul: (7, 2),
    operator.floordiv: (-7, 2), operator.truediv: (7, 2), operator.mod: (-7, 2), operator.pow: (7, 2),
    operator.neg: (7,), operator.eq: (7, 2), operator.ne: (7, 2), operator.lt: (7, 2), operator.le: (7, 7),
    operator.gt: (7, 2), operator.ge: (2, 7), operator.and_: (True, False), operator.or_: (True, False),
    operator.not_: (0,), math.ceil: (2.5,), math.floor: (-2.5,), math.trunc: (-2.5,), math.sqrt: (9,),
    torch.sym_float: (3,), torch.sym_int: (3.7,), torch.sym_max: (2, 5), torch.sym_min: (2, 5),
    torch.sym_not: (True,),
}

NOT_TESTED: dict = {}  # op -> why no case above can compare it with ATen


# ------------------------------------------------------------------ helpers


def _jax(v):
    import jax.numpy as jnp

    return jnp.asarray(v.detach().numpy()) if isinstance(v, torch.Tensor) else v


def _ours(op, args, kwargs):
    """Our table entry on `args`, bound as the interpreter binds a graph node's arguments."""
    import jax

    from torch2flax.export import ops
    from torch2flax.export.interpreter import bind_arguments

    args, kwargs = jax.tree.map(_jax, (args, kwargs))
    with ops.running(ops.RunContext(rng=jax.random.key(0))):
        return ops.OPS[op](*bind_arguments(op, args, kwargs))


def _listed(v):
    return list(v) if isinstance(v, (tuple, list)) else [v]


def assert_close(ours, ref, tol=TOL, values=True):
    """Same shape and dtype kind; floats within tol * max(1, max|ref|), everything else exact."""
    if ref is None or isinstance(ref, (bool, int, float)):
        assert ours == ref, (ours, ref)
        return
    ours, ref = np.asarray(ours), ref.detach().numpy()
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert ours.dtype.kind == ref.dtype.kind, (ours.dtype, ref.dtype)
    if not values:
        return
    if ref.dtype.kind != "f":
        np.testing.assert_array_equal(ours, ref)
        return
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(ours[~finite], ref[~finite])  # nan == nan here, and the infinities
    scale = max(1.0, float(np.abs(ref[finite]).max(initial=0.0)))
    err = float(np.abs(ours[finite] - ref[finite]).max(initial=0.0))
    assert err <= tol * scale, f"max error {err:.3g} > {tol:g} * {scale:.3g}"


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _substitute(args, subs):
    """`args` with leaf j of argument i replaced by subs[(i, j)] (leaves as `jax.tree` sees them)."""
    import jax

    out = []
    for i, a in enumerate(args):
        leaves, tree = jax.tree.flatten(a)
        out.append(jax.tree.unflatten(tree, [subs.get((i, j), v) for j, v in enumerate(leaves)]))
    return tuple(out)


# Compile options for the tiny, run-once programs here: LLVM -O0 and XLA:CPU's older (non-"fusion
# emitter") code generator take half the compile time that is most of this file's runtime.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def run_jit(f, *args):
    """`jax.jit(f)(*args)`, compiled with FAST_COMPILE (without it if this XLA lacks an option)."""
    import jax

    lowered = jax.jit(f).lower(*args)
    try:
        compiled = lowered.compile(FAST_COMPILE)
    except RuntimeError as e:
        if "No such compile option" not in str(e):
            raise
        compiled = lowered.compile()
    return compiled(*args)


def check(op, args, kwargs, grad=False, outs=None, tol=TOL):
    """Forward outputs (those in `outs`, default all) against ATen's; with `grad`, also the VJP
    against `torch.autograd.grad` for one random cotangent on the main output (every piece of
    a list-returning op such as `split`). Ours runs as one jit (one compile rather than one per
    primitive) with every tensor argument traced, so nothing constant-folds."""
    import jax

    tensors = [(i, j) for i, a in enumerate(args) for j, v in enumerate(jax.tree.leaves(a))
               if isinstance(v, torch.Tensor)]
    leaves = {p: jax.tree.leaves(args[p[0]])[p[1]].detach().clone() for p in tensors}
    diff = [p for p in tensors if grad and leaves[p].is_floating_point() and (grad is True or p[0] in grad)]
    for p in diff:
        leaves[p].requires_grad_()
    out = op(*_substitute(args, leaves), **kwargs)
    pick = (lambda o: list(o)) if isinstance(out, list) else (lambda o: _listed(o)[:1])
    cts = [np.random.default_rng(1).standard_normal(o.shape).astype(np.float32) for o in pick(out)] if diff else []

    def fwd_and_vjp(values, cts):
        def f(*xs):
            full = _ours(op, _substitute(args, {**dict(zip(tensors, values)), **dict(zip(diff, xs))}), kwargs)
            return pick(full), full
        _, pullback, full = jax.vjp(f, *(values[tensors.index(p)] for p in diff), has_aux=True)
        return full, pullback(cts) if diff else ()

    if all(isinstance(o, torch.Tensor) for o in _listed(out)):
        ours, grads = run_jit(fwd_and_vjp, [_jax(leaves[p]) for p in tensors], cts)
    else:  # sizes and asserts: Python ints and None
        ours, grads = _ours(op, args, kwargs), ()
    ours, ref = _listed(ours), _listed(out)
    assert len(ours) == len(ref)
    for k in outs if outs is not None else range(len(ref)):
        assert_close(ours[k], ref[k], tol)
    if diff:
        grads_ref = torch.autograd.grad(pick(out), [leaves[p] for p in diff], [torch.from_numpy(c) for c in cts],
                                        allow_unused=True)
        for (i, j), g, r in zip(diff, grads, grads_ref):
            r = np.zeros(g.shape, np.float32) if r is None else r.numpy()
            assert rel_err(g, r) <= tol, f"gradient of argument {i}.{j}: relative error {rel_err(g, r):.3g}"


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("op,args,kwargs,grad,outs,tol", CASES)
def test_op_matches_aten(op, args, kwargs, grad, outs, tol):
    check(op, args, kwargs, grad, outs, tol)


@pytest.mark.parametrize("op,args,kwargs,grad,outs,tol", UNINITIALISED)
def test_uninitialised_creation_matches_aten_shape_and_dtype(op, args, kwargs, grad, outs, tol):
    assert_close(_ours(op, args, kwargs), op(*args, **kwargs), values=False)


@pytest.mark.parametrize("op,args,kwargs,grad,outs,tol",
                         [c for c in CONVS if c.id.split("-", 1)[1] in ("3x3-s2", "grouped-dilated", "depthwise")])
def test_convolution_nchw_layout_matches_aten(op, args, kwargs, grad, outs, tol, monkeypatch):
    from torch2flax.export import ops

    monkeypatch.setattr(ops, "CONV_LAYOUT", "NCHW")
    check(op, args, kwargs, grad, outs, tol)


@pytest.mark.parametrize("fn", list(PLUMBING), ids=lambda f: getattr(f, "__name__", str(f)))
def test_plumbing_ops_are_python_semantics(fn):
    from torch2flax.export import ops

    args = PLUMBING[fn]
    assert ops.OPS[fn](*args) == fn(*args)
    assert type(ops.OPS[fn](*args)) is type(fn(*args))


def test_random_ops_draw_from_the_dropout_stream():
    import jax
    import jax.numpy as jnp

    from torch2flax.export import ops

    def draw(x):
        with ops.running(ops.RunContext(rng=jax.random.key(0), node_index=3)) as ctx:
            y, keep = ops.OPS[A.native_dropout.default](x, 0.25, True)
            coin = ops.OPS[A.bernoulli.p](x, 0.3)
            probs = ops.OPS[A.bernoulli.default](jnp.full(x.shape, 0.8))
            ctx.node_index = 4
            return y, keep, coin, probs, ops.OPS[A.native_dropout.default](x, 0.25, True)[1]

    x = jnp.asarray(rnd(64, 64).numpy())
    y, keep, coin, probs, keep_next = run_jit(draw, x)
    assert abs(float(keep.mean()) - 0.75) < 0.03 and abs(float(coin.mean()) - 0.3) < 0.03
    assert abs(float(probs.mean()) - 0.8) < 0.03 and coin.dtype == x.dtype
    np.testing.assert_allclose(y, jnp.where(keep, x / 0.75, 0.0), rtol=1e-6)
    assert float(jnp.mean(keep != keep_next)) > 0.2  # each node folds its own index into the key
    with pytest.raises(ValueError, match="dropout"):
        ops.OPS[A.native_dropout.default](x, 0.25, True)  # no RunContext: no key


def test_sync_batchnorm_over_a_mapped_axis_equals_the_global_batch():
    import jax

    from torch2flax.export import ops

    op = A._native_batch_norm_legit_functional.default
    x, w, b = rnd(4, 3, 2, 2) * 2 + 1, rnd(3), rnd(3)
    ref = op(x, w, b, RM, RV, True, 0.1, 1e-5)

    def bn(x):  # the batch split over a vmapped axis of 2 "devices"
        with ops.running(ops.RunContext(axis_name="batch")):
            return jax.vmap(lambda x: ops.OPS[op](x, *(_jax(t) for t in (w, b, RM, RV)), True, 0.1, 1e-5),
                            axis_name="batch")(x.reshape(2, 2, 3, 2, 2))

    out = run_jit(bn, _jax(x))
    assert_close(out[0].reshape(x.shape), ref[0])
    for k in range(1, 5):
        assert_close(out[k][0], ref[k])  # statistics and running-stat updates of the global batch


PRECISION_CASES = {  # op, the arguments after the input, input shape, the axis the deviations pair along
    "batch_norm": (A._native_batch_norm_legit_functional.default, (None, None, RM, RV, True, 0.1, 1e-5),
                   (8, 3, 6, 6), 0),
    "layer_norm": (A.native_layer_norm.default, ([256], None, None, 1e-5), (6, 256), 1),
}


@pytest.mark.parametrize("name", list(PRECISION_CASES))
def test_train_norms_keep_float32_precision_when_the_mean_dominates(name):
    """x = 1000 + 0.01 * randn: a float32 sum rounds the mean by several ulps (6e-5 each at 1000),
    a 1e-2 error against the 0.01 spread. `layers.moments` corrects the mean with a second pass;
    without it this test fails (measured output errors: 1.9e-2 for BN, 3.4e-3 for LN; with it,
    4e-8). The deviations come in +- pairs within every normalised group, so the exact mean (1000)
    is a float32 and an accurate float32 result exists; ATen's float32 kernels are 2e-3 (BN) and
    3e-4 (LN) off here."""
    import jax

    op, rest, shape, axis = PRECISION_CASES[name]
    half = rnd(*(n // 2 if a == axis else n for a, n in enumerate(shape)))
    x = 1000 + 0.01 * torch.cat([half, -half], axis)
    ct = rnd(*shape)
    x64 = x.double().requires_grad_()
    ref = op(x64, *(r.double() if isinstance(r, torch.Tensor) else r for r in rest))[0]
    (g_ref,) = torch.autograd.grad(ref, x64, ct.double())

    def fwd_and_vjp(x, ct):
        y, pullback = jax.vjp(lambda x: _ours(op, (x, *rest), {})[0], x)
        return y, pullback(ct)[0]

    y, g = run_jit(fwd_and_vjp, _jax(x), _jax(ct))
    errors = rel_err(y, ref.detach().numpy()), rel_err(g, g_ref.numpy())
    assert max(errors) <= 1e-4, f"relative error of output, input gradient: {errors[0]:.2g}, {errors[1]:.2g}"



@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_keeps_one_array_for_the_backward_pass(approximate):
    """Differentiating jax.nn.gelu keeps three input-sized arrays (product, erfc, exp); torch's
    GELU backward reads one (its input), and ours one (the derivative, in the input's dtype: a
    bf16 ViT's train step on a TPU kept float32 ones besides, docs/benchmarks.md). Its gradient
    is torch's: the op table above. Forward mode works too."""
    import contextlib
    import io

    import jax
    import jax.numpy as jnp
    from jax.ad_checkpoint import print_saved_residuals

    from torch2flax.export import ops

    x = jnp.linspace(-4, 4, 96, dtype=jnp.bfloat16).reshape(8, 12)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(lambda x: ops.gelu(x, approximate).astype(jnp.float32).sum(), x)
    kept = [line for line in out.getvalue().splitlines() if "[8,12]" in line]
    assert len(kept) == 1 and kept[0].startswith("bf16["), kept
    tangent = jax.jvp(lambda x: ops.gelu(x, approximate), (x,), (jnp.ones_like(x),))[1]
    assert float(jnp.abs(tangent[-1, -1] - 1).astype(jnp.float32)) < 0.02  # GELU'(4) = 1.0005

def test_every_registered_op_is_tested_or_excused():
    from torch2flax.export import ops

    tested = {c.values[0] for c in CASES + UNINITIALISED} | set(PLUMBING)
    untested = set(ops.OPS) - tested - set(NOT_TESTED)
    assert not untested, f"ops with no test case and no NOT_TESTED reason: {sorted(map(str, untested))}"
    assert not set(NOT_TESTED) & tested, "NOT_TESTED lists ops that are tested"
    assert set(NOT_TESTED) <= set(ops.OPS), "NOT_TESTED lists ops that are not registered"


# ------------------------------------------------------------------ channels-last propagation


def _layout_cases():
    from torch2flax.export import layout

    def has_4d(args):
        return any(isinstance(v, torch.Tensor) and v.ndim == 4 for a in args for v in _listed(a))
    return [c for c in CASES if c.values[0] in layout.OPS and has_4d(c.values[1])]


def _tag(v):
    from torch2flax.export import layout

    if isinstance(v, (list, tuple)):
        return type(v)(_tag(x) for x in v)
    if hasattr(v, "ndim") and v.ndim == 4 and v.dtype.kind == "f":
        return layout.ChannelsLast(v.transpose(0, 2, 3, 1))
    return v


@pytest.mark.parametrize("op,args,kwargs,grad,outs,tol", _layout_cases())
def test_channels_last_op_equals_the_nchw_op(op, args, kwargs, grad, outs, tol):
    """Each op of `layout.OPS` on channels-last (NHWC-held) 4-D float inputs gives, once back in
    NCHW, what the plain op gives; and its VJP agrees too (the train step differentiates it)."""
    import jax
    import jax.numpy as jnp

    from torch2flax.export import layout, ops
    from torch2flax.export.interpreter import bind_arguments

    bound = bind_arguments(op, *jax.tree.map(_jax, (args, kwargs)))
    floats = [i for i, a in enumerate(bound) if any(isinstance(v, jax.Array) and v.dtype.kind == "f"
                                                    for v in _listed(a))]

    weight = 1 if op == A.convolution.default else None  # parameters never arrive channels-last

    def run(fn, tag, *xs):
        full = list(bound)
        for i, x in zip(floats, xs):
            full[i] = _tag(x) if tag and i != weight else x
        with ops.running(ops.RunContext(rng=jax.random.key(0))):
            out = layout.materialize(fn(*full))
        return [o for o in _listed(out) if isinstance(o, jax.Array) and o.dtype.kind == "f"]

    xs = [bound[i] for i in floats]
    ref, ref_vjp = jax.vjp(lambda *xs: run(ops.OPS[op], False, *xs), *xs)
    got, got_vjp = jax.vjp(lambda *xs: run(layout.OPS[op], True, *xs), *xs)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6)
    cts = [jnp.asarray(np.random.default_rng(2).standard_normal(r.shape), r.dtype) for r in ref]
    for g, r in zip(got_vjp(cts), ref_vjp(cts)):
        for gl, rl in zip(jax.tree.leaves(g), jax.tree.leaves(r)):
            np.testing.assert_allclose(gl, rl, rtol=1e-5, atol=1e-5)


def test_channels_last_stays_channels_last_through_a_resnet_block():
    """conv -> BN (train) -> relu -> add -> max-pool -> spatial mean keeps NHWC data throughout:
    the only transposes left are those of the weights (the point of `layout`)."""
    import jax
    import jax.numpy as jnp

    from torch2flax.export import layout, ops

    x = layout.ChannelsLast(jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 4)), jnp.float32))
    w = jnp.ones((4, 4, 3, 3), jnp.float32)
    stats = jnp.zeros(4), jnp.ones(4)

    def block(x):
        y = layout.OPS[A.convolution.default](x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
        assert isinstance(y, layout.ChannelsLast)
        y = layout.OPS[A._native_batch_norm_legit_functional.default](y, None, None, *stats, True, 0.1, 1e-5)[0]
        y = layout.OPS[A.relu.default](layout.OPS[A.add.Tensor](y, x))
        y = layout.OPS[A.max_pool2d_with_indices.default](y, [3, 3], [2, 2], [1, 1])[0]
        assert isinstance(y, layout.ChannelsLast)
        return layout.OPS[A.mean.dim](y, [-1, -2], False)

    with ops.running(ops.RunContext()):
        hlo = jax.jit(jax.grad(lambda d: block(layout.ChannelsLast(d)).sum())).lower(x.data).as_text()
    transposes = [line for line in hlo.splitlines() if "stablehlo.transpose" in line]
    assert all("4x4x3x3" in t or "3x3x4x4" in t for t in transposes), transposes


def test_linear_on_tokens_is_one_dot_general_without_flattening_views():
    """`nn.Linear` on a [batch, tokens, features] input stays one `aten.linear` at export and one
    `dot_general` in a TPU's program: torch's decomposition (view to 2-D, addmm, view back) made every
    view a relayout copy on a TPU where the token count is not a multiple of its tile (vit_small on
    a v5e: 0.640 -> 0.543 GB of HBM traffic per image, docs/benchmarks.md#compiled-for-a-tpu)."""
    import jax

    from torch2flax.export import ops
    from torch2flax.export.capture import export_timm

    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 5)

        def forward(self, x):
            return self.fc(x.flatten(2).transpose(1, 2))  # 7 x 7 = 49 tokens

    program = export_timm(Tokens().eval(), train=False, input_size=(3, 7, 7))
    (linear,) = [n for n in program.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert linear.args[0].target == torch.ops.aten.permute.default  # the tokens, not a 2-D view of them
    assert torch.ops.aten.addmm.default not in [n.target for n in program.graph.nodes]
    # Lowered for a TPU, one dot_general and no reshape; elsewhere the 2-D matmul (XLA:CPU compiled the
    # 3-D contraction slower). jax.export lowers for a platform without its hardware.
    from jax import export

    x, w, b = rnd(2, 49, 3).numpy(), rnd(5, 3).numpy(), rnd(5).numpy()
    lowered = {p: export.export(jax.jit(ops.linear), platforms=[p])(x, w, b).mlir_module() for p in ("cpu", "tpu")}
    assert "stablehlo.reshape" not in lowered["tpu"] and lowered["tpu"].count("stablehlo.dot_general") == 1
    assert "stablehlo.reshape" in lowered["cpu"]
