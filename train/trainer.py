"""`fit`: fine-tune a converted timm model on TFRecord data, validating every epoch.

`fit` is four phases: `setup` (data indexed, model made or resumed, loaders, optimiser, compiled
steps), the epochs (`run_epoch`: `loop.train_epoch`, `loop.evaluate`, checkpoints, metrics), the
stop agreement (`preemption`), and the result. Its neighbours: `data` (splits, augmentation,
loaders), `loop` (one pass, its metrics), `preemption` (signals, time limit, cadence), `cv` (folds),
`bad_images` (images that do not decode).
"""
from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import jax
from tqdm.auto import tqdm

import torch2flax
from torch2flax import io
from torch2flax.errors import MissingFileError
from torch2flax.train import artifacts, bad_images, compile_cache, data, distributed
from torch2flax.train.checkpoint import (
    CHECKPOINTS,
    DataSpec,
    TrainCheckpoint,
    TrainingCheckpoints,
    load_checkpoint,
    resume_source,
    save_checkpoint,
)
from torch2flax.train.config import TrainConfig, config_kwargs, dumps
from torch2flax.train.loop import EpochMeter, evaluate, train_epoch
from torch2flax.train.mix import MixSpec
from torch2flax.train.parallel import AXIS, Parallel, select_devices
from torch2flax.train.preemption import (
    Control,
    Every,
    Schedule,
    StopReason,
    StopRequests,
    agree,
    parse_duration,
)
from torch2flax.train.result import FitResult
from torch2flax.train.state import create_train_state, learning_rate, make_optimizer
from torch2flax.train.steps import COMPUTE_DTYPES, StepSpec, eval_step, train_step


def init_model(config: TrainConfig) -> tuple[Any, Any, tuple[str, ...]]:
    """The starting model of a run: `torch2flax.prepare_model` with every config field it takes."""
    result = torch2flax.prepare_model(config.model, **config_kwargs(torch2flax.prepare_model, config))
    return result.module, result.variables, result.reinitialized


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


@dataclass(frozen=True)
class Run:
    """What `setup` prepares for the epochs; fixed for the run (what changes is in `Progress`)."""

    config: TrainConfig
    par: Parallel
    module: Any
    train_loader: Any
    val_loader: Any
    p_train: Callable
    p_eval: Callable
    data: DataSpec
    paths: dict[str, str]
    checkpoints: TrainingCheckpoints  # out/checkpoints: what --resume reads
    reinitialized: tuple[str, ...] = ()
    start_epoch: int = 0
    start_batch: int = 0  # of start_epoch: a checkpoint written mid-epoch
    partial: dict[str, float] | None = None  # that epoch's training-metric sums so far


@dataclass
class Progress:
    """What changes as a run trains."""

    state: Any  # the replicated TrainState
    best: float = -math.inf
    history: list[dict] = field(default_factory=list)
    position: tuple[int, int] = (0, 0)  # (epoch, batch) of the last checkpoint written
    hint_shown: bool = False  # data_wait_hint is said once


def setup(config: TrainConfig, *, resume: bool, folds: Any = None,
          clock: Callable[[], float] = time.monotonic) -> tuple[Run, Progress]:
    """Devices, model (fresh or resumed), loaders, optimiser, compiled steps (`clock`: the time
    limit's clock, which also times the checkpoint writes).

    Multi-host: process 0 writes the files (every process takes part in an Orbax save, which
    writes from process 0); every process reads the checkpoint it resumes from, so `config.out`
    must be on a filesystem they share.
    """
    datasets = data.index_splits(config, folds)
    augment = data.training_augmentation(config)  # a bad augment file fails before any model work
    num_workers, why = data.loader_workers(config)
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
            missing = MissingFileError(f"cannot resume: {paths[CHECKPOINTS]} holds no checkpoint{shared}")
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
    spec = DataSpec(config.image_size, data.eval_crop_pct(config, module))
    train_loader, val_loader = data.build_loaders(config, datasets, spec.crop_pct, len(par.devices), num_workers,
                                                  augment)
    state = create_train_state(variables, make_optimizer(config, len(train_loader), module.no_weight_decay()),
                               seed=config.seed, ema=config.ema_decay > 0)
    progress = Progress(state)
    start: dict[str, Any] = {}
    if saved is not None:
        progress.state = saved.restore(state, source)
        progress.best = saved.best_macro_f1
        start = dict(start_epoch=saved.epoch + 1, start_batch=saved.batch, partial=saved.partial)
        if os.path.exists(paths["metrics.csv"]):
            progress.history = [r for r in artifacts.read_metrics_csv(paths["metrics.csv"])
                                if r["epoch"] < start["start_epoch"]]
    progress.state = par.replicate(progress.state)
    if distributed.is_main():
        artifacts.atomic_write(paths["config.json"], dumps(config))
        augment_file = data.augment_source(config)
        if augment_file is not None and augment_file != data.augment_copy(config):
            with open(augment_file, "rb") as f:  # the pipeline trained with, beside the config that names it
                artifacts.atomic_write(data.augment_copy(config), f.read())
    if not resume and distributed.is_main() and os.path.isdir(paths[CHECKPOINTS]):
        # A new run in an old run's folder: its steps would stand beside (and above) this run's.
        import shutil

        shutil.rmtree(paths[CHECKPOINTS])
        tqdm.write(f"new run in {config.out}: removed the earlier run's {paths[CHECKPOINTS]} (--resume continues a run)")
    distributed.barrier("torch2flax: run folder ready")
    checkpoints = TrainingCheckpoints(paths[CHECKPOINTS], keep=config.keep_checkpoints,
                                      asynchronous=config.async_checkpoints,
                                      measure_write=config.time_limit is not None, clock=clock)
    run = Run(config, par, module, train_loader, val_loader, *build_steps(config, par, module), data=spec,
              paths=paths, checkpoints=checkpoints, reinitialized=reinitialized, **start)
    progress.position = (run.start_epoch, run.start_batch)
    return run, progress


