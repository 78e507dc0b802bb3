"""Training, evaluation and prediction: composes ``loaders`` with ``torch2flax`` models.

Notebook API::

    from torch2flax.train import TrainConfig, fit, predict
    result = fit(TrainConfig(train="train/*.tfrec", val="val/*.tfrec", num_classes=104, out="runs/r18"))
    predict("runs/r18/best.msgpack", "test/*.tfrec", "submission.csv", tta="hflip")
    tpu_check(TrainConfig(model="resnet50", batch_size=1024, dtype="bfloat16"), tpu="v5e-8")  # will it fit?
"""
from torch2flax.train.config import TrainConfig
from torch2flax.utils import lazy_exports

# Imported on first use so that `torch2flax --help` does not load jax and torch.
_LAZY = {"fit": ".trainer", "FitResult": ".result", "NonFiniteLossError": ".loop",
         "predict": ".inference", "PredictResult": ".inference", "tpu_check": ".tpu_check", "TPUReport": ".tpu_check"}
__all__ = ["TrainConfig", *_LAZY]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
