"""torch2flax: port timm backbones to Flax and train them from PyTorch data pipelines.

One import namespace: ``torch2flax`` (the converter), ``torch2flax.loaders`` (the input
pipeline) and ``torch2flax.train`` (training and prediction). The entry points people use
most are also reachable from here: ``torch2flax.convert``, ``torch2flax.TFRecordDataset``,
``torch2flax.make_loader``, ``torch2flax.fit``, ``torch2flax.predict``, ...
"""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("torch2flax")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# Public API, imported on first use so that `import torch2flax` (and the CLI's
# `--help`) does not pay for jax, flax and torch.
_LAZY = {
    "convert": ("torch2flax.converter", "convert"),
    "save": ("torch2flax.io", "save"),
    "load": ("torch2flax.io", "load"),
    "with_head": ("torch2flax.heads", "with_head"),
    "parse_head": ("torch2flax.heads", "parse_head"),
    "HeadModel": ("torch2flax.heads", "HeadModel"),
    "MLPHead": ("torch2flax.heads", "MLPHead"),
    "GeMHead": ("torch2flax.heads", "GeMHead"),
    "list_models": ("torch2flax.models", "list_models"),
    "forward_intermediates": ("torch2flax.features", "forward_intermediates"),
    "feature_info": ("torch2flax.features", "feature_info"),
    "create_model": ("torch2flax.models", "create_model"),
    "TFRecordDataset": ("torch2flax.loaders", "TFRecordDataset"),
    "write_tfrecords": ("torch2flax.loaders", "write_tfrecords"),
    "decode_image": ("torch2flax.loaders", "decode_image"),
    "make_loader": ("torch2flax.loaders", "make_loader"),
    "TrainConfig": ("torch2flax.train", "TrainConfig"),
    "fit": ("torch2flax.train", "fit"),
    "predict": ("torch2flax.train", "predict"),
    "doctor": ("torch2flax.train.doctor", "doctor"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'torch2flax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["__version__", *_LAZY]
