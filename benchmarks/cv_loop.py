"""The competition loop end to end on scikit-learn's digits (no downloads): k-fold
cross-validation on the merged labelled splits, the out-of-fold score, and the test accuracy of
the fold ensemble against a single model trained on the plain train/val split, in one run.

Both sides train the same timm model from random init (seeded) with the same settings; the single
model trains on the train split (70%) and validates on val (15%), each fold on (K-1)/K of train +
val. The test split's labels (held back from its TFRecords) score both. Prints a table.

Usage: python benchmarks/cv_loop.py [--model resnet18] [--folds 5] [--epochs 4] [--out runs/cv_loop]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--out", default="runs/cv_loop")
    args = ap.parse_args()

    import jax

    from torch2flax.train import TrainConfig, fit, predict
    from torch2flax.train.demo import digits_tfrecords
    from torch2flax.train.metrics import accuracy, macro_f1

    data = digits_tfrecords(os.path.join(args.out, "data"), image_size=args.image_size)
    common = dict(model=args.model, num_classes=10, image_size=args.image_size, batch_size=64, epochs=args.epochs,
                  lr=2e-3, seed=0)

    def test_scores(checkpoint: str) -> dict[str, float]:
        result = predict(checkpoint, data.globs["test"], os.path.join(args.out, "sub.csv"), progress=False)
        truth = np.array([data.test_labels[str(i)] for i in result.ids])
        confusion = np.zeros((10, 10), np.int64)
        np.add.at(confusion, (truth, result.labels), 1)
        return {"accuracy": accuracy(confusion), "macro_f1": macro_f1(confusion)}

    started = time.perf_counter()
    single = fit(TrainConfig(train=data.globs["train"], val=data.globs["val"], out=os.path.join(args.out, "single"),
                             **common), progress=False)
    single_seconds = time.perf_counter() - started
    started = time.perf_counter()
    cv = fit(TrainConfig(train=[data.globs["train"], data.globs["val"]], folds=args.folds,
                         out=os.path.join(args.out, f"cv{args.folds}"), **common), progress=False)
    cv_seconds = time.perf_counter() - started
    single_test = test_scores(os.path.join(args.out, "single", "best.msgpack"))
    ensemble_test = test_scores(os.path.join(args.out, f"cv{args.folds}"))  # every fold's best.msgpack
    report = cv.cv

    print(f"{args.model} from random init at {args.image_size} px, {args.epochs} epochs, digits "
          f"({data.counts}); {platform.machine()}, {os.cpu_count()} CPUs, {jax.devices()[0].platform}\n")
    print("| model | validation (macro F1) | test accuracy | test macro F1 | training time |")
    print("|---|---|---:|---:|---:|")
    print(f"| single model (train split) | val split: {single.best_macro_f1:.4f} | {single_test['accuracy']:.4f} | "
          f"{single_test['macro_f1']:.4f} | {single_seconds:.0f} s |")
    print(f"| {args.folds}-fold ensemble (train + val) | out-of-fold: {report['oof_macro_f1']:.4f} (folds "
          f"{report['fold_macro_f1_mean']:.4f} +- {report['fold_macro_f1_std']:.4f}) | "
          f"{ensemble_test['accuracy']:.4f} | {ensemble_test['macro_f1']:.4f} | {cv_seconds:.0f} s |")
    print(f"\nensemble vs single: test accuracy {ensemble_test['accuracy'] - single_test['accuracy']:+.4f}")


if __name__ == "__main__":
    main()
