"""timm -> Flax conversion, driven by the torch module tree and the Flax variable tree.

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

import copy
import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from torch2flax.models import create_model, get_entry, pretrained_cfg_from_timm

# Torch buffers with no Flax counterpart, dropped by design (not an error).
IGNORED_TORCH_SUFFIXES = ("num_batches_tracked",)


class Converted(tuple):
    """`(module, variables)` that also carries `.reinitialized`: torch keys of a freshly initialised head."""

    def __new__(cls, module: Any, variables: Any, reinitialized: Iterable[str] = ()):
        self = super().__new__(cls, (module, variables))
        self.reinitialized = tuple(reinitialized)
        return self

    @property
    def module(self) -> Any:
        return self[0]

    @property
    def variables(self) -> Any:
        return self[1]

    def __repr__(self) -> str:
        return f"Converted(module={type(self[0]).__name__}, reinitialized={self.reinitialized})"


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
# checkpoints


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A torch state dict from `.pth/.pt/.bin` (weights_only: no code runs) or `.safetensors`.

    A `state_dict` or `model` wrapper key is unwrapped, and a `module.` prefix
    on every key (DataParallel/DDP saves) is stripped.
    """
    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(path, device="cpu")
    elif suffix in (".pth", ".pt", ".bin", ".ckpt"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle with code in it, or not a torch file at all
            raise ValueError(f"{path}: cannot load as a weights-only torch checkpoint: {e}") from e
    else:
        raise ValueError(f"{path}: unknown checkpoint format {suffix!r}; use .pth, .pt, .bin or .safetensors")
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
            break
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    return dict(state)


def load_into_timm(model: Any, state: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Load `state` into a timm model strictly, naming every missing, extra or mis-shaped key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(IGNORED_TORCH_SUFFIXES)]
    extra = [k for k in state if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    problems = []
    if missing:
        problems.append(f"missing key(s) {missing}")
    if extra:
        problems.append(f"unexpected key(s) {extra}")
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes))
    if problems:
        raise ValueError(f"{source} does not fit timm {arch}: " + ". ".join(problems))
    model.load_state_dict({**{k: v for k, v in expected.items() if k not in state}, **state})


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
        raise ValueError(f"torch layer {name!r} is Conv2d but the Flax layer at that path is {type(fm).__name__}")
    if isinstance(tm.padding, str) or tm.padding_mode != "zeros":
        raise ValueError(f"torch layer {name!r}: padding={tm.padding!r}, padding_mode={tm.padding_mode!r} unsupported")
    torch_hp = (tuple(tm.stride), _padding(tuple(tm.padding)), tuple(tm.dilation), tm.groups)
    flax_hp = (_pair(fm.strides), _padding(fm.padding), _pair(fm.kernel_dilation), fm.feature_group_count)
    if torch_hp != flax_hp:
        raise ValueError(f"layer {name!r}: torch (stride, padding, dilation, groups)={torch_hp} "
                         f"but Flax has {flax_hp}")


