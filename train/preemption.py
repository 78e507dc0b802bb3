"""Ending a run early without losing it: signals, a time limit, and checkpoints every N steps or minutes.

Spot VMs get SIGTERM about 30 s before they go; Ctrl-C and a notebook's interrupt button send
SIGINT; Kaggle and Colab end sessions after a fixed time. `StopRequests` turns the first SIGTERM or
SIGINT into a request the training loop honours after the current step (it writes a checkpoint
with the loader position, so `--resume` continues exactly); a second SIGINT aborts at once.
`Schedule` decides, after each step, whether to checkpoint and whether to stop; `Control` asks it
after each step of an epoch and, in a multi-host run, makes every process agree (`agree`).
"""
from __future__ import annotations

import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from torch2flax.errors import ConfigError

_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([dhms])")


def parse_duration(text: str | float | int) -> float:
    """Seconds in `8h45m`, `10m`, `90s`, `1.5h` or a plain number of seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        try:
            seconds = float(s)
        except ValueError:
            parts = _DURATION.findall(s)
            if not parts or "".join(n + u for n, u in parts) != s:
                raise ConfigError(f"{text!r} is not a duration: use e.g. 8h45m, 10m, 90s or seconds") from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not seconds > 0:  # NaN too
        raise ConfigError(f"{text!r}: a duration must be positive")
    return seconds


@dataclass(frozen=True)
class Every:
    """A checkpoint cadence: every `steps` optimizer steps, or every `seconds` of wall time."""

    steps: int | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str | int) -> Every:
        """`500` (steps) or a duration with a unit (`10m`, `1h30m`)."""
        s = str(text).strip().lower()
        if s.isdigit():
            if int(s) < 1:
                raise ConfigError(f"{text!r}: checkpoint every N steps needs N >= 1")
            return cls(steps=int(s))
        return cls(seconds=parse_duration(s))

    def __str__(self) -> str:
        return f"{self.steps} steps" if self.steps else f"{self.seconds:g} s"


class StopReason(StrEnum):
    """Why a run ended before its last epoch (`FitResult.stopped`); a str, as the CLI prints it."""

    TIME_LIMIT = "time limit"
    SIGINT = "SIGINT"
    SIGTERM = "SIGTERM"


class Action(StrEnum):
    """What `Control.decide` asks of the loop after a step."""

    SAVE = "save"  # write a checkpoint and go on
    STOP = "stop"  # write a checkpoint and end the run


class StopRequests:
    """While entered (in the main thread), SIGTERM and SIGINT set `signal_name` instead of killing
    the process; a second SIGINT raises KeyboardInterrupt. Handlers are restored on exit.

    Off the main thread (Python allows handlers only there) it installs nothing: the signals keep
    their usual effect. `request(reason)` asks for a stop from code (the time limit).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.signal_name: str | None = None
        self.reason: StopReason | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second {name}: aborted without a checkpoint")
        if self.signal_name is None:
            self.signal_name, self.reason = name, StopReason(name)
            print(f"torch2flax: {name} received: finishing this step and writing a checkpoint "
                  "(Ctrl-C again aborts at once)", file=sys.stderr, flush=True)

    def request(self, reason: StopReason) -> None:
        if self.reason is None:
            self.reason = StopReason(reason)

    def adopt(self, reason: StopReason) -> None:
        """Another process's stop (multi-host): stop the same way, with the same exit status."""
        if self.reason is None:
            self.reason = StopReason(reason)
            if reason in signal.Signals.__members__:
                self.signal_name = reason

    @property
    def requested(self) -> bool:
        return self.reason is not None

    @property
    def exit_status(self) -> int:
        """128 + the signal number, what a shell reports for a process that signal stopped (so
        `train && predict` does not predict from an unfinished run); 0 for a time limit."""
        return 128 + int(signal.Signals[self.signal_name]) if self.signal_name else 0


