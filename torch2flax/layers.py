"""Flax layers with PyTorch semantics, shared by the converted model families.

Weights converted from PyTorch only compute the same function if the layers
do what PyTorch's do: explicit symmetric padding (never ``"SAME"``), max-pool
padding with -inf, average pooling that can leave the padding out of the
divisor, and BatchNorm that updates its running variance with the unbiased
batch variance. Parameter names follow Flax (``kernel``/``bias``,
``scale``/``bias``, ``mean``/``var``) so the converter can map by type.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from torch2flax.errors import ConfigError

Array = jax.Array
Dtype = Any
IntPair = int | Sequence[int]

# Output maps with at most this many pixels are convolved as a sum of shifted
# matmuls (one per kernel tap) instead of `lax.conv_general_dilated`: XLA:CPU
# has a cliff on tiny maps (layer4 of a ResNet fed 64x64 images), the matmul path
# wins up to 3x3 output maps and is mixed beyond (docs/benchmarks.md, "Measurements
# behind design choices"). The rule is about shapes, not platforms: on GPU/TPU a
# handful of tiny matmuls is as cheap as a convolution of the same FLOPs, and these
# layers are a sliver of the work.
SMALL_MAP_MAX_PIXELS = 9

# Depthwise convolutions in a program lowered for a TPU: XLA's grouped convolution ("grouped"), or the
# tap sums every other platform runs ("taps"; benchmarks/tpu_check.py compare sets it to measure them).
TPU_DEPTHWISE = "grouped"
# Small maps in a program lowered for a TPU: the plain convolution ("conv") or the shifted matmuls ("matmul").
TPU_SMALL_MAP = "conv"


def _pair(v: IntPair) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def _padding(p: IntPair | Sequence[Sequence[int]]) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch `padding=p` (int or (ph, pw)) or explicit ((top, bottom), (left, right))."""
    if isinstance(p, int):
        return ((p, p), (p, p))
    p = tuple(p)
    if all(isinstance(v, int) for v in p):
        return ((p[0], p[0]), (p[1], p[1]))
    return tuple((int(a), int(b)) for a, b in p)  # type: ignore[return-value]


def conv_output_size(size: int, kernel: int, stride: int, pad: tuple[int, int], dilation: int) -> int:
    return (size + pad[0] + pad[1] - dilation * (kernel - 1) - 1) // stride + 1


def kernel_taps(
    xp: Array,
    kernel_hw: tuple[int, int],
    out_hw: tuple[int, int],
    strides: tuple[int, int],
    dilation: tuple[int, int],
) -> Iterator[tuple[int, int, Array]]:
    """`(i, j, window)` for each kernel tap: the strided slice of the padded input `xp`
    ((B, H, W, ...)) that tap (i, j) multiplies to produce the `out_hw` output map."""
    (kh, kw), (ho, wo), (sh, sw), (dh, dw) = kernel_hw, out_hw, strides, dilation
    rest = xp.ndim - 3
    for i in range(kh):
        for j in range(kw):
            limit = (xp.shape[0], i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1) + xp.shape[3:]
            yield i, j, lax.slice(xp, (0, i * dh, j * dw) + (0,) * rest, limit, (1, sh, sw) + (1,) * rest)


def _padded(x: Array, kernel_hw: tuple[int, int], strides: tuple[int, int],
            padding: tuple[tuple[int, int], tuple[int, int]], dilation: tuple[int, int]) -> tuple[Array, tuple[int, int]]:
    """The zero-padded input and the output map size of a convolution."""
    out_hw = tuple(conv_output_size(x.shape[1 + a], kernel_hw[a], strides[a], padding[a], dilation[a]) for a in (0, 1))
    return jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0))), out_hw


