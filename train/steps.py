"""Pure per-step functions (flax imagenet style). The same code runs under `jax.pmap`
(with `axis_name="batch"`) and under `jax.jit` on globally sharded arrays (`axis_name=None`:
XLA then reduces over the whole batch by itself)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from torch2flax.errors import ConfigError
from torch2flax.loaders import normalize_on_device
from torch2flax.train.config import DTYPES, TTA_MODES
from torch2flax.train.metrics import confusion_matrix
from torch2flax.train.mix import MixSpec, mix_batch
from torch2flax.train.state import TrainState

COMPUTE_DTYPES = {name: getattr(jnp, name) for name in DTYPES}


@dataclass(frozen=True)
class StepSpec:
    """The static arguments of `train_step`/`eval_step` (hashable: compiled steps are cached on it)."""

    module: nn.Module  # with the compute dtype and the BatchNorm sync axis set
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    dtype: Any
    label_smoothing: float
    ema_decay: float
    mix: MixSpec = MixSpec()
    groups: int = 1  # devices a `jit` batch spans (MixUp/CutMix pair within each device's slice)


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
    return optax.softmax_cross_entropy(logits, targets)


# The MixUp/CutMix draws' stream, apart from dropout's (both derive from the step's key).
_MIX_STREAM = 0x6D6978


def train_step(state: TrainState, batch: dict[str, jax.Array], *, module: nn.Module, mean, std,
               num_classes: int, label_smoothing: float, dtype: Any, ema_decay: float,
               axis_name: str | None, mix: MixSpec | None = None,
               groups: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on a (per-device or global) batch of uint8 images.

    BatchNorm synchronisation is the module's business (`module.axis_name`); without it,
    per-device statistics are averaged here so that replicas never drift apart. With `mix`
    on, the batch is mixed here (`train.mix`) and the loss is taken on the soft targets;
    the training accuracy still counts the original labels.
    """
    images = normalize_on_device(batch["image"], mean, std, dtype)
    labels = batch["label"]
    step_rng = jax.random.fold_in(state.dropout_rng, state.step)
    rng = step_rng
    if axis_name is not None:
        rng = jax.random.fold_in(rng, lax.axis_index(axis_name))
    targets = None
    if mix is not None and mix.enabled:
        device = lax.axis_index(axis_name) if axis_name is not None else 0
        images, targets = mix_batch(jax.random.fold_in(step_rng, _MIX_STREAM), images, labels, num_classes,
                                    label_smoothing, mix, groups=groups, first_group=device)

    def loss_fn(params):
        logits, updates = module.apply(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True,
            mutable=["batch_stats"], rngs={"dropout": rng})
        logits = logits.astype(jnp.float32)
        loss = (cross_entropy(logits, labels, num_classes, label_smoothing) if targets is None
                else optax.softmax_cross_entropy(logits, targets)).mean()
        return loss, (logits, updates.get("batch_stats", {}))  # models without BatchNorm have none

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
    if axis_name is not None:
        grads = lax.pmean(grads, axis_name)
        metrics = lax.pmean(metrics, axis_name)
        if getattr(module, "axis_name", None) is None:
            batch_stats = lax.pmean(batch_stats, axis_name)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if state.ema_params is not None:
        state = state.replace(
            ema_params=optax.incremental_update(state.params, state.ema_params, 1.0 - ema_decay))
    metrics["grad_norm"] = optax.global_norm(grads)  # in every optax of the range (tree_norm is 0.2.5+)
    return state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, module: nn.Module, mean, std,
              num_classes: int, dtype: Any, axis_name: str | None) -> dict[str, jax.Array]:
    """Sums over the real (mask=True) samples: loss, count and the confusion matrix."""
    params = state.ema_params if state.ema_params is not None else state.params
    images = normalize_on_device(batch["image"], mean, std, dtype)
    logits = module.apply({"params": params, "batch_stats": state.batch_stats}, images, train=False)
    logits = logits.astype(jnp.float32)
    mask = batch["mask"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    sums = {
        "loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
        "count": jnp.sum(mask.astype(jnp.int32)),
        "confusion": confusion_matrix(batch["label"], jnp.argmax(logits, -1), num_classes, mask),
    }
    if axis_name is not None:
        sums = lax.psum(sums, axis_name)
    return sums


def predict_step(variables: Any, images: jax.Array, *, module: nn.Module, mean, std, dtype: Any,
                 tta: str | None) -> jax.Array:
    """Class probabilities; `tta="hflip"` averages them with the mirrored images' (fixed shapes)."""
    x = normalize_on_device(images, mean, std, dtype)
    probs = jax.nn.softmax(module.apply(variables, x, train=False).astype(jnp.float32), -1)
    if tta == "hflip":
        flipped = module.apply(variables, jnp.flip(x, axis=-2), train=False).astype(jnp.float32)
        probs = (probs + jax.nn.softmax(flipped, -1)) / 2
    elif tta not in TTA_MODES:
        raise ConfigError(f"unknown tta {tta!r}: expected one of {TTA_MODES}")
    return probs
