"""TFRecord files as indexed, CRC-verified, map-style torch Datasets.

The `tfrecord` package reads the format without TensorFlow but only as an
iterable: no `len()`, no random access, no CRC checks, no index for gzip files.
We keep its `tf.train.Example` protobuf message and write the rest: an offset
index per file (built from the 12-byte record headers only, cached in the
`tfrecord2idx` text format), random access by offset, masked-CRC32C checks, and
gzip support through a decompressed cached copy.

Record framing (TFRecord spec):
    uint64 length | uint32 masked_crc32c(length bytes) | payload | uint32 masked_crc32c(payload)
"""
from __future__ import annotations

import copy
import glob
import gzip
import hashlib
import json
import operator
import os
import re
import shutil
import struct
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import crc32c
import numpy as np
import torch.utils.data
from google.protobuf.message import DecodeError
from tfrecord import example_pb2
from tqdm import tqdm

from torch2flax.errors import ConfigError, DataError, MissingFileError, UserError
from torch2flax.utils import atomic_write

__all__ = [
    "BadRecordError",
    "CorruptRecordError",
    "RecordError",
    "TFRecordDataset",
    "FEATURE_TYPES",
    "masked_crc32c",
]

_HEADER = 12  # uint64 length + uint32 masked CRC of those 8 bytes
_FRAMING = 16  # header + uint32 masked CRC of the payload
_MASK_DELTA = 0xA282EAD8
_GZIP_MAGIC = b"\x1f\x8b"
_META_VERSION = 1

# feature type -> (Feature oneof field, exactly one value?)
FEATURE_TYPES: dict[str, tuple[str, bool]] = {
    "bytes": ("bytes_list", True),
    "str": ("bytes_list", True),
    "int": ("int64_list", True),
    "float": ("float_list", True),
    "bytes[]": ("bytes_list", False),
    "str[]": ("bytes_list", False),
    "int[]": ("int64_list", False),
    "float[]": ("float_list", False),
}
_INFERRED = {"bytes_list": "bytes", "int64_list": "int", "float_list": "float"}


class RecordError(ValueError):
    """A record (or a feature of it) that cannot be read as asked, or whose transform failed; the
    message names file and record.

    Raised as `BadRecordError`, a user's `DataError`, where the record is at fault (or the transform
    failed with a user's error, such as an image that does not decode); a plain `RecordError` only
    where a transform failed with any other exception, which is a bug in the transform.
    """


class BadRecordError(RecordError, DataError):
    """A record the user's data makes unreadable: not a tf.train.Example, a feature missing, of
    another type or not UTF-8, an image that does not decode; the message names file and record."""


class CorruptRecordError(BadRecordError):
    """A record whose framing or masked CRC32C is wrong, or a file cut short."""


