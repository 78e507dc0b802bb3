"""Training end to end on a small learnable Flower-schema set (CPU devices).

The runs start from a reduced resnet18 (one block per stage, a quarter of the width: `init=` /
`--init`, tests/helpers.py): the same native ResNet training loop as the full model at a
fraction of its step, compile and checkpoint time (the full-size resnet18 trains in the demo
test)."""
import csv
import functools
import os
import subprocess

import numpy as np
import pytest

from tests.helpers import (
    PACED_CLI,
    remove_unless_failed,
    save_reduced_resnet18,
    write_flower_splits,
)

NUM_CLASSES = 4
SIZE = 32


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    return write_flower_splits(tmp_path_factory.mktemp("flowers"), train=256, val=70, test=45,
                               num_classes=NUM_CLASSES, size=SIZE, shards=(4, 2, 2))


@functools.cache
def _init(globs_train: str) -> str:
    """The model file every run starts from (see the module docstring), written beside the data
    on first use (the fast tier's tests that need no training never write it)."""
    root = os.path.dirname(os.path.dirname(globs_train))
    return str(save_reduced_resnet18(os.path.join(root, "r18_l1111.msgpack"), NUM_CLASSES))


def _config(globs, out, **overrides):
    from torch2flax.train import TrainConfig

    if "init" not in overrides:
        overrides["init"] = _init(globs["train"])
    base = dict(train=globs["train"], val=globs["val"], num_classes=NUM_CLASSES,
                model="resnet18", image_size=SIZE, crop_pct=1.0, scale_min=0.5, batch_size=32, epochs=2, lr=2e-3,
                warmup_epochs=0.5, num_workers=0, seed=0, out=str(out))
    return TrainConfig(**{**base, **overrides})


def _params(out):
    """The model leaves of the run's newest training checkpoint (out/checkpoints/<step>)."""
    import jax

    from torch2flax.train.checkpoint import load_checkpoint

    _, variables, _ = load_checkpoint(out)
    return jax.tree_util.tree_leaves(variables)


def _rel_diff(a_leaves, b_leaves):
    """|a - b| / |b| over all parameters and BN statistics together."""
    pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64))
             for a, b in zip(a_leaves, b_leaves, strict=True)]
    diff = np.sqrt(sum(((a - b) ** 2).sum() for a, b in pairs))
    return float(diff / np.sqrt(sum((b ** 2).sum() for _, b in pairs)))


def _assert_same_training(result, ref_result, params, ref_params):
    """Equal up to float rounding, and what rounding does to training.

    The 8 steps of epoch 0 agree to ~1e-7 in mean loss (measured 1 vs 8 devices and
    jit vs pmap), so epoch 0 is held to 1e-6. Later the runs drift apart the way any
    two summation orders do: at batch 4 per device, BN training plus Adam's
    per-coordinate normalisation amplify rounding (a near-zero gradient coordinate
    flips sign and takes a full lr step). Measured after epoch 1 (2026-11-28): loss
    rel 3.5e-4, all weights rel 1.2e-3 to 1.8e-3, one small BN bias 2.4e-2; the
    validation F1 stays identical. Epoch 0 is the sharp check (8 devices without BN
    sync moved its loss by 5%); the later bounds sit just above that drift.
    """
    history, ref_history = result.history, ref_result.history
    assert len(history) == len(ref_history)
    assert history[0]["train_loss"] == pytest.approx(ref_history[0]["train_loss"], rel=1e-6)
    for a, b in zip(history, ref_history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=2e-3)
        assert a["val_macro_f1"] == pytest.approx(b["val_macro_f1"], abs=1e-6)
    assert _rel_diff(params, ref_params) < 1e-2


@pytest.fixture(scope="module")
def reference(flowers, tmp_path_factory, request):
    """Two epochs, 8 devices, pmap, sync BN: the run the others must reproduce."""
    from torch2flax.train import fit

    _, globs = flowers
    failed, out = request.session.testsfailed, tmp_path_factory.mktemp("ref")
    result = fit(_config(globs, out, num_devices=8), progress=False)
    yield result, _params(out)
    remove_unless_failed(request, out, failed)  # ~80 MB of checkpoints


