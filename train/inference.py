"""`predict`: class predictions for a test split, written as a Kaggle `submission.csv`."""
from __future__ import annotations

import csv
import functools
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from torch2flax.errors import ConfigError, DataError, MissingFileError
from torch2flax.loaders import RecordTransform, TFRecordDataset, eval_transform, make_loader
from torch2flax.portable import PortableModule
from torch2flax.train import artifacts, distributed
from torch2flax.train.checkpoint import load_checkpoint
from torch2flax.train.config import TTA_MODES
from torch2flax.train.parallel import Parallel, select_devices
from torch2flax.train.steps import COMPUTE_DTYPES, predict_step

TEST_FEATURES = {"image": "bytes", "id": "str"}


@dataclass
class PredictResult:
    ids: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    files: list[str]


def submission_csv(ids: np.ndarray, labels: np.ndarray) -> str:
    """`id,label` rows by the csv module: an id with a comma, a quote or a newline is quoted."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("id", "label"))
    writer.writerows((str(i), int(label)) for i, label in zip(ids, labels))
    return buf.getvalue()


# `tta=RUN_TTA`: each checkpoint predicts with the test-time augmentation its run's out-of-fold
# predictions used (its config's `tta`; none for a model file), as it does with its image size.
RUN_TTA = "run"


def ensemble_weights(weights: Sequence[float] | None, count: int, what: str) -> list[float]:
    """One non-negative weight per member (default equal), normalised to sum to 1."""
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(weights) != count:
        raise ConfigError(f"{len(weights)} weights for {count} {what}s: give one weight per {what}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"weights {weights}: need non-negative weights with a positive sum")
    return [w / sum(weights) for w in weights]


@dataclass(frozen=True)
class Member:
    """One model of an ensemble: its checkpoint, its share of the probabilities and its TTA."""

    checkpoint: str
    weight: float
    tta: str | None = RUN_TTA


def member_ttas(tta: str | None | Sequence[str | None], count: int) -> list[str | None]:
    """One TTA mode per source: a single mode (or `RUN_TTA`) for all, or one per source;
    "none" is accepted for None (the CLI's spelling)."""
    ttas = [tta] * count if tta is None or isinstance(tta, str) else list(tta)
    if len(ttas) == 1 and count > 1:
        ttas *= count
    if len(ttas) != count:
        raise ConfigError(f"{len(ttas)} TTA modes for {count} checkpoints: give one, or one per checkpoint")
    ttas = [None if t == "none" else t for t in ttas]
    for t in ttas:
        if t not in (*TTA_MODES, RUN_TTA):
            raise ConfigError(f"unknown tta {t!r}: expected none, hflip or {RUN_TTA!r} (the checkpoint's own)")
    return ttas


def ensemble_members(sources: str | Sequence[str], weights: Sequence[float] | None = None,
                     tta: str | None | Sequence[str | None] = RUN_TTA) -> list[Member]:
    """Every member: a `.msgpack` is one; a run folder is its `best.msgpack`; a cross-validation
    folder is every finished fold's `best.msgpack`, sharing its weight equally. Weights default to 1
    each and are normalised to sum to 1; `tta` is one mode for all or one per source."""
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    weights = ensemble_weights(weights, len(sources), "checkpoint")
    members = []
    for source, weight, mode in zip(sources, weights, member_ttas(tta, len(sources))):
        source = os.fspath(source)
        if not os.path.exists(source):
            raise MissingFileError(f"no checkpoint at {source!r}")
        if os.path.isfile(source):
            found = [source]
        elif os.path.isfile(os.path.join(source, "best.msgpack")):
            found = [os.path.join(source, "best.msgpack")]
        else:
            folds = sorted((n for n in os.listdir(source) if n.startswith("fold") and n[4:].isdigit()),
                           key=lambda n: int(n[4:])) if os.path.isdir(source) else []
            found = [os.path.join(source, n, "best.msgpack") for n in folds
                     if os.path.isfile(os.path.join(source, n, "best.msgpack"))]
            if not found:
                raise MissingFileError(f"{source}: not a checkpoint, a run folder with best.msgpack, or a "
                                       "cross-validation folder with fold*/best.msgpack")
        members += [Member(path, weight / len(found), mode) for path in found]  # the weights already sum to 1
    return members


def predict(checkpoint: str | Sequence[str], test: str, out: str = "submission.csv", *,
            tta: str | None | Sequence[str | None] = RUN_TTA,
            probs: str | None = None, batch_size: int = 64, image_size: int | None = None,
            crop_pct: float | None = None, num_workers: int | str = "auto", parallel: str = "pmap",
            num_devices: int | None = None, dtype: str = "float32", weights: Sequence[float] | None = None,
            portable: bool | None = None, compile_cache: str = "auto", progress: bool = True) -> PredictResult:
    """Predict every record of `test` (in file order) and write `id,label` to `out`.

    Image size and centre crop default to what the checkpoint was validated with, and `tta` to
    what its run's out-of-fold predictions used (`RUN_TTA`; None: no TTA, "hflip": mirrored too).

    Several checkpoints (or run folders, or cross-validation folders: see `ensemble_members`)
    make an ensemble: each member predicts with its own eval transform, image size and TTA
    (`tta` one mode for all, or one per checkpoint), and the probabilities are averaged with
    `weights` (default equal), so backbones, backends and image sizes mix.

    A file with a portable program (`train --portable`, `save(..., portable=True)`) is predicted by
    that program (no `torch.export`, no timm); `portable=False` rebuilds every model from timm.
    `compile_cache`: JAX's persistent compilation cache folder, as `TrainConfig.compile_cache`
    (`train.compile_cache`; on Kaggle the first checkpoint's folder when it is writable).

    Multi-host: every process runs `predict` with the same arguments (`batch_size` is the
    global batch) and predicts its slice of each batch; process 0 gathers the rows and
    writes the files; every process returns the whole result.
    """
    distributed.initialize()
    from torch2flax.train import compile_cache as cache

    first = os.fspath(checkpoint if isinstance(checkpoint, (str, os.PathLike)) else checkpoint[0])
    run = first if os.path.isdir(first) else os.path.dirname(os.path.abspath(first))
    cache.enable(compile_cache, run_out=run if os.access(run, os.W_OK) else None)
    # Indexed once, before the model is loaded; the transform needs the checkpoint's image size.
    dataset = TFRecordDataset(test, features=TEST_FEATURES)
    if len(dataset) == 0:
        raise DataError(f"{test}: the test set holds no records; nothing to predict")
    ids, prob = None, 0.0
    for member in ensemble_members(checkpoint, weights, tta):
        member_ids, member_prob = predict_dataset(
            member.checkpoint, dataset, tta=member.tta, batch_size=batch_size, image_size=image_size, crop_pct=crop_pct,
            num_workers=num_workers, parallel=parallel, num_devices=num_devices, dtype=dtype, portable=portable,
            progress=progress, source=test)
        ids = member_ids if ids is None else ids
        prob = prob + member.weight * member_prob.astype(np.float64)
    prob = np.asarray(prob, dtype=np.float32)
    labels = prob.argmax(-1)
    files = [out] + ([probs] if probs else [])
    if distributed.is_main():
        artifacts.atomic_write(out, submission_csv(ids, labels))
        if probs:
            buf = io.BytesIO()
            np.save(buf, prob)
            artifacts.atomic_write(probs, buf.getvalue())
    distributed.barrier("torch2flax: predictions written")
    return PredictResult(ids=ids, labels=labels, probs=prob, files=[os.path.abspath(f) for f in files])


@functools.lru_cache(maxsize=8)
def predict_program(par_key: tuple, module: Any, mean: tuple, std: tuple, dtype: str, tta: str | None) -> Any:
    """The compiled prediction step, memoised like the training steps: an ensemble member
    predicted again, or `predict` run twice in a notebook, is not traced and compiled again."""
    return Parallel(*par_key).compile(functools.partial(
        predict_step, module=module, mean=mean, std=std, dtype=COMPUTE_DTYPES[dtype], tta=tta))


def predict_dataset(checkpoint: str, dataset: TFRecordDataset, *, tta: str | None = RUN_TTA, batch_size: int = 64,
                    image_size: int | None = None, crop_pct: float | None = None,
                    num_workers: int | str = "auto", parallel: str = "pmap", num_devices: int | None = None,
                    dtype: str = "float32", portable: bool | None = None, progress: bool = True,
                    source: str = "the dataset") -> tuple[np.ndarray, np.ndarray]:
    """`(ids, probabilities)` of every record of `dataset`, in dataset order, from `checkpoint`
    with its eval transform (the dataset's own transform is replaced) and `tta` (`RUN_TTA`: its
    run's); `portable`: as in `predict`. Multi-host: every process calls it and gets every row."""
    progress = progress and distributed.is_main()
    module, variables, saved = load_checkpoint(checkpoint, portable=portable)
    data = saved.data if saved is not None else None  # None: a plain model file
    if tta == RUN_TTA:
        tta = saved.config.get("tta") if saved is not None else None
        if tta not in TTA_MODES:
            raise DataError(f"{checkpoint}: its run's config names tta={tta!r}, not one of {TTA_MODES}: "
                            "give predict's tta (--tta hflip or none)")
    size = image_size or (data.image_size if data else int(module.pretrained_cfg["input_size"][-1]))
    crop = crop_pct if crop_pct is not None else (data.crop_pct if data else float(module.pretrained_cfg["crop_pct"]))
    if isinstance(module, PortableModule) and module.input_hw != (size, size):
        hw = module.input_hw
        raise ConfigError(f"{checkpoint}: its portable program takes {hw[0]}x{hw[1]} images, not {size}x{size}: "
                          f"predict at {hw[0]} (--image-size) or rebuild the full model (--full-model)")
    par = Parallel(parallel, select_devices(num_devices))
    dataset.transform = RecordTransform(eval_transform(size, crop_pct=crop))
    loader = make_loader(dataset, batch_size, train=False, num_devices=len(par.devices),
                         num_workers=num_workers)  # this process's slices (make_loader asks jax)
    cfg = module.pretrained_cfg
    step = predict_program((par.layout, tuple(par.devices)), module.clone(dtype=COMPUTE_DTYPES[dtype]),
                           tuple(cfg["mean"]), tuple(cfg["std"]), dtype, tta)
    variables = par.replicate(variables)
    all_ids, all_probs, all_rows = [], [], []
    local = loader.local_batch_size
    for b, batch in enumerate(tqdm(par.feed(loader), total=len(loader), desc="predict", unit="batch",
                                   disable=not progress)):
        p = par.gather(step(variables, batch["image"]))
        mask = par.gather(batch["mask"]).reshape(-1)
        all_probs.append(p[mask])
        all_ids.append(np.asarray(batch["id"]).reshape(-1)[mask])
        # The dataset position of each row: this process's slice of global batch b.
        all_rows.append(b * batch_size + jax.process_index() * local + np.flatnonzero(mask))
    gathered = distributed.gather_rows({"id": np.concatenate(all_ids), "row": np.concatenate(all_rows),
                                        "prob": np.concatenate(all_probs).astype(np.float32)})
    order = np.argsort(gathered["row"], kind="stable")  # file order
    ids, prob, rows = gathered["id"][order], gathered["prob"][order], gathered["row"][order]
    if not np.array_equal(rows, np.arange(len(dataset))):
        raise RuntimeError(f"predicted {len(ids)} records ({len(np.unique(rows))} distinct) but {source} "
                           f"holds {len(dataset)}")
    return ids, prob
