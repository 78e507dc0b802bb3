"""A resumed run with a cold and a warm compilation cache (`--compile-cache`, `train.compile_cache`).

    python benchmarks/compile_cache.py [--model resnet50] [--image-size 128] [--repeats 2]

A run of `--model` (random init) on a small Flower-schema set (one training step and one
validation batch per epoch) stops after epoch 1 of 2 (`--stop-after-epochs 1`), filling a cache
folder. Then `torch2flax train --resume` finishes it, as a Kaggle session resumed from the run
folder would, each time from a fresh copy of the stopped run: with an empty cache folder (cold:
every program compiled) and with the filled one (warm). The runs alternate (cold, warm, cold, ...).
Each time is the whole `--resume` process: start-up, restore, compile or load the train and eval
steps, one step, one validation batch, the checkpoint. The difference is compiling.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(args: list[str], cache: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch2flax", "train", *args, "--compile-cache", cache, "--quiet"],
                   check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    import jax

    from tests.helpers import write_flower_splits

    with tempfile.TemporaryDirectory() as tmp:
        _, globs = write_flower_splits(tmp, train=args.batch_size, val=args.batch_size, test=1, num_classes=4,
                                       size=args.image_size)
        run, warm = os.path.join(tmp, "run"), os.path.join(tmp, "warm-cache")
        common = ["--train", globs["train"], "--val", globs["val"], "--model", args.model, "--num-classes", "4",
                  "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--epochs", "2",
                  "--num-workers", "0", "--num-devices", "1"]
        first = train([*common, "--out", run, "--stop-after-epochs", "1"], warm)
        entries = len(os.listdir(warm))
        times: dict[str, list[float]] = {"cold": [], "warm": []}
        for i in range(args.repeats):
            for kind in times:
                copy = os.path.join(tmp, f"{kind}{i}")
                shutil.copytree(run, copy)
                cache = warm if kind == "warm" else os.path.join(tmp, f"empty{i}")
                times[kind].append(train(["--resume", copy], cache))
                shutil.rmtree(copy)
    print(f"\n`torch2flax train --resume` of a {args.model} run at {args.image_size} px, batch {args.batch_size}, "
          f"1 {jax.devices()[0].platform} device (jax {jax.__version__}); the first run (epoch 1, filling the cache "
          f"with {entries} programs) took {first:.1f} s:\n")
    print("| cache | " + " | ".join(f"run {i + 1} (s)" for i in range(args.repeats)) + " | median (s) |")
    print("|---|" + "---|" * (args.repeats + 1))
    for kind, ts in times.items():
        print(f"| {kind} | " + " | ".join(f"{t:.1f}" for t in ts) + f" | {statistics.median(ts):.1f} |")
    saved = statistics.median(times["cold"]) - statistics.median(times["warm"])
    print(f"\nthe warm cache saves {saved:.1f} s ({statistics.median(times['cold']) / statistics.median(times['warm']):.2f}x)")


if __name__ == "__main__":
    main()
