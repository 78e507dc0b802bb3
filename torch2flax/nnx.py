"""An NNX view of a converted model: the same weights as an `nnx.Module`, for Flax NNX code.

`to_nnx(module, variables)` wraps a converted linen model (native, exported, or with an add-on
head) and its variables in an `NNXModel` holding them as `nnx.Param` and `nnx.BatchStat`;
`convert(name, ...)` is `torch2flax.convert` followed by it. After `model.eval()`, `model(x)`
gives the linen model's eval logits; after `model.train()`, a call runs the training forward
(dropout from the model's `nnx.Rngs`, BatchNorm statistics updated in place as the linen trainer
updates them), so `nnx.Optimizer(model, tx, wrt=nnx.Param)` and `nnx.jit` fine-tune it.

Written here rather than with `flax.nnx.bridge.ToNNX`: that wrapper initialises the linen module
from a sample input (a forward pass of the whole model, then our weights put over it), and the
linen `train` argument and `batch_stats` mutability, which decide between eval and training,
would still be the caller's to pass on every call; `NNXModel` answers to `model.eval()` /
`model.train()` like NNX's own layers.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx
from flax.core import unfreeze

__all__ = ["NNXModel", "convert", "to_nnx"]


class NNXModel(nnx.Module):
    """A converted linen model and its variables as one stateful NNX module (eval mode to start)."""

    def __init__(self, module: Any, variables: Any, *, rngs: nnx.Rngs | None = None):
        self.module = module  # the linen module: static structure, like an NNX layer's hyper-parameters
        self.params = nnx.Param(unfreeze(variables["params"]))
        self.batch_stats = nnx.BatchStat(unfreeze(variables.get("batch_stats", {})))
        self.rngs = rngs if rngs is not None else nnx.Rngs(dropout=0)
        # `model.eval()` / `model.train()` set these, as on NNX's Dropout and BatchNorm.
        self.deterministic = True
        self.use_running_average = True

    @property
    def num_classes(self) -> int:
        return int(self.module.num_classes)

    def variables(self) -> dict[str, Any]:
        """The linen variables (`{"params": ..., "batch_stats": ...}`), for `torch2flax.save` and the trainer."""
        out = {"params": _plain(self.params.value)}
        stats = _plain(self.batch_stats.value)
        if stats:
            out["batch_stats"] = stats
        return out

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits for NHWC images `x` (normalised as the model's `pretrained_cfg` says)."""
        if self.deterministic and self.use_running_average:
            return self.module.apply(self.variables(), x, train=False)
        logits, updates = self.module.apply(self.variables(), x, train=True, mutable=["batch_stats"],
                                            rngs={"dropout": self.rngs.dropout()})
        if "batch_stats" in updates:  # models without BatchNorm (a ViT) have none
            _set(self.batch_stats, unfreeze(updates["batch_stats"]))
        return logits


def _plain(tree: Any) -> Any:
    """Nested dicts of arrays: `nnx.Optimizer.update` writes a Variable's nested value back as an
    `nnx.State`, which linen's `apply` does not take."""
    return {k: _plain(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _set(variable: nnx.Variable, value: Any) -> None:
    # flax 0.12.8+ deprecates assigning `.value` for `set_value`, which flax 0.11 lacks.
    if hasattr(variable, "set_value"):
        variable.set_value(value)
    else:
        variable.value = value


def to_nnx(module: Any, variables: Any, *, rngs: nnx.Rngs | None = None) -> NNXModel:
    """`NNXModel(module, variables)`: a converted (or `torch2flax.load`ed) model as an NNX module."""
    return NNXModel(module, variables, rngs=rngs)


def convert(model: Any, *, rngs: nnx.Rngs | None = None, **kwargs: Any) -> NNXModel:
    """`torch2flax.convert(model, **kwargs)` as an `NNXModel`."""
    from torch2flax.converter import convert as convert_linen

    module, variables = convert_linen(model, **kwargs)
    return NNXModel(module, variables, rngs=rngs)
