"""k-fold cross-validation: fold assignment, out-of-fold (OOF) predictions and the CV score.

`fit` with `config.folds = K` trains fold I in `OUT/fold{I}/` with fold I of `config.train` as
its validation set, then predicts that held-out fold with the fold's best checkpoint (its eval
transform, `config.tta`) into `OUT/fold{I}/oof.csv`. `write_cv(OUT)` gathers the finished folds
into `OUT/oof.csv` (every training record once when all K are done) and `OUT/cv.json`: macro F1
and accuracy over all OOF rows (the CV estimate), and per fold with their mean and std.
`torch2flax cv OUT` recomputes both from whichever folds have finished and names the missing ones.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from torch2flax.errors import ConfigError, DataError, MissingFileError
from torch2flax.train import artifacts
from torch2flax.train.metrics import accuracy, macro_f1

OOF = "oof.csv"
CV = "cv.json"
FOLDS = "folds.csv"


def fold_dir(out: str, fold: int) -> str:
    return os.path.join(out, f"fold{fold}")


def fold_assignment(dataset: Any, ids: Any, labels: Any, folds: int, seed: int) -> np.ndarray:
    """The fold of every record of `dataset` (a TFRecordDataset), given its `id` and `class` columns."""
    from torch2flax.loaders import stratified_folds

    return stratified_folds(ids, labels, folds, seed, where=dataset.where)


def folds_csv(ids: Any, labels: Any, assignment: np.ndarray) -> str:
    """`id,label,fold` rows: which fold holds each record (to reuse the folds elsewhere)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("id", "label", "fold"))
    writer.writerows((str(i), int(label), int(f)) for i, label, f in zip(ids, labels, assignment))
    return buf.getvalue()


def oof_csv(ids: Any, folds: Any, labels: Any, probs: np.ndarray) -> str:
    """`id,fold,label,pred,prob_0..prob_{C-1}` rows by the csv module (ids quoted as needed);
    probabilities as exact float reprs, so a CV score recomputed from the file is the same."""
    probs = np.asarray(probs, dtype=np.float64)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("id", "fold", "label", "pred", *(f"prob_{c}" for c in range(probs.shape[1]))))
    for rid, fold, label, p in zip(ids, np.broadcast_to(folds, len(probs)), labels, probs):
        writer.writerow((str(rid), int(fold), int(label), int(p.argmax()), *(repr(float(v)) for v in p)))
    return buf.getvalue()


def read_oof(path: str) -> dict[str, np.ndarray]:
    """An oof.csv as arrays: `id`, `fold`, `label`, `pred`, `probs` [N, C]."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not an out-of-fold CSV file ({e})") from e
    header, body = (rows[0], rows[1:]) if rows else ([], [])
    if header[:4] != ["id", "fold", "label", "pred"]:
        raise DataError(f"{path}: not an out-of-fold file (header {header[:4]}, expected id,fold,label,pred,...)")
    num_classes = len(header) - 4
    if num_classes < 1:
        raise DataError(f"{path}: no prob_0.. columns after id,fold,label,pred: not an out-of-fold file")
    ids, folds, labels, preds, probs = [], [], [], [], []
    for i, r in enumerate(body, start=1):
        try:
            if len(r) != len(header):
                raise ValueError(f"{len(r)} fields, the header has {len(header)}")
            fold, label, pred, p = int(r[1]), int(r[2]), int(r[3]), [float(v) for v in r[4:]]
        except ValueError as e:
            raise DataError(f"{path}: row {i} after the header: {e} (a damaged out-of-fold file)") from None
        if not (0 <= label < num_classes and 0 <= pred < num_classes):
            raise DataError(f"{path}: row {i} after the header: label {label} or pred {pred} is outside "
                            f"[0, {num_classes}) (the file has {num_classes} prob_ columns)")
        ids.append(r[0])
        folds.append(fold)
        labels.append(label)
        preds.append(pred)
        probs.append(p)
    return {"id": np.array(ids, dtype=str), "fold": np.array(folds, dtype=np.int64),
            "label": np.array(labels, dtype=np.int64), "pred": np.array(preds, dtype=np.int64),
            "probs": np.array(probs, dtype=np.float64).reshape(-1, num_classes)}


def scores(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict[str, float]:
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, preds), 1)
    return {"macro_f1": macro_f1(confusion), "accuracy": accuracy(confusion), "count": int(len(labels))}


def cv_report(out: str, folds: int | None = None) -> dict[str, Any]:
    """The CV summary of the finished folds under `out` (`folds` from `out/config.json` if not given)."""
    return _collect(out, folds)[0]


def _collect(out: str, folds: int | None) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """`cv_report`, and the finished folds' OOF rows merged (None: no fold has finished)."""
    if folds is None:
        path = os.path.join(out, "config.json")
        if not os.path.exists(path):
            raise MissingFileError(f"{out}: no config.json (is it the folder of a `train --folds` run?)")
        try:
            with open(path) as f:
                folds = int(json.load(f).get("folds") or 0)
        except (AttributeError, TypeError, ValueError) as e:  # not JSON, not a mapping, folds not a number
            raise ConfigError(f"{path}: not a run's config.json ({type(e).__name__}: {e})") from e
        if folds < 2:
            raise DataError(f"{path}: not a cross-validation run (folds={folds})")
    done = [k for k in range(folds) if os.path.exists(os.path.join(fold_dir(out, k), OOF))]
    missing = [k for k in range(folds) if k not in done]
    report: dict[str, Any] = {"folds": folds, "done": done, "missing": missing}
    if not done:
        return report, None
    parts = [read_oof(os.path.join(fold_dir(out, k), OOF)) for k in done]
    num_classes = parts[0]["probs"].shape[1]
    merged = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    dupes = len(merged["id"]) - len(np.unique(merged["id"]))
    if dupes:
        raise DataError(f"{out}: {dupes} ids appear in more than one fold's {OOF} (folds from other settings?)")
    per_fold = {str(k): scores(p["label"], p["pred"], num_classes) for k, p in zip(done, parts)}
    f1s = np.array([s["macro_f1"] for s in per_fold.values()])
    accs = np.array([s["accuracy"] for s in per_fold.values()])
    overall = scores(merged["label"], merged["pred"], num_classes)
    report.update({"oof_macro_f1": overall["macro_f1"], "oof_accuracy": overall["accuracy"],
                   "records": overall["count"], "per_fold": per_fold,
                   "fold_macro_f1_mean": float(f1s.mean()), "fold_macro_f1_std": float(f1s.std()),
                   "fold_accuracy_mean": float(accs.mean()), "fold_accuracy_std": float(accs.std())})
    return report, merged


