"""The quick-start demo, with one epoch: every step runs and its outputs are well-formed.

Hermetic: the demo runs with `--no-pretrained` in a process whose internet sockets refuse to
connect, so the test never depends on (or waits for) the model hub.
"""
import csv
import os
import subprocess
import sys

import pytest

from tests.helpers import single_device_env

pytestmark = pytest.mark.slow  # the demo's epoch, in a subprocess

# Runs the CLI with TCP/IP connections refused (AF_UNIX stays: the loader's forkserver uses it).
OFFLINE_CLI = """
import socket, sys
_connect = socket.socket.connect
def _guarded(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        raise AssertionError(f"network access attempted: {address}")
    return _connect(self, address)
socket.socket.connect = _guarded
from torch2flax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_demo_one_epoch_writes_everything(tmp_path, capsys):
    out = tmp_path / "demo"
    env = single_device_env(xla_defaults=True)  # the plain single-CPU setup, compiled as users compile
    proc = subprocess.run([sys.executable, "-c", OFFLINE_CLI, "demo", "--out", str(out), "--epochs", "1",
                           "--quiet", "--no-pretrained"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert step in log
    assert "random init (asked for)" in log and "network access" not in proc.stderr
    assert "parity vs timm" in log and "validation macro F1" in log and "training images/s" in log

    from sklearn.datasets import load_digits

    from torch2flax.loaders import TFRecordDataset

    test = TFRecordDataset(str(out / "data" / "test" / "*.tfrec"))
    assert "class" not in test[0]
    counts = {s: len(TFRecordDataset(str(out / "data" / s / "*.tfrec"))) for s in ("train", "val", "test")}
    assert sum(counts.values()) == len(load_digits().images)
    test_ids = [test[i]["id"].decode() for i in range(len(test))]

    with open(out / "submission.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "label"]
    assert [r[0] for r in rows[1:]] == test_ids and len(set(test_ids)) == counts["test"]
    assert all(0 <= int(r[1]) <= 9 for r in rows[1:])
    with open(out / "train" / "metrics.csv") as f:
        metrics = list(csv.DictReader(f))
    assert len(metrics) == 1 and 0.0 <= float(metrics[0]["val_macro_f1"]) <= 1.0
    (step,) = os.listdir(out / "train" / "checkpoints")  # one epoch: one training checkpoint
    for name in ("resnet18.msgpack", "train/best.msgpack", f"train/checkpoints/{step}", "train/curves.png"):
        assert (out / name).stat().st_size > 0
        assert str(out / name) in log  # the summary lists every file written
    check_gradcam(out, capsys)


def check_gradcam(out, capsys):
    """`torch2flax gradcam` on the demo's checkpoint: overlays at the image's size, per class."""
    import numpy as np
    from PIL import Image

    from torch2flax.cli import main

    args = ["gradcam", "--checkpoint", str(out / "train" / "best.msgpack"), "--images",
            str(out / "data" / "val" / "*.tfrec"), "--num", "6"]
    # In-process (the demo above is the hermetic fresh-process run): saves an import and a compile.
    for k in (0, 1):
        assert main([*args, "--class", str(k), "--out", str(out / f"cam{k}")]) == 0
    assert f"wrote 6 gradcam overlays (layer2) and grid.png to {out / 'cam0'}" in capsys.readouterr().out
    pictures = {}
    for k in (0, 1):
        files = sorted((out / f"cam{k}").glob("0*.png"))
        assert len(files) == 6 and (out / f"cam{k}" / "grid.png").stat().st_size > 0
        for f in files:
            image = Image.open(f)
            assert image.size == (32, 32)  # the demo's image size
            assert f"gradcam of class {k} at layer2" in image.text["Title"] and "true " in image.text["Title"]
        pictures[k] = np.stack([np.asarray(Image.open(f)) for f in files]).astype(int)
    assert [f.name for f in sorted((out / "cam0").glob("0*.png"))] == [f.name for f in sorted((out / "cam1").glob("0*.png"))]
    assert np.abs(pictures[0] - pictures[1]).mean() > 5  # another class, another heatmap
