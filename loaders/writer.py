"""Write `tf.train.Example` TFRecord shard sets (Kaggle naming), and list image sources.

`write_tfrecords` takes dicts such as `{"image": ..., "class": 3, "id": "abc"}` and
writes shards named like Kaggle's (`00-512x512-798.tfrec`). The sources below
(`image_folder_examples`, `csv_examples`) feed it from an image folder with one
sub-folder per class, or from a CSV of `path,label[,id]`; `make-tfrecords` uses them.
"""
from __future__ import annotations

import csv
import io
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import cv2
import numpy as np
from tfrecord import example_pb2
from tqdm import tqdm

from torch2flax.errors import ConfigError, DataError, MissingFileError
from torch2flax.loaders.image import decode_image
from torch2flax.loaders.tfrecord import masked_crc32c

__all__ = [
    "IMAGE_EXTENSIONS",
    "Source",
    "csv_examples",
    "encode_example",
    "frame_record",
    "image_folder_examples",
    "resize_center_crop",
    "write_tfrecords",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_JPEG_MAGIC = b"\xff\xd8"


def frame_record(payload: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the payload, its masked CRC."""
    length = struct.pack("<Q", len(payload))
    return b"".join((length, struct.pack("<I", masked_crc32c(length)), payload,
                     struct.pack("<I", masked_crc32c(payload))))


def _feature(key: str, value: Any) -> example_pb2.Feature:
    if isinstance(value, (bytes, bytearray, memoryview, str, np.generic)) or not hasattr(value, "__iter__"):
        value = [value]
    values = list(np.asarray(value).ravel()) if isinstance(value, np.ndarray) else list(value)
    if all(isinstance(v, (bytes, bytearray, memoryview, np.bytes_)) for v in values) and values:
        return example_pb2.Feature(bytes_list=example_pb2.BytesList(value=[bytes(v) for v in values]))
    if all(isinstance(v, (str, np.str_)) for v in values) and values:
        return example_pb2.Feature(bytes_list=example_pb2.BytesList(value=[v.encode() for v in values]))
    if all(isinstance(v, (bool, int, np.integer, np.bool_)) for v in values):
        return example_pb2.Feature(int64_list=example_pb2.Int64List(value=[int(v) for v in values]))
    if all(isinstance(v, (float, int, np.floating, np.integer)) for v in values):
        return example_pb2.Feature(float_list=example_pb2.FloatList(value=[float(v) for v in values]))
    kinds = sorted({type(v).__name__ for v in values})
    raise TypeError(f"feature {key!r}: cannot store values of type(s) {kinds} "
                    "(use bytes, str, int, float or lists/arrays of one of them)")


def encode_example(example: Mapping[str, Any]) -> bytes:
    """Serialise a dict as a `tf.train.Example`: bytes/str -> bytes_list, ints -> int64_list,
    floats -> float_list; scalars become one-value lists, lists/1-D arrays keep their length."""
    features = {key: _feature(key, value) for key, value in example.items()}
    return example_pb2.Example(features=example_pb2.Features(feature=features)).SerializeToString()


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Scale the shorter side to `size` and crop the centre square."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        # INTER_AREA averages when shrinking (no aliasing); it degrades to bilinear-like
        # output when enlarging, where INTER_CUBIC is the better choice.
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        image = cv2.resize(image, (nw, nh), interpolation=interp)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(image[top:top + size, left:left + size])


def _encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # JPEG has 16-bit sides
        raise DataError(f"JPEG encoding of a {image.shape[1]}x{image.shape[0]} image failed "
                        "(JPEG allows at most 65535 px a side)")
    return buf.tobytes()


def _image_hw(data: bytes) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError  # reads the header only: cheaper than decoding

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.height, im.width
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"not a readable image ({len(data)} bytes, starting "
                        f"{bytes(data[:8]).hex(' ')})") from e


def _prepare_image(value: Any, image_size: int | None, quality: int) -> tuple[bytes, tuple[int, int]]:
    if isinstance(value, np.ndarray):
        image = value if image_size is None else resize_center_crop(value, image_size)
        return _encode_jpeg(image, quality), image.shape[:2]
    data = bytes(value)
    if image_size is not None:
        image = resize_center_crop(decode_image(data), image_size)
        return _encode_jpeg(image, quality), image.shape[:2]
    return data, _image_hw(data)


def write_tfrecords(
    examples: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    num_shards: int,
    prefix: str = "",
    image_size: int | None = None,
    quality: int = 95,
) -> list[str]:
    """Write examples as `tf.train.Example` TFRecord shards; return the shard paths.

    Each example is a dict; its "image" may be JPEG/PNG bytes (kept as they are)
    or an (H, W, 3) uint8 RGB array (JPEG-encoded at `quality`). With `image_size`
    every image is resized and centre-cropped to that square and re-encoded. Other
    values follow `encode_example`. Shards are named `{prefix}NN-{H}x{W}-{count}.tfrec`
    when every image has one size, else `{prefix}NN-{count}.tfrec`.

    With a sized `examples` (a list), shard k holds a contiguous slice (sizes differ
    by at most one), so reading the shards in name order gives the input order;
    an unsized iterable is dealt out round-robin.
    """
    if num_shards < 1:
        raise ConfigError(f"num_shards must be >= 1, got {num_shards}")
    total = len(examples) if hasattr(examples, "__len__") else None
    if total is not None and total < num_shards:
        raise ConfigError(f"{total} examples cannot fill {num_shards} shards: use at most {total} shards")
    os.makedirs(out_dir, exist_ok=True)
    width = max(2, len(str(num_shards - 1)))
    partial = [os.path.join(out_dir, f".{prefix}{k:0{width}d}.tfrec.partial") for k in range(num_shards)]
    counts = [0] * num_shards
    sizes: set[tuple[int, int] | None] = set()
    outs = [open(p, "wb") for p in partial]
    try:
        for i, example in enumerate(tqdm(examples, total=total, desc="writing TFRecords",
                                         unit="record", mininterval=1.0)):
            example = dict(example)
            if "image" in example:
                try:
                    example["image"], hw = _prepare_image(example["image"], image_size, quality)
                except (ValueError, TypeError, cv2.error) as e:  # not an image we can store; a bug escapes as is
                    name = example.get("id", f"#{i}")
                    raise DataError(f"example {i} (id {name}): bad image: {e}") from e
                sizes.add(tuple(int(v) for v in hw))
            else:
                sizes.add(None)
            shard = i * num_shards // total if total is not None else i % num_shards
            outs[shard].write(frame_record(encode_example(example)))
            counts[shard] += 1
    except BaseException:
        for f, p in zip(outs, partial):
            f.close()
            os.remove(p)
        raise
    for f in outs:
        f.close()
    if min(counts) == 0:
        for p in partial:
            os.remove(p)
        raise ConfigError(f"{sum(counts)} examples cannot fill {num_shards} shards: use at most {sum(counts)} shards")
    size_tag = ""
    if len(sizes) == 1 and None not in sizes:
        (h, w), = sizes
        size_tag = f"{h}x{w}-"
    paths = []
    for k, (p, n) in enumerate(zip(partial, counts)):
        final = os.path.join(out_dir, f"{prefix}{k:0{width}d}-{size_tag}{n}.tfrec")
        os.replace(p, final)
        paths.append(final)
    return paths


# --------------------------------------------------------------------------- sources


class Source(Sequence):
    """A sized, lazily-read list of Flower-schema examples from image files.

    Images are read when iterated; non-JPEG files (PNG, ...) are re-encoded to JPEG
    at `quality` since the Flower schema holds JPEG (`reencoded` counts them).
    """

    def __init__(self, paths: list[str], labels: list[int] | None, ids: list[str], quality: int = 95):
        self.paths, self.labels, self.ids, self.quality = paths, labels, ids, quality
        self.reencoded = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        path = self.paths[i]
        try:
            with open(path, "rb") as f:
                data = f.read()
            if not data.startswith(_JPEG_MAGIC):
                data = _encode_jpeg(decode_image(data), self.quality)
                self.reencoded += 1
            else:
                # A full decode (a one-off cost when writing): a corrupt or truncated file fails
                # here, naming it, rather than mid-epoch in a training run.
                decode_image(data)
        except FileNotFoundError as e:
            raise MissingFileError(f"{path}: cannot read image: {e}") from e
        except (OSError, ValueError, cv2.error) as e:
            raise DataError(f"{path}: cannot read image: {e}") from e
        example: dict[str, Any] = {"image": data, "id": self.ids[i]}
        if self.labels is not None:
            example["class"] = self.labels[i]
        return example

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))


def _check_unique(ids: list[str], where: str, hint: str) -> None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise DataError(f"{where}: id {i!r} appears more than once ({hint})")
        seen.add(i)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def image_folder_examples(root: str, *, labels: bool = True, quality: int = 95
                          ) -> tuple[Source, list[str], list[str]]:
    """Examples from `root/<class>/<image>` (class index = sorted folder order).

    With `labels=False` every image under `root` (recursively) is taken, unlabelled.
    Ids are paths relative to `root` without extension. Returns (source, class
    names, skipped non-image files).
    """
    if not os.path.exists(root):
        raise MissingFileError(f"{root}: no such folder")
    if not os.path.isdir(root):
        raise ConfigError(f"{root}: not a directory")
    paths, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            (paths if _is_image(name) else skipped).append(full)
    classes: list[str] = []
    class_of: list[int] | None = None
    if labels:
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not classes:
            raise DataError(f"{root}: no class sub-folders (use --no-labels for an unlabelled folder)")
        index = {c: k for k, c in enumerate(classes)}
        top = [os.path.relpath(p, root).split(os.sep)[0] for p in paths]
        loose = [p for p, t in zip(paths, top) if t not in index]
        if loose:
            raise DataError(f"{root}: image {loose[0]} is not inside a class sub-folder "
                            f"({len(loose)} such file(s))")
        class_of = [index[t] for t in top]
    if not paths:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    ids = [os.path.splitext(os.path.relpath(p, root))[0].replace(os.sep, "/") for p in paths]
    _check_unique(ids, root, "two files differ only by extension")
    return Source(paths, class_of, ids, quality), classes, skipped


def csv_examples(path: str, *, labels: bool = True, quality: int = 95
                 ) -> tuple[Source, list[str]]:
    """Examples from a CSV of `path,label[,id]` (`path[,id]` with `labels=False`).

    A header row is recognised when it names the columns (`path`, `label`, `id`).
    Image paths are relative to the CSV's folder. Integer labels are used as they
    are; otherwise class names map to sorted-order indices (returned as the class
    names; empty for integer labels). Ids default to the file name without extension.
    """
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except (csv.Error, UnicodeDecodeError) as e:  # a binary file, a NUL byte, a broken quote
        raise DataError(f"{path}: not a readable CSV of path,label[,id]: {e}") from e
    if not rows:
        raise DataError(f"{path}: empty CSV")
    columns = ["path", "label", "id"] if labels else ["path", "id"]
    header = [c.strip().lower() for c in rows[0]]
    start = 0
    if "path" in header:
        columns, start = header, 1
    elif labels and len(rows[0]) < 2:
        raise DataError(f"{path}: line 1: expected path,label[,id], got {rows[0]}")
    col = {name: k for k, name in enumerate(columns)}
    if labels and "label" not in col:
        raise DataError(f"{path}: no 'label' column (use --no-labels for an unlabelled CSV)")
    files, raw_labels, ids = [], [], []
    for line, row in enumerate(rows[start:], start + 1):
        needed = max(col["path"], col.get("label", 0) if labels else 0)
        if len(row) <= needed:
            raise DataError(f"{path}: line {line}: expected columns {columns}, got {row}")
        rel = row[col["path"]].strip()
        files.append(rel if os.path.isabs(rel) else os.path.join(base, rel))
        if labels:
            raw_labels.append(row[col["label"]].strip())
        has_id = "id" in col and col["id"] < len(row) and row[col["id"]].strip()
        ids.append(row[col["id"]].strip() if has_id else os.path.splitext(os.path.basename(rel))[0])
    classes: list[str] = []
    class_of = None
    if labels:
        try:
            class_of = [int(v) for v in raw_labels]
        except ValueError:
            classes = sorted(set(raw_labels))
            index = {c: k for k, c in enumerate(classes)}
            class_of = [index[v] for v in raw_labels]
    _check_unique(ids, path, "add an id column")
    return Source(files, class_of, ids, quality), classes
