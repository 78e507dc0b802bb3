"""The epoch loop's parts: one training pass with its running metrics, and evaluation."""
from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from torch2flax.errors import UserError
from torch2flax.train import bad_images
from torch2flax.train.checkpoint import TrainingCheckpoints
from torch2flax.train.metrics import accuracy, macro_f1
from torch2flax.train.parallel import Parallel
from torch2flax.train.preemption import Action, Control


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept. The run's settings (a
    learning rate too high for the model, no gradient clipping) or its data: a `UserError`."""


def evaluate(par: Parallel, p_eval, state, loader, bad: list[str] | None = None) -> dict[str, float]:
    totals = None
    for batch in par.feed(bad_images.host_batches(loader, [] if bad is None else bad)):
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
    whether to checkpoint (`Action.SAVE`) or to checkpoint and stop (`Action.STOP`); then that step's metrics
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
    batches = par.feed(bad_images.host_batches(loader, meter.bad))
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
            if action is Action.STOP:
                return state, meter, True
    if pending is not None:
        collect(*pending)
    return state, meter, False
