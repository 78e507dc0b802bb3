"""The exported-graph backend (`torch2flax.export`) beyond per-architecture parity (test_export.py):
a reduced ResNet exported against its native twin (eval, a training step, bfloat16, sync BN,
dropout), methods and the config rebuild, `torch2flax.convert`'s backend choice, save/load and
another image size. A file of its own so that `--dist loadfile` can run it beside the parity tests.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import randomize_batchnorm

# slow: exported graphs compiled; core: parity tests every stack runs
pytestmark = [pytest.mark.slow, pytest.mark.core]

# ---------------------------------------------------------------------- a reduced ResNet: native vs exported


def _resnet(**kwargs):
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("resnet18", layers=(1, 1, 1, 1), num_classes=10, **kwargs)
    return randomize_batchnorm(model, seed=2).eval()


@pytest.fixture(scope="module")
def resnet():
    """A 1-block-per-stage timm ResNet, its exported and its native conversion."""
    import torch

    import torch2flax
    from torch2flax.export import convert_exported

    torch.set_num_threads(1)
    model = _resnet()
    native_module, native_vars = torch2flax.convert(model)
    module, variables = convert_exported(model, image_size=32)
    return model, module, variables, native_module, native_vars


def test_resnet_exported_equals_native(resnet):
    import jax

    _, module, variables, native_module, native_vars = resnet
    x = np.random.default_rng(3).standard_normal((4, 32, 32, 3)).astype(np.float32)
    got = jax.jit(module.apply)(variables, x)
    ref = jax.jit(native_module.apply)(native_vars, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5 * max(1.0, float(np.abs(ref).max())))

    # One training-mode step: same logits, same updated running statistics (PyTorch's unbiased variance).
    train = lambda m, v: m.apply(v, x, train=True, mutable=["batch_stats"])
    out, state = jax.jit(lambda v: train(module, v))(variables)
    ref_out, ref_state = jax.jit(lambda v: train(native_module, v))(native_vars)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-4, atol=1e-4)
    for path in (("bn1",), ("layer1", "0", "bn2"), ("layer4", "0", "downsample", "1")):
        got_bn, ref_bn = state["batch_stats"], ref_state["batch_stats"]
        for p in path:
            got_bn, ref_bn = got_bn[p], ref_bn[p]
        np.testing.assert_allclose(got_bn["running_mean"], ref_bn["mean"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got_bn["running_var"], ref_bn["var"], rtol=1e-4, atol=1e-6)


def test_bfloat16_compute(resnet):
    import jax
    import jax.numpy as jnp

    _, module, variables, _, _ = resnet
    x = np.random.default_rng(6).standard_normal((2, 32, 32, 3)).astype(np.float32)
    ref = np.asarray(module.apply(variables, x))
    got = jax.jit(module.clone(dtype=jnp.bfloat16).apply)(variables, x)
    assert got.dtype == jnp.bfloat16
    assert np.abs(np.asarray(got, np.float32) - ref).max() <= 0.05 * max(1.0, np.abs(ref).max())


def test_sync_batchnorm_8_devices_equal_1(resnet, devices):
    import jax
    from flax import jax_utils

    _, module, variables, _, _ = resnet
    n, x = len(devices), np.random.default_rng(5).standard_normal((16, 32, 32, 3)).astype(np.float32)

    def step(m, v, x):
        out, state = m.apply(v, x, train=True, mutable=["batch_stats"])
        return out, state["batch_stats"]

    ref_out, ref_stats = jax.jit(lambda v, x: step(module, v, x))(variables, x)
    synced = module.clone(axis_name="batch")
    pstep = jax.pmap(lambda v, x: step(synced, v, x), axis_name="batch", devices=devices)
    out, stats = pstep(jax_utils.replicate(variables, devices), x.reshape(n, 16 // n, *x.shape[1:]))
    np.testing.assert_allclose(np.asarray(out).reshape(16, -1), ref_out, rtol=1e-4, atol=1e-5)
    for got, ref in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(ref_stats)):
        for g in np.asarray(got):  # every device holds the global statistics
            np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)


def test_dropout_draws_from_the_rng_stream():
    import jax

    from torch2flax.export import convert_exported

    model = _resnet(drop_rate=0.5, drop_path_rate=0.3)
    module, variables = convert_exported(model, image_size=32)
    x = np.random.default_rng(4).standard_normal((4, 32, 32, 3)).astype(np.float32)
    step = jax.jit(lambda v, x, key: module.apply(v, x, train=True, mutable=["batch_stats"],
                                                  rngs={"dropout": key})[0])
    a, b, a2 = (np.asarray(step(variables, x, jax.random.key(k))) for k in (0, 1, 0))
    assert not np.allclose(a, b)  # a new key each step: new masks
    np.testing.assert_array_equal(a, a2)  # the masks are a function of the key
    e1, e2 = (np.asarray(module.apply(variables, x)) for _ in range(2))
    np.testing.assert_array_equal(e1, e2)  # eval graph: no random ops
    with pytest.raises(Exception, match="dropout"):
        module.apply(variables, x, train=True, mutable=["batch_stats"])


# ---------------------------------------------------------------------- methods, rebuilding


def test_features_head_and_config_rebuild():
    """Methods split like timm's, the inverse conversion, and a module equal to itself from its JSON config."""
    import json

    import torch

    from torch2flax.export import ExportedModel, convert_exported, timm_from_exported

    module, variables = convert_exported("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                                         num_classes=5, image_size=32)
    x = np.random.default_rng(7).standard_normal((2, 32, 32, 3)).astype(np.float32)
    logits = np.asarray(module.apply(variables, x))
    feats = module.apply(variables, x, method="forward_features")
    assert feats.shape == (2, 1, 1, 32)  # NHWC, like the native models
    np.testing.assert_allclose(module.apply(variables, feats, method="forward_head"), logits, rtol=1e-5, atol=1e-6)
    pre = module.apply(variables, feats, pre_logits=True, method="forward_head")
    assert pre.shape == (2, 32)

    # The inverse conversion gives timm the same weights.
    ref = timm_from_exported(module, variables)
    with torch.no_grad():
        np.testing.assert_allclose(ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy(), logits, atol=1e-5)

    config = json.loads(json.dumps(module.config()))
    rebuilt = ExportedModel.from_config(config)  # the graph is re-exported on use: see the save/load test
    assert rebuilt == module and hash(rebuilt) == hash(module)


# ---------------------------------------------------------------------- torch2flax.convert, save/load, training


def test_convert_chooses_the_backend_and_save_load_rebuilds_the_graph(tmp_path):
    import json

    import jax

    import torch2flax
    from torch2flax.export import ExportedModel, model

    native = torch2flax.convert("resnet18", layers=[1, 1, 1, 1])
    assert type(native.module).__name__ == "ResNet"
    exported = torch2flax.convert("resnet18", backend="export", image_size=32, layers=[1, 1, 1, 1])
    assert isinstance(exported.module, ExportedModel) and exported.module.image_size == (32, 32)
    with pytest.raises(ValueError, match="unknown model 'vit_tiny_patch16_224'"):
        torch2flax.convert("vit_tiny_patch16_224", backend="native")

    # auto: no native twin, so the exported graph; a fixed-size ViT is built at the size asked for.
    module, variables = torch2flax.convert("vit_tiny_patch16_224", num_classes=3, image_size=32, depth=1)
    assert isinstance(module, ExportedModel) and dict(module.timm_kwargs) == {"depth": 1, "img_size": 32}
    assert set(variables) == {"params"}  # no BatchNorm, no batch_stats
    assert {"pos_embed", "cls_token"} <= module.no_weight_decay()
    x = np.random.default_rng(8).standard_normal((2, 32, 32, 3)).astype(np.float32)
    logits = np.asarray(module.apply(variables, x))

    path = tmp_path / "vit.msgpack"
    torch2flax.save(path, module, variables)
    side = json.loads((tmp_path / "vit.msgpack.json").read_text())
    assert side["backend"] == "export" and side["model"] == "vit_tiny_patch16_224"
    model.CACHE.clear()  # load must rebuild the graph from timm
    loaded, loaded_vars = torch2flax.load(path)
    assert loaded == module
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), loaded_vars, variables)))
    np.testing.assert_array_equal(np.asarray(loaded.apply(loaded_vars, x)), logits)

    # A graph that another torch/timm exported differently: the error names both sides' versions.
    import timm
    import torch

    from torch2flax import io

    here = {"torch": torch.__version__.split("+")[0], "timm": timm.__version__}
    assert side["exported_with"] == here
    payload = io.read_payload(path)
    config = {**json.loads(payload["config"]), "exported_with": {"torch": "2.99.0", "timm": "9.9.9"}}
    variables = {**payload["variables"], "params": {**payload["variables"]["params"], "extra": np.zeros(3)}}
    io.write_payload(tmp_path / "other.msgpack", {"config": json.dumps(config), "variables": variables})
    with pytest.raises(ValueError, match=r"unexpected \['params/extra'\].*exported with torch 2\.99\.0, timm "
                       rf"9\.9\.9; this process re-exported it with torch {here['torch']}, timm {here['timm']}"):
        torch2flax.load(tmp_path / "other.msgpack")


