"""The native backend: hand-written Flax twins of timm families (`torch2flax.models`), filled by
mapping rules driven by the torch module tree and the Flax variable tree.

No per-model key tables: each torch module with tensors is matched by its
dotted name to the Flax submodule at the same path (`layer1.0.conv1` ->
`params/layer1/0/conv1`) and converted by torch type (Conv2d, Linear,
BatchNorm2d). The same rules run backwards (`flax_to_torch`), so a Flax
checkpoint can be checked against timm, and torch gradients can be mapped onto
Flax gradients.

Strict both ways: every torch tensor is consumed (`num_batches_tracked`, which
has no Flax counterpart, is the one documented exception) and every Flax leaf is
filled with the right shape, else the error names the torch key, the Flax path
and both shapes. Layer hyper-parameters (stride, padding, groups, BatchNorm eps
and momentum) are checked too, so a structural mismatch fails at conversion
instead of surfacing as a silent numerical difference.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from torch2flax.backend import Backend, register_backend
from torch2flax.errors import ConfigError, DataError
from torch2flax.models import create_model, get_entry, model_classes, pretrained_cfg_from_timm, registry_name
from torch2flax.timm_source import IGNORED_TORCH_SUFFIXES, architecture, load_into_timm

# Torch tensor <-> Flax leaf rules


@dataclasses.dataclass(frozen=True)
class Rule:
    """One torch tensor <-> one Flax leaf."""

    torch_key: str
    collection: str
    flax_path: tuple[str, ...]
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]

    @property
    def flax_name(self) -> str:
        return "/".join((self.collection,) + self.flax_path)


def _identity(a: np.ndarray) -> np.ndarray:
    return a


def _oihw_to_hwio(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(2, 3, 1, 0))


def _hwio_to_oihw(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(3, 2, 0, 1))


def _transpose(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.T)


# ---------------------------------------------------------------------------
# the generic mapping


def flax_layers(module: Any, input_hw: tuple[int, int] = (64, 64)) -> tuple[Any, dict[tuple[str, ...], Any]]:
    """Shapes of `module`'s variables (no FLOPs spent) and its layers by path."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    layers: dict[tuple[str, ...], Any] = {}

    def record(next_fun, args, kwargs, context):
        layers.setdefault(tuple(context.module.path), context.module)
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((1, *input_hw, module.in_chans), jnp.float32)
    with nn.intercept_methods(record):
        shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)
    return shapes, layers


def _check_conv(name: str, tm: Any, fm: Any) -> None:
    from torch2flax.layers import Conv, _padding, _pair

    if not isinstance(fm, Conv):
        raise ConfigError(f"torch layer {name!r} is Conv2d but the Flax layer at that path is {type(fm).__name__}")
    if isinstance(tm.padding, str) or tm.padding_mode != "zeros":
        raise ConfigError(f"torch layer {name!r}: padding={tm.padding!r}, padding_mode={tm.padding_mode!r} unsupported")
    torch_hp = (tuple(tm.stride), _padding(tuple(tm.padding)), tuple(tm.dilation), tm.groups)
    flax_hp = (_pair(fm.strides), _padding(fm.padding), _pair(fm.kernel_dilation), fm.feature_group_count)
    if torch_hp != flax_hp:
        raise ConfigError(f"layer {name!r}: torch (stride, padding, dilation, groups)={torch_hp} "
                         f"but Flax has {flax_hp}")


def _check_bn(name: str, tm: Any, fm: Any) -> None:
    from torch2flax.layers import BatchNorm

    if not isinstance(fm, BatchNorm):
        raise ConfigError(f"torch layer {name!r} is BatchNorm2d but the Flax layer at that path is {type(fm).__name__}")
    if tm.momentum is None:
        raise ConfigError(f"torch layer {name!r}: BatchNorm momentum=None (cumulative average) is unsupported")
    if not math.isclose(tm.eps, fm.epsilon, rel_tol=1e-6) or not math.isclose(1.0 - tm.momentum, fm.momentum,
                                                                             rel_tol=1e-6):
        raise ConfigError(f"layer {name!r}: torch eps={tm.eps}, momentum={tm.momentum} but Flax "
                         f"epsilon={fm.epsilon}, momentum={fm.momentum} (Flax momentum = 1 - torch momentum)")


