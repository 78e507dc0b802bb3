"""`make_loader`: a torch DataLoader with the defaults a JAX training loop needs.

- Batches are host dicts of NumPy arrays already shaped for `pmap`:
  `[num_devices, batch_size // num_devices, ...]` (`image` uint8, `label` int64,
  `id` strings; `mask` bool in evaluation).
- Training batches are full and shuffled (drop_last); evaluation batches cover
  every sample exactly once, the last one padded to the full batch size (shapes
  stay static, so a jitted step compiles once) with `mask` False on padding.
- Shuffling is a function of (seed, epoch) and each sample's augmentation of
  (seed, epoch, index): batches do not depend on `num_workers` or on which
  worker loads what, two runs with one seed are identical, epochs differ.
- Workers start with forkserver (spawn where unavailable), never fork: JAX runs
  threads, and forking a process with threads can deadlock. They persist
  across epochs, so their start-up cost is paid once.
- Any callable a user can write works in the workers: functions and lambdas
  defined in a notebook cell, in `python -` input or in an unguarded script.
  forkserver and spawn workers receive the dataset by pickling, and plain pickle
  sends functions by reference (`__main__.my_tf`), which a worker cannot import
  from a notebook or stdin, and which, for a script, makes every worker run the
  script's top level again. So the dataset travels by value with cloudpickle (the
  way loky and Ray ship user code), and the workers are started without
  re-importing `__main__` (`_no_main_reimport`): nothing they run needs it.
- Worker batches arrive as NumPy views of reused shared-memory slots
  (`loaders.shared`), each slot reused only once nothing views it any more.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.spawn
import pickle
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import cloudpickle
import numpy as np
import torch
import torch.utils.data

from torch2flax.loaders.collate import numpy_collate, shard_batch
from torch2flax.loaders.shared import SharedBatch, SlotPool, unpack
from torch2flax.loaders.transforms import (
    find_augmenters,
    holds_user_code,
    preserved_global_rngs,
    reseed_augmenters,
    sample_seed,
    seed_global_rngs,
)

__all__ = ["Loader", "make_loader"]


class _SeededDataset(torch.utils.data.Dataset):
    """Loads `dataset[index]` for keys (epoch, index), reseeding its random state first:
    the Composes and generator objects it holds, and the process-wide generators.

    The epoch travels inside the key because persistent workers hold their own
    copy of this object and never see `Loader.set_epoch`. Pickled by value (cloudpickle),
    so transforms defined in `__main__` reach the workers.
    """

    def __init__(self, dataset: Any, seed: int):
        self.dataset = dataset
        self.seed = seed
        self._augmenters: list | None = None
        self._user_code = True

    def __len__(self) -> int:
        return len(self.dataset)

    def __reduce__(self) -> tuple:
        # _augmenters: found again in each worker's own copy.
        return _unpickled, (type(self), cloudpickle.dumps((self.dataset, self.seed)))

    def __getitem__(self, key: tuple[int, int]) -> Any:
        if torch.utils.data.get_worker_info() is None:  # the caller's process: leave its RNGs as they were
            with preserved_global_rngs():
                return self._load(*key)
        return self._load(*key)

    def _load(self, epoch: int, index: int) -> Any:
        if self._augmenters is None:
            self._augmenters = find_augmenters(self.dataset)
            self._user_code = holds_user_code(self.dataset)
        seed = sample_seed(self.seed, epoch, index)
        if self._user_code:
            seed_global_rngs(seed)
        if self._augmenters:
            reseed_augmenters(self._augmenters, seed)
        try:
            return self.dataset[index]
        except Exception as e:
            if hasattr(e, "add_note"):  # Python >= 3.11
                e.add_note(f"(make_loader: while loading sample {index} of epoch {epoch})")
            raise


def _unpickled(cls: type, payload: bytes) -> Any:
    return cls(*pickle.loads(payload))  # cloudpickle's output loads with plain pickle


class _ByValue:
    """A callable the workers receive by value (cloudpickle), like the dataset: a `collate_fn` or
    `worker_init_fn` swapped in from `__main__` must not need `__main__` in the worker."""

    def __init__(self, fn: Any):
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __reduce__(self) -> tuple:
        return _unpickled, (_ByValue, cloudpickle.dumps((self.fn,)))


_PREPARATION_LOCK = threading.Lock()


@contextlib.contextmanager
def _no_main_reimport() -> Iterator[None]:
    """Start worker processes without importing the parent's `__main__` in them.

    spawn and forkserver children normally re-import the main module (by path, as
    `__mp_main__`) so that pickled references into it resolve; for a script without an
    `if __name__ == "__main__":` guard that re-runs the whole script in every worker. The
    dataset travels by value, so the workers need nothing from `__main__`.
    """
    real = multiprocessing.spawn.get_preparation_data

    def without_main(name: str) -> dict:
        data = real(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    with _PREPARATION_LOCK:
        multiprocessing.spawn.get_preparation_data = without_main
        try:
            yield
        finally:
            multiprocessing.spawn.get_preparation_data = real


class _EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of (epoch, index) keys; the order is a function of (seed, epoch) only."""

    def __init__(self, num_samples: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        epoch = self.epoch
        for b in range(len(self)):
            yield [(epoch, int(i)) for i in order[b * self.batch_size : (b + 1) * self.batch_size]]


class _Collate:
    """numpy_collate + shard_batch, run inside the workers (picklable).

    In a worker the numeric arrays are packed into a reused shared-memory slot
    (`loaders.shared`): torch would otherwise copy ~10 MB of pixels per batch
    into a freshly allocated shared segment. In the main process (num_workers=0)
    the NumPy batch is returned as is.
    """

    def __init__(self, batch_size: int, num_devices: int, pad: bool, max_slots: int):
        self.batch_size = batch_size
        self.num_devices = num_devices
        self.pad = pad
        self.max_slots = max_slots
        self._pool: SlotPool | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}  # each worker makes its own

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any] | SharedBatch:
        batch = numpy_collate(samples)
        batch = shard_batch(batch, self.num_devices, pad=self.pad,
                            pad_to=self.batch_size if self.pad else None)
        if torch.utils.data.get_worker_info() is None:
            return batch
        if self._pool is None:
            self._pool = SlotPool(self.max_slots)
        return self._pool.pack(batch)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _tune_malloc() -> bool:
    """Keep freed image buffers in the worker's heap instead of returning them to the OS.

    glibc serves each ~0.8 MB decode buffer with a fresh mmap (or trims the heap
    after freeing it) and the next image page-faults it in again: measured ~45
    minor faults and ~0.1 ms of kernel time per image in a DataLoader worker,
    8% of its throughput. A 64 MB trim and 32 MB mmap threshold stop that at the
    cost of up to 64 MB of retained heap per worker. Other C libraries (musl,
    macOS) lack mallopt and are left alone. Returns whether both settings took.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    trim = mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    mmap = mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest allowed value on 64-bit
    return bool(trim and mmap)


def _worker_init(worker_id: int) -> None:
    # One worker is one core's worth of work: OpenCV's own thread pool (used by
    # resizes) would oversubscribe the cores the other workers are using.
    import cv2

    cv2.setNumThreads(1)
    _tune_malloc()


def _multiprocessing_context(dataset: Any) -> mp.context.BaseContext:
    """forkserver where available (cheap starts: modules are imported once, in the server)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    # Only effective before the server first starts; failed imports are ignored by it.
    # Not "__main__": the workers do not need it (see `_no_main_reimport`).
    preload = ["torch", "albumentations", "cv2", "torch2flax.loaders.loader"]
    module = type(dataset).__module__
    if module and module != "__main__" and module in sys.modules:
        preload.append(module)
    ctx.set_forkserver_preload(preload)
    return ctx


