"""What a run leaves in its output folder besides checkpoints: config, metrics, curves.

Every file is written to a temporary name in the same folder and renamed into
place, so a run killed at any moment leaves either the old file or the new one.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from torch2flax.utils import atomic_write

METRIC_COLUMNS = ("epoch", "step", "lr", "train_loss", "train_accuracy", "val_loss",
                  "val_accuracy", "val_macro_f1", "images_per_sec", "data_wait", "epoch_seconds", "bad_images")


def write_metrics_csv(path: str, rows: Sequence[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())


def read_metrics_csv(path: str) -> list[dict]:
    """The rows of `metrics.csv` (an empty cell, such as an epoch's missing throughput, stays absent)."""
    with open(path, newline="") as f:
        return [{k: (int(v) if k in ("epoch", "step", "bad_images") else float(v)) for k, v in row.items()
                 if v not in ("", None)} for row in csv.DictReader(f)]


def append_bad_images_csv(path: str, epoch: int, rows: Sequence[tuple[str, str]]) -> None:
    """Add one epoch's skipped images (`split`, the error naming file, record and id) to the list."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    try:
        with open(path, newline="") as f:
            buf.write(f.read())
    except FileNotFoundError:
        writer.writerow(["epoch", "split", "error"])
    writer.writerows([epoch, split, error] for split, error in rows)
    atomic_write(path, buf.getvalue())


def agg_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib `Figure` on its own Agg canvas, for files: not through pyplot, so no global
    figure state and no `matplotlib.use`, which in a notebook would switch the user's inline
    backend off."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def plot_curves(path: str, rows: Sequence[dict]) -> None:
    """Loss (train and validation) and validation macro F1 per epoch (`agg_figure`). Fixed
    margins instead of `tight_layout`, which draws the figure a second time (every epoch)."""
    epochs = [r["epoch"] + 1 for r in rows]
    fig = agg_figure((9, 3.5))
    ax_loss, ax_f1 = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.9, wspace=0.25)
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], marker="o", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], marker="o", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_loss.legend()
    ax_f1.plot(epochs, [r["val_macro_f1"] for r in rows], marker="o", color="tab:green")
    ax_f1.set(xlabel="epoch", ylabel="macro F1", title="Validation macro F1", ylim=(0, 1.02))
    for ax in (ax_loss, ax_f1):
        ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write(path, buf.getvalue())
