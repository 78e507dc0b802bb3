"""Converted Flax models against timm (PyTorch eager), a plain Flax ResNet and each other.

Run: `python benchmarks/models.py [--sections ...] [--models ...] [--iters N]`. Measures,
side by side in one run on the same CPU threads, images/s of inference and of one
SGD (momentum 0.9) training step, float32, random init, in three sections:

* `native`: the native backend against its floors. `converted`:
  `torch2flax.convert(name)` (hand-written Flax ResNet) under `jax.jit`; `plain`: a
  minimal Flax ResNet of the same shape written here with stock `flax.linen`
  layers (nn.Conv / nn.BatchNorm / nn.Dense, no conversion machinery), the floor
  the converted model must not add to; `timm` eager, NCHW and channels_last; plus,
  at 64x64 where XLA:CPU's small-map convolution cliff shows, the converted model
  with its shifted-matmul path switched off; and conversion wall time and peak
  memory (measured in a child process).
* `export-native`: the exported backend (`backend="export"`, timm's torch.export
  graph lowered to JAX) against the native backend, both converted from the same
  timm instance (BatchNorm statistics and affine parameters randomised, so the
  residual branches are not zeroed), with the ratio exported / native (the
  project's bar: >= 0.9x in inference and in training) and the eval logits' max
  difference relative to max |native logit| (bar: <= 1e-5).
* `export-timm`: models with no native twin through the exported backend against
  timm eager (NCHW and channels_last) with the same weights, plus export wall time
  and the eval logits' max difference relative to max |timm logit|.

Ratios are the first backend over the other; each figure is the best of several
interleaved rounds, since the CPU may be shared. `--models` picks models (a name
in no section's list is added to `export-timm`), `--batch` / `--size` override
every configuration (quick smoke runs: `--batch 2 --size 64 --iters 1 --rounds 1`).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.helpers import randomize_batchnorm  # noqa: E402  (timm zeroes residual blocks' last BN weight)

# (timm name, batch, image size) per section.
NATIVE_CONFIGS = [("resnet18", 16, 224), ("resnet50", 16, 224), ("resnet18", 64, 64)]
EXPORT_NATIVE_CONFIGS = [("resnet50", 16, 224)]
EXPORT_TIMM_CONFIGS = [("efficientnet_b0", 16, 224), ("convnext_tiny", 16, 224), ("vit_small_patch16_224", 16, 224)]
SECTIONS = ("native", "export-native", "export-timm")
RATIO_BAR = 0.9  # exported / native images/s, inference and training
LOGITS_BAR = 1e-5  # max |exported - native| / max |native|


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


# ----------------------------------------------------------------- models and inputs


def timm_instance(name: str, size: int, seed: int = 0):
    """A random-init timm model built for `size` (fixed-size models such as ViT get `img_size`)."""
    import timm
    import torch

    from torch2flax.export.backend import fixed_size_kwargs

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **fixed_size_kwargs(name, size)).eval()


def images(batch: int, size: int) -> np.ndarray:
    """The benchmark's input batch, NHWC float32."""
    return np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)


def flax_logits(module, variables, x: np.ndarray) -> np.ndarray:
    import jax

    return np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x), np.float64)


def timm_logits(model, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).double().numpy()


