"""Full-size models compiled for TPUs on this CPU machine (libtpu describes the TPU; no TPU here).

    python benchmarks/tpu_check.py fit [--models resnet50,...] [--sizes 224,384,512] [--tpus v3-8,v5e-8,v6e-1]
    python benchmarks/tpu_check.py coverage [--families beit,...]     # COVERAGE.md's TPU column
    python benchmarks/tpu_check.py compare                            # our CPU-chosen paths on the TPU

Every mode appends its rows to a JSON file as it goes (`--resume` skips rows already there) and
rewrites a Markdown table from all rows: a sweep stopped by a session's end continues.

* `fit`: `tpu_check` (the trainer's own bf16 train step, AdamW) for each model, image size and
  TPU: the largest global batch that compiles (to within 10%), HBM per device at 32 images per
  device, and the compile time here. -> docs/tpu-fit.{json,md}
* `coverage`: each COVERAGE.json family's model at its input size, v5e-8, bf16, 32 images per chip:
  compiled or the compiler's error, HBM per chip. -> COVERAGE-tpu.json (coverage.py adds the column)
* `compare`: one plain train step (cross-entropy, AdamW, BatchNorm statistics) compiled for a v5e-8
  around different implementations of one architecture: FLOPs, HBM bytes accessed, temporaries, and
  transposes/copies in the optimized HLO. Native vs exported resnet50; exported vs a plain Flax
  reference written here (a flax-examples ResNet-50 and a ViT-S/16); and the paths chosen by XLA:CPU
  timings (small-map shifted matmuls, depthwise tap sums with their hand VJP) against
  `lax.conv_general_dilated`. -> docs/tpu-compare.{json,md}

Needs libtpu (TPU_LIBRARY_PATH, or `pip install "torch2flax[tpu-check]"`). Times are this
machine's compile times, not TPU step times: nothing here runs on a TPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIT_MODELS = ("resnet50", "efficientnet_b0", "efficientnet_b3", "tf_efficientnet_b7", "convnext_tiny",
              "convnext_base", "vit_base_patch16_224", "vit_base_patch16_384", "swin_base_patch4_window12_384",
              "eva02_base_patch14_224")
GiB = 1024**3


def _rows(path: str) -> list[dict[str, Any]]:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["rows"]
    return []


def _save(path: str, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(tmp, path)


def _meta() -> dict[str, Any]:
    import jax

    from torch2flax.train.tpu_check import libtpu_found

    return {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "jax": jax.__version__, "libtpu": libtpu_found()[1]}


def _config(model: str, size: int, batch: int, **kw):
    from torch2flax.train.config import TrainConfig

    return TrainConfig(model=model, num_classes=1000, image_size=size, batch_size=batch, dtype="bfloat16", **kw)


def _short(error: str | None) -> str:
    if not error:
        return ""
    lines = [ln.strip() for ln in error.strip().splitlines() if ln.strip()]
    return (lines[0] if lines else "")[:160].replace("|", "/")


# --------------------------------------------------------------------------------------------- fit


def run_fit(args) -> None:
    from torch2flax.train.tpu_check import TPUS, tpu_check

    path = os.path.join(ROOT, "docs", "tpu-fit.json")
    rows = _rows(path) if args.resume else []
    done = {(r["model"], r["size"], r["tpu"]) for r in rows}
    for model in args.models.split(","):
        for size in map(int, args.sizes.split(",")):
            for tpu in args.tpus.split(","):
                if (model, size, tpu) in done:
                    continue
                n = TPUS[tpu].devices
                t0 = time.perf_counter()
                try:
                    r = tpu_check(_config(model, size, 32 * n), tpu, eval_step=False, tolerance=0.1,
                                  max_per_device=1024, log=lambda s: print(s, flush=True))
                    row = {"model": model, "size": size, "tpu": tpu, "largest": r.largest_global_batch,
                           "capped": r.search_capped, "hbm_at_32": r.memory.get("total") if r.fits else None,
                           "gflop_per_image": r.flops_per_image / 1e9 if r.flops_per_image else None,
                           "compiles": len(r.search), "error": None if r.fits or r.out_of_memory else _short(r.error)}
                except Exception as e:  # a model that does not convert at this size: its row says why
                    row = {"model": model, "size": size, "tpu": tpu, "largest": None, "error": _short(f"{type(e).__name__}: {e}")}
                row["seconds"] = round(time.perf_counter() - t0)
                print(row, flush=True)
                rows.append(row)
                _save(path, rows, _meta())
                write_fit_md(rows, path[:-5] + ".md")


def write_fit_md(rows: list[dict[str, Any]], path: str) -> None:
    tpus = sorted({r["tpu"] for r in rows})
    lines = ["| model | size | " + " | ".join(f"{t}: largest batch (HBM/device at 32 per device)" for t in tpus)
             + " | GFLOP/image | compile s |", "|---|---:|" + "---|" * len(tpus) + "---:|---:|"]
    for model, size in sorted({(r["model"], r["size"]) for r in rows}, key=lambda k: (FIT_MODELS.index(k[0])
                                                                                       if k[0] in FIT_MODELS else 99, k[1])):
        cells, flops, secs = [], "", 0
        for t in tpus:
            r = next((r for r in rows if (r["model"], r["size"], r["tpu"]) == (model, size, t)), None)
            if r is None:
                cells.append("")
                continue
            secs += r["seconds"]
            if r.get("error"):
                cells.append(f"error: {r['error']}")
                continue
            hbm = f" ({r['hbm_at_32'] / GiB:.1f} GiB)" if r.get("hbm_at_32") else " (32 does not fit)"
            cells.append(f"{r['largest'] or 'none'}{'+' if r.get('capped') else ''}{hbm}")
            flops = f"{r['gflop_per_image']:.1f}" if r.get("gflop_per_image") else flops
        lines.append(f"| {model} | {size} | " + " | ".join(cells) + f" | {flops} | {secs} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------- coverage


def run_coverage(args) -> None:
    from torch2flax.train.tpu_check import tpu_check

    with open(os.path.join(ROOT, "COVERAGE.json")) as f:
        families = json.load(f)
    families = families["rows"] if isinstance(families, dict) else families
    path = os.path.join(ROOT, "COVERAGE-tpu.json")
    rows = _rows(path) if args.resume else []
    done = {r["family"] for r in rows}
    wanted = set(args.families.split(",")) if args.families else None
    for fam in families:
        if fam["family"] in done or (wanted and fam["family"] not in wanted) or not fam.get("input"):
            continue
        size = int(fam["input"].split("x")[0])
        t0 = time.perf_counter()
        try:
            r = tpu_check(_config(fam["model"], size, 256), "v5e-8", search=False, eval_step=False)
            row = {"family": fam["family"], "model": fam["model"], "size": size, "compiled": r.fits,
                   "hbm": r.memory.get("total") if r.fits else None,
                   "error": None if r.fits else ("out of HBM: " if r.out_of_memory else "") + _short(r.error)}
        except Exception as e:
            row = {"family": fam["family"], "model": fam["model"], "size": size, "compiled": False, "hbm": None,
                   "error": _short(f"{type(e).__name__}: {e}")}
        row["seconds"] = round(time.perf_counter() - t0)
        print(row, flush=True)
        rows.append(row)
        _save(path, rows, _meta())
        add_tpu_column(os.path.join(ROOT, "COVERAGE.md"), rows)


TPU_COLUMN = "TPU v5e-8 bf16, HBM/chip at 32/chip"


def _tpu_cell(r: dict[str, Any] | None, converted: bool = True) -> str:
    if r is None:
        return "not run" if converted else "n/a: not converted"
    if r["compiled"]:
        return f"{r['hbm'] / GiB:.2f} GiB"
    return f"NO: {r['error']}"[:120]


def add_tpu_column(md: str, rows: list[dict[str, Any]]) -> None:
    """COVERAGE.md's table with the TPU column last (added once, then rewritten): the rest of the
    page, written by coverage.py and by hand, stays as it is."""
    by_family = {r["family"]: r for r in rows}
    with open(md) as f:
        lines = f.read().splitlines()
    out = []
    for line in lines:
        cells = line.split("|")
        if line.startswith("| family |"):
            if TPU_COLUMN not in line:
                line = line + f" {TPU_COLUMN} |"
        elif line.startswith("|---") and out and out[-1].startswith("| family |"):
            if line.count("|") < out[-1].count("|"):
                line = line + "---|"
        elif line.startswith("| ") and len(cells) > 3 and out and any(o.startswith("| family |") for o in out):
            family = cells[1].strip()
            header = next(o for o in reversed(out) if o.startswith("| family |"))
            if line.count("|") == header.count("|"):  # the column is there: rewrite it
                line = "|".join(cells[:-2]) + "|"
            converted = bool(cells[3].strip())  # the input column: empty where the family was skipped
            line = line + f" {_tpu_cell(by_family.get(family), converted)} |"
        out.append(line)
    with open(md, "w") as f:
        f.write("\n".join(out) + "\n")


# ----------------------------------------------------------------------------------------- compare


def _plain_step(module, tx):
    """One train step that any linen classifier with BatchNorm fits: the same for every contender."""
    import jax
    import optax

    def step(state, images, labels):
        params, stats, opt = state

        def loss_fn(p):
            logits, upd = module.apply({"params": p, "batch_stats": stats}, images, train=True,
                                       mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)})
            return optax.softmax_cross_entropy_with_integer_labels(logits.astype("float32"), labels).mean(), upd

        (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grads = jax.lax.pmean(grads, "b")
        updates, opt = tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), upd.get("batch_stats", stats), opt), loss

    return step


def compile_plain(module, variables, size: int, per_device: int, tpu: str = "v5e-8") -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import optax

    from torch2flax.train.tpu_check import TPUS, compile_once, tpu_devices

    devices, _ = tpu_devices(TPUS[tpu])
    n = len(devices)
    tx = optax.adamw(1e-3)
    state = jax.eval_shape(lambda v: (v["params"], v.get("batch_stats", {}), tx.init(v["params"])), variables)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((n, *x.shape), x.dtype), state)
    images = jax.ShapeDtypeStruct((n, per_device, size, size, 3), jnp.bfloat16)
    labels = jax.ShapeDtypeStruct((n, per_device), jnp.int32)
    step = jax.pmap(_plain_step(module, tx), axis_name="b", devices=devices, donate_argnums=(0,))
    c = compile_once(lambda: step.lower(abstract, images, labels), n * per_device)
    return {"compiled": c.fits, "error": _short(c.error), "seconds": round(c.seconds),
            "gflop_per_image": c.flops / per_device / 1e9 if c.flops else None,
            "gb_per_image": c.bytes_accessed / per_device / 1e9 if c.bytes_accessed else None,
            "temp_gib": c.memory.get("temp", 0) / GiB, **c.ops}


def _ours(name: str, size: int, backend: str):
    import jax.numpy as jnp

    import torch2flax

    m, v = torch2flax.convert(name, num_classes=1000, backend=backend, image_size=size)
    return m.clone(dtype=jnp.bfloat16), v


def _reference(name: str, size: int):
    import jax
    import jax.numpy as jnp

    from benchmarks.flax_reference import ResNet50, ViTS16

    module = ResNet50(num_classes=1000, dtype=jnp.bfloat16) if name == "resnet50" else ViTS16(num_classes=1000,
                                                                                             dtype=jnp.bfloat16)
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))
    return module, variables


def _layer_forms(depthwise: str, small_map: str) -> tuple[str, str]:
    """Set how `layers.conv2d` lowers for the TPU (depthwise: "grouped" or "taps"; small maps:
    "conv" or "matmul"); returns the previous settings."""
    from torch2flax import layers

    saved = (layers.TPU_DEPTHWISE, layers.TPU_SMALL_MAP)
    layers.TPU_DEPTHWISE, layers.TPU_SMALL_MAP = depthwise, small_map
    return saved


def run_compare(args) -> None:
    from torch2flax import layers

    path = os.path.join(ROOT, "docs", "tpu-compare.json")
    rows = _rows(path) if args.resume else []
    done = {r["case"] for r in rows}
    per_device = args.per_device
    cases = [
        ("resnet50 224: native", lambda: _ours("resnet50", 224, "native"), 224),
        ("resnet50 224: exported", lambda: _ours("resnet50", 224, "export"), 224),
        ("resnet50 224: plain Flax (flax examples)", lambda: _reference("resnet50", 224), 224),
        ("vit_small_patch16_224: exported", lambda: _ours("vit_small_patch16_224", 224, "export"), 224),
        ("vit_small_patch16_224: plain Flax", lambda: _reference("vit_small", 224), 224),
        ("efficientnet_b0 224: exported, depthwise tap sums + hand VJP", lambda: _ours("efficientnet_b0", 224, "export"),
         224, ("taps", "conv")),
        ("efficientnet_b0 224: exported, depthwise lax.conv", lambda: _ours("efficientnet_b0", 224, "export"), 224,
         ("grouped", "conv")),
        ("resnet50 96 (3x3 layer4): native, small-map matmuls", lambda: _ours("resnet50", 96, "native"), 96,
         ("grouped", "matmul")),
        ("resnet50 96 (3x3 layer4): native, lax.conv", lambda: _ours("resnet50", 96, "native"), 96, ("grouped", "conv")),
    ]
    for case, build, size, *forms in cases:
        if case in done:
            continue
        saved = _layer_forms(*forms[0]) if forms else None
        try:
            from torch2flax.export.model import CACHE

            CACHE.clear()  # an exported graph traced with the other layer forms would be reused
            module, variables = build()
            row = {"case": case, **compile_plain(module, variables, size, per_device)}
        except Exception as e:
            row = {"case": case, "compiled": False, "error": _short(f"{type(e).__name__}: {e}")}
        finally:
            if saved:
                layers.TPU_DEPTHWISE, layers.TPU_SMALL_MAP = saved
        print(row, flush=True)
        rows.append(row)
        _save(path, rows, {**_meta(), "per_device": per_device, "tpu": "v5e-8"})
        write_compare_md(rows, path[:-5] + ".md")


def write_compare_md(rows: list[dict[str, Any]], path: str) -> None:
    lines = ["| case | GFLOP/image | GB accessed/image | temporaries GiB | transposes | copies | convolutions | compile s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if not r.get("compiled"):
            lines.append(f"| {r['case']} | error: {r.get('error')} |||||||")
            continue
        lines.append(f"| {r['case']} | {r['gflop_per_image']:.2f} | {r['gb_per_image']:.3f} | {r['temp_gib']:.2f} | "
                     f"{r['transpose']} | {r['copy']} | {r['convolution']} | {r['seconds']} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    f = sub.add_parser("fit")
    f.add_argument("--models", default=",".join(FIT_MODELS))
    f.add_argument("--sizes", default="224,384,512")
    f.add_argument("--tpus", default="v3-8,v5e-8,v6e-1")
    c = sub.add_parser("coverage")
    c.add_argument("--families", default="")
    k = sub.add_parser("compare")
    k.add_argument("--per-device", type=int, default=32)
    for q in (f, c, k):
        q.add_argument("--resume", action="store_true", help="keep the rows already written; skip them")
    args = p.parse_args(argv)
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    {"fit": run_fit, "coverage": run_coverage, "compare": run_compare}[args.mode](args)


if __name__ == "__main__":
    main()
