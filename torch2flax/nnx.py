"""An NNX view of a converted model: the same weights as an `nnx.Module`, for Flax NNX code.

`to_nnx(module, variables)` wraps a converted linen model (native, exported, or with an add-on
head) and its variables in an `NNXModel` holding them as `nnx.Param` and `nnx.BatchStat`;
`convert(name, ...)` is `torch2flax.convert` followed by it. The variables keep linen's nesting
(`model.params.conv1.kernel`, one `nnx.Variable` per array). After `model.eval()`, `model(x)`
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

__all__ = ["NNXModel", "Tree", "convert", "to_nnx"]


class Tree(nnx.Module):
    """One level of a linen variable collection: an attribute per key, a sub-`Tree` or an
    `nnx.Variable` per array (`nnx.Optimizer` keeps one state per Variable holding one array)."""

    def __init__(self, tree: Mapping[str, Any], kind: type[nnx.Variable]):
        for key, value in tree.items():
            setattr(self, key, Tree(value, kind) if isinstance(value, Mapping) else kind(value))

    def _items(self) -> list[tuple[str, Any]]:
        return [(k, v) for k, v in vars(self).items() if isinstance(v, (Tree, nnx.Variable))]

    def to_dict(self) -> dict[str, Any]:
        """The nested dict of arrays linen's `apply` takes."""
        return {k: v.to_dict() if isinstance(v, Tree) else v[...] for k, v in self._items()}

    def assign(self, tree: Mapping[str, Any]) -> None:
        """Put the arrays of `tree` (the same nesting) into the Variables."""
        for key, value in self._items():
            if isinstance(value, Tree):
                value.assign(tree[key])
            else:
                _set(value, tree[key])


class NNXModel(nnx.Module):
    """A converted linen model and its variables as one stateful NNX module (eval mode to start)."""

    def __init__(self, module: Any, variables: Any, *, rngs: nnx.Rngs | None = None):
        self.module = module  # the linen module: static structure, like an NNX layer's hyper-parameters
        self.params = Tree(unfreeze(variables["params"]), nnx.Param)
        self.batch_stats = Tree(unfreeze(variables.get("batch_stats", {})), nnx.BatchStat)
        self.rngs = rngs if rngs is not None else nnx.Rngs(dropout=0)
        # `model.eval()` / `model.train()` set these, as on NNX's Dropout and BatchNorm.
        self.deterministic = True
        self.use_running_average = True

    @property
    def num_classes(self) -> int:
        return int(self.module.num_classes)

    def variables(self) -> dict[str, Any]:
        """The linen variables (`{"params": ..., "batch_stats": ...}`), for `torch2flax.save` and the trainer."""
        out = {"params": self.params.to_dict()}
        stats = self.batch_stats.to_dict()
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
            self.batch_stats.assign(updates["batch_stats"])
        return logits


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
