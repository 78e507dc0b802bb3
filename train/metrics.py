"""Classification metrics from a confusion matrix accumulated on device.

Accumulating a [C, C] confusion matrix keeps evaluation exact over any number
of batches and devices (a psum of counts) while staying independent of
scikit-learn at run time.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def confusion_matrix(labels, predictions, num_classes: int, mask=None):
    """Counts [true, predicted] pairs; rows where `mask` is False are ignored (padding)."""
    weights = jnp.ones(labels.shape, jnp.int32) if mask is None else mask.astype(jnp.int32)
    flat = labels.reshape(-1) * num_classes + predictions.reshape(-1)
    counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[flat].add(weights.reshape(-1))
    return counts.reshape(num_classes, num_classes)


def macro_f1(confusion: np.ndarray) -> float:
    """Macro-averaged F1 as `sklearn.metrics.f1_score(average="macro")` computes it.

    scikit-learn averages over the classes that occur in the labels or the
    predictions; a class predicted but never true (or the reverse) scores 0.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    false_pos = confusion.sum(0) - tp
    false_neg = confusion.sum(1) - tp
    present = (confusion.sum(0) + confusion.sum(1)) > 0
    if not present.any():
        return 0.0
    f1 = 2 * tp[present] / (2 * tp[present] + false_pos[present] + false_neg[present])
    return float(f1.mean())


def accuracy(confusion: np.ndarray) -> float:
    confusion = np.asarray(confusion)
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total else 0.0
