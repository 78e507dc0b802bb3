"""`fit`: fine-tune a converted timm model on TFRecord data, validating every epoch."""
from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import torch2flax
from torch2flax.errors import ConfigError, DataError, MissingFileError, UserError
from torch2flax.loaders import RecordTransform, TFRecordDataset, eval_transform, make_loader, train_transform
from torch2flax.loaders.loader import BAD_IMAGE, training_workers, usable_cpus, workers_for_cpus
from torch2flax.loaders.transforms import RECIPES, load_augment
from torch2flax.train import artifacts, cv, distributed
from torch2flax.train.checkpoint import (
    CHECKPOINTS,
    DataSpec,
    TrainCheckpoint,
    TrainingCheckpoints,
    load_checkpoint,
    resume_source,
    save_checkpoint,
)
from torch2flax.train.config import TrainConfig, dumps
from torch2flax.train.metrics import accuracy, macro_f1
from torch2flax.train.mix import MixSpec
from torch2flax.train.parallel import AXIS, Parallel, select_devices
from torch2flax.train.preemption import Every, Schedule, StopRequests, parse_duration
from torch2flax.train.state import create_train_state, learning_rate, make_optimizer
from torch2flax.train.steps import COMPUTE_DTYPES, StepSpec, eval_step, train_step

