"""TFRecordDataset: index, random access, CRC checks, gzip, DataLoader safety, sharding."""
import gzip
import os
import pickle
import shutil
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.helpers import encode_jpeg, synthetic_images, write_flower_tfrecords
from torch2flax.errors import ConfigError, DataError, MissingFileError
from torch2flax.loaders import CorruptRecordError, RecordError, TFRecordDataset, decode_image, write_tfrecords
from torch2flax.loaders import tfrecord as tfr
from torch2flax.loaders.image import ImageDecodeError

FLOWER = {"image": "bytes", "class": "int", "id": "str"}


def _gzip_all(files):
    out = []
    for path in files:
        with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        out.append(path + ".gz")
    return out


def _read_all(ds):
    return [ds[i] for i in range(len(ds))]


def _flip_bit(path, byte):
    with open(path, "r+b") as f:
        f.seek(byte)
        b = f.read(1)[0]
        f.seek(byte)
        f.write(bytes([b ^ 0x10]))


def _offsets(path):
    with open(path, "rb") as f:
        data = f.read()
    pos, out = 0, []
    while pos < len(data):
        (n,) = struct.unpack_from("<Q", data, pos)
        out.append((pos, n + 16))
        pos += n + 16
    return out


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    return write_flower_tfrecords(tmp_path_factory.mktemp("flowers"), num_records=24, num_shards=3)


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_reads_tfrecord_package_files_identically(tmp_path, compression):
    fs = write_flower_tfrecords(tmp_path, num_records=12, num_shards=2)
    files = fs.files if compression == "none" else _gzip_all(fs.files)
    ds = TFRecordDataset(files, FLOWER)
    items = _read_all(ds)
    assert [d["id"] for d in items] == fs.ids
    assert [d["class"] for d in items] == fs.labels
    assert [d["image"] for d in items] == fs.jpegs
    # Inference keeps bytes as bytes (no guessing str for ids).
    assert TFRecordDataset(files).features == {"class": "int", "id": "bytes", "image": "bytes"}


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_our_writer_matches_tfrecord_package_writer(tmp_path, compression):
    from tfrecord.reader import tfrecord_loader

    fs = write_flower_tfrecords(tmp_path / "theirs", num_records=10, num_shards=2)
    examples = [{"image": j, "class": c, "id": i} for j, c, i in zip(fs.jpegs, fs.labels, fs.ids)]
    ours = write_tfrecords(examples, tmp_path / "ours", num_shards=2)
    assert [os.path.basename(p) for p in ours] == [os.path.basename(p) for p in fs.files]
    theirs = fs.files
    if compression == "gzip":
        ours, theirs = _gzip_all(ours), _gzip_all(theirs)
    a, b = _read_all(TFRecordDataset(ours, FLOWER)), _read_all(TFRecordDataset(theirs, FLOWER))
    assert a == b
    # ...and the tfrecord package reads ours (its reader does not check CRCs; ours did above).
    ctype = "gzip" if compression == "gzip" else None
    pkg = [r for path in ours for r in tfrecord_loader(path, None, compression_type=ctype)]
    assert [r["id"].decode() for r in pkg] == fs.ids
    assert [bytes(r["image"]) for r in pkg] == fs.jpegs
    assert [int(r["class"][0]) for r in pkg] == fs.labels


def test_sidecar_index_matches_tfrecord2idx_both_ways(tmp_path, flowers):
    from tfrecord.reader import tfrecord_loader
    from tfrecord.tools.tfrecord2idx import create_index

    files = [shutil.copy(f, tmp_path) for f in flowers.files]
    TFRecordDataset(files)
    for path in files:
        create_index(path, str(tmp_path / "theirs.idx"))
        with open(path + ".idx") as ours, open(tmp_path / "theirs.idx") as theirs:
            assert ours.read() == theirs.read()
        # The tfrecord package shards by our index.
        got = [r["id"] for r in tfrecord_loader(path, path + ".idx", shard=(1, 2))]
        assert 0 < len(got) < 8


def test_gzip_index_usable_by_tfrecord_package(tmp_path, flowers):
    from tfrecord.reader import tfrecord_loader

    (gz,) = _gzip_all([shutil.copy(flowers.files[0], tmp_path)])
    ds = TFRecordDataset(gz, FLOWER)
    n = len(ds)
    got = [bytes(r["id"]).decode() for r in tfrecord_loader(gz, gz + ".idx", shard=(0, 1),
                                                            compression_type="gzip")]
    assert got == [ds[i]["id"] for i in range(n)]


