"""`prepare_model`: the model a fine-tuning run starts from, built from plain arguments.

A timm conversion or a torch2flax file, optionally under a freshly initialised add-on head
(the backbone then without its classifier), with the run's dropout / drop-path rates. The
model surgery lives here, behind the backend contract, so `torch2flax.train` only composes it
with its config.
"""
from __future__ import annotations

import os
from typing import Any

from torch2flax.backend import backend_of
from torch2flax.converter import Converted, convert
from torch2flax.errors import ConfigError, UserError


def prepare_model(
    model: str | None = None,
    *,
    num_classes: int,
    init: str | os.PathLike | None = None,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    head: str | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    backend: str = "auto",
    image_size: int | None = None,
    seed: int = 0,
) -> Converted:
    """`(module, variables)` with `.reinitialized` (the torch keys or head parameters that start fresh).

    `init`: a torch2flax model file to start from (else `model`, a timm name, is converted with
    `pretrained` / `checkpoint`). `head`: an add-on head spec (`"mlp:512,dropout=0.3"`,
    `torch2flax.parse_head`); the head's weights come from `seed`, and so do a randomly
    initialised timm model's.
    """
    if init:
        import torch2flax.io as io

        module, variables = io.load(init, portable=False)
        saved = model_name(module)
        if model is not None and model != saved:
            raise ConfigError(f"{init} holds a {saved} model, but the run names model {model!r}: drop --model "
                             "(the file decides), or convert the model you want")
        saved_head = backend_of(module).add_on_head(module)
        if head and saved_head is None:
            module, variables = headless(module, variables)
            module = with_run_settings(module, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                                       image_size=image_size, source=init)
            return add_head(module, variables, head, num_classes, seed=seed, image_size=image_size)
        if head and not same_head(saved_head, head, num_classes):
            raise ConfigError(f"{init} already has an add-on head ({type(saved_head).__name__}) that "
                             f"--head {head} does not describe: drop --head to fine-tune the saved one")
        if module.num_classes != num_classes:
            raise ConfigError(f"{init} has a {module.num_classes}-class head, but the run "
                             f"asks for num_classes={num_classes}; convert with --num-classes "
                             f"{num_classes} or start from a timm checkpoint")
        module = with_run_settings(module, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                                   image_size=image_size, source=init)
        return Converted(module, variables)
    if model is None:
        raise ConfigError("prepare_model needs a timm model name (model=, --model) or a model file to start from "
                          "(init=, --init)")
    import torch

    torch.manual_seed(seed)  # a randomly initialised model is reproducible by seed
    # Under an add-on head the backbone's classifier would be dead weight: convert without it.
    # Drop rates reach timm only when set: 0 is every timm model's default, and some models
    # (ConvMixer) take no drop_path_rate at all.
    drops = {k: v for k, v in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)) if v}
    result = convert(model, pretrained=pretrained, checkpoint=checkpoint,
                     num_classes=0 if head else num_classes, backend=backend, image_size=image_size, **drops)
    if head:
        return add_head(result.module, result.variables, head, num_classes, seed=seed, image_size=image_size)
    return result


def model_name(module: Any) -> str:
    """The timm name of a converted model (an add-on head's: its backbone's)."""
    return backend_of(module).model_name(module)


def add_head(module: Any, variables: Any, head: str, num_classes: int, *, seed: int = 0,
             image_size: int | None = None) -> Converted:
    """The add-on head `head` (a spec) on `module`, initialised from `seed`; its parameter names
    are what was re-initialised."""
    from flax.traverse_util import flatten_dict

    from torch2flax.heads import parse_head, with_head

    module, variables = with_head(module, variables, parse_head(head, num_classes), seed=seed,
                                  image_size=image_size)
    names = tuple(".".join(("head", *k)) for k in flatten_dict(dict(variables["params"]["head"])))
    return Converted(module, variables, names)


def same_head(head_module: Any, head: str, num_classes: int) -> bool:
    """Whether a saved head module is the one the spec `head` describes."""
    from torch2flax.heads import head_config, parse_head

    return head_config(head_module) == head_config(parse_head(head, num_classes))


def headless(module: Any, variables: Any) -> tuple[Any, Any]:
    """A model's backbone without its classifier (`num_classes=0`), the other variables kept."""
    from flax.core import freeze
    from flax.traverse_util import flatten_dict, unflatten_dict

    if module.num_classes == 0:
        return module, variables
    backend = backend_of(module)
    module = backend.headless(module)
    keep = flatten_dict(dict(backend.variable_shapes(module)))
    return module, freeze(unflatten_dict({k: v for k, v in flatten_dict(dict(variables)).items() if k in keep}))


def with_run_settings(module: Any, *, drop_rate: float, drop_path_rate: float, image_size: int | None = None,
                      source: str | os.PathLike | None = None) -> Any:
    """`module` with a run's dropout rates; raises (naming `source`) if it cannot run at `image_size`."""
    try:
        return backend_of(module).with_run_settings(module, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                                                    image_size=image_size)
    except UserError as e:  # a setting the model cannot take: name the file it came from
        if source is None:
            raise
        raise type(e)(f"{os.fspath(source)}: {e}") from None
