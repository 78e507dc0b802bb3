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
    # ... and a bare replicated msgpack (plain flax.serialization) is unreplicated on load.
    from flax import serialization

    (tmp_path / "bare.msgpack").write_bytes(serialization.to_bytes(
        jax.tree.map(lambda a: np.stack([a, a, a]), jax.device_get(variables))))
    (tmp_path / "bare.msgpack.json").write_text((tmp_path / "m.msgpack.json").read_text())
    _, v4 = load(tmp_path / "bare.msgpack")
    assert jax.tree.map(np.shape, v4) == jax.tree.map(np.shape, variables)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), v4, variables)))


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
    """A `best.msgpack` written by torch2flax 0.1.0 (before the namespace move and the typed
    training checkpoint): resnet18 at layers (1, 1, 1, 1), 3 classes, with the trainer's
    untyped `extra` (image size 32, crop 0.875). Its values are a period-7 pattern, offset per
    tensor, so the fixture gzips to 50 KB; `_pattern` regenerates them."""
    path = tmp_path / "old_best.msgpack"
    path.write_bytes(gzip.decompress((DATA / "resnet18_l1111_v0.1.0.msgpack.gz").read_bytes()))
    return path


def _pattern(shapes):
    import jax

    leaves, tree = jax.tree_util.tree_flatten(shapes)
    values = [((np.arange(int(np.prod(s.shape))) + i) % 7 / 7.0 - 0.4).astype(np.float32).reshape(s.shape) * 0.1
              for i, s in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(tree, values)


@pytest.mark.slow
def test_a_file_written_before_the_namespace_move_still_loads(tmp_path):
    import jax

    from torch2flax import load
    from torch2flax.converter import flax_layers
    from torch2flax.train.checkpoint import DataSpec, load_checkpoint

    path = _old_file(tmp_path)
    module, variables = load(path)
    assert (module.layers, module.num_classes, module.pretrained_cfg["architecture"]) == ((1, 1, 1, 1), 3, "resnet18")
    shapes, _ = flax_layers(module)
    want = _pattern({k: shapes[k] for k in ("params", "batch_stats")})
    want["batch_stats"] = jax.tree.map(lambda a: np.abs(a) + 0.5, want["batch_stats"])
    from flax.traverse_util import flatten_dict

    got, want = flatten_dict(dict(variables)), flatten_dict(want)
    assert got.keys() == want.keys() and len(got) > 40
    assert all(np.array_equal(np.asarray(got[k]), want[k]) for k in want)
    logits = np.asarray(module.apply(variables, np.ones((2, 32, 32, 3), np.float32)))
    assert logits.shape == (2, 3) and np.isfinite(logits).all()
    # The trainer's old, untyped `extra` reads back as a typed checkpoint.
    _, _, saved = load_checkpoint(path)
    assert saved.data == DataSpec(image_size=32, crop_pct=0.875) and saved.epoch == 0
    assert saved.best_macro_f1 == 0.5 and saved.opt_state is None


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