TRAIN_FEATURES = {"image": "bytes", "class": "int", "id": "str"}
# Above this share of the timed step time spent waiting for the next batch, say so (once per run).
DATA_WAIT_HINT = 0.10


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept. The run's settings (a
    learning rate too high for the model, no gradient clipping) or its data: a `UserError`."""


@dataclass
class FitResult:
    out: str
    best_macro_f1: float
    history: list[dict]
    files: list[str]
    images_per_sec: float
    reinitialized: tuple[str, ...] = field(default_factory=tuple)
    # Why the run ended before config.epochs: "SIGTERM", "SIGINT" or "time limit" (None: it did not).
    stopped: str | None = None
    exit_status: int = 0  # what the command line exits with (train.preemption.StopRequests)
    cv: dict | None = None  # a cross-validation run's report (train.cv.cv_report)
    folds: dict[int, FitResult] = field(default_factory=dict)  # its folds' results, those run in this call


def init_model(config: TrainConfig) -> tuple[Any, Any, tuple[str, ...]]:
    """The starting model of a run (`torch2flax.prepare_model` with the config's fields)."""
    result = torch2flax.prepare_model(
        config.model, num_classes=config.num_classes, init=config.init, pretrained=config.pretrained,
        checkpoint=config.checkpoint, head=config.head, drop_rate=config.drop_rate,
        drop_path_rate=config.drop_path_rate, backend=config.backend, image_size=config.image_size,
        seed=config.seed)
    return result.module, result.variables, result.reinitialized


def eval_crop_pct(config: TrainConfig, module: Any) -> float:
    return config.crop_pct if config.crop_pct is not None else float(module.pretrained_cfg["crop_pct"])


def _dataset(pattern: str) -> TFRecordDataset:
    # Multi-host: every process indexes every file but loads only its slice of each global
    # batch (make_loader), so N processes see the batches one process would.
    return TFRecordDataset(pattern, features=TRAIN_FEATURES)


def check_labels(dataset: TFRecordDataset, num_classes: int, key: str = "class") -> None:
    """Every label in `[0, num_classes)`, or a `DataError` naming the first bad record.

    Checked before training: a label out of range would train to the end with a NaN
    validation loss and a macro F1 over the wrong label space.
    """
    labels = np.asarray(dataset.column(key), dtype=np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{dataset.where(i)}: label {labels[i]} is outside [0, num_classes={num_classes}) "
                        f"({bad.size} of {len(labels)} records are; labels here span "
                        f"{labels.min()}..{labels.max()}: set num_classes to at least {labels.max() + 1})")


def check_labels_everywhere(dataset: TFRecordDataset, num_classes: int) -> None:
    """`check_labels` with each process reading its own part; every process stops if any fails."""
    part = dataset.shard(jax.process_index(), jax.process_count()) if jax.process_count() > 1 else dataset
    error = None
    try:
        check_labels(part, num_classes)
    except ValueError as e:
        error = e
    distributed.raise_if_any(error, "checking the labels")


def loader_workers(config: TrainConfig) -> tuple[int, str]:
    """Worker count for each of the two loaders, and why (`loaders.loader.training_workers`)."""
    return training_workers(config.num_workers, batch_size=config.batch_size, image_size=config.image_size,
                            process_count=jax.process_count())


@dataclass
class Folds:
    """The records a cross-validation run splits, and the fold of each (`train.cv`)."""

    dataset: TFRecordDataset
    ids: list[str]  # read once (each column reads every record): folds, folds.csv and OOF labels
    labels: np.ndarray
    assignment: np.ndarray

    @classmethod
    def index(cls, config: TrainConfig) -> Folds:
        dataset = _dataset(config.train)
        if len(dataset) == 0:
            raise DataError(f"the train split {config.train!r} holds no records (its files are empty)")
        ids, labels = dataset.column("id"), np.asarray(dataset.column("class"), dtype=np.int64)
        return cls(dataset, ids, labels, cv.fold_assignment(dataset, ids, labels, config.folds, config.fold_seed))

    def split(self, fold: int) -> dict[str, TFRecordDataset]:
        return {"train": self.dataset.subset(np.flatnonzero(self.assignment != fold)),
                "val": self.dataset.subset(np.flatnonzero(self.assignment == fold))}


def index_splits(config: TrainConfig, folds: Folds | None = None) -> dict[str, TFRecordDataset]:
    """The training and validation datasets, each indexed once, before any work starts (converting
    a model, a training epoch): an empty split is refused here. `build_loaders` gives them their
    transforms once the model has said how to crop. With `config.folds`, fold `config.fold` of
    `config.train` is the validation set."""
    if config.folds:
        return (folds or Folds.index(config)).split(int(config.fold))
    datasets = {}
    for split in ("train", "val"):
        pattern = getattr(config, split)
        datasets[split] = _dataset(pattern)
        if len(datasets[split]) == 0:
            raise DataError(f"the {split} split {pattern!r} holds no records (its files are empty)")
    return datasets


AUGMENT_COPY = "augment"  # out/augment.yaml or .json: the pipeline file a run trains with


def augment_source(config: TrainConfig) -> str | None:
    """The albumentations file `config.augment` names (None: a recipe or nothing): the run
    folder's copy once the run has one, so a resumed run trains with what it started with."""
    if config.augment is None or config.augment in RECIPES:
        return None
    copy = augment_copy(config)
    return copy if os.path.exists(copy) else config.augment


def augment_copy(config: TrainConfig) -> str:
    return os.path.join(config.out, AUGMENT_COPY + os.path.splitext(config.augment)[1])


def training_augmentation(config: TrainConfig) -> Any:
    """The training pipeline: crop, flips and the config's extras (and recipe), or the saved
    pipeline of `config.augment`, checked to produce `image_size` squares."""
    source = augment_source(config)
    if source is None:
        return train_transform(config.image_size, scale=(config.scale_min, 1.0), hflip=config.hflip,
                               color_jitter=config.color_jitter, recipe=config.augment)
    pipeline = load_augment(source)
    size = config.image_size
    probe = pipeline(image=np.full((2 * size + 7, 2 * size + 3, 3), 128, np.uint8))["image"]
    if probe.shape[:2] != (size, size):
        raise ConfigError(f"{source}: turns a {2 * size + 7}x{2 * size + 3} image into {probe.shape[0]}x"
                          f"{probe.shape[1]}; training needs {size}x{size} (end the pipeline with a crop or "
                          f"resize to image_size={size})")
    return pipeline


def build_loaders(config: TrainConfig, datasets: dict[str, TFRecordDataset], crop_pct: float, num_devices: int,
                  num_workers: int | None = None, augment: Any = None):
    train_ds, val_ds = datasets["train"], datasets["val"]
    train_ds.transform = RecordTransform(augment if augment is not None else training_augmentation(config))
    val_ds.transform = RecordTransform(eval_transform(config.image_size, crop_pct=crop_pct))
    for ds in (train_ds, val_ds):
        check_labels_everywhere(ds, config.num_classes)
    if num_workers is None:
        num_workers, _ = loader_workers(config)
    # make_loader slices per process itself
    common = dict(num_devices=num_devices, seed=config.seed, skip_bad_images=config.skip_bad_images)
    val_batches = -(-len(val_ds) // config.batch_size)  # more validation workers would never get a batch
    val_workers = min(num_workers, val_batches) if config.num_workers == "auto" else num_workers
    # make_loader refuses a training set smaller than one batch, naming both sizes.
    return (make_loader(train_ds, config.batch_size, train=True, num_workers=num_workers, **common),
            make_loader(val_ds, config.batch_size, train=False, num_workers=val_workers, **common))


@functools.lru_cache(maxsize=4)
def compiled_steps(par_key: tuple, spec: StepSpec) -> tuple[Callable, Callable]:
    """`(train_step, eval_step)` compiled for a layout, device set and step configuration.

    Memoised, so a second `fit` with the same model and hyper-parameters in one process (a
    notebook cell run again, a resumed run, the test suite) reuses the compiled programs
    instead of tracing and compiling them again.
    """
    par = Parallel(*par_key)
    step_args = dict(module=spec.module, mean=spec.mean, std=spec.std, num_classes=spec.num_classes,
                     dtype=spec.dtype, axis_name=par.axis_name)
    p_train = par.compile(functools.partial(train_step, label_smoothing=spec.label_smoothing,
                                            ema_decay=spec.ema_decay, mix=spec.mix, groups=spec.groups,
                                            **step_args), donate_state=True)
    return p_train, par.compile(functools.partial(eval_step, **step_args))


@dataclass
class Run:
    """What `setup` prepares for the epoch loop."""

    config: TrainConfig
    par: Parallel
    module: Any
    state: Any  # replicated TrainState
    train_loader: Any
    val_loader: Any
    p_train: Callable
    p_eval: Callable
    data: DataSpec
    paths: dict[str, str]
    start_epoch: int = 0
    start_batch: int = 0  # of start_epoch: a checkpoint written mid-epoch
    partial: dict[str, float] | None = None  # that epoch's training-metric sums so far
    best: float = -math.inf
    history: list[dict] = field(default_factory=list)
    reinitialized: tuple[str, ...] = ()
    checkpoints: TrainingCheckpoints | None = None  # out/checkpoints: what --resume reads
    data_hint_shown: bool = False
    position: tuple[int, int] = (0, 0)  # (epoch, batch) of the last checkpoint written


def setup(config: TrainConfig, *, resume: bool, folds: Folds | None = None,
          clock: Callable[[], float] = time.monotonic) -> Run:
    """Devices, model (fresh or resumed), loaders, optimiser, compiled steps (`clock`: the time
    limit's clock, which also times the checkpoint writes).

    Multi-host: process 0 writes the files (every process takes part in an Orbax save, which
    writes from process 0); every process reads the checkpoint it resumes from, so `config.out`
    must be on a filesystem they share.
    """
    datasets = index_splits(config, folds)
    augment = training_augmentation(config)  # a bad augment file fails before any model work
    num_workers, why = loader_workers(config)
    if distributed.is_main():
        # The run's first line: the worker count decides the input throughput on a big host.
        tqdm.write(f"data: {num_workers} loader workers ({why})"
                   + (f" on each of {jax.process_count()} processes" if jax.process_count() > 1 else ""))
    par = Parallel(config.parallel, select_devices(config.num_devices))
    if distributed.is_main():
        os.makedirs(config.out, exist_ok=True)
    paths = {name: os.path.join(config.out, name) for name in
             ("config.json", "metrics.csv", "curves.png", CHECKPOINTS, "best.msgpack", "bad_images.csv")}
    saved = source = None
    if resume:
        missing = None
        source = resume_source(config.out)
        if source is None:
            shared = (f" on process {jax.process_index()} (process 0 writes checkpoints: every process needs "
                      "the run folder on a shared filesystem)" if jax.process_count() > 1 else "")
            missing = MissingFileError(f"cannot resume: {paths[CHECKPOINTS]} holds no checkpoint "
                                       f"(nor is there an earlier version's last.msgpack){shared}")
        distributed.raise_if_any(missing, "finding the checkpoint to resume from")
        module, variables, saved = load_checkpoint(source)
        reinitialized: tuple[str, ...] = ()
    else:
        module, variables, reinitialized = init_model(config)
        if config.model is None:  # started from a file: record the model it holds
            from torch2flax.prepare import model_name

            config = replace(config, model=model_name(module))
        # Replicas must start equal: process 0's initialisation (a random head, say) wins.
        variables = distributed.broadcast_from_main(variables)
    data = DataSpec(config.image_size, eval_crop_pct(config, module))
    train_loader, val_loader = build_loaders(config, datasets, data.crop_pct, len(par.devices), num_workers, augment)
    no_decay = module.no_weight_decay()
    state = create_train_state(variables, make_optimizer(config, len(train_loader), no_decay),
                               seed=config.seed, ema=config.ema_decay > 0)
    run = Run(config, par, module, state, train_loader, val_loader, *build_steps(config, par, module),
              data=data, paths=paths, reinitialized=reinitialized)
    if saved is not None:
        run.state = saved.restore(state, source)
        run.start_epoch, run.best = saved.epoch + 1, saved.best_macro_f1
        run.start_batch, run.partial = saved.batch, saved.partial
        if os.path.exists(paths["metrics.csv"]):
            run.history = [r for r in artifacts.read_metrics_csv(paths["metrics.csv"])
                           if r["epoch"] < run.start_epoch]
    run.state = par.replicate(run.state)
    if distributed.is_main():
        artifacts.atomic_write(paths["config.json"], dumps(config))
        augment_file = augment_source(config)
        if augment_file is not None and augment_file != augment_copy(config):
            with open(augment_file, "rb") as f:  # the pipeline trained with, beside the config that names it
                artifacts.atomic_write(augment_copy(config), f.read())
    if not resume and distributed.is_main() and os.path.isdir(paths[CHECKPOINTS]):
        # A new run in an old run's folder: its steps would stand beside (and above) this run's.
        import shutil

        shutil.rmtree(paths[CHECKPOINTS])
        tqdm.write(f"new run in {config.out}: removed the earlier run's {paths[CHECKPOINTS]} (--resume continues a run)")
    distributed.barrier("torch2flax: run folder ready")
    run.checkpoints = TrainingCheckpoints(paths[CHECKPOINTS], keep=config.keep_checkpoints,
                                          asynchronous=config.async_checkpoints,
                                          measure_write=config.time_limit is not None, clock=clock)
    return run


def build_steps(config: TrainConfig, par: Parallel, module: Any) -> tuple[Callable, Callable]:
    """`(train_step, eval_step)` of `config` for `par` (what `fit` runs; `tpu_check` compiles the same)."""
    dtype = COMPUTE_DTYPES[config.dtype]
    sync = AXIS if (par.layout == "pmap" and config.sync_bn) else None
    cfg = module.pretrained_cfg
    mix = MixSpec(config.mixup, config.cutmix, config.mix_prob, config.switch_prob)
    spec = StepSpec(module.clone(dtype=dtype, axis_name=sync), tuple(cfg["mean"]), tuple(cfg["std"]),
                    config.num_classes, dtype, config.label_smoothing, config.ema_decay, mix,
                    groups=len(par.global_devices) if par.layout == "jit" else 1)
    return compiled_steps((par.layout, tuple(par.devices)), spec)


def host_batches(loader: Iterable[dict], bad: list[str]) -> Iterator[dict]:
    """The loader's batches; rows standing in for an image that did not decode (`skip_bad_images`)
    have their errors appended to `bad` and, in evaluation batches, are masked out."""
    for batch in loader:
        flags = batch.get(BAD_IMAGE)
        if flags is not None:
            flags = np.asarray(flags)
            real = np.asarray(batch["mask"]) if "mask" in batch else np.ones(flags.shape, bool)
            bad.extend(str(m) for m in flags[real & (flags != "")])
            if "mask" in batch:
                batch = {**batch, "mask": real & (flags == "")}
        yield batch


def evaluate(par: Parallel, p_eval, state, loader, bad: list[str] | None = None) -> dict[str, float]:
    totals = None
    for batch in par.feed(host_batches(loader, [] if bad is None else bad)):
        sums = p_eval(state, {k: batch[k] for k in ("image", "label", "mask")})
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    totals = par.unreplicate(totals)
    return {"val_loss": float(totals["loss_sum"]) / max(int(totals["count"]), 1),
            "val_accuracy": accuracy(totals["confusion"]),
            "val_macro_f1": macro_f1(totals["confusion"]),
            "val_count": int(totals["count"])}


class EpochMeter:
    """Running training metrics, throughput and the share of time spent waiting for data.

    The first step of a call is left out of the timing: it includes compilation.
    """

    def __init__(self, batch_size: int, partial: dict[str, float] | None = None):
        self.batch_size = batch_size
        self.loss_sum = self.acc_sum = 0.0
        self.steps = self.timed_images = 0
        self.timed_start: float | None = None
        self.waited = 0.0
        self.bad: list[str] = []  # errors of the images skipped this epoch (skip_bad_images)
        if partial:  # an epoch resumed mid-way: its steps before the checkpoint count too
            self.loss_sum, self.acc_sum, self.steps = partial["loss_sum"], partial["acc_sum"], int(partial["steps"])
            self.bad = list(partial.get("bad", []))
        self._first = self.steps

    def partial(self) -> dict[str, Any]:
        """The sums a mid-epoch checkpoint keeps (`TrainCheckpoint.partial`)."""
        return {"loss_sum": self.loss_sum, "acc_sum": self.acc_sum, "steps": self.steps, "bad": list(self.bad)}

    def wait(self, seconds: float) -> None:
        if self.timed_start is not None:
            self.waited += seconds

    def update(self, loss: float, acc: float) -> None:
        self.loss_sum, self.acc_sum, self.steps = self.loss_sum + loss, self.acc_sum + acc, self.steps + 1
        if self.steps == self._first + 1:
            self.timed_start = time.perf_counter()
        else:
            self.timed_images += self.batch_size

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)

    @property
    def accuracy(self) -> float:
        return self.acc_sum / max(self.steps, 1)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.timed_start if self.timed_start is not None else 0.0

    @property
    def images_per_sec(self) -> float:
        return self.timed_images / self.elapsed if self.timed_images else 0.0

    @property
    def data_wait(self) -> float:
        """Fraction of the timed wall time the loop spent blocked on the input pipeline."""
        return self.waited / self.elapsed if self.timed_images else 0.0


def train_epoch(par: Parallel, p_train, state, loader, *, epoch: int, batch_size: int,
                bar: tqdm, checkpoints: TrainingCheckpoints | None = None, meter: EpochMeter | None = None,
                control: Control | None = None) -> tuple[Any, EpochMeter, bool]:
    """One pass over `loader` from its start batch; metrics of step t are read while step t+1 runs
    (async dispatch). After every step but the epoch's last, `control.decide(batches_done)` says
    whether to checkpoint ("save") or to checkpoint and stop ("stop"); then that step's metrics
    are counted first and `control.save(batches_done, state, meter)` writes the checkpoint.
    Returns `(state, meter, stopped)`."""
    meter = meter or EpochMeter(batch_size)
    done, total = loader.sampler.start_batch, len(loader)

    def collect(at_step: int, metrics: Any) -> None:
        metrics = par.unreplicate(metrics)
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            last = checkpoints.latest() if checkpoints is not None else None
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise NonFiniteLossError(f"loss is {loss} at step {at_step} (epoch {epoch + 1}); "
                                     f"training stopped, {kept}: lower --lr (or raise --warmup-epochs, keep "
                                     "--grad-clip on) and check the data")
        meter.update(loss, float(metrics["accuracy"]))
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{meter.images_per_sec:.0f}")
        bar.update(1)

    pending = None
    batches = par.feed(host_batches(loader, meter.bad))
    while True:
        waited = time.perf_counter()
        batch = next(batches, None)
        meter.wait(time.perf_counter() - waited)
        if batch is None:
            break
        state, metrics = p_train(state, {"image": batch["image"], "label": batch["label"]})
        done += 1
        if pending is not None:
            collect(*pending)
        pending = (epoch * total + done, metrics)
        action = control.decide(done) if control is not None and done < total else None
        if action:
            collect(*pending)  # the checkpoint's metric sums include this step
            pending = None
            control.save(done, state, meter)
            if action == "stop":
                return state, meter, True
    if pending is not None:
        collect(*pending)
    return state, meter, False


def data_wait_hint(row: dict[str, float], num_workers: int, cpus: int | None = None) -> str | None:
    """One line of advice when an epoch waited for input more than DATA_WAIT_HINT of its step time."""
    if row["data_wait"] <= DATA_WAIT_HINT:
        return None
    cpus = usable_cpus() if cpus is None else cpus
    head = (f"data: training waited for input {row['data_wait']:.0%} of step time at "
            f"{row['images_per_sec']:.0f} img/s with {num_workers} loader workers: ")
    if num_workers < workers_for_cpus(cpus):
        return head + (f"raise --num-workers (this host has {cpus} usable CPUs) "
                       "or lower the augmentation cost")
    return head + (f"the workers already use this host's {cpus} usable CPUs: lower the augmentation "
                   "cost (smaller source images, reduce_decode, fewer transforms) or use more cores")


def save_checkpoints(run: Run, state: Any, epoch: int, improved: bool, *, batch: int = 0,
                     partial: dict[str, Any] | None = None) -> None:
    """The training checkpoint (`out/checkpoints/<step>`, model + training state) every epoch,
    and `best.msgpack` when F1 improved. Every process calls this (Orbax's save is collective).

    Only the model variables and the data spec matter for `best`: the EMA weights when the
    run keeps an EMA, as those are the ones evaluated. Mid-epoch (`batch` > 0, `epoch` the last
    finished one) only the training checkpoint is written, with the loader position and metric sums.
    """
    host = run.par.unreplicate(state)
    common = dict(epoch=epoch, best_macro_f1=run.best, data=run.data, config=run.config.to_dict())
    if improved and distributed.is_main():
        eval_params = host.ema_params if host.ema_params is not None else host.params
        save_checkpoint(run.paths["best.msgpack"], run.module,
                        {"params": eval_params, "batch_stats": host.batch_stats},
                        TrainCheckpoint(step=int(host.step), **common))
    run.checkpoints.save(run.module, {"params": host.params, "batch_stats": host.batch_stats},
                         TrainCheckpoint.from_state(host, batch=batch, partial=partial, **common))


# Multi-process runs agree on a stop, or on a checkpoint due by the clock, every SYNC_STEPS steps
# (a host collective every step would stall the asynchronous dispatch); cadences in steps need no
# agreement. A stop's reason travels as its index here (the largest wins).
SYNC_STEPS = 10
_REASONS = (None, "time limit", "SIGINT", "SIGTERM")


def agree(stop: StopRequests, timed_save: bool = False) -> bool:
    """Every process's stop request and clock-due checkpoint, combined; returns whether to save.
    Adopts another process's stop reason (single process: nothing to combine)."""
    if jax.process_count() == 1:
        return timed_save
    from jax.experimental import multihost_utils

    mine = np.int32([_REASONS.index(stop.reason) if stop.reason in _REASONS else 0, timed_save])
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 2)
    reason = _REASONS[int(every[:, 0].max())]
    if reason is not None and stop.reason is None:
        stop.adopt(reason)
    return bool(every[:, 1].any())


