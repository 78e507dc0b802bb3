"""`predict`: class predictions for a test split, written as a Kaggle `submission.csv`."""
from __future__ import annotations

import csv
import functools
import io
import os
from dataclasses import dataclass

import jax
import numpy as np
from tqdm.auto import tqdm

from torch2flax.loaders import RecordTransform, TFRecordDataset, eval_transform, make_loader
from torch2flax.train import artifacts, distributed
from torch2flax.train.checkpoint import load_checkpoint
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


def predict(checkpoint: str, test: str, out: str = "submission.csv", *, tta: str | None = None,
            probs: str | None = None, batch_size: int = 64, image_size: int | None = None,
            crop_pct: float | None = None, num_workers: int | str = "auto", parallel: str = "pmap",
            num_devices: int | None = None, dtype: str = "float32",
            progress: bool = True) -> PredictResult:
    """Predict every record of `test` (in file order) and write `id,label` to `out`.

    Image size and centre crop default to what the checkpoint was validated with.

    Multi-host: every process runs `predict` with the same arguments (`batch_size` is the
    global batch) and predicts its slice of each batch; process 0 gathers the rows and
    writes the files; every process returns the whole result.
    """
    distributed.initialize()
    # Indexed once, before the model is loaded; the transform needs the checkpoint's image size.
    dataset = TFRecordDataset(test, features=TEST_FEATURES)
    if len(dataset) == 0:
        raise ValueError(f"{test}: the test set holds no records; nothing to predict")
    ids, prob = predict_dataset(checkpoint, dataset, tta=tta, batch_size=batch_size, image_size=image_size,
                                crop_pct=crop_pct, num_workers=num_workers, parallel=parallel,
                                num_devices=num_devices, dtype=dtype, progress=progress, source=test)
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


def predict_dataset(checkpoint: str, dataset: TFRecordDataset, *, tta: str | None = None, batch_size: int = 64,
                    image_size: int | None = None, crop_pct: float | None = None,
                    num_workers: int | str = "auto", parallel: str = "pmap", num_devices: int | None = None,
                    dtype: str = "float32", progress: bool = True,
                    source: str = "the dataset") -> tuple[np.ndarray, np.ndarray]:
    """`(ids, probabilities)` of every record of `dataset`, in dataset order, from `checkpoint`
    with its eval transform (the dataset's own transform is replaced). Multi-host: every process
    calls it and gets every row."""
    progress = progress and distributed.is_main()
    module, variables, saved = load_checkpoint(checkpoint)
    data = saved.data if saved is not None else None  # None: a plain model file
    size = image_size or (data.image_size if data else int(module.pretrained_cfg["input_size"][-1]))
    crop = crop_pct if crop_pct is not None else (data.crop_pct if data else float(module.pretrained_cfg["crop_pct"]))
    par = Parallel(parallel, select_devices(num_devices))
    dataset.transform = RecordTransform(eval_transform(size, crop_pct=crop))
    loader = make_loader(dataset, batch_size, train=False, num_devices=len(par.devices),
                         num_workers=num_workers)  # this process's slices (make_loader asks jax)
    cfg = module.pretrained_cfg
    step = par.compile(functools.partial(
        predict_step, module=module.clone(dtype=COMPUTE_DTYPES[dtype]), mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]), dtype=COMPUTE_DTYPES[dtype], tta=tta))
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
