"""Converter errors, checkpoint formats, save/load, the CLI from the shell, and the layers' semantics."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import console_script


@pytest.fixture(scope="module")
def r18():
    """A timm resnet18 with randomised BN and its state dict."""
    import timm
    import torch

    from tests.helpers import randomize_batchnorm

    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model("resnet18", pretrained=False), seed=2).eval()
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _save_pth(path, obj):
    import torch

    torch.save(obj, path)
    return path


# ---------------------------------------------------------------- errors


def test_unknown_model_name_lists_close_matches():
    from torch2flax import convert, create_model

    for call in (lambda: convert("resnet5"), lambda: create_model("resnt50")):
        with pytest.raises(ValueError) as exc:
            call()
        msg = str(exc.value)
        assert "unknown model" in msg and "resnet50" in msg


@pytest.mark.parametrize("defect", ["missing", "extra", "shape"])
def test_bad_checkpoint_names_the_key(r18, tmp_path, defect):
    import torch

    from torch2flax import convert

    _, state = r18
    state = dict(state)
    if defect == "missing":
        key = "layer2.1.bn1.running_var"
        del state[key]
    elif defect == "extra":
        key = "layer5.0.conv1.weight"
        state[key] = torch.zeros(3)
    else:
        key = "layer1.0.conv2.weight"
        state[key] = torch.zeros(64, 64, 5, 5)
    ckpt = _save_pth(tmp_path / "bad.pth", state)
    with pytest.raises(ValueError) as exc:
        convert("resnet18", checkpoint=ckpt)
    msg = str(exc.value)
    assert key in msg and "bad.pth" in msg
    if defect == "shape":
        assert "(64, 64, 5, 5)" in msg and "(64, 64, 3, 3)" in msg


def test_generic_mapping_is_strict_both_ways(r18):
    from torch2flax.convert import build_rules, convert, flax_layers, torch_to_flax
    from torch2flax.models import get_entry

    model, state = r18
    module, _ = convert(model)
    shapes, layers = flax_layers(module)
    rules = build_rules(model, layers, get_entry("resnet18").torch_module_types)
    with pytest.raises(ValueError, match=r"missing torch key 'layer3.0.downsample.1.running_mean'.*"
                                         r"batch_stats/layer3/0/downsample/1/mean"):
        torch_to_flax(rules, {k: v for k, v in state.items() if k != "layer3.0.downsample.1.running_mean"}, shapes)
    bad = dict(state, **{"fc.weight": state["fc.weight"][:10]})
    with pytest.raises(ValueError) as exc:
        torch_to_flax(rules, bad, shapes)
    assert "'fc.weight'" in str(exc.value) and "params/fc/kernel" in str(exc.value)
    assert "(10, 512)" in str(exc.value) and "(512, 1000)" in str(exc.value)
    with pytest.raises(ValueError, match="stray.weight"):
        torch_to_flax(rules, dict(state, **{"stray.weight": state["fc.bias"]}), shapes)
    # A Flax leaf no torch tensor fills is an error too.
    with pytest.raises(ValueError, match="params/layer1/0/bn1/scale"):
        torch_to_flax([r for r in rules if r.torch_key != "layer1.0.bn1.weight"],
                      {k: v for k, v in state.items() if k != "layer1.0.bn1.weight"}, shapes)


def test_unsupported_torch_layer_is_named():
    import timm

    from torch2flax import convert

    model = timm.create_model("resnet18", pretrained=False, drop_block_rate=0.1)
    with pytest.raises(ValueError, match=r"layer3\.0\.drop_block.*DropBlock2d"):
        convert(model)


def test_mismatched_layer_hyperparameters_are_named():
    import timm

    from torch2flax import convert

    model = timm.create_model("resnet18", pretrained=False)
    model.layer2[0].conv1.stride = (1, 1)
    with pytest.raises(ValueError, match=r"layer2\.0\.conv1.*stride"):
        convert(model)


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_formats_give_identical_variables(r18, tmp_path):
    import jax
    from safetensors.torch import save_file

    from torch2flax import convert

    model, state = r18
    ref = convert(model).variables
    paths = [
        _save_pth(tmp_path / "plain.pth", state),
        _save_pth(tmp_path / "wrapped.pt", {"state_dict": state, "epoch": 3}),
        _save_pth(tmp_path / "model.bin", {"model": {f"module.{k}": v for k, v in state.items()}}),
    ]
    save_file(state, str(tmp_path / "w.safetensors"))
    paths.append(tmp_path / "w.safetensors")
    for p in paths:
        result = convert("resnet18", checkpoint=p)
        assert result.reinitialized == ()
        same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), result.variables, ref)
        assert all(jax.tree.leaves(same)), p


class _Payload:
    """Stands for code a pickled checkpoint could run on load."""


def test_pickled_code_is_refused(tmp_path):
    from torch2flax import convert

    ckpt = _save_pth(tmp_path / "evil.pth", {"state_dict": {"x": _Payload()}})
    with pytest.raises(ValueError, match="evil.pth.*weights-only"):
        convert("resnet18", checkpoint=ckpt)


def test_unknown_checkpoint_suffix(tmp_path):
    from torch2flax import convert

    p = tmp_path / "w.npz"
    p.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"w\.npz.*\.safetensors"):
        convert("resnet18", checkpoint=p)


def test_new_head_only_reinitialises_the_head(r18, tmp_path):
    import jax

    from torch2flax import convert

    model, state = r18
    ref = convert(model).variables
    result = convert("resnet18", checkpoint=_save_pth(tmp_path / "c.pth", state), num_classes=3)
    assert result.reinitialized == ("fc.weight", "fc.bias")
    assert result.module.num_classes == 3 and result.variables["params"]["fc"]["kernel"].shape == (512, 3)
    body = lambda v: {k: x for k, x in v["params"].items() if k != "fc"}
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                                            body(result.variables), body(ref))))
    # Same class count: nothing re-initialised. Headless output: no head at all.
    assert convert(model, num_classes=1000).reinitialized == ()
    headless = convert(model, num_classes=0)
    assert "fc" not in headless.variables["params"]
    assert headless.module.apply(headless.variables, np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 512)


# ---------------------------------------------------------------- save / load


def test_save_load_round_trip_is_bit_identical(r18, tmp_path):
    import jax
    from flax import jax_utils

    from torch2flax import convert, load, save

    model, _ = r18
    module, variables = convert(model, num_classes=5)
    path = tmp_path / "m.msgpack"
    extra = {"step": np.int64(7), "opt": {"mu": np.arange(4, dtype=np.float32)}}
    written = save(path, module, variables, extra=extra)
    assert written == (str(path), str(path) + ".json")
    assert sorted(os.listdir(tmp_path)) == ["m.msgpack", "m.msgpack.json"]  # no temp files left
    side = json.loads((tmp_path / "m.msgpack.json").read_text())
    assert side["model"] == "resnet18" and side["kwargs"]["num_classes"] == 5

    module2, variables2, extra2 = load(path, with_extra=True)
    assert module2 == module and hash(module2) == hash(module)
    assert jax.tree.structure(variables2) == jax.tree.structure(variables)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a.dtype == b.dtype and bool(np.array_equal(a, b)),
                                            variables2, variables)))
    assert int(extra2["step"]) == 7 and np.array_equal(extra2["opt"]["mu"], extra["opt"]["mu"])
    x = np.random.default_rng(0).standard_normal((2, 40, 40, 3)).astype(np.float32)
    assert np.array_equal(np.asarray(module.apply(variables, x)), np.asarray(module2.apply(variables2, x)))

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


# ---------------------------------------------------------------- CLI


def test_cli_convert_then_verify_from_the_shell(r18, tmp_path):
    import timm
    from safetensors.torch import save_file

    from tests.helpers import randomize_batchnorm

    model = randomize_batchnorm(timm.create_model("resnet50", pretrained=False), seed=4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "x.safetensors"))
    run = lambda *a: subprocess.run([console_script(), *a], cwd=tmp_path, capture_output=True, text=True)

    out = run("convert", "resnet50", "--checkpoint", "x.safetensors", "--out", "r50.msgpack", "--size", "64")
    assert out.returncode == 0, out.stderr
    assert "logits" in out.stdout and "features" in out.stdout and "FAIL" not in out.stdout
    assert "wrote r50.msgpack" in out.stdout and "wrote r50.msgpack.json" in out.stdout
    assert (tmp_path / "r50.msgpack").stat().st_size > 90e6  # 25.6M float32 parameters

    out = run("verify", "r50.msgpack", "--checkpoint", "x.safetensors", "--size", "64")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(" ok ") == 2
    # Without a checkpoint: the msgpack converted back to torch.
    out = run("verify", "r50.msgpack", "--size", "48")
    assert out.returncode == 0 and "converted back to torch" in out.stdout, out.stderr
    # Weights that differ from the msgpack's fail verification with a non-zero exit.
    other = timm.create_model("resnet50", pretrained=False)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "y.safetensors"))
    out = run("verify", "r50.msgpack", "--checkpoint", "y.safetensors", "--size", "48")
    assert out.returncode == 1 and "FAIL" in out.stdout


def test_cli_list_and_unknown_name(capsys):
    from torch2flax.cli import main

    assert main(["list", "resnet1*"]) == 0
    assert capsys.readouterr().out.split() == ["resnet101", "resnet152", "resnet18"]
    assert main(["list", "vit*"]) == 1
    assert main(["convert", "resnt50", "--out", "x.msgpack"]) == 2
    err = capsys.readouterr().err
    assert "resnt50" in err and "resnet50" in err


def test_import_stays_light():
    code = "import sys, torch2flax; print(sorted(m for m in ('jax', 'torch', 'flax', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- layers


CONV_CASES = [  # (H, W, cin, cout, kernel, stride, pad, dilation, groups)
    (2, 2, 16, 24, 3, 1, 1, 1, 1),
    (4, 3, 16, 16, 3, 2, 1, 1, 1),
    (3, 5, 32, 32, 3, 1, 1, 1, 8),
    (5, 5, 8, 16, 7, 2, 3, 1, 1),
    (3, 3, 16, 8, 1, 2, 0, 1, 1),
    (4, 4, 8, 8, 3, 1, 2, 2, 1),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
def test_conv_paths_agree_in_value_and_gradient(case):
    import jax
    import jax.numpy as jnp
    import torch

    from torch2flax.layers import Conv

    h, w, cin, cout, k, s, p, d, g = case
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, h, w, cin)).astype(np.float32))
    matmul = Conv(cout, k, s, p, d, g, use_bias=True, small_map_max_pixels=10**9)
    conv = matmul.clone(small_map_max_pixels=0)
    variables = matmul.init(jax.random.key(0), x)

    def loss(m):
        return lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))

    jaxpr = lambda m: str(jax.make_jaxpr(m.apply)(variables, x))
    assert "conv_general_dilated" not in jaxpr(matmul) and "conv_general_dilated" in jaxpr(conv)
    y_mm, y_cv = matmul.apply(variables, x), conv.apply(variables, x)
    np.testing.assert_allclose(y_mm, y_cv, rtol=1e-5, atol=1e-5)
    g_mm = jax.jit(jax.grad(loss(matmul), argnums=(0, 1)))(variables, x)
    g_cv = jax.jit(jax.grad(loss(conv), argnums=(0, 1)))(variables, x)
    for a, b in zip(jax.tree.leaves(g_mm), jax.tree.leaves(g_cv)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # And both are PyTorch's Conv2d.
    tconv = torch.nn.Conv2d(cin, cout, k, s, p, d, g)
    with torch.no_grad():
        tconv.weight.copy_(torch.from_numpy(np.asarray(variables["params"]["kernel"]).transpose(3, 2, 0, 1).copy()))
        tconv.bias.copy_(torch.from_numpy(np.array(variables["params"]["bias"])))
        ref = tconv(torch.from_numpy(np.array(x).transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(y_mm, ref, rtol=1e-5, atol=1e-5)


def test_small_maps_take_the_matmul_path_by_default():
    import jax
    import jax.numpy as jnp

    from torch2flax.layers import SMALL_MAP_MAX_PIXELS, Conv

    conv = Conv(8, 3, 1, 1)
    side = int(SMALL_MAP_MAX_PIXELS ** 0.5)
    for hw, uses_conv in ((side, False), (side + 1, True)):
        x = jnp.zeros((1, hw, hw, 4))
        v = conv.init(jax.random.key(0), x)
        assert ("conv_general_dilated" in str(jax.make_jaxpr(conv.apply)(v, x))) == uses_conv


def test_batchnorm_matches_torch_training_update():
    import jax
    import torch

    from torch2flax.layers import BatchNorm

    x = np.random.default_rng(0).standard_normal((3, 5, 4, 6)).astype(np.float32) * 2 + 1
    tbn = torch.nn.BatchNorm2d(6, eps=1e-3, momentum=0.2).train()
    with torch.no_grad():
        tbn.weight.uniform_(0.5, 1.5), tbn.bias.normal_(), tbn.running_var.uniform_(0.5, 2), tbn.running_mean.normal_()
    np_ = lambda t: t.detach().numpy().copy()
    v = {"params": {"scale": np_(tbn.weight), "bias": np_(tbn.bias)},
         "batch_stats": {"mean": np_(tbn.running_mean), "var": np_(tbn.running_var)}}
    with torch.no_grad():
        y_t = tbn(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    bn = BatchNorm(momentum=0.8, epsilon=1e-3)
    y_f, upd = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y_f, y_t, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], tbn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], tbn.running_var.numpy(), rtol=1e-5, atol=1e-6)
    # Unbiased, not biased, variance in the running update:
    biased = 0.8 * v["batch_stats"]["var"] + 0.2 * x.reshape(-1, 6).var(0)
    assert np.min(np.abs(np.asarray(upd["batch_stats"]["var"]) - biased)) > 1e-3
    # Eval mode uses the running statistics.
    tbn.eval()
    with torch.no_grad():
        ye_t = tbn(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    ye_f = bn.apply(jax.device_get(dict(v, batch_stats=upd["batch_stats"])), x)
    np.testing.assert_allclose(ye_f, ye_t, rtol=1e-5, atol=1e-5)


def test_sync_batchnorm_equals_global_batch_statistics(devices):
    import jax

    from torch2flax.layers import BatchNorm

    n = len(devices)
    x = np.random.default_rng(1).standard_normal((n * 2, 3, 3, 4)).astype(np.float32) * 3 + 2
    bn = BatchNorm()
    v = bn.init(jax.random.key(0), x)
    y_ref, upd_ref = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    sync = bn.clone(axis_name="batch")
    step = jax.pmap(lambda v, x: sync.apply(v, x, use_running_average=False, mutable=["batch_stats"]),
                    axis_name="batch", devices=devices, in_axes=(None, 0))
    y, upd = step(v, x.reshape(n, 2, 3, 3, 4))
    np.testing.assert_allclose(np.asarray(y).reshape(x.shape), y_ref, rtol=1e-5, atol=1e-5)
    for k in ("mean", "var"):
        np.testing.assert_allclose(np.asarray(upd["batch_stats"][k])[0], upd_ref["batch_stats"][k], rtol=1e-5)


@pytest.mark.parametrize("hw", [(7, 5), (6, 9), (1, 3)])
def test_pooling_matches_torch(hw):
    import torch

    from torch2flax.layers import avg_pool, max_pool

    x = np.random.default_rng(2).standard_normal((2, *hw, 3)).astype(np.float32) - 5  # all negative: -inf pad shows
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    tr = lambda t: t.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(max_pool(x, 3, 2, 1), tr(torch.nn.MaxPool2d(3, 2, 1)(xt)), rtol=1e-6)
    ref = tr(torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)(xt))
    np.testing.assert_allclose(avg_pool(x, 2, 2, ceil_mode=True, count_include_pad=False), ref, rtol=1e-6)
    ref = tr(torch.nn.AvgPool2d(3, 2, 1, count_include_pad=True)(xt))
    np.testing.assert_allclose(avg_pool(x, 3, 2, 1), ref, rtol=1e-6)


def test_module_contract_fields_and_bfloat16(r18):
    import jax
    import jax.numpy as jnp

    from torch2flax import convert, create_model, list_models

    assert list_models("resnet5*") == ["resnet50", "resnet50d"]
    module = create_model("resnet18", num_classes=4, drop_rate=0.2, drop_path_rate=0.1, global_pool="max")
    assert (module.num_classes, module.drop_rate, module.drop_path_rate, module.global_pool) == (4, 0.2, 0.1, "max")
    cfg = module.pretrained_cfg
    assert hash(module) == hash(create_model("resnet18", num_classes=4, drop_rate=0.2, drop_path_rate=0.1,
                                             global_pool="max"))
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["input_size"] == (3, 224, 224)
    assert {"std", "crop_pct", "interpolation"} <= set(cfg)

    model, _ = r18
    m32, v = convert(model)
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    mbf = m32.clone(dtype=jnp.bfloat16)

    def train_loss(p):
        logits, upd = mbf.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                                mutable=["batch_stats"])
        return logits.astype(jnp.float32).sum(), (logits, upd)

    grads, (logits, upd) = jax.jit(jax.grad(train_loss, has_aux=True))(v["params"])
    assert logits.dtype == jnp.bfloat16  # computed in bfloat16 ...
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves((upd, grads)))  # ... float32 state
    ref = np.asarray(m32.apply(v, x))
    assert np.max(np.abs(np.asarray(mbf.apply(v, x), np.float32) - ref)) < 0.1 * np.max(np.abs(ref))
