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
import math
import os
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from torch2flax.errors import ConfigError, DataError, MissingFileError
from torch2flax.train import artifacts
from torch2flax.train.metrics import accuracy, macro_f1

if TYPE_CHECKING:
    from torch2flax.train.config import TrainConfig
    from torch2flax.train.result import FitResult

OOF = "oof.csv"
CV = "cv.json"
FOLDS = "folds.csv"


def fold_dir(out: str, fold: int) -> str:
    return os.path.join(out, f"fold{fold}")


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


def ensemble_report(outs: list[str], weights: list[float] | None = None) -> dict[str, Any]:
    """The CV score of a weighted mean of several runs' out-of-fold probabilities (each `out` a
    cross-validation folder with its `oof.csv`, or an oof.csv itself): choose ensemble weights on
    OOF rows before submitting. Rows are matched by id; every run must hold the same ids."""
    from torch2flax.train.inference import ensemble_weights  # jax: not on `torch2flax cv`'s import path

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


# ---------------------------------------------------------------------------
# the cross-validation run (`fit` with `config.folds`)


def fit_folds(config: TrainConfig, fit_run: Callable[..., FitResult], *, resume: bool = False,
              stop_after_epochs: int | None = None, progress: bool = True) -> FitResult:
    """`fit` for `config.folds` (see there): each fold of `config.fold` trained by `fit_run`, its
    out-of-fold predictions written, then the CV score of the folds finished so far. `fit_run`
    trains one fold (`trainer.fit_run`, passed in: the trainer calls here)."""
    from tqdm.auto import tqdm

    from torch2flax.train import distributed
    from torch2flax.train.checkpoint import resume_source
    from torch2flax.train.config import dumps
    from torch2flax.train.data import Folds
    from torch2flax.train.result import FitResult

    folds = Folds.index(config)
    if distributed.is_main():
        os.makedirs(config.out, exist_ok=True)
        artifacts.atomic_write(os.path.join(config.out, "config.json"), dumps(config))
        artifacts.atomic_write(os.path.join(config.out, FOLDS),
                               folds_csv(folds.ids, folds.labels, folds.assignment))
    results: dict[int, FitResult] = {}
    last: FitResult | None = None
    for k in config.fold_numbers():
        run_config = replace(config, fold=k, out=fold_dir(config.out, k))
        oof = os.path.join(run_config.out, OOF)
        if resume and os.path.exists(oof):
            if distributed.is_main() and progress:
                tqdm.write(f"fold {k}: finished earlier ({oof})")
            continue
        if distributed.is_main() and progress:
            tqdm.write(f"fold {k} of {config.folds}: training in {run_config.out}")
        last = results[k] = fit_run(run_config, resume=resume and resume_source(run_config.out) is not None,
                                    stop_after_epochs=stop_after_epochs, progress=progress, folds=folds)
        if last.stopped or not last.history or last.history[-1]["epoch"] < config.epochs - 1:
            break  # stopped, or `stop_after_epochs` ended this call: no OOF rows from an unfinished fold
        write_oof(run_config, folds, k, progress=progress)
    report = write_cv(config.out, config.folds) if distributed.is_main() else None
    distributed.barrier("torch2flax: cv written")  # the others read what process 0 wrote
    report = report if report is not None else cv_report(config.out, config.folds)
    if distributed.is_main() and progress:
        tqdm.write(summary(report))
    files = [os.path.join(config.out, name) for name in ("config.json", FOLDS, OOF, CV)]
    return FitResult(out=config.out, best_macro_f1=report.get("oof_macro_f1", -math.inf), history=[],
                     files=[f for f in files if os.path.exists(f)],
                     images_per_sec=last.images_per_sec if last else 0.0,
                     reinitialized=last.reinitialized if last else (), stopped=last.stopped if last else None,
                     exit_status=last.exit_status if last else 0, cv=report, folds=results)


def write_oof(config: TrainConfig, folds: Any, fold: int, *, progress: bool) -> str:
    """Fold `fold`'s held-out records predicted by its best checkpoint: `config.out/oof.csv`."""
    from torch2flax.train import distributed
    from torch2flax.train.config import config_kwargs
    from torch2flax.train.inference import predict_dataset

    held_out = folds.split(fold)["val"]
    labels = folds.labels[folds.assignment == fold]  # the held-out records, in the same order
    ids, probs = predict_dataset(os.path.join(config.out, "best.msgpack"), held_out, progress=progress,
                                 source=f"fold {fold}", **config_kwargs(predict_dataset, config))
    path = os.path.join(config.out, OOF)
    if distributed.is_main():
        artifacts.atomic_write(path, oof_csv(ids, fold, labels, probs))
    return path
