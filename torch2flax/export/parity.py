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
    with jax.default_matmul_precision("highest"):  # GPUs default to TF32 matmuls/convs (~1e-3 relative)
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

    with jax.default_matmul_precision("highest"):  # as in eval_parity
        (loss, new_stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    as_np = lambda t: {k: np.asarray(v, np.float64) for k, v in flatten(t).items()}
    return float(loss), as_np(grads), as_np(new_stats)


# A tensor whose reference norm is below this fraction of the largest is zero at float32 precision.
ZERO = 1e-6


def relative_errors(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per tensor ||got - ref|| / ||ref||; tensors whose reference is ~0 are measured against
    ZERO x the largest norm."""
    if set(got) != set(ref):
        raise KeyError(f"tensor names differ: {sorted(set(got) ^ set(ref))[:5]}")
    floor = ZERO * max((float(np.linalg.norm(v)) for v in ref.values()), default=1.0)
    return {k: float(np.linalg.norm(got[k] - ref[k])) / max(float(np.linalg.norm(ref[k])), floor, 1e-30)
            for k in ref}


def _within_bounds(got: Mapping[str, np.ndarray], ref32: Mapping[str, np.ndarray], ref64: Mapping[str, np.ndarray],
                   tol: float) -> dict[str, Any]:
    """Every tensor of `got` within `tol` of timm's float32 result, or, where timm's own float32
    results are further than that from float64 (`floor`: the largest such difference over the
    model's tensors, one figure per model), within twice the floor of timm float32 or of float64.

    A tensor that is zero in float64 (below ZERO x the largest norm: the gradient of a bias that a
    normalisation follows) is float32 rounding noise in any float32 step, and its size depends on
    the summation order, which XLA releases change: it passes while that noise stays below
    ZERO x the largest norm (or under the rule above). A real error there is of the order of the
    neighbouring gradients."""
    e32, e64, floor = relative_errors(got, ref32), relative_errors(got, ref64), relative_errors(ref32, ref64)
    bound = max(tol, 2 * max(floor.values(), default=0.0))
    largest = max((float(np.linalg.norm(v)) for v in ref64.values()), default=0.0)
    zero = {k for k, v in ref64.items() if float(np.linalg.norm(v)) <= ZERO * largest}
    excess = {k: min(e32[k], e64[k]) / bound for k in e32}
    excess.update({k: min(excess[k], e64[k]) for k in zero})
    worst = max(excess, key=excess.get) if excess else ""
    return {"rel": max(e32.values(), default=0.0), "vs_f64": max(e64.values(), default=0.0),
            "floor": max(floor.values(), default=0.0), "bound": bound, "ok": all(v <= 1 for v in excess.values()),
            "worst": worst, "worst_rel": e32.get(worst, 0.0), "worst_vs_f64": e64.get(worst, 0.0)}


def train_parity(model: torch.nn.Module, module: ExportedModel, variables: Any, x: np.ndarray,
                 labels: np.ndarray, *, tol: float = 1e-4) -> dict[str, Any]:
    """One training step (loss, every gradient, updated batch_stats) against timm's float32 and float64 steps.

    Deep random-BN nets are ill-conditioned: timm's own float32 gradients can be
    far from float64 (the floor). Each tensor passes at `tol` relative in norm,
    or where twice the model's floor is larger, within that (see `_within_bounds`).
    Returns `{"loss"|"grad"|"batch_stats": {rel, vs_f64, floor, ok, worst, ...}, "ok": bool}`.
    """
    loss_t, grads_t, bufs_t = torch_train_step(model, x, labels)
    loss_64, grads_64, bufs_64 = torch_train_step(model, x, labels, torch.float64)
    loss_j, grads_j, bufs_j = jax_train_step(module, variables, x, labels)
    scalar = lambda v: {"loss": np.asarray(v, np.float64)}
    out = {"loss": _within_bounds(scalar(loss_j), scalar(loss_t), scalar(loss_64), tol),
           "grad": _within_bounds(grads_j, grads_t, grads_64, tol),
           "batch_stats": _within_bounds(bufs_j, bufs_t, bufs_64, tol)}
    out["ok"] = all(out[k]["ok"] for k in ("loss", "grad", "batch_stats"))
    return out
