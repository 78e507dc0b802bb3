"""Mistakes a user can fix, told apart from our bugs.

Every `torch2flax` command ends a `UserError` with one ``torch2flax: error: ...`` line and exit
status 2; anything else is a bug in torch2flax and ends with its traceback, a line saying so and
what to put in a report, and exit status 1 (`torch2flax.cli.main`). ``TORCH2FLAX_DEBUG=1`` shows
the traceback of a user error too.

Each class also derives from the built-in exception that code catching our errors has always
caught (`ValueError`, `FileNotFoundError`, `RuntimeError`), so ``except ValueError`` keeps working.
They take one message argument, which is what a torch DataLoader needs to re-raise an error from
a worker process with its class (and what `train.distributed` sends from another host).

No heavy imports here: `loaders`, `torch2flax` and `train` all raise these.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix. The message names the file, record, key, flag or layer at
    fault and says what to do."""


class ConfigError(UserError, ValueError):
    """A bad flag, setting or argument value: an unknown model name, a batch size the devices
    cannot share, a choice that is not one of the choices, settings that contradict each other."""


class DataError(UserError, ValueError):
    """A bad input file or record: a corrupt TFRecord, an image that does not decode, a label out
    of range (on any host), a model file or checkpoint that is not one or does not match."""


class MissingFileError(UserError, FileNotFoundError):
    """A path that does not exist, or a pattern that matches nothing."""


class WeightsUnavailable(UserError, RuntimeError):
    """Pretrained weights that cannot be had here (no hub access, as in a Kaggle code competition):
    the message names the flag that takes a local file instead."""


def from_worker(e: BaseException) -> BaseException:
    """An exception a DataLoader worker raised, as its own message: torch re-raises it in the
    main process as `Caught X in DataLoader worker process N.` plus the worker's traceback."""
    text = str(e)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return e
    lines = text.splitlines()
    heads = (f"{type(e).__module__}.{type(e).__qualname__}: ", f"{type(e).__name__}: ")
    starts = [i for i, line in enumerate(lines) if line.startswith(heads)]
    if not starts:
        return e
    first = lines[starts[-1]]
    message = " ".join([first.split(": ", 1)[1], *(line.strip() for line in lines[starts[-1] + 1:] if line.strip())])
    try:
        return type(e)(message)
    except Exception:  # an exception type that takes other arguments
        return e
