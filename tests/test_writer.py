"""write_tfrecords shard naming/resizing and the `make-tfrecords` command."""
import json
import os
import subprocess

import cv2
import numpy as np
import pytest

from tests.helpers import PALETTE, console_script, encode_jpeg, synthetic_images
from torch2flax.cli import main
from torch2flax.loaders import TFRecordDataset, decode_image, write_tfrecords

FLOWER = {"image": "bytes", "class": "int", "id": "str"}


def _names(paths):
    return [os.path.basename(p) for p in paths]


def test_shard_names_counts_and_order(tmp_path):
    images, labels = synthetic_images(10, 3, 16, seed=1)
    examples = [{"image": im, "class": int(c), "id": f"x{i}"} for i, (im, c) in enumerate(zip(images, labels))]
    paths = write_tfrecords(examples, tmp_path, num_shards=3, prefix="train-")
    assert _names(paths) == ["train-00-16x16-4.tfrec", "train-01-16x16-3.tfrec", "train-02-16x16-3.tfrec"]
    ds = TFRecordDataset(paths, FLOWER)
    assert [d["id"] for d in [ds[i] for i in range(10)]] == [e["id"] for e in examples]
    assert [ds[i]["class"] for i in range(10)] == labels.tolist()
    # Arrays are JPEG-encoded (lossy: not equal), in RGB order (channel means agree).
    out = decode_image(ds[0]["image"]).astype(float)
    assert not np.array_equal(out, images[0])
    assert np.abs(out.mean((0, 1)) - images[0].mean((0, 1))).max() < 3
    assert sorted(os.listdir(tmp_path)) == sorted(_names(paths) + [n + s for n in _names(paths)
                                                                     for s in (".idx", ".idx.meta")])


def test_mixed_sizes_drop_the_size_from_names_and_generators_round_robin(tmp_path):
    a, _ = synthetic_images(2, 2, 16)
    b, _ = synthetic_images(2, 2, (16, 24))
    gen = ({"image": im, "id": str(i)} for i, im in enumerate([a[0], b[0], a[1], b[1]]))
    paths = write_tfrecords(gen, tmp_path, num_shards=2)
    assert _names(paths) == ["00-2.tfrec", "01-2.tfrec"]
    assert [TFRecordDataset(p, {"id": "str"})[1]["id"] for p in paths] == ["2", "3"]


def test_image_size_resizes_and_center_crops(tmp_path):
    # 40x80 image: left and right quarters red, centre blue; a centre crop keeps only blue.
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, :20] = img[:, 60:] = (255, 0, 0)
    img[:, 20:60] = (0, 0, 255)
    png = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))[1].tobytes()
    paths = write_tfrecords([{"image": img}, {"image": png}], tmp_path, num_shards=1, image_size=20)
    assert _names(paths) == ["00-20x20-2.tfrec"]
    ds = TFRecordDataset(paths, {"image": "bytes"})
    for i in range(2):
        out = decode_image(ds[i]["image"])
        assert out.shape == (20, 20, 3)
        assert np.abs(out.astype(int) - (0, 0, 255)).max() < 40


def test_writer_errors(tmp_path):
    with pytest.raises(ValueError, match="2 examples cannot fill 3 shards"):
        write_tfrecords([{"x": 1}, {"x": 2}], tmp_path, num_shards=3)
    with pytest.raises(ValueError, match=r"example 1 \(id b\): bad image"):
        write_tfrecords([{"image": encode_jpeg(np.zeros((8, 8, 3), np.uint8)), "id": "a"},
                         {"image": b"garbage", "id": "b"}], tmp_path, num_shards=1)
    with pytest.raises(TypeError, match="feature 'x'"):
        write_tfrecords([{"x": object()}], tmp_path, num_shards=1)
    from torch2flax.errors import ConfigError, DataError

    with pytest.raises(ConfigError, match="2 examples cannot fill 3 shards"):
        write_tfrecords([{"x": 1}, {"x": 2}], tmp_path, num_shards=3)
    with pytest.raises(DataError, match=r"example 0 \(id b\): bad image"):
        write_tfrecords([{"image": b"garbage", "id": "b"}], tmp_path, num_shards=1)
    assert os.listdir(tmp_path) == []  # failed writes leave no partial shards


