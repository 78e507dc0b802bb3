"""A run's data: the splits indexed and checked, their augmentation, and the two loaders.

Everything here is the input pipeline of `fit` (no model, no optimiser): `index_splits` before any
model work (an empty split fails at once), `build_loaders` once the model has said how to crop.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from torch2flax.errors import ConfigError, DataError
from torch2flax.loaders import (
    RecordTransform,
    TFRecordDataset,
    eval_transform,
    make_loader,
    stratified_folds,
    train_transform,
)
from torch2flax.loaders.loader import training_workers, usable_cpus, workers_for_cpus
from torch2flax.loaders.transforms import RECIPES, load_augment
from torch2flax.train import distributed
from torch2flax.train.config import TrainConfig

TRAIN_FEATURES = {"image": "bytes", "class": "int", "id": "str"}
# Above this share of the timed step time spent waiting for the next batch, say so (once per run).
DATA_WAIT_HINT = 0.10


def eval_crop_pct(config: TrainConfig, module: Any) -> float:
    return config.crop_pct if config.crop_pct is not None else float(module.pretrained_cfg["crop_pct"])


def labelled_dataset(pattern: str) -> TFRecordDataset:
    # Multi-host: every process indexes every file but loads only its slice of each global
    # batch (make_loader), so N processes see the batches one process would.
    return TFRecordDataset(pattern, features=TRAIN_FEATURES)


def check_labels(dataset: TFRecordDataset, num_classes: int, key: str = "class") -> None:
    """Every label in `[0, num_classes)`, or a `DataError` naming the first bad record.

    Checked before training: a label out of range would train to the end with a NaN
    validation loss and a macro F1 over the wrong label space.
    """
    labels = np.asarray(dataset.column(key), dtype=np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{dataset.where(i)}: label {labels[i]} is outside [0, num_classes={num_classes}) "
                        f"({bad.size} of {len(labels)} records are; labels here span "
                        f"{labels.min()}..{labels.max()}: set num_classes to at least {labels.max() + 1})")


def check_labels_everywhere(dataset: TFRecordDataset, num_classes: int) -> None:
    """`check_labels` with each process reading its own part; every process stops if any fails."""
    part = dataset.shard(jax.process_index(), jax.process_count()) if jax.process_count() > 1 else dataset
    error = None
    try:
        check_labels(part, num_classes)
    except ValueError as e:
        error = e
    distributed.raise_if_any(error, "checking the labels")


def loader_workers(config: TrainConfig) -> tuple[int, str]:
    """Worker count for each of the two loaders, and why (`loaders.loader.training_workers`)."""
    return training_workers(config.num_workers, batch_size=config.batch_size, image_size=config.image_size,
                            process_count=jax.process_count())


@dataclass
class Folds:
    """The records a cross-validation run splits, and the fold of each (`train.cv.fit_folds`)."""

    dataset: TFRecordDataset
    ids: list[str]  # read once (each column reads every record): folds, folds.csv and OOF labels
    labels: np.ndarray
    assignment: np.ndarray

    @classmethod
    def index(cls, config: TrainConfig) -> Folds:
        dataset = labelled_dataset(config.train)
        if len(dataset) == 0:
            raise DataError(f"the train split {config.train!r} holds no records (its files are empty)")
        ids, labels = dataset.column("id"), np.asarray(dataset.column("class"), dtype=np.int64)
        return cls(dataset, ids, labels, stratified_folds(ids, labels, config.folds, config.fold_seed,
                                                          where=dataset.where))

    def split(self, fold: int) -> dict[str, TFRecordDataset]:
        return {"train": self.dataset.subset(np.flatnonzero(self.assignment != fold)),
                "val": self.dataset.subset(np.flatnonzero(self.assignment == fold))}


def index_splits(config: TrainConfig, folds: Folds | None = None) -> dict[str, TFRecordDataset]:
    """The training and validation datasets, each indexed once, before any work starts (converting
    a model, a training epoch): an empty split is refused here. `build_loaders` gives them their
    transforms once the model has said how to crop. With `config.folds`, fold `config.fold` of
    `config.train` is the validation set."""
    if config.folds:
        return (folds or Folds.index(config)).split(int(config.fold))
    datasets = {}
    for split in ("train", "val"):
        pattern = getattr(config, split)
        datasets[split] = labelled_dataset(pattern)
        if len(datasets[split]) == 0:
            raise DataError(f"the {split} split {pattern!r} holds no records (its files are empty)")
    return datasets


AUGMENT_COPY = "augment"  # out/augment.yaml or .json: the pipeline file a run trains with


def augment_source(config: TrainConfig) -> str | None:
    """The albumentations file `config.augment` names (None: a recipe or nothing): the run
    folder's copy once the run has one, so a resumed run trains with what it started with."""
    if config.augment is None or config.augment in RECIPES:
        return None
    copy = augment_copy(config)
    return copy if os.path.exists(copy) else config.augment