def rel_diff(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Max abs difference, and the same relative to max |ref|."""
    err = float(np.max(np.abs(got - ref)))
    return err, err / max(float(np.max(np.abs(ref))), 1e-30)


# ----------------------------------------------------------------- timing


def _time(fn, iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def flax_steps(module, variables, batch: int, size: int, dtype=None):
    """Compiled (and warmed-up) inference and train-step callables.

    The train step passes a fresh `"dropout"` key each step (exported models with
    dropout / drop-path draw from it) and threads `batch_stats` only where the
    model has them (a ViT has none). `dtype` (e.g. `jnp.bfloat16`): compute dtype set
    as the trainer sets it (`module.clone(dtype=...)`, input cast to it, loss on
    float32 logits); parameters stay float32.
    """
    import jax
    import optax

    x = jax.numpy.asarray(images(batch, size))
    if dtype is not None:
        module, x = module.clone(dtype=dtype), x.astype(dtype)
    y = jax.numpy.asarray(np.arange(batch) % 1000)
    infer = jax.jit(lambda v, x: module.apply(v, x, train=False))
    tx = optax.sgd(0.01, momentum=0.9)
    has_stats = "batch_stats" in variables

    @jax.jit
    def step(params, stats, opt, key, x, y):
        key, drop = jax.random.split(key)

        def loss_fn(p):
            v = {"params": p, "batch_stats": stats} if has_stats else {"params": p}
            logits, upd = module.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": drop})
            logits = logits.astype(jax.numpy.float32)
            return (optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
                    upd["batch_stats"] if has_stats else stats)

        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), stats, opt, key

    from flax.core import unfreeze

    # Plain dicts in and out, so the second call does not retrace (FrozenDict -> dict).
    variables = unfreeze(variables)
    state = [variables["params"], variables.get("batch_stats", {}), tx.init(variables["params"]),
             jax.random.key(0)]

    def train():
        state[:] = step(*state, x, y)
        jax.block_until_ready(state[0])

    run_infer = lambda: jax.block_until_ready(infer(variables, x))
    run_infer(), train(), train()  # compile (now, under the caller's settings)
    return run_infer, train


def timm_steps(model, batch: int, size: int, channels_last: bool, device: str = "cpu", autocast=None):
    """Eager inference and train-step callables for a timm name (random init) or a copy of an instance.

    `device`: where the model and batch live (on CUDA each call ends with a synchronize, so
    wall time is device time); `autocast`: a torch dtype (e.g. `torch.bfloat16`) to run
    forward passes under `torch.autocast` (AMP), None for none.
    """
    import contextlib

    import timm
    import torch

    model = timm.create_model(model, pretrained=False) if isinstance(model, str) else copy.deepcopy(model)
    x = torch.from_numpy(images(batch, size).transpose(0, 3, 1, 2).copy())
    y = torch.arange(batch) % 1000
    model, x, y = model.to(device), x.to(device), y.to(device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    amp = (lambda: torch.autocast(x.device.type, dtype=autocast)) if autocast is not None else contextlib.nullcontext
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)

    def infer():
        with torch.no_grad(), amp():
            model(x)

    def train():
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    def run_infer():
        model.eval()
        infer()
        sync()

    def run_train():
        model.train()
        train()
        sync()

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


def print_table(rows: list, cols: list[str], ratios: list[tuple[str, str, str]], missing: str = "-") -> None:
    """Markdown: images/s per column, then each (label, numerator, denominator) ratio; `missing` fills gaps."""
    print()
    print("| model | batch | size | mode | " + " | ".join(f"{c} img/s" for c in cols)
          + "".join(f" | {label}" for label, _, _ in ratios) + " |")
    print("|" + "---|" * (4 + len(cols) + len(ratios)))
    for name, batch, size, mode, r in rows:
        cells = [f"{r[c]:.1f}" if c in r else missing for c in cols]
        cells += [f"{r[a] / r[b]:.2f}" if a in r and b in r else missing for _, a, b in ratios]
        print(f"| {name} | {batch} | {size} | {mode} | " + " | ".join(cells) + " |")


# ----------------------------------------------------------------- sections


def run_native(configs, args) -> None:
    """Converted (native) ResNets vs the plain Flax ResNet vs timm eager; conversion cost."""
    import jax

    import torch2flax
    import torch2flax.layers as layers

    rows = []
    costs, param_mb = {}, {}
    for name, batch, size in configs:
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
        print(f"# done native {name} b{batch} {size}px, loadavg {os.getloadavg()}", flush=True)

    print("\n## native backend: converted vs plain Flax vs timm eager")
    print_table(rows, ["converted", "plain", "timm NCHW", "timm CL", "no-matmul"],
                [(f"conv/{c}", "converted", c) for c in ("plain", "timm NCHW", "timm CL", "no-matmul")])
    print()
    print("| model | conversion wall s | peak RSS growth MiB (params float32) |")
    print("|---|---|---|")
    for name, (sec, mb) in costs.items():
        print(f"| {name} | {sec:.2f} | {mb:.0f} ({param_mb[name]:.0f}) |")


def run_export_native(configs, args) -> None:
    """Exported vs native backend from one timm instance: speed ratio and logits difference."""
    import torch2flax

    rows, checks = [], []
    for name, batch, size in configs:
        model = randomize_batchnorm(timm_instance(name, size), seed=1)
        native = torch2flax.convert(model, backend="native")
        t = time.perf_counter()
        exported = torch2flax.convert(model, backend="export", image_size=size)
        export_s = time.perf_counter() - t
        x = images(batch, size)
        ref = flax_logits(*native, x)
        got = flax_logits(*exported, x)
        eager = timm_logits(model, x)
        checks.append((name, batch, size, export_s, *rel_diff(got, ref), rel_diff(ref, eager)[1],
                       rel_diff(got, eager)[1]))
        steps = {"exported": flax_steps(*exported, batch, size), "native": flax_steps(*native, batch, size)}
        best = measure(steps, batch, args.iters, args.rounds)
        for mode in ("infer", "train"):
            rows.append((name, batch, size, mode, {k: best[k, mode] for k in steps}))
        print(f"# done export-native {name} b{batch} {size}px, loadavg {os.getloadavg()}", flush=True)

    print(f"\n## exported vs native backend, same weights (bar: exported/native >= {RATIO_BAR}x)")
    print_table(rows, ["exported", "native"], [("exported/native", "exported", "native")])
    for name, batch, size, mode, r in rows:
        ratio = r["exported"] / r["native"]
        print(f"# {name} b{batch} {size}px {mode}: exported/native {ratio:.2f}x "
              f"{'ok' if ratio >= RATIO_BAR else f'BELOW {RATIO_BAR}x'}")
    print()
    print(f"| model | batch | size | export s | logits max abs diff | max rel diff (bar {LOGITS_BAR:.0e}) "
          "| native vs timm rel | exported vs timm rel |")
    print("|---|---|---|---|---|---|---|---|")
    for name, batch, size, export_s, err, rel, native_timm, exported_timm in checks:
        verdict = "ok" if rel <= LOGITS_BAR else "FAIL"
        print(f"| {name} | {batch} | {size} | {export_s:.1f} | {err:.2e} | {rel:.2e} {verdict} "
              f"| {native_timm:.2e} | {exported_timm:.2e} |")


def run_export_timm(configs, args) -> None:
    """Exported backend vs timm eager (NCHW, channels_last), same weights."""
    import torch2flax

    rows, checks = [], []
    for name, batch, size in configs:
        model = timm_instance(name, size)
        t = time.perf_counter()
        exported = torch2flax.convert(model, backend="export", image_size=size)
        export_s = time.perf_counter() - t
        x = images(batch, size)
        err, rel = rel_diff(flax_logits(*exported, x), timm_logits(model, x))
        checks.append((name, batch, size, export_s, err, rel, "batch_stats" in exported.variables))
        steps = {
            "exported": flax_steps(*exported, batch, size),
            "timm NCHW": timm_steps(model, batch, size, channels_last=False),
            "timm CL": timm_steps(model, batch, size, channels_last=True),
        }
        best = measure(steps, batch, args.iters, args.rounds)
        for mode in ("infer", "train"):
            rows.append((name, batch, size, mode, {k: best[k, mode] for k in steps}))
        print(f"# done export-timm {name} b{batch} {size}px, loadavg {os.getloadavg()}", flush=True)

    print("\n## exported backend vs timm eager, same weights")
    print_table(rows, ["exported", "timm NCHW", "timm CL"],
                [("exp/timm NCHW", "exported", "timm NCHW"), ("exp/timm CL", "exported", "timm CL")])
    print()
    print("| model | batch | size | export s | batch_stats | logits max abs diff vs timm | max rel diff |")
    print("|---|---|---|---|---|---|---|")
    for name, batch, size, export_s, err, rel, stats in checks:
        print(f"| {name} | {batch} | {size} | {export_s:.1f} | {'yes' if stats else 'no'} | {err:.2e} | {rel:.2e} |")


# ----------------------------------------------------------------- main


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def select(args) -> dict[str, list[tuple[str, int, int]]]:
    """The configurations per section after --sections, --models, --batch and --size."""
    plan = {"native": NATIVE_CONFIGS, "export-native": EXPORT_NATIVE_CONFIGS, "export-timm": EXPORT_TIMM_CONFIGS}
    plan = {k: list(v) for k, v in plan.items()}
    if args.models:
        known = {name for configs in plan.values() for name, _, _ in configs}
        plan = {k: [c for c in v if c[0] in args.models] for k, v in plan.items()}
        plan["export-timm"] += [(m, 16, 224) for m in args.models if m not in known]
    out = {}
    for section in args.sections:
        configs = []
        for name, batch, size in plan[section]:
            c = (name, args.batch or batch, args.size or size)
            if c not in configs:  # overrides can make two configurations one
                configs.append(c)
        out[section] = configs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=2, help="timed iterations per round, after one warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--sections", type=_csv, default=list(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--models", type=_csv, default=None,
                        help="comma-separated timm names to keep (default: every section's list); a name in "
                             "no list is benchmarked in export-timm")
    parser.add_argument("--batch", type=int, default=None, help="batch size for every configuration (>= 2)")
    parser.add_argument("--size", type=int, default=None, help="image size for every configuration")
    args = parser.parse_args()
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if args.batch is not None and args.batch < 2:
        parser.error("--batch must be >= 2 (training BatchNorm and the exported graphs need a batch of 2+)")

    import jax
    import torch

    torch.set_num_threads(args.threads)
    print(f"# jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, loadavg {os.getloadavg()}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, best of {args.rounds} rounds x {args.iters} iters, "
          "float32")
    runners = {"native": run_native, "export-native": run_export_native, "export-timm": run_export_timm}
    for section, configs in select(args).items():
        if not configs:
            print(f"# {section}: no configuration left after --models, skipped")
            continue
        runners[section](configs, args)
    print(f"# end loadavg {os.getloadavg()}")


if __name__ == "__main__":
    main()
