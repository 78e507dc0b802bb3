"""Converted Flax ResNets against timm (PyTorch eager) and a plain hand-written Flax ResNet.

Run: `python benchmarks/models.py [--iters N]`. Measures, side by side in one run
on the same CPU threads, images/s of inference and of one SGD training step for

* `converted`: `torch2flax.convert(name)` under `jax.jit`,
* `plain`: a minimal Flax ResNet of the same shape written here with stock
  `flax.linen` layers (nn.Conv / nn.BatchNorm / nn.Dense, no conversion
  machinery): the floor the converted model must not add to,
* `timm` eager, NCHW and channels_last,

plus, at 64x64 where XLA:CPU's small-map convolution cliff shows, the converted
model with its shifted-matmul path switched off; and conversion wall time and
peak memory (measured in a child process). Ratios are converted / other; each figure is the best of several interleaved
rounds, since the CPU may be shared.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

CONFIGS = [("resnet18", 16, 224), ("resnet50", 16, 224), ("resnet18", 64, 64)]


# ----------------------------------------------------------------- plain Flax ResNet


def plain_resnet(name: str, num_classes: int = 1000):
    """A textbook Flax ResNet (v1.5, like timm's) from stock linen layers."""
    import flax.linen as nn
    import jax.numpy as jnp

    bottleneck = name != "resnet18"
    layers = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}[name]

    class Block(nn.Module):
        planes: int
        stride: int
        down: bool

        @nn.compact
        def __call__(self, x, train):
            bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
            p = ((1, 1), (1, 1))
            out = self.planes * (4 if bottleneck else 1)
            y = x
            if bottleneck:
                y = nn.relu(bn()(nn.Conv(self.planes, (1, 1), use_bias=False)(y)))
                y = nn.relu(bn()(nn.Conv(self.planes, (3, 3), self.stride, padding=p, use_bias=False)(y)))
                y = bn()(nn.Conv(out, (1, 1), use_bias=False)(y))
            else:
                y = nn.relu(bn()(nn.Conv(self.planes, (3, 3), self.stride, padding=p, use_bias=False)(y)))
                y = bn()(nn.Conv(out, (3, 3), padding=p, use_bias=False)(y))
            if self.down:
                x = bn()(nn.Conv(out, (1, 1), self.stride, use_bias=False)(x))
            return nn.relu(x + y)

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Conv(64, (7, 7), 2, padding=((3, 3), (3, 3)), use_bias=False)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x))
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
            inp = 64
            for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
                for j in range(n):
                    stride = 2 if i > 0 and j == 0 else 1
                    out = planes * (4 if bottleneck else 1)
                    x = Block(planes, stride, j == 0 and (stride != 1 or inp != out))(x, train)
                    inp = out
            return nn.Dense(num_classes)(jnp.mean(x, axis=(1, 2)))

    return Plain()


# ----------------------------------------------------------------- timing


def _time(fn, iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def flax_steps(module, variables, batch: int, size: int):
    """Compiled (and warmed-up) inference and train-step callables."""
    import jax
    import optax

    x = jax.numpy.asarray(np.random.default_rng(0).standard_normal((batch, size, size, 3)), jax.numpy.float32)
    y = jax.numpy.asarray(np.arange(batch) % 1000)
    infer = jax.jit(lambda v, x: module.apply(v, x, train=False))
    tx = optax.sgd(0.01, momentum=0.9)

    @jax.jit
    def step(params, stats, opt, x, y):
        def loss_fn(p):
            logits, upd = module.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), stats, opt

    from flax.core import unfreeze

    # Plain dicts in and out, so the second call does not retrace (FrozenDict -> dict).
    variables = unfreeze(variables)
    state = [variables["params"], variables["batch_stats"], tx.init(variables["params"])]

    def train():
        state[:] = step(*state, x, y)
        jax.block_until_ready(state[0])

    run_infer = lambda: jax.block_until_ready(infer(variables, x))
    run_infer(), train(), train()  # compile (now, under the caller's settings)
    return run_infer, train


