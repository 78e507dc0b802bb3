"""The loader from a notebook, from `python -`, and from a script without a main guard, and the
example notebook end to end.

Each scenario defines its own transform in `__main__` (a notebook cell, stdin, the script) and
loads one full training epoch with 2 forkserver workers; every id must come back exactly once.
The notebook scenario runs in the example notebook's kernel, after its cells (one kernel start).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REDUCED_RESNET18, single_device_env, write_flower_tfrecords

pytestmark = pytest.mark.slow  # subprocess runs

NUM_RECORDS = 32

SETUP = """
from torch2flax.loaders import TFRecordDataset, decode_image, make_loader
FEATURES = {{"image": "bytes", "class": "int", "id": "str"}}
"""
EPOCH = """
ds = TFRecordDataset({files!r}, FEATURES, transform=my_tf)
loader = make_loader(ds, 8, train=True, num_devices=1, num_workers=2)
ids = [str(i) for batch in loader for i in batch["id"].reshape(-1)]
print("IDS " + ",".join(ids))
"""
FUNCTION = """
def my_tf(d):
    return {"image": decode_image(d["image"]), "label": d["class"], "id": d["id"]}
"""
LAMBDA = """
my_tf = lambda d: {"image": decode_image(d["image"]), "label": d["class"], "id": d["id"]}
"""


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    root = tmp_path_factory.mktemp("nb")
    written = write_flower_tfrecords(root, num_records=NUM_RECORDS, num_shards=2, num_classes=4, size=24,
                                     id_prefix="nb")
    return str(root / "*.tfrec"), written.ids


def _ids(stdout: str) -> list[str]:
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("IDS ")]
    return line[4:].split(",")


def _env() -> dict[str, str]:
    return single_device_env()


def test_lambda_fed_to_python_on_stdin(flowers):
    files, ids = flowers
    code = SETUP.format() + LAMBDA + EPOCH.format(files=files)
    proc = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, env=_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(_ids(proc.stdout)) == sorted(ids)


def test_script_without_a_main_guard(flowers, tmp_path):
    files, ids = flowers
    script = tmp_path / "unguarded.py"
    # A top-level print shows whether the workers re-ran the script: it must appear once.
    script.write_text("print('TOP LEVEL RAN')\n" + SETUP.format() + FUNCTION + EPOCH.format(files=files))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env(),
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("TOP LEVEL RAN") == 1
    assert sorted(_ids(proc.stdout)) == sorted(ids)


def test_the_example_notebook_runs_end_to_end(tmp_path, flowers):
    """`examples/kaggle_flower.ipynb` on the built-in digits through its own preset switch
    (TORCH2FLAX_PRESET=smoke: the reduced resnet18, one epoch at 32 px, 2 folds), its cells as they
    are; then, in the same kernel, a transform defined in a cell feeds 2 loader workers (the notebook
    scenario above)."""
    import ast
    import csv
    import json

    import nbformat
    from nbclient import NotebookClient

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "kaggle_flower.ipynb")
    nb = nbformat.read(path, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "the notebook's settings cell is tagged 'parameters'"
    work = tmp_path / "runs" / "notebook"  # the notebook's WORK off Kaggle, relative to the kernel's cwd
    files, ids = flowers
    # After the notebook's cells: the model settings it chose, then the loader scenario.
    settings = nbformat.v4.new_code_cell('print("MODEL_KWARGS", repr(MODEL_KWARGS))')
    extra = [nbformat.v4.new_code_cell(c) for c in (SETUP.format(), FUNCTION, EPOCH.format(files=files))]
    nb.cells += [settings, *extra]
    # One CPU device; the hub is declared offline, so the notebook's pretrained attempt fails at once.
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}},
                   ).execute(env=single_device_env(TORCH2FLAX_PRESET="smoke", HF_HUB_OFFLINE="1"))
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.output_type == "error"]
    assert not errors
    out = "".join(o.get("text", "") for o in extra[-1].outputs if o.output_type == "stream")
    assert sorted(_ids(out)) == sorted(ids)
    install = next(c for c in nb.cells if c.cell_type == "code")
    # stdout: a kernel without ipywidgets also prints tqdm's "IProgress not found" warning (stderr)
    # when albumentations imports huggingface_hub's tqdm.auto.
    first = "".join(o.get("text", "") for o in install.get("outputs", [])
                    if o.output_type == "stream" and o.get("name") == "stdout")
    assert first.startswith("doctor: jax ") and " cpu x1 (1 process) " in first, first  # the doctor comes first
    # The settings cell names the device and the preset it chose, and every later cell ran with it.
    chosen = "".join(o.get("text", "") for o in params[0].get("outputs", [])
                     if o.output_type == "stream" and o.get("name") == "stdout")
    assert chosen.splitlines() == [
        f"device: cpu x1 -> preset 'smoke': resnet18 {REDUCED_RESNET18} at 32 px, 1 epoch, 2 folds, batch 64"
        " (set TORCH2FLAX_PRESET=full for the competition settings)"], chosen
    (line,) = [o["text"] for o in settings.outputs if o.output_type == "stream"]
    assert line.startswith("MODEL_KWARGS ") and ast.literal_eval(line[13:]) == REDUCED_RESNET18, line
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, "the training curves are shown inline"
    with open(work / "submission.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "label"] and len(rows) > 100
    assert all(0 <= int(label) < 10 for _, label in rows[1:])
    assert len({i for i, _ in rows[1:]}) == len(rows) - 1
    # The cross-validation cells: 2 folds, their out-of-fold score, and the fold ensemble's submission.
    report = json.loads((work / "cv2" / "cv.json").read_text())
    assert report["done"] == [0, 1] and 0.0 <= report["oof_macro_f1"] <= 1.0
    with open(work / "submission_cv.csv") as f:
        assert [r[0] for r in list(csv.reader(f))[1:]] == [i for i, _ in rows[1:]]  # the same test ids, in order
