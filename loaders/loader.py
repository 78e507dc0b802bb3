"""`make_loader`: a torch DataLoader with the defaults a JAX training loop needs.

- Batches are host dicts of NumPy arrays already shaped for `pmap`:
  `[num_devices, batch_size // (process_count * num_devices), ...]` (`image` uint8, `label` int64,
  `id` strings; `mask` bool in evaluation).
- Training batches are full and shuffled (drop_last); evaluation batches cover
  every sample exactly once, the last one padded to the full batch size (shapes
  stay static, so a jitted step compiles once) with `mask` False on padding.
- Shuffling is a function of (seed, epoch) and each sample's augmentation of
  (seed, epoch, index): batches do not depend on `num_workers` or on which
  worker loads what, two runs with one seed are identical, epochs differ.
- Multi-host (`process_count` > 1): `batch_size` is the global batch. Every process
  computes the same global order and loads its own slice of each global batch
  (process p: rows [p * b, (p + 1) * b) for b = batch_size / process_count), so N
  processes see exactly the samples, positions and augmentation seeds of one process
  with the same global batch. Evaluation slices past the end are padded (`mask`
  False); every process yields the same number of batches, as collectives need.
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
import os
import pickle
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import cloudpickle
import numpy as np
import torch
import torch.utils.data

from torch2flax.errors import ConfigError, UserError, from_worker
from torch2flax.loaders.collate import numpy_collate, shard_batch
from torch2flax.loaders.image import ImageDecodeError
from torch2flax.loaders.shared import SharedBatch, SlotPool, unpack
from torch2flax.loaders.tfrecord import BadRecordError, RecordError
from torch2flax.loaders.transforms import (
    find_augmenters,
    holds_user_code,
    preserved_global_rngs,
    reseed_augmenters,
    sample_seed,
    seed_global_rngs,
)

__all__ = ["AUTO", "Loader", "make_loader", "resolve_num_workers", "slots_per_worker", "usable_cpus",
           "worker_memory_bytes", "workers_for_cpus"]

AUTO = "auto"
# With skip_bad_images: the field holding a substituted row's decoding error ("" for good rows).
BAD_IMAGE = "bad_image"

# Per-worker memory: private pages + shared-memory slots, measured per worker on the README
# pipeline (docs/benchmarks.md); the rest of a worker's RSS (torch, OpenCV, albumentations) is
# shared copy-on-write with the forkserver, paid once. The model below (64 MiB: decode buffers,
# the malloc retention `_tune_malloc` allows, touched interpreter pages; plus prefetch_factor + 4
# batches: its slots and the collate copies its heap keeps) sits just above the measurements.
WORKER_BASE_BYTES = 64 << 20
# Fraction of the host's available memory (MemAvailable) the workers of one `auto` choice may take:
# the rest is the model, the main process's batches and whatever else the host runs.
MEMORY_FRACTION = 0.5
# Batches the consumer may still view (prefetch_to_device's 2, the step's batch, one being
# unpacked); round-robin delivery spreads them over the workers.
_CONSUMER_HELD = 4


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; `os.cpu_count()` where that is unknown)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # macOS, Windows
        return max(os.cpu_count() or 1, 1)


def available_memory() -> int | None:
    """Bytes the host can still give without swapping (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # free pages only: an underestimate where the page cache is large
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def slots_per_worker(prefetch_factor: int, num_workers: int) -> int:
    """Shared-memory slots per worker: its `prefetch_factor` batches in flight (queued or being
    filled), its share of the batches the consumer still views, and one for a slot whose release
    has not run yet. In all about workers x (prefetch_factor + 1) + 4: the slots grow with the
    worker count as the batches in flight do, so no worker falls back to one-off segments, and
    each worker's share of what the consumer holds shrinks as workers are added."""
    return prefetch_factor + 1 + -(-_CONSUMER_HELD // max(num_workers, 1))


def worker_memory_bytes(batch_nbytes: int, prefetch_factor: int = 2) -> int:
    """Estimated memory one worker adds (see WORKER_BASE_BYTES for how it was measured)."""
    return WORKER_BASE_BYTES + (prefetch_factor + 4) * int(batch_nbytes)


def workers_for_cpus(cpus: int) -> int:
    """The CPU side of "auto": 0 on 1 CPU, 2 on 2, else one per CPU less one for the main process."""
    return 0 if cpus <= 1 else 2 if cpus == 2 else cpus - 1


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def training_workers(
    requested: int | str,
    *,
    batch_size: int,
    image_size: int,
    process_count: int = 1,
    cpus: int | None = None,
    memory_budget: int | None = None,
) -> tuple[int, str]:
    """Worker count for each of a training run's two loaders, and why (`resolve_num_workers`).

    Both loaders keep their workers between epochs, so "auto" budgets memory for two sets of
    workers, each loading `batch_size / process_count` images of `image_size` px; the validation
    set's workers sit idle while training runs, so the CPUs are counted once. The trainer and
    `torch2flax doctor` both ask this, so the report says what a run will do.
    """
    local_batch = max(batch_size // max(process_count, 1), 1)
    n, why = resolve_num_workers(requested, cpus=cpus, memory_budget=memory_budget,
                                 per_worker_bytes=2 * worker_memory_bytes(local_batch * (image_size ** 2 * 3 + 8)))
    return n, why + (" (a worker here: one training and one validation worker)" if "per worker" in why else "")


def resolve_num_workers(
    requested: int | str,
    *,
    cpus: int | None = None,
    memory_budget: int | None = None,
    per_worker_bytes: int | None = None,
) -> tuple[int, str]:
    """The worker count for `num_workers=requested` and a one-line reason.

    An int (or a digit string, as from a command line) is used as given. "auto": one worker per
    usable CPU less one for the main process (2 on a 2-CPU host, where the main process mostly
    waits on the device and 2 workers measured 1.95x the throughput of 1; 0 on a 1-CPU host,
    where a worker adds no CPU), capped so the workers fit in `memory_budget` bytes at
    `per_worker_bytes` each. Defaults: `usable_cpus()`, MEMORY_FRACTION of `available_memory()`
    and `worker_memory_bytes` of a 128-image 224 px batch.
    """
    if isinstance(requested, str) and requested.strip().isdigit():
        requested = int(requested)
    if isinstance(requested, bool) or not isinstance(requested, (int, str)):
        raise ConfigError(f"num_workers must be 'auto' or an int >= 0, got {requested!r}")
    if isinstance(requested, int):
        if requested < 0:
            raise ConfigError(f"num_workers must be >= 0, got {requested}")
        return requested, f"num_workers={requested} as given"
    if requested != AUTO:
        raise ConfigError(f"num_workers must be 'auto' or an int >= 0, got {requested!r}")
    cpus = usable_cpus() if cpus is None else int(cpus)
    if cpus <= 1:
        return 0, f"auto: {cpus} usable CPU, so loading runs in the main process"
    by_cpu = workers_for_cpus(cpus)
    why = (f"auto: {cpus} usable CPUs" + (", one left for the main process" if cpus > 2 else ""))
    if memory_budget is None:
        available = available_memory()
        memory_budget = None if available is None else int(available * MEMORY_FRACTION)
    if per_worker_bytes is None:
        per_worker_bytes = worker_memory_bytes(128 * 224 * 224 * 3)
    if memory_budget is None:
        return by_cpu, why + " (memory unknown, not capped)"
    by_memory = int(memory_budget // max(per_worker_bytes, 1))
    budget = f"~{_gb(per_worker_bytes)} per worker, {_gb(memory_budget)} budget"
    if by_memory < by_cpu:
        return by_memory, why + f", capped to {by_memory} by memory: {budget}"
    return by_cpu, why + f"; memory allows {by_memory}: {budget}"


class _SeededDataset(torch.utils.data.Dataset):
    """Loads `dataset[index]` for keys (epoch, index), reseeding its random state first:
    the Composes and generator objects it holds, and the process-wide generators.

    The epoch travels inside the key because persistent workers hold their own
    copy of this object and never see `Loader.set_epoch`. Pickled by value (cloudpickle),
    so transforms defined in `__main__` reach the workers.
    """

    def __init__(self, dataset: Any, seed: int, skip_bad_images: bool = False):
        self.dataset = dataset
        self.seed = seed
        self.skip_bad_images = skip_bad_images
        self._augmenters: list | None = None
        self._user_code = True

    def __len__(self) -> int:
        return len(self.dataset)

    def __reduce__(self) -> tuple:
        # _augmenters: found again in each worker's own copy.
        return _unpickled, (type(self), cloudpickle.dumps((self.dataset, self.seed, self.skip_bad_images)))

    def __getitem__(self, key: tuple[int, int] | tuple[int, int, bool]) -> Any:
        if torch.utils.data.get_worker_info() is None:  # the caller's process: leave its RNGs as they were
            with preserved_global_rngs():
                sample = self._load(*key[:2])
        else:
            sample = self._load(*key[:2])
        return _Filler(sample) if len(key) == 3 else sample

    def _load(self, epoch: int, index: int) -> Any:
        if self._augmenters is None:
            self._augmenters = find_augmenters(self.dataset)
            self._user_code = holds_user_code(self.dataset)
        seed = sample_seed(self.seed, epoch, index)
        if self._user_code:
            seed_global_rngs(seed)
        if self._augmenters:
            reseed_augmenters(self._augmenters, seed)
        if self.skip_bad_images:
            return self._load_or_substitute(epoch, index)
        try:
            return self.dataset[index]
        except Exception as e:
            if hasattr(e, "add_note"):  # Python >= 3.11
                e.add_note(f"(make_loader: while loading sample {index} of epoch {epoch})")
            raise

    def _load_or_substitute(self, epoch: int, index: int) -> Any:
        """`dataset[index]` with a `BAD_IMAGE` field: "" for a good sample; for an image that does
        not decode, its error (naming file, record and id), and the next sample that decodes in
        its place (a batch keeps its shape; evaluation masks the row out)."""
        n = len(self.dataset)
        error = ""
        for k in range(n):
            try:
                sample = self.dataset[(index + k) % n]
            except RecordError as e:
                if not isinstance(e.__cause__, ImageDecodeError):  # a broken record or transform: not ours to skip
                    raise
                error = error or str(e)
                continue
            if not isinstance(sample, dict):
                raise TypeError(f"skip_bad_images needs samples that are dicts, got {type(sample).__name__}")
            return {**sample, BAD_IMAGE: error}
        raise BadRecordError(f"skip_bad_images: none of the {n} images decodes (the first error: {error})")


class _Filler:
    """A sample loaded only for its field shapes: the whole (padded) batch of a process whose
    slice of the last evaluation batch is empty."""

    def __init__(self, sample: Any):
        self.sample = sample


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
    """Batches of (epoch, index) keys; the order is a function of (seed, epoch) only.

    `batch_size` is the global batch; process `process_index` of `process_count` gets its
    slice of each. A slice past the end of the data yields one filler key (epoch, index, True).
    """

    def __init__(self, num_samples: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int,
                 process_index: int = 0, process_count: int = 1):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0  # batches of this epoch to leave out (a run resumed mid-epoch)
        self.local_batch_size = batch_size // process_count
        self.start = process_index * self.local_batch_size

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
        for b in range(self.start_batch, len(self)):  # earlier batches: never loaded or decoded
            lo = b * self.batch_size + self.start
            keys = [(epoch, int(i)) for i in order[lo : lo + self.local_batch_size]]
            yield keys or [(epoch, int(order[0]), True)]


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
        if isinstance(samples[0], _Filler):  # no real rows: all padding, shaped like the data
            batch = {k: x[:0] for k, x in numpy_collate([samples[0].sample]).items()}
        else:
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
    after freeing it) and the next image page-faults it in again: dozens of minor
    faults per image in a DataLoader worker, a measurable share of its throughput
    (docs/benchmarks.md). A 64 MB trim and 32 MB mmap threshold stop that at the
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
                 *, num_devices: int, train: bool, workers_reason: str = ""):
        self.dataloader = dataloader
        self.sampler = sampler
        self.num_devices = num_devices
        self.train = train
        self.workers_reason = workers_reason  # how the worker count was chosen (`resolve_num_workers`)

    @property
    def batch_size(self) -> int:
        """The global batch (all processes together)."""
        return self.sampler.batch_size

    @property
    def local_batch_size(self) -> int:
        """The rows of each batch this process loads."""
        return self.sampler.local_batch_size

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the shuffle order and augmentation draws of `epoch` (deterministic), and
        start at batch `start_batch` of it: a run resumed mid-epoch gets exactly the batches an
        uninterrupted run would have seen next, without loading the ones before."""
        if not 0 <= start_batch <= len(self.sampler):
            raise ConfigError(f"start_batch {start_batch} is outside [0, {len(self.sampler)}] batches per epoch")
        self.sampler.epoch, self.sampler.start_batch = int(epoch), int(start_batch)

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
        try:
            for batch in batches:
                yield unpack(batch) if isinstance(batch, SharedBatch) else batch
        except UserError as e:  # a bad record or image: its one-line message, not a worker traceback
            raise from_worker(e) from None  # (a bug keeps the worker's traceback, for its report)

    def __repr__(self) -> str:
        local = "" if self.local_batch_size == self.batch_size else f", local_batch_size={self.local_batch_size}"
        return (f"Loader(batches={len(self)}, batch_size={self.batch_size}{local}, "
                f"num_devices={self.num_devices}, train={self.train}, "
                f"num_workers={self.dataloader.num_workers})")

    @property
    def num_workers(self) -> int:
        return self.dataloader.num_workers


def make_loader(
    dataset: Any,
    batch_size: int,
    *,
    train: bool,
    num_devices: int | None = None,
    num_workers: int | str = AUTO,
    seed: int = 0,
    prefetch_factor: int = 2,
    multiprocessing_context: str | mp.context.BaseContext | None = None,
    timeout: float = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    skip_bad_images: bool = False,
) -> Loader:
    """Wrap a map-style dataset in a DataLoader yielding `[num_devices, per_device, ...]` batches.

    Args:
      dataset: map-style dataset whose items are dicts (or tuples) of arrays /
        scalars / strings, e.g. `TFRecordDataset(files, transform=RecordTransform(...))`.
        Before each sample, the albumentations Composes and generator objects it holds
        (through attributes, closures and the globals its functions name) and the
        process-wide generators (`random`, `np.random`, torch, OpenCV) are seeded from
        (seed, epoch, index); randomness from any other source is not controlled.
      batch_size: the global batch, over every device of every process; each process loads
        `batch_size / process_count` rows, which must be divisible by `num_devices`.
      train: True: shuffled, full batches (drop_last), no mask. False: in order,
        every sample exactly once, last batch padded, bool `mask` always present.
      num_devices: leading axis of every array (this process's devices); None means
        `jax.local_device_count()`.
      num_workers: DataLoader worker processes (0 loads in the main process); "auto" picks
        one per usable CPU less one, capped by memory and by the batches per epoch
        (`resolve_num_workers`, with a 224 px RGB uint8 image per sample assumed for the
        memory estimate); the choice and its reason are `loader.workers_reason`.
      seed: seeds the shuffle order and the augmentations, together with the epoch.
      prefetch_factor: batches each worker loads ahead (workers x prefetch_factor in all; each
        worker gets enough shared-memory slots for them, `slots_per_worker`).
      multiprocessing_context: override the start method ("forkserver"/"spawn");
        "fork" is refused because JAX's threads make it deadlock-prone.
      timeout: seconds to wait for a batch from a worker (0: forever).
      process_index, process_count: this process and the number of processes of a
        multi-host run (None: `jax.process_index()`, `jax.process_count()`); every process
        passes the whole dataset and loads its slice of each global batch (module doc).
      skip_bad_images: an image that does not decode (`ImageDecodeError`, re-raised by the
        dataset as a `RecordError` naming file, record and id) does not stop the epoch: the
        next sample that decodes takes its place, and every batch carries a `bad_image` field,
        the error for such a row and "" elsewhere, for the caller to count, list and (in
        evaluation) mask out. Broken records and failing transforms still raise.
    """
    if num_devices is None or process_index is None or process_count is None:
        import jax

        num_devices = jax.local_device_count() if num_devices is None else num_devices
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if batch_size < 1 or num_devices < 1:
        raise ConfigError(f"batch_size and num_devices must be >= 1, got {batch_size} and {num_devices}")
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} is outside [0, process_count={process_count})")
    if process_count > 1 and batch_size % (process_count * num_devices):
        total = process_count * num_devices
        raise ConfigError(
            f"batch_size {batch_size} (the global batch) is not divisible by {process_count} processes "
            f"x {num_devices} devices: use a multiple of {total} (e.g. {max(total, batch_size - batch_size % total)})"
        )
    if batch_size % num_devices:
        raise ConfigError(
            f"batch_size {batch_size} is not divisible by num_devices {num_devices}: the global "
            f"batch is split evenly over the devices; use a multiple of {num_devices} "
            f"(e.g. {max(num_devices, batch_size - batch_size % num_devices)})"
        )
    num_samples = len(dataset)
    if train and num_samples < batch_size:
        raise ConfigError(
            f"dataset has {num_samples} samples, fewer than one training batch of {batch_size} "
            "(training drops incomplete batches): use a smaller batch_size, or more data"
        )
    sampler = _EpochBatchSampler(num_samples, batch_size, shuffle=train, drop_last=train, seed=seed,
                                 process_index=process_index, process_count=process_count)
    local_batch = sampler.local_batch_size
    auto = num_workers == AUTO
    num_workers, workers_reason = resolve_num_workers(
        num_workers, per_worker_bytes=worker_memory_bytes(local_batch * (224 * 224 * 3 + 8), prefetch_factor))
    if auto and num_workers > len(sampler):  # a worker beyond the batch count never gets one
        num_workers = len(sampler)
        workers_reason += f", capped to {num_workers} by the {len(sampler)} batches per epoch"
    if prefetch_factor < 1:
        raise ConfigError(f"prefetch_factor must be >= 1, got {prefetch_factor}")
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        if multiprocessing_context is None:
            multiprocessing_context = _multiprocessing_context(dataset)
        elif isinstance(multiprocessing_context, str):
            multiprocessing_context = mp.get_context(multiprocessing_context)
        if multiprocessing_context.get_start_method() == "fork":
            raise ConfigError(
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
        _SeededDataset(dataset, seed, skip_bad_images),
        batch_sampler=sampler,
        collate_fn=_Collate(local_batch, num_devices, pad=not train,
                            max_slots=slots_per_worker(prefetch_factor, num_workers)),
        num_workers=num_workers,
        pin_memory=False,
        **kwargs,
    )
    return Loader(dataloader, sampler, num_devices=num_devices, train=train, workers_reason=workers_reason)
