"""`convert`: a timm model (name, tagged name or instance) as a Flax module and its variables.

How a model comes to be (docs/models.md): `torch2flax.timm_source.timm_model` builds the timm
model (name -> `timm.create_model`, pretrained or checkpoint weights, head reset), the backend
registry (`torch2flax.backend`) picks who converts it (`native`: a hand-written Flax twin;
`export`: its `torch.export` graph), and that backend returns `(module, variables)`. This
module only dispatches; it is the one place that knows both.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from torch2flax.backend import backend_choices, backend_of, get_backend
from torch2flax.errors import ConfigError
from torch2flax.timm_source import STATE_DICT_SUFFIXES, timm_model


class Converted(tuple):
    """`(module, variables)` that also carries `.reinitialized`: torch keys of a freshly initialised head."""

    def __new__(cls, module: Any, variables: Any, reinitialized: tuple[str, ...] | list[str] = ()):
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



def is_native(name: str) -> bool:
    """Whether a timm name (a `.tag` allowed) has a hand-written Flax twin in `torch2flax.models`."""
    return get_backend("native").supports(name.split(".", 1)[0])


def resolve_backend(architecture: str, backend: str = "auto") -> str:
    """"native" or "export" for `architecture`; "auto" prefers the native Flax twin."""
    if backend not in backend_choices():
        raise ConfigError(f"backend must be one of {backend_choices()}, got {backend!r}")
    native = is_native(architecture)
    if not native:
        from torch2flax.timm_names import check_model_name

        check_model_name(architecture)  # a name timm does not know: say so, with close names
    if backend == "native" and not native:
        from torch2flax.models import get_entry

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
    if isinstance(model_or_name, str):
        chosen = get_backend(resolve_backend(model_or_name, backend))  # an unknown name fails here, named
        timm_kwargs = {**chosen.timm_kwargs(model_or_name, image_size), **timm_kwargs}
        source = timm_model(model_or_name, pretrained=pretrained, checkpoint=checkpoint,
                            num_classes=num_classes, **timm_kwargs)
    else:
        source = timm_model(model_or_name, pretrained=pretrained, checkpoint=checkpoint,
                            num_classes=num_classes, **timm_kwargs)
        chosen = get_backend(resolve_backend(source.architecture, backend))
    module, variables = chosen.convert(source, image_size)
    return Converted(module, variables, source.reinitialized), source.model


def timm_from_flax(module: Any, variables: Any) -> Any:
    """The timm model with the weights of a Flax module (the converter run backwards), in eval mode."""
    return backend_of(module).to_timm(module, variables)


def save_timm(path: str | os.PathLike, module: Any, variables: Any) -> tuple[str, dict[str, Any]]:
    """Write a converted (or fine-tuned) model's weights, BatchNorm statistics included, as a timm
    state dict: `.safetensors`, or `.pth`/`.pt`/`.bin`/`.ckpt` (`torch.save`), what
    `timm_source.load_timm_state_dict` reads. Returns `(name, kwargs)`:
    `timm.create_model(name, **kwargs)` builds the architecture it loads into (a `.safetensors`
    file also names both in its metadata). A model with an add-on head has no timm twin: refused."""
    import json

    import torch

    from torch2flax.utils import atomic_write

    path = os.fspath(path)
    if not path.endswith(STATE_DICT_SUFFIXES):
        raise ConfigError(f"{path}: a timm state dict is a {' or '.join(STATE_DICT_SUFFIXES)} file")
    backend = backend_of(module)
    model = backend.to_timm(module, variables)  # first: says why a model has no timm twin
    name, kwargs = backend.model_name(module), backend.timm_create_kwargs(module)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}  # tied weights: own copies (safetensors refuses shared storage)
    if path.endswith(".safetensors"):
        from safetensors.torch import save

        data = save(state, metadata={"timm_model": name, "timm_kwargs": json.dumps(kwargs), "format": "pt"})
    else:
        import io as _io

        buf = _io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
    atomic_write(path, data)
    return name, kwargs


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
