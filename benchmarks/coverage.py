"""How much of timm the exported-graph backend converts, one representative per model family.

Run: `python benchmarks/coverage.py [--families resnet,vit,...] [--all] [--out COVERAGE.md]`.

For each timm family module (`timm.list_modules()`), the representative is the
smallest pretrained architecture (by parameter count, counted on the meta
device); `--all` walks every pretrained tag instead. Each model is built with
random init, randomised BatchNorm statistics and dropout / drop-path off, at its
own pretrained input size (`--image-size N` overrides it for models that take
`img_size=`; others keep theirs), then:

* export: `convert_exported` (eval and train graphs exported, every op checked),
  with its wall time;
* eval parity: max |logits - timm| / max(1, max |timm|) on a batch of 2;
* train parity: one step's loss, every gradient (relative in norm) and the
  updated BatchNorm statistics against timm's float32 `.backward()`, each tensor
  within 1e-4, or where timm's own float32 results are further than that from
  float64 (the floor: the largest difference over the model's tensors), within
  twice the floor of timm float32 or of float64.

Models over `--max-params` (default 100M) are skipped as too large for the
machine. Writes a Markdown table (one row per family, with the failure reason
where one fails) to `--out`, and the rows as JSON next to it (`--out` with
`.json`), so `--families a,b` re-runs those families and keeps the other rows,
and `--resume` continues a stopped run.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOL = 1e-4


def _param_count(name: str) -> int:
    import timm
    import torch

    try:
        with torch.device("meta"):  # no memory, no init FLOPs
            model = timm.create_model(name, pretrained=False)
    except (RuntimeError, NotImplementedError):
        # Older timm (the lower end's 1.0.12) reads drop-path rates with .item()/.tolist() while
        # building, which meta tensors refuse: build it for real.
        model = timm.create_model(name, pretrained=False)
    return sum(p.numel() for p in model.parameters())


def representatives(families: list[str] | None, all_tags: bool) -> list[tuple[str, str]]:
    """(family, model name) pairs: every pretrained tag, or each family's smallest pretrained architecture."""
    import timm

    out = []
    for family in sorted(timm.list_modules()):
        if families and family not in families:
            continue
        tags = timm.list_models(module=family, pretrained=True)
        if not tags:
            continue
        if all_tags:
            out += [(family, t) for t in tags]
            continue
        # timm's own tiny `test_*` models are not representatives of a family.
        archs = sorted({t.split(".")[0] for t in tags if not t.startswith("test_")})
        sizes, errors = {}, {}
        for arch in archs:
            try:  # an architecture that fails to build is not a candidate
                sizes[arch] = _param_count(arch)
            except Exception as e:
                errors[arch] = f"{type(e).__name__}: {e}"
        if sizes:
            out.append((family, min(sizes, key=sizes.get)))
        elif archs:  # reported as the family's row (check() fails on it), not dropped
            print(f"{family}: no pretrained architecture builds ({next(iter(errors.values()))})", flush=True)
            out.append((family, archs[0]))
    return out


def _build(name: str, image_size: int | None) -> Any:
    import timm

    arch = name.split(".")[0]
    base = dict(pretrained=False, drop_rate=0.0, drop_path_rate=0.0)
    attempts = [dict(base, img_size=image_size)] if image_size else []
    attempts += [base, dict(pretrained=False)]
    for i, kwargs in enumerate(attempts):
        try:
            return timm.create_model(arch, **kwargs)
        except TypeError:
            if i == len(attempts) - 1:
                raise


def check(name: str, *, image_size: int | None, max_params: float) -> dict[str, Any]:
    """One model's row: export time, eval and train parity, or the first failure."""
    import torch

    from tests.helpers import randomize_batchnorm
    from torch2flax.export import convert_exported, model
    from torch2flax.export.parity import eval_parity, random_batch, train_parity

    row: dict[str, Any] = {"model": name}
    torch.manual_seed(0)  # reproducible random init
    try:
        net = randomize_batchnorm(_build(name, image_size), seed=0).eval()
        row["params_m"] = sum(p.numel() for p in net.parameters()) / 1e6
        if row["params_m"] > max_params:
            row["error"] = f"skipped: {row['params_m']:.0f}M parameters > --max-params {max_params:.0f}M"
            return row
        size = tuple(net.pretrained_cfg.get("input_size", (3, 224, 224))[1:])
        if image_size and getattr(net, "img_size", None) is not None:
            size = (image_size, image_size)
        row["input"] = f"{size[0]}x{size[1]}"
        t = time.perf_counter()
        module, variables = convert_exported(net, image_size=size)
        row["export_s"] = time.perf_counter() - t
        x, labels = random_batch(module, batch=2)
        row["eval_rel"] = eval_parity(net, module, variables, x)["rel"]
        tr = train_parity(net, module, variables, x, labels, tol=TOL)
        row.update(loss_rel=tr["loss"]["rel"], grad_rel=tr["grad"]["rel"], grad_vs_f64=tr["grad"]["vs_f64"],
                   grad_floor=tr["grad"]["floor"], bs_rel=tr["batch_stats"]["rel"], train_ok=tr["ok"])
        if not tr["ok"]:
            bad = next(tr[k] | {"what": k} for k in ("loss", "grad", "batch_stats") if not tr[k]["ok"])
            row["error"] = (f"train parity: {bad['what']} {bad['worst']} rel {bad['worst_rel']:.1e}, vs float64 "
                            f"{bad['worst_vs_f64']:.1e}, above the bound {bad['bound']:.1e}")
    except Exception as e:  # a coverage report records failures, it does not stop at them
        msg = str(e).strip().splitlines()
        row["error"] = f"{type(e).__name__}: {' / '.join(msg[:3])}"[:300]
        row["trace"] = traceback.format_exc(limit=3)
    finally:
        model.CACHE.clear()
        gc.collect()
        import jax

        jax.clear_caches()
    return row