class Control:
    """`train_epoch`'s hooks for one epoch: checkpoint cadence, stop requests and time limit."""

    def __init__(self, run: Run, epoch: int, stop: StopRequests, schedule: Schedule):
        self.run, self.epoch, self.stop, self.schedule = run, epoch, stop, schedule
        self.total = len(run.train_loader)

    def decide(self, done: int) -> str | None:
        """After batch `done` of this epoch: "stop", "save" or None."""
        schedule = self.schedule
        schedule.step_done()
        step = self.epoch * self.total + done
        by_steps = schedule.every is not None and schedule.every.steps is not None
        save = by_steps and schedule.save_due(step)  # the same step on every process: no agreement needed
        if jax.process_count() > 1 and step % SYNC_STEPS:
            return "save" if save else None
        if schedule.out_of_time():
            self.stop.request("time limit")
        save = agree(self.stop, not by_steps and schedule.save_due(step)) or save
        if self.stop.requested:
            return "stop"
        return "save" if save else None

    def save(self, done: int, state: Any, meter: EpochMeter) -> None:
        started = self.schedule.clock()
        save_checkpoints(self.run, state, self.epoch - 1, False, batch=done, partial=meter.partial())
        # A stop waits for the write to finish: the time limit's margin counts all of it.
        self.schedule.saved(max(self.schedule.clock() - started, self.run.checkpoints.write_seconds))
        self.run.position = (self.epoch, done)


