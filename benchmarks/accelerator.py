"""Accelerator check: logits parity, bfloat16 training throughput and the loader's device feed rate.

Run whenever a GPU or TPU is available: `python benchmarks/accelerator.py [--out accelerator.json]`
(under 8 minutes on one device). Everything runs on the device JAX gives first; results go to
the JSON file (environment, versions and one entry per section, or its error) and to Markdown
tables on stdout. `--quick` (batch 2, 64 px, 1 iteration, one model per section, 32 records) is
a smoke test that also runs on a CPU. Sections (`--sections`, all by default; a section or a
model that fails is recorded as an error string and the rest still run):

* `parity`: random-init timm models (BatchNorm running stats and affine parameters randomised)
  converted natively (resnet50) and through the exported backend (efficientnet_b0,
  vit_small_patch16_224): max |flax - timm| / max |timm| of float32 eval logits, batch
  min(8, --batch), JAX at `default_matmul_precision("highest")` (accelerators otherwise use
  TF32 / bf16 passes), timm eager on the CPU in float32 as the reference. Bar: 1e-5.
* `train`: images/s of one SGD (momentum 0.9) step, and of inference, jitted on one device,
  computing in bfloat16 as the trainer does (`module.clone(dtype=bfloat16)`, bf16 inputs,
  float32 parameters and loss), for resnet50 (native and exported), efficientnet_b0,
  convnext_tiny and vit_small_patch16_224 (exported). Where torch sees a CUDA GPU, the same
  models in torch (bf16 autocast, channels_last) in the same run, and the ratio flax / torch;
  JAX then allocates GPU memory on demand (XLA_PYTHON_CLIENT_PREALLOCATE=false unless set)
  so that both frameworks fit.
* `feed`: images/s of `make_loader` (TFRecords of synthetic 512 px JPEGs as in
  benchmarks/loader.py, RandomResizedCrop + flip, num_workers="auto") with every batch put
  on the device (`jax.device_put` + `block_until_ready`), after one warm-up epoch.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.models import (  # noqa: E402
    flax_logits,
    flax_steps,
    images,
    measure,
    print_table,
    rel_diff,
    timm_instance,
    timm_logits,
    timm_steps,
)
from tests.helpers import randomize_batchnorm  # noqa: E402

SECTIONS = ("parity", "train", "feed")
PARITY_MODELS = [("resnet50", "native"), ("efficientnet_b0", "export"), ("vit_small_patch16_224", "export")]
TRAIN_MODELS = [("resnet50", "native"), ("resnet50", "export"), ("efficientnet_b0", "export"),
                ("convnext_tiny", "export"), ("vit_small_patch16_224", "export")]
PARITY_BAR = 1e-5  # max |flax - timm| / max |timm|
PARITY_BATCH = 8
FEED_EPOCHS = 3  # timed, after one warm-up epoch
NO_CUDA = "n/a (no CUDA in torch)"
LABELS = {"flax": "flax bf16", "torch": "torch AMP+CL"}  # train table columns

Spec = tuple[str, str]  # (timm name, backend)


def _error(e: BaseException) -> str:
    traceback.print_exc()
    return f"{type(e).__name__}: {e}"


class Models:
    """timm instances (BatchNorm randomised) and their conversions, each made once per (name, size)."""

    def __init__(self) -> None:
        self.timm: dict[tuple[str, int], Any] = {}
        self.flax: dict[tuple[str, str, int], tuple[Any, Any, float]] = {}

    def timm_model(self, name: str, size: int):
        if (name, size) not in self.timm:
            self.timm[name, size] = randomize_batchnorm(timm_instance(name, size), seed=1)
        return self.timm[name, size]

    def convert(self, name: str, backend: str, size: int) -> tuple[Any, Any, float]:
        """(module, variables, conversion wall seconds)."""
        import torch2flax

        key = (name, backend, size)
        if key not in self.flax:
            model = self.timm_model(name, size)
            t = time.perf_counter()
            kwargs = {"image_size": size} if backend == "export" else {}
            module, variables = torch2flax.convert(model, backend=backend, **kwargs)
            self.flax[key] = (module, variables, time.perf_counter() - t)
        return self.flax[key]


# ----------------------------------------------------------------- sections


def run_parity(specs: list[Spec], args: argparse.Namespace, models: Models) -> dict:
    import jax

    batch = min(PARITY_BATCH, args.batch)
    x = images(batch, args.size)
    rows = []
    for name, backend in specs:
        row: dict[str, Any] = {"model": name, "backend": backend, "batch": batch, "size": args.size}
        try:
            module, variables, row["convert_s"] = models.convert(name, backend, args.size)
            with jax.default_matmul_precision("highest"):
                got = flax_logits(module, variables, x)
            err, rel = rel_diff(got, timm_logits(models.timm_model(name, args.size), x))
            row.update(max_abs_diff=err, rel_diff=rel, passed=rel <= PARITY_BAR)
        except Exception as e:
            row["error"] = _error(e)
        rows.append(row)
        print(f"# parity {name} ({backend}) done", flush=True)

    print(f"\n## parity: float32 eval logits vs timm on the CPU, matmul precision highest (bar {PARITY_BAR:.0e})\n")
    print("| model | backend | batch | size | convert s | max abs diff | max diff / max abs timm | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['backend']} | {batch} | {args.size} | - | - | - | ERROR: {r['error']} |")
        else:
            print(f"| {r['model']} | {r['backend']} | {batch} | {args.size} | {r['convert_s']:.1f} "
                  f"| {r['max_abs_diff']:.2e} | {r['rel_diff']:.2e} | {'pass' if r['passed'] else 'FAIL'} |")
    return {"bar": PARITY_BAR, "matmul_precision": "highest", "reference": "timm eager, CPU, float32",
            "rows": rows}


def run_train(specs: list[Spec], args: argparse.Namespace, models: Models) -> dict:
    import jax.numpy as jnp
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cudnn.benchmark = True
    rows, table = [], []
    for name, backend in specs:
        row: dict[str, Any] = {"model": name, "backend": backend, "batch": args.batch, "size": args.size}
        steps: dict[str, Any] = {}
        try:
            module, variables, row["convert_s"] = models.convert(name, backend, args.size)
            t = time.perf_counter()
            steps["flax"] = flax_steps(module, variables, args.batch, args.size, dtype=jnp.bfloat16)
            row["flax_compile_s"] = time.perf_counter() - t
            if cuda:
                fns = timm_steps(models.timm_model(name, args.size), args.batch, args.size, channels_last=True,
                                 device="cuda", autocast=torch.bfloat16)
                for fn in fns:  # warm-up beyond measure's one call: cuDNN autotuning, allocator growth
                    fn(), fn()
                steps["torch"] = fns
            best = measure(steps, args.batch, args.iters, rounds=1)
            for variant in steps:
                for mode in ("train", "infer"):
                    row[f"{variant}_{mode}_ips"] = best[variant, mode]
            if cuda:
                row["flax_over_torch_train"] = best["flax", "train"] / best["torch", "train"]
            for mode in ("train", "infer"):
                table.append((f"{name} ({backend})", args.batch, args.size, mode,
                              {LABELS[k]: best[k, mode] for k in steps}))
        except Exception as e:
            row["error"] = _error(e)
        finally:
            steps.clear()
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        rows.append(row)
        print(f"# train {name} ({backend}) done", flush=True)

    print(f"\n## train: bfloat16 compute, one device, {args.iters} timed iterations"
          + ("" if cuda else f"; torch: {NO_CUDA}"))
    flax, torch_ = LABELS["flax"], LABELS["torch"]
    print_table(table, [flax, torch_], [("flax/torch", flax, torch_)], missing="-" if cuda else NO_CUDA)
    for r in rows:
        if "error" in r:
            print(f"# ERROR {r['model']} ({r['backend']}): {r['error']}")
    return {"compute_dtype": "bfloat16", "param_dtype": "float32", "optimizer": "sgd(0.01, momentum=0.9)",
            "torch": "bf16 autocast + channels_last, cuda" if cuda else NO_CUDA, "iters": args.iters,
            "rows": rows}


def run_feed(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    import torch2flax
    from benchmarks.loader import FEATURES, build
    from torch2flax.loaders import RecordTransform, train_transform

    device = jax.devices()[0]
    with tempfile.TemporaryDirectory(prefix="bench_accel_feed_") as tmp:
        t = time.perf_counter()
        path, _, jpegs = build(tmp, args.records)
        build_s = time.perf_counter() - t
        ds = torch2flax.TFRecordDataset(path, FEATURES, transform=RecordTransform(train_transform(args.size)))
        loader = torch2flax.make_loader(ds, args.batch, train=True, num_devices=1, num_workers="auto")

        def epoch(e: int) -> int:
            loader.set_epoch(e)
            n = 0
            for batch in loader:
                jax.block_until_ready(jax.device_put({"image": batch["image"], "label": batch["label"]}, device))
                n += int(np.prod(batch["image"].shape[:2]))
            return n

        epoch(0)  # warm-up: worker start-up excluded
        t = time.perf_counter()
        n = sum(epoch(e) for e in range(1, FEED_EPOCHS + 1))
        ips = n / (time.perf_counter() - t)
        result = {"records": args.records, "mean_jpeg_kb": float(np.mean([len(j) for j in jpegs]) / 1e3),
                  "build_s": build_s, "batch": args.batch, "size": args.size, "epochs": FEED_EPOCHS,
                  "images": n, "num_workers": loader.num_workers, "workers_reason": loader.workers_reason,
                  "images_per_s": ips}

    print("\n## feed: make_loader (TFRecord JPEG -> RandomResizedCrop + flip) -> jax.device_put\n")
    print("| records | mean JPEG KB | batch | size | num_workers (auto) | img/s |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.records} | {result['mean_jpeg_kb']:.0f} | {args.batch} | {args.size} "
          f"| {result['num_workers']} ({result['workers_reason']}) | {ips:.0f} |")
    return result


# ----------------------------------------------------------------- main


def environment() -> dict:
    import jax
    import torch

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    devices = jax.devices()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {p: version(p) for p in ("jax", "jaxlib", "flax", "optax", "torch", "timm", "torch2flax")},
        "python": platform.python_version(),
        "git_commit": commit,
        "jax_backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "torch_cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "machine": {"cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
                    "arch": platform.machine(), "system": platform.system()},
        "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE",
                                               "XLA_PYTHON_CLIENT_MEM_FRACTION")},
    }


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def select(specs: list[Spec], wanted: list[str] | None, quick: bool) -> list[Spec]:
    """The section's (name, backend) rows after --models, in its order: `name` keeps the section's
    rows of that model (or adds it exported where it has none), `name:backend` that one row."""
    if wanted:
        keep: list[Spec] = []
        for w in wanted:
            name, _, backend = w.partition(":")
            rows = [(name, backend)] if backend else [s for s in specs if s[0] == name] or [(name, "export")]
            keep += [r for r in rows if r not in keep]
        specs = keep
    return specs[:1] if quick else specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=_csv, default=list(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--models", type=_csv, default=None,
                        help="comma-separated timm names, or name:native / name:export, for parity and train "
                             "(a name a section does not list runs there through the exported backend)")
    parser.add_argument("--batch", type=int, default=None, help="batch per device for train and feed (default 64; "
                        f"parity uses min({PARITY_BATCH}, batch))")
    parser.add_argument("--size", type=int, default=None, help="image size (default 224)")
    parser.add_argument("--iters", type=int, default=None, help="timed train iterations after warm-up (default 20)")
    parser.add_argument("--records", type=int, default=None, help="TFRecord records for feed (default 512)")
    parser.add_argument("--out", default="accelerator.json", help="JSON output path")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: batch 2, size 64, 1 iteration, one model per section, 32 records "
                             "(explicit flags win)")
    args = parser.parse_args()
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    for key, full, quick in (("batch", 64, 2), ("size", 224, 64), ("iters", 20, 1), ("records", 512, 32)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.batch < 2:
        parser.error("--batch must be >= 2 (training BatchNorm needs a batch of 2+)")
    if args.records < args.batch:
        parser.error("--records must be >= --batch (train batches are full ones)")

    import torch

    if "train" in args.sections and torch.cuda.is_available():
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to torch too
    start = time.perf_counter()
    report: dict[str, Any] = {"args": vars(args), "environment": environment(), "sections": {}}
    env = report["environment"]
    print(f"# {env['jax_backend']}: {env['device_count']} x {env['device_kind']}; jax {env['versions']['jax']}, "
          f"torch {env['versions']['torch']} (cuda: {env['torch_cuda']}), {env['machine']['cpu_count']} CPUs; "
          f"batch {args.batch}, {args.size} px, {args.iters} iters", flush=True)

    def dump() -> None:
        report["wall_s"] = time.perf_counter() - start
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)

    models = Models()
    runners = {
        "parity": lambda: run_parity(select(PARITY_MODELS, args.models, args.quick), args, models),
        "train": lambda: run_train(select(TRAIN_MODELS, args.models, args.quick), args, models),
        "feed": lambda: run_feed(args),
    }
    for section in SECTIONS:
        if section not in args.sections:
            continue
        t = time.perf_counter()
        try:
            result = runners[section]()
        except Exception as e:
            result = {"error": _error(e)}
            print(f"\n## {section}: ERROR {result['error']}")
        result["wall_s"] = time.perf_counter() - t
        report["sections"][section] = result
        dump()  # after each section, so a run cut short keeps what it measured
    print(f"\n# {time.perf_counter() - start:.0f} s in all; wrote {args.out}")


if __name__ == "__main__":
    main()
