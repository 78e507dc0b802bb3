"""Install torch2flax into a platform's stack without changing that stack.

Kaggle's TPU image, Colab and Cloud TPU VMs ship a jax that matches their libtpu (and a torch
that matches torch_xla): a `pip install` that upgrades either takes the accelerator away. Run
with the platform's python (`.ci/stack NAME install` does, in `.venv-NAME`):

  check SPEC            `pip install --dry-run SPEC` here; exit 1 naming every protected package
                        (PROTECTED below) it would change.
  same PINS             exit 1 unless every protected package PINS names is installed at its pin.
  wheelhouse --platform PINS --out DIR [--python-version X.Y]
                        the torch2flax wheel plus a wheel of everything the platform (the packages
                        PINS resolves to) lacks, for `pip install --no-index --find-links DIR torch2flax`
                        where there is no internet (a Kaggle dataset). Resolved with
                        `--ignore-installed`, so it needs no venv holding the platform. Without
                        --python-version it is built for this interpreter; with it, for CPython X.Y
                        on x86-64 Linux (Kaggle's TPU image is 3.12) through pip's --python-version,
                        --abi and --platform: binary wheels only, except what PyPI has only as an
                        sdist (tfrecord), built here and accepted only when it is pure Python.
  resolve --platform PINS SPEC [--python-version X.Y]
                        exit 0 iff SPEC resolves together with the platform PINS resolves to (no venv
                        holding it needed: --ignore-installed) and leaves every protected package at
                        the platform's version; for a platform CI does not install (Colab's GPU runtime).
  offline-check --platform PINS --wheelhouse DIR [--python-version X.Y]
                        exit 0 iff DIR installs torch2flax with no index for CPython X.Y (default:
                        this one) on a platform holding what PINS resolves to, changing none of its
                        protected packages. The platform's packages are empty stand-in wheels, so
                        pip resolves (--dry-run) what a user's `pip install --no-index` would.

pip evaluates environment markers for the Python it runs on, not the target: a dependency only
the target Python needs (`; python_version >= "3.12"`) is not seen from 3.11.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# What a platform pairs with its accelerator or its other packages: jax/jaxlib with libtpu or the
# CUDA plugin, torch/torchvision with torch_xla, numpy/scipy with their compiled users; flax, optax,
# orbax-checkpoint and grain because a newer one drags a newer jax along (flax 0.12.9 needs jax 0.11.1).
PROTECTED = ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "jax-cuda12-pjrt", "flax", "optax",
             "orbax-checkpoint", "grain", "torch", "torchvision", "numpy", "scipy")
ROOT = Path(__file__).resolve().parent.parent
# glibc 2.39 and older (Debian 13, Ubuntu 24.04). pip does not expand a manylinux tag to the older
# ones it implies, so each is named; the legacy aliases name the same glibc versions.
LINUX_TAGS = (*(f"manylinux_2_{minor}_x86_64" for minor in range(5, 40)),
              "manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64", "linux_x86_64")
PURE = ("py3-none-any", "py2.py3-none-any")
QUIET = ("--quiet", "--progress-bar", "off")
MISSING = re.compile(r"No matching distribution found for (\S+)")


class PipFailed(Exception):
    pass


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    # stderr is kept for the FAIL line (and for MISSING: which requirement had no wheel).
    run = subprocess.run([sys.executable, "-m", "pip", *args], stderr=subprocess.PIPE, text=True, env=env)
    if run.returncode:
        raise PipFailed(f"pip {args[0]} failed:\n{run.stderr.strip()}")
    sys.stderr.write(run.stderr)


def for_python(version: str | None) -> list[str]:
    """pip's options that pick wheels for CPython VERSION on x86-64 Linux; none for this interpreter."""
    if version is None:
        return []
    platforms = [arg for tag in LINUX_TAGS for arg in ("--platform", tag)]
    return ["--python-version", version, "--implementation", "cp", "--abi", f"cp{version.replace('.', '')}",
            *platforms, "--only-binary=:all:"]