def write_bad_images(run: Run, epoch: int, train_bad: list[str], val_bad: list[str]) -> int:
    """Append this epoch's skipped images (every process's) to bad_images.csv; returns their count."""
    rows = {"split": np.array(["train"] * len(train_bad) + ["val"] * len(val_bad), dtype=str),
            "error": np.array(train_bad + val_bad, dtype=str)}
    if run.config.skip_bad_images:
        rows = distributed.gather_rows(rows)
    count = len(rows["error"])
    if count and distributed.is_main():
        artifacts.append_bad_images_csv(run.paths["bad_images.csv"], epoch,
                                        list(zip(rows["split"].tolist(), rows["error"].tolist())))
    return count


def run_epoch(run: Run, epoch: int, *, progress: bool, stop: StopRequests | None = None,
              schedule: Schedule | None = None) -> dict[str, float] | None:
    """Train one epoch (from the resume position), evaluate, checkpoint, log; returns the
    `metrics.csv` row, or None when a stop request ended the epoch early (checkpoint written)."""
    config, steps_per_epoch = run.config, len(run.train_loader)
    resumed = epoch == run.start_epoch
    start = run.start_batch if resumed else 0
    run.train_loader.set_epoch(epoch, start)
    bar = tqdm(total=steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step",
               disable=not progress, dynamic_ncols=True)
    epoch_start = time.perf_counter()
    control = Control(run, epoch, stop, schedule) if stop is not None and schedule is not None else None
    run.state, meter, stopped = train_epoch(
        run.par, run.p_train, run.state, run.train_loader, epoch=epoch, batch_size=config.batch_size, bar=bar,
        checkpoints=run.checkpoints, meter=EpochMeter(config.batch_size, run.partial if resumed else None),
        control=control)
    bar.close()
    if stopped:
        return None
    val_bad: list[str] = []
    val = evaluate(run.par, run.p_eval, run.state, run.val_loader, val_bad)
    step = int(run.par.unreplicate(run.state.step))
    row = {"epoch": epoch, "step": step, "lr": learning_rate(step, config, steps_per_epoch),
           "train_loss": meter.loss, "train_accuracy": meter.accuracy, "val_loss": val["val_loss"],
           "val_accuracy": val["val_accuracy"], "val_macro_f1": val["val_macro_f1"],
           "images_per_sec": meter.images_per_sec, "data_wait": meter.data_wait,
           "epoch_seconds": time.perf_counter() - epoch_start,
           "bad_images": write_bad_images(run, epoch, meter.bad, val_bad)}
    improved = val["val_macro_f1"] > run.best
    run.best = max(run.best, val["val_macro_f1"])
    run.history.append(row)
    saving = schedule.clock() if schedule is not None else 0.0
    save_checkpoints(run, run.state, epoch, improved)
    if distributed.is_main():
        artifacts.write_metrics_csv(run.paths["metrics.csv"], run.history)
        artifacts.plot_curves(run.paths["curves.png"], run.history)
    # Every process leaves the epoch knowing its files are written (a resume reads them).
    distributed.barrier(f"torch2flax: epoch {epoch} written")
    run.position = (epoch + 1, 0)
    if schedule is not None:
        schedule.saved(max(schedule.clock() - saving, run.checkpoints.write_seconds))
        schedule.resumed_batches()
    hint = None if run.data_hint_shown or not distributed.is_main() else data_wait_hint(
        row, run.train_loader.num_workers)
    if hint:
        run.data_hint_shown = True
        tqdm.write(hint)
    if progress:
        skipped = f"; skipped {row['bad_images']} images that do not decode" if row["bad_images"] else ""
        tqdm.write(f"epoch {epoch + 1}/{config.epochs}: train loss {row['train_loss']:.4f}, "
                   f"val loss {val['val_loss']:.4f}, val acc {val['val_accuracy']:.4f}, "
                   f"val macro F1 {val['val_macro_f1']:.4f} ({val['val_count']} images)"
                   + (" *best*" if improved else "") + skipped)
    return row


