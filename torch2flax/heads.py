"""Add-on heads: your own Flax module on top of a converted backbone, fine-tuned as one model.

`with_head(module, variables, head)` wraps a converted model (native or exported) and a head
module into a `HeadModel` whose variables are `{"params": {"backbone": <converted>, "head":
<initialised>}, "batch_stats": {"backbone": ..., "head": ...}}`; the backbone's variables pass
through untouched. The trainer, checkpoints, `torch2flax.load` and `predict` take the
combined model like any other.

A head is any linen module with `__call__(x, train=False)` returning logits and a
`num_classes` field. Its class attribute `head_input` says what it reads:

* `"pooled"` (the default): the backbone's own pre-logits output, `forward_head(features,
  pre_logits=True)`: timm's global pooling (and `drop_rate` dropout), the class token of a
  ViT. Works on every converted model.
* `"map"`: the NHWC feature map of `forward_features` (CNNs only; GeM pooling needs it).

Two heads ship: `MLPHead` and `GeMHead`; `parse_head` builds them from a spec string
(`"mlp:512,dropout=0.3"`, `"gem:p=3"`), as `torch2flax train --head` does.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import freeze, unfreeze

from torch2flax.backend import (
    HEAD_KEY,
    Backend,
    backend_of,
    file_backend,
    input_hw,
    register_backend,
    variable_shapes,
)
from torch2flax.errors import ConfigError, DataError
from torch2flax.layers import BatchNorm, Dense
from torch2flax.utils import freeze_value

Array = jax.Array

HEAD_INPUTS = ("pooled", "map")
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {"relu": nn.relu, "silu": nn.silu, "gelu": nn.gelu}


def head_input(head: nn.Module) -> str:
    """What `head` consumes: "pooled" (default) or "map"."""
    kind = getattr(head, "head_input", "pooled")
    if kind not in HEAD_INPUTS:
        raise ConfigError(f"{type(head).__name__}.head_input={kind!r}: expected one of {HEAD_INPUTS}")
    return kind


class MLPHead(nn.Module):
    """The usual Kaggle head: Dense(hidden) -> BatchNorm -> activation -> Dropout -> Dense(num_classes).

    Reads the backbone's pooled features. BatchNorm (`norm=True`) keeps the hidden layer's
    scale sane whatever the backbone's feature magnitudes are, like `nn.BatchNorm1d` in the
    PyTorch heads it mirrors; it syncs over `axis_name` like the backbone's.
    """

    num_classes: int
    hidden: int = 512
    dropout: float = 0.3
    act: str = "relu"
    norm: bool = True
    dtype: Any = jnp.float32
    axis_name: str | None = None

    head_input: ClassVar[str] = "pooled"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"MLPHead act={self.act!r}: expected one of {sorted(ACTIVATIONS)}")
        x = Dense(self.hidden, use_bias=not self.norm, dtype=self.dtype, name="fc1")(x)
        if self.norm:
            x = BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name="norm")(x, use_running_average=not train)
        x = ACTIVATIONS[self.act](x)
        x = nn.Dropout(self.dropout)(x, deterministic=not train or self.dropout == 0.0)
        return Dense(self.num_classes, dtype=self.dtype, name="fc2")(x)


def gem(x: Array, p: Array | float, eps: float = 1e-6) -> Array:
    """Generalised mean pooling over H, W of an NHWC map: `mean(clamp(x, eps) ** p) ** (1 / p)`.

    Computed in float32 (a bfloat16 power of a power loses the small activations).
    """
    x = jnp.maximum(x.astype(jnp.float32), eps)
    p = jnp.asarray(p, jnp.float32)
    return jnp.mean(x ** p, axis=(1, 2)) ** (1.0 / p)


class GeMHead(nn.Module):
    """GeM pooling (learnable exponent `p`, Radenovic et al.) -> Dropout -> Dense(num_classes).

    Reads the backbone's NHWC feature map, so the backbone must produce one (CNNs). `p=1` is
    average pooling, large `p` tends to max pooling; `learn_p=False` keeps it fixed.
    """

    num_classes: int
    p: float = 3.0
    eps: float = 1e-6
    dropout: float = 0.0
    learn_p: bool = True
    dtype: Any = jnp.float32

    head_input: ClassVar[str] = "map"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        p = self.param("p", nn.initializers.constant(self.p), (1,), jnp.float32) if self.learn_p else self.p
        x = gem(x, p, self.eps).astype(self.dtype)
        x = nn.Dropout(self.dropout)(x, deterministic=not train or self.dropout == 0.0)
        return Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


def _propagate(module: nn.Module, **values: Any) -> nn.Module:
    """`module` cloned with those of `values` that are fields of it and differ (else itself)."""
    fields = {f.name for f in dataclasses.fields(module)}
    updates = {k: v for k, v in values.items() if k in fields and getattr(module, k) != v}
    return module.clone(**updates) if updates else module


class HeadModel(nn.Module):
    """A converted backbone with an add-on head; `__call__(x, train=False)` returns the head's logits.

    `dtype` and `axis_name` reach the backbone and the head (when it has those fields), so the
    trainer's `module.clone(dtype=..., axis_name=...)` sets the compute dtype and BatchNorm sync
    of the whole model. Build it with `with_head`, which also initialises the head.
    """

    backbone: nn.Module
    head: nn.Module
    dtype: Any = jnp.float32
    axis_name: str | None = None

    def __post_init__(self) -> None:
        # Before Flax adopts the fields as children: a field module is only rebuilt while unbound.
        if self.backbone.parent is None:
            object.__setattr__(self, "backbone", _propagate(self.backbone, dtype=self.dtype,
                                                            axis_name=self.axis_name))
        if self.head.parent is None:
            object.__setattr__(self, "head", _propagate(self.head, dtype=self.dtype, axis_name=self.axis_name))
        super().__post_init__()

    @property
    def num_classes(self) -> int:
        return int(self.head.num_classes)

    @property
    def pretrained_cfg(self) -> Any:
        return self.backbone.pretrained_cfg

    @property
    def in_chans(self) -> int:
        return int(self.backbone.in_chans)

    def no_weight_decay(self) -> frozenset[str]:
        """The backbone's exemptions (`pos_embed`, ...) under this model's `backbone.` prefix."""
        names = self.backbone.no_weight_decay()
        return frozenset(f"backbone.{n}" for n in names)

    def feature_info(self) -> list[dict[str, Any]]:
        """The backbone's feature stages, named from this model (`backbone.layer4`)."""
        info = self.backbone.feature_info()
        return [{**f, "module": f"backbone.{f['module']}"} for f in info]

    def head_features(self, x: Array, train: bool = False) -> Array:
        """The head's input for NHWC images `x`: pooled features or the feature map."""
        feats = self.backbone.forward_features(x, train)
        if head_input(self.head) == "pooled":
            return self.backbone.forward_head(feats, train, pre_logits=True)
        check_map(feats, self.backbone, self.head)
        return feats

    def __call__(self, x: Array, train: bool = False) -> Array:
        return self.head(self.head_features(x, train), train)