def _image_folder(root, per_class=3, size=(30, 40)):
    classes = ["tulip", "daisy", "rose"]  # class index follows sorted order, not this one
    for k, name in enumerate(sorted(classes)):
        os.makedirs(root / name)
        for j in range(per_class):
            img = np.full((*size, 3), PALETTE[k], np.uint8)
            ext = "png" if j == 0 else "jpg"
            data = cv2.imencode(f".{ext}", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))[1].tobytes()
            (root / name / f"{name}{j}.{ext}").write_bytes(data)
    (root / "daisy" / "notes.txt").write_text("not an image")
    return sorted(classes)


def test_make_tfrecords_from_folder_console_script(tmp_path):
    classes = _image_folder(tmp_path / "src")
    out = subprocess.run([console_script(), "make-tfrecords", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                          "--size", "24", "--shards", "2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == f"wrote 9 records in 2 shards to {tmp_path / 'out'}"
    assert "skipped 1 non-image file(s)" in out.stdout and "re-encoded 3 non-JPEG" in out.stdout
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == classes
    ds = TFRecordDataset(str(tmp_path / "out" / "*.tfrec"), FLOWER)
    assert _names(ds.files) == ["00-24x24-5.tfrec", "01-24x24-4.tfrec"]
    items = [ds[i] for i in range(len(ds))]
    assert [d["id"] for d in items] == [f"{c}/{c}{j}" for c in classes for j in range(3)]
    for d in items:
        img = decode_image(d["image"])
        assert img.shape == (24, 24, 3)
        assert np.abs(img.astype(int) - PALETTE[d["class"]]).max() < 12  # right colour -> right class


def test_make_tfrecords_from_csv_and_unlabelled(tmp_path, capsys):
    src = tmp_path / "imgs"
    src.mkdir()
    rows = []
    for i in range(4):
        img = np.full((20, 20, 3), PALETTE[i % 2], np.uint8)
        (src / f"{i}.jpg").write_bytes(encode_jpeg(img, 95))
        rows.append(f"imgs/{i}.jpg,{['cat', 'dog'][i % 2]},id{i}")
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("path,label,id\n" + "\n".join(rows) + "\n")
    assert main(["make-tfrecords", str(csv_path), "--out", str(tmp_path / "out"), "--shards", "1",
                 "--prefix", "tr-"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"wrote 4 records in 1 shards to {tmp_path / 'out'}")
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["cat", "dog"]
    ds = TFRecordDataset(str(tmp_path / "out" / "tr-*.tfrec"), FLOWER)
    assert [(d["id"], d["class"]) for d in (ds[i] for i in range(4))] == \
        [("id0", 0), ("id1", 1), ("id2", 0), ("id3", 1)]
    assert ds[0]["image"] == (src / "0.jpg").read_bytes()  # JPEGs are copied untouched

    assert main(["make-tfrecords", str(src), "--out", str(tmp_path / "test"), "--shards", "2",
                 "--no-labels"]) == 0
    test = TFRecordDataset(str(tmp_path / "test" / "*.tfrec"))
    assert test.features == {"id": "bytes", "image": "bytes"} and len(test) == 4
    assert not (tmp_path / "test" / "classes.json").exists()


def test_make_tfrecords_reports_bad_image_by_path(tmp_path, capsys):
    _image_folder(tmp_path / "src", per_class=2)
    (tmp_path / "src" / "rose" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (tmp_path / "src" / "rose" / "broken2.png").write_bytes(b"nope")
    assert main(["make-tfrecords", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                 "--shards", "1"]) == 2  # every command: a user's error is one line, exit status 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "error" in line][0].startswith("torch2flax: error: ")
    assert f"{tmp_path / 'src' / 'rose' / 'broken.jpg'}: cannot read image" in err
    assert not [n for n in os.listdir(tmp_path / "out") if n.endswith(".tfrec")]
