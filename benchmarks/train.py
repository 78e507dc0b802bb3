"""Training throughput through the whole loop: torch2flax (pmap) vs timm in PyTorch eager.

Both sides read the same Flower-like TFRecords through the same input pipeline
(TFRecordDataset + RecordTransform(train_transform(224)) + DataLoader workers) and
train the same timm architecture with AdamW at batch `--batch` on this machine's
CPU threads, side by side in one run:

- ours:  `train.fit` (pmap over the local devices, uint8 batches normalised on device,
         metrics read one step behind so dispatch stays asynchronous); images/s and the
         fraction of wall time the loop waited for data come from the fit's own meters,
         first (compiling) step excluded;
- timm:  the same model in PyTorch eager, NCHW and channels_last, fed by the same
         make_loader batches (normalised on the host, as a PyTorch loop does), after a
         warm-up step.

Usage: python benchmarks/train.py [--models resnet18,resnet50] [--batch 16] [--steps 6]
Set XLA_FLAGS yourself to simulate devices; by default JAX uses one CPU device with all cores.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_data(root: str, n: int, size: int = 320) -> str:
    from benchmarks.images import flower_like
    from torch2flax.loaders import write_tfrecords

    rng = np.random.default_rng(0)
    examples = [{"image": flower_like(rng, size), "class": i % 10, "id": f"b{i:05d}"} for i in range(n)]
    write_tfrecords(examples, os.path.join(root, "train"), num_shards=2, quality=90)
    write_tfrecords(examples[: max(16, n // 8)], os.path.join(root, "val"), num_shards=1, quality=90)
    return root


def ours(model: str, root: str, batch: int, steps: int) -> dict:
    from torch2flax.train import TrainConfig, fit

    config = TrainConfig(train=f"{root}/train/*.tfrec", val=f"{root}/val/*.tfrec", num_classes=10,
                         model=model, image_size=224, batch_size=batch, epochs=1, num_workers=2,
                         out=os.path.join(root, f"run-{model}"))
    start = time.perf_counter()
    result = fit(config, progress=False)
    row = result.history[-1]
    return {"images_per_sec": row["images_per_sec"], "data_wait": row["data_wait"],
            "wall": time.perf_counter() - start}


def timm_eager(model_name: str, root: str, batch: int, steps: int, channels_last: bool) -> dict:
    import timm
    import torch

    from torch2flax.loaders import RecordTransform, TFRecordDataset, make_loader, train_transform

    ds = TFRecordDataset(f"{root}/train/*.tfrec", {"image": "bytes", "class": "int", "id": "str"},
                         transform=RecordTransform(train_transform(224)))
    loader = make_loader(ds, batch, train=True, num_devices=1, num_workers=2)
    model = timm.create_model(model_name, num_classes=10).train()
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    timed, waited, images, start = 0, 0.0, 0, None
    it = iter(loader)
    while timed < steps + 1:
        t0 = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            loader.set_epoch(loader.epoch + 1)
            it = iter(loader)
            continue
        if start is not None:
            waited += time.perf_counter() - t0
        x = torch.from_numpy(b["image"][0]).permute(0, 3, 1, 2).float().div_(255)
        x = ((x - mean) / std).contiguous(memory_format=fmt)
        y = torch.from_numpy(b["label"][0])
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        if start is None:
            start = time.perf_counter()  # after the warm-up step
        else:
            images += batch
        timed += 1
    wall = time.perf_counter() - start
    return {"images_per_sec": images / wall, "data_wait": waited / wall, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    args = parser.parse_args()

    import jax
    import torch

    print(f"# {platform.machine()}, {os.cpu_count()} cpus, loadavg {os.getloadavg()}, "
          f"jax {jax.__version__} ({jax.device_count()} x {jax.devices()[0].platform}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), batch {args.batch}, 224x224")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        # ours trains one epoch: steps + 1 batches (the first compiles)
        make_data(root, args.batch * (args.steps + 1))
        for model in args.models.split(","):
            r_ours = ours(model, root, args.batch, args.steps)
            r_nchw = timm_eager(model, root, args.batch, args.steps, channels_last=False)
            r_cl = timm_eager(model, root, args.batch, args.steps, channels_last=True)
            rows.append((model, r_ours, r_nchw, r_cl))
    print()
    print("| model | torch2flax img/s | data wait | timm eager NCHW img/s | timm channels_last img/s "
          "| ours / NCHW | ours / channels_last | timm data wait |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for model, o, n, c in rows:
        print(f"| {model} | {o['images_per_sec']:.1f} | {o['data_wait']:.1%} | {n['images_per_sec']:.1f} "
              f"| {c['images_per_sec']:.1f} | {o['images_per_sec'] / n['images_per_sec']:.2f}x "
              f"| {o['images_per_sec'] / c['images_per_sec']:.2f}x | {n['data_wait']:.1%} |")
    print(f"\nloadavg at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
