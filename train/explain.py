"""Grad-CAM and Grad-CAM++ for converted models, computed like the `grad-cam` package.

`gradcam(module, variables, images)` returns one heatmap per image, in [0, 1] at the
input's size. The activations and gradients of the target layer come from
`torch2flax.features.forward_intermediates` (a zero "tap" on the layer's output: its
gradient is the gradient with respect to that output), so every converted model has
Grad-CAM without model-specific code. Heatmaps follow pytorch-grad-cam's steps exactly:
channel weights from the gradients, ReLU of the weighted sum, min-max scaling, bilinear
resize to the input, min-max scaling again (its `scale_cam_image` twice).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from torch2flax.errors import ConfigError, DataError, MissingFileError
from torch2flax.features import feature_info, forward_intermediates

Array = jax.Array
METHODS = ("gradcam", "gradcam++")
# A stage whose map is smaller than this per side gives a flat or nearly flat heatmap.
MIN_MAP_SIZE = 4


class CAM(NamedTuple):
    """Heatmaps `(B, H, W)` in [0, 1], the logits `(B, classes)` and the class each map explains."""

    heatmaps: Array
    logits: Array
    targets: Array


def default_layer(module: nn.Module, variables: Any, image_shape: Sequence[int]) -> str:
    """The deepest `feature_info` stage whose map is at least MIN_MAP_SIZE per side.

    At the usual input sizes that is the last stage (ResNet-50 at 224 px: `layer4`, 7x7); on
    small images it steps back (32 px digits: `layer2`, 4x4), since a 1x1 map has no "where".
    """
    names = [f.name for f in feature_info(module)]
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    _, feats = jax.eval_shape(lambda v, x: forward_intermediates(module, v, x, names), variables, x)
    for name in reversed(names):
        shape = feats[name].shape
        if len(shape) == 4 and min(shape[1:3]) >= MIN_MAP_SIZE:
            return name
    return names[-1]


def cam_weights(acts: Array, grads: Array, method: str) -> Array:
    """Per-channel weights `(B, C)` from NHWC activations and their gradients."""
    if method == "gradcam":
        return grads.mean(axis=(1, 2))
    if method == "gradcam++":  # Chattopadhyay et al. 2018, eq. 19, as pytorch-grad-cam computes it
        g2 = grads ** 2
        g3 = g2 * grads
        sum_acts = acts.sum(axis=(1, 2), keepdims=True)
        aij = g2 / (2 * g2 + sum_acts * g3 + 1e-6)
        aij = jnp.where(grads != 0, aij, 0.0)
        return (jnp.maximum(grads, 0) * aij).sum(axis=(1, 2))
    raise ConfigError(f"unknown CAM method {method!r}: expected one of {METHODS}")


def _minmax(cam: Array) -> Array:
    """pytorch-grad-cam's `scale_cam_image`: per image, subtract the min, divide by 1e-7 + the max."""
    cam = cam - cam.min(axis=(1, 2), keepdims=True)
    return cam / (1e-7 + cam.max(axis=(1, 2), keepdims=True))


