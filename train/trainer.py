"""`fit`: fine-tune a converted timm model on TFRecord data, validating every epoch."""
from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from tqdm.auto import tqdm

import torch2flax
from torch2flax.loaders import RecordTransform, TFRecordDataset, eval_transform, make_loader, train_transform
from torch2flax.train import artifacts
from torch2flax.train.config import TrainConfig, dumps
from torch2flax.train.metrics import accuracy, macro_f1
from torch2flax.train.parallel import AXIS, Parallel
from torch2flax.train.state import TrainState, create_train_state, learning_rate, make_optimizer
from torch2flax.train.steps import eval_step, train_step

TRAIN_FEATURES = {"image": "bytes", "class": "int", "id": "str"}
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


@dataclass
class FitResult:
    out: str
    best_macro_f1: float
    history: list[dict]
    files: list[str]
    images_per_sec: float
    reinitialized: tuple[str, ...] = field(default_factory=tuple)


def select_devices(num_devices: int | None) -> list[jax.Device]:
    local = jax.local_devices()
    if num_devices is not None and not 1 <= num_devices <= len(local):
        raise ValueError(f"num_devices={num_devices}, but this process sees {len(local)} devices")
    return local[: num_devices or len(local)]


def init_model(config: TrainConfig) -> tuple[Any, Any, tuple[str, ...]]:
    """The starting model: a torch2flax file (`init`) or a timm conversion."""
    if config.init:
        module, variables = torch2flax.load(config.init)
        if module.num_classes != config.num_classes:
            raise ValueError(f"{config.init} has a {module.num_classes}-class head, but the run "
                             f"asks for num_classes={config.num_classes}; convert with --num-classes "
                             f"{config.num_classes} or start from a timm checkpoint")
        module = module.clone(drop_rate=config.drop_rate, drop_path_rate=config.drop_path_rate)
        return module, variables, ()
    import torch

    torch.manual_seed(config.seed)  # a randomly initialised model is reproducible by seed
    result = torch2flax.convert(config.model, pretrained=config.pretrained, checkpoint=config.checkpoint,
                                num_classes=config.num_classes, drop_rate=config.drop_rate,
                                drop_path_rate=config.drop_path_rate)
    module, variables = result
    return module, variables, tuple(result.reinitialized)


def eval_crop_pct(config: TrainConfig, module: Any) -> float:
    return config.crop_pct if config.crop_pct is not None else float(module.pretrained_cfg["crop_pct"])


def _dataset(pattern: str, transform: RecordTransform) -> TFRecordDataset:
    ds = TFRecordDataset(pattern, features=TRAIN_FEATURES, transform=transform)
    # Multi-host: each process reads its own share of the records.
    return ds.shard(jax.process_index(), jax.process_count()) if jax.process_count() > 1 else ds


def build_loaders(config: TrainConfig, crop_pct: float, num_devices: int):
    train_ds = _dataset(config.train, RecordTransform(train_transform(
        config.image_size, scale=(config.scale_min, 1.0), hflip=config.hflip,
        color_jitter=config.color_jitter)))
    val_ds = _dataset(config.val, RecordTransform(eval_transform(config.image_size, crop_pct=crop_pct)))
    common = dict(num_devices=num_devices, num_workers=config.num_workers, seed=config.seed)
    # make_loader refuses a training set smaller than one batch, naming both sizes.
    return (make_loader(train_ds, config.batch_size, train=True, **common),
            make_loader(val_ds, config.batch_size, train=False, **common))


def _checkpoint_extra(state: TrainState, epoch: int, best: float, data: dict) -> dict:
    return {
        "opt_state": serialization.to_state_dict(state.opt_state),
        "step": np.asarray(state.step),
        "epoch": epoch,
        "dropout_rng": np.asarray(state.dropout_rng),
        "ema_params": state.ema_params,
        "best_macro_f1": best,
        "data": data,
    }