def masked_crc32c(data: bytes | memoryview) -> int:
    """The TFRecord checksum: CRC32C rotated right by 15 bits plus a constant, mod 2**32."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# --------------------------------------------------------------------------- index


# Several processes (hosts of a multi-host job, DataLoader workers) may build the same sidecar at
# once; the atomic rename makes each reader see a whole file. Raises OSError when the directory
# is not writable. (A module attribute, so tests can refuse writes to one directory.)
_atomic_write = atomic_write


def _scan_file(
    f, size: int, path: str, *, verify_headers: bool, verify_payloads: bool
) -> tuple[np.ndarray, list[tuple[int, int, str]], CorruptRecordError | None]:
    """Walk the record headers of an open (unbuffered) file, seeking past payloads.

    Returns (table, bad, fatal): `table` is (records, 2) int64 of `offset length`
    with lengths including the 16 framing bytes, as tfrecord2idx writes them; `bad`
    lists (record, offset, reason) of records whose payload CRC is wrong (checked
    only when `verify_payloads`; they stay in `table`); `fatal` is the error that
    stopped the walk (file cut short, or a length header failing its CRC, after
    which no later record boundary can be trusted), or None.
    """
    table: list[tuple[int, int]] = []
    bad: list[tuple[int, int, str]] = []
    fatal = None
    pos = 0
    while pos < size:
        record = len(table)
        header = f.read(_HEADER)
        if len(header) < _HEADER:
            fatal = CorruptRecordError(
                f"{path}: record {record} at byte {pos}: file is truncated "
                f"({size - pos} bytes left, a record header needs {_HEADER})")
            break
        (length,) = struct.unpack_from("<Q", header)
        if verify_headers and masked_crc32c(header[:8]) != struct.unpack_from("<I", header, 8)[0]:
            fatal = CorruptRecordError(
                f"{path}: record {record} at byte {pos}: length header fails its CRC "
                "(corrupt file, or not an uncompressed TFRecord)")
            break
        end = pos + length + _FRAMING
        if end > size:
            fatal = CorruptRecordError(
                f"{path}: record {record} at byte {pos}: file is truncated (record needs "
                f"{length + _FRAMING} bytes, only {size - pos} left)")
            break
        if verify_payloads:
            payload = f.read(length)
            (crc,) = struct.unpack("<I", f.read(4))
            if masked_crc32c(payload) != crc:
                bad.append((record, pos, "payload fails its CRC"))
        else:
            f.seek(end)
        table.append((pos, length + _FRAMING))
        pos = end
    return np.array(table, np.int64).reshape(-1, 2), bad, fatal


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(_HEADER)
    if len(head) == _HEADER:
        # A plain TFRecord's first length may happen to start with 1f 8b; its header
        # CRC tells the two apart (a gzip header passing it has odds of 2**-32).
        if masked_crc32c(head[:8]) == struct.unpack_from("<I", head, 8)[0]:
            return False
    return head[:2] == _GZIP_MAGIC


class _FileIndex:
    """Offsets of one file's records, found in or written to a sidecar cache.

    Sidecars for data file `F` live beside it (`F.idx`, `F.idx.meta`, and for gzip
    `F.raw`) or, when that directory is not writable, under `index_dir`, else the
    index stays in memory (a gzip copy goes to the system temp dir: workers must
    be able to open it).

    `F.idx` is exactly what tfrecord2idx writes, so either tool can use the other's
    index. That format has no room for a header, so staleness lives in the tiny JSON
    `F.idx.meta`: the data file's size and mtime_ns must match exactly (not merely
    "index newer than data": cp -p, rsync and dataset mounts set arbitrary mtimes),
    and the index must be self-consistent (last offset + length == file size), which
    also rejects a hand-edited or foreign index. An index without meta is rebuilt;
    that only reads the record headers, so it is cheap.
    """

    def __init__(self, path, *, gz, index_dir, verify, on_error):
        self.path = path
        self.gz = gz
        st = os.stat(path)
        self.source = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        self.unwritable = False
        self.fatal: CorruptRecordError | None = None
        # Skipping needs the bad records known before len(): check payloads once.
        self.want_bad = verify and on_error == "skip"
        stems = [path]
        if index_dir is not None:
            digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:10]
            stems.append(os.path.join(index_dir, f"{os.path.basename(path)}.{digest}"))
        if gz:  # the decompressed copy must be a file workers can open: last resort /tmp
            digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:10]
            stems.append(os.path.join(tempfile.gettempdir(), "torch2flax-tfrecord",
                                      f"{os.path.basename(path)}.{digest}"))
        for stem in stems:
            if self._load(stem):
                return
        self._build(stems, verify)

    def _raw_path(self, stem: str) -> str:
        return f"{stem}.raw" if self.gz else self.path

    def _select(self, table: np.ndarray, bad: list) -> None:
        """Keep the records to serve: all, less the known-bad ones when skipping."""
        self.bad = [tuple(b) for b in bad] if self.want_bad else []
        keep = np.ones(len(table), bool)
        keep[[int(b[0]) for b in self.bad]] = False
        self.records = np.flatnonzero(keep).astype(np.int32)
        self.offsets, self.lengths = table[keep, 0], table[keep, 1]

    def _load(self, stem: str) -> bool:
        try:
            with open(f"{stem}.idx.meta") as f:
                meta = json.load(f)
            if meta.get("version") != _META_VERSION or meta.get("source") != self.source:
                return False
            if self.want_bad and meta.get("bad") is None:  # payloads never checked
                return False
            raw = self._raw_path(stem)
            if os.path.getsize(raw) != meta["size"]:
                return False
            with open(f"{stem}.idx") as f:
                table = np.array(f.read().split(), dtype=np.int64).reshape(-1, 2)
        except (OSError, ValueError, KeyError, TypeError):
            return False
        n = len(table)
        end = int(table[-1].sum()) if n else 0
        if n != meta["records"] or end != meta["size"]:
            return False
        self.raw = raw
        self._select(table, meta.get("bad") or [])
        return True

    def _build(self, stems: list[str], verify: bool) -> None:
        self.raw = self._decompress(stems) if self.gz else self.path
        size = os.path.getsize(self.raw)
        # Unbuffered: a buffered reader would pull 8 KB around every 12-byte header.
        with open(self.raw, "rb", buffering=0) as f:
            table, bad, self.fatal = _scan_file(
                f, size, self.path, verify_headers=verify, verify_payloads=self.want_bad)
        self._select(table, bad)
        if self.fatal is not None:
            return  # never cache a partial index: the next run must report it again
        text = "".join(f"{o} {n}\n" for o, n in table.tolist())
        meta = {
            "version": _META_VERSION, "source": self.source, "size": size, "records": len(table),
            "bad": [list(b) for b in bad] if self.want_bad else None,
        }
        for stem in stems:
            if self._raw_path(stem) != self.raw:
                continue  # a gzip index must sit beside the decompressed copy it describes
            try:
                if stem != self.path:
                    os.makedirs(os.path.dirname(stem), exist_ok=True)
                _atomic_write(f"{stem}.idx", lambda f: f.write(text.encode()))
                _atomic_write(f"{stem}.idx.meta", lambda f: f.write(json.dumps(meta).encode()))
                return
            except OSError:
                continue
        self.unwritable = True

    def _decompress(self, stems: list[str]) -> str:
        def fill(out):
            try:
                with gzip.open(self.path, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
            except (OSError, EOFError, zlib.error) as e:
                # Not a disk error: the gzip stream itself is bad or cut short.
                raise CorruptRecordError(
                    f"{self.path}: gzip stream is corrupt or truncated "
                    f"(after {out.tell()} decompressed bytes): {e}") from e

        for stem in stems:
            raw = self._raw_path(stem)
            try:
                os.makedirs(os.path.dirname(os.path.abspath(raw)), exist_ok=True)
                _atomic_write(raw, fill)
                return raw
            except CorruptRecordError:
                raise
            except OSError:
                continue
        raise ConfigError(f"{self.path}: no writable place for its decompressed copy "
                          f"(tried {', '.join(os.path.dirname(s) or '.' for s in stems)}); "
                          "set TMPDIR, or pass index_dir=, to a writable folder")


# --------------------------------------------------------------------------- dataset


# What the toolkit (and the tfrecord package's tfrecord2idx) writes beside a data file `F`:
# `F.idx`, `F.idx.meta`, for gzip `F.raw`, and `F.<sidecar>.tmp<pid>` while writing them.
_SIDECAR = re.compile(r"\.(idx|idx\.meta|raw)(\.tmp\d+)?$")
# What a directory given as input is read for.
DATA_SUFFIXES = (".tfrec", ".tfrecord", ".tfrecords", ".tfrec.gz", ".tfrecord.gz", ".tfrecords.gz")


def is_sidecar(path: str) -> bool:
    """Whether `path` is an index or cache file written beside a TFRecord file, never data."""
    return bool(_SIDECAR.search(path))


def _expand(files: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Files from paths, globs and directories; sidecars never count as data.

    A directory reads its TFRecord files (`DATA_SUFFIXES`); a glob skips sidecars and
    sub-directories; a path, glob or directory that yields no data file is an error that
    says what it did find.
    """
    items = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    out: set[str] = set()
    for item in items:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = [os.path.join(item, n) for n in os.listdir(item) if n.endswith(DATA_SUFFIXES)]
            if not found:
                raise MissingFileError(f"directory {item!r} holds no TFRecord files "
                                       f"({', '.join('*' + s for s in DATA_SUFFIXES)})")
        elif glob.has_magic(item):
            matches = glob.glob(item)
            found = [m for m in matches if os.path.isfile(m) and not is_sidecar(m)]
            if not found:
                skipped = len(matches)
                raise MissingFileError(
                    f"no TFRecord files match {item!r}" + (
                        f" (it matches {skipped} index sidecar(s) or folder(s) only)" if skipped else ""))
        elif os.path.isfile(item):
            if is_sidecar(item):
                raise ConfigError(f"{item!r} is an index sidecar written beside a TFRecord file, not data")
            found = [item]
        else:
            raise MissingFileError(f"TFRecord file not found: {item!r}")
        out.update(found)
    if not out:
        raise MissingFileError("TFRecordDataset: no files given")
    return sorted(out)


