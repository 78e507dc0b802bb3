"""Device feeding (pmap and jit layouts), prefetching and on-device normalisation."""
import numpy as np
import pytest

from tests.helpers import write_flower_tfrecords

FEATURES = {"image": "bytes", "class": "int", "id": "str"}


@pytest.fixture(scope="module")
def host_batch(tmp_path_factory):
    """The last batch of an evaluation DataLoader over 100 records: 64 rows, 36 of them real."""
    from torch2flax.loaders import RecordTransform, eval_transform, make_loader
    from torch2flax.loaders.tfrecord import TFRecordDataset

    fs = write_flower_tfrecords(tmp_path_factory.mktemp("dev"), num_records=100, size=24)
    ds = TFRecordDataset(fs.files, FEATURES, transform=RecordTransform(eval_transform(16)))
    # one device's layout; each test reshapes it to its device count with shard_batch
    (_, last) = list(make_loader(ds, 64, train=False, num_devices=1, num_workers=0))
    return {k: v.reshape((64,) + v.shape[2:]) for k, v in last.items()}


def test_pmap_layout_one_shard_per_device(devices, host_batch):
    import jax

    from torch2flax.loaders import prefetch_to_device, shard_batch

    d = len(devices)
    host = shard_batch(host_batch, d)
    (dev,) = list(prefetch_to_device(iter([host]), layout="pmap", devices=devices))
    img = dev["image"]
    assert isinstance(img, jax.Array) and img.shape == (d, 64 // d, 16, 16, 3) and img.dtype == np.uint8
    assert {s.device for s in img.addressable_shards} == set(devices)
    for s in img.addressable_shards:  # shard i is device i's rows
        assert s.data.shape == (1, 64 // d, 16, 16, 3)
        np.testing.assert_array_equal(np.asarray(s.data)[0], host["image"][s.index[0]][0])
    for key in ("label", "mask"):
        assert isinstance(dev[key], jax.Array) and dev[key].shape == (d, 64 // d)
        np.testing.assert_array_equal(np.asarray(dev[key]), host[key])
    assert isinstance(dev["id"], np.ndarray) and dev["id"].shape == (d, 64 // d)
    assert int(np.asarray(dev["mask"]).sum()) == 36
    # jax.pmap consumes it as is: per-device masked label sums equal the host's
    per_device = jax.pmap(lambda lab, m: (lab * m).sum(), devices=devices)(dev["label"], dev["mask"])
    np.testing.assert_array_equal(np.asarray(per_device), (host["label"] * host["mask"]).sum(1))


def test_jit_layout_global_array_sharded_on_batch(devices, host_batch):
    import jax

    from torch2flax.loaders import make_mesh, prefetch_to_device, shard_batch

    d = len(devices)
    mesh = make_mesh(devices)
    assert mesh.axis_names == ("batch",) and mesh.devices.shape == (d,)
    (dev,) = list(prefetch_to_device(iter([shard_batch(host_batch, d)]), layout="jit", mesh=mesh))
    img = dev["image"]
    assert img.shape == (64, 16, 16, 3) and len(img.addressable_shards) == d
    assert {s.device for s in img.addressable_shards} == set(devices)
    for s in img.addressable_shards:
        assert s.data.shape == (64 // d, 16, 16, 3)
        np.testing.assert_array_equal(np.asarray(s.data), host_batch["image"][s.index[0]])
    for key in ("label", "mask"):
        assert dev[key].shape == (64,) and dev[key].sharding.spec == jax.sharding.PartitionSpec("batch")
        np.testing.assert_array_equal(np.asarray(dev[key]), host_batch[key])
    assert dev["id"].tolist() == host_batch["id"].tolist()  # host strings, rows aligned
    total = jax.jit(lambda lab, m: (lab * m).sum())(dev["label"], dev["mask"])
    assert int(total) == int((host_batch["label"] * host_batch["mask"]).sum())


def test_prefetch_keeps_size_batches_in_flight():
    from torch2flax.loaders import prefetch_to_device

    pulled = []

    def source():
        for i in range(6):
            pulled.append(i)
            yield {"x": np.full((1, 2), i, np.int32), "id": np.array([["a", "b"]])}

    it = prefetch_to_device(source(), size=3, devices=__import__("jax").local_devices()[:1])
    first = next(it)
    assert len(pulled) == 3 and int(np.asarray(first["x"])[0, 0]) == 0
    second = next(it)
    assert len(pulled) == 4 and int(np.asarray(second["x"])[0, 0]) == 1
    assert [int(np.asarray(b["x"])[0, 0]) for b in it] == [2, 3, 4, 5]


def test_put_batch_rejects_wrong_leading_axis():
    import jax

    from torch2flax.loaders import prefetch_to_device

    bad = {"image": np.zeros((64, 4, 4, 3), np.uint8)}  # not sharded: 64 is not 8 devices
    with pytest.raises(ValueError, match=r"'image'.*\[8 devices"):
        next(prefetch_to_device(iter([bad]), devices=jax.local_devices()[:8]))
    with pytest.raises(ValueError, match="layout"):
        next(prefetch_to_device(iter([bad]), layout="pjit"))


def test_normalize_on_device_matches_torchvision():
    import jax
    import jax.numpy as jnp
    import torch
    from torchvision.transforms.functional import normalize

    from torch2flax.loaders import normalize_on_device

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's ImageNet defaults
    x = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    ref = normalize(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, mean, std)
    ref = ref.permute(0, 2, 3, 1).numpy()
    out = jax.jit(lambda im: normalize_on_device(im, mean, std))(x)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6, atol=1e-6)
    bf = normalize_on_device(jnp.asarray(x), mean, std, dtype=jnp.bfloat16)
    assert bf.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf, np.float32), ref, rtol=1e-2, atol=1e-2)