def _model_label(module: Any) -> str:
    return str(getattr(module, "model_name", None) or (module.pretrained_cfg or {}).get("architecture")
               or type(module).__name__)


def check_map(feats: Any, backbone: Any, head: Any) -> None:
    """Raise unless `feats` is a 4-D NHWC map, which a "map" head needs."""
    shape = getattr(feats, "shape", None)
    if shape is None or len(shape) != 4:
        raise ConfigError(f"{type(head).__name__} reads a 4-D NHWC feature map, but {_model_label(backbone)}'s "
                         f"forward_features returns shape {shape}: use a head on pooled features "
                         "(e.g. --head mlp) with this model")


def head_input_shape(backbone: Any, head: nn.Module, image_size: int | tuple[int, int] | None = None,
                     shapes: Any = None) -> jax.ShapeDtypeStruct:
    """The (abstract) head input for a batch of 1, by `jax.eval_shape` of the backbone: no FLOPs."""
    shapes = variable_shapes(backbone) if shapes is None else shapes
    x = jax.ShapeDtypeStruct((1, *input_hw(backbone, image_size), backbone.in_chans), jnp.float32)
    pooled = head_input(head) == "pooled"

    def features(variables: Any, x: Array) -> Array:
        f = backbone.apply(variables, x, method="forward_features")
        return backbone.apply(variables, f, pre_logits=True, method="forward_head") if pooled else f

    out = jax.eval_shape(features, shapes, x)
    if not pooled:
        check_map(out, backbone, head)
    return jax.ShapeDtypeStruct(out.shape, jnp.float32)


def _init_head(head: nn.Module, feats: jax.ShapeDtypeStruct, seed: int) -> dict[str, Any]:
    key = jax.random.PRNGKey(seed)
    return unfreeze(head.init({"params": key, "dropout": key}, jnp.zeros(feats.shape, feats.dtype), False))


