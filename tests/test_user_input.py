"""What users type (config files, flags) and what they get back (submission.csv): typed, checked, quoted."""
import json

import pytest

from torch2flax.errors import ConfigError, DataError, MissingFileError
from torch2flax.train import TrainConfig
from torch2flax.train.config import dumps


def test_yaml_and_json_numbers_come_back_as_their_types(tmp_path):
    # YAML 1.1 reads 5e-05 (no dot) as the string '5e-05': the saved config of a --lr 5e-5 run.
    saved = tmp_path / "config.json"
    saved.write_text(dumps(TrainConfig(train="a", val="b", num_classes=3, lr=5e-05)))
    assert json.loads(saved.read_text())["lr"] == 5e-05
    config = TrainConfig.from_file(saved)
    assert config.lr == 5e-05 and isinstance(config.lr, float)
    assert config.lr * config.min_lr_ratio == pytest.approx(5e-07)  # the resume's first use of it

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("lr: 1e-3\nepochs: 3.0\nhflip: 'no'\ngrad_clip: null\nnum_classes: 5\nnum_workers: '2'\n")
    config = TrainConfig.from_file(yaml_file)
    assert (config.lr, config.epochs, config.hflip, config.grad_clip, config.num_workers) == (1e-3, 3, False, None, 2)
    assert type(config.epochs) is int


@pytest.mark.parametrize("key,value,expected", [
    ("lr", "fast", "expected float"), ("epochs", 2.5, "expected int"), ("hflip", "maybe", "expected bool"),
    ("model", 3, "expected str"), ("crop_pct", "wide", "expected float or None"), ("epochs", True, "expected int"),
])
def test_a_wrong_type_names_the_key_the_value_and_the_type(key, value, expected):
    with pytest.raises(ValueError, match=f"config.{key}={value!r}: {expected}".replace(".", r"\.")):
        TrainConfig(**{key: value})
    with pytest.raises(ConfigError):  # a user's mistake: one line and exit 2 from the CLI, not a bug report
        TrainConfig(**{key: value})


def test_one_class_is_refused():
    with pytest.raises(ValueError, match="num_classes=1: a classifier needs at least 2 classes"):
        TrainConfig(num_classes=1)
    with pytest.raises(ValueError, match="num_classes=-3"):
        TrainConfig(num_classes=-3)
    with pytest.raises(ConfigError):
        TrainConfig(num_classes=1)


