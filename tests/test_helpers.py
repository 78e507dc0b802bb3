"""The shared helpers must be right before other tests lean on them."""
import io

import numpy as np

from tests.helpers import randomize_batchnorm, synthetic_images, write_flower_tfrecords


def _read_with_tfrecord_package(path):
    from tfrecord.reader import tfrecord_loader

    return list(tfrecord_loader(path, None))


def test_flower_writer_round_trips_through_tfrecord_package(tmp_path):
    from PIL import Image

    fs = write_flower_tfrecords(tmp_path, num_records=11, num_shards=3, num_classes=4, size=24)
    assert [len(_read_with_tfrecord_package(f)) for f in fs.files] == [4, 4, 3]
    assert [p.rsplit("/", 1)[1] for p in fs.files] == [
        "00-24x24-4.tfrec", "01-24x24-4.tfrec", "02-24x24-3.tfrec"]
    records = [r for f in fs.files for r in _read_with_tfrecord_package(f)]
    assert [bytes(r["id"]).decode() for r in records] == fs.ids
    assert [int(r["class"][0]) for r in records] == fs.labels
    assert len(set(fs.ids)) == 11
    assert [bytes(r["image"]) for r in records] == fs.jpegs
    img = np.asarray(Image.open(io.BytesIO(bytes(records[0]["image"]))))
    assert img.shape == (24, 24, 3) and img.dtype == np.uint8


def test_flower_test_split_has_no_class(tmp_path):
    fs = write_flower_tfrecords(tmp_path, num_records=5, num_shards=1, labels=False)
    records = _read_with_tfrecord_package(fs.files[0])
    assert fs.labels is None
    assert all(set(r) == {"image", "id"} for r in records)


def test_synthetic_images_are_balanced_and_class_coloured():
    images, labels = synthetic_images(40, num_classes=4, size=16, seed=3)
    assert images.shape == (40, 16, 16, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [10, 10, 10, 10]
    again, labels_again = synthetic_images(40, num_classes=4, size=16, seed=3)
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, labels_again)
    # The class colour dominates the brightest pixels: a nearest-colour rule recovers labels.
    from tests.helpers import PALETTE

    guesses = []
    for img in images:
        bright = img.reshape(-1, 3)[img.reshape(-1, 3).max(1) > 120].astype(float)
        guesses.append(np.argmin(((PALETTE[:4] - bright.mean(0)) ** 2).sum(1)))
    assert (np.array(guesses) == labels).mean() > 0.9


def test_randomize_batchnorm_sets_nontrivial_stats():
    import timm
    import torch

    # One block per stage (timm's own `layers=`): every BatchNorm kind of the full model, 1/3 the init time.
    model = timm.create_model("resnet18", num_classes=3, layers=[1, 1, 1, 1])
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    before = model(x)
    randomize_batchnorm(model, seed=1)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 12  # stem, 2 per block, 3 downsample shortcuts
    means = torch.cat([m.running_mean for m in bns])
    variances = torch.cat([m.running_var for m in bns])
    weights = torch.cat([m.weight for m in bns])
    assert 0.05 < means.std().item() < 0.15
    assert variances.min().item() >= 0.5 and variances.max().item() <= 2.0
    assert variances.std().item() > 0.3
    assert weights.min().item() >= 0.5 and (weights == 0).sum() == 0
    assert not torch.allclose(model(x), before)
    other = randomize_batchnorm(timm.create_model("resnet18", num_classes=3, layers=[1, 1, 1, 1]), seed=1)
    for a, b in zip(bns, [m for m in other.modules() if isinstance(m, torch.nn.BatchNorm2d)]):
        assert torch.equal(a.running_var, b.running_var)


def test_devices_fixture_gives_requested_count(devices):
    import jax

    assert len(devices) in (1, 8)
    assert len(jax.local_devices()) == 8
    out = jax.pmap(lambda x: x * 2, devices=devices)(np.arange(len(devices), dtype=np.float32))
    assert out.tolist() == [2.0 * i for i in range(len(devices))]