def with_head(module: nn.Module, variables: Mapping[str, Any], head: nn.Module, *, seed: int = 0,
              image_size: int | tuple[int, int] | None = None) -> tuple[HeadModel, Any]:
    """`(HeadModel(module, head), variables)`: the backbone's variables as given, the head's
    initialised from `jax.random.PRNGKey(seed)`.

    The backbone's own classifier is not used; convert with `num_classes=0` to leave it out
    (`torch2flax.convert(name, num_classes=0)`). `image_size` only sets the size the backbone is
    traced at to find the head's input width (default: the model's input size).
    """
    if not isinstance(head, nn.Module):
        raise TypeError(f"head must be a flax.linen Module, got {type(head).__name__}")
    if not hasattr(head, "num_classes"):
        raise TypeError(f"{type(head).__name__} has no num_classes field: the trainer and predict read it")
    if isinstance(module, HeadModel):
        raise ConfigError("the model already has a head: pass its backbone (model.backbone)")
    model = HeadModel(module, head, dtype=module.dtype, axis_name=getattr(module, "axis_name", None))
    head_vars = _init_head(model.head, head_input_shape(model.backbone, model.head, image_size), seed)
    out: dict[str, dict[str, Any]] = {}
    for collection in sorted(set(variables) | set(head_vars)):
        part = {}
        if collection in variables:
            part["backbone"] = variables[collection]
        if collection in head_vars:
            part["head"] = head_vars[collection]
        out[collection] = part
    return model, freeze(out)


@functools.lru_cache(maxsize=8)
def _head_model_shapes(module: HeadModel) -> Any:
    # Cached: the trainer saves the same model every epoch, and tracing a big backbone twice
    # (its variables, then the head's input) is seconds each time.
    shapes = variable_shapes(module.backbone)
    feats = head_input_shape(module.backbone, module.head, shapes=shapes)
    head = jax.eval_shape(lambda x: _init_head(module.head, x, 0), feats)
    return {c: {**({"backbone": shapes[c]} if c in shapes else {}), **({"head": head[c]} if c in head else {})}
            for c in sorted(set(shapes) | set(head))}


# ---------------------------------------------------------------------- the head backend
# The one place that knows a model may carry an add-on head: io, prepare and the trainer ask a
# model's backend (`torch2flax.backend`), and a HeadModel's is this one, which answers for the
# backbone through the backbone's own backend and adds the head.

# Head fields that follow the HeadModel (its dtype and BatchNorm sync axis), not saved with the head.
_HEAD_MODEL_FIELDS = ("parent", "name", "dtype", "axis_name")


def head_config(head: Any) -> dict[str, Any]:
    """The class (module path + qualname) and JSON-able fields of an add-on head."""
    cls = type(head)
    kwargs = {}
    for f in dataclasses.fields(head):
        if f.name in _HEAD_MODEL_FIELDS:
            continue
        v = getattr(head, f.name)
        if f.name.endswith("dtype"):
            v = np.dtype(v).name
        try:
            json.dumps(v)
        except TypeError:
            raise ConfigError(f"{cls.__qualname__}.{f.name}={v!r} cannot be saved: head fields must be "
                             "JSON values (numbers, strings, bools, None, lists/tuples of them)") from None
        kwargs[f.name] = list(v) if isinstance(v, tuple) else v
    return {"module": cls.__module__, "qualname": cls.__qualname__, "kwargs": kwargs}


def head_from_config(config: Mapping[str, Any], source: str = "config") -> Any:
    """The head `head_config` describes; a class this process cannot import raises, saying how to pass it."""
    import importlib

    import jax.numpy as jnp

    try:
        module_name, qualname = config["module"], config["qualname"]
    except KeyError as e:
        raise DataError(f"{source}: the add-on head's config lacks {e}: the file is damaged") from None
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        where = ("the __main__ of the process that saved it (a notebook or script)" if module_name == "__main__"
                 else f"module {module_name!r}")
        raise DataError(f"{source}: its head class {qualname} was defined in {where} and cannot be imported "
                         f"here; pass the head module: torch2flax.load(path, head={qualname}(...)), or define "
                         "the class in an importable module") from None
    kwargs = {k: getattr(jnp, v) if k.endswith("dtype") else freeze_value(v) for k, v in config.get("kwargs", {}).items()}
    return obj(**kwargs)


