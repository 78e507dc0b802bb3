"""make_loader over real TFRecords: coverage, shapes, shuffling and augmentation reproducibility.

Worker processes cost seconds to start, so each loader is built once (module
fixtures) and several properties are checked on it.
"""
import numpy as np
import pytest
import torch.utils.data

from tests.helpers import encode_jpeg, write_flower_tfrecords

FEATURES = {"image": "bytes", "class": "int", "id": "str"}


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    return write_flower_tfrecords(tmp_path_factory.mktemp("flowers"), num_records=300, num_shards=3)


def flower_dataset(flowers, augment):
    from torch2flax.loaders import RecordTransform
    from torch2flax.loaders.tfrecord import TFRecordDataset

    return TFRecordDataset(flowers.files, FEATURES, transform=RecordTransform(augment))


class CoordinateImages(torch.utils.data.Dataset):
    """n copies of one image whose R/G channels encode x/y: every crop is visibly its own."""

    def __init__(self, n, transform):
        ramp = np.round(np.linspace(0, 255, 64)).astype(np.uint8)
        img = np.zeros((64, 64, 3), np.uint8)
        img[..., 0], img[..., 1] = ramp[None, :], ramp[:, None]
        self.jpeg = encode_jpeg(img, quality=95)
        self.n, self.transform = n, transform

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.transform({"image": self.jpeg, "id": f"c{i}"})


def epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def test_eval_loader_yields_every_id_once_with_mask(flowers):
    from torch2flax.loaders import RecordTransform, eval_transform, make_loader

    ds = flower_dataset(flowers, eval_transform(32))
    loader = make_loader(ds, 64, train=False, num_devices=8, num_workers=2)
    assert len(loader) == 5  # ceil(300 / 64)
    batches = list(loader)
    assert len(batches) == 5
    for b in batches:
        assert b["image"].shape == (8, 8, 32, 32, 3) and b["image"].dtype == np.uint8
        assert b["label"].shape == b["id"].shape == b["mask"].shape == (8, 8)
        assert b["label"].dtype == np.int64 and b["mask"].dtype == np.bool_ and b["id"].dtype.kind == "U"
    masks = np.stack([b["mask"].reshape(-1) for b in batches])
    ids = np.concatenate([b["id"].reshape(-1) for b in batches])
    labels = np.concatenate([b["label"].reshape(-1) for b in batches])
    assert masks[:4].all() and (~masks).sum() == 20 and not masks[4, 44:].any()
    real = masks.reshape(-1)
    assert sorted(ids[real]) == sorted(flowers.ids) and len(set(ids[real])) == 300
    assert (ids[~real] == "").all()
    truth = dict(zip(flowers.ids, flowers.labels))
    assert [truth[i] for i in ids[real]] == labels[real].tolist()
    # pixels are the record's own, evaluated deterministically
    ref = RecordTransform(eval_transform(32))({"image": flowers.jpegs[123], "class": 0, "id": "x"})
    where = np.flatnonzero(ids == flowers.ids[123])[0]
    np.testing.assert_array_equal(np.concatenate([b["image"].reshape(64, 32, 32, 3) for b in batches])[where],
                                  ref["image"])
    # persistent workers: a second pass gives the same batches
    again = list(loader)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(batches, again))


@pytest.fixture(scope="module")
def train_runs(flowers):
    """Epochs 0, 1, 0 of one loader, and epoch 0 of a fresh same-seed loader (workers 2 and 0)."""
    from torch2flax.loaders import make_loader, train_transform

    def loader(num_workers, seed=0):
        return make_loader(flower_dataset(flowers, train_transform(24)), 64, train=True,
                           num_devices=8, num_workers=num_workers, seed=seed)

    first = loader(2)
    runs = {"e0": epoch_batches(first, 0), "e1": epoch_batches(first, 1), "e0_again": epoch_batches(first, 0)}
    runs["rerun"] = epoch_batches(loader(2), 0)
    runs["main_process"] = epoch_batches(loader(0), 0)
    runs["seed1"] = epoch_batches(loader(0, seed=1), 0)
    runs["len"] = len(first)
    return runs


def same(a, b):
    return all(np.array_equal(x["image"], y["image"]) and np.array_equal(x["id"], y["id"])
               for x, y in zip(a, b, strict=True))


def test_train_batches_full_shuffled_and_shaped(train_runs, flowers):
    e0 = train_runs["e0"]
    assert train_runs["len"] == len(e0) == 4  # 300 // 64, the rest dropped
    for b in e0:
        assert set(b) == {"image", "label", "id"}  # full batches: no mask
        assert b["image"].shape == (8, 8, 24, 24, 3) and b["image"].dtype == np.uint8
    ids = np.concatenate([b["id"].reshape(-1) for b in e0])
    assert len(set(ids)) == 256 and set(ids) <= set(flowers.ids)
    assert list(ids) != sorted(ids)  # shuffled


