"""What `fit` returns (its own module: the trainer and the cross-validation run both make one)."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch2flax.train.preemption import StopReason


@dataclass
class FitResult:
    out: str
    best_macro_f1: float
    history: list[dict]
    files: list[str]
    images_per_sec: float
    reinitialized: tuple[str, ...] = field(default_factory=tuple)
    stopped: StopReason | None = None  # why the run ended before config.epochs (None: it did not)
    exit_status: int = 0  # what the command line exits with (train.preemption.StopRequests)
    cv: dict | None = None  # a cross-validation run's report (train.cv.cv_report)
    folds: dict[int, FitResult] = field(default_factory=dict)  # its folds' results, those run in this call
