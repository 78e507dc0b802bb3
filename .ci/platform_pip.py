"""Install torch2flax into a platform's stack without changing that stack.

Kaggle's TPU image, Colab and Cloud TPU VMs ship a jax that matches their libtpu (and a torch
that matches torch_xla): a `pip install` that upgrades either takes the accelerator away. Run
with the platform's python (`.venv-oldest/bin/python` in CI):

  check SPEC            `pip install --dry-run SPEC` here; exit 1 naming every protected package
                        (jax, jaxlib, libtpu, flax, optax, torch, torchvision, numpy) it would change.
  same PINS             exit 1 unless every protected package PINS names is installed at its pin.
  wheelhouse --platform PINS --out DIR
                        the torch2flax wheel plus a wheel of everything the platform (the packages
                        PINS resolves to) lacks, for `pip install --no-index --find-links DIR torch2flax`
                        where there is no internet (a Kaggle dataset). Resolved with
                        `--ignore-installed`, so it needs no venv holding the platform; built for
                        this interpreter (run it with the platform's Python version: Kaggle's is 3.12).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PROTECTED = ("jax", "jaxlib", "libtpu", "flax", "optax", "torch", "torchvision", "numpy")
ROOT = Path(__file__).resolve().parent.parent


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def dry_run(*args: str) -> dict[str, str]:
    """{canonical name: version} of what `pip install --dry-run ARGS` would install."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        pip("install", "--dry-run", "--quiet", "--progress-bar", "off", "--report", report, *args)
        with open(report) as f:
            items = json.load(f)["install"]
    return {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in items}


def pins(path: str) -> dict[str, str]:
    out = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            out[canonical(name)] = version.strip()
    return out


def installed(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check(spec: str) -> int:
    changes = {n: v for n, v in dry_run(spec).items() if n in PROTECTED}
    for name, version in sorted(changes.items()):
        print(f"FAIL: installing {spec} would change {name} {installed(name) or '(not installed)'} -> {version}")
    if not changes:
        print(f"ok: installing {spec} changes none of {', '.join(PROTECTED)}")
    return 1 if changes else 0


def same(path: str) -> int:
    bad = [(n, v, installed(n)) for n, v in pins(path).items() if n in PROTECTED and installed(n) != v]
    for name, want, got in bad:
        print(f"FAIL: {name} is {got}, the platform ({path}) has {want}")
    if not bad:
        print(f"ok: the platform's {', '.join(n for n in pins(path) if n in PROTECTED)} are as {path} pins them")
    return 1 if bad else 0


def wheelhouse(platform: str, out: str) -> int:
    os.makedirs(out, exist_ok=True)
    pip("wheel", "--no-deps", "--quiet", "--progress-bar", "off", "-w", out, str(ROOT))
    (wheel,) = Path(out).glob("torch2flax-*.whl")
    platform_set = dry_run("--ignore-installed", "-r", platform)
    needed = {n: v for n, v in dry_run("--ignore-installed", "-c", platform, str(wheel)).items()
              if n not in platform_set and n != "torch2flax"}
    protected = sorted(set(needed) & set(PROTECTED))
    if protected:
        print(f"FAIL: the platform lacks {protected}; a wheelhouse must not bring them")
        return 1
    if needed:
        # `wheel`, not `download`: a package published only as an sdist (tfrecord) is built here,
        # since an offline install could not fetch the setuptools its build needs.
        pip("wheel", "--no-deps", "--quiet", "--progress-bar", "off", "-w", out,
            *(f"{n}=={v}" for n, v in sorted(needed.items())))
    print(f"wrote {out}: {wheel.name} + {len(needed)} wheels the platform lacks "
          f"({', '.join(sorted(needed)) or 'none'})")
    print(f"install offline: pip install --no-index --find-links {out} torch2flax")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check").add_argument("spec")
    sub.add_parser("same").add_argument("pins")
    w = sub.add_parser("wheelhouse")
    w.add_argument("--platform", required=True)
    w.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.cmd == "check":
        return check(args.spec)
    if args.cmd == "same":
        return same(args.pins)
    return wheelhouse(args.platform, args.out)


if __name__ == "__main__":
    sys.exit(main())