def shifted_matmul_conv(
    x: Array,
    kernel: Array,
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
) -> Array:
    """NHWC x HWIO convolution as a sum over kernel taps of (strided slice) @ (tap matrix).

    Same result as `lax.conv_general_dilated` with explicit padding; XLA compiles
    it to plain (batched) matmuls, which avoids XLA:CPU's slow small-map
    convolutions (see `SMALL_MAP_MAX_PIXELS`).
    """
    b, _, _, cin = x.shape
    kh, kw, _, cout = kernel.shape
    xp, (ho, wo) = _padded(x, (kh, kw), strides, padding, dilation)
    if groups > 1:
        xp = xp.reshape(*xp.shape[:3], groups, cin // groups)
        # (kh, kw, cin/g, cout) -> (kh, kw, g, cin/g, cout/g): group g's outputs are
        # the contiguous block g of `cout`, as in PyTorch and XLA.
        kernel = kernel.reshape(kh, kw, cin // groups, groups, cout // groups).transpose(0, 1, 3, 2, 4)
    out = None
    for i, j, window in kernel_taps(xp, (kh, kw), (ho, wo), strides, dilation):
        if groups > 1:
            y = jnp.einsum("bhwgc,gco->bhwgo", window, kernel[i, j])
        else:
            y = jnp.einsum("bhwc,co->bhwo", window, kernel[i, j])
        out = y if out is None else out + y
    return out.reshape(b, ho, wo, cout)


def _plain_conv(x: Array, kernel: Array, strides, padding, dilation, groups: int) -> Array:
    """XLA's convolution (grouped where `groups` > 1); the kernel in the input's dtype, as the tap
    sums compute a depthwise convolution."""
    return lax.conv_general_dilated(x, kernel.astype(x.dtype), tuple(strides), tuple(map(tuple, padding)),
                                    rhs_dilation=tuple(dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=groups)


def depthwise_conv(
    x: Array,
    kernel: Array,
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
    dilation: tuple[int, int] = (1, 1),
) -> Array:
    """Depthwise NHWC convolution (HWIO kernel `(kh, kw, 1, C)`) as a sum over kernel taps of
    (strided slice) x (per-channel tap weight).

    Same result as `lax.conv_general_dilated(..., feature_group_count=C)`. XLA fuses the taps
    into one elementwise loop instead of its grouped-convolution emitter, whose backward pass is
    as slow as a dense convolution's (jax-ml/jax#13800, GPU; #23713, CPU). At unit stride the
    gradient is written by hand (`_depthwise_bwd`): autodiff of the tap sum pads the output
    gradient once per tap, while the input gradient is one tap sum of the gradient padded once.
    Strided layers keep autodiff (the hand version's zero-spread gradient ran slower there).
    Measurements: docs/benchmarks.md.
    """
    strides, padding, dilation = tuple(strides), tuple(map(tuple, padding)), tuple(dilation)
    if strides == (1, 1):
        return _depthwise(x, kernel, padding, dilation)
    return _depthwise_taps(x, kernel, strides, padding, dilation)


def _depthwise_taps(x: Array, kernel: Array, strides, padding, dilation) -> Array:
    xp, out_hw = _padded(x, kernel.shape[:2], strides, padding, dilation)
    acc = jnp.promote_types(x.dtype, jnp.float32)  # bf16 inputs: sum the taps in float32, as convolutions do
    out = None
    for i, j, window in kernel_taps(xp, kernel.shape[:2], out_hw, strides, dilation):
        y = window.astype(acc) * kernel[i, j, 0].astype(acc)
        out = y if out is None else out + y
    return out.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x: Array, kernel: Array, padding, dilation) -> Array:
    return _depthwise_taps(x, kernel, (1, 1), padding, dilation)


def _depthwise_fwd(x, kernel, padding, dilation):
    return _depthwise_taps(x, kernel, (1, 1), padding, dilation), (x, kernel)


def _depthwise_bwd(padding, dilation, res, g):
    """Kernel gradient: per tap, the sum over batch and map of (window x g). Input gradient: the
    same tap sum over g padded by the kernel's reach, with the kernel flipped (the padded input's
    gradient), the convolution's padding cut off."""
    x, kernel = res
    (kh, kw), (dh, dw) = kernel.shape[:2], dilation
    xp, out_hw = _padded(x, (kh, kw), (1, 1), padding, dilation)
    acc = jnp.promote_types(x.dtype, jnp.float32)
    g = g.astype(acc)
    dk = jnp.stack([jnp.sum(window.astype(acc) * g, axis=(0, 1, 2))
                    for _, _, window in kernel_taps(xp, (kh, kw), out_hw, (1, 1), dilation)])
    reach = ((kh - 1) * dh,) * 2, ((kw - 1) * dw,) * 2
    dxp = _depthwise_taps(g, kernel[::-1, ::-1], (1, 1), reach, dilation)  # xp's size
    (top, _), (left, _) = padding
    dx = lax.slice(dxp, (0, top, left, 0), (dxp.shape[0], top + x.shape[1], left + x.shape[2], dxp.shape[3]))
    return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def conv2d(
    x: Array,
    kernel: Array,
    strides: tuple[int, int] = (1, 1),
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0)),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    *,
    small_map_max_pixels: int | None = None,
) -> Array:
    """NHWC x HWIO convolution with explicit padding, as `torch.nn.functional.conv2d` computes it.

    Depthwise convolutions (one input channel per output channel) take `depthwise_conv`;
    others with output maps of at most `small_map_max_pixels` pixels (None:
    `SMALL_MAP_MAX_PIXELS`) take the shifted-matmul path. The choice is made at trace time
    from static shapes; in a program lowered for a TPU both take XLA's convolution
    (`TPU_DEPTHWISE`, `TPU_SMALL_MAP`).
    """
    kh, kw = kernel.shape[:2]
    ho = conv_output_size(x.shape[1], kh, strides[0], padding[0], dilation[0])
    wo = conv_output_size(x.shape[2], kw, strides[1], padding[1], dilation[1])
    limit = SMALL_MAP_MAX_PIXELS if small_map_max_pixels is None else small_map_max_pixels
    shape = dict(strides=strides, padding=padding, dilation=dilation)
    plain = functools.partial(_plain_conv, **shape, groups=groups)
    if groups > 1 and groups == x.shape[3] == kernel.shape[3]:
        taps = functools.partial(depthwise_conv, **shape)
        if TPU_DEPTHWISE == "taps":
            return taps(x, kernel)
        # A platform choice, made when the program is lowered for its platform (only that branch is
        # lowered): the tap sums were chosen on XLA:CPU timings (and jax-ml/jax#13800 on GPU), but
        # XLA:TPU's grouped convolution is far leaner. efficientnet_b0's bf16 train step compiled for
        # a v5e, 32 images per chip: 0.51 against 0.94 GB of HBM traffic per image and 0.84 against
        # 2.41 GiB of temporaries, FLOPs equal (docs/benchmarks.md, "Compiled for a TPU").
        return lax.platform_dependent(x, kernel, tpu=plain, default=taps)
    if ho * wo <= limit:
        matmuls = functools.partial(shifted_matmul_conv, **shape, groups=groups)
        if TPU_SMALL_MAP == "matmul":
            return matmuls(x, kernel)
        # The shifted matmuls were chosen on XLA:CPU timings; lowered for a TPU the plain convolution is
        # no worse (resnet50 at 96 px, whose layer4 maps are 3x3, bf16 train step on a v5e: 0.238 against
        # 0.244 GB per image, 0.27 against 0.29 GiB of temporaries; docs/benchmarks.md).
        return lax.platform_dependent(x, kernel, tpu=plain, default=matmuls)
    return plain(x, kernel)