def test_index_reads_only_headers(flowers):
    class Counting:
        def __init__(self, f):
            self.f, self.read_bytes = f, 0

        def read(self, n):
            data = self.f.read(n)
            self.read_bytes += len(data)
            return data

        def seek(self, pos):
            return self.f.seek(pos)

    path = flowers.files[0]
    with open(path, "rb", buffering=0) as f:
        counting = Counting(f)
        table, bad, fatal = tfr._scan_file(counting, os.path.getsize(path), path,
                                           verify_headers=True, verify_payloads=False)
    assert fatal is None and bad == []
    assert len(table) == flowers.records_per_file[0]
    assert counting.read_bytes == 12 * len(table)
    assert table.tolist() == [list(t) for t in _offsets(path)]


def test_stale_index_is_rebuilt(tmp_path):
    fs = write_flower_tfrecords(tmp_path, num_records=6, num_shards=1)
    path = fs.files[0]
    assert len(TFRecordDataset(path)) == 6
    # Same path, more records: size changes.
    write_flower_tfrecords(tmp_path, num_records=9, num_shards=1, seed=1)
    os.replace(tmp_path / "00-32x32-9.tfrec", path)
    ds = TFRecordDataset(path, FLOWER)
    assert len(ds) == 9 and ds[8]["id"] == "1-00008"
    # Same size, new mtime: a garbage index is not trusted once the mtime moved.
    with open(path + ".idx", "w") as f:
        f.write("0 1\n")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert len(TFRecordDataset(path)) == 9
    with open(path + ".idx") as f:
        assert len(f.read().splitlines()) == 9
    # An index that disagrees with its meta (edited by hand) is rebuilt as well.
    with open(path + ".idx", "w") as f:
        f.write("0 10\n")
    assert len(TFRecordDataset(path)) == 9


def test_index_falls_back_to_index_dir_then_memory(tmp_path, monkeypatch, flowers):
    data = tmp_path / "readonly"
    data.mkdir()
    files = [shutil.copy(f, data) for f in flowers.files]
    real = tfr._atomic_write

    def refuse_data_dir(path, fill):
        # Tests run as root, where chmod does not stop writes: refuse at the write helper.
        if os.path.dirname(os.path.abspath(path)) == str(data):
            raise PermissionError(13, "Permission denied", path)
        return real(path, fill)

    monkeypatch.setattr(tfr, "_atomic_write", refuse_data_dir)
    with pytest.warns(UserWarning, match="kept in memory"):
        ds = TFRecordDataset(files, FLOWER)
    assert [d["id"] for d in _read_all(ds)] == flowers.ids
    assert not [n for n in os.listdir(data) if n.endswith(".idx")]

    index_dir = tmp_path / "cache"
    ds = TFRecordDataset(files, FLOWER, index_dir=index_dir)
    assert len([n for n in os.listdir(index_dir) if n.endswith(".idx")]) == 3
    assert [d["id"] for d in _read_all(ds)] == flowers.ids
    # The next run uses the cached index: no scan at all.
    monkeypatch.setattr(tfr, "_scan_file", lambda *a, **k: pytest.fail("index was rebuilt"))
    assert len(TFRecordDataset(files, FLOWER, index_dir=index_dir)) == 24


def test_gzip_copy_falls_back_to_index_dir(tmp_path, monkeypatch, flowers):
    data = tmp_path / "readonly"
    data.mkdir()
    (gz,) = _gzip_all([shutil.copy(flowers.files[0], data)])
    real = tfr._atomic_write

    def refuse_data_dir(path, fill):
        if os.path.dirname(os.path.abspath(path)) == str(data):
            raise PermissionError(13, "Permission denied", path)
        return real(path, fill)

    monkeypatch.setattr(tfr, "_atomic_write", refuse_data_dir)
    ds = TFRecordDataset(gz, FLOWER, index_dir=tmp_path / "cache")
    names = os.listdir(tmp_path / "cache")
    assert sorted(n.split(".", 4)[-1] for n in names) == ["idx", "idx.meta", "raw"]
    assert sorted(os.listdir(data)) == ["00-32x32-8.tfrec", "00-32x32-8.tfrec.gz"]
    assert [d["id"] for d in _read_all(ds)] == flowers.ids[:8]