def test_a_bad_config_file_is_the_users_mistake(tmp_path):
    with pytest.raises(MissingFileError, match="config file not found: .*nope.yaml"):
        TrainConfig.from_file(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("lr: [1e-3\n")
    with pytest.raises(ConfigError, match="bad.yaml: not a YAML or JSON config file"):
        TrainConfig.from_file(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- lr\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping of config keys, got list"):
        TrainConfig.from_file(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match=r"unknown config keys \['1', 'lrate'\]"):
        TrainConfig.from_dict({"lrate": 1e-3, 1: 2})


def test_a_damaged_oof_file_names_the_file_and_row(tmp_path):
    from torch2flax.train.cv import ensemble_report, read_oof

    good = "id,fold,label,pred,prob_0,prob_1\na,0,1,1,0.25,0.75\n"
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "short.csv").write_text(good + "b,0,1\n")
    (tmp_path / "range.csv").write_text(good + "b,0,2,1,0.5,0.5\n")
    with pytest.raises(DataError, match="empty.csv: not an out-of-fold file"):
        read_oof(str(tmp_path / "empty.csv"))
    with pytest.raises(DataError, match="short.csv: row 2 after the header: 3 fields, the header has 6"):
        read_oof(str(tmp_path / "short.csv"))
    with pytest.raises(DataError, match=r"range.csv: row 2 after the header: label 2 or pred 1 is outside \[0, 2\)"):
        read_oof(str(tmp_path / "range.csv"))
    with pytest.raises(MissingFileError, match="nope.csv not found"):
        ensemble_report([str(tmp_path / "nope.csv")])
    with pytest.raises(ConfigError, match="2 weights for 1 runs"):
        ensemble_report([str(tmp_path / "short.csv")], [1.0, 2.0])


def test_a_step_folder_that_is_no_checkpoint_is_a_data_error(tmp_path):
    from torch2flax.train.checkpoint import load_checkpoint

    step = tmp_path / "checkpoints" / "5"
    step.mkdir(parents=True)
    with pytest.raises(DataError, match=r"checkpoints/5: not a readable torch2flax training checkpoint"):
        load_checkpoint(step)
    (tmp_path / "run").mkdir()
    with pytest.raises(MissingFileError, match="run: holds no training checkpoint"):
        load_checkpoint(tmp_path / "run")


def test_submission_ids_with_commas_and_quotes_survive_the_csv():
    import csv
    import io

    import numpy as np

    from torch2flax.train.inference import submission_csv

    ids = np.array(["plain", "a,b", 'say "hi"', "line\nbreak"])
    text = submission_csv(ids, np.array([0, 1, 2, 3]))
    assert text.splitlines()[:2] == ["id,label", "plain,0"]
    assert list(csv.reader(io.StringIO(text))) == [["id", "label"], ["plain", "0"], ["a,b", "1"],
                                                    ['say "hi"', "2"], ["line\nbreak", "3"]]


def test_an_empty_split_is_refused_before_any_work(tmp_path, monkeypatch):
    from tests.helpers import write_flower_splits
    from torch2flax.train import fit, trainer

    _, globs = write_flower_splits(tmp_path, train=8, val=4, test=2, num_classes=3, size=16)
    empty = tmp_path / "empty" / "val-0.tfrec"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    monkeypatch.setattr(trainer, "init_model", lambda config: pytest.fail("converted a model"))
    config = TrainConfig(train=globs["train"], val=str(empty), num_classes=3, image_size=16, out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"the val split '.*val-0\.tfrec' holds no records"):
        fit(config, progress=False)


def test_init_decides_the_model_and_a_conflicting_model_is_refused(tmp_path):
    import torch2flax
    from torch2flax.prepare import prepare_model

    assert TrainConfig().model == "resnet18" and TrainConfig(init="x.msgpack").model is None
    path = tmp_path / "r18.msgpack"
    torch2flax.save(path, *torch2flax.convert("resnet18", num_classes=3, layers=[1, 1, 1, 1]))
    assert prepare_model(init=path, num_classes=3).module.num_classes == 3
    assert prepare_model("resnet18", init=path, num_classes=3).module.num_classes == 3
    with pytest.raises(ValueError, match=r"r18\.msgpack holds a resnet18 model, but the run names model 'resnet50'"):
        prepare_model("resnet50", init=path, num_classes=3)


def test_resume_refuses_changed_model_and_data_flags(tmp_path):
    import argparse

    from torch2flax.train.cli import _add_config_flags, config_from_args

    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--resume")
    _add_config_flags(parser)
    (tmp_path / "config.json").write_text(dumps(TrainConfig(train="a", val="b", num_classes=3, lr=5e-05)))
    resume = ["--resume", str(tmp_path)]
    config = config_from_args(parser.parse_args(resume + ["--epochs", "20", "--num-classes", "3"]))
    assert (config.epochs, config.lr, config.model) == (20, 5e-05, "resnet18")  # same values are fine
    with pytest.raises(ValueError, match=r"other model or data settings \(--num-classes 3 -> 5; "
                                         r"--image-size 224 -> 96; --model 'resnet18' -> 'resnet50'\)"):
        config_from_args(parser.parse_args(resume + ["--num-classes", "5", "--image-size", "96", "--model",
                                                     "resnet50"]))


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])  # slow: a DataLoader worker
def test_a_bad_image_in_a_good_record_is_one_line_naming_file_record_and_id(tmp_path, damage, workers):
    """CRC-valid records whose JPEG bytes are garbage, or cut short (which some libjpeg builds
    decode silently into a partly grey image)."""
    from tfrecord.writer import TFRecordWriter

    from tests.helpers import encode_jpeg, synthetic_images
    from torch2flax.loaders import RecordError, RecordTransform, TFRecordDataset, eval_transform, make_loader
    from torch2flax.loaders.image import ImageDecodeError, decode_image

    images, _ = synthetic_images(6, 3, 32)
    jpegs = [encode_jpeg(img) for img in images]
    bad = b"\xff\xd8\xff\xe0 not a jpeg at all" if damage == "corrupt" else jpegs[4][: len(jpegs[4]) * 2 // 3]
    path = tmp_path / "train-00.tfrec"
    writer = TFRecordWriter(str(path))
    for i, data in enumerate([*jpegs[:4], bad, jpegs[5]]):
        writer.write({"image": (data, "byte"), "class": (i % 3, "int"), "id": (f"img{i}".encode(), "byte")})
    writer.close()
    if damage == "truncated":
        with pytest.raises(ImageDecodeError, match="truncated JPEG"):
            decode_image(bad)
        decode_image(jpegs[4] + b"camera trailer")  # bytes after the end-of-image marker are fine

    ds = TFRecordDataset(str(path), transform=RecordTransform(eval_transform(32)))
    loader = make_loader(ds, 3, train=False, num_devices=1, num_workers=workers)
    with pytest.raises(RecordError) as info:
        for _ in loader:
            pass
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert f"{path}: record 4" in message and "(id 'img4')" in message and "ImageDecodeError" in message


def test_make_tfrecords_refuses_a_truncated_jpeg_by_path(tmp_path, capsys):
    from tests.helpers import encode_jpeg, synthetic_images
    from torch2flax.cli import main

    images, _ = synthetic_images(4, 2, 32)
    for i, img in enumerate(images):
        folder = tmp_path / "src" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        data = encode_jpeg(img)
        (folder / f"{i}.jpg").write_bytes(data[: len(data) // 2] if i == 3 else data)
    assert main(["make-tfrecords", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--shards", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'src' / 'class1' / '3.jpg'}: cannot read image: truncated JPEG" in err


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])  # slow: a DataLoader worker
def test_skip_bad_images_puts_the_next_image_in_place_and_reports_the_bad_one(tmp_path, workers):
    from tfrecord.writer import TFRecordWriter

    from tests.helpers import encode_jpeg, synthetic_images
    from torch2flax.loaders import RecordError, RecordTransform, TFRecordDataset, eval_transform, make_loader
    from torch2flax.train.bad_images import host_batches

    images, _ = synthetic_images(6, 3, 32)
    path = tmp_path / "train-00.tfrec"
    writer = TFRecordWriter(str(path))
    for i, img in enumerate(images):
        data = b"\xff\xd8\xff\xe0 not a jpeg at all" if i == 4 else encode_jpeg(img)
        writer.write({"image": (data, "byte"), "class": (i % 3, "int"), "id": (f"img{i}".encode(), "byte")})
    writer.close()
    ds = TFRecordDataset(str(path), transform=RecordTransform(eval_transform(32)))

    def ids(batch, rows=None):
        flat = [x.decode() if isinstance(x, bytes) else str(x) for x in batch["id"].reshape(-1)]
        return [i for i, keep in zip(flat, rows if rows is not None else [True] * len(flat)) if keep]

    # Evaluation: the bad row is masked out, every other id counted once, the error kept.
    loader = make_loader(ds, 3, train=False, num_devices=1, num_workers=workers, skip_bad_images=True)
    bad: list[str] = []
    kept = [i for b in host_batches(loader, bad) for i in ids(b, b["mask"].reshape(-1))]
    assert kept == ["img0", "img1", "img2", "img3", "img5"]
    assert len(bad) == 1 and f"{path}: record 4" in bad[0] and "(id 'img4')" in bad[0], bad
    # Training: a full batch, the next image standing in for the bad one.
    (batch,) = list(make_loader(ds, 6, train=True, num_devices=1, num_workers=workers, skip_bad_images=True))
    assert sorted(ids(batch)) == ["img0", "img1", "img2", "img3", "img5", "img5"]
    assert [bool(f) for f in batch["bad_image"].reshape(-1)].count(True) == 1
    # A transform that fails for another reason is not a bad image: it still stops the run.
    broken = TFRecordDataset(str(path), transform=lambda r: 1 / 0)
    with pytest.raises(RecordError, match="ZeroDivisionError"):
        list(make_loader(broken, 3, train=False, num_devices=1, num_workers=0, skip_bad_images=True))


def test_predict_refuses_an_empty_test_set_before_loading_the_model(tmp_path):
    from torch2flax.train import predict

    empty = tmp_path / "test-0.tfrec"
    empty.write_bytes(b"")
    # The checkpoint does not even exist: the empty test set is found first.
    with pytest.raises(ValueError, match=r"test-0\.tfrec: the test set holds no records; nothing to predict"):
        predict(str(tmp_path / "missing.msgpack"), str(empty), str(tmp_path / "sub.csv"), progress=False)
    assert not (tmp_path / "sub.csv").exists()


def test_an_augment_file_must_make_training_sized_images(tmp_path):
    """`--augment FILE` replaces the training pipeline: one that does not end at image_size is
    refused naming the file and both sizes, before any model work; a recipe name is not a file."""
    import albumentations as A

    from torch2flax.train import TrainConfig
    from torch2flax.train.data import training_augmentation

    path = tmp_path / "aug.json"
    A.save(A.Compose([A.RandomResizedCrop((24, 24)), A.HorizontalFlip()]), str(path))
    with pytest.raises(ValueError, match=r"aug.json: turns a 71x67 image into 24x24; training needs 32x32"):
        training_augmentation(TrainConfig(augment=str(path), image_size=32, out=str(tmp_path / "run")))
    assert training_augmentation(TrainConfig(augment=str(path), image_size=24, out=str(tmp_path / "run")))
    recipe = training_augmentation(TrainConfig(augment="kaggle", image_size=32))
    assert "CoarseDropout" in str(recipe)
    with pytest.raises(FileNotFoundError, match="augment file not found: 'nope.yaml'"):
        training_augmentation(TrainConfig(augment="nope.yaml", image_size=32))