def stop_line(run: Run, reason: str) -> str:
    """What a stopped run prints: why, where, what was written, how to continue."""
    epoch, batch = run.position
    total = len(run.train_loader)
    where = (f"after epoch {epoch}" if batch == 0 else
             f"at step {epoch * total + batch} (epoch {epoch + 1}, batch {batch} of {total})")
    # A fold's run resumes through its cross-validation folder: the stopped fold, then the rest.
    out = os.path.dirname(os.path.normpath(run.config.out)) if run.config.folds else run.config.out
    return (f"stopped by {reason} {where}: wrote {run.checkpoints.latest()}; "
            f"continue with: torch2flax train --resume {out}")


def fit(config: TrainConfig, *, resume: bool = False, stop_after_epochs: int | None = None,
        progress: bool = True) -> FitResult:
    """Train up to `config.epochs` epochs, continuing from the newest checkpoint in
    `config.out/checkpoints` when `resume` (from the step it was written at, even mid-epoch: the
    same batches and augmentation follow; a run folder of an earlier version resumes from its
    `last.msgpack`).

    `stop_after_epochs` ends this call early (the schedule still spans `config.epochs`).
    `config.checkpoint_every` also checkpoints within epochs; `config.time_limit` ends the call
    with a checkpoint before that much time has passed since it started. SIGTERM and SIGINT
    (Ctrl-C, a notebook's interrupt button) finish the current step, write a checkpoint and
    return (`FitResult.stopped` says why); a second SIGINT raises KeyboardInterrupt at once.

    `config.folds = K`: k-fold cross-validation (`train.cv`): each fold of `config.fold` ("all":
    0..K-1 in turn) trains in `config.out/fold{I}` with fold I of `config.train` as validation,
    then writes its out-of-fold predictions; `config.out/oof.csv` and `cv.json` gather them.
    With `resume`, finished folds are skipped and an unfinished one continues.

    Multi-host: every process calls `fit` with the same config (`distributed.initialize` first,
    or the `TORCH2FLAX_*` environment variables it reads); `config.batch_size` is the global
    batch; progress and files come from process 0; the processes stop at the same step.
    """
    if config.folds:
        return fit_folds(config, resume=resume, stop_after_epochs=stop_after_epochs, progress=progress)
    return fit_run(config, resume=resume, stop_after_epochs=stop_after_epochs, progress=progress)


