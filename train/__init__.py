"""Training, evaluation and prediction: composes ``loaders`` with ``torch2flax`` models.

Notebook API::

    from torch2flax.train import TrainConfig, fit, predict
    result = fit(TrainConfig(train="train/*.tfrec", val="val/*.tfrec", num_classes=104, out="runs/r18"))
    predict("runs/r18/best.msgpack", "test/*.tfrec", "submission.csv", tta="hflip")
"""
from torch2flax.train.config import TrainConfig

_LAZY = {"fit": "torch2flax.train.trainer", "FitResult": "torch2flax.train.trainer",
         "NonFiniteLossError": "torch2flax.train.trainer",
         "predict": "torch2flax.train.inference", "PredictResult": "torch2flax.train.inference"}

__all__ = ["TrainConfig", *_LAZY]


def __getattr__(name: str):
    # Imported on first use so that `torch2flax --help` does not load jax and torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'torch2flax.train' has no attribute {name!r}")
