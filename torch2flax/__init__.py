"""torch2flax: port timm backbones to Flax and train them from PyTorch data pipelines.

One import namespace: ``torch2flax`` (the converter), ``torch2flax.loaders`` (the input
pipeline) and ``torch2flax.train`` (training and prediction). The entry points people use
most are also reachable from here: ``torch2flax.convert``, ``torch2flax.TFRecordDataset``,
``torch2flax.make_loader``, ``torch2flax.fit``, ``torch2flax.predict``, ...
"""
from importlib import metadata as _metadata

from torch2flax import utils as _utils

try:
    __version__ = _metadata.version("torch2flax")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# Public API, imported on first use so that `import torch2flax` (and the CLI's
# `--help`) does not pay for jax, flax and torch.
_LAZY = {
    "convert": ".converter", "save_timm": ".converter", "prepare_model": ".prepare", "save": ".io", "load": ".io",
    "with_head": ".heads", "parse_head": ".heads", "HeadModel": ".heads", "MLPHead": ".heads", "GeMHead": ".heads",
    "list_models": ".models", "create_model": ".models",
    "forward_intermediates": ".features", "feature_info": ".features",
    "TFRecordDataset": ".loaders", "write_tfrecords": ".loaders", "decode_image": ".loaders", "make_loader": ".loaders",
    "TrainConfig": ".train", "fit": ".train", "predict": ".train", "doctor": ".train.doctor",
}
__getattr__, __dir__ = _utils.lazy_exports(__name__, _LAZY)
__all__ = ["__version__", *_LAZY]
