"""What checkpointing every N steps costs the training loop: none, the single-file `.msgpack`
(what earlier versions wrote as `last.msgpack`, synchronously), and Orbax's `CheckpointManager`
(`train.checkpoint.TrainingCheckpoints`) synchronous and asynchronous, side by side in one run.

Each variant runs the trainer's own compiled train step (pmap, donated state, AdamW) on one
device for `--steps` steps from the same state and batch, saving model + optimiser state the way
`fit` does (a host copy of replica 0, then the write) every `--every` steps. It reports the mean
wall time per step, including the saves and, for the asynchronous variant, the wait for the last
save in flight, and the ratio to training without checkpoints.

Usage: python benchmarks/checkpoint_cost.py [--model resnet50] [--size 64] [--batch 8]
                                            [--steps 40] [--every 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def setup(model: str, size: int, batch: int):
    import jax

    import torch2flax
    from torch2flax.train.checkpoint import DataSpec
    from torch2flax.train.config import TrainConfig
    from torch2flax.train.parallel import Parallel
    from torch2flax.train.state import create_train_state, make_optimizer
    from torch2flax.train.steps import StepSpec
    from torch2flax.train.trainer import compiled_steps

    module, variables = torch2flax.convert(model, num_classes=10)
    config = TrainConfig(model=model, num_classes=10, image_size=size, batch_size=batch)
    par = Parallel("pmap", jax.local_devices()[:1])
    cfg = module.pretrained_cfg
    spec = StepSpec(module, tuple(cfg["mean"]), tuple(cfg["std"]), 10, np.float32, 0.1, 0.0)
    p_train, _ = compiled_steps((par.layout, tuple(par.devices)), spec)
    state = create_train_state(variables, make_optimizer(config, 100, module.no_weight_decay()), seed=0, ema=False)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1, batch, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (1, batch), dtype=np.int32)
    batch_dev = par.replicate({"image": images[0], "label": labels[0]})  # one device: [1, batch, ...]
    return module, par, p_train, state, batch_dev, config, DataSpec(size, 1.0)


def run(variant: str, ctx, steps: int, every: int, root: str) -> dict:
    import jax

    from torch2flax.train.checkpoint import TrainCheckpoint, TrainingCheckpoints, save_checkpoint

    module, par, p_train, state0, batch, config, data = ctx
    state = par.replicate(state0)
    state, metrics = p_train(state, batch)  # warm: compiled, first step's allocations made
    jax.block_until_ready(metrics)
    folder = os.path.join(root, variant)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    checkpoints = (TrainingCheckpoints(os.path.join(folder, "checkpoints"), keep=2,
                                       asynchronous=variant == "orbax async") if variant.startswith("orbax") else None)
    saves = 0
    start = time.perf_counter()
    for i in range(1, steps + 1):
        state, metrics = p_train(state, batch)
        float(par.unreplicate(metrics)["loss"])  # the loop reads each step's loss, as fit does
        if variant != "none" and i % every == 0:
            host = par.unreplicate(state)
            train = TrainCheckpoint.from_state(host, epoch=0, best_macro_f1=0.0, data=data,
                                               config=config.to_dict(), batch=i)
            variables = {"params": host.params, "batch_stats": host.batch_stats}
            if checkpoints is None:
                save_checkpoint(os.path.join(folder, "last.msgpack"), module, variables, train)
            else:
                checkpoints.save(module, variables, train)
            saves += 1
    if checkpoints is not None:
        checkpoints.close()  # the last asynchronous save counts too
    seconds = time.perf_counter() - start
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
    kept = 1 if checkpoints is None else min(saves, 2)  # one file rewritten; Orbax keeps the newest 2
    return {"step_ms": 1000 * seconds / steps, "saves": saves, "mb_per_save": size / max(kept, 1) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="each variant's best of this many runs")
    args = ap.parse_args()
    import jax

    ctx = setup(args.model, args.size, args.batch)
    variants = ("none", "msgpack", "orbax sync", "orbax async")
    with tempfile.TemporaryDirectory() as root:
        results = {v: None for v in variants}
        for _ in range(args.repeats):  # interleaved, so drift in the machine's load hits every variant
            for v in variants:
                r = run(v, ctx, args.steps, args.every, root)
                if results[v] is None or r["step_ms"] < results[v]["step_ms"]:
                    results[v] = r
    print(f"{args.model} at {args.size} px, batch {args.batch}, {args.steps} steps, a checkpoint every "
          f"{args.every} steps; {platform.machine()}, {os.cpu_count()} CPUs, {jax.devices()[0].platform} "
          f"(best of {args.repeats})\n")
    base = results["none"]["step_ms"]
    print("| checkpoint | ms/step | vs none | MB per checkpoint |")
    print("|---|---:|---:|---:|")
    for v in variants:
        r = results[v]
        mb = "-" if v == "none" else f"{r['mb_per_save']:.0f}"
        print(f"| {v} | {r['step_ms']:.1f} | {r['step_ms'] / base:.2f}x | {mb} |")
    sync, asyn = results["orbax sync"]["step_ms"] - base, results["orbax async"]["step_ms"] - base
    print(f"\ncost per checkpoint: msgpack {(results['msgpack']['step_ms'] - base) * args.every:.0f} ms, "
          f"orbax sync {sync * args.every:.0f} ms, orbax async {asyn * args.every:.0f} ms of loop time")


if __name__ == "__main__":
    main()
