"""The shared layers: both convolution paths, BatchNorm's PyTorch update and sync, pooling."""
from __future__ import annotations

import numpy as np
import pytest

CONV_CASES = [  # (H, W, cin, cout, kernel, stride, pad, dilation, groups)
    (2, 2, 16, 24, 3, 1, 1, 1, 1),
    (4, 3, 16, 16, 3, 2, 1, 1, 1),
    (3, 5, 32, 32, 3, 1, 1, 1, 8),
    pytest.param((5, 5, 8, 16, 7, 2, 3, 1, 1), marks=pytest.mark.slow),  # slow tier: the 7x7 stem conv
    (3, 3, 16, 8, 1, 2, 0, 1, 1),
    (4, 4, 8, 8, 3, 1, 2, 2, 1),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
def test_conv_paths_agree_in_value_and_gradient(case):
    import jax
    import jax.numpy as jnp
    import torch

    from torch2flax.layers import Conv

    h, w, cin, cout, k, s, p, d, g = case
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, h, w, cin)).astype(np.float32))
    matmul = Conv(cout, k, s, p, d, g, use_bias=True, small_map_max_pixels=10**9)
    conv = matmul.clone(small_map_max_pixels=0)
    variables = matmul.init(jax.random.key(0), x)

    def loss(m):
        return lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))

    from jax import export

    # as lowered for the CPU (for a TPU both are the convolution: layers.conv2d)
    cpu = lambda m: export.export(jax.jit(m.apply), platforms=["cpu"])(variables, x).mlir_module()
    assert "stablehlo.convolution" not in cpu(matmul) and "stablehlo.convolution" in cpu(conv)
    y_mm, y_cv = matmul.apply(variables, x), conv.apply(variables, x)
    np.testing.assert_allclose(y_mm, y_cv, rtol=1e-5, atol=1e-5)
    g_mm = jax.jit(jax.grad(loss(matmul), argnums=(0, 1)))(variables, x)
    g_cv = jax.jit(jax.grad(loss(conv), argnums=(0, 1)))(variables, x)
    for a, b in zip(jax.tree.leaves(g_mm), jax.tree.leaves(g_cv)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # And both are PyTorch's Conv2d.
    tconv = torch.nn.Conv2d(cin, cout, k, s, p, d, g)
    with torch.no_grad():
        tconv.weight.copy_(torch.from_numpy(np.asarray(variables["params"]["kernel"]).transpose(3, 2, 0, 1).copy()))
        tconv.bias.copy_(torch.from_numpy(np.array(variables["params"]["bias"])))
        ref = tconv(torch.from_numpy(np.array(x).transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(y_mm, ref, rtol=1e-5, atol=1e-5)


# Unit stride takes the hand-written gradient (an even kernel with uneven padding too); strides, autodiff.
@pytest.mark.parametrize("k,s,pad,d", [(3, 1, ((1, 1), (1, 1)), 1), (5, 2, ((2, 2), (2, 2)), 1),
                                       (3, 1, ((2, 2), (2, 2)), 2), (3, 2, ((0, 1), (0, 1)), 1),
                                       (4, 1, ((1, 2), (2, 1)), 1)])
def test_depthwise_path_equals_grouped_convolution(k, s, pad, d):
    import jax
    import jax.numpy as jnp
    import torch
    from jax import lax

    from torch2flax.layers import conv2d

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 8, 12)).astype(np.float32))
    kernel = jnp.asarray(rng.standard_normal((k, k, 1, 12)).astype(np.float32))
    ours = lambda x, w: conv2d(x, w, (s, s), pad, (d, d), groups=12)
    ref = lambda x, w: lax.conv_general_dilated(x, w, (s, s), pad, rhs_dilation=(d, d),
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=12)
    # The tap sums where the program is lowered for the CPU; XLA's grouped convolution for a TPU
    # (jax.export lowers for a platform without its hardware).
    from jax import export

    lowered = {p: export.export(jax.jit(ours), platforms=[p])(x, kernel).mlir_module() for p in ("cpu", "tpu")}
    assert "stablehlo.convolution" not in lowered["cpu"] and "stablehlo.convolution" in lowered["tpu"]
    np.testing.assert_allclose(ours(x, kernel), ref(x, kernel), rtol=1e-5, atol=1e-5)
    loss = lambda f: jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1)))
    for a, b in zip(loss(ours)(x, kernel), loss(ref)(x, kernel)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    if pad[0][0] == pad[0][1]:  # and PyTorch's depthwise Conv2d
        t = torch.nn.functional.conv2d(torch.from_numpy(np.array(x).transpose(0, 3, 1, 2)),
                                       torch.from_numpy(np.array(kernel).transpose(3, 2, 0, 1)),
                                       stride=s, padding=pad[0][0], dilation=d, groups=12)
        np.testing.assert_allclose(ours(x, kernel), t.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    # bfloat16 inputs sum their taps in float32: as close to the float32 result as the output rounding.
    low = ours(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
    exact = ref(x.astype(jnp.bfloat16).astype(jnp.float32), kernel.astype(jnp.bfloat16).astype(jnp.float32))
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), exact, rtol=2 ** -7, atol=2 ** -7)


def test_small_maps_take_the_matmul_path_by_default_and_the_convolution_on_a_tpu():
    import jax
    import jax.numpy as jnp
    from jax import export

    from torch2flax.layers import SMALL_MAP_MAX_PIXELS, Conv

    conv = Conv(8, 3, 1, 1)
    side = int(SMALL_MAP_MAX_PIXELS ** 0.5)
    for hw, uses_conv in ((side, False), (side + 1, True)):
        x = jnp.zeros((1, hw, hw, 4))
        v = conv.init(jax.random.key(0), x)
        lowered = {p: export.export(jax.jit(conv.apply), platforms=[p])(v, x).mlir_module() for p in ("cpu", "tpu")}
        assert ("stablehlo.convolution" in lowered["cpu"]) == uses_conv
        assert "stablehlo.convolution" in lowered["tpu"]  # measured no worse there: layers.conv2d


def test_batchnorm_matches_torch_training_update():
    import jax
    import torch

    from torch2flax.layers import BatchNorm

    x = np.random.default_rng(0).standard_normal((3, 5, 4, 6)).astype(np.float32) * 2 + 1
    tbn = torch.nn.BatchNorm2d(6, eps=1e-3, momentum=0.2).train()
    with torch.no_grad():
        tbn.weight.uniform_(0.5, 1.5), tbn.bias.normal_(), tbn.running_var.uniform_(0.5, 2), tbn.running_mean.normal_()
    np_ = lambda t: t.detach().numpy().copy()
    v = {"params": {"scale": np_(tbn.weight), "bias": np_(tbn.bias)},
         "batch_stats": {"mean": np_(tbn.running_mean), "var": np_(tbn.running_var)}}
    with torch.no_grad():
        y_t = tbn(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    bn = BatchNorm(momentum=0.8, epsilon=1e-3)
    y_f, upd = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y_f, y_t, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], tbn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], tbn.running_var.numpy(), rtol=1e-5, atol=1e-6)
    # Unbiased, not biased, variance in the running update:
    biased = 0.8 * v["batch_stats"]["var"] + 0.2 * x.reshape(-1, 6).var(0)
    assert np.min(np.abs(np.asarray(upd["batch_stats"]["var"]) - biased)) > 1e-3
    # Eval mode uses the running statistics.
    tbn.eval()
    with torch.no_grad():
        ye_t = tbn(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    ye_f = bn.apply(jax.device_get(dict(v, batch_stats=upd["batch_stats"])), x)
    np.testing.assert_allclose(ye_f, ye_t, rtol=1e-5, atol=1e-5)


def test_sync_batchnorm_equals_global_batch_statistics(devices):
    import jax

    from torch2flax.layers import BatchNorm

    n = len(devices)
    x = np.random.default_rng(1).standard_normal((n * 2, 3, 3, 4)).astype(np.float32) * 3 + 2
    bn = BatchNorm()
    v = bn.init(jax.random.key(0), x)
    y_ref, upd_ref = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    sync = bn.clone(axis_name="batch")
    step = jax.pmap(lambda v, x: sync.apply(v, x, use_running_average=False, mutable=["batch_stats"]),
                    axis_name="batch", devices=devices, in_axes=(None, 0))
    y, upd = step(v, x.reshape(n, 2, 3, 3, 4))
    np.testing.assert_allclose(np.asarray(y).reshape(x.shape), y_ref, rtol=1e-5, atol=1e-5)
    for k in ("mean", "var"):
        np.testing.assert_allclose(np.asarray(upd["batch_stats"][k])[0], upd_ref["batch_stats"][k], rtol=1e-5)


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_custom_gradient_equals_autodiff(devices, affine):
    """`layers.batch_norm_train`'s hand-written VJP against JAX autodiff of the same forward,
    with cotangents on y, the batch mean and the variance; alone and synced over devices
    (input gradient of the global batch, per-device parameter gradients summing to it)."""
    import jax
    import jax.numpy as jnp

    from torch2flax import layers

    rng = np.random.default_rng(3)
    n = len(devices)
    x = jnp.asarray(rng.standard_normal((2 * n, 3, 3, 4)) * 3 + 2, jnp.float32)
    w, b = (jnp.asarray(rng.uniform(0.5, 1.5, 4), jnp.float32), jnp.asarray(rng.standard_normal(4), jnp.float32)) \
        if affine else (None, None)
    cts = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (x.shape, (4,), (4,))]
    axes = (0, 1, 2)

    def loss(f, x, w, b, axis_name=None):
        y, mean, var = f(x, w, b, 1e-3, axes, axis_name)
        return (y * cts[0][: x.shape[0]] if axis_name is None else y * x_ct).sum() + (mean * cts[1]).sum() \
            + (var * cts[2]).sum()

    x_ct = None
    plain = lambda *a: layers._bn_forward(*a)[0]
    ref = jax.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2))(x, w, b)
    got = jax.grad(lambda *a: loss(layers.batch_norm_train, *a), argnums=(0, 1, 2))(x, w, b)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5)

    # Synced: each device holds 2 samples; the mean/var cotangents are per-device (summed by pmap).
    def device_grads(x, ct):
        nonlocal x_ct
        x_ct = ct
        return jax.grad(lambda *a: loss(layers.batch_norm_train, *a, axis_name="batch"), argnums=(0, 1, 2))(x, w, b)

    synced = jax.pmap(device_grads, axis_name="batch", devices=devices)(x.reshape(n, 2, 3, 3, 4),
                                                                         cts[0].reshape(n, 2, 3, 3, 4))
    # The mean/var cotangents enter once per device: n times in all.
    cts[1], cts[2] = cts[1] * n, cts[2] * n
    ref_global = jax.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2))(x, w, b)
    np.testing.assert_allclose(np.asarray(synced[0]).reshape(x.shape), ref_global[0], rtol=2e-5, atol=2e-5)
    if affine:
        for k in (1, 2):
            np.testing.assert_allclose(np.asarray(synced[k]).sum(0), ref_global[k], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("hw", [(7, 5), (6, 9), (1, 3)])
def test_pooling_matches_torch(hw):
    import torch

    from torch2flax.layers import avg_pool, max_pool

    x = np.random.default_rng(2).standard_normal((2, *hw, 3)).astype(np.float32) - 5  # all negative: -inf pad shows
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    tr = lambda t: t.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(max_pool(x, 3, 2, 1), tr(torch.nn.MaxPool2d(3, 2, 1)(xt)), rtol=1e-6)
    ref = tr(torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)(xt))
    np.testing.assert_allclose(avg_pool(x, 2, 2, ceil_mode=True, count_include_pad=False), ref, rtol=1e-6)
    ref = tr(torch.nn.AvgPool2d(3, 2, 1, count_include_pad=True)(xt))
    np.testing.assert_allclose(avg_pool(x, 3, 2, 1), ref, rtol=1e-6)