def write_cv(out: str, folds: int | None = None) -> dict[str, Any]:
    """`out/oof.csv` (the finished folds' rows) and `out/cv.json`; returns the report."""
    report, rows = _collect(out, folds)
    if rows is not None:
        artifacts.atomic_write(os.path.join(out, OOF), oof_csv(rows["id"], rows["fold"], rows["label"], rows["probs"]))
    artifacts.atomic_write(os.path.join(out, CV), json.dumps(report, indent=2) + "\n")
    return report


def summary(report: dict[str, Any]) -> str:
    """What `torch2flax cv` and a `--folds` run print."""
    folds, done, missing = report["folds"], report["done"], report["missing"]
    if not done:
        return f"cv: none of the {folds} folds has finished (missing: {', '.join(map(str, missing))})"
    lines = [f"cv: {len(done)} of {folds} folds: OOF macro F1 {report['oof_macro_f1']:.4f}, accuracy "
             f"{report['oof_accuracy']:.4f} over {report['records']} records; per fold macro F1 "
             f"{report['fold_macro_f1_mean']:.4f} +- {report['fold_macro_f1_std']:.4f}"]
    lines += [f"  fold {k}: macro F1 {s['macro_f1']:.4f}, accuracy {s['accuracy']:.4f} ({s['count']} records)"
              for k, s in report["per_fold"].items()]
    if missing:
        lines.append(f"  missing: fold {', '.join(map(str, missing))} (train them: torch2flax train "
                     "--resume OUT --fold I, or --fold all)")
    return "\n".join(lines)


def ensemble_weights(weights: Sequence[float] | None, count: int, what: str) -> list[float]:
    """One non-negative weight per member (default equal), normalised to sum to 1."""
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(weights) != count:
        raise ConfigError(f"{len(weights)} weights for {count} {what}s: give one weight per {what}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"weights {weights}: need non-negative weights with a positive sum")
    return [w / sum(weights) for w in weights]


def ensemble_report(outs: list[str], weights: list[float] | None = None) -> dict[str, Any]:
    """The CV score of a weighted mean of several runs' out-of-fold probabilities (each `out` a
    cross-validation folder with its `oof.csv`, or an oof.csv itself): choose ensemble weights on
    OOF rows before submitting. Rows are matched by id; every run must hold the same ids."""
    weights = ensemble_weights(weights, len(outs), "run")
    runs = []
    for out in outs:
        path = out if os.path.isfile(out) or out.endswith(".csv") else os.path.join(out, OOF)
        if not os.path.exists(path):
            raise MissingFileError(f"{path} not found (run `torch2flax cv {out}` once its folds have finished)")
        runs.append((path, read_oof(path)))
    first_path, first = runs[0]
    order = np.argsort(first["id"])
    mixed = np.zeros_like(first["probs"])
    for (path, run), w in zip(runs, weights):
        by_id = np.argsort(run["id"])
        if not np.array_equal(run["id"][by_id], first["id"][order]):
            raise DataError(f"{path} and {first_path} hold different ids: an ensemble's OOF rows must cover "
                             "the same records")
        if run["probs"].shape[1] != first["probs"].shape[1]:
            raise DataError(f"{path}: {run['probs'].shape[1]} classes, {first_path}: {first['probs'].shape[1]}")
        if not np.array_equal(run["label"][by_id], first["label"][order]):
            raise DataError(f"{path} and {first_path} give some ids different labels")
        mixed[order] += w * run["probs"][by_id]
    result = scores(first["label"], mixed.argmax(1), mixed.shape[1])
    members = [{"oof": path, "weight": w, **{k: v for k, v in scores(
        run["label"], run["pred"], mixed.shape[1]).items() if k != "count"}} for (path, run), w in zip(runs, weights)]
    return {"oof_macro_f1": result["macro_f1"], "oof_accuracy": result["accuracy"], "records": result["count"],
            "members": members}
