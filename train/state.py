"""Training state and optimiser (flax TrainState + optax)."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from torch2flax.train.config import TrainConfig


class TrainState(train_state.TrainState):
    """flax's TrainState plus BatchNorm statistics, an optional parameter EMA and the dropout key."""

    batch_stats: Any = None
    ema_params: Any = None
    dropout_rng: jax.Array = None


def decay_mask(params: Any) -> Any:
    """Weight decay applies to kernels only: biases and norm scales/offsets (ndim <= 1) are exempt."""
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """Linear warmup then cosine decay, counted in optimiser updates (after accumulation)."""
    updates_per_epoch = max(1, steps_per_epoch // config.accum_steps)
    total = max(1, config.epochs * updates_per_epoch)
    warmup = min(int(config.warmup_epochs * updates_per_epoch), total - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
        decay_steps=total, end_value=config.lr * config.min_lr_ratio)


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """Optional clipping, AdamW or SGD on the schedule, optional gradient accumulation."""
    schedule = make_schedule(config, steps_per_epoch)
    parts = []
    if config.grad_clip:
        parts.append(optax.clip_by_global_norm(config.grad_clip))
    if config.optimizer == "adamw":
        parts.append(optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask))
    else:
        parts.append(optax.add_decayed_weights(config.weight_decay, mask=decay_mask))
        parts.append(optax.sgd(schedule, momentum=config.momentum, nesterov=True))
    tx = optax.chain(*parts)
    if config.accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.accum_steps)
    return tx


def create_train_state(module: flax.linen.Module, variables: Any, tx: optax.GradientTransformation,
                       *, seed: int, ema: bool) -> TrainState:
    params = variables["params"]
    return TrainState.create(
        apply_fn=module.apply,
        params=params,
        tx=tx,
        batch_stats=variables["batch_stats"],
        ema_params=jax.tree_util.tree_map(jnp.copy, params) if ema else None,
        dropout_rng=jax.random.PRNGKey(seed),
    )


def learning_rate(state: TrainState, config: TrainConfig, steps_per_epoch: int) -> float:
    """The learning rate the schedule gives at the state's current update count."""
    return float(make_schedule(config, steps_per_epoch)(int(state.step) // config.accum_steps))
