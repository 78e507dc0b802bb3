"""numpy_collate and shard_batch: NumPy out, strings kept, pmap layout, padding + mask."""
import numpy as np
import pytest


def samples(n, size=4):
    rng = np.random.default_rng(n)
    return [
        {"image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
         "label": np.int64(i % 3), "id": f"id{i}"}
        for i in range(n)
    ]


def test_numpy_collate_dicts_tuples_and_tensors():
    import torch

    from torch2flax.loaders import numpy_collate

    s = samples(5)
    batch = numpy_collate(s)
    assert batch["image"].shape == (5, 4, 4, 3) and batch["image"].dtype == np.uint8
    np.testing.assert_array_equal(batch["image"][3], s[3]["image"])
    assert batch["label"].dtype == np.int64 and batch["label"].tolist() == [0, 1, 2, 0, 1]
    assert batch["id"].dtype.kind == "U" and batch["id"].tolist() == [f"id{i}" for i in range(5)]

    tup = numpy_collate([(torch.tensor([i, i + 1]), f"s{i}") for i in range(3)])
    assert isinstance(tup["0"], np.ndarray) and tup["0"].tolist() == [[0, 1], [1, 2], [2, 3]]
    assert tup["1"].tolist() == ["s0", "s1", "s2"]


def test_numpy_collate_errors_name_the_field():
    from torch2flax.loaders import numpy_collate

    s = samples(3)
    s[2]["image"] = s[2]["image"][:2]
    with pytest.raises(ValueError, match="'image'.*different shapes"):
        numpy_collate(s)
    s = samples(3)
    del s[1]["label"]
    with pytest.raises(KeyError, match="sample 1"):
        numpy_collate(s)
    with pytest.raises(ValueError, match="empty"):
        numpy_collate([])


def test_shard_batch_layout_keeps_row_order():
    from torch2flax.loaders import numpy_collate, shard_batch

    batch = numpy_collate(samples(12))
    sharded = shard_batch(batch, 4)
    assert sharded["image"].shape == (4, 3, 4, 4, 3) and sharded["id"].shape == (4, 3)
    assert "mask" not in sharded
    # device d holds rows 3d .. 3d+2, the order jax.pmap / a batch-sharded jit assume
    for d in range(4):
        np.testing.assert_array_equal(sharded["image"][d], batch["image"][3 * d : 3 * d + 3])
        assert sharded["id"][d].tolist() == [f"id{i}" for i in range(3 * d, 3 * d + 3)]


def test_shard_batch_uneven_raises_with_sizes_and_fix():
    from torch2flax.loaders import numpy_collate, shard_batch

    with pytest.raises(ValueError, match=r"batch of 10 .* 4 devices.*pad=True"):
        shard_batch(numpy_collate(samples(10)), 4)


def test_shard_batch_pad_adds_mask_and_empty_ids():
    from torch2flax.loaders import numpy_collate, shard_batch

    batch = numpy_collate(samples(10))
    padded = shard_batch(batch, 4, pad=True)
    assert padded["image"].shape == (4, 3, 4, 4, 3)
    assert padded["mask"].dtype == np.bool_ and padded["mask"].shape == (4, 3)
    assert padded["mask"].sum() == 10 and not padded["mask"].reshape(-1)[10:].any()
    assert padded["id"].reshape(-1).tolist() == [f"id{i}" for i in range(10)] + ["", ""]
    np.testing.assert_array_equal(padded["image"].reshape(12, 4, 4, 3)[:10], batch["image"])
    assert not padded["image"].reshape(12, -1)[10:].any()

    full = shard_batch(numpy_collate(samples(8)), 4, pad=True)
    assert full["mask"].all() and full["mask"].shape == (4, 2)

    to16 = shard_batch(batch, 4, pad=True, pad_to=16)
    assert to16["mask"].shape == (4, 4) and to16["mask"].sum() == 10
    with pytest.raises(ValueError, match="multiple of 4"):
        shard_batch(batch, 4, pad=True, pad_to=14)
