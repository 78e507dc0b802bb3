"""`ExportedModel`: any timm model as a Flax linen module, by running its exported ATen graph.

The module's fields are plain, hashable and JSON-able (timm name, timm kwargs,
image size, ...). The timm models and exported programs live in one bounded,
process-wide cache (`CACHE`, least recently used out first, `CACHE.clear()`) keyed by
an `ExportSpec` built from those fields; on a miss the timm model is re-created
with random init and re-exported (weights always come from the Flax variables),
so a module rebuilt from its JSON config runs the same graphs.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import traverse_util
from flax.core import FrozenDict, freeze

from torch2flax.errors import ConfigError, DataError
from torch2flax.export import interpreter, layout
from torch2flax.export.capture import example_input, export_timm
from torch2flax.models import PretrainedCfg, pretrained_cfg_from_timm
from torch2flax.utils import freeze_value, thaw_value

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    """What determines the exported graphs: the architecture, its kwargs and the input size.

    `instance_key` is set for modules converted from a timm model instance,
    whose construction kwargs are unknown: their graphs are only in this
    process's cache and cannot be rebuilt elsewhere.
    """

    model_name: str
    timm_kwargs: tuple[tuple[str, Any], ...]
    num_classes: int
    in_chans: int
    image_size: tuple[int, int]
    instance_key: str | None = None

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.in_chans, *self.image_size)

    def __str__(self) -> str:
        return self.model_name


class ExportCache:
    """The timm models behind `ExportSpec`s and their lowered programs, least recently used out first.

    A timm model is the size of its weights, and its programs hold their graphs, so the cache
    keeps at most `max_models` models (and their programs); an evicted spec is rebuilt from
    timm on its next use. A spec converted from a timm instance whose construction could not be
    recovered (`instance_key`) cannot be rebuilt: it stays until `clear()`.
    """

    def __init__(self, max_models: int = 8):
        self.max_models = max_models
        self._models: collections.OrderedDict[ExportSpec, torch.nn.Module] = collections.OrderedDict()
        self._programs: dict[tuple[ExportSpec, str, bool], interpreter.Program] = {}
        self._lock = threading.RLock()  # loader threads and the training loop may both trace

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, spec: ExportSpec) -> bool:
        return spec in self._models

    def clear(self) -> None:
        """Drop every model and program (memory back; graphs are re-exported on next use)."""
        with self._lock:
            self._models.clear()
            self._programs.clear()

    def put(self, spec: ExportSpec, model: torch.nn.Module) -> None:
        with self._lock:
            self._models[spec] = model
            self._models.move_to_end(spec)
            self._evict()

    def drop(self, spec: ExportSpec) -> None:
        with self._lock:
            self._models.pop(spec, None)
            for key in [k for k in self._programs if k[0] == spec]:
                del self._programs[key]

    def model(self, spec: ExportSpec) -> torch.nn.Module:
        """The timm model behind a spec: cached, else created with random init (weights do not matter here)."""
        with self._lock:
            model = self._models.get(spec)
            if model is not None:
                self._models.move_to_end(spec)
                return model
        if spec.instance_key is not None:
            raise RuntimeError(
                f"{spec.model_name} was converted from a timm model instance in another process (or the cache "
                "was cleared); its graph cannot be rebuilt: convert from a timm name and kwargs instead")
        import timm

        model = timm.create_model(spec.model_name, pretrained=False, num_classes=spec.num_classes,
                                  in_chans=spec.in_chans, **dict(spec.timm_kwargs)).eval()
        self.put(spec, model)
        return model

    def program(self, spec: ExportSpec, method: str, train: bool) -> interpreter.Program:
        key = (spec, method, train)
        with self._lock:
            prog = self._programs.get(key)
        if prog is None:
            # Often first asked for inside a jit trace (the train graph at the first training step,
            # another image size's graph): without this, the program's constants (`jnp` arrays made
            # while lowering) would be that trace's tracers, cached and reused by later traces
            # (measured: "Execution supplied 166 arguments but compiled program expected 181").
            with jax.ensure_compile_time_eval():
                prog = _lower(self.model(spec), spec, method, train)
            with self._lock:
                if spec in self._models:  # not evicted meanwhile
                    self._programs[key] = prog
        return prog

    def _evict(self) -> None:
        rebuildable = [s for s in self._models if s.instance_key is None]
        for spec in rebuildable[:max(0, len(rebuildable) - self.max_models)]:
            self.drop(spec)


CACHE = ExportCache()


def freeze_kwargs(kwargs: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """timm kwargs as a sorted tuple of pairs (hashable; lists become tuples)."""
    return freeze_value(dict(kwargs))


def cached_timm_model(spec: ExportSpec) -> torch.nn.Module:
    """The timm model behind a spec (`CACHE.model`)."""
    return CACHE.model(spec)


def feature_names(spec: ExportSpec) -> list[str]:
    """The module names of timm's `feature_info` (the feature stages) for a spec."""
    return [f["module"] for f in getattr(cached_timm_model(spec), "feature_info", None) or ()]