def _check_bn(name: str, tm: Any, fm: Any) -> None:
    from torch2flax.layers import BatchNorm

    if not isinstance(fm, BatchNorm):
        raise ValueError(f"torch layer {name!r} is BatchNorm2d but the Flax layer at that path is {type(fm).__name__}")
    if tm.momentum is None:
        raise ValueError(f"torch layer {name!r}: BatchNorm momentum=None (cumulative average) is unsupported")
    if not math.isclose(tm.eps, fm.epsilon, rel_tol=1e-6) or not math.isclose(1.0 - tm.momentum, fm.momentum,
                                                                             rel_tol=1e-6):
        raise ValueError(f"layer {name!r}: torch eps={tm.eps}, momentum={tm.momentum} but Flax "
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
            raise ValueError(f"torch module {name or '<root>'!r} of type {tname} has no Flax counterpart "
                             f"(supported types: {sorted(supported)})")
        own = [k for k, _ in tm.named_parameters(recurse=False)] + [k for k, _ in tm.named_buffers(recurse=False)]
        if not own:
            continue
        path = tuple(name.split("."))
        fm = layers.get(path)
        if fm is None:
            raise ValueError(f"torch layer {name!r} ({tname}, tensors {own}) has no Flax layer at {'/'.join(path)}")
        key = f"{name}."
        if isinstance(tm, tnn.Conv2d):
            _check_conv(name, tm, fm)
            rules.append(Rule(key + "weight", "params", path + ("kernel",), _oihw_to_hwio, _hwio_to_oihw))
            if tm.bias is not None:
                rules.append(Rule(key + "bias", "params", path + ("bias",), _identity, _identity))
        elif isinstance(tm, tnn.Linear):
            if not isinstance(fm, Dense):
                raise ValueError(f"torch layer {name!r} is Linear but the Flax layer is {type(fm).__name__}")
            rules.append(Rule(key + "weight", "params", path + ("kernel",), _transpose, _transpose))
            if tm.bias is not None:
                rules.append(Rule(key + "bias", "params", path + ("bias",), _identity, _identity))
        elif isinstance(tm, tnn.BatchNorm2d):
            _check_bn(name, tm, fm)
            if not (tm.affine and tm.track_running_stats):
                raise ValueError(f"torch layer {name!r}: BatchNorm without affine/running stats is unsupported")
            rules += [
                Rule(key + "weight", "params", path + ("scale",), _identity, _identity),
                Rule(key + "bias", "params", path + ("bias",), _identity, _identity),
                Rule(key + "running_mean", "batch_stats", path + ("mean",), _identity, _identity),
                Rule(key + "running_var", "batch_stats", path + ("var",), _identity, _identity),
            ]
        else:
            raise ValueError(f"torch layer {name!r} of type {tname} holds tensors {own} but torch2flax "
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
        raise ValueError(f"{source}: torch key(s) with no Flax counterpart: {extra}")
    expected = flatten_dict({c: template[c] for c in collections if c in template})
    out: dict[tuple[str, ...], np.ndarray] = {}
    for r in active:
        if r.torch_key not in tensors:
            raise ValueError(f"{source}: missing torch key {r.torch_key!r} (for Flax {r.flax_name})")
        flax_key = (r.collection,) + r.flax_path
        if flax_key not in expected:
            raise ValueError(f"{source}: torch key {r.torch_key!r} maps to Flax {r.flax_name}, "
                             "which the Flax model does not have")
        t = _to_numpy(tensors[r.torch_key])
        value = r.to_flax(t)
        want = tuple(expected[flax_key].shape)
        if value.shape != want:
            raise ValueError(f"{source}: shape mismatch for torch key {r.torch_key!r} {tuple(t.shape)} -> "
                             f"Flax {r.flax_name} {value.shape}, expected {want}")
        out[flax_key] = value
    unfilled = ["/".join(k) for k in expected if k not in out]
    if unfilled:
        raise ValueError(f"{source}: Flax leaves no torch tensor maps to: {unfilled}")
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
            raise ValueError(f"Flax variables lack {r.flax_name} (for torch key {r.torch_key!r})") from None
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
                raise ValueError(f"BatchNorm {n!r} has eps={m.eps}, momentum={m.momentum} but {first_name!r} has "
                                 f"eps={first.eps}, momentum={first.momentum}: the Flax models share one setting")
        if first.momentum is None:
            raise ValueError(f"torch layer {first_name!r}: BatchNorm momentum=None is unsupported")
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


def timm_architecture(model: Any) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch:
        raise ValueError(f"{type(model).__name__} has no timm pretrained_cfg['architecture']: "
                         "pass a model built by timm.create_model, or its name")
    return arch


def _head_keys(model: Any) -> tuple[str, ...]:
    clf = model.pretrained_cfg.get("classifier", "fc")
    return tuple(f"{clf}.{k}" for k in model.get_classifier().state_dict())


BACKENDS = ("auto", "native", "export")


def is_native(name: str) -> bool:
    """Whether a timm name (a `.tag` allowed) has a hand-written Flax twin in `torch2flax.models`."""
    from torch2flax.models import list_models

    return name.split(".", 1)[0] in list_models()


def resolve_backend(architecture: str, backend: str = "auto") -> str:
    """"native" or "export" for `architecture`; "auto" prefers the native Flax twin."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    native = is_native(architecture)
    if not native:
        from torch2flax.timm_names import check_model_name

        check_model_name(architecture)  # a name timm does not know: say so, with close names
    if backend == "native" and not native:
        get_entry(architecture.split(".", 1)[0])  # raises, naming close native names
    if backend == "auto":
        return "native" if native else "export"
    return backend


def convert(
    model_or_name: Any,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    backend: str = "auto",
    image_size: int | tuple[int, int] | None = None,
    **timm_kwargs: Any,
) -> Converted:
    """A timm model (name, tagged name or instance) as `(flax_module, variables)`, plus `.reinitialized`.

    `backend`: "native" builds the hand-written Flax twin (`torch2flax list --backend native`),
    "export" runs the model's `torch.export` graph (`torch2flax.export`, any timm model) at
    `image_size` (default: the model's pretrained input size; other sizes need a new
    conversion), "auto" prefers native. `checkpoint`: a `.pth/.pt/.bin/.safetensors` state dict
    for the named model (its classifier rows give the checkpoint's class count; no classifier
    keys means a headless, num_classes=0 checkpoint). With `num_classes` different from the
    weights', the head is freshly initialised by timm's `reset_classifier` and its torch keys
    are listed in `.reinitialized`; nothing else is ever re-initialised. `variables` is a
    FrozenDict with `params` and (for models with BatchNorm) `batch_stats`, float32.
    """
    return convert_with_timm(model_or_name, pretrained=pretrained, checkpoint=checkpoint,
                             num_classes=num_classes, backend=backend, image_size=image_size,
                             **timm_kwargs)[0]


def convert_with_timm(
    model_or_name: Any,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    backend: str = "auto",
    image_size: int | tuple[int, int] | None = None,
    **timm_kwargs: Any,
) -> tuple[Converted, Any]:
    """`convert`, also returning the timm model (eval mode) the weights came from."""
    import timm

    reinitialized: tuple[str, ...] = ()
    from_name = isinstance(model_or_name, str)
    if from_name:
        name = model_or_name
        backend = resolve_backend(name, backend)  # an unknown native name fails here, with close matches
        if backend == "export" and image_size is not None:
            timm_kwargs = {**_fixed_size_kwargs(name, image_size), **timm_kwargs}
        create_kwargs = dict(timm_kwargs)
        if pretrained and checkpoint is not None:
            raise ValueError("pass either pretrained=True or checkpoint=..., not both")
        if checkpoint is not None:
            state = load_checkpoint(checkpoint)
            cfg = timm.models.get_pretrained_cfg(name)
            clf = (cfg.classifier if cfg is not None else None) or "fc"
            ckpt_classes = int(state[f"{clf}.weight"].shape[0]) if f"{clf}.weight" in state else 0
            model = timm.create_model(name, pretrained=False, **{**timm_kwargs, "num_classes": ckpt_classes})
            load_into_timm(model, state, source=f"checkpoint {os.fspath(checkpoint)}")
        elif pretrained:
            try:
                model = timm.create_model(name, pretrained=True, **timm_kwargs)
            except Exception as e:  # hub unreachable, no weights for this tag, ...
                raise RuntimeError(f"could not fetch pretrained weights for {name!r} from the hub ({e}); "
                                   "download them and pass checkpoint=PATH instead") from e
        else:
            if num_classes is not None:
                timm_kwargs["num_classes"] = num_classes
            model = timm.create_model(name, pretrained=False, **timm_kwargs)
    else:
        if timm_kwargs or pretrained or checkpoint is not None:
            raise TypeError("pretrained/checkpoint/timm kwargs apply to a model name, not to a model instance")
        model = model_or_name
        backend = resolve_backend(timm_architecture(model), backend)
        if num_classes is not None and num_classes != model.num_classes:
            model = copy.deepcopy(model)  # the caller's model keeps its head
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
        reinitialized = _head_keys(model)
    model.eval()
    if backend == "export":
        from torch2flax.export.model import convert_exported

        create_kwargs = {k: v for k, v in create_kwargs.items() if k != "num_classes"} if from_name else {}
        module, variables = convert_exported(model, image_size=image_size,
                                             rebuild=(name.split(".", 1)[0], create_kwargs) if from_name else None)
        return Converted(module, variables, reinitialized), model
    return Converted(*_convert_native(model), reinitialized), model


def _fixed_size_kwargs(name: str, image_size: int | tuple[int, int]) -> dict[str, Any]:
    """`img_size=` for a model whose graph fixes its input size (ViT-style position embeddings),
    so timm builds it at the size asked for and resamples pretrained position embeddings itself."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if cfg is None or not getattr(cfg, "fixed_input_size", False) or tuple(cfg.input_size[1:]) == size:
        return {}
    return {"img_size": size if size[0] != size[1] else size[0]}


def _convert_native(model: Any) -> tuple[Any, Any]:
    import jax
    import jax.numpy as jnp
    from flax.core import freeze

    arch = timm_architecture(model)
    entry = get_entry(arch)
    module = create_model(arch, **flax_kwargs_from_timm(model), **entry.flax_kwargs(model))
    shapes, layers = flax_layers(module)
    rules = build_rules(model, layers, entry.torch_module_types)
    arrays = torch_to_flax(rules, model.state_dict(), shapes, source=f"timm {arch}")
    variables = freeze({c: jax.tree.map(jnp.asarray, arrays[c]) for c in ("params", "batch_stats") if c in arrays})
    return module, variables


def variable_shapes(module: Any) -> Any:
    """The shapes of a converted module's variables (no FLOPs spent)."""
    if hasattr(module, "variable_shapes"):
        return module.variable_shapes()
    return flax_layers(module)[0]


def timm_from_flax(module: Any, variables: Mapping[str, Any]) -> Any:
    """The timm model with the weights of a Flax module (the converter run backwards), in eval mode."""
    import timm
    import torch

    if hasattr(module, "variable_shapes"):  # an exported-graph module
        from torch2flax.export.model import timm_from_exported

        return timm_from_exported(module, variables)

    from torch2flax.models import model_name

    name = model_name(module)
    entry = get_entry(name)
    kwargs = dict(num_classes=module.num_classes, in_chans=module.in_chans, global_pool=module.global_pool,
                  drop_rate=module.drop_rate, drop_path_rate=module.drop_path_rate, **entry.timm_kwargs(module))
    model = timm.create_model(name, pretrained=False, **kwargs)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps, m.momentum = module.bn_eps, 1.0 - module.bn_momentum
    _, layers = flax_layers(module)
    rules = build_rules(model, layers, entry.torch_module_types)
    arrays = flax_to_torch(rules, variables)
    load_into_timm(model, {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, source="Flax variables")
    return model.eval()


def parity_errors(model: Any, module: Any, variables: Any, *, batch: int = 2,
                  input_hw: tuple[int, int] | None = None, seed: int = 0) -> dict[str, float]:
    """Max abs and relative (to max(1, max|timm|)) errors of logits and features on a random batch."""
    import jax
    import torch

    h, w = input_hw or tuple(module.pretrained_cfg.get("input_size", (3, 224, 224))[1:])
    x = np.random.default_rng(seed).standard_normal((batch, module.in_chans, h, w)).astype(np.float32)
    model.eval()
    with torch.no_grad():
        feats_t = model.forward_features(torch.from_numpy(x))
        logits_t = model.forward_head(feats_t).numpy()
        feats_t = feats_t.numpy()

    @jax.jit
    def run(v, x):
        f = module.apply(v, x, method="forward_features")
        return f, module.apply(v, f, method="forward_head")

    # Full float32 matmuls/convs: GPUs default to TF32 (~1e-3 relative), which is not a conversion error.
    with jax.default_matmul_precision("highest"):
        feats_f, logits_f = (np.asarray(a) for a in run(variables, x.transpose(0, 2, 3, 1)))
    if feats_t.ndim == 4 and feats_f.shape != feats_t.shape:  # a CNN map: ours is NHWC, timm's NCHW
        feats_t = feats_t.transpose(0, 2, 3, 1)
    out = {}
    for key, ref, got in (("logits", logits_t, logits_f), ("features", feats_t, feats_f)):
        err = float(np.max(np.abs(ref - got)))
        out[f"{key}_abs"] = err
        out[f"{key}_rel"] = err / max(1.0, float(np.max(np.abs(ref))))
    return out