@functools.partial(jax.jit, static_argnames=("module", "layer", "method"))
def _cam(module: nn.Module, variables: Any, images: Array, targets: Array, *, layer: str,
         method: str) -> CAM:
    feat = jax.eval_shape(lambda: forward_intermediates(module, variables, images, [layer]))[1][layer]
    if len(feat.shape) != 4:
        raise ConfigError(f"Grad-CAM needs a spatial map, but {layer!r} outputs shape {feat.shape}: "
                          f"pick a convolutional stage ({[f.name for f in feature_info(module)]})")

    def score(tap: Array) -> tuple[Array, tuple[Array, Array, Array]]:
        logits, feats = forward_intermediates(module, variables, images, [layer], taps={layer: tap})
        logits = logits.astype(jnp.float32)
        # A negative target means "the predicted class" (pytorch-grad-cam's default).
        chosen = jnp.where(targets < 0, jnp.argmax(logits, -1), targets)
        picked = jnp.take_along_axis(logits, chosen[:, None], axis=1)
        return picked.sum(), (logits, feats[layer], chosen)

    grads, (logits, acts, chosen) = jax.grad(score, has_aux=True)(jnp.zeros(feat.shape, feat.dtype))
    acts, grads = acts.astype(jnp.float32), grads.astype(jnp.float32)
    weights = cam_weights(acts, grads, method)
    cam = jnp.maximum(jnp.einsum("bhwc,bc->bhw", acts, weights), 0.0)
    # cv2.resize's INTER_LINEAR when upsampling = half-pixel bilinear with edge clamping
    # (jax's triangle kernel renormalised at the borders): the same numbers.
    h, w = images.shape[1:3]
    cam = jax.image.resize(_minmax(cam), (cam.shape[0], h, w), method="linear")
    return CAM(_minmax(jnp.maximum(cam, 0.0)), logits, chosen)


def class_activation_maps(module: nn.Module, variables: Any, images: Array, *, layer: str | None = None,
                          target: int | Sequence[int] | Array | None = None,
                          method: str = "gradcam") -> CAM:
    """Grad-CAM (or Grad-CAM++) heatmaps with the logits and the explained classes.

    `images` is the model's input (NHWC, normalised as the model expects); `layer` a timm
    module name (default: `default_layer`); `target` a class for every image, one per
    image, or None for each image's predicted class.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown CAM method {method!r}: expected one of {METHODS}")
    images = jnp.asarray(images)
    layer = layer or default_layer(module, variables, images.shape[1:])
    n = images.shape[0]
    if target is None:
        targets = np.full(n, -1, np.int32)
    else:
        targets = np.broadcast_to(np.asarray(target, np.int32), (n,)).copy()
        num_classes = getattr(module, "num_classes", None)
        if num_classes and ((targets < 0) | (targets >= num_classes)).any():
            raise ConfigError(f"target class {targets.tolist()} outside [0, {num_classes}): the model has "
                              f"{num_classes} classes (--class)")
    return _cam(module, variables, images, jnp.asarray(targets), layer=layer, method=method)


def gradcam(module: nn.Module, variables: Any, images: Array, *, layer: str | None = None,
            target: int | Sequence[int] | Array | None = None, method: str = "gradcam") -> Array:
    """Heatmaps `(B, H, W)` in [0, 1]; see `class_activation_maps`."""
    return class_activation_maps(module, variables, images, layer=layer, target=target, method=method).heatmaps


# ---------------------------------------------------------------------- files (`torch2flax gradcam`)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class Sample(NamedTuple):
    image: np.ndarray  # uint8 (S, S, 3): what the model sees, after the eval resize and crop
    label: int | None
    name: str


def read_samples(pattern: str, num: int, size: int, crop_pct: float) -> list[Sample]:
    """The first `num` images of a glob of image files, or of TFRecord files (Flower schema)."""
    import glob
    import os

    from torch2flax.loaders import RecordTransform, TFRecordDataset, decode_image, eval_transform

    transform = eval_transform(size, crop_pct=crop_pct)
    files = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    pictures = [f for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    samples: list[Sample] = []
    if pictures:
        for path in pictures[:num]:
            if not os.path.isfile(path):
                raise MissingFileError(f"image not found: {path!r}")
            with open(path, "rb") as f:
                image = decode_image(f.read())
            samples.append(Sample(transform(image=image)["image"], None, os.path.splitext(os.path.basename(path))[0]))
        return samples
    dataset = TFRecordDataset(pattern, transform=RecordTransform(transform))
    for i in range(min(num, len(dataset))):
        record = dataset[i]
        label = record.get("label")
        samples.append(Sample(record["image"], None if label is None else int(label), record.get("id", f"record{i}")))
    return samples


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The heatmap in the "jet" colour map blended over a uint8 image (pytorch-grad-cam's look)."""
    from matplotlib import colormaps

    colour = colormaps["jet"](np.clip(heatmap, 0.0, 1.0))[..., :3]
    return np.uint8(np.round(255 * ((1 - alpha) * image / 255.0 + alpha * colour)))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]