def resized(spec: ExportSpec, size: tuple[int, int]) -> ExportSpec:
    """The same model exported for another input size, with the same variables.

    A model whose graph fixes its size through timm's `img_size` (ViT-style position
    embeddings) is rebuilt with `dynamic_img_size=True`: the parameters keep the converted
    grid and timm's own `resample_abs_pos_embed` resamples them inside the new graph. A
    module converted from a timm instance re-exports that instance (CNNs; a fixed-size
    instance fails at export, naming the op).
    """
    size = (int(size[0]), int(size[1]))
    if size == tuple(spec.image_size):
        return spec
    kwargs = dict(spec.timm_kwargs)
    if "img_size" in kwargs:
        kwargs["dynamic_img_size"] = True
    new = dataclasses.replace(spec, image_size=size, timm_kwargs=freeze_kwargs(kwargs))
    if spec.instance_key is not None and new not in CACHE:
        CACHE.put(new, cached_timm_model(spec))
    return new


def program(spec: ExportSpec, method: str = "forward", train: bool = False) -> interpreter.Program:
    """The lowered program of `method` in train or eval mode (exported on first use, then cached)."""
    return CACHE.program(spec, method, train)


def _lower(model: torch.nn.Module, spec: ExportSpec, method: str, train: bool) -> interpreter.Program:
    ep = export_timm(model, train=train, input_size=spec.input_size, method=method)
    name = f"{spec.model_name} ({method}, {'train' if train else 'eval'})"
    prog = interpreter.lower(ep, name=name, prefix="" if method == "forward" else "model.",
                             aliases=tied_names(model))
    params, buffers = flat_state(model)
    x = example_input(model, spec.input_size, method).numpy()
    interpreter.abstract_check(prog, params, buffers, [x])  # op-argument errors surface here, not at run time
    return prog