def test_same_seed_reproduces_batches_regardless_of_workers(train_runs):
    assert same(train_runs["e0"], train_runs["rerun"])
    assert same(train_runs["e0"], train_runs["main_process"])
    assert same(train_runs["e0"], train_runs["e0_again"])  # set_epoch(0) goes back exactly


def test_epochs_and_seeds_differ(train_runs):
    for other in ("e1", "seed1"):
        ids_a = np.concatenate([b["id"].reshape(-1) for b in train_runs["e0"]])
        ids_b = np.concatenate([b["id"].reshape(-1) for b in train_runs[other]])
        assert list(ids_a) != list(ids_b)  # new shuffle order
        # and new crops of the same records: compare one record's pixels
        common = sorted(set(ids_a) & set(ids_b))[:10]
        img_a = np.concatenate([b["image"].reshape(64, 24, 24, 3) for b in train_runs["e0"]])
        img_b = np.concatenate([b["image"].reshape(64, 24, 24, 3) for b in train_runs[other]])
        pos_a = {k: i for i, k in enumerate(ids_a)}
        pos_b = {k: i for i, k in enumerate(ids_b)}
        assert all(not np.array_equal(img_a[pos_a[k]], img_b[pos_b[k]]) for k in common)


# The saved pipeline in the fast tier; the two recipes (the same seeding path, other transforms:
# ~3 s each with their worker processes) in the slow and core tiers.
@pytest.mark.parametrize("augment", [pytest.param(a, marks=[pytest.mark.slow, pytest.mark.core])
                                     for a in ("kaggle", "trivialaugment")] + ["file"])
def test_recipes_and_saved_pipelines_give_the_same_batches_for_any_worker_count(flowers, augment, tmp_path):
    """The named recipes and a pipeline saved with `A.save` (YAML) are reseeded per sample like the
    default augmentation: 2 workers and the main process give the same batches; the extra ops
    really change pixels against the plain crop and flip."""
    import albumentations as A

    from torch2flax.loaders import make_loader, train_transform
    from torch2flax.loaders.transforms import load_augment

    if augment == "file":
        path = tmp_path / "aug.yaml"
        saved = A.Compose([A.RandomResizedCrop((24, 24), scale=(0.5, 1.0)), A.HorizontalFlip(),
                           A.CoarseDropout(num_holes_range=(2, 4), p=1.0)])
        A.save(saved, str(path), data_format="yaml")
        pipeline, plain = load_augment(str(path)), A.Compose([A.RandomResizedCrop((24, 24), scale=(0.5, 1.0)),
                                                                A.HorizontalFlip()])
        assert A.to_dict(pipeline) == A.to_dict(saved)  # the YAML round-trips
    else:
        pipeline, plain = train_transform(24, recipe=augment), train_transform(24)
    epochs = [epoch_batches(make_loader(flower_dataset(flowers, t), 64, train=True, num_devices=1,
                                        num_workers=w), 0)[:2] for t, w in ((pipeline, 2), (pipeline, 0), (plain, 0))]
    assert same(epochs[0], epochs[1])
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(epochs[1], epochs[2]))
    with pytest.raises(ValueError, match="unknown augmentation recipe 'randaug'"):
        train_transform(24, recipe="randaug")
    (tmp_path / "bad.json").write_text('{"transform": 3}')
    with pytest.raises(ValueError, match=r"bad.json: not an albumentations pipeline saved with A.save \(json\)"):
        load_augment(str(tmp_path / "bad.json"))
    from torch2flax.errors import ConfigError, DataError, MissingFileError

    with pytest.raises(ConfigError, match="unknown augmentation recipe"):
        train_transform(24, recipe="randaug")
    with pytest.raises(DataError, match="bad.json: not an albumentations pipeline"):
        load_augment(str(tmp_path / "bad.json"))
    with pytest.raises(MissingFileError, match="augment file not found"):
        load_augment(str(tmp_path / "nope.json"))


# slow: worker processes (5-7 s); core: every stack's Python starts them
@pytest.mark.slow
@pytest.mark.core
def test_two_workers_never_repeat_each_others_crops():
    """Control: a plain DataLoader's two workers draw identical crops; make_loader's do not."""
    from torch2flax.loaders import RecordTransform, make_loader, numpy_collate, train_transform

    ds = CoordinateImages(32, RecordTransform(train_transform(16)))
    plain = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, collate_fn=numpy_collate,
                                        multiprocessing_context="forkserver")
    p = list(plain)  # batches alternate between worker 0 and worker 1
    assert np.array_equal(p[0]["image"], p[1]["image"])  # the problem being fixed

    ours = list(make_loader(ds, 8, train=False, num_devices=1, num_workers=2))
    crops = [b["image"].reshape(8, -1) for b in ours]
    for a, b in ((0, 1), (2, 3)):  # worker 0's batch vs worker 1's, position by position
        assert not any(np.array_equal(x, y) for x, y in zip(crops[a], crops[b]))
    # Nearly all distinct overall; two independent draws can both land on
    # RandomResizedCrop's whole-image fallback, so exact uniqueness is not promised.
    assert len({c.tobytes() for c in np.concatenate(crops)}) >= 30


