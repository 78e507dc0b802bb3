"""Numerical parity of an `ExportedModel` with the timm model it came from.

Used by the tests and `benchmarks/coverage.py`: eval logits, and one training
step (loss, every gradient, updated BatchNorm statistics) with gradients from
`jax.grad` against timm's `.backward()`, no optimizer involved.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from torch2flax.export.model import ExportedModel, flatten


def random_batch(module: ExportedModel, batch: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """NCHW float32 images at the module's size and integer labels."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, module.in_chans, *module.image_size)).astype(np.float32)
    return x, rng.integers(0, max(module.num_classes, 1), batch)


def _logits(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) else out


def eval_parity(model: torch.nn.Module, module: ExportedModel, variables: Any, x: np.ndarray) -> dict[str, float]:
    """Max abs error of eval logits, and the same relative to max(1, max|timm|)."""
    model = model.eval()
    with torch.no_grad():
        ref = _logits(model(torch.from_numpy(x))).numpy()
    got = np.asarray(jax.jit(module.apply)(variables, x.transpose(0, 2, 3, 1)), np.float64)
    err = float(np.max(np.abs(got - ref)))
    return {"abs": err, "rel": err / max(1.0, float(np.max(np.abs(ref))))}


def torch_train_step(model: torch.nn.Module, x: np.ndarray, labels: np.ndarray,
                     dtype: torch.dtype = torch.float32) -> tuple[float, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(loss, grads by name, updated buffers by name) of one train-mode step on a copy of `model`."""
    model = copy.deepcopy(model).to(dtype).train()
    out = _logits(model(torch.from_numpy(x).to(dtype)))
    loss = torch.nn.functional.cross_entropy(out, torch.from_numpy(labels))
    loss.backward()
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).double().numpy()
             for k, p in model.named_parameters()}
    persistent = model.state_dict()
    buffers = {k: b.double().numpy() for k, b in model.named_buffers()
               if k in persistent and not k.endswith("num_batches_tracked")}
    return float(loss.detach()), grads, buffers


def jax_train_step(module: ExportedModel, variables: Any, x: np.ndarray, labels: np.ndarray,
                   rng: jax.Array | None = None) -> tuple[float, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The same step with `jax.value_and_grad` of the train graph (`mutable=["batch_stats"]`)."""
    rng = jax.random.key(0) if rng is None else rng
    stats = variables.get("batch_stats", {})

    def loss_fn(params):
        out, state = module.apply({"params": params, "batch_stats": stats}, x.transpose(0, 2, 3, 1), train=True,
                                  mutable=["batch_stats"], rngs={"dropout": rng})
        logp = jax.nn.log_softmax(_logits(out).astype(jnp.float32))
        loss = -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(labels)[:, None], axis=1))
        return loss, state.get("batch_stats", {})

    (loss, new_stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    as_np = lambda t: {k: np.asarray(v, np.float64) for k, v in flatten(t).items()}
    return float(loss), as_np(grads), as_np(new_stats)


def relative_errors(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per tensor ||got - ref|| / ||ref||; tensors whose reference is ~0 are measured against the largest norm."""
    if set(got) != set(ref):
        raise KeyError(f"tensor names differ: {sorted(set(got) ^ set(ref))[:5]}")
    floor = 1e-6 * max((float(np.linalg.norm(v)) for v in ref.values()), default=1.0)
    return {k: float(np.linalg.norm(got[k] - ref[k])) / max(float(np.linalg.norm(ref[k])), floor, 1e-30)
            for k in ref}


def train_parity(model: torch.nn.Module, module: ExportedModel, variables: Any, x: np.ndarray,
                 labels: np.ndarray, *, float64_reference: bool = True) -> dict[str, Any]:
    """Relative errors of loss, gradients and updated batch_stats against timm's float32 step.

    With `float64_reference`, also how far timm's own float32 gradients are from
    float64 (`grad_f32_vs_f64`): the noise floor a deep random-BN net imposes.
    """
    loss_t, grads_t, bufs_t = torch_train_step(model, x, labels)
    loss_j, grads_j, bufs_j = jax_train_step(module, variables, x, labels)
    grad_err = relative_errors(grads_j, grads_t)
    worst = max(grad_err, key=grad_err.get) if grad_err else ""
    out = {
        "loss": abs(loss_j - loss_t) / max(abs(loss_t), 1e-12),
        "grad": grad_err.get(worst, 0.0), "grad_worst": worst,
        "batch_stats": max(relative_errors(bufs_j, bufs_t).values(), default=0.0),
    }
    if float64_reference:
        loss_64, grads_64, bufs_64 = torch_train_step(model, x, labels, torch.float64)
        out["loss_f32_vs_f64"] = abs(loss_t - loss_64) / max(abs(loss_64), 1e-12)
        out["grad_f32_vs_f64"] = max(relative_errors(grads_t, grads_64).values(), default=0.0)
        out["batch_stats_f32_vs_f64"] = max(relative_errors(bufs_t, bufs_64).values(), default=0.0)
    return out
