"""Training state and optimiser (flax TrainState + optax)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.core import unfreeze
from flax.training import train_state

from torch2flax.train.config import TrainConfig


class TrainState(train_state.TrainState):
    """flax's TrainState plus BatchNorm statistics, an optional parameter EMA and the dropout key."""

    batch_stats: Any = None
    ema_params: Any = None
    dropout_rng: jax.Array = None


def decay_mask(params: Any, exempt: frozenset[str] = frozenset()) -> Any:
    """Weight decay applies to weight matrices and kernels only: biases and norm scales/offsets
    (ndim <= 1) are exempt, and so are the parameters timm's `no_weight_decay()` names
    (`pos_embed`, `cls_token`, ...; `exempt`, as dotted paths)."""
    def decays(path: tuple, p: Any) -> bool:
        name = ".".join(str(getattr(k, "key", k)) for k in path)
        return p.ndim > 1 and name not in exempt and name.rsplit(".", 1)[0] not in exempt
    return jax.tree_util.tree_map_with_path(decays, params)


def make_schedule(config: TrainConfig | OptimizerSpec, steps_per_epoch: int) -> optax.Schedule:
    """Linear warmup then cosine decay, counted in optimiser updates (after accumulation)."""
    updates_per_epoch = max(1, steps_per_epoch // config.accum_steps)
    total = max(1, config.epochs * updates_per_epoch)
    warmup = min(int(config.warmup_epochs * updates_per_epoch), total - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
        decay_steps=total, end_value=config.lr * config.min_lr_ratio)


@dataclass(frozen=True)
class OptimizerSpec:
    """The settings the optimiser is made of: hashable, so equal settings give the same optimiser."""

    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    grad_clip: float | None
    accum_steps: int
    epochs: int
    warmup_epochs: float
    min_lr_ratio: float

    @classmethod
    def of(cls, config: TrainConfig) -> OptimizerSpec:
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


def make_optimizer(config: TrainConfig | OptimizerSpec, steps_per_epoch: int,
                   no_weight_decay: frozenset[str] = frozenset()) -> optax.GradientTransformation:
    """Optional clipping, AdamW or SGD on the schedule, optional gradient accumulation.

    The same hyper-parameters give the same optimiser object: it is static data of the
    `TrainState`, so an equal one lets a later run reuse the compiled steps.
    """
    spec = config if isinstance(config, OptimizerSpec) else OptimizerSpec.of(config)
    return _optimizer(spec, steps_per_epoch, frozenset(no_weight_decay))


@functools.lru_cache(maxsize=16)
def _optimizer(spec: OptimizerSpec, steps_per_epoch: int, no_weight_decay: frozenset[str]) -> optax.GradientTransformation:
    schedule = make_schedule(spec, steps_per_epoch)
    mask = functools.partial(decay_mask, exempt=no_weight_decay)
    parts = []
    if spec.grad_clip:
        parts.append(optax.clip_by_global_norm(spec.grad_clip))
    if spec.optimizer == "adamw":
        parts.append(optax.adamw(schedule, weight_decay=spec.weight_decay, mask=mask))
    else:
        parts.append(optax.add_decayed_weights(spec.weight_decay, mask=mask))
        parts.append(optax.sgd(schedule, momentum=spec.momentum, nesterov=True))
    tx = optax.chain(*parts)
    if spec.accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=spec.accum_steps)
    return tx


def create_train_state(variables: Any, tx: optax.GradientTransformation, *, seed: int, ema: bool) -> TrainState:
    """The steps take the module as a static argument, so `apply_fn` stays None: a bound
    method would make every new module instance a new static value and force a recompile."""
    # Plain dicts, not the converter's FrozenDicts: the step returns batch_stats as a dict, and a
    # state whose tree structure changes after step 1 is traced and compiled a second time.
    params = unfreeze(variables["params"])
    return TrainState.create(
        apply_fn=None,
        params=params,
        tx=tx,
        batch_stats=unfreeze(variables.get("batch_stats", {})),
        ema_params=jax.tree_util.tree_map(jnp.copy, params) if ema else None,
        dropout_rng=jax.random.PRNGKey(seed),
    )


def learning_rate(step: int, config: TrainConfig, steps_per_epoch: int) -> float:
    """The learning rate the schedule gives after `step` training steps."""
    return float(make_schedule(config, steps_per_epoch)(step // config.accum_steps))
