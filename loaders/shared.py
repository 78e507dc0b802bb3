"""Worker -> main-process batch transfer through reused shared-memory slots.

Written by hand because torch lacks it: a tensor a DataLoader worker returns is
moved into a *new* shared-memory segment on every batch (torch.multiprocessing's
storage reduction), so each 64-image 224px batch costs ~10 MB of freshly
allocated, zeroed and page-faulted shared memory: a measurable share of a worker's
time (`benchmarks/loader.py`, docs/benchmarks.md), and torch offers no way to reuse
the buffers.

Here each worker keeps a small pool of shared storages ("slots"). A batch's
numeric arrays are copied into a free slot and the slot is sent; torch then
passes only its file descriptor, because the storage is already shared. The
main process marks the slot free again when the last array viewing it is
garbage collected, so a slot is never rewritten while anything can still read
it: a worker that finds no free slot allocates another one (up to `max_slots`,
then one-off segments that are not reused). Nothing depends on how torch
schedules batches; reuse only makes the common case cheap.
"""
from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["SharedBatch", "SlotPool", "unpack"]

_HEADER = 64  # slot byte 0 is its state; 64 keeps every field cache-line aligned
_ALIGN = 64
_FREE, _IN_FLIGHT = 0, 1


def _round_up(n: int, k: int = _ALIGN) -> int:
    return -(-n // k) * k


class SharedBatch:
    """A batch in transit: one shared uint8 slot holding every numeric field, plus the rest.

    `layout` lists (key, byte offset, shape, dtype string) of the arrays in `slot`;
    `extras` holds the fields that are not numeric (string arrays such as `id`).
    `keys` keeps the batch's field order.
    """

    __slots__ = ("slot", "layout", "extras", "keys")

    def __init__(self, slot: torch.Tensor, layout: list, extras: dict, keys: list):
        self.slot, self.layout, self.extras, self.keys = slot, layout, extras, keys

    def __reduce__(self):
        return SharedBatch, (self.slot, self.layout, self.extras, self.keys)


class SlotPool:
    """A worker's reusable shared-memory slots (create one per worker process)."""

    def __init__(self, max_slots: int):
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        self.max_slots = max_slots
        self.slots: list[tuple[torch.Tensor, np.ndarray]] = []  # (slot, its state byte)
        self.one_off = 0  # batches that found every slot busy (counted, for diagnosis)

    def _take(self, nbytes: int) -> torch.Tensor:
        for slot, state in self.slots:
            if state[0] == _FREE and slot.numel() >= nbytes:
                state[0] = _IN_FLIGHT
                return slot
        # New slots are rare (the pool fills once), so the copy share_memory_ makes is moot.
        slot = torch.empty(nbytes, dtype=torch.uint8).share_memory_()
        state = slot.numpy()[:1]
        state[0] = _IN_FLIGHT
        if len(self.slots) < self.max_slots:
            self.slots.append((slot, state))
        else:
            self.one_off += 1
        return slot

    def pack(self, batch: Mapping[str, np.ndarray]) -> SharedBatch:
        """Copy the numeric arrays of `batch` into a free slot; other fields ride along."""
        numeric = {k: np.asarray(v) for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}
        layout, offset = [], _HEADER
        for key, x in numeric.items():
            layout.append((key, offset, x.shape, x.dtype.str))
            offset = _round_up(offset + x.nbytes)
        slot = self._take(offset)
        buf = slot.numpy()
        for (_, start, shape, dtype), x in zip(layout, numeric.values()):
            np.copyto(np.ndarray(shape, dtype, buffer=buf, offset=start), x)
        extras = {k: v for k, v in batch.items() if k not in numeric}
        return SharedBatch(slot, layout, extras, list(batch))


def _release(slot: torch.Tensor) -> None:
    slot[0] = _FREE


def unpack(shared: SharedBatch) -> dict[str, Any]:
    """The batch as NumPy arrays viewing the slot (no copy); frees the slot once they are gone.

    `shared` gives up its slot, so only the returned arrays keep it busy.
    """
    slot, shared.slot = shared.slot, None
    # Every array below, and every view a caller makes of them, keeps `buf` alive
    # through `.base` (NumPy collapses view chains onto it and stops there: its
    # own base is a torch object). `buf` is therefore what the finalizer watches;
    # `slot` itself is not referenced by the arrays. The finalizer holds `slot`,
    # so the memory stays mapped until the state byte is written.
    buf = slot.numpy()
    arrays = {key: np.ndarray(shape, np.dtype(dtype), buffer=buf, offset=start)
              for key, start, shape, dtype in shared.layout}
    weakref.finalize(buf, _release, slot)
    out = {**arrays, **shared.extras}
    return {k: out[k] for k in shared.keys}