def report(*args: str, env: dict[str, str] | None = None) -> list[dict]:
    """The `install` items (metadata, download_info) of `pip install --dry-run --report ARGS`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "report.json")
        # pip takes --python-version only with --target or --dry-run; an empty --target also keeps
        # this venv's own packages out of the answer.
        target = ("--target", os.path.join(tmp, "target")) if "--python-version" in args else ()
        pip("install", "--dry-run", *QUIET, "--report", path, *target, *args, env=env)
        return json.loads(Path(path).read_text())["install"]


def versions(items: list[dict]) -> dict[str, str]:
    return {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in items}


def dry_run(*args: str) -> dict[str, str]:
    """{canonical name: version} of what `pip install --dry-run ARGS` would install."""
    return versions(report(*args))


def build_pure(requirement: str, out: str, platform: str) -> None:
    """Build REQUIREMENT here into OUT: for another Python only a pure-Python wheel will do."""
    with tempfile.TemporaryDirectory() as tmp:
        pip("wheel", "--no-deps", *QUIET, "-c", platform, "-w", tmp, requirement)
        (wheel,) = Path(tmp).glob("*.whl")
        if not wheel.name.endswith(tuple(f"-{tag}.whl" for tag in PURE)):
            raise PipFailed(f"{requirement} has no wheel for the target Python, and `pip wheel` here gives "
                            f"{wheel.name}, which holds compiled code")
        shutil.move(wheel, Path(out) / wheel.name)


def resolve(links: str, platform: str, python: list[str], *args: str) -> list[dict]:
    """report() of ARGS with --find-links LINKS. For another Python, a requirement with no wheel
    (tfrecord: PyPI has only its sdist) is built here into LINKS, then resolved again."""
    built = set()
    while True:
        try:
            return report("--find-links", links, *python, *args)
        except PipFailed as failed:
            missing = MISSING.search(str(failed))
            if not python or not missing or missing[1] in built:
                raise
            built.add(missing[1])
            build_pure(missing[1], links, platform)


def platform_set(platform: str, python: list[str]) -> dict[str, str]:
    """{name: version} of what PINS resolves to: the platform. Its own find-links folder, so that no
    wheel in a wheelhouse passes for the platform's."""
    with tempfile.TemporaryDirectory() as links:
        return versions(resolve(links, platform, python, "--ignore-installed", "-r", platform))


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


def wheelhouse(platform: str, out: str, python_version: str | None) -> int:
    python = for_python(python_version)
    os.makedirs(out, exist_ok=True)
    # Pure Python, so it goes in DIR first, where the resolutions below find it (--find-links).
    pip("wheel", "--no-deps", *QUIET, "-w", out, str(ROOT))
    (wheel,) = Path(out).glob("torch2flax-*.whl")
    have = platform_set(platform, python)
    needed = {n: v for n, v in versions(resolve(out, platform, python, "--ignore-installed", "-c", platform,
                                                str(wheel))).items()
              if n not in have and n != "torch2flax"}
    protected = sorted(set(needed) & set(PROTECTED))
    if protected:
        print(f"FAIL: the platform lacks {protected}; a wheelhouse must not bring them")
        return 1
    if needed:
        # For this interpreter `wheel`: a package published only as an sdist (tfrecord) is built here,
        # since an offline install could not fetch the setuptools its build needs. For another Python
        # `download` of binaries: resolve() has already built the sdist-only ones into OUT.
        fetch = ("download", "-d", out, *python) if python else ("wheel", "-w", out)
        pip(*fetch, "--no-deps", *QUIET, "--find-links", out, *(f"{n}=={v}" for n, v in sorted(needed.items())))
    print(f"wrote {out}: {wheel.name} + {len(needed)} wheels the platform lacks "
          f"({', '.join(sorted(needed)) or 'none'})" + (f" for Python {python_version}" if python else ""))
    print(f"install offline: pip install --no-index --find-links {out} torch2flax")
    return 0