@pytest.fixture(scope="module")
def one_device(flowers, tmp_path_factory, request):
    """The reference run's configuration on 1 device."""
    from torch2flax.train import fit

    _, globs = flowers
    failed, out = request.session.testsfailed, tmp_path_factory.mktemp("one")
    # portable: best.msgpack gets its program when the run ends (test_one_device_equals_eight_with_sync_bn)
    yield fit(_config(globs, out, num_devices=1, portable=True), progress=False), out
    remove_unless_failed(request, out, failed)


# slow: fits (or a fit's checkpoints); core: the training tests every stack runs
@pytest.mark.slow
@pytest.mark.core
@pytest.mark.parametrize("mixing", [{}, {"mixup": 0.2, "cutmix": 1.0, "mix_prob": 0.5}], ids=["plain", "mixup-cutmix"])
def test_fit_on_one_device_learns(flowers, tmp_path, mixing):
    """To the same bar with MixUp and CutMix on (their loss is against mixed targets: it falls less).
    lr 5e-3: the narrow test model learns the task in 4 epochs (measured: F1 1.0 from epoch 3)."""
    from torch2flax.train import fit

    _, globs = flowers
    result = fit(_config(globs, tmp_path, num_devices=1, epochs=4, lr=5e-3, **mixing), progress=False)
    assert len(result.history) == 4
    assert result.history[-1]["train_loss"] < (0.85 if mixing else 0.7) * result.history[0]["train_loss"]
    assert result.best_macro_f1 >= 0.9, result.history
    assert all(r["val_macro_f1"] <= result.best_macro_f1 for r in result.history)


@pytest.mark.slow
@pytest.mark.core
def test_one_device_equals_eight_with_sync_bn(one_device, reference):
    import torch2flax
    from torch2flax.portable import PortableModule

    result, out = one_device
    ref_result, ref_params = reference
    _assert_same_training(result, ref_result, _params(out), ref_params)
    # `portable=True` (train --portable): best.msgpack got its program, at the run's image size
    program = torch2flax.load(out / "best.msgpack")[0]
    assert isinstance(program, PortableModule) and program.input_hw == (SIZE, SIZE)


@pytest.mark.slow
@pytest.mark.core
def test_jit_layout_equals_pmap(flowers, reference, tmp_path):
    from torch2flax.train import fit

    _, globs = flowers
    ref_result, ref_params = reference
    result = fit(_config(globs, tmp_path, num_devices=8, parallel="jit"), progress=False)
    _assert_same_training(result, ref_result, _params(tmp_path), ref_params)


