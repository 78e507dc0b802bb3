"""Portable inference files (`save(..., portable=True)`, `convert --portable`, `train --portable`):
the eval forward as a `jax.export` program beside the weights, run with no torch and no timm.

Across stacks (a program written on jax 0.12 runs on 0.7.2 and back): tests/test_cross_stack.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.cross_stack import _randomized, logits
from tests.helpers import save_reduced_resnet18, single_device_env

# slow: every test lowers a model for three platforms (seconds each); core: every stack runs them
pytestmark = [pytest.mark.slow, pytest.mark.core]

TOL = 1e-6  # of the largest logit: the program is the same computation, compiled in another process


def _relative(got, ref) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """The reduced native resnet18 (tests/helpers.py) with a portable program at 32 px."""
    import torch2flax

    path = str(tmp_path_factory.mktemp("portable") / "r18.msgpack")
    save_reduced_resnet18(path, num_classes=5)
    module, variables = torch2flax.load(path)
    variables = _randomized(variables, seed=3)
    torch2flax.save(path, module, variables, portable=True, image_size=32)
    return path, module, variables


def test_a_portable_file_loads_as_its_program_with_the_full_models_logits(reduced):
    import torch2flax
    from torch2flax.portable import PortableModule

    path, module, variables = reduced
    program, stored = torch2flax.load(path)
    assert isinstance(program, PortableModule) and program.input_hw == (32, 32) and program.num_classes == 5
    assert program.record["platforms"] == ["cpu", "cuda", "tpu"]
    x = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)
    ref = logits(module, variables, x)
    assert _relative(logits(program, stored, x), ref) <= TOL
    # bfloat16 compute: its own program, within bfloat16's precision
    assert _relative(program.clone(dtype="bfloat16").apply(stored, x), ref) < 3e-2
    full, _ = torch2flax.load(path, portable=False)
    assert type(full) is type(module)


def test_a_portable_program_refuses_what_needs_the_full_model(reduced, tmp_path):
    import torch2flax
    from torch2flax import io
    from torch2flax.errors import ConfigError, DataError

    path, module, variables = reduced
    program, stored = torch2flax.load(path)
    x = np.zeros((2, 32, 32, 3), np.float32)
    with pytest.raises(ConfigError, match="eval forward pass only"):
        program.apply(stored, x, train=True)
    with pytest.raises(ConfigError, match=r"takes 32x32 images with 3 channels, got an input of shape \(2, 48, 48, 3\)"):
        program.apply(stored, np.zeros((2, 48, 48, 3), np.float32))
    with pytest.raises(ConfigError, match="cannot change"):
        program.clone(drop_rate=0.1)
    with pytest.raises(ConfigError, match=r"written for \['bfloat16', 'float32'\], not float16"):
        program.clone(dtype="float16")
    plain = str(tmp_path / "plain.msgpack")
    torch2flax.save(plain, module, variables)
    with pytest.raises(DataError, match="holds no portable program"):
        torch2flax.load(plain, portable=True)
    # the weights beside a program must be the ones it takes
    payload = io.read_payload(path)
    payload["variables"]["params"]["fc"]["kernel"] = np.zeros((3, 5), np.float32)
    io.write_payload(tmp_path / "bad.msgpack", payload)
    with pytest.raises(DataError, match=r"do not match its portable program at \['params/fc/kernel'\]"):
        torch2flax.load(tmp_path / "bad.msgpack")
    payload = io.read_payload(path)
    payload["portable"]["version"] = 99
    io.write_payload(tmp_path / "newer.msgpack", payload)
    with pytest.raises(DataError, match="portable program version 99"):
        torch2flax.load(tmp_path / "newer.msgpack")
    assert isinstance(torch2flax.load(tmp_path / "newer.msgpack", portable=False)[0], type(module))


def _torchless_venv(root) -> str:
    """A venv holding this one's packages but torch, torchvision, timm and what only they use
    (CUDA libraries, triton): symlinks, so it is made in a second with no download."""
    import site
    import sysconfig

    venv = os.path.join(root, "venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    ours = sysconfig.get_paths()["purelib"]
    theirs = subprocess.run([os.path.join(venv, "bin", "python"), "-c", "import sysconfig; "
                             "print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True,
                            check=True).stdout.strip()
    left_out = ("torch", "timm", "functorch", "triton", "nvidia", "cuda", "grad_cam", "pytorch_grad_cam", "ttach")
    for name in os.listdir(ours):
        if not name.lower().startswith(left_out):
            os.symlink(os.path.join(ours, name), os.path.join(theirs, name))
    assert site  # the venv's own site module reads the symlinked .pth files (torch2flax's editable install)
    return os.path.join(venv, "bin", "python")


_PREDICT_WITHOUT_TORCH = """
import json, sys
import numpy as np
for name in ("torch", "timm"):
    try:
        __import__(name)
        sys.exit(f"{name} is importable here")
    except ImportError:
        pass
import torch2flax
module, variables = torch2flax.load(sys.argv[1])
np.save(sys.argv[3], np.asarray(module.apply(variables, np.load(sys.argv[2])), np.float64))
print(json.dumps({"module": type(module).__name__,
                  "torch_loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm"))}))
"""


def test_an_exported_familys_portable_file_predicts_without_torch_or_timm(tmp_path):
    """timm's test_efficientnet through the exported backend (any timm family), with randomised
    BatchNorm statistics, saved with its program (`convert --portable`: tests/test_cli.py): a venv
    without torch and timm loads the file and gives the full model's logits within 1e-6 of the largest."""
    import torch2flax

    out = str(tmp_path / "effnet.msgpack")
    module, variables = torch2flax.convert("test_efficientnet", num_classes=10, image_size=48)
    assert type(module).__name__ == "ExportedModel"
    variables = _randomized(variables, seed=4)
    torch2flax.save(out, module, variables, portable=True)
    assert torch2flax.load(out)[0].input_hw == (48, 48)
    x = np.random.default_rng(1).standard_normal((4, 48, 48, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    python = _torchless_venv(tmp_path)
    proc = subprocess.run([python, "-c", _PREDICT_WITHOUT_TORCH, out, str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], capture_output=True, text=True, env=single_device_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report == {"module": "PortableModule", "torch_loaded": []}
    assert _relative(np.load(tmp_path / "y.npy"), logits(module, variables, x)) <= TOL
