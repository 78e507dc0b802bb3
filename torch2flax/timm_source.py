"""The one path from a timm name (or a timm model instance) to the timm model a backend converts.

`timm_model(name_or_model, pretrained=, checkpoint=, num_classes=, **timm_kwargs)` returns a
`TimmSource`: the timm model in eval mode with its weights (random, hub, or a local state dict),
its head reset when `num_classes` differs from the weights', the torch keys that reset
re-initialised, and the `timm.create_model` arguments that rebuild its architecture (so a
converted model can be rebuilt from its saved config in another process). Every way a model
comes to be goes through here: `convert`, `load` (via the backends), the trainer, heads,
`verify` and the coverage sweep. Backends take the finished torch model and never see names,
checkpoints or hubs.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from torch2flax.errors import ConfigError, DataError, MissingFileError, WeightsUnavailable

# Torch buffers with no Flax counterpart, dropped by design (not an error).
IGNORED_TORCH_SUFFIXES = ("num_batches_tracked",)


@dataclasses.dataclass
class TimmSource:
    """A timm model ready to convert, and where it came from.

    `architecture` is timm's name without a `.tag`; `timm_kwargs` are the `timm.create_model`
    arguments (without `num_classes` / `in_chans`, which the model itself carries) that rebuild
    the architecture, or None when an instance's construction cannot be recovered.
    """

    model: Any
    architecture: str
    timm_kwargs: dict[str, Any] | None
    reinitialized: tuple[str, ...] = ()


# ---------------------------------------------------------------------------
# checkpoints


# The files a timm state dict comes in: `torch.save`'s, and `.safetensors` (read and written here
# and by `converter.save_timm`).
TORCH_SAVE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
STATE_DICT_SUFFIXES = (".safetensors", *TORCH_SAVE_SUFFIXES)


def load_timm_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """A torch state dict from `.pth/.pt/.bin` (weights_only: no code runs) or `.safetensors`.

    A `state_dict` or `model` wrapper key is unwrapped, and a `module.` prefix
    on every key (DataParallel/DDP saves) is stripped.
    """
    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"checkpoint {path!r} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(path, device="cpu")
        except Exception as e:  # a truncated download, or not a safetensors file at all
            raise DataError(f"{path}: cannot load as a safetensors checkpoint: {e}") from e
    elif suffix in TORCH_SAVE_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle with code in it, or not a torch file at all
            raise DataError(f"{path}: cannot load as a weights-only torch checkpoint: {e}") from e
    else:
        raise DataError(f"{path}: unknown checkpoint format {suffix!r}; use .pth, .pt, .bin or .safetensors")
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
            break
    if not isinstance(state, Mapping):
        raise DataError(f"{path}: expected a state dict, found {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise DataError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
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
        raise DataError(f"{source} does not fit timm {arch}: " + ". ".join(problems))
    model.load_state_dict({**{k: v for k, v in expected.items() if k not in state}, **state})


# ---------------------------------------------------------------------------
# names and heads


def architecture(model: Any) -> str:
    """timm's architecture name of an instance (from its `pretrained_cfg`)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch:
        raise ConfigError(f"{type(model).__name__} has no timm pretrained_cfg['architecture']: "
                         "pass a model built by timm.create_model, or its name")
    return arch


def classifier_names(cfg: Any) -> tuple[str, ...]:
    """The classifier module names of a timm pretrained_cfg. Models with a distillation head
    (LeViT, distilled DeiT) name two: `("head", "head_dist")`."""
    clf = (cfg.get("classifier") if isinstance(cfg, Mapping) else getattr(cfg, "classifier", None)) or "fc"
    return tuple(clf) if isinstance(clf, (tuple, list)) else (clf,)


def head_keys(model: Any) -> tuple[str, ...]:
    """The state-dict keys of a timm model's classifier(s)."""
    names = classifier_names(model.pretrained_cfg)
    return tuple(k for k in model.state_dict() if any(k.startswith(f"{n}.") for n in names))


def checkpoint_classes(state: Mapping[str, Any], cfg: Any) -> int:
    """The class count of a state dict: rows of its (first) classifier's weight; 0 when headless."""
    for clf in classifier_names(cfg or {}):
        for key in (f"{clf}.weight", f"{clf}.linear.weight", f"{clf}.l.weight"):
            if key in state:
                return int(state[key].shape[0])
    return 0


