"""The error policy (`torch2flax.errors`, `torch2flax.cli.main`): a user's mistake ends every command
with one `torch2flax: error:` line and exit 2; anything else is a bug, shown with its traceback, a
line saying so, and exit 1; TORCH2FLAX_DEBUG=1 shows a user error's traceback too."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import write_flower_splits
from torch2flax import errors
from torch2flax.cli import build_parser, main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    _, globs = write_flower_splits(root, train=8, val=4, test=4, num_classes=3, size=16, shards=(1, 1, 1))
    return root, globs


def _mistakes(root, globs) -> dict[str, list[str]]:
    """One mistake a user makes with each command, caught before any heavy work."""
    missing = os.path.join(root, "no-such")
    return {
        "make-tfrecords": [missing, "--out", os.path.join(root, "out")],
        "list": ["--backend", "neither"],  # argparse's own error: usage, then one error line
        "convert": ["resnet_18_typo", "--out", os.path.join(root, "x.msgpack")],
        "verify": [missing + ".msgpack"],
        "train": ["--train", os.path.join(missing, "*.tfrec"), "--val", globs["val"], "--num-classes", "3",
                  "--out", os.path.join(root, "run")],
        "predict": ["--checkpoint", missing + ".msgpack", "--test", globs["test"], "--out", os.path.join(root, "s.csv")],
        "gradcam": ["--checkpoint", missing + ".msgpack", "--images", globs["test"], "--out", os.path.join(root, "g")],
        "demo": ["--model", "resnet_18_typo", "--out", os.path.join(root, "demo")],
        "cv": [missing],
        "tpu-check": ["resnet_18_typo", "--tpu", "v5e-8"],
        "doctor": ["--json", "--batch-size", "many"],  # argparse's own error
        "export-timm": [missing, "--out", os.path.join(root, "m.safetensors")],
    }


def _commands() -> list[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def test_every_command_has_a_mistake_below():
    assert sorted(_mistakes("r", {"val": "v", "test": "t"})) == _commands()


@pytest.mark.parametrize("command", _commands())
def test_a_users_mistake_is_one_line_and_exit_2(command, data, capsys):
    try:
        code = main([command, *_mistakes(*data)[command]])
    except SystemExit as e:  # argparse's own checks
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    lines = err.strip().splitlines()
    if lines[0].startswith("usage:"):
        assert lines[-1].startswith(f"torch2flax {command}: error: "), err
    else:
        assert len(lines) == 1 and lines[0].startswith("torch2flax: error: "), err


@pytest.mark.parametrize("command", _commands())
def test_an_internal_error_shows_its_traceback_says_bug_and_exits_1(command, data, capsys, monkeypatch):
    """Every command's handler raising what only a bug raises; a plain ValueError included (the old
    policy reported any ValueError as the user's, with no traceback)."""
    def broken(args):
        np.zeros(800).reshape(10, 10)  # ValueError: cannot reshape array of size 800 into shape (10,10)

    real = argparse.ArgumentParser.set_defaults

    def set_defaults(self, **kwargs):
        real(self, **{**kwargs, "func": broken} if "func" in kwargs else kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "set_defaults", set_defaults)
    args = {"make-tfrecords": ["src", "--out", "o"], "convert": ["resnet18", "--out", "x"], "verify": ["f.msgpack"],
            "train": [], "predict": ["--checkpoint", "c", "--test", "t"],
            "gradcam": ["--checkpoint", "c", "--images", "i", "--out", "o"], "cv": ["o"], "tpu-check": ["resnet18"],
            "export-timm": ["f.msgpack", "--out", "m.safetensors"]}
    assert main([command, *args.get(command, [])]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "cannot reshape array of size 800" in err
    assert err.strip().splitlines()[-1].startswith("torch2flax: internal error (ValueError): this is a bug"), err


def test_debug_shows_a_user_errors_traceback_with_its_line(data, capsys, monkeypatch):
    monkeypatch.setenv("TORCH2FLAX_DEBUG", "1")
    assert main(["cv", os.path.join(data[0], "no-such")]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("torch2flax: error: ")


class _BadRecords:
    """A dataset whose records are all bad (module level: a forkserver worker imports it)."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise errors.DataError(f"record {i} of bad.tfrec: 'class' is missing")


def test_a_dataloader_workers_user_error_keeps_its_class_and_one_line():
    """torch re-raises a worker's exception with its class and the worker's traceback as message."""
    from torch.utils.data import DataLoader

    with pytest.raises(errors.DataError) as info:
        next(iter(DataLoader(_BadRecords(), num_workers=1, multiprocessing_context="forkserver")))
    assert "Original Traceback" in str(info.value)
    assert str(errors.from_worker(info.value)) == "record 0 of bad.tfrec: 'class' is missing"


def test_a_user_error_on_another_host_keeps_its_class(monkeypatch):
    import jax
    from jax.experimental import multihost_utils

    from torch2flax.train import distributed

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    sent = []

    def allgather(code):  # this process had no error; process 1 a label out of range
        sent.append(int(code))
        return np.array([code, 1 + distributed._SENT.index(errors.DataError)])

    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    with pytest.raises(errors.DataError, match="checking the labels failed on process.es. 1"):
        distributed.raise_if_any(None, "checking the labels")
    with pytest.raises(errors.ConfigError, match="mine"):  # its own error as is, its class sent
        distributed.raise_if_any(errors.ConfigError("mine"), "checking the labels")
    assert sent == [0, 1 + distributed._SENT.index(errors.ConfigError)]
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda code: np.array([code, -1]))
    with pytest.raises(RuntimeError, match="failed on process.es. 1"):  # a bug there: not the user's
        distributed.raise_if_any(None, "checking the labels")


@pytest.mark.slow
def test_train_pretrained_with_no_hub_names_the_local_weights_flag(data, tmp_path):
    """No internet, as in a Kaggle code competition (HF_HUB_OFFLINE: the hub fails at once)."""
    root, globs = data
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH2FLAX_DEBUG": ""}
    out = subprocess.run([sys.executable, "-m", "torch2flax", "train", "--model", "resnet18", "--pretrained",
                          "--train", globs["train"], "--val", globs["val"], "--num-classes", "3", "--epochs", "1",
                          "--image-size", "16", "--batch-size", "8", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and lines[-1].startswith("torch2flax: error: "), out.stderr
    assert "--timm-checkpoint PATH" in lines[-1] and "resnet18" in lines[-1], lines[-1]
