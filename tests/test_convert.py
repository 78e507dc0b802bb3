"""The converter: unknown names, bad checkpoints, strict mapping both ways, new heads, the module contract."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import save_pth as _save_pth

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
    from torch2flax.converter import convert
    from torch2flax.models import get_entry
    from torch2flax.native import build_rules, flax_layers, torch_to_flax

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


# slow: full-size resnet18s
@pytest.mark.slow
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


@pytest.mark.slow
def test_module_contract_fields_and_bfloat16():
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

    import timm

    from tests.helpers import randomize_batchnorm

    model = randomize_batchnorm(timm.create_model("resnet18", layers=[1, 1, 1, 1]), seed=3).eval()
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
