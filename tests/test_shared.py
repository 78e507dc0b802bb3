"""Reused shared-memory slots between DataLoader workers and the main process.

The slot protocol is exercised in one process by sending batches through
multiprocessing's ForkingPickler (what DataLoader's queues use, with torch's
storage reductions), then end to end through make_loader's workers.
"""
import gc
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch.multiprocessing  # noqa: F401 - registers torch's shared-storage reductions

from tests.helpers import write_flower_tfrecords


def send(shared):
    return ForkingPickler.loads(ForkingPickler.dumps(shared))


def make_batch(seed, n=4):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (2, n // 2, 5, 7, 3), dtype=np.uint8),
        "id": np.array([[f"r{seed}-{i}" for i in range(n // 2)]] * 2),
        "label": rng.integers(0, 100, (2, n // 2), dtype=np.int64),
        "mask": rng.random((2, n // 2)) > 0.3,
        "weight": rng.random((2, n // 2)).astype(np.float32),
    }


def slot_states(pool):
    return [int(state[0]) for _, state in pool.slots]


def test_pack_unpack_round_trip_keeps_values_dtypes_and_order():
    from torch2flax.loaders.shared import SlotPool, unpack

    batch = make_batch(0)
    out = unpack(send(SlotPool(2).pack(batch)))
    assert list(out) == list(batch)
    for k in batch:
        assert out[k].dtype == batch[k].dtype and out[k].shape == batch[k].shape
        np.testing.assert_array_equal(out[k], batch[k])
    # numeric fields are views of shared memory, 64-byte aligned; strings travel as they are
    assert all(out[k].ctypes.data % 64 == 0 for k in ("image", "label", "mask", "weight"))
    assert out["id"].dtype.kind == "U"


def test_slot_is_reused_only_after_every_view_is_gone():
    from torch2flax.loaders.shared import SlotPool, unpack

    pool = SlotPool(max_slots=4)
    first = unpack(send(pool.pack(make_batch(1))))
    assert slot_states(pool) == [1]
    view = first["image"][1][:, 2:]  # a view of a view outlives the dict
    del first
    gc.collect()
    assert slot_states(pool) == [1]  # still readable through `view`, so still busy
    second = unpack(send(pool.pack(make_batch(2))))
    assert len(pool.slots) == 2  # a new slot, the held one untouched
    np.testing.assert_array_equal(view, make_batch(1)["image"][1][:, 2:])
    del view
    gc.collect()
    assert slot_states(pool) == [0, 1]
    third = unpack(send(pool.pack(make_batch(3))))
    assert len(pool.slots) == 2 and slot_states(pool) == [1, 1]  # the first slot came back
    np.testing.assert_array_equal(second["image"], make_batch(2)["image"])
    np.testing.assert_array_equal(third["label"], make_batch(3)["label"])
    assert pool.one_off == 0


def test_full_pool_falls_back_to_one_off_segments():
    from torch2flax.loaders.shared import SlotPool, unpack

    pool = SlotPool(max_slots=2)
    held = [unpack(send(pool.pack(make_batch(s)))) for s in range(5)]
    assert len(pool.slots) == 2 and pool.one_off == 3
    for s, batch in enumerate(held):
        for k, v in make_batch(s).items():
            np.testing.assert_array_equal(batch[k], v)
    with pytest.raises(ValueError, match="max_slots"):
        SlotPool(0)


def test_a_slot_too_small_for_a_bigger_batch_is_not_used():
    from torch2flax.loaders.shared import SlotPool, unpack

    pool = SlotPool(max_slots=4)
    small = unpack(send(pool.pack(make_batch(0, n=2))))
    del small
    gc.collect()
    big = unpack(send(pool.pack(make_batch(1, n=8))))
    assert len(pool.slots) == 2  # the free but smaller slot was skipped
    np.testing.assert_array_equal(big["image"], make_batch(1, n=8)["image"])


# slow: DataLoader worker processes
@pytest.mark.slow
def test_workers_batches_held_beyond_the_pool_stay_intact(tmp_path):
    """38 batches kept at once (more than 2 workers x max_slots): equal to the main process's."""
    from torch2flax.loaders import RecordTransform, TFRecordDataset, eval_transform, make_loader

    flowers = write_flower_tfrecords(tmp_path, num_records=300, num_shards=2)

    def run(num_workers):
        ds = TFRecordDataset(flowers.files, {"image": "bytes", "class": "int", "id": "str"},
                             transform=RecordTransform(eval_transform(16)))
        return list(make_loader(ds, 8, train=False, num_devices=8, num_workers=num_workers))

    workers, main = run(2), run(0)
    assert len(workers) == len(main) == 38  # ceil(300 / 8)
    for a, b in zip(workers, main):
        assert list(a) == list(b) == ["image", "label", "id", "mask"]
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert sum(int(b["mask"].sum()) for b in workers) == 300