def check_in_child(name: str, *, image_size: int | None, max_params: float, threads: int) -> dict[str, Any]:
    """`check` in a fresh process: memory does not build up over 98 models, and a model that
    exhausts it (the OOM killer) costs its own row, not the run."""
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--max-params", str(max_params),
           "--threads", str(threads)] + (["--image-size", str(image_size)] if image_size else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    why = f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0 else proc.stderr[-300:]
    return {"model": name, "error": f"the check's process died: {why}"}


def _fmt(v: Any, spec: str = ".1e") -> str:
    return "" if v is None else format(v, spec)


def write_markdown(rows: list[dict[str, Any]], path: str, args: argparse.Namespace) -> None:
    ok_eval = sum(1 for r in rows if r.get("eval_rel") is not None and r["eval_rel"] <= TOL)
    ok_train = sum(1 for r in rows if r.get("train_ok"))
    lines = [
        "# Exported-graph backend coverage",
        "",
        f"Generated by `python benchmarks/coverage.py {' '.join(sys.argv[1:])}` on {platform.machine()} with "
        f"{os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}. One "
        f"{'row per pretrained tag' if args.all else 'representative per timm family (its smallest pretrained architecture)'}, "
        "random init with randomised BatchNorm statistics, dropout/drop-path off, batch 2, float32 on CPU.",
        "Eval parity: max |logits - timm| / max(1, max |timm|) <= 1e-4. Train parity: the loss, every gradient "
        "tensor (relative in norm) and every updated batch_stats tensor within 1e-4 of timm float32, or, where "
        "timm's own float32 results differ from float64 by more than that (`floor`: the largest difference over "
        "the model's tensors), within twice the floor of timm float32 or of float64. Columns show the largest "
        "value over the model's tensors.",
        "",
        f"**{len(rows)} models: eval parity {ok_eval}/{len(rows)}, train parity {ok_train}/{len(rows)}.**",
        "",
        "| family | model | input | params (M) | export s | eval rel | loss rel | grad rel | grad vs f64 "
        "| grad floor | batch_stats rel | train | failure |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        train = "" if r.get("train_ok") is None else ("ok" if r["train_ok"] else "FAIL")
        lines.append(
            f"| {r['family']} | {r['model']} | {r.get('input', '')} | {_fmt(r.get('params_m'), '.1f')} "
            f"| {_fmt(r.get('export_s'), '.1f')} | {_fmt(r.get('eval_rel'))} | {_fmt(r.get('loss_rel'))} "
            f"| {_fmt(r.get('grad_rel'))} | {_fmt(r.get('grad_vs_f64'))} | {_fmt(r.get('grad_floor'))} | {_fmt(r.get('bs_rel'))} | {train} "
            f"| {r.get('error', '').replace('|', '/')} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="", help="comma-separated timm family modules (default: all)")
    p.add_argument("--all", action="store_true", help="every pretrained tag, not one model per family")
    p.add_argument("--image-size", type=int, default=None, help="input size for models taking img_size=")
    p.add_argument("--max-params", type=float, default=100.0, help="skip models over this many million params")
    p.add_argument("--resume", action="store_true", help="skip families already in the JSON rows")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process of check_in_child
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                 "COVERAGE.md"))
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(check(args.one, image_size=args.image_size, max_params=args.max_params)))
        return
    families = [f for f in args.families.split(",") if f] or None
    json_path = os.path.splitext(args.out)[0] + ".json"
    rows = []
    if (families or args.resume) and os.path.exists(json_path):  # keep the rows this run does not redo
        with open(json_path) as f:
            rows = [r for r in json.load(f) if not families or r["family"] not in families]
    done = {r["model"] for r in rows}
    for family, name in representatives(families, args.all):
        if name in done:
            continue
        t = time.perf_counter()
        row = dict(check_in_child(name, image_size=args.image_size, max_params=args.max_params,
                                  threads=args.threads), family=family)
        trace = row.pop("trace", None)
        rows = sorted(rows + [row], key=lambda r: (r["family"], r["model"]))
        status = row.get("error") or f"eval {row['eval_rel']:.1e} grad {row['grad_rel']:.1e}"
        print(f"{family:28s} {name:40s} {time.perf_counter() - t:6.1f}s  {status}", flush=True)
        if trace:
            print(trace, flush=True)
        write_markdown(rows, args.out, args)  # rewrite as we go: a long run killed midway keeps its rows
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"wrote {args.out} and {json_path}")


if __name__ == "__main__":
    main()
