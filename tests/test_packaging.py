"""The package installs as one import namespace: `torch2flax`, `torch2flax.loaders`, `torch2flax.train`.

The repository keeps three top-level folders; setup.cfg maps `loaders/` and `train/` under
`torch2flax`, so a user's own `train.py` or `loaders.py` cannot shadow the toolkit.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import console_script

pytestmark = pytest.mark.slow  # wheel builds and installs, in subprocesses

ROOT = Path(__file__).resolve().parent.parent
# Source folder -> the package it installs as.
PACKAGE_DIRS = {"torch2flax": "torch2flax", "loaders": "torch2flax/loaders", "train": "torch2flax/train"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    # Build from a copy of the sources, so the repository gets no build/ or egg-info litter.
    src = tmp_path_factory.mktemp("src")
    for name in (*PACKAGE_DIRS, "setup.cfg", "pyproject.toml", "README.md"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                          if (ROOT / name).is_dir() else {}))
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the test environment already has setuptools, and CI needs no download.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(out), str(src)], check=True, capture_output=True)
    (path,) = out.glob("torch2flax-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_installs_only_the_torch2flax_namespace(wheel):
    top = {name.split("/")[0] for name in wheel.namelist()}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert len(dist_info) == 1
    assert top - dist_info == {"torch2flax"}


def test_wheel_carries_every_source_file_of_the_three_folders(wheel):
    names = set(wheel.namelist())
    for folder, package in PACKAGE_DIRS.items():
        sources = [p.relative_to(ROOT / folder) for p in (ROOT / folder).rglob("*.py")]
        assert sources, folder
        missing = [str(p) for p in sources if f"{package}/{p.as_posix()}" not in names]
        assert not missing, f"{folder}/ files missing from the wheel under {package}/: {missing}"


def test_user_train_and_loaders_modules_do_not_shadow_the_toolkit_and_entry_points_resolve(tmp_path):
    """In a fresh process, from a folder with a user's own train.py and loaders.py: the toolkit's
    modules are imported, and the top-level names resolve to the subpackages' objects."""
    (tmp_path / "train.py").write_text("raise SystemExit('the user train.py was imported')\n")
    (tmp_path / "loaders.py").write_text("raise SystemExit('the user loaders.py was imported')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("from torch2flax.train import fit, predict, TrainConfig; from torch2flax.loaders import TFRecordDataset, "
            "make_loader; import torch2flax; assert torch2flax.fit is fit and torch2flax.TFRecordDataset is "
            "TFRecordDataset; assert torch2flax.make_loader is make_loader and torch2flax.predict is predict; "
            "assert torch2flax.TrainConfig is TrainConfig; print(fit.__module__, TFRecordDataset.__module__); "
            "print(sorted(torch2flax.__all__))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    modules, names = out.stdout.splitlines()
    assert modules.split() == ["torch2flax.train.trainer", "torch2flax.loaders.tfrecord"]
    for name in ("convert", "save", "load", "TFRecordDataset", "make_loader", "fit", "predict"):
        assert f"'{name}'" in names
    out = subprocess.run([console_script(), "train", "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "usage: torch2flax train" in out.stdout and "--num-classes" in out.stdout
