"""Images that do not decode (`skip_bad_images`): collected from the batches, reported per epoch.

The loader substitutes such an image and flags its row (`loaders.loader.BAD_IMAGE`); here the
flags become a count in metrics.csv and rows in bad_images.csv, every process's gathered.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from torch2flax.loaders.loader import BAD_IMAGE
from torch2flax.train import artifacts, distributed


def host_batches(loader: Iterable[dict], bad: list[str]) -> Iterator[dict]:
    """The loader's batches; rows standing in for an image that did not decode (`skip_bad_images`)
    have their errors appended to `bad` and, in evaluation batches, are masked out."""
    for batch in loader:
        flags = batch.get(BAD_IMAGE)
        if flags is not None:
            flags = np.asarray(flags)
            real = np.asarray(batch["mask"]) if "mask" in batch else np.ones(flags.shape, bool)
            bad.extend(str(m) for m in flags[real & (flags != "")])
            if "mask" in batch:
                batch = {**batch, "mask": real & (flags == "")}
        yield batch


def write_bad_images(path: str, epoch: int, train_bad: list[str], val_bad: list[str], *, gather: bool) -> int:
    """Append this epoch's skipped images (every process's, with `gather`) to `path`
    (bad_images.csv); returns their count."""
    rows = {"split": np.array(["train"] * len(train_bad) + ["val"] * len(val_bad), dtype=str),
            "error": np.array(train_bad + val_bad, dtype=str)}
    if gather:
        rows = distributed.gather_rows(rows)
    count = len(rows["error"])
    if count and distributed.is_main():
        artifacts.append_bad_images_csv(path, epoch, list(zip(rows["split"].tolist(), rows["error"].tolist())))
    return count
