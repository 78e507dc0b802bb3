"""Model files across the supported range: write them on one stack, load them on the other.

`python -m tests.cross_stack write DIR` saves a native and an exported model (random weights,
randomised BatchNorm statistics) with a batch of images and the logits this stack gives;
`python -m tests.cross_stack check DIR` loads each file with this stack's torch2flax and prints,
as JSON, the largest logit difference relative to the largest logit, per model.
`tests/test_cross_stack.py` runs one side in the test process and the other under
$TORCH2FLAX_OTHER_PYTHON (`make test-oldest` points it at the upper stack's venv).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

# name -> (timm name, backend, convert kwargs, image size)
MODELS = {
    # the native ResNet, one block per stage
    "native": ("resnet18", "native", {"layers": (1, 1, 1, 1)}, 32),
    # timm's own small test network through torch.export: BatchNorm, depthwise convs, squeeze-excite
    "exported": ("test_efficientnet", "export", {}, 32),
    # the same with its eval forward as a portable program (torch2flax.portable), which `load` runs
    "portable": ("test_efficientnet", "export", {}, 32),
}


def _randomized(variables, seed: int):
    """Running statistics away from timm's 0/1 init (as tests.helpers.randomize_batchnorm)."""
    import jax
    from flax.core import freeze, unfreeze

    rng = np.random.default_rng(seed)
    tree = unfreeze(variables)

    def stat(path, x):
        name = jax.tree_util.keystr(path)
        if "var" in name:
            return rng.uniform(0.5, 2.0, np.shape(x)).astype(np.float32)
        return rng.normal(0.0, 0.1, np.shape(x)).astype(np.float32)

    tree["batch_stats"] = jax.tree_util.tree_map_with_path(stat, tree["batch_stats"])
    return freeze(tree)


def logits(module, variables, x: np.ndarray) -> np.ndarray:
    import jax

    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x), np.float64)


def write(out: str) -> None:
    import torch2flax

    os.makedirs(out, exist_ok=True)
    for key, (name, backend, kwargs, size) in MODELS.items():
        module, variables = torch2flax.convert(name, backend=backend, num_classes=10,
                                               image_size=size if backend == "export" else None, **kwargs)
        variables = _randomized(variables, seed=len(key))
        x = np.random.default_rng(0).standard_normal((4, size, size, 3)).astype(np.float32)
        torch2flax.save(os.path.join(out, f"{key}.msgpack"), module, variables, portable=key == "portable")
        np.save(os.path.join(out, f"{key}.x.npy"), x)
        np.save(os.path.join(out, f"{key}.logits.npy"), logits(module, variables, x))


def check(out: str) -> dict[str, float]:
    import torch2flax

    errors = {}
    for key in MODELS:
        module, variables = torch2flax.load(os.path.join(out, f"{key}.msgpack"))
        if (type(module).__name__ == "PortableModule") != (key == "portable"):
            raise AssertionError(f"{key}.msgpack loaded as a {type(module).__name__}")
        ref = np.load(os.path.join(out, f"{key}.logits.npy"))
        got = logits(module, variables, np.load(os.path.join(out, f"{key}.x.npy")))
        errors[key] = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    return errors


def versions() -> dict[str, str]:
    from importlib import metadata

    return {p: metadata.version(p) for p in ("jax", "flax", "torch", "timm")}


if __name__ == "__main__":
    command, folder = sys.argv[1:3]
    if command == "write":
        write(folder)
        print(json.dumps(versions()))
    else:
        print(json.dumps({"errors": check(folder), "versions": versions()}))