def write_gradcam(checkpoint: str, images: str, out: str, *, layer: str | None = None,
                  target: int | None = None, num: int = 16, method: str = "gradcam",
                  batch_size: int = 16) -> tuple[list[str], str]:
    """Grad-CAM overlays for the first `num` images: one PNG per image at the model's input
    size (PNG "Title": predicted and true class) and `grid.png`. Returns (files, layer)."""
    import os

    from PIL import Image, PngImagePlugin

    from torch2flax.loaders import normalize_on_device
    from torch2flax.train.artifacts import agg_figure
    from torch2flax.train.checkpoint import load_checkpoint

    if num < 1:
        raise ConfigError(f"num={num} (--num): explain at least 1 image")
    module, variables, saved = load_checkpoint(checkpoint)
    cfg = module.pretrained_cfg
    size = saved.data.image_size if saved is not None else int(cfg["input_size"][-1])
    crop = saved.data.crop_pct if saved is not None else float(cfg["crop_pct"])
    samples = read_samples(images, num, size, crop)
    if not samples:
        raise DataError(f"{images}: no images or records to explain (empty TFRecord files?)")
    pixels = np.stack([s.image for s in samples])
    x = normalize_on_device(pixels, tuple(cfg["mean"]), tuple(cfg["std"]))
    layer = layer or default_layer(module, variables, x.shape[1:])
    heat, probs, explained = [], [], []
    for start in range(0, len(samples), batch_size):
        chunk = x[start:start + batch_size]
        pad = batch_size - chunk.shape[0] if len(samples) > batch_size else 0  # one compiled shape
        chunk = jnp.concatenate([chunk, jnp.repeat(chunk[-1:], pad, 0)]) if pad else chunk
        cam = class_activation_maps(module, variables, chunk, layer=layer, target=target, method=method)
        keep = chunk.shape[0] - pad
        heat.append(np.asarray(cam.heatmaps)[:keep])
        probs.append(np.asarray(jax.nn.softmax(cam.logits, -1))[:keep])
        explained.append(np.asarray(cam.targets)[:keep])
    heat, probs, explained = np.concatenate(heat), np.concatenate(probs), np.concatenate(explained)

    os.makedirs(out, exist_ok=True)
    files, titles = [], []
    for i, s in enumerate(samples):
        pred = int(probs[i].argmax())
        title = (f"{s.name}: pred {pred} ({probs[i, pred]:.2f})" + (f", true {s.label}" if s.label is not None else "")
                 + f", {method} of class {int(explained[i])} at {layer}")
        titles.append(f"pred {pred}" + (f" / true {s.label}" if s.label is not None else ""))
        info = PngImagePlugin.PngInfo()
        info.add_text("Title", title)
        path = os.path.join(out, f"{i:03d}_{_safe(s.name)}.png")
        Image.fromarray(overlay(s.image, heat[i])).save(path, pnginfo=info)
        files.append(path)
    cols = min(len(samples), 4)
    rows = -(-len(samples) // cols)
    fig = agg_figure((2.2 * cols, 2.4 * rows))  # not pyplot: a notebook's backend stays as it is
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s, h, t in zip(axes.flat, samples, heat, titles):
        ax.imshow(overlay(s.image, h))
        ax.set_title(t, fontsize=9)
    fig.suptitle(f"{method} at {layer} of " + (f"class {target}" if target is not None else "the predicted class"),
                 fontsize=10)
    fig.tight_layout()
    grid = os.path.join(out, "grid.png")
    fig.savefig(grid, dpi=100)
    return [*files, grid], layer