def _restore(state: TrainState, extra: dict, source: str) -> tuple[TrainState, int, float]:
    try:
        opt_state = serialization.from_state_dict(state.opt_state, extra["opt_state"])
    except ValueError as e:
        raise ValueError(f"{source}: its optimizer state does not fit this run's optimizer "
                         "(optimizer, grad_clip and accum_steps must stay as saved when resuming)") from e
    state = state.replace(
        opt_state=opt_state,
        step=jnp.asarray(extra["step"]),
        dropout_rng=jnp.asarray(extra["dropout_rng"]),
        ema_params=(serialization.from_state_dict(state.ema_params, extra["ema_params"])
                    if state.ema_params is not None else None),
    )
    return state, int(extra["epoch"]) + 1, float(extra["best_macro_f1"])


def evaluate(par: Parallel, p_eval, state, loader) -> dict[str, float]:
    totals = None
    for batch in par.feed(loader):
        sums = p_eval(state, {k: batch[k] for k in ("image", "label", "mask")})
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    totals = par.first(totals)
    return {"val_loss": float(totals["loss_sum"]) / max(int(totals["count"]), 1),
            "val_accuracy": accuracy(totals["confusion"]),
            "val_macro_f1": macro_f1(totals["confusion"]),
            "val_count": int(totals["count"])}


