"""Multi-host training on jax.distributed: 2 processes x 4 CPU devices on 127.0.0.1 against
1 process x 8 devices with the same global batch and seed.

One launch per process covers train (pmap, stopped after epoch 1), `--resume` (epoch 2,
the compiled steps reused), predict (jit layout: global `NamedSharding` arrays), `--folds 2
--fold all` (the folds, their out-of-fold rows and the CV report), through
`torch2flax.cli.main`, and then a dead peer: process 1 kills itself while process 0 resumes a
copy of the epoch-1 run, so process 0 waits for it in a collective and must exit with an
error within the peer timeout (a second launch for that scenario cost ~50 s). The 1 x 8
reference (pmap) runs in this process meanwhile. Every run starts from a reduced resnet18
file (`--init`, one block per stage: test_train.py's model). Training under `--parallel jit`
on 2 processes is left out to keep the file within its time budget (its compile doubles the
launch's cost on 2 cores); it shares the jit feed, replication and read-back that predict
checks here. Records: 64 training (2 global batches of 32), 56 validation (the last global
batch is padded on process 1 only) and 37 test (predicted in global batches of 16: process
1's slice of the last one is empty).
"""
import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.helpers import remove_unless_failed, save_reduced_resnet18, write_flower_splits, write_flower_tfrecords

pytestmark = pytest.mark.slow  # multi-process launches of the CLI

NUM_CLASSES = 4
SIZE = 32
LAUNCH_TIMEOUT = 240  # seconds for a whole launch on a loaded 2-core machine
PEER_TIMEOUT = 20  # seconds; the dead peer must be noticed well within DEAD_PEER_BOUND
DEAD_PEER_BOUND = 60
# The driver each process runs: the steps in order, stopping at the first failure. A step is a CLI
# command ({"argv": [...]}, timed; "rc": the exit status it must end with, default 0) or test
# plumbing: "copy" a run directory, "touch" or "wait_for" a marker file, "die" (SIGKILL itself,
# printing the wall-clock time), "sigterm_in_epoch" (SIGTERM itself as that epoch's first training
# batch is loaded); "process" limits it to one process.
DRIVER = """
import json, os, shutil, signal, sys, time
from torch2flax.cli import main
me = int(os.environ["TORCH2FLAX_PROCESS_ID"])
start = time.monotonic()
for step in json.loads(sys.argv[1]):
    if step.get("process", me) != me:
        continue
    if "argv" in step:
        rc = main(step["argv"])
        print(f"driver: {step['argv'][0]} done at {time.monotonic() - start:.1f} s (rc {rc})", flush=True)
        if rc != step.get("rc", 0):
            sys.exit(rc or 1)
    elif "sigterm_in_epoch" in step:
        from torch2flax.train import bad_images
        # Bound now (the driver's names are globals, rebound by a later step); it fires once.
        def sending(loader, bad, real=bad_images.host_batches, when=step["sigterm_in_epoch"], sent=[]):
            for i, batch in enumerate(real(loader, bad)):
                if getattr(loader, "train", False) and loader.epoch == when and i == 0 and not sent:
                    sent.append(True)
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch
        bad_images.host_batches = sending
    elif "copy" in step:
        shutil.copytree(*step["copy"])
    elif "touch" in step:
        open(step["touch"], "w").close()
    elif "wait_for" in step:
        while not os.path.exists(step["wait_for"]):
            time.sleep(0.1)
    elif "die" in step:
        print(f"driver: killing myself at {time.time():.3f}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    sets, globs = write_flower_splits(tmp_path_factory.mktemp("flowers"), train=64, val=56, test=37,
                                      num_classes=NUM_CLASSES, size=SIZE, shards=(2, 2, 2))
    globs["init"] = str(save_reduced_resnet18(tmp_path_factory.mktemp("init") / "r18_l1111.msgpack", NUM_CLASSES))
    return sets, globs


def _train_args(globs, out, **overrides):
    """TrainConfig fields (test_train.py's settings on a smaller set); `batch_size` is the global batch."""
    return dict(train=globs["train"], val=globs["val"], init=globs["init"], num_classes=NUM_CLASSES, model="resnet18",
                image_size=SIZE, crop_pct=1.0, scale_min=0.5, batch_size=32, epochs=2, lr=2e-3,
                warmup_epochs=0.5, num_workers=0, seed=0, out=str(out), **overrides)


def _fold_args(globs, out):
    """`--folds 2 --fold all` on the 64 training records, one epoch a fold (32 records: one step)."""
    args = {k: v for k, v in _train_args(globs, out).items() if k != "val"}
    return {**args, "epochs": 1, "folds": 2, "fold": "all"}


def _argv(command, values):
    return [command] + [x for k, v in values.items() for x in ("--" + k.replace("_", "-"), str(v))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _launch(tmp_path, commands, *, num_processes=2, peer_timeout=PEER_TIMEOUT):
    """Start `num_processes` processes x 4 CPU devices running the driver's steps `commands`; yields
    the Popen objects and their log paths. Every process is killed on the way out."""
    port = _free_port()
    # 4 devices each; any other XLA flags as the in-process reference has them.
    flags = os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4")
    # No persistent compilation cache (tests/conftest.py sets one for every other subprocess): on jax
    # 0.12.1 two CPU processes that load their programs from a warm cache hang in the first collective
    # (the launch timed out at 240 s each time; with fresh compiles it passes in ~50 s, 2026-12-07).
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env = {**env, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu",
           "TORCH2FLAX_COORDINATOR": f"127.0.0.1:{port}", "TORCH2FLAX_NUM_PROCESSES": str(num_processes),
           "TORCH2FLAX_PEER_TIMEOUT": str(peer_timeout)}
    procs, logs = [], []
    try:
        for i in range(num_processes):
            logs.append(tmp_path / f"process{i}.log")
            with open(logs[-1], "w") as log:
                procs.append(subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(commands)],
                                              env={**env, "TORCH2FLAX_PROCESS_ID": str(i)},
                                              stdout=log, stderr=subprocess.STDOUT))
        yield procs, logs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def _watch(procs):
    """Threads recording each process's wall-clock exit time, whatever this process does meanwhile."""
    exits = [None] * len(procs)

    def watch(i):
        procs[i].wait()
        exits[i] = time.time()

    watchers = [threading.Thread(target=watch, args=(i,), daemon=True) for i in range(len(procs))]
    for w in watchers:
        w.start()
    return watchers, exits


