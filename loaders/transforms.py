"""Augmentation presets (albumentations 2.x, uint8 HWC in and out) and the record transform.

Images stay uint8 through the host pipeline; normalisation happens on the device
(`loaders.device.normalize_on_device`), which moves 4x fewer bytes than float32.

Randomness: albumentations 2.x gives every `A.Compose` its own generators
(`random_generator`, `py_random`), independent of numpy's and Python's global
state, so copies of one Compose in several DataLoader workers would draw the
same crops. `reseed_augmenters` gives the Composes (and generator objects) found
in a dataset fresh state, and `seed_global_rngs` seeds the process-wide generators
a user's own transform may use; `loaders.make_loader` calls both before every
sample with a seed derived from (seed, epoch, sample index), which makes the draws
independent of the worker count and of which worker happens to load which sample.
"""
from __future__ import annotations

import contextlib
import functools
import random
import sys
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from torch2flax.errors import ConfigError, DataError, MissingFileError
from torch2flax.loaders.image import decode_image, jpeg_size

__all__ = [
    "RecordTransform",
    "eval_transform",
    "find_augmenters",
    "load_augment",
    "reseed_augmenters",
    "sample_seed",
    "seed_global_rngs",
    "train_transform",
]

INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}

REDUCE_FACTORS = (8, 4, 2)  # what libjpeg's DCT scaling (decode_image's `reduce`) offers


def _interpolation(name: str) -> int:
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        raise ConfigError(
            f"unknown interpolation {name!r}; choose one of {sorted(INTERPOLATIONS)}"
        ) from None


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _kaggle(interpolation: int) -> list[A.BasicTransform]:
    """The usual Kaggle image-competition set: shift-scale-rotate, brightness/contrast,
    hue/saturation, a blur, coarse dropout (each applied with its own probability)."""
    return [
        A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-15, 15),
                 interpolation=interpolation, border_mode=cv2.BORDER_REFLECT_101, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10, p=0.5),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=(3, 5)), A.MedianBlur(blur_limit=3)],
                p=0.2),
        A.CoarseDropout(num_holes_range=(1, 8), hole_height_range=(0.05, 0.125), hole_width_range=(0.05, 0.125),
                        p=0.5),
    ]


def _trivialaugment(interpolation: int) -> list[A.BasicTransform]:
    """TrivialAugment Wide (Mueller & Hutter, 2021; torchvision's `TrivialAugmentWide` ranges) in
    albumentations: one op per image, chosen uniformly, at a strength drawn uniformly from its range
    (`A.OneOf` picks uniformly among ops of equal p; each op samples its own magnitude)."""
    geometric = dict(interpolation=interpolation, border_mode=cv2.BORDER_CONSTANT, fill=128, p=1.0)
    return [A.OneOf([
        A.NoOp(p=1.0),
        A.Affine(shear={"x": (-44.7, 44.7), "y": (0, 0)}, **geometric),  # shear factor 0.99 = atan 44.7 deg
        A.Affine(shear={"x": (0, 0), "y": (-44.7, 44.7)}, **geometric),
        A.Affine(translate_percent={"x": (-0.14, 0.14), "y": (0, 0)}, **geometric),  # 32 px at 224
        A.Affine(translate_percent={"x": (0, 0), "y": (-0.14, 0.14)}, **geometric),
        A.Affine(rotate=(-135, 135), **geometric),
        A.ColorJitter(brightness=(0.01, 1.99), contrast=0, saturation=0, hue=0, p=1.0),
        A.ColorJitter(brightness=0, contrast=(0.01, 1.99), saturation=0, hue=0, p=1.0),
        A.ColorJitter(brightness=0, contrast=0, saturation=(0.01, 1.99), hue=0, p=1.0),
        A.Sharpen(alpha=(0.0, 0.99), lightness=(1.0, 1.0), p=1.0),
        A.Posterize(num_bits=(2, 8), p=1.0),
        A.Solarize(threshold_range=(0.0, 1.0), p=1.0),
        A.AutoContrast(p=1.0),
        A.Equalize(p=1.0),
    ], p=1.0)]


# Named augmentation recipes, appended after the crop and flips (`train_transform(recipe=...)`).
RECIPES = {"kaggle": _kaggle, "trivialaugment": _trivialaugment}


