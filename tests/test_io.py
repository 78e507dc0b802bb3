"""Model files: save/load round trips, replicated trees, old files, atomic writes."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import TornWrite, torn_writes

DATA = Path(__file__).parent / "data"


# slow: a full-size resnet18
@pytest.mark.slow
def test_save_load_round_trip_is_bit_identical(r18, tmp_path):
    import jax
    from flax import jax_utils

    from torch2flax import convert, load, save

    model, _ = r18
    module, variables = convert(model, num_classes=5)
    path = tmp_path / "m.msgpack"
    written = save(path, module, variables)
    assert written == (str(path), str(path) + ".json")
    assert sorted(os.listdir(tmp_path)) == ["m.msgpack", "m.msgpack.json"]  # no temp files left
    side = json.loads((tmp_path / "m.msgpack.json").read_text())
    assert side["model"] == "resnet18" and side["kwargs"]["num_classes"] == 5

    module2, variables2 = load(path)
    assert module2 == module and hash(module2) == hash(module)
    assert jax.tree.structure(variables2) == jax.tree.structure(variables)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a.dtype == b.dtype and bool(np.array_equal(a, b)),
                                            variables2, variables)))
    x = np.random.default_rng(0).standard_normal((2, 40, 40, 3)).astype(np.float32)
    # Jitted with the module static (one compile, not op-by-op dispatch): the equal loaded module reuses it.
    run = jax.jit(lambda m, v, x: m.apply(v, x), static_argnums=0)
    assert np.array_equal(np.asarray(run(module, variables, x)), np.asarray(run(module2, variables2, x)))
    assert run._cache_size() == 1

    # A replicated tree (leading device axis) is saved unreplicated ...
    save(tmp_path / "r.msgpack", module, jax_utils.replicate(variables, jax.local_devices()[:2]))
    _, v3 = load(tmp_path / "r.msgpack")
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), v3, variables)))
    # ... and a bare msgpack of variables (plain flax.serialization) is not a model file, even beside a
    # sidecar: the file itself must carry the config (no reader guesses a layout).
    from flax import serialization

    from torch2flax.errors import DataError

    (tmp_path / "bare.msgpack").write_bytes(serialization.to_bytes(jax.device_get(variables)))
    (tmp_path / "bare.msgpack.json").write_text((tmp_path / "m.msgpack.json").read_text())
    with pytest.raises(DataError, match=r"bare\.msgpack: a msgpack file, but not a torch2flax model .*torch2flax\.save"):
        load(tmp_path / "bare.msgpack")


def test_load_rejects_a_tree_of_another_model(r18, tmp_path):
    from torch2flax import convert, load, save

    model, _ = r18
    module, variables = convert(model)
    save(tmp_path / "a.msgpack", module, variables)
    cfg = json.loads((tmp_path / "a.msgpack.json").read_text())
    cfg["kwargs"]["num_classes"] = 4
    from flax import serialization

    state = serialization.msgpack_restore((tmp_path / "a.msgpack").read_bytes())
    state["config"] = json.dumps(cfg)
    (tmp_path / "b.msgpack").write_bytes(serialization.msgpack_serialize(state))
    with pytest.raises(ValueError, match=r"b\.msgpack: params/fc/(kernel|bias) has shape \((512, )?1000,?\), "
                                         r"the model expects \((512, )?4,?\)"):
        load(tmp_path / "b.msgpack")


def _old_file(tmp_path) -> Path:
    """A `best.msgpack` written by a torch2flax 0.1.0 development version (before the namespace move
    and the typed training checkpoint, format version 1): resnet18 at layers (1, 1, 1, 1), 3 classes,
    with the trainer's untyped `extra`."""
    path = tmp_path / "old_best.msgpack"
    path.write_bytes(gzip.decompress((DATA / "resnet18_l1111_v0.1.0.msgpack.gz").read_bytes()))
    return path


def test_a_file_written_before_the_format_version_was_checked_is_refused(tmp_path):
    """A torch2flax 0.1.0 development file (format version 1: no backend named, the trainer's
    untyped `extra`) is refused with both versions named, not read by a guessing fallback."""
    from torch2flax import __version__, load
    from torch2flax.errors import DataError
    from torch2flax.io import FORMAT_VERSION

    path = _old_file(tmp_path)
    with pytest.raises(DataError, match=rf"old_best\.msgpack: model file format version 1; torch2flax "
                                        rf"{__version__} reads version {FORMAT_VERSION}: .*before the first "
                                        "release; convert the model again"):
        load(path)