class Conv(nn.Module):
    """`torch.nn.Conv2d` in NHWC: explicit padding, groups, HWIO kernel.

    Tiny output maps take the shifted-matmul path (decided at trace time from
    static shapes); both paths compute the same function with the same
    parameters. Default init is timm's ResNet init (kaiming normal, fan_out).
    """

    features: int
    kernel_size: IntPair = 3
    strides: IntPair = 1
    padding: Any = 0
    kernel_dilation: IntPair = 1
    feature_group_count: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    small_map_max_pixels: int | None = None  # None: the module-level SMALL_MAP_MAX_PIXELS

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kh, kw = _pair(self.kernel_size)
        strides, dilation, padding = _pair(self.strides), _pair(self.kernel_dilation), _padding(self.padding)
        groups = self.feature_group_count
        cin = x.shape[-1]
        if cin % groups or self.features % groups:
            raise ConfigError(f"{self.path}: channels {cin}->{self.features} not divisible by groups={groups}")
        kernel = self.param("kernel", self.kernel_init, (kh, kw, cin // groups, self.features), self.param_dtype)
        bias = None
        if self.use_bias:
            # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            bound = 1.0 / math.sqrt(cin // groups * kh * kw)
            bias = self.param("bias", _uniform(bound), (self.features,), self.param_dtype)
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), strides, padding, dilation, groups,
                   small_map_max_pixels=self.small_map_max_pixels)
        if bias is not None:
            y = y + bias.astype(self.dtype)
        return y