def rebuild_kwargs(model: Any, arch: str) -> dict[str, Any] | None:
    """`timm.create_model` arguments that rebuild an instance's architecture, or None.

    An instance carries no record of the kwargs it was built with; the common ones
    (class count, channels, drop rates, pooling) are read off it, and the guess is accepted
    only if timm builds a model of identical structure from it (same module tree, layer
    hyper-parameters and state-dict shapes).
    """
    import timm
    import torch

    drop_paths = [float(m.drop_prob) for m in model.modules() if type(m).__name__ == "DropPath"]
    pool = getattr(model, "global_pool", None)
    candidates: dict[str, Any] = {}
    if float(getattr(model, "drop_rate", 0.0) or 0.0):
        candidates["drop_rate"] = float(model.drop_rate)
    if max(drop_paths, default=0.0):
        candidates["drop_path_rate"] = max(drop_paths)
    pool_type = getattr(pool, "pool_type", pool if isinstance(pool, str) else None)
    for kwargs in ({**candidates, "global_pool": pool_type} if pool_type else candidates, candidates, {}):
        try:
            with torch.device("meta"):
                twin = timm.create_model(arch, pretrained=False, num_classes=int(model.num_classes),
                                         in_chans=in_chans(model), **kwargs)
        except Exception:  # a model timm cannot build on the meta device, or kwargs it refuses
            continue
        if _same_structure(model, twin):
            return dict(kwargs)
    return None


def in_chans(model: Any) -> int:
    """The input channels of a torch model (timm records them; else its first conv)."""
    import torch

    if isinstance(getattr(model, "in_chans", None), int):
        return model.in_chans
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            return m.in_channels
        if isinstance(m, torch.nn.Linear):
            break
    return 3


def _same_structure(a: Any, b: Any) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return (repr(a) == repr(b) and list(sa) == list(sb)
            and all(tuple(sa[k].shape) == tuple(sb[k].shape) for k in sa))


# ---------------------------------------------------------------------------
# the one path


def _create(name: str, **kwargs: Any) -> Any:
    """`timm.create_model`, with a setting the model does not take reported as the user's."""
    import timm

    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise ConfigError(f"timm's {name} does not take this setting ({e}): leave it unset "
                          "(for drop_path_rate: --drop-path-rate 0)") from e


def timm_model(
    model_or_name: Any,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    **timm_kwargs: Any,
) -> TimmSource:
    """The timm model to convert (eval mode), from a name (a `.tag` allowed) or an instance.

    `checkpoint`: a `.pth/.pt/.bin/.safetensors` state dict for the named model; its classifier
    rows give its class count (no classifier keys: a headless, num_classes=0 checkpoint).
    `num_classes` different from the weights' resets the head with timm's `reset_classifier`;
    its keys are `reinitialized`. An instance is never modified: a reset head goes on a copy.
    """
    import timm

    if not isinstance(model_or_name, str):
        if timm_kwargs or pretrained or checkpoint is not None:
            raise TypeError("pretrained/checkpoint/timm kwargs apply to a model name, not to a model instance")
        model = model_or_name
        arch = architecture(model)
        kwargs = rebuild_kwargs(model, arch)
        if num_classes is not None and num_classes != model.num_classes:
            model = copy.deepcopy(model)  # the caller's model keeps its head
    else:
        name = model_or_name
        arch = name.split(".", 1)[0]
        if pretrained and checkpoint is not None:
            raise ConfigError("pass either pretrained=True or checkpoint=..., not both")
        if checkpoint is not None:
            state = load_timm_state_dict(checkpoint)
            classes = checkpoint_classes(state, timm.models.get_pretrained_cfg(name))
            model = _create(name, pretrained=False, **{**timm_kwargs, "num_classes": classes})
            load_into_timm(model, state, source=f"checkpoint {os.fspath(checkpoint)}")
        elif pretrained:
            try:
                model = _create(name, pretrained=True, **timm_kwargs)
            except ConfigError:
                raise
            except Exception as e:  # hub unreachable, no weights for this tag, ...
                raise WeightsUnavailable(
                    f"could not fetch pretrained weights for {name!r} from the hub ({e}); without internet "
                    "(a Kaggle code competition, say) download timm's weights for it (a .pth or .safetensors "
                    "state dict) where you can and pass the file with --timm-checkpoint PATH instead of --pretrained "
                    "(in Python: checkpoint=PATH)") from e
        else:
            model = _create(name, pretrained=False,
                            **{**timm_kwargs, **({} if num_classes is None else {"num_classes": num_classes})})
        # The model carries its class count and channels; the rest rebuilds the architecture.
        kwargs = {k: v for k, v in timm_kwargs.items() if k not in ("num_classes", "in_chans")}
    reinitialized: tuple[str, ...] = ()
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
        reinitialized = head_keys(model)
    return TimmSource(model.eval(), arch, kwargs, reinitialized)
