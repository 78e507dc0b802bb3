"""Input pipeline: TFRecord files as torch Datasets, augmentation, collation for JAX devices.

Knows nothing of Flax models; everything here produces NumPy arrays or jax.Arrays.
"""
import os

from torch2flax.utils import lazy_exports

# albumentations asks PyPI for a newer release when it is imported: a network call from a
# training job (and a stall on an offline Kaggle kernel). Workers inherit the setting.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# Exports load on first use (PEP 562): the `torch2flax` CLI and DataLoader workers import
# `loaders` submodules, and must not pay for jax, torch and albumentations they do not use.
_EXPORTS = {
    "numpy_collate": ".collate", "pad_batch": ".collate", "shard_batch": ".collate",
    "make_mesh": ".device", "normalize_on_device": ".device", "prefetch_to_device": ".device",
    "put_batch": ".device",
    "Loader": ".loader", "make_loader": ".loader", "resolve_num_workers": ".loader",
    "RecordTransform": ".transforms", "eval_transform": ".transforms", "train_transform": ".transforms",
    "ImageDecodeError": ".image", "decode_image": ".image",
    "BadRecordError": ".tfrecord", "CorruptRecordError": ".tfrecord", "RecordError": ".tfrecord",
    "TFRecordDataset": ".tfrecord",
    "write_tfrecords": ".writer",
    "stratified_folds": ".folds",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