class EpochMeter:
    """Running training metrics, throughput and the share of time spent waiting for data.

    The first step of a call is left out of the timing: it includes compilation.
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.loss_sum = self.acc_sum = 0.0
        self.steps = self.timed_images = 0
        self.timed_start: float | None = None
        self.waited = 0.0

    def wait(self, seconds: float) -> None:
        if self.timed_start is not None:
            self.waited += seconds

    def update(self, loss: float, acc: float) -> None:
        self.loss_sum, self.acc_sum, self.steps = self.loss_sum + loss, self.acc_sum + acc, self.steps + 1
        if self.timed_start is None:
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


def train_epoch(par: Parallel, p_train, state, loader, *, step: int, epoch: int, batch_size: int,
                bar: tqdm, checkpoint: str) -> tuple[Any, int, EpochMeter]:
    """One pass over `loader`; metrics of step t are read while step t+1 runs (async dispatch)."""
    meter = EpochMeter(batch_size)

    def collect(at_step: int, metrics: Any) -> None:
        metrics = par.first(metrics)
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            kept = (f"the last good checkpoint is {checkpoint}" if os.path.exists(checkpoint)
                    else "no checkpoint was written yet")
            raise NonFiniteLossError(f"loss is {loss} at step {at_step} (epoch {epoch + 1}); "
                                     f"training stopped, {kept}")
        meter.update(loss, float(metrics["accuracy"]))
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{meter.images_per_sec:.0f}")
        bar.update(1)

    pending = None
    batches = par.feed(loader)
    while True:
        waited = time.perf_counter()
        batch = next(batches, None)
        meter.wait(time.perf_counter() - waited)
        if batch is None:
            break
        state, metrics = p_train(state, {"image": batch["image"], "label": batch["label"]})
        step += 1
        if pending is not None:
            collect(*pending)
        pending = (step, metrics)
    if pending is not None:
        collect(*pending)
    return state, step, meter


def fit(config: TrainConfig, *, resume: bool = False, stop_after_epochs: int | None = None,
        progress: bool = True) -> FitResult:
    """Train up to `config.epochs` epochs, continuing from `config.out/last.msgpack` when `resume`.

    `stop_after_epochs` ends this call early (the schedule still spans `config.epochs`), for
    sessions with a time limit: a later `fit(config, resume=True)` carries on exactly.
    """
    devices = select_devices(config.num_devices)
    par = Parallel(config.parallel, devices)
    os.makedirs(config.out, exist_ok=True)
    paths = {name: os.path.join(config.out, name) for name in
             ("config.json", "metrics.csv", "curves.png", "last.msgpack", "best.msgpack")}

    if resume:
        if not os.path.exists(paths["last.msgpack"]):
            raise FileNotFoundError(f"cannot resume: {paths['last.msgpack']} does not exist")
        module, variables, extra = torch2flax.load(paths["last.msgpack"], with_extra=True)
        reinitialized: tuple[str, ...] = ()
    else:
        module, variables, reinitialized = init_model(config)
        extra = None
    crop_pct = eval_crop_pct(config, module)
    train_loader, val_loader = build_loaders(config, crop_pct, len(devices))
    steps_per_epoch = len(train_loader)
    state = create_train_state(module, variables, make_optimizer(config, steps_per_epoch),
                               seed=config.seed, ema=config.ema_decay > 0)
    start_epoch, best, history = 0, -math.inf, []
    if extra is not None:
        state, start_epoch, best = _restore(state, extra, paths["last.msgpack"])
        if os.path.exists(paths["metrics.csv"]):
            history = [r for r in artifacts.read_metrics_csv(paths["metrics.csv"]) if r["epoch"] < start_epoch]
    artifacts.atomic_write_text(paths["config.json"], dumps(config))

    dtype = COMPUTE_DTYPES[config.dtype]
    sync = AXIS if (par.layout == "pmap" and config.sync_bn) else None
    step_module = module.clone(dtype=dtype, axis_name=sync)
    cfg = module.pretrained_cfg
    norm = dict(module=step_module, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                num_classes=config.num_classes, dtype=dtype, axis_name=par.axis_name)
    p_train = par.compile(functools.partial(train_step, label_smoothing=config.label_smoothing,
                                            ema_decay=config.ema_decay, **norm), donate_state=True)
    p_eval = par.compile(functools.partial(eval_step, **norm))
    data_cfg = {"image_size": config.image_size, "crop_pct": crop_pct}

    state = par.replicate(state)
    step = int(extra["step"]) if extra is not None else 0
    images_per_sec = 0.0
    end_epoch = config.epochs if stop_after_epochs is None else min(config.epochs, start_epoch + stop_after_epochs)
    for epoch in range(start_epoch, end_epoch):
        train_loader.set_epoch(epoch)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step",
                   disable=not progress, dynamic_ncols=True)
        epoch_start = time.perf_counter()
        state, step, meter = train_epoch(par, p_train, state, train_loader, step=step, epoch=epoch,
                                         batch_size=config.batch_size, bar=bar,
                                         checkpoint=paths["last.msgpack"])
        bar.close()
        images_per_sec = meter.images_per_sec or images_per_sec

        val = evaluate(par, p_eval, state, val_loader)
        host = par.unreplicate(state)
        lr = learning_rate(host, config, steps_per_epoch)
        row = {"epoch": epoch, "step": step, "lr": lr, "train_loss": meter.loss,
               "train_accuracy": meter.accuracy, "val_loss": val["val_loss"],
               "val_accuracy": val["val_accuracy"], "val_macro_f1": val["val_macro_f1"],
               "images_per_sec": meter.images_per_sec, "data_wait": meter.data_wait,
               "epoch_seconds": time.perf_counter() - epoch_start}
        history.append(row)
        improved = val["val_macro_f1"] > best
        best = max(best, val["val_macro_f1"])
        variables = {"params": host.params, "batch_stats": host.batch_stats}
        if improved:
            eval_params = host.ema_params if host.ema_params is not None else host.params
            torch2flax.save(paths["best.msgpack"], module,
                            {"params": eval_params, "batch_stats": host.batch_stats},
                            extra={"data": data_cfg, "epoch": epoch, "val_macro_f1": best})
        torch2flax.save(paths["last.msgpack"], module, variables,
                        extra=_checkpoint_extra(host, epoch, best, data_cfg))
        artifacts.write_metrics_csv(paths["metrics.csv"], history)
        artifacts.plot_curves(paths["curves.png"], history)
        if progress:
            tqdm.write(f"epoch {epoch + 1}/{config.epochs}: train loss {row['train_loss']:.4f}, "
                       f"val loss {val['val_loss']:.4f}, val acc {val['val_accuracy']:.4f}, "
                       f"val macro F1 {val['val_macro_f1']:.4f} ({val['val_count']} images)"
                       + (" *best*" if improved else ""))
    files = [p for p in paths.values() if os.path.exists(p)]
    return FitResult(out=config.out, best_macro_f1=best, history=history, files=files,
                     images_per_sec=images_per_sec, reinitialized=reinitialized)