def _uniform(bound: float) -> Callable:
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class Dense(nn.Module):
    """`torch.nn.Linear` with PyTorch's default init (kernel is `weight.T`)."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        bound = 1.0 / math.sqrt(x.shape[-1])
        kernel = self.param("kernel", _uniform(bound), (x.shape[-1], self.features), self.param_dtype)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", _uniform(bound), (self.features,), self.param_dtype).astype(self.dtype)
        return y


class BatchNorm(nn.Module):
    """`torch.nn.BatchNorm2d` over the last axis, with PyTorch's training semantics.

    Hand-written because `flax.linen.BatchNorm` updates the running variance
    with the biased batch variance, while PyTorch uses the unbiased one
    (n / (n - 1)); a converted model fine-tuned with Flax's would drift from
    timm's statistics. Normalisation itself uses the biased variance, as both do.
    Statistics are computed in float32 whatever `dtype` is. `momentum` is
    Flax's (weight of the old value): PyTorch momentum 0.1 is 0.9 here. With
    `axis_name`, batch statistics are averaged over that pmap axis (sync BN).
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool = True) -> Array:
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            n = batch_count(x, axes, self.axis_name)
            y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, axes, self.axis_name)
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1.0 - m) * lax.stop_gradient(mean)
                unbiased = var * (n / jnp.maximum(n - 1, 1))
                ra_var.value = m * ra_var.value + (1.0 - m) * lax.stop_gradient(unbiased)
            return y.astype(self.dtype)
        mul = scale.astype(jnp.float32) * lax.rsqrt(var + self.epsilon)
        shift = bias.astype(jnp.float32) - mean * mul
        return x.astype(self.dtype) * mul.astype(self.dtype) + shift.astype(self.dtype)


def moments(xf: Array, axes: tuple[int, ...], axis_name: str | None = None,
            keepdims: bool = False) -> tuple[Array, Array]:
    """Mean and biased variance over `axes` (and over `axis_name` devices when set).

    The mean gets one correction pass: a float32 sum rounds it by several ulps,
    which (x - mean) turns into a large relative error where the spread is tiny
    against the mean (ATen accumulates these sums in double; a random-BN CSPNeXt
    lost 2.6e-3 of its gradients to this). The variance is the mean of squared
    deviations from the global mean, never E[x^2] - E[x]^2, so synced devices
    give the 1-device statistics of the global batch.
    """
    pmean = (lambda v: lax.pmean(v, axis_name)) if axis_name is not None else (lambda v: v)
    mean = pmean(xf.mean(axes, keepdims=True))
    # The correction's exact derivative is zero; stopping it keeps the backward graph
    # (and its compile time) that of the one-pass mean.
    mean = mean + lax.stop_gradient(pmean((xf - mean).mean(axes, keepdims=True)))
    var = pmean(jnp.square(xf - mean).mean(axes, keepdims=True))
    return (mean, var) if keepdims else (jnp.squeeze(mean, axes), jnp.squeeze(var, axes))


def batch_count(x: Array, axes: Sequence[int], axis_name: str | None = None) -> Any:
    """Elements per channel behind BatchNorm statistics over `axes`, summed over `axis_name` devices."""
    n = math.prod(x.shape[a] for a in axes)
    return n * lax.psum(1, axis_name) if axis_name is not None else n


def batch_norm_train(x: Array, scale: Array | None, bias: Array | None, eps: float,
                     axes: tuple[int, ...], axis_name: str | None = None) -> tuple[Array, Array, Array]:
    """Training-mode BatchNorm over `axes`: `(y, batch mean, biased batch variance)`.

    `y = (x - mean) * rsqrt(var + eps) * scale + bias` in float32 (cast back to x's dtype),
    statistics from `moments` (over `axis_name` devices too: sync BN). The gradient is
    written out (`jax.custom_vjp`) in the textbook form: two per-channel sums, then one
    elementwise pass for dx. Autodiff of the forward takes five sums per layer (through
    rsqrt, the mean and the variance separately): a ResNet-50 train step on XLA:CPU
    spent 20% more time in BatchNorm that way.
    """
    return _batch_norm_train(x, scale, bias, eps, tuple(axes), axis_name)


