"""Training, evaluation and prediction: composes ``loaders`` with ``torch2flax`` models.

Notebook API::

    from torch2flax.train import TrainConfig, fit, predict
    result = fit(TrainConfig(train="train/*.tfrec", val="val/*.tfrec", num_classes=104, out="runs/r18"))
    predict("runs/r18/best.msgpack", "test/*.tfrec", "submission.csv", tta="hflip")
"""
from torch2flax.train.config import TrainConfig
from torch2flax.utils import lazy_exports

# Imported on first use so that `torch2flax --help` does not load jax and torch.
_LAZY = {"fit": ".trainer", "FitResult": ".trainer", "NonFiniteLossError": ".trainer",
         "predict": ".inference", "PredictResult": ".inference"}
__all__ = ["TrainConfig", *_LAZY]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