def load_augment(path: str) -> A.Compose:
    """An albumentations pipeline saved with `A.save` (YAML by its extension, else JSON)."""
    data_format = "yaml" if str(path).endswith((".yaml", ".yml")) else "json"
    try:
        pipeline = A.load(path, data_format=data_format)
    except FileNotFoundError:
        raise MissingFileError(f"augment file not found: {path!r}") from None
    except Exception as e:  # albumentations raises what its parser raises
        raise DataError(f"{path}: not an albumentations pipeline saved with A.save "
                        f"({data_format}): {type(e).__name__}: {e}") from e
    if not isinstance(pipeline, A.BaseCompose):
        raise DataError(f"{path}: holds a single {type(pipeline).__name__}, not a Compose (save A.Compose([...]))")
    return pipeline


def train_transform(
    size: int | Sequence[int],
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = True,
    vflip: bool = False,
    color_jitter: float = 0.0,
    rotate: float = 0.0,
    erase_prob: float = 0.0,
    interpolation: str = "bilinear",
    recipe: str | None = None,
) -> A.Compose:
    """timm-style training augmentation: RandomResizedCrop, flips and the usual Kaggle extras.

    Args:
      size: output side (int) or (height, width).
      scale, ratio: RandomResizedCrop's area fraction and aspect-ratio ranges.
      hflip, vflip: random horizontal / vertical flips with p=0.5.
      color_jitter: brightness, contrast and saturation strength (0 disables), as timm.
      rotate: maximum rotation in degrees (0 disables), applied after the crop.
      erase_prob: probability of random erasing (torchvision/timm RandomErasing).
      interpolation: one of `INTERPOLATIONS`.
      recipe: a named set appended after the rest (`RECIPES`): "kaggle" (shift-scale-rotate,
        brightness/contrast, hue/saturation, blur, coarse dropout) or "trivialaugment".
    """
    if recipe is not None and recipe not in RECIPES:
        raise ConfigError(f"unknown augmentation recipe {recipe!r}; choose one of {sorted(RECIPES)} "
                          "or pass an albumentations file saved with A.save")
    transforms: list[A.BasicTransform] = [
        A.RandomResizedCrop(
            size=_size_hw(size), scale=scale, ratio=ratio, interpolation=_interpolation(interpolation)
        )
    ]
    if hflip:
        transforms.append(A.HorizontalFlip(p=0.5))
    if vflip:
        transforms.append(A.VerticalFlip(p=0.5))
    if rotate:
        transforms.append(
            A.Rotate(limit=rotate, interpolation=_interpolation(interpolation),
                     border_mode=cv2.BORDER_REFLECT_101, p=1.0)
        )
    if color_jitter:
        transforms.append(
            A.ColorJitter(brightness=color_jitter, contrast=color_jitter,
                          saturation=color_jitter, hue=0.0, p=1.0)
        )
    if erase_prob:
        transforms.append(A.Erasing(p=erase_prob))
    if recipe is not None:
        transforms += RECIPES[recipe](_interpolation(interpolation))
    return A.Compose(transforms)


def eval_transform(
    size: int | Sequence[int], *, crop_pct: float = 0.875, interpolation: str = "bicubic"
) -> A.Compose:
    """timm-style evaluation: resize the short side to size / crop_pct, then center-crop `size`."""
    if not 0.0 < crop_pct <= 1.0:
        raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct}")
    h, w = _size_hw(size)
    # timm: scale_size = floor(size / crop_pct) for the short side.
    scale_size = int(np.floor(max(h, w) / crop_pct))
    return A.Compose(
        [
            A.SmallestMaxSize(max_size=scale_size, interpolation=_interpolation(interpolation)),
            A.CenterCrop(height=h, width=w),
        ]
    )


def _min_source_hw(augment: A.BaseCompose) -> tuple[str, int, int] | None:
    """What the first (sizing) transform needs from its input to never upsample a full image.

    Returns (mode, a, b): "hw" needs height >= a and width >= b; "short" needs
    min(H, W) >= a; "long" needs max(H, W) >= a. None when the first transform is
    not one whose output is (up to resampling) independent of the input scale,
    in which case the image is decoded at full size.
    """
    first = augment.transforms[0] if getattr(augment, "transforms", None) else None
    if isinstance(first, A.RandomResizedCrop):
        # Crop geometry is drawn as fractions of the input (area scale, aspect
        # ratio, relative position), so the crop statistics do not depend on the
        # decoded scale; see tests/test_transforms.py.
        h, w = first.size
        return "hw", h, w
    if isinstance(first, A.Resize):
        return "hw", first.height, first.width
    if isinstance(first, A.SmallestMaxSize) and isinstance(first.max_size, int):
        return "short", first.max_size, 0
    if isinstance(first, A.LongestMaxSize) and isinstance(first.max_size, int):
        return "long", first.max_size, 0
    return None