def _steps_done(log, command, rcs):
    """`command` finished with these exit statuses, in order, in this process's log."""
    done = [line for line in log.read_text().splitlines() if line.startswith(f"driver: {command} done")]
    assert [line.rsplit("(rc ", 1)[1].rstrip(")") for line in done[:len(rcs)]] == [str(rc) for rc in rcs], _tail(log)


def _tail(log, n=4000):
    text = "\n".join(line for line in log.read_text().splitlines() if "[Gloo]" not in line)
    return text[-n:]


def _leaves(out):
    """The model leaves of a run's newest training checkpoint."""
    import jax

    from torch2flax.train.checkpoint import load_checkpoint

    _, variables, _ = load_checkpoint(out)
    return jax.tree_util.tree_leaves(variables)


def _rel_diff(a_leaves, b_leaves):
    pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64)) for a, b in zip(a_leaves, b_leaves, strict=True)]
    return float(np.sqrt(sum(((a - b) ** 2).sum() for a, b in pairs)) / np.sqrt(sum((b ** 2).sum() for _, b in pairs)))


@pytest.fixture(scope="module")
def runs(flowers, tmp_path_factory, request):
    """The 2 x 4 launch and the 1 x 8 reference (computed here while the launch runs)."""
    from torch2flax.train import TrainConfig, fit, predict

    _, globs = flowers
    failed, tmp = request.session.testsfailed, tmp_path_factory.mktemp("multihost")
    out, ref_out, dead, cv = tmp / "run", tmp / "ref", tmp / "dead", tmp / "cv"
    test = {"test": globs["test"], "batch_size": 16, "num_workers": 0}
    predicted = tmp / "predicted"  # process 0's marker: its predict is over, process 1 may die
    commands = [
        # Process 1 alone gets SIGTERM in epoch 1 (checkpoints every step meanwhile): both processes
        # agree to stop after that epoch, and both exit 143.
        {"sigterm_in_epoch": 0, "process": 1},
        {"argv": _argv("train", _train_args(globs, out, parallel="pmap", checkpoint_every=1)) + ["--quiet"], "rc": 143},
        {"copy": [str(out), str(dead)], "process": 0},  # the epoch-1 run, for the dead peer below
        {"argv": ["train", "--resume", str(out), "--quiet"]},
        {"argv": _argv("predict", {"checkpoint": out / "best.msgpack", "out": tmp / "jit.csv", "parallel": "jit",
                                   "probs": tmp / "jit.npy", **test}) + ["--quiet"]},
        # Cross-validation across the processes: every process assigns the folds itself; process 0
        # writes folds.csv, each fold's OOF rows (gathered from both) and the CV report. Process 1
        # alone gets SIGTERM in fold 0's only epoch: both stop after it, before its OOF rows; the
        # resume writes them and trains fold 1.
        {"sigterm_in_epoch": 0, "process": 1},
        {"argv": _argv("train", _fold_args(globs, cv)) + ["--quiet"], "rc": 143},
        {"argv": ["train", "--resume", str(cv), "--quiet"]},
        {"touch": str(predicted), "process": 0},
        # The dead peer: process 1 dies, process 0 resumes the copy and waits for it in a collective.
        {"wait_for": str(predicted), "process": 1},
        {"die": True, "process": 1},
        {"argv": ["train", "--resume", str(dead), "--quiet"], "process": 0},
    ]
    started = time.monotonic()
    with _launch(tmp, commands) as (procs, logs):
        watchers, exits = _watch(procs)
        ref = fit(TrainConfig(**_train_args(globs, ref_out, num_devices=8)), progress=False)
        ref_pred = predict(str(ref_out / "best.msgpack"), globs["test"], str(tmp / "ref.csv"), batch_size=16,
                           num_workers=0, progress=False)
        for w in watchers:
            w.join(max(started + LAUNCH_TIMEOUT - time.monotonic(), 1))
        hung = [log.name for w, log in zip(watchers, logs) if w.is_alive()]  # killed on the way out
    for w in watchers:
        w.join()
    print(f"2 x 4 launch and 1 x 8 reference: {time.monotonic() - started:.0f} s")
    yield dict(tmp=tmp, out=out, ref_out=ref_out, dead=dead, cv=cv, ref=ref, ref_pred=ref_pred, logs=logs,
               codes=[p.returncode for p in procs], exits=exits, hung=hung)
    remove_unless_failed(request, tmp, failed)  # three runs' checkpoints