def build_rules(model: Any, layers: Mapping[tuple[str, ...], Any], supported: Iterable[str] | None = None) -> list[Rule]:
    """The torch-key <-> Flax-leaf rules for `model`, checking each layer's Flax twin."""
    import torch.nn as tnn

    from torch2flax.layers import Dense

    supported = set(supported) if supported is not None else None
    rules: list[Rule] = []
    for name, tm in model.named_modules():
        tname = type(tm).__name__
        if supported is not None and tname not in supported:
            raise ConfigError(f"torch module {name or '<root>'!r} of type {tname} has no Flax counterpart "
                             f"(supported types: {sorted(supported)})")
        own = [k for k, _ in tm.named_parameters(recurse=False)] + [k for k, _ in tm.named_buffers(recurse=False)]
        if not own:
            continue
        path = tuple(name.split("."))
        fm = layers.get(path)
        if fm is None:
            raise ConfigError(f"torch layer {name!r} ({tname}, tensors {own}) has no Flax layer at {'/'.join(path)}")
        key = f"{name}."
        if isinstance(tm, tnn.Conv2d):
            _check_conv(name, tm, fm)
            rules.append(Rule(key + "weight", "params", path + ("kernel",), _oihw_to_hwio, _hwio_to_oihw))
            if tm.bias is not None:
                rules.append(Rule(key + "bias", "params", path + ("bias",), _identity, _identity))
        elif isinstance(tm, tnn.Linear):
            if not isinstance(fm, Dense):
                raise ConfigError(f"torch layer {name!r} is Linear but the Flax layer is {type(fm).__name__}")
            rules.append(Rule(key + "weight", "params", path + ("kernel",), _transpose, _transpose))
            if tm.bias is not None:
                rules.append(Rule(key + "bias", "params", path + ("bias",), _identity, _identity))
        elif isinstance(tm, tnn.BatchNorm2d):
            _check_bn(name, tm, fm)
            if not (tm.affine and tm.track_running_stats):
                raise ConfigError(f"torch layer {name!r}: BatchNorm without affine/running stats is unsupported")
            rules += [
                Rule(key + "weight", "params", path + ("scale",), _identity, _identity),
                Rule(key + "bias", "params", path + ("bias",), _identity, _identity),
                Rule(key + "running_mean", "batch_stats", path + ("mean",), _identity, _identity),
                Rule(key + "running_var", "batch_stats", path + ("var",), _identity, _identity),
            ]
        else:
            raise ConfigError(f"torch layer {name!r} of type {tname} holds tensors {own} but torch2flax "
                             "has no conversion rule for that type")
    return rules


def _to_numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu().float().numpy()
    return np.asarray(t, dtype=np.float32)


def torch_to_flax(
    rules: list[Rule],
    tensors: Mapping[str, Any],
    template: Mapping[str, Any],
    collections: Iterable[str] = ("params", "batch_stats"),
    source: str = "torch state",
) -> dict[str, Any]:
    """Fill `template` (variable shapes, per collection) from torch `tensors` via `rules`, strictly."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    collections = tuple(collections)
    active = [r for r in rules if r.collection in collections]
    all_keys = {r.torch_key for r in rules}
    extra = [k for k in tensors if k not in all_keys and not k.endswith(IGNORED_TORCH_SUFFIXES)]
    if extra:
        raise DataError(f"{source}: torch key(s) with no Flax counterpart: {extra}")
    expected = flatten_dict({c: template[c] for c in collections if c in template})
    out: dict[tuple[str, ...], np.ndarray] = {}
    for r in active:
        if r.torch_key not in tensors:
            raise DataError(f"{source}: missing torch key {r.torch_key!r} (for Flax {r.flax_name})")
        flax_key = (r.collection,) + r.flax_path
        if flax_key not in expected:
            raise DataError(f"{source}: torch key {r.torch_key!r} maps to Flax {r.flax_name}, "
                             "which the Flax model does not have")
        t = _to_numpy(tensors[r.torch_key])
        value = r.to_flax(t)
        want = tuple(expected[flax_key].shape)
        if value.shape != want:
            raise DataError(f"{source}: shape mismatch for torch key {r.torch_key!r} {tuple(t.shape)} -> "
                             f"Flax {r.flax_name} {value.shape}, expected {want}")
        out[flax_key] = value
    unfilled = ["/".join(k) for k in expected if k not in out]
    if unfilled:
        raise DataError(f"{source}: Flax leaves no torch tensor maps to: {unfilled}")
    return unflatten_dict(out)


def flax_to_torch(rules: list[Rule], variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse mapping: torch state-dict arrays from Flax variables."""
    out = {}
    for r in rules:
        node: Any = variables[r.collection]
        try:
            for part in r.flax_path:
                node = node[part]
        except KeyError:
            raise DataError(f"Flax variables lack {r.flax_name} (for torch key {r.torch_key!r})") from None
        out[r.torch_key] = r.to_torch(np.asarray(node, dtype=np.float32))
    return out


# ---------------------------------------------------------------------------
# timm model -> Flax constructor arguments