def test_len_and_list_like_indexing(flowers):
    ds = TFRecordDataset(flowers.files, FLOWER)
    assert len(ds) == 24
    assert ds[-1]["id"] == flowers.ids[-1] and ds[-24]["id"] == flowers.ids[0]
    assert ds[np.int64(5)]["id"] == flowers.ids[5]
    for bad in (24, -25):
        with pytest.raises(IndexError, match=str(bad)):
            ds[bad]
    with pytest.raises(TypeError):
        ds[1.0]


def test_files_glob_sorted_and_missing(flowers, tmp_path):
    d = os.path.dirname(flowers.files[0])
    ds = TFRecordDataset([flowers.files[2], os.path.join(d, "0[01]-*.tfrec")])
    assert ds.files == sorted(flowers.files)
    with pytest.raises(FileNotFoundError, match="nope"):
        TFRecordDataset(os.path.join(d, "nope-*.tfrec"))
    with pytest.raises(FileNotFoundError, match="missing.tfrec"):
        TFRecordDataset(str(tmp_path / "missing.tfrec"))
    with pytest.raises(MissingFileError, match="nope"):  # the user's error, not a bug
        TFRecordDataset(os.path.join(d, "nope-*.tfrec"))


def test_feature_errors_name_key_file_and_record(tmp_path):
    examples = [{"id": f"r{i}", "class": i, "v": [1.0, 2.0]} for i in range(3)]
    examples[2] = {"id": "r2", "v": [1.0, 2.0]}  # no class
    (path,) = write_tfrecords(examples, tmp_path, num_shards=1)
    ds = TFRecordDataset(path, {"id": "str", "class": "int"})
    assert ds[1] == {"id": "r1", "class": 1}
    with pytest.raises(RecordError, match=r"00-3\.tfrec: record 2 .*missing feature 'class'"):
        ds[2]
    with pytest.raises(DataError, match="missing feature 'class'"):  # the user's data, not a bug
        ds[2]
    with pytest.raises(RecordError, match=r"record 0 .*feature 'id' is a bytes_list, expected int64_list"):
        TFRecordDataset(path, {"id": "int"})[0]
    with pytest.raises(RecordError, match=r"record 1 .*'v' has 2 values.*'float\[\]'"):
        TFRecordDataset(path, {"v": "float"})[1]
    with pytest.raises(ValueError, match="'id': unknown type 'string'"):
        TFRecordDataset(path, {"id": "string"})


def test_variable_length_and_scalar_types(tmp_path):
    ex = {"i": [3, -4, 5], "f": np.array([0.5, 1.5], np.float32), "b": [b"x", b"yz"],
          "s": ["a", "\u00e9"], "one_f": 2.5, "one_i": 7, "empty": np.zeros(0, np.int64)}
    (path,) = write_tfrecords([ex], tmp_path, num_shards=1)
    ds = TFRecordDataset(path, {"i": "int[]", "f": "float[]", "b": "bytes[]", "s": "str[]",
                                "one_f": "float", "one_i": "int", "empty": "int[]"})
    got = ds[0]
    assert got["i"].dtype == np.int64 and got["i"].tolist() == [3, -4, 5]
    assert got["f"].dtype == np.float32 and got["f"].tolist() == [0.5, 1.5]
    assert got["b"] == [b"x", b"yz"] and got["s"] == ["a", "\u00e9"]
    assert got["one_f"] == 2.5 and got["one_i"] == 7 and got["empty"].shape == (0,)
    inferred = TFRecordDataset(path).features
    assert inferred["i"] == "int[]" and inferred["one_i"] == "int" and inferred["one_f"] == "float"
    assert inferred["s"] == "bytes[]"


