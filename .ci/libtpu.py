"""The libtpu a venv's jax pairs with, for the TPU compile tests (tests/test_tpu_check.py).

    python3 .ci/libtpu.py path VENV     download (once per machine) and unpack the libtpu that
                                        VENV's jax pins in its `tpu` extra; print its libtpu.so
    VENV/bin/python .ci/libtpu.py extra   (run with the venv's own Python) `pip install --dry-run
                                        -e .[tpu-check]`: must bring that libtpu and change no jax

The tests load libtpu through TPU_LIBRARY_PATH, set only inside the TPU tests (never in the
suite's environment: with libtpu visible, every jax process would try to start a TPU backend).
The platform stacks keep their own libtpu (Colab's 0.0.21.1 crashes compiling for a topology with
jax 0.7.2: measured); the paired one is unpacked beside the shared venvs, where .ci/trixie mounts it.
Where the index lacks the pinned libtpu (jax 0.12.1 pins 0.0.53.*; this index ends at 0.0.52,
2026-12-07), the newest release below it stands in, and the tests say so in their report.
"""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile

CACHE = os.path.join(os.environ.get("TORCH2FLAX_VENVS", "/var/cache/torch2flax/venvs"), "libtpu")
# jax's requirement on libtpu in its `tpu` extra, as METADATA ("Requires-Dist: libtpu==0.0.23; extra ==
# "tpu"") and importlib.metadata.requires() ("libtpu==0.0.23; extra == "tpu"") both write it.
PIN = re.compile(r"libtpu\s*==\s*([\w.*]+).*extra\s*==\s*.tpu.")


def pinned(venv: str) -> str:
    (meta,) = glob.glob(os.path.join(venv, "lib", "python3*", "site-packages", "jax-*.dist-info", "METADATA"))
    with open(meta) as f:
        for line in f:
            m = PIN.search(line) if line.startswith("Requires-Dist:") else None
            if m:
                return m.group(1)
    raise SystemExit(f"{meta}: no libtpu pin in jax's tpu extra")


def matches(version: str, pin: str) -> bool:
    """`version` satisfies `pin` ("0.0.23", or "0.0.42.*")."""
    return version == pin or (pin.endswith(".*") and version.startswith(pin[:-1]))


def _key(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def available() -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "libtpu"], capture_output=True,
                         text=True, check=True).stdout
    m = re.search(r"Available versions: (.*)", out)
    return sorted(m.group(1).replace(" ", "").split(","), key=_key) if m else []


def choose(pin: str, versions: list[str]) -> str:
    """The newest release matching `pin` ("0.0.42.*" or "0.0.23"), else the newest below it."""
    matching = [v for v in versions if matches(v, pin)]
    if matching:
        return matching[-1]
    base = pin[:-2] if pin.endswith(".*") else pin
    below = [v for v in versions if _key(v) < _key(base)]
    if not below:
        raise SystemExit(f"no libtpu release for pin {pin} on the index")
    print(f"libtpu {pin} is not on the index: {below[-1]} stands in", file=sys.stderr)
    return below[-1]


def path(venv: str) -> str:
    pin = pinned(venv)
    # A pin satisfied by an unpacked release: no index query (CI runs this for every stack).
    have = sorted((d for d in os.listdir(CACHE) if matches(d, pin)), key=_key) if os.path.isdir(CACHE) else []
    version = have[-1] if have else choose(pin, available())
    folder = os.path.join(CACHE, version)
    so = os.path.join(folder, "libtpu", "libtpu.so")
    if not os.path.isfile(so):
        with tempfile.TemporaryDirectory() as tmp:
            # The wheel's libtpu.so does not depend on the Python it is tagged for; the host's tag will do.
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp,
                            f"libtpu=={version}"], check=True)
            (wheel,) = glob.glob(os.path.join(tmp, "libtpu-*.whl"))
            partial = folder + ".partial"
            with zipfile.ZipFile(wheel) as z:
                z.extractall(partial)
            os.replace(partial, folder)
    return so


def extra() -> None:
    """`pip install -e .[tpu-check]`, dry run, in this venv: it must add the libtpu jax pins, and no jax."""
    from importlib.metadata import requires, version

    pin = next(m.group(1) for r in requires("jax") or () if (m := PIN.search(r)))
    if not any(matches(v, pin) for v in available()):
        # pip would then move jax to a version whose libtpu the index has (measured: jax 0.12.1 -> 0.12.0.1
        # with libtpu 0.0.50.1); users avoid that with `"jax==<theirs>"` on the same command line.
        print(f"[tpu-check] with jax {version('jax')}: not checked, the index has no libtpu {pin}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--no-build-isolation",
                               "--report", report, "-e", ".[tpu-check]"], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"pip install --dry-run -e .[tpu-check] failed with jax {version('jax')} (libtpu {pin}):\n"
                             + done.stderr[-1500:])
        with open(report) as f:
            installs = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.load(f)["install"]}
    changed = sorted(set(installs) & {"jax", "jaxlib"})
    libtpu = installs.get("libtpu")
    if changed or libtpu is None or not matches(libtpu, pin):
        raise SystemExit(f"[tpu-check] with jax {version('jax')}: would install {installs}; wanted libtpu {pin} "
                         "and no change to jax or jaxlib")
    print(f"[tpu-check] with jax {version('jax')}: adds libtpu {libtpu} (jax's pin {pin}), keeps jax and jaxlib")


if __name__ == "__main__":
    if sys.argv[1:2] == ["path"] and len(sys.argv) == 3:
        print(path(sys.argv[2]))
    elif sys.argv[1:] == ["extra"]:
        extra()
    else:
        raise SystemExit(__doc__)