def test_make_loader_errors_and_defaults(flowers):
    from torch2flax.loaders import eval_transform, make_loader

    ds = flower_dataset(flowers, eval_transform(32))
    with pytest.raises(ValueError, match=r"batch_size 60 .* num_devices 8"):
        make_loader(ds, 60, train=True, num_devices=8)
    with pytest.raises(ValueError, match="fork"):
        make_loader(ds, 64, train=True, num_devices=8, multiprocessing_context="fork")
    with pytest.raises(ValueError, match="300 samples, fewer than one training batch of 512"):
        make_loader(ds, 512, train=True, num_devices=8)
    from torch2flax.errors import ConfigError

    with pytest.raises(ConfigError, match=r"batch_size 60 .* num_devices 8"):  # a setting: the user's error
        make_loader(ds, 60, train=True, num_devices=8)
    loader = make_loader(ds, 16, train=False, num_workers=0)  # num_devices: jax's local count
    assert loader.num_devices == 8 and next(iter(loader))["image"].shape[:2] == (8, 2)


# slow: a fresh process
@pytest.mark.slow
def test_worker_malloc_tuning_is_accepted_and_keeps_buffers_mapped():
    """In a fresh process (it changes process-wide settings): glibc accepts both values, and a
    worker's allocation cycle (64 decoded/cropped/flipped images, then the 9.6 MB stacked
    batch) no longer page-faults its memory back in on every batch."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt tuning applies to glibc only; elsewhere it is a documented no-op")
    code = """
import resource, numpy as np
from torch2flax.loaders.loader import _tune_malloc
assert _tune_malloc() is True
def cycle():
    kept = []
    for _ in range(64):
        decoded, crop = np.ones(196_608, np.uint8), np.ones(150_528, np.uint8)
        kept.append(crop[::-1].copy())
        del decoded, crop
    batch = np.stack(kept)
for _ in range(3):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    cycle()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # Untuned glibc 2.36 measured 3224 faults per cycle here (the stacked batch alone is 2350 pages).
    assert float(out.stdout) < 100


# A user's own transform, written the way most people write one: a module-level Compose and
# numpy's global generator. make_loader must control both.
def _coordinate_crop_augment():
    import albumentations as A

    return A.Compose([A.RandomCrop(16, 16)])


USER_AUGMENT = _coordinate_crop_augment()


def user_transform(record):
    from torch2flax.loaders import decode_image

    crop = USER_AUGMENT(image=decode_image(record["image"]))["image"]
    return {"image": crop, "draw": np.random.randint(1 << 30), "id": record["id"]}


def _user_epoch(num_workers, epoch):
    from torch2flax.loaders import make_loader

    loader = make_loader(CoordinateImages(32, user_transform), 8, train=True, num_devices=1,
                         num_workers=num_workers, seed=3)
    batches = epoch_batches(loader, epoch)
    return (np.concatenate([b["image"].reshape(8, -1) for b in batches]),
            np.concatenate([b["draw"].reshape(-1) for b in batches]))


# slow: worker processes (5-7 s); core: every stack's Python starts them
@pytest.mark.slow
@pytest.mark.core
def test_user_transform_with_module_compose_and_np_random_is_seeded():
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    crops0, draws0 = _user_epoch(0, epoch=0)
    assert np.random.random() == expected  # loading in this process left its global RNG alone
    crops2, draws2 = _user_epoch(2, epoch=0)
    # Same seed: identical batches whatever the worker count.
    np.testing.assert_array_equal(crops0, crops2)
    np.testing.assert_array_equal(draws0, draws2)
    # Two workers never replay each other's draws: all 32 global-RNG draws differ, and the
    # crops (2,401 positions: 0.2 chance collisions expected) are all but distinct.
    assert len(set(draws2.tolist())) == 32
    assert len({c.tobytes() for c in crops2}) >= 30
    # Another epoch draws anew.
    crops_e1, draws_e1 = _user_epoch(2, epoch=1)
    assert not set(draws_e1.tolist()) & set(draws2.tolist())
    assert not np.array_equal(crops_e1, crops2)


