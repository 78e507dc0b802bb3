"""Multi-host runs on `jax.distributed`: start-up, the main process, barriers, agreement.

One Python process per host runs the same command; `initialize` connects them before JAX
touches a device. Afterwards `jax.devices()` lists every device of every host and the
training code works on global arrays (or a global `pmap` axis). Every helper here is a
no-op (or a local computation) in a single-process run.

Launch settings (coordinator, process count and id) are about the launch, not the run, so
they come from command-line flags, environment variables or `initialize`'s arguments, and
are never saved in a run's `config.json`.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from torch2flax.errors import ConfigError, DataError, MissingFileError, WeightsUnavailable

# Environment variables `initialize` reads when its arguments are not given; the CLI flags
# `--distributed`, `--coordinator`, `--num-processes`, `--process-id`, `--peer-timeout` set them.
ENV_DISTRIBUTED = "TORCH2FLAX_DISTRIBUTED"  # "1": initialise, detecting the cluster
ENV_COORDINATOR = "TORCH2FLAX_COORDINATOR"  # HOST:PORT of process 0
ENV_NUM_PROCESSES = "TORCH2FLAX_NUM_PROCESSES"
ENV_PROCESS_ID = "TORCH2FLAX_PROCESS_ID"
ENV_PEER_TIMEOUT = "TORCH2FLAX_PEER_TIMEOUT"  # seconds
# JAX's default: a silent peer is declared dead after 100 s and every process is stopped.
DEFAULT_PEER_TIMEOUT = 100


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r}: expected an integer") from None


def requested(coordinator: str | None = None, num_processes: int | None = None,
              process_id: int | None = None) -> bool:
    """Whether the arguments or the environment ask for a multi-process run."""
    return bool(coordinator or num_processes or process_id is not None
                or os.environ.get(ENV_DISTRIBUTED, "").strip() not in ("", "0")
                or os.environ.get(ENV_COORDINATOR) or os.environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, peer_timeout: int | None = None,
               enabled: bool | None = None) -> bool:
    """Connect this process to the others with `jax.distributed.initialize`, if asked to.

    Asked by `enabled=True`, by any argument or by the environment (`TORCH2FLAX_*`, JAX's own
    `JAX_COORDINATOR_ADDRESS`); `enabled=False` never starts it. Arguments left None come
    from the environment, then from JAX's
    cluster detection (Cloud TPU pod slices, SLURM, Open MPI). `peer_timeout`: seconds after
    which a silent (dead) peer stops every process, and that a finishing process waits for the
    others. Returns whether this process is part of a multi-process run; calling it again
    after a successful start changes nothing. Must run before any JAX computation.
    """
    import jax

    if jax.distributed.is_initialized():
        return True
    if enabled is False or not (enabled or requested(coordinator, num_processes, process_id)):
        return False
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if peer_timeout is None:
        peer_timeout = _env_int(ENV_PEER_TIMEOUT) or DEFAULT_PEER_TIMEOUT
    if coordinator and (num_processes is None or process_id is None):
        raise ConfigError(f"distributed: --coordinator {coordinator} needs --num-processes and --process-id "
                         f"(or {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID})")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ConfigError(f"distributed: process id {process_id} is outside [0, {num_processes})")
    # Cross-process collectives of the CPU backend; other backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeouts = {"heartbeat_timeout_seconds": peer_timeout}
    # jax < 0.8 (Kaggle's 0.7.2) has no shutdown timeout: a finishing process waits for the others
    # for its fixed default instead.
    if "shutdown_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters:
        timeouts["shutdown_timeout_seconds"] = peer_timeout
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, **timeouts)
    except ValueError as e:
        if coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS"):
            raise ConfigError(f"distributed: {e}") from e
        raise ConfigError(f"distributed: JAX detected no cluster (Cloud TPU pod slice, SLURM, Open MPI) to join "
                         f"({e}); elsewhere pass --coordinator HOST:PORT --num-processes N --process-id I") from e
    except RuntimeError as e:
        # The usual cause: something ran a JAX computation first (the backend then exists).
        raise RuntimeError(f"distributed: jax.distributed.initialize failed (process {process_id} of "
                           f"{num_processes}, coordinator {coordinator or 'auto-detected'}): {e}. It must run "
                           "before any JAX computation in the process") from e
    return True


def is_main() -> bool:
    """True on the process that writes files (process 0), and in a single-process run."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier called `name` (single process: return)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# What `raise_if_any` tells the other processes of an error: its class, when it is a user's
# mistake, so that every process reports it as one (an index into this tuple; 0 for none, -1 for a bug).
_SENT = (ConfigError, DataError, MissingFileError, WeightsUnavailable)


def raise_if_any(error: BaseException | None, what: str) -> None:
    """Raise on every process when any of them failed at `what`, so none waits for the others.

    This process's own `error` is raised as is (it names the file or record at fault); the
    others raise an error of the same class when it is a user's mistake (`torch2flax.errors`: a
    label out of range on another host is a `DataError` here too), else a RuntimeError, naming
    the processes that failed.
    """
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        code = 0 if error is None else next((i + 1 for i, c in enumerate(_SENT) if isinstance(error, c)), -1)
        codes = np.asarray(multihost_utils.process_allgather(np.int32(code))).reshape(-1)
        failed = np.flatnonzero(codes)
        if error is None and failed.size:
            first = int(codes[failed[0]])
            cls = _SENT[first - 1] if first > 0 else RuntimeError
            raise cls(f"process {jax.process_index()}: {what} failed on process(es) "
                      f"{', '.join(map(str, failed))}; see their error messages")
    if error is not None:
        raise error


def broadcast_from_main(tree: Any) -> Any:
    """Process 0's copy of `tree` (host arrays) on every process, so all replicas start equal."""
    import jax

    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return jax.device_get(multihost_utils.broadcast_one_to_all(jax.device_get(tree)))


def gather_rows(columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every process's rows of `columns` (equal-length arrays, strings allowed), concatenated
    in process order; each process may hold a different number of rows."""
    import jax

    if jax.process_count() == 1:
        return {k: np.asarray(v) for k, v in columns.items()}
    from jax.experimental import multihost_utils

    columns = {k: np.asarray(v) for k, v in columns.items()}
    n = len(next(iter(columns.values())))
    counts = np.asarray(multihost_utils.process_allgather(np.int64(n))).reshape(-1)
    most = int(counts.max())
    if most == 0:  # every process agrees (the same counts everywhere): nothing to gather
        return columns
    out = {}
    for key, x in columns.items():
        strings = x.dtype.kind in "US"
        if strings:  # as fixed-width UTF-8 bytes, the widest process's width everywhere
            raw = np.char.encode(x, "utf-8") if x.dtype.kind == "U" else x
            width = int(np.asarray(multihost_utils.process_allgather(np.int64(max(raw.itemsize, 1)))).max())
            x = np.frombuffer(raw.astype(f"S{width}").tobytes(), np.uint8).reshape(n, width)
        padded = np.zeros((most,) + x.shape[1:], x.dtype)
        padded[:n] = x
        every = np.asarray(multihost_utils.process_allgather(padded, tiled=False))
        rows = np.concatenate([every[p, :c] for p, c in enumerate(counts)])
        if strings:
            rows = np.ascontiguousarray(rows).view(f"S{rows.shape[1]}")[:, 0]
            rows = np.char.decode(rows, "utf-8") if columns[key].dtype.kind == "U" else rows
        out[key] = rows
    return out