def augment_copy(config: TrainConfig) -> str:
    return os.path.join(config.out, AUGMENT_COPY + os.path.splitext(config.augment)[1])


def training_augmentation(config: TrainConfig) -> Any:
    """The training pipeline: crop, flips and the config's extras (and recipe), or the saved
    pipeline of `config.augment`, checked to produce `image_size` squares."""
    source = augment_source(config)
    if source is None:
        return train_transform(config.image_size, scale=(config.scale_min, 1.0), hflip=config.hflip,
                               color_jitter=config.color_jitter, recipe=config.augment)
    pipeline = load_augment(source)
    size = config.image_size
    probe = pipeline(image=np.full((2 * size + 7, 2 * size + 3, 3), 128, np.uint8))["image"]
    if probe.shape[:2] != (size, size):
        raise ConfigError(f"{source}: turns a {2 * size + 7}x{2 * size + 3} image into {probe.shape[0]}x"
                          f"{probe.shape[1]}; training needs {size}x{size} (end the pipeline with a crop or "
                          f"resize to image_size={size})")
    return pipeline


def build_loaders(config: TrainConfig, datasets: dict[str, TFRecordDataset], crop_pct: float, num_devices: int,
                  num_workers: int | None = None, augment: Any = None):
    train_ds, val_ds = datasets["train"], datasets["val"]
    train_ds.transform = RecordTransform(augment if augment is not None else training_augmentation(config))
    val_ds.transform = RecordTransform(eval_transform(config.image_size, crop_pct=crop_pct))
    for ds in (train_ds, val_ds):
        check_labels_everywhere(ds, config.num_classes)
    if num_workers is None:
        num_workers, _ = loader_workers(config)
    # make_loader slices per process itself
    common = dict(num_devices=num_devices, seed=config.seed, skip_bad_images=config.skip_bad_images)
    val_batches = -(-len(val_ds) // config.batch_size)  # more validation workers would never get a batch
    val_workers = min(num_workers, val_batches) if config.num_workers == "auto" else num_workers
    # make_loader refuses a training set smaller than one batch, naming both sizes.
    return (make_loader(train_ds, config.batch_size, train=True, num_workers=num_workers, **common),
            make_loader(val_ds, config.batch_size, train=False, num_workers=val_workers, **common))


def data_wait_hint(row: dict[str, float], num_workers: int, cpus: int | None = None) -> str | None:
    """One line of advice when an epoch waited for input more than DATA_WAIT_HINT of its step time."""
    if row["data_wait"] <= DATA_WAIT_HINT:
        return None
    cpus = usable_cpus() if cpus is None else cpus
    head = (f"data: training waited for input {row['data_wait']:.0%} of step time at "
            f"{row['images_per_sec']:.0f} img/s with {num_workers} loader workers: ")
    if num_workers < workers_for_cpus(cpus):
        return head + (f"raise --num-workers (this host has {cpus} usable CPUs) "
                       "or lower the augmentation cost")
    return head + (f"the workers already use this host's {cpus} usable CPUs: lower the augmentation "
                   "cost (smaller source images, reduce_decode, fewer transforms) or use more cores")