@pytest.fixture
def host(monkeypatch):
    """Pretend this process may use `n` CPUs (affinity mask, or only `os.cpu_count()` with
    `affinity=False`, as on macOS) and has `available` bytes of MemAvailable."""
    import os

    from torch2flax.loaders import loader as loader_mod

    def set_host(n, *, affinity=True, available=64 << 30):
        if affinity:
            monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)
            monkeypatch.setattr(os, "cpu_count", lambda: 4 * n)  # more cores than this process may use
        else:
            monkeypatch.delattr(os, "sched_getaffinity", raising=False)
            monkeypatch.setattr(os, "cpu_count", lambda: n)
        monkeypatch.setattr(loader_mod, "available_memory", lambda: available)

    return set_host


@pytest.mark.parametrize("affinity", [True, False], ids=["affinity", "cpu_count"])
@pytest.mark.parametrize("cpus, expected", [(1, 0), (2, 2), (8, 7), (96, 95)])
def test_auto_workers_follow_the_usable_cpus(host, cpus, expected, affinity):
    from torch2flax.loaders.loader import resolve_num_workers, usable_cpus

    host(cpus, affinity=affinity)
    assert usable_cpus() == cpus
    n, why = resolve_num_workers("auto")
    assert n == expected and why.startswith("auto: ") and f"{cpus} usable CPU" in why
    if cpus > 2:
        assert "one left for the main process" in why and "memory allows" in why


def test_auto_workers_are_capped_by_the_memory_budget(host):
    from torch2flax.loaders.loader import MEMORY_FRACTION, resolve_num_workers, worker_memory_bytes

    host(96)
    assert resolve_num_workers("auto", memory_budget=10 * 200e6, per_worker_bytes=200e6)[0] == 10
    n, why = resolve_num_workers("auto", memory_budget=10 * 200e6 - 1, per_worker_bytes=200e6)
    assert n == 9 and "capped to 9 by memory: ~200 MB per worker, 2.0 GB budget" in why
    assert resolve_num_workers("auto", memory_budget=100e6, per_worker_bytes=200e6)[0] == 0
    assert resolve_num_workers("auto", cpus=8, memory_budget=1e12, per_worker_bytes=1)[0] == 7
    # Default budget: MEMORY_FRACTION of MemAvailable; default per worker: a 128 x 224 px batch.
    per = worker_memory_bytes(128 * 224 * 224 * 3)
    assert 150e6 < per < 200e6  # measured 174 MB (see WORKER_BASE_BYTES)
    host(96, available=int(20 * per / MEMORY_FRACTION) + 1)
    assert resolve_num_workers("auto")[0] == 20
    host(96, available=None)  # unknown memory: not capped, and said so
    n, why = resolve_num_workers("auto")
    assert n == 95 and "not capped" in why


def test_explicit_worker_counts_win_and_bad_ones_are_refused(host):
    from torch2flax.loaders.loader import resolve_num_workers

    host(96, available=0)  # neither the CPUs nor the memory matter to an explicit count
    assert resolve_num_workers(3) == (3, "num_workers=3 as given")
    assert resolve_num_workers("12")[0] == 12 and resolve_num_workers(0)[0] == 0
    for bad in (-1, "many", True, 2.5, None):
        with pytest.raises(ValueError, match="num_workers"):
            resolve_num_workers(bad)


def test_slots_grow_with_the_workers_and_prefetch():
    from torch2flax.loaders.loader import slots_per_worker

    assert slots_per_worker(2, 1) == 7  # 2 in flight + the consumer's 4 + 1 being released
    assert slots_per_worker(2, 2) == 5 and slots_per_worker(2, 95) == 4 and slots_per_worker(6, 95) == 8
    for prefetch in (2, 4):
        totals = [w * slots_per_worker(prefetch, w) for w in (1, 2, 4, 8, 16, 96)]
        assert totals == sorted(totals) and all(t >= w * (prefetch + 1) for t, w in zip(totals, (1, 2, 4, 8, 16, 96)))


def test_make_loader_auto_workers_and_their_reason(flowers, host):
    from torch2flax.loaders import eval_transform, make_loader

    ds = flower_dataset(flowers, eval_transform(32))
    host(8)
    loader = make_loader(ds, 16, train=True, num_devices=8)  # 18 batches: no cap from them
    assert loader.num_workers == 7 and "8 usable CPUs, one left for the main process" in loader.workers_reason
    host(96)
    loader = make_loader(ds, 64, train=False, num_devices=8)  # workers are only started by iterating
    assert loader.num_workers == 5 and "capped to 5 by the 5 batches per epoch" in loader.workers_reason
    assert make_loader(ds, 64, train=False, num_devices=8, num_workers=40).num_workers == 40
    with pytest.raises(ValueError, match="num_workers"):
        make_loader(ds, 64, train=False, num_devices=8, num_workers=-1)