class Loader:
    """Iterable of host batches; see `make_loader`."""

    def __init__(self, dataloader: torch.utils.data.DataLoader, sampler: _EpochBatchSampler,
                 *, num_devices: int, train: bool):
        self.dataloader = dataloader
        self.sampler = sampler
        self.num_devices = num_devices
        self.train = train

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle order and augmentation draws of `epoch` (deterministic)."""
        self.sampler.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        dl = self.dataloader
        if dl.num_workers > 0:  # everything the workers run travels by value (see the module doc)
            if not isinstance(dl.collate_fn, _ByValue):
                dl.collate_fn = _ByValue(dl.collate_fn)
            if dl.worker_init_fn is not None and not isinstance(dl.worker_init_fn, _ByValue):
                dl.worker_init_fn = _ByValue(dl.worker_init_fn)
        with _no_main_reimport():  # the first iteration starts the (persistent) workers
            batches = iter(dl)
        for batch in batches:
            yield unpack(batch) if isinstance(batch, SharedBatch) else batch

    def __repr__(self) -> str:
        return (f"Loader(batches={len(self)}, batch_size={self.batch_size}, "
                f"num_devices={self.num_devices}, train={self.train}, "
                f"num_workers={self.dataloader.num_workers})")


def make_loader(
    dataset: Any,
    batch_size: int,
    *,
    train: bool,
    num_devices: int | None = None,
    num_workers: int = 2,
    seed: int = 0,
    prefetch_factor: int = 2,
    multiprocessing_context: str | mp.context.BaseContext | None = None,
    timeout: float = 0,
) -> Loader:
    """Wrap a map-style dataset in a DataLoader yielding `[num_devices, per_device, ...]` batches.

    Args:
      dataset: map-style dataset whose items are dicts (or tuples) of arrays /
        scalars / strings, e.g. `TFRecordDataset(files, transform=RecordTransform(...))`.
        Before each sample, the albumentations Composes and generator objects it holds
        (through attributes, closures and the globals its functions name) and the
        process-wide generators (`random`, `np.random`, torch, OpenCV) are seeded from
        (seed, epoch, index); randomness from any other source is not controlled.
      batch_size: global batch per process; must be divisible by `num_devices`.
      train: True: shuffled, full batches (drop_last), no mask. False: in order,
        every sample exactly once, last batch padded, bool `mask` always present.
      num_devices: leading axis of every array; None means `jax.local_device_count()`.
      num_workers: DataLoader worker processes (0 loads in the main process).
      seed: seeds the shuffle order and the augmentations, together with the epoch.
      prefetch_factor: batches each worker loads ahead.
      multiprocessing_context: override the start method ("forkserver"/"spawn");
        "fork" is refused because JAX's threads make it deadlock-prone.
      timeout: seconds to wait for a batch from a worker (0: forever).
    """
    if num_devices is None:
        import jax

        num_devices = jax.local_device_count()
    if batch_size < 1 or num_devices < 1:
        raise ValueError(f"batch_size and num_devices must be >= 1, got {batch_size} and {num_devices}")
    if batch_size % num_devices:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by num_devices {num_devices}: the global "
            f"batch is split evenly over the devices; use a multiple of {num_devices} "
            f"(e.g. {max(num_devices, batch_size - batch_size % num_devices)})"
        )
    num_samples = len(dataset)
    if train and num_samples < batch_size:
        raise ValueError(
            f"dataset has {num_samples} samples, fewer than one training batch of {batch_size} "
            "(training drops incomplete batches)"
        )
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    sampler = _EpochBatchSampler(num_samples, batch_size, shuffle=train, drop_last=train, seed=seed)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        if multiprocessing_context is None:
            multiprocessing_context = _multiprocessing_context(dataset)
        elif isinstance(multiprocessing_context, str):
            multiprocessing_context = mp.get_context(multiprocessing_context)
        if multiprocessing_context.get_start_method() == "fork":
            raise ValueError(
                "make_loader: the 'fork' start method can deadlock once JAX has started its "
                "threads; use 'forkserver' or 'spawn'"
            )
        kwargs = dict(
            multiprocessing_context=multiprocessing_context,
            persistent_workers=True,
            prefetch_factor=prefetch_factor,
            worker_init_fn=_worker_init,
            timeout=timeout,
        )
    dataloader = torch.utils.data.DataLoader(
        _SeededDataset(dataset, seed),
        batch_sampler=sampler,
        # Slots per worker: the batches it has queued (prefetch_factor), the one it
        # is filling, and a few the consumer may still hold (device prefetch).
        collate_fn=_Collate(batch_size, num_devices, pad=not train, max_slots=prefetch_factor + 4),
        num_workers=num_workers,
        pin_memory=False,
        **kwargs,
    )
    return Loader(dataloader, sampler, num_devices=num_devices, train=train)