@pytest.mark.slow
@pytest.mark.core
def test_resume_equals_straight_run(flowers, one_of_two_epochs, one_device, tmp_path):
    """Epoch 2 resumed from a run stopped after epoch 1 (its Orbax checkpoint at the epoch's end)
    equals the straight 2-epoch run (mid-epoch checkpoints resume in the signal and time-limit
    tests below)."""
    import shutil

    from torch2flax.train import fit

    _, globs = flowers
    _, straight = one_device
    out = shutil.copytree(one_of_two_epochs, tmp_path / "run")
    result = fit(_config(globs, out, num_devices=1), resume=True, progress=False)
    assert [r["epoch"] for r in result.history] == [0, 1]
    for a, b in zip(_params(out), _params(straight), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    with open(out / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1]


@pytest.fixture(scope="module")
def one_of_two_epochs(flowers, tmp_path_factory, request):
    """A 1-device run of a 2-epoch schedule stopped after its first epoch."""
    from torch2flax.train import fit

    _, globs = flowers
    failed, out = request.session.testsfailed, tmp_path_factory.mktemp("half")
    fit(_config(globs, out, num_devices=1), stop_after_epochs=1, progress=False)
    yield out
    remove_unless_failed(request, out, failed)


@pytest.mark.slow
def test_a_fine_tuned_native_run_exports_to_timm(one_of_two_epochs, tmp_path):
    """`export-timm` of a run folder of the native reduced resnet18 (its best.msgpack, trained one
    epoch): timm loads the state dict and gives the Flax model's eval logits (1e-5)."""
    from tests.test_finetune import assert_exports_to_timm

    assert_exports_to_timm(one_of_two_epochs, tmp_path / "r18.safetensors", SIZE)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_checkpoint(flowers, one_of_two_epochs, tmp_path):
    import shutil

    from torch2flax.train import fit
    from torch2flax.train.loop import NonFiniteLossError

    _, globs = flowers
    out = shutil.copytree(one_of_two_epochs, tmp_path / "run")
    before = _params(out)
    # Adam's steps are about lr in size whatever the gradient: lr=1e30 overflows the weights.
    exploding = _config(globs, out, num_devices=1, lr=1e30, warmup_epochs=0.0)
    with pytest.raises(NonFiniteLossError, match=r"at step \d+ \(epoch 2\).*last good checkpoint is "
                       + str(out / "checkpoints" / "8")):
        fit(exploding, resume=True, progress=False)
    assert os.listdir(out / "checkpoints") == ["8"]
    for a, b in zip(_params(out), before, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_weight_decay_spares_biases_norms_and_what_timm_exempts():
    import jax.numpy as jnp

    from torch2flax.train.state import decay_mask

    params = {"pos_embed": jnp.zeros((1, 5, 8)), "cls_token": jnp.zeros((1, 1, 8)),
              "blocks": {"0": {"attn": {"qkv": {"weight": jnp.zeros((24, 8)), "bias": jnp.zeros(24)}}}},
              "norm": {"weight": jnp.zeros(8)}}
    mask = decay_mask(params, exempt=frozenset({"pos_embed", "cls_token"}))
    assert mask == {"pos_embed": False, "cls_token": False, "norm": {"weight": False},
                    "blocks": {"0": {"attn": {"qkv": {"weight": True, "bias": False}}}}}
    assert decay_mask(params)["pos_embed"] is True  # by shape alone it would decay


def test_labels_outside_num_classes_stop_before_training(flowers, tmp_path):
    from torch2flax.train import fit

    sets, globs = flowers
    with pytest.raises(ValueError) as exc:
        # From timm's name (random init): the reduced model file's 4-class head would refuse 3 classes first.
        fit(_config(globs, tmp_path, num_devices=1, num_classes=3, init=None), progress=False)
    first = sets["train"].labels.index(3)  # the first record labelled 3, in file order
    per_file = 256 // 4
    file, record = sets["train"].files[first // per_file], first % per_file
    msg = str(exc.value)
    assert f"{file}: record {record} at byte" in msg and "label 3 is outside [0, num_classes=3)" in msg
    assert "at least 4" in msg
    assert not os.path.exists(tmp_path / "checkpoints") and not os.path.exists(tmp_path / "best.msgpack")


@pytest.mark.slow
@pytest.mark.core
def test_resume_refuses_a_different_optimizer(flowers, one_of_two_epochs):
    from torch2flax.train import fit

    _, globs = flowers
    with pytest.raises(ValueError, match="checkpoints/8: its optimizer state does not fit"):
        fit(_config(globs, one_of_two_epochs, num_devices=1, optimizer="sgd"), resume=True,
            progress=False)


@pytest.mark.slow
@pytest.mark.core
def test_predict_writes_every_test_id_once_with_tta(flowers, reference, tmp_path):
    from torch2flax.train import predict

    sets, globs = flowers
    ref_result, _ = reference
    best = os.path.join(ref_result.out, "best.msgpack")
    out = tmp_path / "submission.csv"
    plain = predict(best, globs["test"], str(tmp_path / "plain.csv"), batch_size=16, num_workers=0,
                    progress=False)
    result = predict(best, globs["test"], str(out), tta="hflip", probs=str(tmp_path / "p.npy"),
                     batch_size=16, num_workers=0, progress=False)
    with open(out) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "label"]
    assert [r[0] for r in rows[1:]] == sets["test"].ids  # file order, each id once
    assert all(0 <= int(r[1]) < NUM_CLASSES for r in rows[1:])
    probs = np.load(tmp_path / "p.npy")
    assert probs.shape == (45, NUM_CLASSES)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert not np.allclose(probs, plain.probs)  # the flipped view really contributed
    np.testing.assert_array_equal(probs.argmax(1), [int(r[1]) for r in rows[1:]])
    np.testing.assert_array_equal(result.probs, probs)  # the returned result is what was written
    assert list(result.ids) == sets["test"].ids


@pytest.mark.slow
def test_a_save_cut_short_never_counts_and_the_next_one_commits(one_of_two_epochs, tmp_path):
    """Orbax writes a step under a temporary name and renames it once whole: a process killed
    mid-save leaves `<step>.orbax-checkpoint-tmp-*`, which resuming ignores (the committed step 8
    is read) and which does not stop the next save (a resumed run's) from committing."""
    import shutil

    from torch2flax.train.checkpoint import TrainingCheckpoints, load_checkpoint, resume_source

    out = shutil.copytree(one_of_two_epochs, tmp_path / "run")
    shutil.copytree(out / "checkpoints" / "8", out / "checkpoints" / "12.orbax-checkpoint-tmp-1765012345")
    (out / "checkpoints" / "12.orbax-checkpoint-tmp-1765012345" / "commit_success.txt").unlink(missing_ok=True)
    assert resume_source(out) == str(out / "checkpoints" / "8")
    module, variables, saved = load_checkpoint(out)
    assert (saved.epoch, saved.step, saved.batch) == (0, 8, 0) and saved.opt_state is not None

    checkpoints = TrainingCheckpoints(out / "checkpoints", keep=2, asynchronous=False)
    saved.step, saved.batch = 12, 4
    checkpoints.save(module, variables, saved)
    checkpoints.close()
    assert resume_source(out) == str(out / "checkpoints" / "12")
    _, again, reread = load_checkpoint(out / "checkpoints" / "12")
    assert (reread.step, reread.batch, reread.epoch) == (12, 4, 0)
    for a, b in zip(jax_leaves(again), jax_leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.slow
@pytest.mark.core
def test_predict_ensembles_backbones_backends_and_image_sizes(flowers, reference, tmp_path, capsys, monkeypatch):
    """`predict --checkpoint A B --weights 3 1`: the trained reduced resnet18 (native, 32 px) and
    timm's test_efficientnet (exported graph, 48 px); each member predicts with its own eval
    transform, size and TTA, and the probabilities are the weighted mean of the members' probs.npy;
    from portable files, the same."""
    import torch

    import torch2flax
    from torch2flax.cli import main
    from torch2flax.train import predict
    from torch2flax.train.checkpoint import DataSpec, TrainCheckpoint, save_checkpoint

    sets, globs = flowers
    ref_result, _ = reference
    best = os.path.join(ref_result.out, "best.msgpack")
    torch.manual_seed(0)
    module, variables = torch2flax.convert("test_efficientnet", num_classes=NUM_CLASSES)
    assert type(module).__name__ == "ExportedModel"
    effnet = str(tmp_path / "effnet48.msgpack")
    save_checkpoint(effnet, module, variables, TrainCheckpoint(epoch=0, data=DataSpec(48, 1.0)))
    common = dict(batch_size=16, num_workers=0, progress=False)
    for name, ckpt, tta in (("a", best, "hflip"), ("b", effnet, None)):
        predict(ckpt, globs["test"], str(tmp_path / f"{name}.csv"), probs=str(tmp_path / f"{name}.npy"), tta=tta,
                **common)
    # One TTA mode per member.
    assert main(["predict", "--checkpoint", best, effnet, "--weights", "3", "1", "--tta", "hflip", "none",
                 "--test", globs["test"], "--out", str(tmp_path / "ens.csv"), "--probs", str(tmp_path / "ens.npy"),
                 "--batch-size", "16", "--num-workers", "0", "--quiet"]) == 0
    a, b, ens = (np.load(tmp_path / f"{n}.npy") for n in ("a", "b", "ens"))
    assert not np.allclose(a, b, atol=1e-2)  # two different models
    np.testing.assert_allclose(ens, 0.75 * a + 0.25 * b, rtol=0, atol=1e-6)
    with open(tmp_path / "ens.csv") as f:
        rows = list(csv.reader(f))
    assert [r[0] for r in rows[1:]] == sets["test"].ids and [int(r[1]) for r in rows[1:]] == list(ens.argmax(1))
    assert f"predicted {len(sets['test'].ids)} records" in capsys.readouterr().out

    # The same ensemble from portable files (`io.add_portable`, at each member's size) runs the
    # programs, rebuilding nothing from timm, and gives the same probabilities (1e-6).
    import shutil

    from torch2flax import io

    portable = []
    for path, size in ((best, SIZE), (effnet, 48)):
        portable.append(str(tmp_path / f"portable-{os.path.basename(path)}"))
        shutil.copy(path, portable[-1])
        io.add_portable(portable[-1], image_size=size)

    def rebuilt(*args, **kwargs):
        raise AssertionError("a model was rebuilt from its config")

    monkeypatch.setattr(io, "module_from_config", rebuilt)
    fast = predict(portable, globs["test"], str(tmp_path / "fast.csv"), weights=[3, 1], tta=["hflip", "none"],
                   **common)
    np.testing.assert_allclose(fast.probs, ens, rtol=0, atol=1e-6)


class _Sleepy:
    """A user augmentation that costs `seconds` per image: the input pipeline becomes the bottleneck."""

    def __init__(self, inner, seconds):
        self.inner, self.seconds = inner, seconds

    def __call__(self, **kwargs):
        import time

        time.sleep(self.seconds)
        return self.inner(**kwargs)


def _hints(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("data: training waited for input")]


@pytest.mark.slow
def test_slow_input_prints_the_data_wait_hint_once(flowers, tmp_path, capsys, monkeypatch):
    from torch2flax.train import data, fit

    _, globs = flowers
    real = data.train_transform
    monkeypatch.setattr(data, "train_transform", lambda *a, **k: _Sleepy(real(*a, **k), 0.02))
    result = fit(_config(globs, tmp_path, num_devices=1, epochs=2), progress=False)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("compile cache: ") and lines[1] == "data: 0 loader workers (num_workers=0 as given)"
    # 0.64 s of sleep per step
    assert all(r["data_wait"] > 0.5 for r in result.history), [r["data_wait"] for r in result.history]
    hints = _hints(out)
    assert len(hints) == 1, out  # both epochs waited; said once
    first = result.history[0]
    assert (f"{first['data_wait']:.0%} of step time at {first['images_per_sec']:.0f} img/s with 0 loader "
            "workers: raise --num-workers") in hints[0]


def test_curves_leave_the_users_matplotlib_backend_alone(tmp_path):
    """A notebook's inline backend stays on after `fit` draws curves.png (no `matplotlib.use`)."""
    import matplotlib

    from torch2flax.train.artifacts import plot_curves

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # any backend but Agg stands in for the notebook's
    try:
        rows = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 1.1 / (e + 1), "val_macro_f1": 0.3 * e}
                for e in range(3)]
        plot_curves(str(tmp_path / "curves.png"), rows)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_wait_hint_wording_and_bar():
    """The hint's decision and advice (a real fast run measured waits of 0.0% and 2.3% with 2
    workers at batch 64: `benchmarks/loader.py` measures the pipeline, not this suite)."""
    from torch2flax.train.data import DATA_WAIT_HINT, data_wait_hint

    assert data_wait_hint({"data_wait": DATA_WAIT_HINT, "images_per_sec": 900.0}, 2, cpus=16) is None
    row = {"data_wait": 0.23, "images_per_sec": 410.0}
    assert data_wait_hint(row, 2, cpus=16) == (
        "data: training waited for input 23% of step time at 410 img/s with 2 loader workers: raise "
        "--num-workers (this host has 16 usable CPUs) or lower the augmentation cost")
    assert "already use this host's 16 usable CPUs" in data_wait_hint(row, 15, cpus=16)


def test_num_workers_auto_survives_config_files_and_the_command_line(tmp_path):
    import argparse

    import yaml

    from torch2flax.train import TrainConfig
    from torch2flax.train.cli import _add_config_flags, config_from_args
    from torch2flax.train.config import dumps

    config = TrainConfig(train="a", val="b", num_classes=3)
    assert config.num_workers == "auto"
    (tmp_path / "config.json").write_text(dumps(config))
    assert TrainConfig.from_file(tmp_path / "config.json").num_workers == "auto"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**config.to_dict(), "num_workers": 6}))
    assert TrainConfig.from_file(tmp_path / "run.yaml").num_workers == 6
    assert TrainConfig.from_file(tmp_path / "run.yaml", num_workers="3").num_workers == 3
    with pytest.raises(ValueError, match="num_workers"):
        TrainConfig(num_workers="lots")
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--resume")
    _add_config_flags(parser)
    base = ["--train", "a", "--val", "b", "--num-classes", "3"]
    for flag, expected in ((["--num-workers", "auto"], "auto"), (["--num-workers", "4"], 4), ([], "auto")):
        assert config_from_args(parser.parse_args(base + flag)).num_workers == expected
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--num-workers", "-2"])


