"""The training checkpoint: a model file plus what a run needs to continue or to predict.

A checkpoint is a `torch2flax.io` model payload (`config` + `variables`, so `torch2flax.load`
reads any checkpoint as a model) with one more key, `"train"`, holding a `TrainCheckpoint`:
optimiser state, step, epoch, dropout key, EMA, best score, the data settings the model was
validated with, and the run's config. The model file format knows nothing of training; this
module owns everything else. Files written before this format (model files whose training
state sat under an untyped `"extra"` key) still load.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from torch2flax import io


@dataclass(frozen=True)
class DataSpec:
    """How the model's inputs were made at validation time; `predict` reuses it."""

    image_size: int
    crop_pct: float


@dataclass
class TrainCheckpoint:
    """Everything in a checkpoint besides the model. Host values (NumPy), never replicated.

    `opt_state` and `ema_params` are flax state dicts (`serialization.to_state_dict`);
    `restore` puts them back into a `TrainState` of the same optimiser.
    """

    epoch: int  # the last finished epoch; the data order of epoch e is a function of (seed, e)
    step: int = 0
    # A checkpoint written mid-epoch (a cadence, a signal, a time limit): the batches of epoch
    # `epoch + 1` already trained, and that epoch's running training-metric sums, so a resumed
    # run skips those batches and reports the epoch as an uninterrupted run would.
    batch: int = 0
    partial: dict[str, float] | None = None
    best_macro_f1: float = -float("inf")
    data: DataSpec | None = None
    opt_state: Any = None
    dropout_rng: np.ndarray | None = None
    ema_params: Any = None
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_state(cls, state: Any, *, epoch: int, best_macro_f1: float, data: DataSpec,
                   config: dict[str, Any], batch: int = 0,
                   partial: dict[str, float] | None = None) -> TrainCheckpoint:
        """From a host (unreplicated) `TrainState`."""
        from flax import serialization

        return cls(epoch=epoch, step=int(state.step), batch=batch, partial=partial,
                   best_macro_f1=float(best_macro_f1), data=data,
                   opt_state=serialization.to_state_dict(state.opt_state),
                   dropout_rng=np.asarray(state.dropout_rng),
                   ema_params=serialization.to_state_dict(state.ema_params), config=dict(config))

    def restore(self, state: Any, source: str) -> Any:
        """`state` (freshly created for the same optimiser) with this checkpoint's training state."""
        import jax.numpy as jnp
        from flax import serialization

        if self.opt_state is None:
            raise ValueError(f"{source}: holds no optimiser state (a model file or a best checkpoint); "
                             "resume from last.msgpack")
        try:
            opt_state = serialization.from_state_dict(state.opt_state, self.opt_state)
        except ValueError as e:
            raise ValueError(f"{source}: its optimizer state does not fit this run's optimizer "
                             "(optimizer, grad_clip and accum_steps must stay as saved when resuming)") from e
        ema = (serialization.from_state_dict(state.ema_params, self.ema_params)
               if state.ema_params is not None and self.ema_params is not None else state.ema_params)
        return state.replace(opt_state=opt_state, step=jnp.asarray(self.step),
                             dropout_rng=jnp.asarray(self.dropout_rng), ema_params=ema)

    def to_state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "batch": self.batch,
                "partial": json.dumps(self.partial), "best_macro_f1": self.best_macro_f1,
                "data": None if self.data is None else vars(self.data),
                "opt_state": self.opt_state, "dropout_rng": self.dropout_rng,
                "ema_params": self.ema_params, "config": json.dumps(self.config)}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> TrainCheckpoint:
        data = d.get("data") or None
        partial = json.loads(d["partial"]) if isinstance(d.get("partial"), str) else None
        return cls(epoch=int(d["epoch"]), step=int(d.get("step", 0)), batch=int(d.get("batch", 0)), partial=partial,
                   best_macro_f1=float(d.get("best_macro_f1", d.get("val_macro_f1", -float("inf")))),
                   data=DataSpec(int(data["image_size"]), float(data["crop_pct"])) if data else None,
                   opt_state=d.get("opt_state"), dropout_rng=d.get("dropout_rng"),
                   ema_params=d.get("ema_params"),
                   config=json.loads(d["config"]) if isinstance(d.get("config"), str) else {})


def save_checkpoint(path: str | os.PathLike, module: Any, variables: Any, train: TrainCheckpoint) -> str:
    """Write model and training state to `path` atomically (and the model's JSON sidecar)."""

    payload = io.model_payload(module, variables)
    payload["train"] = train.to_state_dict()
    io.write_payload(path, payload)
    return os.fspath(path)


def load_checkpoint(path: str | os.PathLike) -> tuple[Any, Any, TrainCheckpoint | None]:
    """`(module, variables, train)`; `train` is None for a plain model file."""
    payload = io.read_payload(path)
    module, variables = io.model_from_payload(payload, source=os.fspath(path))
    raw = payload.get("train")
    if raw is None:
        raw = payload.get("extra")  # the layout of checkpoints written before TrainCheckpoint
    return module, variables, TrainCheckpoint.from_state_dict(raw) if raw else None