def timm_steps(name: str, batch: int, size: int, channels_last: bool):
    import timm
    import torch

    model = timm.create_model(name, pretrained=False)
    x = torch.randn(batch, 3, size, size)
    y = torch.arange(batch) % 1000
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def infer():
        with torch.no_grad():
            model(x)

    def train():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    def run_infer():
        model.eval()
        infer()

    def run_train():
        model.train()
        train()

    return run_infer, run_train


def measure(steps: dict, batch: int, iters: int, rounds: int) -> dict:
    """images/s per variant and mode: best of `rounds` interleaved rounds (the CPU is shared)."""
    best: dict = {}
    for _ in range(rounds):
        for variant, fns in steps.items():
            for mode, fn in zip(("infer", "train"), fns):
                ips = batch / _time(fn, iters)
                best[variant, mode] = max(best.get((variant, mode), 0.0), ips)
    return best


def conversion_cost(name: str) -> tuple[float, float]:
    """Wall seconds and peak RSS growth (MiB) of `convert(name)`, in a fresh process."""
    # VmHWM (this process's own high-water mark), not ru_maxrss: Linux carries
    # ru_maxrss over from the parent across fork/exec, so it reports the benchmark's size.
    code = f"""
import json, time, torch2flax, timm, jax, torch
from torch2flax.converter import convert
def status_mb(key):
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1]) / 1024
base = status_mb('VmRSS')
t = time.perf_counter()
m, v = convert({name!r})
jax.block_until_ready(v)
dt = time.perf_counter() - t
print(json.dumps([dt, status_mb('VmHWM') - base]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=2, help="timed iterations per round, after one warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    args = parser.parse_args()

    import jax
    import torch

    import torch2flax
    import torch2flax.layers as layers

    torch.set_num_threads(args.threads)
    print(f"# jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, loadavg {os.getloadavg()}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, best of {args.rounds} rounds x {args.iters} iters")
    rows = []
    costs, param_mb = {}, {}
    for name, batch, size in CONFIGS:
        if name not in costs:
            costs[name] = conversion_cost(name)
        module, variables = torch2flax.convert(name)
        param_mb[name] = sum(a.size * 4 for a in jax.tree.leaves(variables)) / 2**20
        plain = plain_resnet(name)
        pv = plain.init(jax.random.key(0), np.zeros((1, size, size, 3), np.float32))
        steps = {
            "converted": flax_steps(module, variables, batch, size),
            "plain": flax_steps(plain, pv, batch, size),
            "timm NCHW": timm_steps(name, batch, size, channels_last=False),
            "timm CL": timm_steps(name, batch, size, channels_last=True),
        }
        if size <= 64:
            saved, layers.SMALL_MAP_MAX_PIXELS = layers.SMALL_MAP_MAX_PIXELS, 0
            try:  # traced (and compiled) now, with the matmul path off
                steps["no-matmul"] = flax_steps(module.clone(), variables, batch, size)
            finally:
                layers.SMALL_MAP_MAX_PIXELS = saved
        best = measure(steps, batch, args.iters, args.rounds)
        for mode in ("infer", "train"):
            rows.append((name, batch, size, mode, {k: best[k, mode] for k in steps}))
        print(f"# done {name} b{batch} {size}px, loadavg {os.getloadavg()}", flush=True)

    cols = ["converted", "plain", "timm NCHW", "timm CL", "no-matmul"]
    print()
    print("| model | batch | size | mode | " + " | ".join(f"{c} img/s" for c in cols)
          + " | conv/plain | conv/timm NCHW | conv/timm CL | conv/no-matmul |")
    print("|" + "---|" * (4 + len(cols) + 4))
    for name, batch, size, mode, r in rows:
        cells = [f"{r[c]:.1f}" if c in r else "-" for c in cols]
        ratios = [f"{r['converted'] / r[c]:.2f}" if c in r else "-" for c in ("plain", "timm NCHW", "timm CL",
                                                                                "no-matmul")]
        print(f"| {name} | {batch} | {size} | {mode} | " + " | ".join(cells + ratios) + " |")
    print()
    print("| model | conversion wall s | peak RSS growth MiB (params float32) |")
    print("|---|---|---|")
    for name, (sec, mb) in costs.items():
        print(f"| {name} | {sec:.2f} | {mb:.0f} ({param_mb[name]:.0f}) |")
    print(f"# end loadavg {os.getloadavg()}")


if __name__ == "__main__":
    main()