def test_flipped_payload_bit_raises_then_skip_yields_the_rest(tmp_path, flowers):
    path = shutil.copy(flowers.files[1], tmp_path)  # ids 8..15
    offset, length = _offsets(path)[3]
    _flip_bit(path, offset + 12 + length // 2)
    ds = TFRecordDataset(path, FLOWER)
    assert len(ds) == 8 and ds[2]["id"] == flowers.ids[10]
    with pytest.raises(CorruptRecordError) as err:
        ds[3]
    assert f"{path}: record 3 at byte {offset}: payload fails its CRC" in str(err.value)
    # verify=False reads it (and gets altered bytes): the checks are what caught it.
    assert TFRecordDataset(path, FLOWER, verify=False)[3]["image"] != flowers.jpegs[11]

    with pytest.warns(UserWarning, match=r"skipped 1 corrupt record.*record 3 at byte") as rec:
        skip = TFRecordDataset(path, FLOWER, on_error="skip")
    assert len([w for w in rec if "skipped" in str(w.message)]) == 1
    assert skip.skipped == 1 and len(skip) == 7
    assert [d["id"] for d in _read_all(skip)] == flowers.ids[8:11] + flowers.ids[12:16]
    # The verdict is cached with the index; a second run warns again without rescanning.
    with pytest.warns(UserWarning, match="skipped 1"):
        assert TFRecordDataset(path, FLOWER, on_error="skip").skipped == 1


def test_flipped_header_bit_is_reported_at_index_time(tmp_path, flowers):
    path = shutil.copy(flowers.files[0], tmp_path)
    offset, _ = _offsets(path)[5]
    _flip_bit(path, offset + 9)  # inside the length's CRC
    with pytest.raises(CorruptRecordError, match=rf"record 5 at byte {offset}: length header fails"):
        TFRecordDataset(path)
    with pytest.warns(UserWarning, match="skipped 1"):
        ds = TFRecordDataset(path, FLOWER, on_error="skip")
    assert [d["id"] for d in _read_all(ds)] == flowers.ids[:5] and ds.skipped == 1


def test_truncated_file_is_reported_with_record_number(tmp_path, flowers):
    path = shutil.copy(flowers.files[0], tmp_path)
    offset, length = _offsets(path)[6]
    with open(path, "r+b") as f:
        f.truncate(offset + length - 3)
    with pytest.raises(CorruptRecordError, match=rf"00-32x32-8\.tfrec: record 6 at byte {offset}: file is truncated"):
        TFRecordDataset(path)
    with pytest.warns(UserWarning, match="record 6"):
        ds = TFRecordDataset(path, FLOWER, on_error="skip")
    assert len(ds) == 6 and ds.skipped == 1
    assert not os.path.exists(path + ".idx")  # a partial index is never cached


def test_truncated_gzip_names_the_file(tmp_path, flowers):
    (gz,) = _gzip_all([shutil.copy(flowers.files[0], tmp_path)])
    with open(gz, "r+b") as f:
        f.truncate(os.path.getsize(gz) // 2)
    with pytest.raises(CorruptRecordError, match="00-32x32-8.tfrec.gz: gzip stream is corrupt or truncated"):
        TFRecordDataset(gz)


def test_compression_detection_and_forcing(tmp_path, flowers):
    (gz,) = _gzip_all([shutil.copy(flowers.files[0], tmp_path)])
    assert len(TFRecordDataset(gz, compression="gzip")) == 8
    with pytest.raises(CorruptRecordError, match="length header fails its CRC"):
        TFRecordDataset(gz, compression=None)
    with pytest.raises(DataError, match="length header fails its CRC"):
        TFRecordDataset(gz, compression=None)
    with pytest.raises(ValueError, match="compression"):
        TFRecordDataset(gz, compression="zlib")
    with pytest.raises(ConfigError, match="compression"):
        TFRecordDataset(gz, compression="zlib")
    # A changed .gz gets a fresh decompressed copy.
    shutil.copy(flowers.files[1], tmp_path / "plain")
    os.remove(gz)
    _gzip_all([str(tmp_path / "plain")])
    os.replace(str(tmp_path / "plain") + ".gz", gz)
    assert [d["id"] for d in _read_all(TFRecordDataset(gz, FLOWER))] == flowers.ids[8:16]


def test_transform_errors_name_file_and_record(tmp_path, flowers):
    # Our writer refuses undecodable "image" values, so store them under another key.
    examples = [{"jpeg": j, "id": i} for j, i in zip(flowers.jpegs[:3], flowers.ids)]
    examples[1]["jpeg"] = b"not an image at all"
    (path,) = write_tfrecords(examples, tmp_path, num_shards=1)
    ds = TFRecordDataset(path, {"jpeg": "bytes"}, transform=lambda d: decode_image(d["jpeg"]))
    assert ds[0].shape == (32, 32, 3) and ds[0].dtype == np.uint8
    with pytest.raises(RecordError, match=r"00-3\.tfrec: record 1 at byte \d+: transform failed") as err:
        ds[1]
    assert isinstance(err.value.__cause__, ImageDecodeError)
    assert isinstance(err.value, DataError)  # an image that does not decode: the user's data
    # Any other exception from a transform is a bug in it: still named by file and record, not the user's.
    with pytest.raises(RecordError, match="transform failed: ZeroDivisionError") as err:
        TFRecordDataset(path, {"jpeg": "bytes"}, transform=lambda d: 1 / 0)[0]
    assert not isinstance(err.value, DataError)


def _ids_of_epoch(ds, **kw):
    # The default collate turns {"id": str} items into {"id": [str, ...]} batches.
    return [i for batch in DataLoader(ds, batch_size=5, **kw) for i in batch["id"]]


@pytest.mark.parametrize("method", ["fork", "forkserver", pytest.param("spawn", marks=pytest.mark.slow)])  # slow: spawned workers
def test_dataloader_workers_yield_every_id_once(flowers, method):
    ds = TFRecordDataset(flowers.files, {"id": "str"})
    ds[0]  # opens a handle in the parent: workers must not share it
    got = _ids_of_epoch(ds, num_workers=2, multiprocessing_context=method)
    assert sorted(got) == sorted(flowers.ids) and len(got) == 24


def test_seeded_shuffle_is_reproducible(flowers):
    ds = TFRecordDataset(flowers.files, {"id": "str"})

    def order(seed, **kw):
        return _ids_of_epoch(ds, shuffle=True, generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = order(1), order(1), order(2)
    assert a == b != c
    assert sorted(a) == sorted(flowers.ids) and a != flowers.ids
    assert order(1, num_workers=2, multiprocessing_context="fork") == a


@pytest.mark.parametrize("count", [1, 3, 8])
def test_shards_partition_the_records(flowers, count):
    ds = TFRecordDataset(flowers.files, {"id": "str"})
    parts = [ds.shard(i, count) for i in range(count)]
    assert all(type(p) is TFRecordDataset for p in parts)
    ids = [[d["id"] for d in _read_all(p)] for p in parts]
    assert sorted(sum(ids, [])) == sorted(flowers.ids)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 24 and max(sizes) - min(sizes) <= 1
    assert _ids_of_epoch(parts[-1]) == ids[-1]
    with pytest.raises(ValueError, match="index"):
        ds.shard(count, count)


def test_uneven_shards_differ_by_at_most_one(tmp_path):
    (path,) = write_tfrecords([{"x": i} for i in range(10)], tmp_path, num_shards=1)
    ds = TFRecordDataset(path)
    for count in (3, 4, 7):
        parts = [ds.shard(i, count) for i in range(count)]
        assert max(map(len, parts)) - min(map(len, parts)) == 1
        assert sorted(d["x"] for p in parts for d in _read_all(p)) == list(range(10))


def test_pickle_is_small_and_holds_no_handles(tmp_path):
    n = 2000
    payload = np.random.default_rng(0).bytes(500)
    write_tfrecords([{"blob": payload, "i": i} for i in range(n)], tmp_path, num_shards=4)
    ds = TFRecordDataset(str(tmp_path / "*.tfrec"))
    ds[0], ds[-1]  # open handles
    data = pickle.dumps(ds)
    # Offsets are 24 bytes a record; payloads (1 MB here) never travel.
    assert len(data) < 24 * n + 4096
    back = pickle.loads(data)
    assert back._handles == {} and back[1234]["i"] == 1234 and back[1234]["blob"] == payload


def test_decode_image_jpeg_png_and_reduce():
    images, _ = synthetic_images(2, 3, 64, seed=3)
    img = images[0]
    import io

    from PIL import Image

    jpeg = encode_jpeg(img, quality=92)
    ref = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    out = decode_image(jpeg)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - ref).max() <= 2  # same libjpeg-turbo, maybe other IDCT
    half = decode_image(jpeg, reduce=2)
    assert half.shape == (32, 32, 3)
    small = ref.reshape(32, 2, 32, 2, 3).mean((1, 3))
    assert np.abs(half - small).mean() < 6

    for mode, arr in (("RGB", img), ("RGBA", np.dstack([img, np.full((64, 64), 7, np.uint8)])),
                      ("L", img[..., 0])):
        buf = io.BytesIO()
        Image.fromarray(arr, mode).save(buf, format="PNG")
        out = decode_image(buf.getvalue())
        want = np.asarray(Image.fromarray(arr, mode).convert("RGB"))
        assert out.shape == (64, 64, 3) and np.array_equal(out, want), mode
    assert decode_image(buf.getvalue(), reduce=4).shape == (16, 16, 3)

    with pytest.raises(ImageDecodeError, match="19 bytes"):
        decode_image(b"not an image at all")
    with pytest.raises(ImageDecodeError, match="0 bytes"):
        decode_image(b"")
    with pytest.raises(ValueError, match="reduce"):
        decode_image(jpeg, reduce=3)


def test_jpeg_size_reads_the_frame_header_of_every_jpeg_flavour():
    import io

    from PIL import Image

    from torch2flax.loaders.image import jpeg_size

    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x010E] = "x" * 5000  # a large APP1 segment before the frame header
    variants = {
        "baseline": (rgb, {}), "progressive": (rgb, {"progressive": True}),
        "optimized": (rgb, {"optimize": True}), "gray": (rgb[..., 0], {}),
        "exif+icc": (rgb, {"exif": exif, "icc_profile": b"\0" * 3000}),
        "cmyk": (Image.fromarray(rgb).convert("CMYK"), {}),
    }
    for name, (image, kwargs) in variants.items():
        buf = io.BytesIO()
        (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, "JPEG", **kwargs)
        data = buf.getvalue()
        with Image.open(io.BytesIO(data)) as im:
            assert jpeg_size(data) == (im.height, im.width) == (37, 53), name
    # fill bytes (0xFF padding) before a marker are legal
    padded = data[:2] + b"\xff\xff\xff" + data[2:]
    assert jpeg_size(padded) == (37, 53)
    # not a JPEG, or a header cut before the frame: None (callers decode at full size)
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, "PNG")
    for bad in (png.getvalue(), b"", b"\xff\xd8", data[:20], b"\xff\xd8\x00\x00\x00\x00", b"\xff\xd8\xff\xda\x00\x02"):
        assert jpeg_size(bad) is None, bad[:8]