def reduce_factor(source_hw: tuple[int, int], need: tuple[str, int, int] | None) -> int:
    """Largest libjpeg DCT scale 1/r whose output still meets `need` (see `_min_source_hw`)."""
    if need is None:
        return 1
    mode, a, b = need
    h, w = source_hw
    for r in REDUCE_FACTORS:
        # decode_image(reduce=r) gives ceil(H/r) x ceil(W/r); floor keeps us safe.
        hr, wr = h // r, w // r
        if (
            (mode == "hw" and hr >= a and wr >= b)
            or (mode == "short" and min(hr, wr) >= a)
            or (mode == "long" and max(hr, wr) >= a)
        ):
            return r
    return 1


class RecordTransform:
    """TFRecord dict -> {"image": uint8 (S, S, 3), "label": np.int64, "id": str}.

    Decodes `record[image_key]` with `loaders.image.decode_image` and applies
    `augment` (an albumentations Compose, e.g. `train_transform(224)`). `label`
    is present only when the record has `label_key`; `id` only when it has `id_key`.

    reduce_decode: when the first transform is a RandomResizedCrop / Resize /
    SmallestMaxSize / LongestMaxSize whose target is at most half the source,
    decode at 1/2, 1/4 or 1/8 scale in libjpeg's DCT domain (much cheaper than
    a full decode) while the decoded image still covers the target. The crop
    geometry of RandomResizedCrop is relative to the image, so its statistics
    are unchanged; small crops are upsampled from fewer source pixels (at most
    the target size per side of the whole image), a mild extra blur on the
    smallest crops. Set False for bit-faithful full-resolution crops.
    """

    def __init__(
        self,
        augment: A.BaseCompose | None,
        *,
        image_key: str = "image",
        label_key: str | None = "class",
        id_key: str | None = "id",
        reduce_decode: bool = True,
    ):
        self.augment = augment
        self.image_key = image_key
        self.label_key = label_key
        self.id_key = id_key
        self.reduce_decode = reduce_decode
        self._need = _min_source_hw(augment) if (reduce_decode and augment is not None) else None

    def decode(self, data: bytes) -> np.ndarray:
        reduce = 1
        if self._need is not None:
            hw = jpeg_size(data)
            if hw is not None:
                reduce = reduce_factor(hw, self._need)
        return decode_image(data, reduce=reduce)

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
        if self.image_key not in record:
            raise KeyError(
                f"RecordTransform: record has no image key {self.image_key!r} "
                f"(keys: {sorted(record)}); pass image_key="
            )
        image = self.decode(record[self.image_key])
        if self.augment is not None:
            image = self.augment(image=image)["image"]
        out: dict[str, Any] = {"image": image}
        if self.label_key is not None and self.label_key in record:
            out["label"] = np.int64(record[self.label_key])
        if self.id_key is not None and self.id_key in record:
            rid = record[self.id_key]
            out["id"] = rid.decode() if isinstance(rid, (bytes, bytearray)) else str(rid)
        return out

    def __repr__(self) -> str:
        return (
            f"RecordTransform(image_key={self.image_key!r}, label_key={self.label_key!r}, "
            f"id_key={self.id_key!r}, reduce_decode={self.reduce_decode}, augment={self.augment!r})"
        )


# --------------------------------------------------------------------------- seeding

_ATOMS = (str, bytes, bytearray, memoryview, int, float, bool, np.ndarray, np.generic, type(None))


# Code from these packages draws only from generators `find_augmenters` returns (or none): a
# dataset holding nothing else needs no per-sample seeding of the process-wide generators, which
# costs ~2-3% of loader throughput (measured with benchmarks/loader.py).
_KNOWN_PACKAGES = ("torch2flax.", "albumentations.", "albucore.", "numpy", "torch.", "cv2")


def _known(module: str | None) -> bool:
    """Code of ours, albumentations, numpy, torch, OpenCV or the standard library."""
    module = module or ""
    return module.startswith(_KNOWN_PACKAGES) or module.split(".")[0] in sys.stdlib_module_names


def find_augmenters(obj: Any, *, max_depth: int = 6, max_items: int = 64) -> list[Any]:
    """The random state reachable from `obj` (a dataset): albumentations Composes and
    generator objects (`numpy.random.Generator`, `random.Random`, `torch.Generator`).

    Walks instance attributes, small lists/tuples/dicts, functools.partial arguments, and
    for functions (a transform written as a function or lambda, in a notebook cell or a
    module) their closure cells, defaults and the module globals they name, up to
    `max_depth` levels (large containers such as record indexes are skipped). It stops at
    each Compose found: setting a Compose's random state propagates to its children.
    Modules and classes are not entered.
    """
    return _walk(obj, max_depth, max_items)[0]