def save_checkpoints(run: Run, state: Any, best: float, epoch: int, improved: bool, *, batch: int = 0,
                     partial: dict[str, Any] | None = None) -> None:
    """The training checkpoint (`out/checkpoints/<step>`, model + training state) every epoch,
    and `best.msgpack` when F1 improved. Every process calls this (Orbax's save is collective).

    Only the model variables and the data spec matter for `best`: the EMA weights when the
    run keeps an EMA, as those are the ones evaluated. Mid-epoch (`batch` > 0, `epoch` the last
    finished one) only the training checkpoint is written, with the loader position and metric sums.
    """
    host = run.par.unreplicate(state)
    common = dict(epoch=epoch, best_macro_f1=best, data=run.data, config=run.config.to_dict())
    if improved and distributed.is_main():
        eval_params = host.ema_params if host.ema_params is not None else host.params
        save_checkpoint(run.paths["best.msgpack"], run.module,
                        {"params": eval_params, "batch_stats": host.batch_stats},
                        TrainCheckpoint(step=int(host.step), **common))
    run.checkpoints.save(run.module, {"params": host.params, "batch_stats": host.batch_stats},
                         TrainCheckpoint.from_state(host, batch=batch, partial=partial, **common))


def run_epoch(run: Run, progress: Progress, epoch: int, *, show: bool, stop: StopRequests | None = None,
              schedule: Schedule | None = None) -> dict[str, float] | None:
    """Train one epoch (from the resume position), evaluate, checkpoint, log; returns the
    `metrics.csv` row, or None when a stop request ended the epoch early (checkpoint written)."""
    config, steps_per_epoch = run.config, len(run.train_loader)
    resumed = epoch == run.start_epoch
    start = run.start_batch if resumed else 0
    run.train_loader.set_epoch(epoch, start)
    bar = tqdm(total=steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step",
               disable=not show, dynamic_ncols=True)
    epoch_start = time.perf_counter()

    def save_mid_epoch(done: int, state: Any, meter: EpochMeter) -> float:
        save_checkpoints(run, state, progress.best, epoch - 1, False, batch=done, partial=meter.partial())
        progress.position = (epoch, done)
        return run.checkpoints.write_seconds

    control = (Control(epoch, steps_per_epoch, stop, schedule, save_mid_epoch)
               if stop is not None and schedule is not None else None)
    progress.state, meter, stopped = train_epoch(
        run.par, run.p_train, progress.state, run.train_loader, epoch=epoch, batch_size=config.batch_size,
        bar=bar, checkpoints=run.checkpoints, meter=EpochMeter(config.batch_size, run.partial if resumed else None),
        control=control)
    bar.close()
    if stopped:
        return None
    val_bad: list[str] = []
    val = evaluate(run.par, run.p_eval, progress.state, run.val_loader, val_bad)
    step = int(run.par.unreplicate(progress.state.step))
    row = {"epoch": epoch, "step": step, "lr": learning_rate(step, config, steps_per_epoch),
           "train_loss": meter.loss, "train_accuracy": meter.accuracy, "val_loss": val["val_loss"],
           "val_accuracy": val["val_accuracy"], "val_macro_f1": val["val_macro_f1"],
           "images_per_sec": meter.images_per_sec, "data_wait": meter.data_wait,
           "epoch_seconds": time.perf_counter() - epoch_start,
           "bad_images": bad_images.write_bad_images(run.paths["bad_images.csv"], epoch, meter.bad, val_bad,
                                                     gather=config.skip_bad_images)}
    improved = val["val_macro_f1"] > progress.best
    progress.best = max(progress.best, val["val_macro_f1"])
    progress.history.append(row)
    saving = schedule.clock() if schedule is not None else 0.0
    save_checkpoints(run, progress.state, progress.best, epoch, improved)
    if distributed.is_main():
        artifacts.write_metrics_csv(run.paths["metrics.csv"], progress.history)
        artifacts.plot_curves(run.paths["curves.png"], progress.history)
    # Every process leaves the epoch knowing its files are written (a resume reads them).
    distributed.barrier(f"torch2flax: epoch {epoch} written")
    progress.position = (epoch + 1, 0)
    if schedule is not None:
        schedule.saved(max(schedule.clock() - saving, run.checkpoints.write_seconds))
        schedule.resumed_batches()
    hint = None if progress.hint_shown or not distributed.is_main() else data.data_wait_hint(
        row, run.train_loader.num_workers)
    if hint:
        progress.hint_shown = True
        tqdm.write(hint)
    if show:
        skipped = f"; skipped {row['bad_images']} images that do not decode" if row["bad_images"] else ""
        tqdm.write(f"epoch {epoch + 1}/{config.epochs}: train loss {row['train_loss']:.4f}, "
                   f"val loss {val['val_loss']:.4f}, val acc {val['val_accuracy']:.4f}, "
                   f"val macro F1 {val['val_macro_f1']:.4f} ({val['val_count']} images)"
                   + (" *best*" if improved else "") + skipped)
    return row