def test_sidecars_in_a_star_glob_are_not_data_and_a_directory_reads_its_files(tmp_path):
    paths = write_flower_tfrecords(tmp_path / "d", num_records=12, num_shards=3, size=16).files
    first = TFRecordDataset(str(tmp_path / "d" / "*.tfrec"))  # writes .idx and .idx.meta beside the data
    sidecars = sorted(n for n in os.listdir(tmp_path / "d") if not n.endswith(".tfrec"))
    assert len(sidecars) == 6 and all(n.endswith((".idx", ".idx.meta")) for n in sidecars)
    star = TFRecordDataset(str(tmp_path / "d" / "*"))
    folder = TFRecordDataset(tmp_path / "d")
    assert star.files == folder.files == first.files == sorted(paths) and len(star) == len(folder) == 12
    with pytest.raises(ValueError, match=r"\.idx'? is an index sidecar"):
        TFRecordDataset(paths[0] + ".idx")
    with pytest.raises(FileNotFoundError, match=r"matches 3 index sidecar\(s\) or folder\(s\) only"):
        TFRecordDataset(str(tmp_path / "d" / "*.idx"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"directory .*empty' holds no TFRecord files"):
        TFRecordDataset(tmp_path / "empty")


def test_column_reads_one_feature_of_every_record_and_where_names_it(flowers):
    ds = TFRecordDataset(flowers.files, {"image": "bytes", "class": "int", "id": "str"},
                         transform=lambda d: 1 / 0)  # the transform is not involved
    assert ds.column("class") == flowers.labels and ds.column("id") == flowers.ids
    assert ds.where(5).startswith(f"{flowers.files[0]}: record 5 at byte ")
    with pytest.raises(KeyError, match="'label'"):
        ds.column("label")