@pytest.mark.parametrize("torn_at", [0, 1], ids=["sidecar", "msgpack"])
def test_an_interrupted_write_leaves_the_previous_files_whole(r18, tmp_path, monkeypatch, torn_at):
    """A kill halfway through writing the bytes of the first or second file `save` writes: the
    old files stay byte-identical and load, and no temporary file is left behind.

    Every way to open a file for writing hands out a writer that, on the `torn_at`-th file,
    stops after half the bytes; a save that wrote in place (not to a temporary file renamed
    over the old one) would leave a torn file here and fail this test.
    """
    import jax

    from torch2flax import convert, load, save

    model, _ = r18
    module, variables = convert(model, num_classes=3)
    path = tmp_path / "m.msgpack"
    save(path, module, variables)
    side = tmp_path / "m.msgpack.json"
    before = path.read_bytes(), side.read_bytes()
    other = convert(model, num_classes=4)  # another head: the sidecar's bytes differ too
    opened = torn_writes(monkeypatch, torn_at)
    with pytest.raises(TornWrite):
        save(path, *other)
    monkeypatch.undo()
    assert len(opened) == torn_at + 1
    assert path.read_bytes() == before[0]
    if torn_at == 0:  # torn while writing the sidecar: the msgpack, written last, was never touched
        assert side.read_bytes() == before[1]
    # (torn on the msgpack, the sidecar already is the new one: the msgpack's own config rules)
    assert sorted(os.listdir(tmp_path)) == ["m.msgpack", "m.msgpack.json"]
    _, loaded = load(path)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), loaded, variables)))


def test_a_model_file_of_another_format_version_is_refused_naming_both(tmp_path):
    """Readers check the format version the writer put in the config: a newer file, or one with
    none, is refused with both versions named (never read as if it were this layout)."""
    import jax
    from flax import serialization

    from torch2flax import __version__, load
    from torch2flax.errors import DataError
    from torch2flax.io import FORMAT_VERSION, module_config, save
    from torch2flax.models import create_model

    module = create_model("resnet18", layers=(1, 1, 1, 1), channels=(8, 8, 8, 8), num_classes=3)
    from torch2flax.backend import variable_shapes

    # Zeros of the right shapes: the version check comes before any value is read.
    save(tmp_path / "a.msgpack", module, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variable_shapes(module)))
    load(tmp_path / "a.msgpack")  # this version's file loads
    state = serialization.msgpack_restore((tmp_path / "a.msgpack").read_bytes())
    for version, why in ((FORMAT_VERSION + 1, "written by a newer torch2flax, upgrade"),
                         (None, "not a file any torch2flax release wrote")):
        config = {**module_config(module), "format_version": version}
        state["config"] = json.dumps(config if version is not None else
                                     {k: v for k, v in config.items() if k != "format_version"})
        (tmp_path / "b.msgpack").write_bytes(serialization.msgpack_serialize(state))
        with pytest.raises(DataError, match=rf"b\.msgpack: model file format version {version!r}; torch2flax "
                                            rf"{__version__} reads version {FORMAT_VERSION}: .*{why}"):
            load(tmp_path / "b.msgpack")


def test_a_training_state_of_a_newer_format_version_is_refused():
    from torch2flax.errors import DataError
    from torch2flax.train.checkpoint import TRAIN_FORMAT_VERSION, TrainCheckpoint, _train_record

    record = TrainCheckpoint(epoch=3, step=30).to_state_dict()
    assert record["format_version"] == TRAIN_FORMAT_VERSION
    assert _train_record(record, "run/checkpoints/30").epoch == 3
    with pytest.raises(DataError, match=rf"run/checkpoints/30: training state format version "
                                        rf"{TRAIN_FORMAT_VERSION + 1}; .* reads version {TRAIN_FORMAT_VERSION}: "
                                        "it was written by a newer torch2flax"):
        _train_record({**record, "format_version": TRAIN_FORMAT_VERSION + 1}, "run/checkpoints/30")