def _metrics(path):
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_two_processes_train_like_one_process_with_eight_devices(runs):
    """Same samples in the same global positions with the same augmentation: epoch 0's loss to
    1e-5 (measured: equal to the last bit), the parameters after an epoch and a resumed
    epoch to the single-host device tests' bound, validation identical."""
    for log in runs["logs"]:  # stopped by SIGTERM (process 1's, agreed on by both), then resumed to the end
        _steps_done(log, "train", [128 + signal.SIGTERM, 0])
    first, second = (log.read_text() for log in runs["logs"])
    # 64 training records in global batches of 32: epoch 1 ends at step 2.
    assert f"stopped by SIGTERM after epoch 1: wrote {runs['out'] / 'checkpoints' / '2'}" in first, _tail(runs["logs"][0])
    assert "SIGTERM received" in second and "SIGTERM received" not in first
    rows, ref = _metrics(runs["out"] / "metrics.csv"), runs["ref"].history
    assert [int(r["epoch"]) for r in rows] == [0, 1]  # epoch 0 from the first command, 1 resumed
    assert rows[0]["train_loss"] == pytest.approx(ref[0]["train_loss"], rel=1e-5)
    for row, r in zip(rows, ref, strict=True):
        assert row["train_loss"] == pytest.approx(r["train_loss"], rel=2e-3)
        assert row["val_macro_f1"] == r["val_macro_f1"]
        assert row["val_accuracy"] == r["val_accuracy"]  # every validation record counted once
    assert _rel_diff(_leaves(runs["out"]), _leaves(runs["ref_out"])) < 1e-2
    for name in ("config.json", "metrics.csv", "curves.png", "best.msgpack"):
        assert (runs["out"] / name).stat().st_size > 0, name
    # Both processes took part in every Orbax save, process 0 wrote: the newest 2 of steps 1-4 are kept.
    assert sorted(os.listdir(runs["out"] / "checkpoints")) == ["3", "4"]
    # Process 0 reports and writes; process 1 says nothing of its own.
    assert "wrote to" in runs["logs"][0].read_text() and "wrote to" not in runs["logs"][1].read_text()