# ------------------------------------------------------------------ preemption (train.preemption)


def _assert_equals_straight(history, out, straight_result, straight_out):
    """A resumed run's metrics and weights are the uninterrupted run's: the same batches, the
    same augmentation, the same optimiser and dropout state, the same metric sums."""
    assert [r["epoch"] for r in history] == [r["epoch"] for r in straight_result.history]
    for a, b in zip(history, straight_result.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["val_macro_f1"] == pytest.approx(b["val_macro_f1"], abs=1e-9)
    for a, b in zip(_params(out), _params(straight_out), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_a_train_process_signalled_mid_epoch_resumes_exactly(flowers, one_device, tmp_path):
    """`torch2flax train` in a fresh process, with 2 loader workers and `--checkpoint-every 3`, gets
    SIGTERM from outside in epoch 2: it checkpointed at global steps 3, 6, the end of epoch 1 (8)
    and 9; it finishes the step, writes the checkpoint at that step, says so and exits 143 within
    seconds. `--resume` (in this process, no workers) then ends where the uninterrupted in-process
    run (no workers) ends, loss rel 1e-6 and weights 1e-6, with every artifact written. SIGKILL (the
    newest committed checkpoint stands) is the same scenario on a fold:
    tests/test_cv.py::test_a_fold_killed_partway_resumes_exactly."""
    import signal
    import sys
    import time

    from torch2flax.cli import main
    from torch2flax.train.checkpoint import latest_step_dir

    _, globs = flowers
    straight_result, straight = one_device
    out = tmp_path / "run"
    argv = ["train", "--train", globs["train"], "--val", globs["val"], "--init", _init(globs["train"]),
            "--model", "resnet18", "--num-classes", str(NUM_CLASSES), "--image-size", str(SIZE), "--crop-pct", "1.0",
            "--scale-min", "0.5", "--batch-size", "32", "--epochs", "2", "--lr", "2e-3", "--warmup-epochs", "0.5",
            "--num-workers", "2", "--num-devices", "1", "--out", str(out), "--checkpoint-every", "3",
            "--keep-checkpoints", "10"]
    proc = subprocess.Popen([sys.executable, "-c", PACED_CLI, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # conftest's XLA_FLAGS: 8 devices, 1 used

    def steps() -> list[int]:
        return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) \
            if (out / "checkpoints").is_dir() else []

    deadline = time.monotonic() + 300
    while latest_step_dir(out / "checkpoints") is None or 9 not in steps():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    sent = time.monotonic()  # in epoch 2 (steps 9-16), paced at 0.25 s a batch
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    written = steps()
    step = written[-1]
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert written == [3, 6, 8, 9, step] and 10 <= step < 16, (written, stderr[-2000:])
    assert took < 20, took  # one paced step, the save, and the interpreter's exit
    assert (f"stopped by SIGTERM at step {step} (epoch 2, batch {step - 8} of 8): wrote "
            f"{out / 'checkpoints' / str(step)}; continue with: torch2flax train --resume {out}") in stdout, stdout
    assert f"wrote to {out}" in stdout
    first = stdout.splitlines()[0]  # the doctor's summary comes first: versions, devices, warnings
    assert first.startswith("doctor: jax ") and " cpu x8 (1 process) " in first and " warning" in first, first

    assert main(["train", "--resume", str(out), "--num-workers", "0", "--quiet"]) == 0
    _assert_equals_straight(artifacts_history(out), out, straight_result, straight)
    assert steps()[-2:] == [15, 16]  # the cadence goes on from the resumed step; the end of epoch 2
    for name in ("config.json", "metrics.csv", "curves.png", "best.msgpack"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def artifacts_history(out):
    from torch2flax.train.artifacts import read_metrics_csv

    return read_metrics_csv(str(out / "metrics.csv"))


@pytest.mark.slow
def test_a_time_limit_stops_mid_epoch_with_status_0_and_resumes_exactly(flowers, one_device, tmp_path, monkeypatch):
    """A fake clock that moves 0.5 s per reading: the 18 s limit ends the run in epoch 2, leaving room
    for another step and a checkpoint (batch 3 of 8; the write is timed on the same fake clock, so the
    machine's real write time cannot move the stop); the resumed run (without a limit) is the straight run."""
    import functools
    import itertools

    from torch2flax.train import fit, trainer
    from torch2flax.train.checkpoint import load_checkpoint
    from torch2flax.train.preemption import Schedule

    _, globs = flowers
    straight_result, straight = one_device
    ticks = itertools.count(0.0, 0.5)
    monkeypatch.setattr(trainer, "Schedule", functools.partial(Schedule, clock=lambda: next(ticks)))
    # Synchronous saves, one kept: the same exact resume as the background saves above.
    result = fit(_config(globs, tmp_path, num_devices=1, time_limit="18s", async_checkpoints=False,
                         keep_checkpoints=1), progress=False)
    assert (result.stopped, result.exit_status, len(result.history)) == ("time limit", 0, 1)
    _, _, saved = load_checkpoint(tmp_path)
    assert saved.epoch == 0 and 0 < saved.batch < 8, saved
    assert os.listdir(tmp_path / "checkpoints") == [str(8 + saved.batch)]
    monkeypatch.undo()
    resumed = fit(_config(globs, tmp_path, num_devices=1), resume=True, progress=False)
    assert resumed.stopped is None
    _assert_equals_straight(resumed.history, tmp_path, straight_result, straight)


@pytest.mark.slow
def test_skip_bad_images_trains_on_counts_and_lists_them(flowers, tmp_path, monkeypatch):
    """One training and one validation image that do not decode: the run goes on, the training
    batch takes the next image instead, validation leaves the image out; metrics.csv counts them
    per epoch and bad_images.csv names each (file, record, id)."""
    from torch2flax.loaders import TFRecordDataset, transforms
    from torch2flax.loaders.image import ImageDecodeError
    from torch2flax.train import fit

    _, globs = flowers
    raw = {split: TFRecordDataset(globs[split])[0] for split in ("train", "val")}
    broken = {r["image"]: r["id"].decode() for r in raw.values()}
    real = transforms.decode_image

    def decode(data, *args, **kwargs):
        if data in broken:
            raise ImageDecodeError("cannot decode image (made bad by the test)")
        return real(data, *args, **kwargs)

    monkeypatch.setattr(transforms, "decode_image", decode)
    result = fit(_config(globs, tmp_path, num_devices=1, skip_bad_images=True), progress=False)
    assert [r["bad_images"] for r in result.history] == [2, 2]
    with open(tmp_path / "metrics.csv") as f:
        assert [int(r["bad_images"]) for r in csv.DictReader(f)] == [2, 2]
    with open(tmp_path / "bad_images.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["split"]) for r in rows] == [("0", "train"), ("0", "val"), ("1", "train"), ("1", "val")]
    for row in rows:
        ident = broken[raw[row["split"]]["image"]]
        assert f"(id '{ident}')" in row["error"] and ": record 0" in row["error"], row
        assert "made bad by the test" in row["error"]
    monkeypatch.undo()
    from torch2flax.loaders import RecordError

    monkeypatch.setattr(transforms, "decode_image", decode)
    with pytest.raises(RecordError, match=r"record 0 at byte 0 \(id .*made bad by the test"):  # without the flag: fatal
        fit(_config(globs, tmp_path / "strict", num_devices=1), progress=False)