def stop_line(run: Run, progress: Progress, reason: StopReason) -> str:
    """What a stopped run prints: why, where, what was written, how to continue."""
    epoch, batch = progress.position
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
    same batches and augmentation follow).

    `stop_after_epochs` ends this call early (the schedule still spans `config.epochs`).
    `config.checkpoint_every` also checkpoints within epochs; `config.time_limit` ends the call
    with a checkpoint before that much time has passed since it started. SIGTERM and SIGINT
    (Ctrl-C, a notebook's interrupt button) finish the current step, write a checkpoint and
    return (`FitResult.stopped` says why); a second SIGINT raises KeyboardInterrupt at once.

    `config.folds = K`: k-fold cross-validation (`train.cv.fit_folds`): each fold of `config.fold`
    ("all": 0..K-1 in turn) trains in `config.out/fold{I}` with fold I of `config.train` as
    validation, then writes its out-of-fold predictions; `config.out/oof.csv` and `cv.json` gather
    them. With `resume`, finished folds are skipped and an unfinished one continues.

    Multi-host: every process calls `fit` with the same config (`distributed.initialize` first,
    or the `TORCH2FLAX_*` environment variables it reads); `config.batch_size` is the global
    batch; progress and files come from process 0; the processes stop at the same step.
    """
    distributed.initialize()  # before any JAX work, on either path (fit_folds indexes and writes first)
    cache = compile_cache.enable(config.compile_cache, run_out=config.out)  # one cache for every fold
    if distributed.is_main():
        print(f"compile cache: {cache or 'off'}", flush=True)
    if config.folds:
        from torch2flax.train.cv import fit_folds

        return fit_folds(config, fit_run, resume=resume, stop_after_epochs=stop_after_epochs, progress=progress)
    return fit_run(config, resume=resume, stop_after_epochs=stop_after_epochs, progress=progress)


def fit_run(config: TrainConfig, *, resume: bool = False, stop_after_epochs: int | None = None,
            progress: bool = True, folds: Any = None) -> FitResult:
    """One training run (`fit` without folds; one fold of a cross-validation run)."""
    distributed.initialize()
    show = progress and distributed.is_main()
    with StopRequests() as stop:
        schedule = Schedule(Every.parse(config.checkpoint_every) if config.checkpoint_every else None,
                            parse_duration(config.time_limit) if config.time_limit else None)
        run, prog = setup(config, resume=resume, folds=folds, clock=schedule.clock)
        end = config.epochs if stop_after_epochs is None else min(config.epochs, run.start_epoch + stop_after_epochs)
        images_per_sec = 0.0
        try:
            for epoch in range(run.start_epoch, end):
                row = run_epoch(run, prog, epoch, show=show, stop=stop, schedule=schedule)
                if row is None:
                    break
                images_per_sec = row["images_per_sec"] or images_per_sec
                if epoch + 1 < end and schedule.out_of_time():
                    stop.request(StopReason.TIME_LIMIT)
                # After the last epoch too: a signal one process got in it is every process's, so
                # all return the same `stopped` (fit_folds then skips the same OOF step everywhere).
                agree(stop)
                if stop.requested:
                    break
        finally:
            run.checkpoints.close()  # the save in flight is committed (or its error raised) here
    if stop.requested and distributed.is_main():
        print(stop_line(run, prog, stop.reason), flush=True)
    best = run.paths["best.msgpack"]
    if config.portable and not stop.requested and distributed.is_main() and os.path.exists(best):
        # Once, at the end: lowering for three platforms takes seconds, too long at every improvement.
        io.add_portable(best, image_size=run.data.image_size)
        if show:
            print(f"wrote the portable program of {best} (cpu, cuda, tpu; float32 and bfloat16)", flush=True)
    files = [run.checkpoints.latest() if name == CHECKPOINTS else p  # the one a resume reads
             for name, p in run.paths.items() if os.path.exists(p)]
    return FitResult(out=config.out, best_macro_f1=prog.best, history=prog.history, files=files,
                     images_per_sec=images_per_sec, reinitialized=run.reinitialized, stopped=stop.reason,
                     exit_status=stop.exit_status)
