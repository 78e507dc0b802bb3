"""Portable inference files: how long a 3-member ensemble `predict` takes to its first batch, from
full model files (each member rebuilt: timm model, `torch.export`, interpreter) and from the same
files with a portable program (`torch2flax.portable`: deserialize, compile).

    python benchmarks/portable.py [--models efficientnet_b0 convnext_atto vit_tiny_patch16_224]

Each member is a random-init timm model of an exported family at its pretrained size, written
once with `torch2flax.save(..., portable=True)`. Each timing is a fresh `torch2flax predict`
process (cold: nothing cached, the persistent compilation cache off) on a test split of one batch
(16 images), so its wall time is the time to the first batch plus writing a 16-row CSV; the two
runs alternate (full, portable, full, portable, ...) and the table gives each run and the medians.
Also printed: both runs give the same submission.

    python benchmarks/portable.py sweep [--resume] [--families beit,vit,...]

writes a portable program for every family COVERAGE.json lists as converting (its representative,
random init, its pretrained size, one fresh process each) and records, per family: the seconds
to write the programs (3 platforms x 2 dtypes), their size, and the float32 program's logits on a
batch of 2 against the full module's (max difference relative to the largest logit), or the
error. Rows go to docs/portable-coverage.json, the table to stdout.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_members(folder: str, models: list[str]) -> list[str]:
    import torch

    import torch2flax

    paths = []
    for i, name in enumerate(models):
        torch.manual_seed(i)
        module, variables = torch2flax.convert(name, num_classes=10)
        path = os.path.join(folder, f"{name}.msgpack")
        torch2flax.save(path, module, variables, portable=True)
        paths.append(path)
        print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)", flush=True)
    return paths


def time_predict(paths: list[str], test: str, out: str, full: bool) -> float:
    cmd = [sys.executable, "-m", "torch2flax", "predict", "--checkpoint", *paths, "--test", test, "--out", out,
           "--batch-size", "16", "--num-workers", "0", "--quiet"] + (["--full-model"] if full else [])
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def sweep_one(name: str) -> dict:
    import json

    import numpy as np

    import torch2flax
    from torch2flax import io

    module, variables = torch2flax.convert(name)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.msgpack")
        t = time.perf_counter()
        io.save(path, module, variables, portable=True)
        seconds = time.perf_counter() - t
        record = io.read_payload(path)["portable"]
        program, stored = torch2flax.load(path)
    x = np.random.default_rng(0).standard_normal((2, *program.input_hw, program.in_chans)).astype(np.float32)
    ref = np.asarray(module.apply(variables, x, train=False), np.float64)
    got = np.asarray(program.apply(stored, x), np.float64)
    return json.loads(json.dumps({
        "model": name, "write_s": round(seconds, 2),
        "program_kb": round(sum(len(e["stablehlo"]) for e in record["programs"].values()) / 1e3, 1),
        "rel": float(np.max(np.abs(got - ref)) / max(1.0, float(np.max(np.abs(ref)))))}))


def sweep(args: argparse.Namespace) -> None:
    import json

    out = os.path.join(ROOT, "docs", "portable-coverage.json")
    rows = json.load(open(out)) if args.resume and os.path.exists(out) else []
    done = {r["family"] for r in rows}
    coverage = json.load(open(os.path.join(ROOT, "COVERAGE.json")))
    wanted = [r for r in coverage if not r.get("error") and r["family"] not in done
              and (not args.families or r["family"] in args.families.split(","))]
    for row in wanted:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "one", row["model"]], cwd=ROOT,
                              capture_output=True, text=True)
        if proc.returncode == 0:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            result = {"model": row["model"], "error": (lines[-1] if lines else f"exit {proc.returncode}")[:300]}
        result["family"] = row["family"]
        rows.append(result)
        print(f"{row['family']:<20} {time.perf_counter() - t:6.1f}s {result}", flush=True)
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    ok = [r for r in rows if "error" not in r]
    print(f"\n{len(ok)} of {len(rows)} families write and run a portable program; largest relative "
          f"difference {max((r['rel'] for r in ok), default=0):.1e}")
    for r in rows:
        if "error" in r:
            print(f"- {r['family']} ({r['model']}): {r['error']}")


def main() -> None:
    if sys.argv[1:2] == ["one"]:
        import json

        print(json.dumps(sweep_one(sys.argv[2])))
        return
    if sys.argv[1:2] == ["sweep"]:
        p = argparse.ArgumentParser()
        p.add_argument("--resume", action="store_true")
        p.add_argument("--families", default="")
        sweep(p.parse_args(sys.argv[2:]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_b0", "convnext_atto", "vit_tiny_patch16_224"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    from tests.helpers import write_flower_tfrecords

    with tempfile.TemporaryDirectory() as tmp:
        write_flower_tfrecords(os.path.join(tmp, "test"), num_records=16, num_shards=1, num_classes=10, size=256,
                               labels=False, seed=0, id_prefix="te")
        test = os.path.join(tmp, "test", "*.tfrec")
        paths = write_members(tmp, args.models)
        times: dict[str, list[float]] = {"full": [], "portable": []}
        for _ in range(args.repeats):
            for kind in times:
                times[kind].append(time_predict(paths, test, os.path.join(tmp, f"{kind}.csv"), kind == "full"))
        with open(os.path.join(tmp, "full.csv")) as a, open(os.path.join(tmp, "portable.csv")) as b:
            same = a.read() == b.read()
    print(f"\n3-member ensemble ({', '.join(args.models)}), `torch2flax predict` of one batch of 16, fresh process:\n")
    print("| files | " + " | ".join(f"run {i + 1} (s)" for i in range(args.repeats)) + " | median (s) |")
    print("|---|" + "---|" * (args.repeats + 1))
    for kind, ts in times.items():
        print(f"| {kind} | " + " | ".join(f"{t:.1f}" for t in ts) + f" | {statistics.median(ts):.1f} |")
    ratio = statistics.median(times["full"]) / statistics.median(times["portable"])
    print(f"\nportable is {ratio:.2f}x faster to its first batch; same submission.csv: {same}")


if __name__ == "__main__":
    main()