def holds_user_code(obj: Any, *, max_depth: int = 6, max_items: int = 64) -> bool:
    """Whether `obj` (a dataset) reaches a function or class from outside torch2flax,
    albumentations, numpy, torch and OpenCV: code that may draw from the global generators."""
    return _walk(obj, max_depth, max_items)[1]


def _walk(obj: Any, max_depth: int, max_items: int) -> tuple[list[Any], bool]:
    rng_types = (np.random.Generator, random.Random, torch.Generator)
    found: list[Any] = []
    seen: set[int] = set()
    user = False

    def visit(x: Any, depth: int) -> None:
        nonlocal user
        if isinstance(x, _ATOMS) or isinstance(x, (types.ModuleType, type)) or id(x) in seen or depth > max_depth:
            return
        seen.add(id(x))
        module = x.__module__ if isinstance(x, types.FunctionType) else type(x).__module__
        user = user or not _known(module)
        if isinstance(x, (A.BaseCompose, *rng_types)):
            found.append(x)
            return
        if isinstance(x, (list, tuple, set, frozenset)):
            if len(x) <= max_items:
                for item in x:
                    visit(item, depth + 1)
            return
        if isinstance(x, dict):
            if len(x) <= max_items:
                for item in x.values():
                    visit(item, depth + 1)
            return
        if isinstance(x, functools.partial):
            visit((x.func, x.args, x.keywords), depth)
            return
        if isinstance(x, types.MethodType):
            visit((x.__self__, x.__func__), depth)
            return
        if isinstance(x, types.FunctionType):
            cells = [c.cell_contents for c in (x.__closure__ or ()) if _filled(c)]
            visit((cells, x.__defaults__, x.__kwdefaults__), depth + 1)
            visit([x.__globals__[n] for n in _global_names(x.__code__) if n in x.__globals__], depth + 1)
            return
        attrs = getattr(x, "__dict__", None)
        if isinstance(attrs, dict) and len(attrs) <= max_items:
            for item in attrs.values():
                visit(item, depth + 1)

    visit(obj, 0)
    return found, user


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 (an empty cell raises)
    except ValueError:
        return False
    return True


def _global_names(code: types.CodeType) -> set[str]:
    """Global names a function's code (and the lambdas/comprehensions inside it) refers to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def sample_seed(seed: int, epoch: int, index: int) -> np.random.SeedSequence:
    """The seed of one sample's augmentation: a function of (seed, epoch, index) only."""
    return np.random.SeedSequence([int(seed), int(epoch), int(index)])


def reseed_augmenters(augmenters: Sequence[Any], seed: np.random.SeedSequence) -> None:
    """Give every Compose fresh numpy and Python generators derived from `seed`, and reset
    every generator object (`find_augmenters`) to a state derived from it.

    Each one gets its own child seed, so two pipelines in one dataset (say an image and a
    mask pipeline) do not mirror each other's draws.
    """
    for obj, child in zip(augmenters, seed.spawn(len(augmenters))):
        if isinstance(obj, A.BaseCompose):
            rng = np.random.Generator(np.random.PCG64(child))
            py = getattr(obj, "py_random", None)  # reseeded in place: no new object per sample
            if isinstance(py, random.Random):
                py.seed(int(rng.integers(1 << 63)))
            else:
                py = random.Random(int(rng.integers(1 << 63)))
            obj.set_random_state(rng, py)
        elif isinstance(obj, np.random.Generator):
            obj.bit_generator.state = type(obj.bit_generator)(child).state
        elif isinstance(obj, random.Random):
            obj.seed(int(child.generate_state(2, np.uint64)[0]))
        elif isinstance(obj, torch.Generator):
            obj.manual_seed(int(child.generate_state(1, np.uint64)[0] >> 1))


@contextlib.contextmanager
def preserved_global_rngs() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global generator states on exit (OpenCV's has
    no getter): seeding them per sample must not reset a notebook's own random state when
    samples load in the main process (`num_workers=0`)."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def seed_global_rngs(seed: np.random.SeedSequence) -> None:
    """Seed the process-wide generators a user's own transform may draw from: Python's
    `random`, NumPy's legacy `np.random.*`, torch's CPU generator and OpenCV's `cv2.randu`.

    (torch's CPU generator only: `torch.manual_seed` would also seed every CUDA device,
    measured 358 us a call against 3 us here.) The seeds are the SeedSequence's entropy pool,
    already hashed from (seed, epoch, index) when it was made.
    """
    a, b, c, d = seed.pool.tolist()
    random.seed(a)
    np.random.seed(b)
    torch.default_generator.manual_seed(c)
    cv2.setRNGSeed(d >> 1)  # a C int