def test_predict_on_two_processes_writes_the_one_process_submission(runs, flowers):
    sets, _ = flowers
    for log in runs["logs"]:
        _steps_done(log, "predict", [0])
    ref_csv = (runs["tmp"] / "ref.csv").read_text()
    assert (runs["tmp"] / "jit.csv").read_text() == ref_csv
    assert [line.split(",")[0] for line in ref_csv.splitlines()[1:]] == sets["test"].ids  # file order, once
    np.testing.assert_allclose(np.load(runs["tmp"] / "jit.npy"), runs["ref_pred"].probs, rtol=0, atol=1e-5)


def test_folds_on_two_processes_are_the_one_process_folds_and_the_oof_rows_cover_every_record(runs, flowers):
    """`train --folds 2 --fold all` on 2 processes, stopped by a signal to one process in fold 0's
    last epoch and resumed: folds.csv is the assignment one process makes, each fold's OOF rows
    (process 0 writes what both predicted) hold its held-out records once, and cv.json's macro F1 is
    scikit-learn's on those rows."""
    from sklearn.metrics import f1_score

    from torch2flax.loaders import stratified_folds

    sets, _ = flowers
    for log in runs["logs"]:  # the plain run stopped and resumed, then the folds stopped and resumed
        _steps_done(log, "train", [128 + signal.SIGTERM, 0] * 2)
    cv = runs["cv"]
    first = runs["logs"][0].read_text()
    assert first.count(f"stopped by SIGTERM after epoch 1: wrote {cv / 'fold0'}") == 1, _tail(runs["logs"][0])
    assert f"continue with: torch2flax train --resume {cv}\n" in first  # the folder of every fold
    folds = stratified_folds(sets["train"].ids, sets["train"].labels, 2, seed=0)
    with open(cv / "folds.csv") as f:
        assert {r["id"]: int(r["fold"]) for r in csv.DictReader(f)} == dict(zip(sets["train"].ids, folds.tolist()))
    with open(cv / "oof.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["id"] for r in rows) == sorted(sets["train"].ids)  # every record once
    truth = dict(zip(sets["train"].ids, zip(sets["train"].labels, folds.tolist())))
    assert all((int(r["label"]), int(r["fold"])) == truth[r["id"]] for r in rows)
    report = json.loads((cv / "cv.json").read_text())
    assert report["done"] == [0, 1] and report["records"] == len(rows)
    assert report["oof_macro_f1"] == pytest.approx(
        f1_score([int(r["label"]) for r in rows], [int(r["pred"]) for r in rows], average="macro"), abs=1e-12)


def _loader(dataset, batch_size, process_index, process_count, train):
    from torch2flax.loaders import make_loader

    return make_loader(dataset, batch_size, train=train, num_devices=4,
                       num_workers=0, process_index=process_index, process_count=process_count)


def _dataset(files, train):
    from torch2flax.loaders import RecordTransform, TFRecordDataset, eval_transform, train_transform

    augment = train_transform(SIZE, scale=(0.5, 1.0)) if train else eval_transform(SIZE, crop_pct=1.0)
    return TFRecordDataset(files, {"image": "bytes", "class": "int", "id": "str"},
                           transform=RecordTransform(augment))


def test_process_slices_of_training_batches_are_the_one_process_batches(flowers):
    """Each process's slice of each global batch, put side by side, is the one-process batch:
    same records in the same places, same augmentation (seeded by the global index)."""
    sets, _ = flowers
    ds = _dataset(sets["train"].files, train=True)
    one = _loader(ds, 32, 0, 1, train=True)
    parts = [_loader(ds, 32, p, 2, train=True) for p in range(2)]
    assert len(one) == len(parts[0]) == len(parts[1]) == 2
    assert parts[0].local_batch_size == 16 and parts[0].batch_size == 32
    for epoch in (0, 1):
        for loader in (one, *parts):
            loader.set_epoch(epoch)
        for whole, *sliced in zip(one, *parts, strict=True):
            for key in ("id", "label", "image"):
                joined = np.concatenate([s[key].reshape(-1, *s[key].shape[2:]) for s in sliced])
                np.testing.assert_array_equal(joined, whole[key].reshape(joined.shape))


@pytest.mark.parametrize("num_records, batch_size, padded", [(56, 32, {1}), (37, 16, {0, 1})],
                         ids=["pad-one-host", "empty-slice"])
def test_evaluation_covers_every_record_once_across_processes(flowers, tmp_path, num_records, batch_size, padded):
    """Every record exactly once over both processes, with the same number of batches on each;
    56 = 32 + 24: only process 1 pads; 37 = 2 x 16 + 5: process 1's last slice is all padding."""
    sets = write_flower_tfrecords(tmp_path, num_records=num_records, num_shards=2, num_classes=NUM_CLASSES,
                                  size=16, seed=5)
    ds = _dataset(sets.files, train=False)
    seen, pads = [], set()
    batches = [list(_loader(ds, batch_size, p, 2, train=False)) for p in range(2)]
    assert len(batches[0]) == len(batches[1]) == -(-num_records // batch_size)
    for p, loader_batches in enumerate(batches):
        for batch in loader_batches:
            mask = batch["mask"].reshape(-1)
            assert mask.shape == (batch_size // 2,) and batch["image"].shape[:2] == (4, batch_size // 8)
            seen += list(batch["id"].reshape(-1)[mask])
            if not mask.all():
                pads.add(p)
    assert sorted(seen) == sorted(sets.ids) and len(seen) == num_records
    assert pads == padded


def test_a_dead_process_stops_the_other_and_the_last_checkpoint_resumes_on_one(flowers, runs):
    """Process 1 dies (SIGKILL) while process 0 resumes a copy of the epoch-1 run: process 0,
    waiting for it in a collective, exits with an error within the peer timeout. The copy's
    newest checkpoint loads, and resuming it in this process (1 x 8 devices: another process count)
    finishes the reference run. The copy's programs are the launch's, and the resumed epoch
    reuses the reference's compiled steps."""
    from torch2flax.train import TrainConfig, fit
    from torch2flax.train.checkpoint import load_checkpoint

    _, globs = flowers
    logs, (rc0, rc1), (exit0, _) = runs["logs"], runs["codes"], runs["exits"]
    assert not runs["hung"], f"{runs['hung']} still running after {LAUNCH_TIMEOUT} s:\n{_tail(logs[0])}"
    assert rc1 == -signal.SIGKILL, _tail(logs[1])
    (died,) = [float(line.split()[-1]) for line in logs[1].read_text().splitlines()
               if line.startswith("driver: killing myself at ")]
    waited = exit0 - died
    assert rc0 != 0, _tail(logs[0])
    assert waited < DEAD_PEER_BOUND, (waited, _tail(logs[0]))
    assert "another task died" in logs[0].read_text() or "unhealthy" in logs[0].read_text(), _tail(logs[0])
    out = runs["dead"]
    module, variables, saved = load_checkpoint(out)
    assert saved.epoch == 0 and saved.opt_state is not None and set(variables) == {"params", "batch_stats"}
    resumed = fit(TrainConfig(**_train_args(globs, out, num_devices=8)), resume=True, progress=False)
    last, ref = resumed.history[-1], runs["ref"].history[-1]
    assert last["epoch"] == 1 and last["val_macro_f1"] == ref["val_macro_f1"]
    assert last["train_loss"] == pytest.approx(ref["train_loss"], rel=2e-3)
    assert _rel_diff(_leaves(out), _leaves(runs["ref_out"])) < 1e-2


def test_launch_settings_come_from_arguments_or_the_environment(monkeypatch):
    from torch2flax.train import distributed

    for name in (distributed.ENV_DISTRIBUTED, distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                 distributed.ENV_PROCESS_ID, "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.requested() and distributed.initialize() is False  # a plain run stays single
    assert distributed.requested(coordinator="10.0.0.1:1234")
    monkeypatch.setenv(distributed.ENV_DISTRIBUTED, "1")
    assert distributed.requested()
    assert distributed.initialize(enabled=False) is False
    monkeypatch.delenv(distributed.ENV_DISTRIBUTED)
    with pytest.raises(ValueError, match="needs --num-processes and --process-id"):
        distributed.initialize("10.0.0.1:1234", num_processes=2)
    with pytest.raises(ValueError, match=r"process id 2 is outside \[0, 2\)"):
        distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=2)
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "10.0.0.1:1234")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="TORCH2FLAX_NUM_PROCESSES='two': expected an integer"):
        distributed.initialize()