class TFRecordDataset(torch.utils.data.Dataset):
    """TFRecord files of `tf.train.Example` as a map-style dataset of dicts.

    Args:
        files: a path, a glob, a directory (its `*.tfrec`/`*.tfrecord` files), or a list of
            them; read in sorted order. Index sidecars (`.idx`, `.idx.meta`, `.raw`) that
            a glob matches are never read as data.
        features: `name -> type` with types "bytes", "str" (UTF-8), "int", "float"
            (exactly one value, returned as a Python scalar) or the same with "[]"
            (any number of values: a 1-D int64/float32 array or a list of bytes/str).
            None: every feature, types inferred from the first record (one value ->
            scalar type, bytes stay bytes; several -> "[]" type).
        transform: called on each record's dict (decode, augment); its exceptions
            are re-raised as `RecordError` naming the file and record (a `BadRecordError`,
            a user's `DataError`, where the transform raised a user's error).
        compression: "auto" (gzip detected by magic bytes), None, or "gzip". Gzip
            files are decompressed once into a cached copy that is read by offset.
        verify: check the masked CRC32C of every header and payload read.
        on_error: "raise" or "skip". With "skip" (and verify) indexing also checks
            every payload CRC once (the result is cached with the index), so bad
            records are left out of `len()`; a file cut short or a length header
            failing its CRC keeps the records before it and counts the rest as one
            skipped record. Each file with skips warns once; `skipped` is the total.
            A record that goes bad after indexing still raises when read.
        index_dir: where sidecars go when the data directory is not writable; else
            the index stays in memory.

    Workers of a DataLoader (fork, forkserver or spawn) open their own file handles
    lazily; the pickled dataset holds paths and compact offset arrays, no handles.
    """

    def __init__(
        self,
        files: str | os.PathLike | Iterable[str | os.PathLike],
        features: Mapping[str, str] | None = None,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        *,
        compression: str | None = "auto",
        verify: bool = True,
        on_error: str = "raise",
        index_dir: str | os.PathLike | None = None,
    ) -> None:
        if compression not in ("auto", "gzip", None):
            raise ConfigError(f"compression must be 'auto', 'gzip' or None, got {compression!r}")
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if features is not None:
            features = dict(features)
            for key, kind in features.items():
                if kind not in FEATURE_TYPES:
                    raise ConfigError(
                        f"feature {key!r}: unknown type {kind!r} (use one of {sorted(FEATURE_TYPES)})")
        self.files = _expand(files)
        self.transform = transform
        self.compression = compression
        self.verify = verify
        self.on_error = on_error
        self.index_dir = None if index_dir is None else os.fspath(index_dir)
        self.skipped = 0

        indexes = []
        uncached = []
        for path in tqdm(self.files, desc="indexing TFRecords", unit="file", leave=False,
                         disable=len(self.files) < 8):
            gz = compression == "gzip" or (compression == "auto" and _is_gzip(path))
            index = _FileIndex(path, gz=gz, index_dir=self.index_dir, verify=verify,
                               on_error=on_error)
            if index.fatal is not None and on_error == "raise":
                raise index.fatal
            skipped = len(index.bad) + (index.fatal is not None)
            if skipped:
                details = [f"record {r} at byte {o}: {why}" for r, o, why in index.bad]
                if index.fatal is not None:
                    details.append(f"rest of file unreadable: {index.fatal}")
                warnings.warn(f"{path}: skipped {skipped} corrupt record(s): " + "; ".join(details),
                              stacklevel=2)
                self.skipped += skipped
            if index.unwritable:
                uncached.append(path)
            indexes.append(index)
        if uncached:
            warnings.warn(f"index of {len(uncached)} file(s) kept in memory only (e.g. {uncached[0]}): "
                          "directory not writable; pass index_dir= to keep it between runs",
                          stacklevel=2)

        self._paths = [ix.raw for ix in indexes]
        self._gz = [ix.gz for ix in indexes]
        # Compact per-record arrays (24 bytes a record) keep the pickled dataset small.
        self._file = np.concatenate(
            [np.full(len(ix.offsets), k, np.int32) for k, ix in enumerate(indexes)])
        self._record = np.concatenate([ix.records for ix in indexes])
        self._offset = np.concatenate([ix.offsets for ix in indexes])
        self._length = np.concatenate([ix.lengths for ix in indexes])
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()
        if features is None:
            features = self._infer_features()
        self.features = features
        self._plan = [(key, kind, *FEATURE_TYPES[kind]) for key, kind in features.items()]

    # -- sizes and sharding

    def __len__(self) -> int:
        return len(self._offset)

    def shard(self, index: int, count: int) -> TFRecordDataset:
        """The `index`-th of `count` contiguous parts (e.g. jax.process_index(), process_count()).

        The parts partition the records and their sizes differ by at most one.
        """
        index, count = operator.index(index), operator.index(count)
        if count < 1 or not 0 <= index < count:
            raise ConfigError(f"shard: need 0 <= index < count, got index={index}, count={count}")
        n = len(self)
        return self.subset(np.arange(n * index // count, n * (index + 1) // count))

    def subset(self, indices: Sequence[int] | np.ndarray) -> TFRecordDataset:
        """The records at `indices` (dataset positions), in that order: a fold's training or
        held-out part. Indexing is not repeated; `where` still names each record's file."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"subset: indices must lie in [0, {len(self)}), got {indices.min()}..{indices.max()}")
        part = copy.copy(self)
        part._handles, part._pid = {}, os.getpid()
        for name in ("_file", "_record", "_offset", "_length"):
            setattr(part, name, getattr(self, name)[indices])
        return part

    # -- reading

    def _where(self, i: int) -> str:
        k = int(self._file[i])
        place = "byte" if not self._gz[k] else "decompressed byte"
        return f"{self.files[k]}: record {int(self._record[i])} at {place} {int(self._offset[i])}"

    def _read(self, i: int) -> memoryview:
        if self._pid != os.getpid():  # forked: the parent's handles share its file offsets
            self._handles, self._pid = {}, os.getpid()
        k = int(self._file[i])
        f = self._handles.get(k)
        if f is None:
            f = self._handles[k] = open(self._paths[k], "rb", buffering=0)
        offset, length = int(self._offset[i]), int(self._length[i])
        # pread: one syscall and no shared seek position, so threads may share handles.
        buf = os.pread(f.fileno(), length, offset) if hasattr(os, "pread") else _seek_read(f, offset, length)
        if len(buf) != length:
            raise CorruptRecordError(f"{self._where(i)}: file ends {length - len(buf)} bytes early "
                                     "(changed since it was indexed?)")
        (n,) = struct.unpack_from("<Q", buf)
        if n + _FRAMING != length:
            raise CorruptRecordError(f"{self._where(i)}: length header says {n} bytes, the index "
                                     f"says {length - _FRAMING} (file changed since it was indexed?)")
        view = memoryview(buf)
        if self.verify:
            if masked_crc32c(view[:8]) != struct.unpack_from("<I", buf, 8)[0]:
                raise CorruptRecordError(f"{self._where(i)}: length header fails its CRC")
            if masked_crc32c(view[_HEADER:-4]) != struct.unpack_from("<I", buf, length - 4)[0]:
                raise CorruptRecordError(f"{self._where(i)}: payload fails its CRC")
        return view[_HEADER:-4]

    def _example(self, i: int):
        example = example_pb2.Example()
        try:
            example.ParseFromString(self._read(i))
        except DecodeError as e:
            raise BadRecordError(f"{self._where(i)}: not a tf.train.Example: {e}") from e
        return example.features.feature

    def _infer_features(self) -> dict[str, str]:
        if len(self) == 0:
            return {}
        features = {}
        for key, feature in sorted(self._example(0).items()):
            kind = feature.WhichOneof("kind")
            if kind is None:
                raise BadRecordError(f"{self._where(0)}: feature {key!r} is empty; "
                                     "cannot infer its type, pass features=")
            single = len(getattr(feature, kind).value) == 1
            features[key] = _INFERRED[kind] + ("" if single else "[]")
        return features

    def _parse(self, i: int) -> dict[str, Any]:
        fmap = self._example(i)
        return {key: self._feature(i, fmap, key, kind, field, single) for key, kind, field, single in self._plan}

    def _feature(self, i: int, fmap: Any, key: str, kind: str, field: str, single: bool) -> Any:
        if key not in fmap:
            raise BadRecordError(f"{self._where(i)}: missing feature {key!r} (record has {sorted(fmap)})")
        feature = fmap[key]
        which = feature.WhichOneof("kind")
        if which != field and not (which is None and not single):
            raise BadRecordError(f"{self._where(i)}: feature {key!r} is a {which or 'empty feature'}, "
                                 f"expected {field} for type {kind!r}")
        values = getattr(feature, field).value
        try:
            if single:
                if len(values) != 1:
                    raise BadRecordError(
                        f"{self._where(i)}: feature {key!r} has {len(values)} values, type "
                        f"{kind!r} expects exactly one (use {kind + '[]'!r} for any number)")
                value = values[0]
                return value.decode() if kind == "str" else value
            if kind == "int[]":
                return np.array(values, dtype=np.int64)
            if kind == "float[]":
                return np.array(values, dtype=np.float32)
            if kind == "str[]":
                return [v.decode() for v in values]
            return list(values)
        except UnicodeDecodeError as e:
            raise BadRecordError(f"{self._where(i)}: feature {key!r} is not UTF-8 text: {e}") from e

    def column(self, key: str) -> list[Any]:
        """Feature `key` of every record, in dataset order, without the transform (e.g. to
        check the labels before training). Reads every record once."""
        plan = {p[0]: p for p in self._plan}
        if key not in plan:
            raise KeyError(f"feature {key!r} is not among this dataset's features {sorted(plan)}")
        _, kind, field, single = plan[key]
        return [self._feature(i, self._example(i), key, kind, field, single)
                for i in tqdm(range(len(self)), desc=f"reading {key!r}", unit="record", leave=False,
                              disable=len(self) < 20000)]

    def where(self, i: int) -> str:
        """`file: record r at byte b` of dataset item `i` (for error messages)."""
        return self._where(i)

    def __getitem__(self, i: int) -> Any:
        n = len(self)
        j = operator.index(i)
        if j < 0:
            j += n
        if not 0 <= j < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} records")
        item = self._parse(j)
        if self.transform is not None:
            try:
                item = self.transform(item)
            except Exception as e:
                rid = item.get("id") if isinstance(item, dict) else None
                rid = rid.decode(errors="replace") if isinstance(rid, bytes) else rid
                named = f" (id {rid!r})" if isinstance(rid, str) else ""
                # A user's error (an image that does not decode) makes the record bad; any other
                # exception is a bug in the transform, still named by file and record.
                cls = BadRecordError if isinstance(e, UserError) else RecordError
                raise cls(f"{self._where(j)}{named}: transform failed: {type(e).__name__}: {e}") from e
        return item

    # -- pickling and handles

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = {}, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def close(self) -> None:
        """Close this process's file handles (they reopen on the next read)."""
        for f in self._handles.values():
            f.close()
        self._handles = {}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for f in getattr(self, "_handles", {}).values():
                f.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} records in {len(self.files)} files, "
                f"features={self.features}, skipped={self.skipped})")


def _seek_read(f, offset: int, length: int) -> bytes:
    f.seek(offset)
    return f.read(length)