def fit_folds(config: TrainConfig, *, resume: bool = False, stop_after_epochs: int | None = None,
              progress: bool = True) -> FitResult:
    """`fit` for `config.folds` (see there)."""
    distributed.initialize()
    folds = Folds.index(config)
    if distributed.is_main():
        os.makedirs(config.out, exist_ok=True)
        artifacts.atomic_write(os.path.join(config.out, "config.json"), dumps(config))
        artifacts.atomic_write(os.path.join(config.out, cv.FOLDS),
                               cv.folds_csv(folds.ids, folds.labels, folds.assignment))
    results: dict[int, FitResult] = {}
    last: FitResult | None = None
    for k in config.fold_numbers():
        run_config = replace(config, fold=k, out=cv.fold_dir(config.out, k))
        oof = os.path.join(run_config.out, cv.OOF)
        if resume and os.path.exists(oof):
            if distributed.is_main() and progress:
                tqdm.write(f"fold {k}: finished earlier ({oof})")
            continue
        if distributed.is_main() and progress:
            tqdm.write(f"fold {k} of {config.folds}: training in {run_config.out}")
        last = results[k] = fit_run(run_config, resume=resume and resume_source(run_config.out) is not None,
                                    stop_after_epochs=stop_after_epochs, progress=progress, folds=folds)
        if last.stopped or not last.history or last.history[-1]["epoch"] < config.epochs - 1:
            break  # stopped, or `stop_after_epochs` ended this call: no OOF rows from an unfinished fold
        write_oof(run_config, folds, k, progress=progress)
    report = cv.write_cv(config.out, config.folds) if distributed.is_main() else None
    distributed.barrier("torch2flax: cv written")  # the others read what process 0 wrote
    report = report if report is not None else cv.cv_report(config.out, config.folds)
    if distributed.is_main() and progress:
        tqdm.write(cv.summary(report))
    files = [os.path.join(config.out, name) for name in ("config.json", cv.FOLDS, cv.OOF, cv.CV)]
    return FitResult(out=config.out, best_macro_f1=report.get("oof_macro_f1", -math.inf), history=[],
                     files=[f for f in files if os.path.exists(f)],
                     images_per_sec=last.images_per_sec if last else 0.0,
                     reinitialized=last.reinitialized if last else (), stopped=last.stopped if last else None,
                     exit_status=last.exit_status if last else 0, cv=report, folds=results)


