"""Intermediate outputs of converted models by timm module name (timm's `forward_intermediates`).

`forward_intermediates(module, variables, x, ["layer3", "layer4"])` returns the logits and
the outputs of those modules, for every converted model without touching its code:

* native Flax models mirror timm's module tree, so a module's output is the value its
  `__call__` returns, caught with `flax.linen.intercept_methods`;
* exported models (`ExportedModel`) run timm's own graph, whose nodes record the module
  they came from: the same interceptor runs the graph through `ExportedModel.intermediates`,
  which hooks the node that leaves each module. An exported backbone under an add-on head
  (`HeadModel`) is reached the same way (`backbone.stages.3`).

`taps` add an array to a module's output before the rest of the model runs; with zero taps,
`jax.grad` with respect to them is the gradient with respect to that output (Grad-CAM).
4-D maps come back NHWC, like `forward_features`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from torch2flax.backend import find_backend
from torch2flax.errors import ConfigError

Array = jax.Array
# Methods of an exported model whose graph can be hooked, and the graph each runs.
GRAPH_METHODS = {"__call__": "forward", "forward_features": "forward_features"}


@dataclasses.dataclass(frozen=True)
class FeatureInfo:
    """One feature stage: timm module name, channels and reduction (input size / map size)."""

    name: str
    channels: int
    reduction: int


def feature_info(module: nn.Module) -> list[FeatureInfo]:
    """The model's feature stages in order, from timm's `feature_info` (last = deepest)."""
    try:
        info = module.feature_info()
    except AttributeError:  # a Flax module torch2flax did not build
        info = []
    if not info:
        raise ConfigError(f"{type(module).__name__} has no feature_info: name the layers explicitly")
    return [FeatureInfo(str(f["module"]), int(f["num_chs"]), int(f["reduction"])) for f in info]


def forward_intermediates(
    module: nn.Module,
    variables: Mapping[str, Any],
    x: Array,
    layers: Sequence[str] | str | None = None,
    *,
    taps: Mapping[str, Array] | None = None,
    train: bool = False,
    rngs: Any = None,
    mutable: Any = False,
) -> Any:
    """`(logits, {name: output})` for the named modules (default: every `feature_info` stage).

    `x` is an NHWC image batch. With `mutable`, returns `((logits, outputs), updated
    collections)` as `module.apply` does. Raises `ConfigError` (a ValueError) for a name the model does not have.
    """
    names = (layers,) if isinstance(layers, str) else tuple(layers or [f.name for f in feature_info(module)])
    mutable = tuple(mutable) if isinstance(mutable, list) else mutable
    static = (module, names, bool(train), mutable)
    try:
        hash(static)
    except TypeError:  # a user's module with unhashable fields: run it as is (op by op unless jitted)
        return _intermediates(module, variables, x, names, dict(taps or {}), train, rngs, mutable)
    # Compiled once per (module, names, train, mutable): run op by op, an exported graph's hundreds
    # of primitives each compile on first use (measured: 15 s for timm's test_convnext, docs/benchmarks.md).
    return _jitted_intermediates(module, variables, x, names, dict(taps or {}), train, rngs, mutable)


def _intermediates(module: nn.Module, variables: Any, x: Array, names: tuple[str, ...], taps: dict[str, Array],
                   train: bool, rngs: Any, mutable: Any) -> Any:
    wanted = {*names, *taps}
    captured: dict[str, Array] = {}

    def intercept(next_fun: Any, args: Any, fn_kwargs: Any, context: Any) -> Any:
        method, sub = context.method_name, context.module
        prefix = ".".join(sub.path)
        backend = find_backend(sub, load=False)  # a module that exists has its backend imported
        if backend is not None and backend.runs_own_graph and method in GRAPH_METHODS:
            # An exported graph (the model, or a backbone inside it): hook the nodes it owns.
            inner = {n[len(prefix) + 1:] if prefix else n: n for n in wanted
                     if not prefix or n.startswith(prefix + ".")}
            if inner:
                x, *rest = args
                train_arg = rest[0] if rest else fn_kwargs.get("train", False)
                out, feats = sub.intermediates(x, tuple(inner), {k: taps[n] for k, n in inner.items() if n in taps},
                                               train_arg, method=GRAPH_METHODS[method])
                captured.update({inner[k]: v for k, v in feats.items()})
                return out
        out = next_fun(*args, **fn_kwargs)
        if method == "__call__" and prefix in wanted:
            if prefix in taps:
                out = out + taps[prefix].astype(out.dtype)
            captured[prefix] = out
        return out

    with nn.intercept_methods(intercept):
        result = module.apply(variables, x, train=train, rngs=rngs, mutable=mutable)
    missing = sorted(wanted - set(captured))
    if missing:
        try:
            stages = [f.name for f in feature_info(module)]
        except ValueError:
            stages = []
        raise ConfigError(f"{type(module).__name__}: no module named {missing} was called (names follow "
                         f"timm's module tree, e.g. {stages or ['layer4']})")
    feats = {n: captured[n] for n in names}
    if mutable:
        logits, updates = result
        return (logits, feats), updates
    return result, feats


_jitted_intermediates = jax.jit(_intermediates, static_argnames=("module", "names", "train", "mutable"))