def _bn_forward(x, scale, bias, eps, axes, axis_name):
    xf = x.astype(jnp.float32)
    mean, var = moments(xf, axes, axis_name, keepdims=True)
    rstd = lax.rsqrt(var + eps)
    y = (xf - mean) * rstd
    if scale is not None:
        y = y * scale.astype(jnp.float32).reshape(mean.shape)
    if bias is not None:
        y = y + bias.astype(jnp.float32).reshape(mean.shape)
    return (y.astype(x.dtype), jnp.squeeze(mean, axes), jnp.squeeze(var, axes)), (mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _batch_norm_train(x, scale, bias, eps, axes, axis_name):
    return _bn_forward(x, scale, bias, eps, axes, axis_name)[0]


def _bn_fwd(x, scale, bias, eps, axes, axis_name):
    out, (mean, rstd) = _bn_forward(x, scale, bias, eps, axes, axis_name)
    return out, (x, scale, bias, mean, rstd)


def _bn_bwd(eps, axes, axis_name, res, cts):
    x, scale, bias, mean, rstd = res
    dy, dmean, dvar = cts
    xf, dyf = x.astype(jnp.float32), dy.astype(jnp.float32)
    centred = xf - mean
    xhat = centred * rstd
    sum_dy = dyf.sum(axes, keepdims=True)
    sum_dy_xhat = (dyf * xhat).sum(axes, keepdims=True)
    n = batch_count(x, axes, axis_name)
    # dx needs the sums over the global batch; the parameter gradients stay per-device (the
    # trainer averages them), as autodiff of the sync-BN forward would give.
    total = (sum_dy, sum_dy_xhat, dmean.reshape(mean.shape), dvar.reshape(mean.shape))
    if axis_name is not None:
        total = lax.psum(total, axis_name)
    g_dy, g_dy_xhat, g_mean, g_var = (t / n for t in total)
    w = rstd if scale is None else rstd * scale.astype(jnp.float32).reshape(mean.shape)
    dx = w * (dyf - g_dy - xhat * g_dy_xhat) + g_mean + 2.0 * g_var * centred
    dscale = None if scale is None else sum_dy_xhat.reshape(scale.shape).astype(scale.dtype)
    dbias = None if bias is None else sum_dy.reshape(bias.shape).astype(bias.dtype)
    return dx.astype(x.dtype), dscale, dbias


_batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


def max_pool(x: Array, kernel: IntPair, stride: IntPair, padding: IntPair = 0) -> Array:
    """`nn.MaxPool2d(kernel, stride, padding)` (floor mode): pads with -inf, like PyTorch."""
    (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = _pair(kernel), _pair(stride), _padding(padding)
    # A Python scalar init lets JAX see the max monoid (differentiable reduce_window_max).
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, kh, kw, 1), (1, sh, sw, 1),
                             ((0, 0), (pt, pb), (pl, pr), (0, 0)))


def _ceil_extra(size: int, k: int, s: int, pad: int) -> int:
    """Extra end padding PyTorch's ceil_mode adds (a window must start inside input or left pad)."""
    out = -(-(size + 2 * pad - k) // s) + 1
    if (out - 1) * s >= size + pad:
        out -= 1
    return max(0, (out - 1) * s + k - (size + 2 * pad))


def avg_pool(
    x: Array,
    kernel: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    *,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
) -> Array:
    """`nn.AvgPool2d` with PyTorch's `ceil_mode` and `count_include_pad` semantics."""
    (kh, kw) = _pair(kernel)
    (sh, sw) = _pair(stride if stride is not None else kernel)
    (ph, pw) = _pair(padding)
    eh = _ceil_extra(x.shape[1], kh, sh, ph) if ceil_mode else 0
    ew = _ceil_extra(x.shape[2], kw, sw, pw) if ceil_mode else 0
    pads = ((0, 0), (ph, ph + eh), (pw, pw + ew), (0, 0))
    window, strides = (1, kh, kw, 1), (1, sh, sw, 1)
    total = lax.reduce_window(x, 0.0, lax.add, window, strides, pads)
    # Divisor per output: the window's cells inside the input, plus the explicit
    # padding if count_include_pad (never the ceil_mode overhang), as PyTorch.
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
    if count_include_pad:
        ones = jnp.pad(ones, ((0, 0), (ph, ph), (pw, pw), (0, 0)), constant_values=1)
        pads = ((0, 0), (0, eh), (0, ew), (0, 0))
    count = lax.reduce_window(ones, 0.0, lax.add, window, strides, pads)
    return total / count


def global_pool(x: Array, pool_type: str) -> Array:
    """timm's `SelectAdaptivePool2d` with flatten: 'avg', 'max', 'avgmax', 'catavgmax' or '' (none)."""
    if pool_type == "":
        return x
    if pool_type == "avg":
        return x.mean(axis=(1, 2))
    if pool_type == "max":
        return x.max(axis=(1, 2))
    if pool_type == "avgmax":
        return 0.5 * (x.mean(axis=(1, 2)) + x.max(axis=(1, 2)))
    if pool_type == "catavgmax":
        return jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
    raise ConfigError(f"unknown global_pool {pool_type!r}: use 'avg', 'max', 'avgmax', 'catavgmax' or ''")


class Activation(nn.Module):
    """A parameter-free activation as a named submodule, where timm has one (`act1`): its
    output is then addressable by timm's module name (`torch2flax.features`)."""

    fn: Callable[[Array], Array] = nn.relu

    def __call__(self, x: Array) -> Array:
        return self.fn(x)


class DropPath(nn.Module):
    """Stochastic depth per sample, scaled by 1/keep like timm's `DropPath`. RNG stream 'dropout'."""

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))