@register_backend
class HeadBackend(Backend):
    """The backend of a `HeadModel`: a converted backbone (any backend) with an add-on head."""

    name = "head"
    module_types = (HeadModel,)
    converts = False

    def supports(self, architecture: str) -> bool:
        return False

    def convert(self, source: Any, image_size: int | tuple[int, int] | None = None) -> tuple[Any, Any]:
        raise ConfigError("an add-on head goes on a converted model: torch2flax.with_head(module, variables, head)")

    def variable_shapes(self, module: Any) -> Any:
        return _head_model_shapes(module)

    def to_timm(self, module: Any, variables: Mapping[str, Any]) -> Any:
        raise ConfigError(f"a model with an add-on head ({type(module.head).__name__}) has no timm twin; its "
                          "backbone has (module.backbone, with variables['params']['backbone'])")

    def model_name(self, module: Any) -> str:
        return backend_of(module.backbone).model_name(module.backbone)

    def config(self, module: Any) -> dict[str, Any]:
        return backend_of(module.backbone).config(module.backbone)

    def from_config(self, model_name: str, config: Mapping[str, Any]) -> Any:
        raise ConfigError("a model with an add-on head is rebuilt from its file config (from_file_config)")

    def with_run_settings(self, module: Any, *, drop_rate: float, drop_path_rate: float,
                          image_size: int | None = None) -> Any:
        # The rates are the backbone's; the head's own are in its spec.
        backbone = backend_of(module.backbone).with_run_settings(
            module.backbone, drop_rate=drop_rate, drop_path_rate=drop_path_rate, image_size=image_size)
        return module.clone(backbone=backbone)

    def file_fields(self, module: Any) -> dict[str, Any]:
        return backend_of(module.backbone).file_fields(module.backbone)

    def fixed_input_size(self, module: Any) -> tuple[int, int] | None:
        return backend_of(module.backbone).fixed_input_size(module.backbone)

    def headless(self, module: Any) -> Any:
        raise ConfigError("the model already has an add-on head: its backbone (module.backbone) has no classifier")

    def add_on_head(self, module: Any) -> Any:
        return module.head

    def file_config(self, module: Any) -> dict[str, Any]:
        return {**backend_of(module.backbone).file_config(module.backbone), HEAD_KEY: head_config(module.head)}

    def from_file_config(self, config: Mapping[str, Any], source: str, head: Any = None) -> Any:
        inner = _backbone_config(config)
        backbone = file_backend(inner, source).from_file_config(inner, source)
        if head is None:
            head = head_from_config(config[HEAD_KEY], source)
        return HeadModel(backbone, head, dtype=backbone.dtype, axis_name=backbone.axis_name)

    def mismatch_hint(self, config: Mapping[str, Any]) -> str:
        inner = _backbone_config(config)
        return file_backend(inner).mismatch_hint(inner)


def _backbone_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A head model's file config without its head: the backbone's, as its own backend wrote it."""
    return {k: v for k, v in config.items() if k != HEAD_KEY}


# ---------------------------------------------------------------------- spec strings (CLI)

HEADS: dict[str, type[nn.Module]] = {"mlp": MLPHead, "gem": GeMHead}
# The field a bare first value sets: "mlp:512" is hidden=512, "gem:4" is p=4.
_POSITIONAL = {"mlp": "hidden", "gem": "p"}


def _coerce(value: str, default: Any, token: str, spec: str) -> Any:
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise ConfigError(f"head spec {spec!r}: {token!r} needs a {type(default).__name__} value") from None
    return value


def parse_head(spec: str, num_classes: int) -> nn.Module:
    """A shipped head from a spec: `"mlp"`, `"mlp:512"`, `"mlp:512,dropout=0.3"`, `"gem:p=3,dropout=0.2"`.

    After the name and a colon come comma-separated `key=value` settings of the head's fields;
    the first may be a bare value (MLP: `hidden`, GeM: `p`).
    """
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in HEADS:
        raise ConfigError(f"head spec {spec!r}: unknown head {name!r}; choices: {', '.join(HEADS)}")
    cls = HEADS[name]
    fields = {f.name: f.default for f in dataclasses.fields(cls)
              if f.name not in ("parent", "name", "num_classes", "dtype", "axis_name")}
    kwargs: dict[str, Any] = {}
    for i, token in enumerate(t.strip() for t in rest.split(",") if t.strip()):
        key, eq, value = token.partition("=")
        if not eq:
            if i > 0:
                raise ConfigError(f"head spec {spec!r}: {token!r} is not key=value (only the first setting "
                                 f"may be bare, meaning {_POSITIONAL[name]})")
            key, value = _POSITIONAL[name], token
        key = key.strip()
        if key not in fields:
            raise ConfigError(f"head spec {spec!r}: {name} has no setting {key!r}; choices: {', '.join(fields)}")
        if key in kwargs:
            raise ConfigError(f"head spec {spec!r}: {key!r} is given twice")
        kwargs[key] = _coerce(value.strip(), fields[key], token, spec)
    if "act" in kwargs and kwargs["act"] not in ACTIVATIONS:
        raise ConfigError(f"head spec {spec!r}: act={kwargs['act']!r}; choices: {', '.join(ACTIVATIONS)}")
    return cls(num_classes=num_classes, **kwargs)


__all__ = ["HeadModel", "MLPHead", "GeMHead", "gem", "with_head", "parse_head", "head_config", "head_from_config", "HEADS"]