def test_another_image_size_re_exports_with_timm_position_embedding_resampling():
    """A converted model called at another size runs that size's graph, same variables: a ViT
    through timm's `dynamic_img_size` (its position embeddings resampled by timm's bicubic,
    antialiased `resample_abs_pos_embed`), a CNN converted from an instance by re-exporting it."""
    import jax
    import timm
    import torch

    import torch2flax
    from torch2flax.export import convert_exported, timm_from_exported

    torch.manual_seed(0)
    module, variables = torch2flax.convert("vit_tiny_patch16_224", num_classes=3, image_size=32, depth=1)
    for size in (48,):  # position-embedding grid 2x2 -> 3x3 (downsampling: test_ops' antialiased cases)
        x = np.random.default_rng(size).standard_normal((2, size, size, 3)).astype(np.float32)
        got = np.asarray(jax.jit(module.apply)(variables, x))
        ref = timm_from_exported(module, variables)  # the converted weights in timm, 32 px grid
        dynamic = timm.create_model("vit_tiny_patch16_224", num_classes=3, depth=1, img_size=32,
                                    dynamic_img_size=True).eval()
        dynamic.load_state_dict(ref.state_dict())
        with torch.no_grad():
            want = dynamic(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, float(np.abs(want).max())))

    model = randomize_batchnorm(timm.create_model("resnet18", layers=[1, 1, 1, 1], num_classes=4), seed=2).eval()
    module, variables = convert_exported(model, image_size=32)
    x = np.random.default_rng(1).standard_normal((2, 40, 40, 3)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(np.asarray(module.apply(variables, x)), want, atol=1e-4 * max(1.0, np.abs(want).max()))


def test_a_model_without_drop_path_rate_trains_and_setting_it_is_the_users_error():
    """GhostNet takes no drop_path_rate and no **kwargs in timm 1.0.12 to 1.0.31 (ConvMixer, where
    the TPU coverage sweep's train step failed with a TypeError, swallows it in 1.0.12): the run's
    defaults (0) must not pass one to timm, and setting one is a ConfigError naming it."""
    from torch2flax import prepare_model
    from torch2flax.errors import ConfigError

    kw = dict(num_classes=3, backend="export", image_size=32)
    converted = prepare_model("ghostnet_050", **kw)
    assert converted.module.num_classes == 3 and "drop_path_rate" not in dict(converted.module.timm_kwargs)
    with pytest.raises(ConfigError, match="drop_path_rate"):
        prepare_model("ghostnet_050", drop_path_rate=0.1, **kw)


def test_the_train_graph_is_exported_at_the_first_training_step_of_a_users_own_loop():
    """`convert` exports the eval graph only; a hand-written jitted step (a notebook's loop) exports
    the train graph inside its first trace, and the program it caches must not hold that trace's
    values: the second step once failed with "Execution supplied 63 arguments but compiled program
    expected 76" (the BatchNorm step counters, made as tracers of the first trace)."""
    import jax

    import torch2flax
    from torch2flax.export import model

    module, variables = torch2flax.convert("resnet18", backend="export", image_size=32, layers=[1, 1, 1, 1],
                                           num_classes=3)
    def exported(train: bool) -> set:
        return {spec for spec, _, mode in model.CACHE._programs if mode == train}

    assert module.spec in exported(False) and module.spec not in exported(True)

    def loss(params, stats, x):
        out, updates = module.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        return (out**2).mean(), updates["batch_stats"]

    @jax.jit
    def step(params, stats, x):
        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params, stats, x)
        return jax.tree_util.tree_map(lambda p, g: p - 1e-3 * g, params, grads), stats, value

    params, stats = variables["params"], variables["batch_stats"]
    x = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)
    losses = []
    for _ in range(3):
        params, stats, value = step(params, stats, x)
        losses.append(float(value))
    assert module.spec in exported(True)
    assert losses[2] < losses[1] < losses[0], losses  # small steps down the gradient
