"""Shared test helpers: small Flower-schema TFRecord sets and randomised timm BatchNorm.

The Kaggle "Flower Classification with TPUs" schema: `image` (JPEG bytes),
`class` (int64) and `id` (bytes); test files carry no `class`. Files are
written with the `tfrecord` package's own writer, an implementation independent
of ours, so reading them back checks our reader against a second opinion.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import numpy as np

# Distinct, well-separated RGB colours: class k paints its shape in PALETTE[k].
PALETTE = np.array(
    [
        [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
        [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
        [0, 128, 128], [170, 110, 40], [128, 0, 0], [0, 0, 128], [128, 128, 0], [255, 255, 255],
    ],
    dtype=np.uint8,
)


@dataclass
class FlowerSet:
    """What `write_flower_tfrecords` wrote, in file order."""

    files: list[str]
    ids: list[str]
    labels: list[int] | None
    jpegs: list[bytes] = field(repr=False)
    records_per_file: list[int]


def synthetic_images(
    n: int, num_classes: int, size: int | tuple[int, int], seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images: a class-coloured disc at a random place on a noisy background.

    Returns `uint8` images of shape (n, H, W, 3) and `int64` labels cycling over
    the classes (balanced), in a seeded random order.
    """
    if num_classes > len(PALETTE):
        raise ValueError(f"at most {len(PALETTE)} classes, got {num_classes}")
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    yy, xx = np.mgrid[0:h, 0:w]
    images = rng.integers(0, 90, size=(n, h, w, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        r = rng.uniform(0.2, 0.35) * min(h, w)
        cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        images[i][disc] = PALETTE[label]
    return images, labels


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_flower_tfrecords(
    out_dir: str | os.PathLike,
    *,
    num_records: int,
    num_shards: int = 2,
    num_classes: int = 5,
    size: int = 32,
    labels: bool = True,
    seed: int = 0,
    id_prefix: str = "",
) -> FlowerSet:
    """Write a Flower-schema shard set with the `tfrecord` package's writer.

    Shards are named like Kaggle's (`00-32x32-13.tfrec`); records are split as
    evenly as possible. Ids are unique: `{id_prefix}{seed}-{i:05d}`.
    """
    from tfrecord.writer import TFRecordWriter

    os.makedirs(out_dir, exist_ok=True)
    images, classes = synthetic_images(num_records, num_classes, size, seed)
    ids = [f"{id_prefix}{seed}-{i:05d}" for i in range(num_records)]
    jpegs = [encode_jpeg(img) for img in images]
    h, w = images.shape[1:3]
    files, counts = [], []
    for shard, idx in enumerate(np.array_split(np.arange(num_records), num_shards)):
        path = os.path.join(out_dir, f"{shard:02d}-{h}x{w}-{len(idx)}.tfrec")
        writer = TFRecordWriter(path)
        for i in idx:
            record = {"image": (jpegs[i], "byte"), "id": (ids[i].encode(), "byte")}
            if labels:
                record["class"] = (int(classes[i]), "int")
            writer.write(record)
        writer.close()
        files.append(path)
        counts.append(len(idx))
    return FlowerSet(
        files=files,
        ids=ids,
        labels=[int(c) for c in classes] if labels else None,
        jpegs=jpegs,
        records_per_file=counts,
    )


def write_flower_splits(
    root: str | os.PathLike,
    *,
    train: int,
    val: int,
    test: int,
    num_classes: int,
    size: int,
    shards: tuple[int, int, int] = (2, 1, 1),
) -> tuple[dict[str, FlowerSet], dict[str, str]]:
    """Train, val and (unlabelled) test sets under `root/{train,val,test}` with the given record
    and shard counts; returns the sets and a glob per split (the training tests' fixture)."""
    counts = {"train": train, "val": val, "test": test}
    sets = {split: write_flower_tfrecords(os.path.join(root, split), num_records=n, num_shards=k,
                                          num_classes=num_classes, size=size, labels=split != "test",
                                          seed=seed, id_prefix=split[:2])
            for seed, (split, n), k in zip((1, 2, 3), counts.items(), shards)}
    return sets, {split: os.path.join(os.fspath(root), split, "*.tfrec") for split in sets}


def randomize_batchnorm(model, seed: int = 0):
    """Give every BatchNorm non-trivial statistics and affine parameters, in place.

    running_mean ~ N(0, 0.1), running_var ~ U(0.5, 2), weight ~ U(0.5, 1.5),
    bias ~ N(0, 0.1). timm initialises running stats to 0/1 and zeroes the last
    BN weight of residual blocks; parity tests on those values cannot see a
    swapped mean/var, a wrong eps or a dropped branch.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._NormBase):
                if module.track_running_stats:
                    shape = module.running_mean.shape
                    module.running_mean.copy_(torch.randn(shape, generator=gen) * 0.1)
                    module.running_var.copy_(torch.rand(shape, generator=gen) * 1.5 + 0.5)
                if module.affine:
                    shape = module.weight.shape
                    module.weight.copy_(torch.rand(shape, generator=gen) + 0.5)
                    module.bias.copy_(torch.randn(shape, generator=gen) * 0.1)
    return model


def console_script(name: str = "torch2flax") -> str:
    """Path of an installed console script in the running interpreter's environment."""
    import sys

    path = os.path.join(os.path.dirname(sys.executable), name)
    assert os.path.exists(path), f"{name} is not installed beside {sys.executable}: run `make test`"
    return path


def save_pth(path, obj):
    """`torch.save(obj, path)`; returns `path`."""
    import torch

    torch.save(obj, path)
    return path


class TornWrite(Exception):
    """Raised by `torn_writes` where a killed process would have stopped."""


def torn_writes(monkeypatch, torn_at: int) -> list:
    """Make the `torn_at`-th file opened for writing (0-based, via `open` or `os.fdopen`) stop
    after half its bytes and raise `TornWrite`, as if the process were killed mid-write.
    Returns the list of files opened for writing so far (it grows as the code runs)."""
    import builtins
    import io

    opened: list = []

    class HalfWriter(io.FileIO):
        def __init__(self, file, mode):
            opened.append(file)
            super().__init__(file, mode)

        def write(self, data):
            if len(opened) - 1 != torn_at:
                return super().write(data)
            super().write(bytes(data)[: len(data) // 2])
            raise TornWrite(f"killed while writing {opened[-1]}")

    real_open, real_fdopen = builtins.open, os.fdopen

    def torn_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax"):
            return HalfWriter(file, "a" if "a" in mode else "w")
        return real_open(file, mode, *args, **kwargs)

    def torn_fdopen(fd, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax"):
            return HalfWriter(fd, "w")
        return real_fdopen(fd, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", torn_open)
    monkeypatch.setattr(os, "fdopen", torn_fdopen)
    return opened


# timm kwargs of the training tests' reduced resnet18: one block per stage, a quarter of the width.
REDUCED_RESNET18 = {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}


def save_reduced_resnet18(path, num_classes: int, seed: int = 0):
    """A randomly initialised (seeded, timm's own init) resnet18 with one block per stage and a
    quarter of the width (timm's `layers=` and `channels=`: 0.3 M parameters), saved as a
    torch2flax model file: the training tests start from it with `init=` / `--init`, the same
    native ResNet training loop as a full resnet18 (every layer kind, a projection shortcut in
    every stage) at a fraction of its step, compile and checkpoint time (the full-size model
    trains in the demo test). Returns `path`."""
    import torch

    import torch2flax

    torch.manual_seed(seed)
    torch2flax.save(path, *torch2flax.convert("resnet18", num_classes=num_classes, **REDUCED_RESNET18))
    return path


def remove_unless_failed(request, path, failed_before: int) -> None:
    """At a module-scoped fixture's teardown: delete its directory unless a test failed since the
    fixture started (`failed_before`: `request.session.testsfailed` then). pytest's
    `tmp_path_retention_policy = failed` does this for `tmp_path` only."""
    import shutil

    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)


def jax_before(version: tuple[int, int]) -> bool:
    """Whether the installed jaxlib is older than `version` (read without importing jax: conftest
    asks before jax starts)."""
    from importlib import metadata

    return tuple(int(p) for p in metadata.version("jaxlib").split(".")[:2]) < version


def single_device_env(*, xla_defaults: bool = False, **extra: str) -> dict[str, str]:
    """This process's environment for a subprocess that sees one CPU device, as on a laptop:
    conftest's XLA_FLAGS without the forced device count (its other flags kept). `xla_defaults`:
    without conftest's compile-time settings too (XLA's optimisations on, as users compile), for
    runs whose time is mostly steps, not compiles (the demo's epoch: 4-6 CPU-s less, 2026-12-08)."""
    test_only = set(os.environ.get("TORCH2FLAX_TEST_XLA_FLAGS_OK", "").split()) if xla_defaults else set()
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if "force_host_platform_device_count" not in f and f not in test_only]
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), **extra}
    if xla_defaults:
        env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
    return env


# `torch2flax train` in a fresh process whose epoch-2 batches are paced (0.25 s each), so that the
# test can signal it mid-epoch from outside; everything else is the command as users run it.
PACED_CLI = """
import sys, time
from torch2flax.train import bad_images
real = bad_images.host_batches
def paced(loader, bad):
    for batch in real(loader, bad):
        if getattr(loader, "train", False) and loader.epoch == 1:
            time.sleep(0.25)
        yield batch
bad_images.host_batches = paced
from torch2flax.cli import main
sys.exit(main(sys.argv[1:]))
"""