def flat_state(model: torch.nn.Module) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Parameters and persistent buffers by torch name (num_batches_tracked dropped), as numpy."""
    params = {k: _numpy(v) for k, v in model.named_parameters()}
    persistent = model.state_dict()
    buffers = {k: _numpy(v) for k, v in model.named_buffers()
               if k in persistent and not k.endswith("num_batches_tracked")}
    return params, buffers


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """Every other name of a tied parameter/buffer -> the one `named_parameters()` keeps.

    Some timm models share one module under two attributes (CoaT's `cpe1` is also
    each serial block's `cpe`); torch.export may name either; variables hold one.
    """
    out: dict[str, str] = {}
    for named in (model.named_parameters, model.named_buffers):
        first: dict[int, str] = {}
        for name, t in named(remove_duplicate=False):
            out[name] = first.setdefault(id(t), name)
    return {k: v for k, v in out.items() if k != v}


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"stages.0.conv.weight": a} -> {"stages": {"0": {"conv": {"weight": a}}}}."""
    return traverse_util.unflatten_dict(dict(flat), sep=".")


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `nest`."""
    return traverse_util.flatten_dict(tree, sep=".")


def _get(tree: Mapping[str, Any], name: str) -> Any:
    for part in name.split("."):
        tree = tree[part]
    return tree


def _replace(tree: Mapping[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a nested tree with the leaves at the (relative, dotted) names in `updates` replaced."""
    flat = flatten(tree)
    flat.update({k: v.astype(flat[k].dtype) for k, v in updates.items()})
    return nest(flat)


class ExportedModel(nn.Module):
    """A timm model run from its exported core-ATen graph, with the native models' contract.

    Input is NHWC float; `__call__(x, train=False)` runs the eval graph, or the
    train graph with `train=True` (BatchNorm batch statistics, running stats
    written to `batch_stats` when it is mutable, dropout and drop-path drawing
    from the `"dropout"` RNG stream). Variables are `{"params", "batch_stats"}`
    nested by timm's module path with torch's leaf names and layouts
    (`params["stages"]["0"]["conv_dw"]["weight"]` is OIHW); `batch_stats` holds
    every persistent buffer (BatchNorm `running_mean` / `running_var`) except
    `num_batches_tracked`. `dtype=bfloat16` computes in bf16 from float32
    variables (normalisation statistics stay float32). With `axis_name`, training
    BatchNorm averages its statistics over that mapped axis (sync BN).

    `forward_features` / `forward_head` run separately exported graphs of timm's
    methods (exported on first use). 4-D feature maps are returned NHWC (and
    `forward_head` takes them NHWC), like the native models; other outputs
    (ViT tokens) keep timm's layout.
    """

    model_name: str
    timm_kwargs: tuple[tuple[str, Any], ...] = ()
    num_classes: int = 1000
    in_chans: int = 3
    image_size: tuple[int, int] = (224, 224)
    pretrained_cfg: PretrainedCfg | None = None
    dtype: Any = jnp.float32
    axis_name: str | None = None
    instance_key: str | None = None

    @property
    def spec(self) -> ExportSpec:
        return ExportSpec(self.model_name, self.timm_kwargs, self.num_classes, self.in_chans,
                          tuple(self.image_size), self.instance_key)

    def setup(self):
        params, buffers = flat_state(cached_timm_model(self.spec))
        # One Flax variable per top-level timm attribute, each holding the nested subtree; the
        # initialisers return timm's own init (the rng is unused: weights come from conversion).
        self._params = {k: self.param(k, _const(v)) for k, v in nest(params).items()}
        self._stats = {k: self.variable("batch_stats", k, _const(v), None) for k, v in nest(buffers).items()}

    def _run(self, method: str, x: Array, train: bool, hooks: Mapping[Any, Any] | None = None) -> Any:
        spec = self.spec
        if method in ("forward", "forward_features"):  # another image size: that size's graph (exported once)
            spec = resized(spec, x.data.shape[1:3] if isinstance(x, layout.ChannelsLast) else x.shape[2:4])
        prog = program(spec, method, train)
        params = {n: _get(self._params, n) for n in prog.param_names}
        buffers = {n: self._stat(n) for n in prog.buffer_names}
        rng = self.make_rng("dropout") if prog.random else None
        outs, updates = interpreter.run(prog, params, buffers, [x], rng=rng, hooks=hooks,
                                        axis_name=self.axis_name if train else None, dtype=self.dtype)
        if updates and not self.is_initializing():
            by_top: dict[str, dict[str, Array]] = {}
            for name, value in updates.items():
                top, _, rest = name.partition(".")
                by_top.setdefault(top, {})[rest] = value
            for top, ups in by_top.items():
                var = self._stats[top]
                var.value = _replace(var.value, ups) if "" not in ups else ups[""].astype(var.value.dtype)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _stat(self, name: str) -> Array:
        top, _, rest = name.partition(".")
        value = self._stats[top].value
        return _get(value, rest) if rest else value

    def _nchw(self, x: Array) -> layout.ChannelsLast:
        # The graph's NCHW input, kept NHWC until an op needs otherwise (`layout`).
        return layout.ChannelsLast(jnp.asarray(x, self.dtype))

    def __call__(self, x: Array, train: bool = False) -> Array:
        return self._run("forward", self._nchw(x), train)

    def forward_features(self, x: Array, train: bool = False) -> Array:
        y = self._run("forward_features", self._nchw(x), train)
        return y.transpose(0, 2, 3, 1) if self._nchw_features() else y

    def forward_head(self, x: Array, train: bool = False, pre_logits: bool = False) -> Array:
        x = jnp.asarray(x, self.dtype)
        if self._nchw_features():
            x = layout.ChannelsLast(x)
        return self._run("forward_head_pre_logits" if pre_logits else "forward_head", x, train)

    def intermediates(self, x: Array, names: tuple[str, ...], taps: Mapping[str, Array] | None = None,
                      train: bool = False, method: str = "forward") -> tuple[Array, dict[str, Array]]:
        """`(output, {name: module output})` for timm module paths `names`, from one run of the
        graph of `method` ("forward": logits, or "forward_features", each as that method returns it).

        A module's output is the node `interpreter.module_outputs` finds for it. 4-D outputs of
        a model whose `output_fmt` is NCHW (timm's default) come back NHWC, like
        `forward_features`; others keep timm's layout. `taps[name]` (same shape as that
        output) is added to the output before the rest of the graph runs: zero taps make
        `jax.grad` with respect to them the gradient with respect to the module's output.
        """
        if method not in ("forward", "forward_features"):
            raise ConfigError(f"intermediates: method must be 'forward' or 'forward_features', got {method!r}")
        taps = dict(taps or {})
        x = self._nchw(x)
        spec = resized(self.spec, x.data.shape[1:3])
        found = interpreter.module_outputs(program(spec, method, train),
                                           prefix="" if method == "forward" else "model.")
        unknown = [n for n in (*names, *taps) if n not in found]
        if unknown:
            raise ConfigError(f"{self.model_name}: no module output named {unknown} in the {method} graph; "
                             f"modules with outputs include {feature_names(self.spec) or sorted(found)[:20]}")
        nchw = getattr(cached_timm_model(self.spec), "output_fmt", "NCHW") == "NCHW"
        captured: dict[str, Array] = {}

        def hook(name: str) -> Callable[[Any], Any]:
            def fn(value: Any) -> Any:
                cl = isinstance(value, layout.ChannelsLast)
                flip = not cl and nchw and value.ndim == 4
                user = value.data if cl else (value.transpose(0, 2, 3, 1) if flip else value)
                if name in taps:
                    user = user + taps[name].astype(user.dtype)
                    value = layout.ChannelsLast(user) if cl else (user.transpose(0, 3, 1, 2) if flip else user)
                captured[name] = user
                return value
            return fn

        out = self._run(method, x, train, hooks={found[n]: hook(n) for n in {*names, *taps}})
        if method == "forward_features" and self._nchw_features():
            out = out.transpose(0, 2, 3, 1)
        return out, {n: captured[n] for n in names}

    def feature_info(self) -> list[dict[str, Any]]:
        """timm's `feature_info` of the model: `{"module", "num_chs", "reduction"}` per feature stage."""
        return [dict(f) for f in getattr(cached_timm_model(self.spec), "feature_info", None) or ()]

    def _nchw_features(self) -> bool:
        """Whether timm's forward_features returns an NCHW map (4-D with channels at dim 1)."""
        out = program(self.spec, "forward_features", False).output_node.args[0][0].meta.get("val")
        n = getattr(cached_timm_model(self.spec), "num_features", None)
        return out is not None and out.ndim == 4 and out.shape[1] == n and out.shape[3] != n

    def variable_shapes(self) -> dict[str, Any]:
        """`{"params": ..., "batch_stats": ...}` as `jax.ShapeDtypeStruct`s, without tracing the graph."""
        params, buffers = flat_state(cached_timm_model(self.spec))
        shape = lambda flat: nest({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()})
        return {"params": shape(params), **({"batch_stats": shape(buffers)} if buffers else {})}

    def no_weight_decay(self) -> frozenset[str]:
        """Top-level parameter names timm exempts from weight decay (`pos_embed`, `cls_token`, ...)."""
        model = cached_timm_model(self.spec)
        names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        return frozenset(str(n) for n in names)

    # ------------------------------------------------------------------ rebuilding from JSON

    def config(self) -> dict[str, Any]:
        """JSON-able fields: `ExportedModel.from_config(m.config())` rebuilds the module (re-exporting)."""
        if self.instance_key is not None:
            raise ConfigError(f"{self.model_name} was converted from a timm instance: its graph cannot be rebuilt "
                             "from a config; convert from a timm name and kwargs")
        return {
            "model_name": self.model_name, "timm_kwargs": {k: thaw_value(v) for k, v in self.timm_kwargs},
            "num_classes": self.num_classes, "in_chans": self.in_chans, "image_size": list(self.image_size),
            "pretrained_cfg": self.pretrained_cfg.to_dict() if self.pretrained_cfg is not None else None,
            "dtype": jnp.dtype(self.dtype).name, "axis_name": self.axis_name,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ExportedModel:
        cfg = dict(config)
        return cls(
            model_name=cfg["model_name"], timm_kwargs=freeze_kwargs(cfg.get("timm_kwargs") or {}),
            num_classes=int(cfg["num_classes"]), in_chans=int(cfg.get("in_chans", 3)),
            image_size=tuple(cfg["image_size"]),
            pretrained_cfg=PretrainedCfg(cfg["pretrained_cfg"]) if cfg.get("pretrained_cfg") else None,
            dtype=getattr(jnp, cfg.get("dtype", "float32")), axis_name=cfg.get("axis_name"),
        )


def _const(tree: Any) -> Callable[..., Any]:
    def init(*_: Any) -> Any:
        return jax.tree_util.tree_map(jnp.asarray, tree)
    return init


# ---------------------------------------------------------------------- conversion


def _image_size(image_size: int | tuple[int, int] | None, model: torch.nn.Module) -> tuple[int, int]:
    if image_size is None:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
        return (int(size[1]), int(size[2]))
    if isinstance(image_size, int):
        return (image_size, image_size)
    return (int(image_size[0]), int(image_size[1]))


def convert_exported(
    model_or_name: str | torch.nn.Module,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    **timm_kwargs: Any,
) -> tuple[ExportedModel, FrozenDict]:
    """Any timm model (name or instance) as `(ExportedModel, variables)` via torch.export.

    Exports the eval graph of `forward` at `image_size` (default: the model's
    pretrained input size) and checks every op against the op table: an unsupported
    op raises `UnsupportedOpError` here, naming the op, the model, the node and its
    source line. The train graph is exported, and checked alike, when the model is
    first applied with `train=True` (a training step's trace). The timm model comes from `torch2flax.timm_source.timm_model`
    (`checkpoint`, `pretrained`, `num_classes` as in `torch2flax.convert`). `variables` is a
    FrozenDict of float32 `params` and `batch_stats` (see `ExportedModel`).
    """
    from torch2flax.timm_source import TimmSource
    from torch2flax.timm_source import timm_model as source_model

    if isinstance(model_or_name, str) or getattr(model_or_name, "pretrained_cfg", None):
        source = source_model(model_or_name, pretrained=pretrained, checkpoint=checkpoint,
                              num_classes=num_classes, **timm_kwargs)
    else:  # a torch model timm did not build: exportable, but only in this process
        if pretrained or checkpoint is not None or timm_kwargs:
            raise TypeError("pretrained/checkpoint/timm kwargs apply to a model name, not to a model instance")
        if num_classes is not None and num_classes != model_or_name.num_classes:
            raise ConfigError(f"{type(model_or_name).__name__} is not a timm model: cannot reset its head")
        source = TimmSource(model_or_name.eval(), type(model_or_name).__name__, None)
    return from_source(source, image_size)


def from_source(source: Any, image_size: int | tuple[int, int] | None = None) -> tuple[ExportedModel, FrozenDict]:
    """`(ExportedModel, variables)` for a `TimmSource` (the export backend's conversion)."""
    from torch2flax.timm_source import in_chans

    model = source.model
    instance_key = None if source.timm_kwargs is not None else f"{source.architecture}@{uuid.uuid4().hex[:12]}"
    spec = ExportSpec(source.architecture, freeze_kwargs(source.timm_kwargs or {}), int(model.num_classes),
                      in_chans(model), _image_size(image_size, model), instance_key)
    CACHE.put(spec, model)
    try:
        # The eval graph now; the train graph when the model first trains (`ExportedModel` exports
        # on first use, as after `load`): converting for inference, parity or features exports once
        # (the train graph took as long again: 8.4 of GhostNet's 17.4 s at 32 px, 2026-12-08).
        program(spec, "forward", False)
    except Exception:
        CACHE.drop(spec)
        raise
    params, buffers = flat_state(model)
    cfg = getattr(model, "pretrained_cfg", None)
    module = ExportedModel(
        model_name=spec.model_name, timm_kwargs=spec.timm_kwargs, num_classes=spec.num_classes,
        in_chans=spec.in_chans, image_size=spec.image_size,
        pretrained_cfg=pretrained_cfg_from_timm(cfg) if cfg else None, instance_key=instance_key,
    )
    variables = {"params": nest({k: jnp.asarray(v) for k, v in params.items()})}
    if buffers:
        variables["batch_stats"] = nest({k: jnp.asarray(v) for k, v in buffers.items()})
    return module, freeze(variables)


def exported_state_dict(variables: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The torch state dict of an `ExportedModel`'s variables (without `num_batches_tracked`)."""
    flat = flatten(variables.get("params", {}))
    flat.update(flatten(variables.get("batch_stats", {})))
    return {k: torch.from_numpy(np.array(v, dtype=np.float32 if v.dtype == jnp.bfloat16 else v.dtype))
            for k, v in flat.items()}


def timm_from_exported(module: ExportedModel, variables: Mapping[str, Any]) -> torch.nn.Module:
    """A timm model (eval mode) carrying an `ExportedModel`'s weights: the conversion run backwards."""
    import copy

    model = copy.deepcopy(cached_timm_model(module.spec))
    missing, unexpected = model.load_state_dict(exported_state_dict(variables), strict=False)
    tied = tied_names(model)
    missing = [k for k in missing if not k.endswith("num_batches_tracked") and k not in tied]
    if missing or unexpected:
        raise DataError(f"{module.model_name}: variables do not match timm's state dict "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval()
