"""`torch2flax demo`: the whole job on scikit-learn's handwritten digits, nothing downloaded.

1. writes Flower-schema TFRecords (train/val/test; test without `class`) from
   `sklearn.datasets.load_digits` (1,797 real 8x8 scans), upscaled to RGB;
2. converts the timm backbone (pretrained when the hub answers, else random init)
   and checks it against timm;
3. fine-tunes it with the pmapped loop on every local device;
4. predicts the test split to `submission.csv`;
5. prints a summary table.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

SPLITS = (("train", 0.7, 4), ("val", 0.15, 2), ("test", 0.15, 2))  # name, fraction, shards


@dataclass
class DemoData:
    globs: dict[str, str]
    counts: dict[str, int]
    test_labels: dict[str, int]  # held back from the test TFRecords, used only for the summary


def digits_tfrecords(out_dir: str, *, image_size: int = 32, seed: int = 0) -> DemoData:
    """Flower-schema TFRecords from the scikit-learn digits, split 70/15/15 per class."""
    import cv2
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from torch2flax.loaders import write_tfrecords

    digits = load_digits()
    # 16 grey levels at 8x8: stretch to uint8, upscale smoothly, replicate to RGB.
    images = [cv2.resize((img * 255 / 16).astype(np.uint8), (image_size, image_size),
                         interpolation=cv2.INTER_CUBIC) for img in digits.images]
    images = np.repeat(np.stack(images)[..., None], 3, axis=-1)
    ids = np.array([f"digit{i:04d}" for i in range(len(images))])
    index = np.arange(len(images))
    train_idx, rest = train_test_split(index, train_size=SPLITS[0][1], stratify=digits.target,
                                       random_state=seed)
    val_idx, test_idx = train_test_split(rest, test_size=0.5, stratify=digits.target[rest],
                                         random_state=seed)
    globs, counts = {}, {}
    for (name, _, shards), idx in zip(SPLITS, (train_idx, val_idx, test_idx)):
        examples = [{"image": images[i], "id": str(ids[i]),
                     **({"class": int(digits.target[i])} if name != "test" else {})} for i in idx]
        write_tfrecords(examples, os.path.join(out_dir, name), num_shards=shards, quality=95)
        globs[name] = os.path.join(out_dir, name, "*.tfrec")
        counts[name] = len(idx)
    return DemoData(globs, counts, {str(ids[i]): int(digits.target[i]) for i in test_idx})


def run_demo(out: str = "runs/demo", *, model: str = "resnet18", epochs: int = 8,
             batch_size: int = 64, image_size: int = 32, lr: float = 2e-3,
             num_workers: int | str = "auto", seed: int = 0, pretrained: bool = True,
             compile_cache: str = "auto", progress: bool = True) -> dict:
    """Run the five steps into `out`; returns the summary, the files written and the test ids.
    `compile_cache`: as `TrainConfig.compile_cache` (the run folder is `out`).

    `pretrained=False` starts from random weights without trying the hub (offline machines, tests).
    """
    import jax
    import torch

    import torch2flax
    from torch2flax.converter import convert_with_timm, parity_errors
    from torch2flax.timm_names import check_model_name
    from torch2flax.train.config import TrainConfig
    from torch2flax.train.inference import predict
    from torch2flax.train.trainer import fit

    check_model_name(model)  # a typo is refused before the data is written
    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    from torch2flax.train import compile_cache as cache

    compile_cache = cache.enable(compile_cache, run_out=out) or "none"  # parity's compiles too
    print(f"[1/5] writing digits TFRecords to {os.path.join(out, 'data')}")
    data = digits_tfrecords(os.path.join(out, "data"), image_size=image_size, seed=seed)
    print("      " + ", ".join(f"{k}: {v} records" for k, v in data.counts.items()))

    print(f"[2/5] converting timm {model} to Flax")
    torch.manual_seed(seed)
    converted = None
    source = "random init (asked for)"
    if pretrained:
        try:
            converted, timm_model = convert_with_timm(model, pretrained=True, num_classes=10)
            source = "pretrained (timm hub)"
        except RuntimeError as e:  # no hub here: say so and go on with random weights
            print(f"      pretrained weights unavailable ({str(e).split(' (')[0]}); using random init")
            source = "random init (hub unreachable)"
    if converted is None:
        converted, timm_model = convert_with_timm(model, pretrained=False, num_classes=10)
    module, variables = converted
    errors = parity_errors(timm_model, module, variables, input_hw=(image_size, image_size))
    print(f"      parity vs timm at {image_size}x{image_size}: logits max abs error "
          f"{errors['logits_abs']:.2e} (relative {errors['logits_rel']:.2e}), features "
          f"{errors['features_abs']:.2e}")
    init_path = os.path.join(out, f"{model}.msgpack")
    torch2flax.save(init_path, module, variables)

    n_dev = jax.local_device_count()
    print(f"[3/5] fine-tuning on {n_dev} {jax.devices()[0].platform} device(s) with pmap")
    config = TrainConfig(
        train=data.globs["train"], val=data.globs["val"], num_classes=10, model=model,
        init=init_path, image_size=image_size, crop_pct=1.0, scale_min=0.6, hflip=False,
        batch_size=batch_size - batch_size % n_dev or n_dev, epochs=epochs, lr=lr,
        warmup_epochs=1.0, weight_decay=0.05, label_smoothing=0.1, num_workers=num_workers,
        seed=seed, out=os.path.join(out, "train"), compile_cache=compile_cache)
    result = fit(config, progress=progress)

    submission = os.path.join(out, "submission.csv")
    print(f"[4/5] predicting the test split to {submission}")
    pred = predict(os.path.join(config.out, "best.msgpack"), data.globs["test"], submission,
                   batch_size=config.batch_size, num_workers=num_workers, compile_cache=compile_cache,
                   progress=progress)
    test_acc = float(np.mean([data.test_labels[i] == int(p) for i, p in zip(pred.ids, pred.labels)]))

    best = max(result.history, key=lambda r: r["val_macro_f1"])
    summary = {
        "weights": source,
        "devices": f"{n_dev} x {jax.devices()[0].platform}",
        "validation macro F1": f"{best['val_macro_f1']:.4f} (epoch {best['epoch'] + 1})",
        "validation accuracy": f"{best['val_accuracy']:.4f}",
        "test accuracy": f"{test_acc:.4f} (labels held back from the test TFRecords)",
        "training images/s": f"{result.images_per_sec:.0f}",
        "wall time": f"{time.perf_counter() - start:.0f} s",
    }
    files = [init_path, *result.files, *pred.files]
    data_dirs = [os.path.dirname(g) for g in data.globs.values()]
    print("[5/5] summary")
    width = max(map(len, summary))
    for key, value in summary.items():
        print(f"  {key:<{width}}  {value}")
    print("  files written:")
    for f in [*data_dirs, *files]:
        print(f"    {os.path.abspath(f)}{os.sep if f in data_dirs else ''}")
    return {"summary": summary, "best_macro_f1": best["val_macro_f1"], "files": files,
            "submission": submission, "test_ids": sorted(data.test_labels)}