def write_oof(config: TrainConfig, folds: Folds, fold: int, *, progress: bool) -> str:
    """Fold `fold`'s held-out records predicted by its best checkpoint: `config.out/oof.csv`."""
    from torch2flax.train.inference import predict_dataset

    held_out = folds.split(fold)["val"]
    labels = folds.labels[folds.assignment == fold]  # the held-out records, in the same order
    ids, probs = predict_dataset(os.path.join(config.out, "best.msgpack"), held_out, tta=config.tta,
                                 batch_size=config.batch_size, num_workers=config.num_workers,
                                 parallel=config.parallel, num_devices=config.num_devices, dtype=config.dtype,
                                 progress=progress, source=f"fold {fold}")
    path = os.path.join(config.out, cv.OOF)
    if distributed.is_main():
        artifacts.atomic_write(path, cv.oof_csv(ids, fold, labels, probs))
    return path


def fit_run(config: TrainConfig, *, resume: bool = False, stop_after_epochs: int | None = None,
            progress: bool = True, folds: Folds | None = None) -> FitResult:
    """One training run (`fit` without folds; one fold of a cross-validation run)."""
    distributed.initialize()
    progress = progress and distributed.is_main()
    with StopRequests() as stop:
        schedule = Schedule(Every.parse(config.checkpoint_every) if config.checkpoint_every else None,
                            parse_duration(config.time_limit) if config.time_limit else None)
        run = setup(config, resume=resume, folds=folds, clock=schedule.clock)
        run.position = (run.start_epoch, run.start_batch)
        end = config.epochs if stop_after_epochs is None else min(config.epochs, run.start_epoch + stop_after_epochs)
        images_per_sec = 0.0
        try:
            for epoch in range(run.start_epoch, end):
                row = run_epoch(run, epoch, progress=progress, stop=stop, schedule=schedule)
                if row is None:
                    break
                images_per_sec = row["images_per_sec"] or images_per_sec
                if epoch + 1 < end and schedule.out_of_time():
                    stop.request("time limit")
                # After the last epoch too: a signal one process got in it is every process's, so
                # all return the same `stopped` (fit_folds then skips the same OOF step everywhere).
                agree(stop)
                if stop.requested:
                    break
        finally:
            run.checkpoints.close()  # the save in flight is committed (or its error raised) here
    if stop.requested and distributed.is_main():
        print(stop_line(run, stop.reason), flush=True)
    files = [run.checkpoints.latest() if name == CHECKPOINTS else p  # the one a resume reads
             for name, p in run.paths.items() if os.path.exists(p)]
    return FitResult(out=config.out, best_macro_f1=run.best, history=run.history, files=files,
                     images_per_sec=images_per_sec, reinitialized=run.reinitialized, stopped=stop.reason,
                     exit_status=stop.exit_status)
