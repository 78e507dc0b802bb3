"""Checkpoints: the model plus what a run needs to continue or to predict.

Two forms hold the same content, a model (config + `variables`) and a `TrainCheckpoint`
(optimiser state, step, epoch, loader position, dropout key, EMA, best score, the data settings
the model was validated with, and the run's config):

- a single `.msgpack` file, the exchange format that `torch2flax.load`, `predict`, `verify`,
  `gradcam` and `--init` read: a `torch2flax.io` model payload with one more key, `"train"`.
  A run writes its `best.msgpack` this way.
- an Orbax checkpoint, `OUT/checkpoints/<step>/` (`TrainingCheckpoints`): the training state a
  run resumes from, written by `orbax.checkpoint.CheckpointManager` (Flax's recommended
  checkpointer): the newest N kept, each committed atomically, saved in the background.

`load_checkpoint` reads either. The training state carries its own format version
(`TRAIN_FORMAT_VERSION`, checked on reading, as the model's is by `torch2flax.io`); the model file
format knows nothing of training.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from torch2flax import io
from torch2flax.errors import DataError, MissingFileError

TRAIN_FORMAT_VERSION = 1  # of `TrainCheckpoint.to_state_dict`'s layout


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
            raise DataError(f"{source}: holds no optimiser state (a model file or a best checkpoint); "
                             "resume from a run folder (its checkpoints/<step>)")
        try:
            opt_state = serialization.from_state_dict(state.opt_state, self.opt_state)
        except ValueError as e:
            raise DataError(f"{source}: its optimizer state does not fit this run's optimizer "
                            "(optimizer, grad_clip and accum_steps must stay as saved when resuming)") from e
        ema = (serialization.from_state_dict(state.ema_params, self.ema_params)
               if state.ema_params is not None and self.ema_params is not None else state.ema_params)
        return state.replace(opt_state=opt_state, step=jnp.asarray(self.step),
                             dropout_rng=jnp.asarray(self.dropout_rng), ema_params=ema)

    def to_state_dict(self) -> dict[str, Any]:
        return {"format_version": TRAIN_FORMAT_VERSION, "epoch": self.epoch, "step": self.step, "batch": self.batch,
                "partial": json.dumps(self.partial), "best_macro_f1": self.best_macro_f1,
                "data": None if self.data is None else vars(self.data),
                "opt_state": self.opt_state, "dropout_rng": self.dropout_rng,
                "ema_params": self.ema_params, "config": json.dumps(self.config)}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> TrainCheckpoint:
        data = d.get("data") or None
        partial = json.loads(d["partial"]) if isinstance(d.get("partial"), str) else None
        return cls(epoch=int(d["epoch"]), step=int(d.get("step", 0)), batch=int(d.get("batch", 0)), partial=partial,
                   best_macro_f1=float(d.get("best_macro_f1", -float("inf"))),
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


def load_checkpoint(path: str | os.PathLike, portable: bool | None = False) -> tuple[Any, Any, TrainCheckpoint | None]:
    """`(module, variables, train)` from a `.msgpack` file, an Orbax step folder
    (`OUT/checkpoints/<step>`), a checkpoints folder or a run folder (its newest training
    checkpoint); `train` is None for a plain model file. `portable`: as in `torch2flax.load`
    (default: the full model, which everything but prediction needs)."""
    if os.path.isdir(path):
        name = os.path.basename(os.fspath(path).rstrip("/"))
        found = (os.fspath(path) if _STEP.fullmatch(name) else
                 latest_step_dir(path) if name == CHECKPOINTS else resume_source(path))
        if found is None:
            raise MissingFileError(f"{path}: holds no training checkpoint ({CHECKPOINTS}/<step>)")
        if os.path.isdir(found):
            return _read_orbax(found)
        path = found
    payload = io.read_payload(path)
    module, variables = io.model_from_payload(payload, source=os.fspath(path), portable=portable)
    raw = payload.get("train")
    return module, variables, _train_record(raw, os.fspath(path)) if raw else None


def _train_record(d: Any, source: str) -> TrainCheckpoint:
    """`TrainCheckpoint.from_state_dict`, with a checkpoint's malformed training state named as the file's fault."""
    version = d.get("format_version") if isinstance(d, dict) else None
    if version != TRAIN_FORMAT_VERSION:
        from torch2flax import __version__

        newer = isinstance(version, int) and version > TRAIN_FORMAT_VERSION
        raise DataError(f"{source}: training state format version {version!r}; torch2flax {__version__} reads "
                        f"version {TRAIN_FORMAT_VERSION}" + (": it was written by a newer torch2flax, upgrade to "
                                                             "resume it" if newer else
                                                             ": not a checkpoint any torch2flax release wrote"))
    try:
        return TrainCheckpoint.from_state_dict(d)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{source}: its training state is malformed ({type(e).__name__}: {e}); not a checkpoint "
                        "written by `torch2flax train`, or a damaged one") from e


# ------------------------------------------------------------------ Orbax training checkpoints

CHECKPOINTS = "checkpoints"  # OUT/checkpoints/<step>/{state,meta}
_STEP = re.compile(r"\d+")  # a committed step folder (Orbax writes `<step>.orbax-checkpoint-tmp-*` first)
_ARRAYS = ("opt_state", "dropout_rng", "ema_params")  # TrainCheckpoint fields saved as arrays


def _split(module: Any, variables: Any, train: TrainCheckpoint) -> tuple[dict, dict]:
    """(arrays, JSON metadata) of one checkpoint."""
    payload = io.model_payload(module, variables)
    record = train.to_state_dict()
    arrays = {"variables": payload["variables"], **{k: record.pop(k) for k in _ARRAYS}}
    return arrays, {"model": json.loads(payload["config"]), "train": record}


def _read_orbax(step_dir: str) -> tuple[Any, Any, TrainCheckpoint]:
    import orbax.checkpoint as ocp

    # A folder that is not a whole Orbax checkpoint of ours (a copy missing files, another program's
    # checkpoint): Orbax says so with a KeyError (an item missing), an OSError or a ValueError (bad JSON).
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as reader:
            restored = reader.restore(os.path.abspath(step_dir), args=ocp.args.Composite(
                state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
        arrays, meta = restored["state"], restored["meta"]
    except (KeyError, OSError, ValueError) as e:
        raise DataError(f"{step_dir}: not a readable torch2flax training checkpoint ({type(e).__name__}: {e}); "
                        f"use another {CHECKPOINTS}/<step> folder, or the run's best.msgpack") from e
    if not (isinstance(meta, dict) and isinstance(meta.get("model"), dict) and isinstance(meta.get("train"), dict)
            and isinstance(arrays, dict) and "variables" in arrays):
        raise DataError(f"{step_dir}: an Orbax checkpoint, but not one `torch2flax train` writes (its meta item "
                        "needs 'model' and 'train', its state item 'variables')")
    module, variables = io.model_from_payload(
        {"config": json.dumps(meta["model"]), "variables": arrays["variables"]}, source=step_dir)
    return module, variables, _train_record({**meta["train"], **{k: arrays.get(k) for k in _ARRAYS}}, step_dir)


def latest_step_dir(directory: str | os.PathLike) -> str | None:
    """The newest committed `<step>` folder under `directory` (None: there is none). A save
    cut short leaves only a temporary folder, which never counts."""
    try:
        steps = [int(n) for n in os.listdir(directory) if _STEP.fullmatch(n)
                 and os.path.isdir(os.path.join(directory, n))]
    except FileNotFoundError:
        return None
    return os.path.join(os.fspath(directory), str(max(steps))) if steps else None


def resume_source(out: str | os.PathLike) -> str | None:
    """What `--resume OUT` reads: its newest Orbax checkpoint (None: it has none)."""
    return latest_step_dir(os.path.join(out, CHECKPOINTS))


class TrainingCheckpoints:
    """A run's training checkpoints, `directory/<step>/`, through Orbax's `CheckpointManager`:
    the newest `keep` are kept, each is committed atomically (written under a temporary name,
    renamed when whole), and with `asynchronous` the writing happens in a background thread
    while training goes on. `wait()` before reading one back or exiting.

    Every process calls `save` (with the same host values): Orbax writes host arrays from
    process 0 and synchronises the processes around the commit.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, asynchronous: bool = True,
                 measure_write: bool = False, clock: Callable[[], float] = time.perf_counter):
        import orbax.checkpoint as ocp

        self.directory = os.path.abspath(directory)
        self.asynchronous = asynchronous
        # Seconds one checkpoint takes to write, for a time limit's margin: every synchronous save,
        # or with `measure_write` the first asynchronous one (waited on once, since an
        # asynchronous save returns before its write is done). `clock` is the time limit's own
        # clock, so that the margin is measured in one time base (and a test's fake clock is
        # not mixed with this machine's real write time).
        self.write_seconds = 0.0
        self._clock = clock
        self._measure = measure_write
        self._closed = False
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=asynchronous)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, module: Any, variables: Any, train: TrainCheckpoint) -> str:
        """Start writing `directory/<train.step>` (host values, copied here: the caller's device
        buffers are donated to the next step while a background save may still be reading)."""
        import jax
        import numpy as np
        import orbax.checkpoint as ocp

        if train.step in self._manager.all_steps():  # a stop right after a save: that one stands
            return os.path.join(self.directory, str(train.step))
        started = self._clock()
        arrays, meta = _split(module, variables, train)
        arrays = jax.tree_util.tree_map(np.array, arrays)
        self._manager.save(train.step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)))
        if not self.asynchronous or (self._measure and not self.write_seconds):
            self.wait()
            self.write_seconds = self._clock() - started
        return os.path.join(self.directory, str(train.step))

    def wait(self) -> None:
        """Until every save started has been committed."""
        self._manager.wait_until_finished()

    def latest(self) -> str | None:
        """The newest committed checkpoint's folder (after any save in flight)."""
        if not self._closed:
            self.wait()
        return latest_step_dir(self.directory)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._manager.close()  # waits for a save in flight
