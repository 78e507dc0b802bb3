"""Stratified k-fold assignment that depends only on (record id, label, K, seed).

A fold must not move when the same records arrive in other files, in another order, or on
another number of processes: Kaggle teams share fold numbers across machines and backbones so
that out-of-fold predictions of different models line up. So no record's position matters:
within each class, records are ordered by a keyed hash of their id and dealt to the folds in
turn, each class starting where the previous one stopped. Per class, and in total, fold sizes
then differ by at most one. (scikit-learn's `StratifiedKFold` depends on the input order.)
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np

from torch2flax.errors import ConfigError, DataError


def _rank_key(seed: int, record_id: str) -> bytes:
    return hashlib.blake2b(record_id.encode(), digest_size=8, key=str(seed).encode()).digest()


def stratified_folds(ids: Sequence[str], labels: Sequence[int], k: int, seed: int = 0,
                     where: Callable[[int], str] | None = None) -> np.ndarray:
    """The fold (0..k-1) of every record. `ids` must be unique (a duplicate would land in two
    folds' out-of-fold rows): a `DataError` (a ValueError) names both records (`where(i)`: file and record)."""
    if k < 2:
        raise ConfigError(f"folds={k}: k-fold cross-validation needs at least 2 folds")
    ids = [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
    labels = np.asarray(labels, dtype=np.int64)
    if len(ids) != len(labels):
        raise ValueError(f"{len(ids)} ids but {len(labels)} labels")
    if len(ids) < k:
        raise ConfigError(f"folds={k}: only {len(ids)} records to split")
    first: dict[str, int] = {}
    for i, rid in enumerate(ids):
        j = first.setdefault(rid, i)
        if j != i:
            at = (lambda n: f" ({where(n)})") if where is not None else (lambda n: "")
            raise DataError(f"id {rid!r} appears twice: records {j}{at(j)} and {i}{at(i)}; folds need unique ids")
    folds = np.empty(len(ids), dtype=np.int64)
    start = 0
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = sorted(members, key=lambda i: (_rank_key(seed, ids[i]), ids[i]))
        folds[members] = (start + np.arange(len(members))) % k
        start = (start + len(members)) % k
    return folds