@dataclass
class Schedule:
    """After each step: checkpoint now? stop now? (`clock` is injectable for tests)."""

    every: Every | None = None
    time_limit: float | None = None  # seconds from `started`
    clock: Callable[[], float] = time.monotonic
    started: float = 0.0
    last_save: float = 0.0
    step_seconds: float = 0.0  # the slowest recent step
    save_seconds: float = 0.0  # the last checkpoint's write time
    _last_step: float | None = None

    def __post_init__(self) -> None:
        now = self.clock()
        self.started = self.started or now
        self.last_save = now

    def step_done(self) -> None:
        now = self.clock()
        if self._last_step is not None:
            # The slowest recent step, decaying: one compile-sized first step must not linger.
            self.step_seconds = max(now - self._last_step, 0.9 * self.step_seconds)
        self._last_step = now

    def saved(self, seconds: float) -> None:
        self.last_save, self.save_seconds = self.clock(), seconds

    def save_due(self, global_step: int) -> bool:
        if self.every is None:
            return False
        if self.every.steps:
            return global_step % self.every.steps == 0
        return self.clock() - self.last_save >= self.every.seconds

    def out_of_time(self) -> bool:
        """True once another step plus a checkpoint might not finish within the limit."""
        if self.time_limit is None:
            return False
        margin = 2 * self.step_seconds + 2 * self.save_seconds
        return self.clock() + margin >= self.started + self.time_limit

    def resumed_batches(self) -> None:
        """Forget the step timer (after an epoch's evaluation, which is not a step)."""
        self._last_step = None


# Multi-process runs agree on a stop, or on a checkpoint due by the clock, every SYNC_STEPS steps
# (a host collective every step would stall the asynchronous dispatch); cadences in steps need no
# agreement. A stop's reason travels as its index here (the largest wins).
SYNC_STEPS = 10
_REASONS = (None, *StopReason)


def agree(stop: StopRequests, timed_save: bool = False) -> bool:
    """Every process's stop request and clock-due checkpoint, combined; returns whether to save.
    Adopts another process's stop reason (single process: nothing to combine)."""
    import jax

    if jax.process_count() == 1:
        return timed_save
    import numpy as np
    from jax.experimental import multihost_utils

    mine = np.int32([_REASONS.index(stop.reason) if stop.reason in _REASONS else 0, timed_save])
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 2)
    reason = _REASONS[int(every[:, 0].max())]
    if reason is not None and stop.reason is None:
        stop.adopt(reason)
    return bool(every[:, 1].any())


class Control:
    """The training loop's hooks for one epoch: checkpoint cadence, stop requests and time limit.

    `save(done, state, meter)` writes a mid-epoch checkpoint after batch `done` and returns the
    seconds its write took (`TrainingCheckpoints.write_seconds`: an asynchronous write's too)."""

    def __init__(self, epoch: int, steps_per_epoch: int, stop: StopRequests, schedule: Schedule,
                 save: Callable[[int, Any, Any], float]):
        self.epoch, self.total, self.stop, self.schedule, self._save = epoch, steps_per_epoch, stop, schedule, save

    def decide(self, done: int) -> Action | None:
        """After batch `done` of this epoch: stop, save or nothing."""
        import jax

        schedule = self.schedule
        schedule.step_done()
        step = self.epoch * self.total + done
        by_steps = schedule.every is not None and schedule.every.steps is not None
        save = by_steps and schedule.save_due(step)  # the same step on every process: no agreement needed
        if jax.process_count() > 1 and step % SYNC_STEPS:
            return Action.SAVE if save else None
        if schedule.out_of_time():
            self.stop.request(StopReason.TIME_LIMIT)
        save = agree(self.stop, not by_steps and schedule.save_due(step)) or save
        if self.stop.requested:
            return Action.STOP
        return Action.SAVE if save else None

    def save(self, done: int, state: Any, meter: Any) -> None:
        started = self.schedule.clock()
        write_seconds = self._save(done, state, meter)
        # A stop waits for the write to finish: the time limit's margin counts all of it.
        self.schedule.saved(max(self.schedule.clock() - started, write_seconds))