def flax_kwargs_from_timm(model: Any) -> dict[str, Any]:
    """Constructor arguments of the Flax twin, read from an instantiated timm model."""
    import torch.nn as tnn

    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, tnn.BatchNorm2d)]
    kwargs: dict[str, Any] = {}
    if norms:
        first_name, first = norms[0]
        for n, m in norms:
            if (m.eps, m.momentum) != (first.eps, first.momentum):
                raise ConfigError(f"BatchNorm {n!r} has eps={m.eps}, momentum={m.momentum} but {first_name!r} has "
                                 f"eps={first.eps}, momentum={first.momentum}: the Flax models share one setting")
        if first.momentum is None:
            raise ConfigError(f"torch layer {first_name!r}: BatchNorm momentum=None is unsupported")
        kwargs.update(bn_eps=float(first.eps), bn_momentum=1.0 - float(first.momentum))
    drop_paths = [float(m.drop_prob) for m in model.modules() if type(m).__name__ == "DropPath"]
    pool = getattr(model, "global_pool", None)
    kwargs.update(
        num_classes=int(model.num_classes),
        in_chans=int(getattr(model, "in_chans", 3)),
        global_pool=str(getattr(pool, "pool_type", "avg")),
        drop_rate=float(getattr(model, "drop_rate", 0.0)),
        drop_path_rate=max(drop_paths, default=0.0),
        pretrained_cfg=pretrained_cfg_from_timm(model.pretrained_cfg),
    )
    return kwargs


# ---------------------------------------------------------------------------
# the backend


@register_backend
class NativeBackend(Backend):
    """Hand-written Flax modules mirroring timm's module tree (`torch2flax list --backend native`)."""

    name = "native"
    module_types = model_classes()

    def supports(self, architecture: str) -> bool:
        from torch2flax.models import list_models

        return architecture in list_models()

    def convert(self, source: Any, image_size: int | tuple[int, int] | None = None) -> tuple[Any, Any]:
        import jax
        import jax.numpy as jnp
        from flax.core import freeze

        model = source.model
        arch = architecture(model)
        entry = get_entry(arch)
        try:
            module = create_model(arch, **flax_kwargs_from_timm(model), **entry.flax_kwargs(model))
            shapes, layers = flax_layers(module)
            rules = build_rules(model, layers, entry.torch_module_types)
            arrays = torch_to_flax(rules, model.state_dict(), shapes, source=f"timm {arch}")
        except (ConfigError, DataError) as e:  # a timm variant (kwargs, a modified instance) the twin lacks
            raise ConfigError(f"{e}; the native Flax {arch} cannot reproduce this timm model: convert it with "
                              "backend='export' (--backend export)") from e
        variables = freeze({c: jax.tree.map(jnp.asarray, arrays[c]) for c in ("params", "batch_stats")
                            if c in arrays})
        return module, variables

    def variable_shapes(self, module: Any) -> Any:
        return flax_layers(module)[0]

    def to_timm(self, module: Any, variables: Mapping[str, Any]) -> Any:
        import timm
        import torch

        name = self.model_name(module)
        entry = get_entry(name)
        model = timm.create_model(name, pretrained=False, **self.timm_create_kwargs(module))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eps, m.momentum = module.bn_eps, 1.0 - module.bn_momentum
        _, layers = flax_layers(module)
        rules = build_rules(model, layers, entry.torch_module_types)
        arrays = flax_to_torch(rules, variables)
        load_into_timm(model, {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()},
                       source="Flax variables")
        return model.eval()

    def timm_create_kwargs(self, module: Any) -> dict[str, Any]:
        return dict(num_classes=module.num_classes, in_chans=module.in_chans, global_pool=module.global_pool,
                    drop_rate=module.drop_rate, drop_path_rate=module.drop_path_rate,
                    **get_entry(self.model_name(module)).timm_kwargs(module))

    def model_name(self, module: Any) -> str:
        return registry_name(module)

    def config(self, module: Any) -> dict[str, Any]:
        kwargs = {}
        for f in dataclasses.fields(module):
            if f.name in ("parent", "name"):
                continue
            v = getattr(module, f.name)
            if f.name == "dtype":
                v = np.dtype(v).name
            elif f.name == "pretrained_cfg":
                v = dict(v.to_dict()) if v is not None else {}
            elif isinstance(v, tuple):
                v = list(v)
            kwargs[f.name] = v
        return kwargs

    def from_config(self, model_name: str, config: Mapping[str, Any]) -> Any:
        import jax.numpy as jnp

        kwargs = dict(config)
        if "dtype" in kwargs:
            # The scalar type (jnp.float32), not np.dtype: equal either way, but only
            # this keeps the module's hash equal to the saved one's (jit caches on it).
            kwargs["dtype"] = getattr(jnp, str(kwargs["dtype"]))
        return create_model(model_name, **kwargs)

    def with_run_settings(self, module: Any, *, drop_rate: float, drop_path_rate: float,
                          image_size: int | None = None) -> Any:
        return module.clone(drop_rate=drop_rate, drop_path_rate=drop_path_rate)