def resolve_with(platform: str, spec: str, python_version: str | None) -> int:
    python = for_python(python_version)
    have = platform_set(platform, python)
    with tempfile.TemporaryDirectory() as links:
        got = versions(resolve(links, platform, python, "--ignore-installed", "-r", platform, spec))
    changed = sorted(f"{n} {have.get(n, '(not on the platform)')} -> {v}" for n, v in got.items()
                     if n in PROTECTED and have.get(n) != v)
    if changed:
        print(f"FAIL: {spec} with {platform} would change {', '.join(changed)}")
        return 1
    print(f"ok: {spec} resolves with {platform} ({len(got)} packages), keeping its "
          f"{', '.join(sorted(n for n in have if n in PROTECTED))}")
    return 0


def stub(folder: str, name: str, version: str) -> None:
    """An empty wheel NAME VERSION standing for a package the platform has installed; it requires
    nothing, as the platform's own packages are already there."""
    dist = f"{re.sub(r'[-_.]+', '_', name)}-{version}"
    files = {f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: platform_pip\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).decode().rstrip('=')},"
              f"{len(text.encode())}" for path, text in files.items()]
    files[f"{dist}.dist-info/RECORD"] = "\n".join([*record, f"{dist}.dist-info/RECORD,,"]) + "\n"
    with zipfile.ZipFile(Path(folder) / f"{dist}-py3-none-any.whl", "w") as whl:
        for path, text in files.items():
            whl.writestr(path, text)


def offline_check(platform: str, house: str, python_version: str) -> int:
    python = for_python(python_version)
    have = platform_set(platform, python)
    where = f"{house} for Python {python_version} on {platform}"
    # No index, no configured mirror or find-links: only DIR and the platform's own packages.
    env = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"} | {"PIP_CONFIG_FILE": os.devnull}
    with tempfile.TemporaryDirectory() as stubs:
        for name, version in have.items():
            stub(stubs, name, version)
        try:
            items = report("--no-index", "--find-links", house, "--find-links", stubs, *python, "-c", platform,
                           "torch2flax", env=env)
        except PipFailed as failed:
            missing = MISSING.search(str(failed))
            print(f"FAIL: {where}: it lacks {missing[1]}" if missing else f"FAIL: {where}: {failed}")
            return 1
        from_platform = {canonical(i["metadata"]["name"]) for i in items
                         if i["download_info"]["url"].startswith(Path(stubs).as_uri())}
    # Nothing is installed under --target, so pip takes the newest of a stub and a wheel in DIR: a
    # protected package from DIR is one a user's install would replace or add.
    changed = sorted(f"{n} {have.get(n, '(not on the platform)')} -> {v}" for n, v in versions(items).items()
                     if n in PROTECTED and n not in from_platform)
    if changed:
        print(f"FAIL: {where}: installing torch2flax would change {', '.join(changed)}")
        return 1
    print(f"ok: {house} installs torch2flax offline for Python {python_version} on {platform} "
          f"({len(items) - len(from_platform)} wheels from the wheelhouse, {len(from_platform)} packages the platform has)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check").add_argument("spec")
    sub.add_parser("same").add_argument("pins")
    w = sub.add_parser("wheelhouse")
    w.add_argument("--platform", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--python-version", help="X.Y: build for that CPython (default: this interpreter)")
    r = sub.add_parser("resolve")
    r.add_argument("--platform", required=True)
    r.add_argument("spec")
    r.add_argument("--python-version", help="X.Y: resolve for that CPython (default: this interpreter)")
    o = sub.add_parser("offline-check")
    o.add_argument("--platform", required=True)
    o.add_argument("--wheelhouse", required=True)
    o.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "check":
            return check(args.spec)
        if args.cmd == "same":
            return same(args.pins)
        if args.cmd == "resolve":
            return resolve_with(args.platform, args.spec, args.python_version)
        if args.cmd == "offline-check":
            return offline_check(args.platform, args.wheelhouse, args.python_version)
        return wheelhouse(args.platform, args.out, args.python_version)
    except PipFailed as failed:
        print(f"FAIL: {failed}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
