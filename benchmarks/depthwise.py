"""Depthwise convolution gradients: `layers.depthwise_conv`'s hand-written VJP against autodiff
of the same tap sum and against XLA's grouped convolution, side by side in one process.

Per layer shape (batch, map, channels, kernel, stride): the compile time and the best-of-N run
time of `jax.grad` of a sum over the layer's output (forward + backward), and the ratios.

    python -m benchmarks.depthwise [--batch 32] [--repeats 5]
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from torch2flax import layers

# efficientnet_b0's depthwise layers at 224 px (a subset: each kernel/stride once, early and late)
# and ConvNeXt's 7x7 at its first and last stage.
SHAPES = [  # (map, channels, kernel, stride)
    (112, 32, 3, 1), (112, 96, 3, 2), (56, 144, 5, 2), (14, 480, 3, 1), (14, 672, 5, 1), (7, 1152, 5, 1),
    (56, 96, 7, 1), (7, 768, 7, 1),
]


def _grouped(x, k, strides, padding):
    return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=x.shape[-1])


def _time(fn, x, k, repeats: int) -> tuple[float, float]:
    grad = jax.jit(jax.grad(lambda x, k: jnp.sum(fn(x, k) ** 2), argnums=(0, 1)))
    start = time.perf_counter()
    compiled = grad.lower(x, k).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(x, k))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(x, k))
        best = min(best, time.perf_counter() - start)
    return compile_s, best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; batch {args.batch}; forward + backward")
    print("| map, ch, k, s | hand VJP compile / run | autodiff compile / run | grouped conv compile / run "
          "| run: autodiff / hand, grouped / hand |")
    print("|---|---|---|---|---|")
    totals = np.zeros(3)
    for size, ch, k, s in SHAPES:
        x = jnp.asarray(rng.standard_normal((args.batch, size, size, ch), dtype=np.float32))
        w = jnp.asarray(rng.standard_normal((k, k, 1, ch), dtype=np.float32))
        strides, pad = (s, s), ((k // 2, k // 2), (k // 2, k // 2))
        fns = (functools.partial(layers.depthwise_conv, strides=strides, padding=pad),
               functools.partial(layers._depthwise_taps, strides=strides, padding=pad, dilation=(1, 1)),  # autodiff
               functools.partial(_grouped, strides=strides, padding=pad))
        results = [_time(fn, x, w, args.repeats) for fn in fns]
        totals += [r[1] for r in results]
        cells = " | ".join(f"{c:.2f} s / {r * 1e3:.1f} ms" for c, r in results)
        print(f"| {size}, {ch}, {k}, {s} | {cells} | {results[1][1] / results[0][1]:.2f}x, "
              f"{results[2][1] / results[0][1]:.2f}x |")
    print(f"total run: hand VJP {totals[0] * 1e3:.1f} ms, autodiff {totals[1] * 1e3:.1f} ms "
          f"({totals[1] / totals[0]:.2f}x), grouped {totals[2] * 1e3:.1f} ms ({totals[2] / totals[0]:.2f}x)")


if __name__ == "__main__":
    main()
