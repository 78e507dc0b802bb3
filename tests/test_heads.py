"""Add-on heads: `with_head`, the shipped MLP and GeM heads, spec strings, save/load, training."""
from __future__ import annotations

import csv
import json
from typing import Any

import flax.linen as nn  # conftest has set XLA_FLAGS already: importing jax here is safe
import numpy as np
import pytest

from tests.helpers import REDUCED_RESNET18, write_flower_splits

NUM_CLASSES = 4
SIZE = 32


def _leaves_equal(a, b) -> bool:
    """The same variable paths (FrozenDict or dict alike), every leaf bit-identical with the same dtype."""
    from flax.core import unfreeze
    from flax.traverse_util import flatten_dict

    fa, fb = flatten_dict(unfreeze(a)), flatten_dict(unfreeze(b))
    return fa.keys() == fb.keys() and len(fa) > 0 and all(
        np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype and np.array_equal(fa[k], fb[k]) for k in fa)


@pytest.fixture(scope="module")
def small():
    """A reduced resnet18 (one block per stage) without its classifier."""
    import torch

    import torch2flax

    torch.manual_seed(0)
    return torch2flax.convert("resnet18", layers=[1, 1, 1, 1], num_classes=0)


@pytest.mark.slow
def test_a_model_with_an_add_on_head_is_refused_by_export_timm_and_its_backbone_is_not(small, tmp_path):
    import numpy as np
    import torch

    import torch2flax
    from torch2flax.errors import ConfigError

    module, variables = small
    model, both = torch2flax.with_head(module, variables, torch2flax.MLPHead(num_classes=3, hidden=16))
    with pytest.raises(ConfigError, match="add-on head \\(MLPHead\\) has no timm twin; its backbone has"):
        torch2flax.save_timm(tmp_path / "m.safetensors", model, both)
    assert not (tmp_path / "m.safetensors").exists()
    name, kwargs = torch2flax.save_timm(tmp_path / "b.pth", module, variables)  # .pth: torch.save
    assert name == "resnet18" and kwargs["num_classes"] == 0 and kwargs["layers"] == [1, 1, 1, 1]
    state = torch.load(tmp_path / "b.pth", weights_only=True)
    assert np.array_equal(state["conv1.weight"].numpy(),
                          np.asarray(variables["params"]["conv1"]["kernel"]).transpose(3, 2, 0, 1))
    with pytest.raises(ConfigError, match=r"b\.npz: a timm state dict is a \.safetensors or \.pth"):
        torch2flax.save_timm(tmp_path / "b.npz", module, variables)


@pytest.mark.slow
def test_with_head_keeps_the_backbone_bit_identical(small):
    import jax

    import torch2flax
    from torch2flax.heads import HeadModel, MLPHead

    module, variables = small
    model, both = torch2flax.with_head(module, variables, MLPHead(NUM_CLASSES, hidden=32), seed=3)
    assert isinstance(model, HeadModel) and model.num_classes == NUM_CLASSES
    assert model.pretrained_cfg is module.pretrained_cfg
    for c in ("params", "batch_stats"):
        assert _leaves_equal(both[c]["backbone"], variables[c])
    head = jax.tree.map(np.shape, dict(both["params"]["head"]))
    assert head == {"fc1": {"kernel": (512, 32)}, "norm": {"scale": (32,), "bias": (32,)},
                    "fc2": {"kernel": (32, NUM_CLASSES), "bias": (NUM_CLASSES,)}}
    assert set(both["batch_stats"]["head"]["norm"]) == {"mean", "var"}
    # The head is initialised from PRNGKey(seed) on an input of the backbone's feature width.
    key = jax.random.PRNGKey(3)
    init = model.head.init({"params": key, "dropout": key}, np.zeros((1, 512), np.float32))
    assert _leaves_equal(both["params"]["head"], init["params"])

    # In eval mode the model is the head applied to the backbone's pooled features.
    x = np.random.default_rng(0).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
    pooled = module.apply(variables, x)  # num_classes=0: ResNet returns pooled features
    want = model.head.apply({"params": both["params"]["head"], "batch_stats": both["batch_stats"]["head"]}, pooled)
    np.testing.assert_allclose(np.asarray(model.apply(both, x)), np.asarray(want), rtol=1e-5, atol=1e-6)

    # The trainer's clone(dtype=..., axis_name=...) reaches the backbone and the head.
    import jax.numpy as jnp

    clone = model.clone(dtype=jnp.bfloat16, axis_name="batch")
    assert clone.backbone.dtype == jnp.bfloat16 and clone.head.dtype == jnp.bfloat16
    assert clone.backbone.axis_name == "batch" and clone.head.axis_name == "batch"
    assert hash(model.clone()) == hash(model) and model.clone() == model


def test_parse_head_specs_and_errors():
    from torch2flax.heads import GeMHead, MLPHead, parse_head

    assert parse_head("mlp", 5) == MLPHead(5)
    assert parse_head("mlp:256", 5) == MLPHead(5, hidden=256)
    assert parse_head(" MLP:512, dropout=0.25 ,act=silu", 5) == MLPHead(5, hidden=512, dropout=0.25, act="silu")
    assert parse_head("mlp:hidden=64,norm=false", 2) == MLPHead(2, hidden=64, norm=False)
    assert parse_head("gem", 3) == GeMHead(3)
    assert parse_head("gem:p=4,dropout=0.2", 3) == GeMHead(3, p=4.0, dropout=0.2)
    assert parse_head("gem:2.5,learn_p=0", 3) == GeMHead(3, p=2.5, learn_p=False)
    errors = {
        "attention": "unknown head 'attention'; choices: mlp, gem",
        "mlp:512,drop=0.3": "mlp has no setting 'drop'; choices: hidden, dropout, act, norm",
        "mlp:512,0.3": "'0.3' is not key=value",
        "mlp:wide": "'wide' needs a int value",
        "gem:p=3,p=4": "'p' is given twice",
        "mlp:act=tanh": "act='tanh'; choices: relu, silu, gelu",
        "gem:learn_p=maybe": "'learn_p=maybe' needs a bool value",
    }
    for spec, message in errors.items():
        with pytest.raises(ValueError) as exc:
            parse_head(spec, 3)
        assert message in str(exc.value) and repr(spec) in str(exc.value), (spec, str(exc.value))


def test_head_flag_reaches_the_config():
    import argparse

    from torch2flax.train.cli import _add_config_flags, config_from_args

    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--resume")
    _add_config_flags(parser)
    base = ["--train", "a", "--val", "b", "--num-classes", "3"]
    assert config_from_args(parser.parse_args(base + ["--head", "mlp:512,dropout=0.3"])).head == "mlp:512,dropout=0.3"
    assert config_from_args(parser.parse_args(base)).head is None


def test_gem_matches_the_formula_and_p_learns():
    import jax
    import jax.numpy as jnp

    from torch2flax.heads import GeMHead, gem

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)  # negatives: clamped to eps
    for p in (1.0, 3.0, 7.5):
        want = (np.maximum(x.astype(np.float64), 1e-6) ** p).mean(axis=(1, 2)) ** (1 / p)
        np.testing.assert_allclose(np.asarray(gem(x, p)), want, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(gem(x, 1.0)), np.maximum(x, 1e-6).mean(axis=(1, 2)), rtol=1e-6)

    head = GeMHead(num_classes=3)
    variables = head.init(jax.random.PRNGKey(0), jnp.asarray(x))
    assert float(variables["params"]["p"][0]) == 3.0

    def loss(params):
        return jnp.sum(head.apply({"params": params}, x) ** 2)

    grad = jax.grad(loss)(variables["params"])["p"]
    eps = 1e-2
    plus = {**variables["params"], "p": variables["params"]["p"] + eps}
    minus = {**variables["params"], "p": variables["params"]["p"] - eps}
    numeric = (loss(plus) - loss(minus)) / (2 * eps)
    assert abs(float(grad[0])) > 1e-3
    np.testing.assert_allclose(float(grad[0]), float(numeric), rtol=2e-2)
    fixed = GeMHead(num_classes=3, learn_p=False)
    assert "p" not in fixed.init(jax.random.PRNGKey(0), jnp.asarray(x))["params"]


def _token_backbone():
    """A stand-in backbone whose features are tokens (B, N, C), like a ViT's."""
    import jax
    import jax.numpy as jnp

    from torch2flax.models import PretrainedCfg

    class Tokens(nn.Module):
        num_classes: int = 0
        in_chans: int = 3
        dtype: Any = jnp.float32
        axis_name: str | None = None
        pretrained_cfg: Any = PretrainedCfg(architecture="tiny_tokens", input_size=(3, 16, 16))

        @nn.compact
        def forward_features(self, x, train=False):
            b, h, w, c = x.shape
            return nn.Dense(8, name="embed")(x.reshape(b, h * w // 16, 16 * c))

        def forward_head(self, x, train=False, pre_logits=False):
            return x[:, 0]

        def __call__(self, x, train=False):
            return self.forward_head(self.forward_features(x, train), train)

    module = Tokens()
    return module, module.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), method="forward_features")


def test_gem_on_token_features_says_which_model_and_what_to_use():
    import torch2flax
    from torch2flax.heads import GeMHead, MLPHead

    module, variables = _token_backbone()
    with pytest.raises(ValueError, match=r"GeMHead reads a 4-D NHWC feature map, but tiny_tokens's "
                                         r"forward_features returns shape \(1, 16, 8\).*--head mlp"):
        torch2flax.with_head(module, variables, GeMHead(3))
    model, both = torch2flax.with_head(module, variables, MLPHead(3, hidden=4))  # pooled: the first token
    assert both["params"]["head"]["fc1"]["kernel"].shape == (8, 4)
    assert model.apply(both, np.ones((2, 16, 16, 3), np.float32)).shape == (2, 3)


class ScaledLinear(nn.Module):
    """A user's own head, importable from this test module: pooled features -> scale * Dense."""

    num_classes: int
    scale: float = 2.0
    widths: tuple = (3, 4)  # saved as a JSON list, rebuilt as a tuple

    @nn.compact
    def __call__(self, x, train: bool = False):
        return self.scale * nn.Dense(self.num_classes, name="out")(x)


@pytest.mark.slow
def test_custom_head_saves_and_loads_and_a_notebook_head_is_passed_explicitly(small, tmp_path):
    from flax import serialization

    import torch2flax

    module, variables = small
    head = ScaledLinear(3, scale=0.5)
    model, both = torch2flax.with_head(module, variables, head, seed=1)
    path = tmp_path / "custom.msgpack"
    torch2flax.save(path, model, both)
    side = json.loads((tmp_path / "custom.msgpack.json").read_text())
    assert side["model"] == "resnet18" and side["kwargs"]["num_classes"] == 0
    assert side["head"] == {"module": "tests.test_heads", "qualname": "ScaledLinear",
                            "kwargs": {"num_classes": 3, "scale": 0.5, "widths": [3, 4]}}

    loaded, loaded_vars = torch2flax.load(path)
    assert loaded == model and hash(loaded) == hash(model)
    assert _leaves_equal(loaded_vars, both)
    x = np.random.default_rng(1).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
    out = np.asarray(model.apply(both, x))
    assert np.array_equal(np.asarray(loaded.apply(loaded_vars, x)), out)

    # The same file as if the head had been defined in a notebook: not importable here.
    state = serialization.msgpack_restore(path.read_bytes())
    config = json.loads(state["config"])
    config["head"].update(module="__main__", qualname="NotebookHead")
    state["config"] = json.dumps(config)
    nb = tmp_path / "notebook.msgpack"
    nb.write_bytes(serialization.msgpack_serialize(state))
    with pytest.raises(ValueError, match=r"notebook\.msgpack: its head class NotebookHead was defined in the "
                                         r"__main__ .*torch2flax\.load\(path, head=NotebookHead\(\.\.\.\)\)"):
        torch2flax.load(nb)
    given, given_vars = torch2flax.load(nb, head=ScaledLinear(3, scale=0.5))
    assert np.array_equal(np.asarray(given.apply(given_vars, x)), out)
    # A head that does not fit the saved variables is refused, naming the variable.
    with pytest.raises(ValueError, match=r"params/head/out/(bias|kernel) has shape \((512, )?3,?\), "
                                         r"the model expects \((512, )?5,?\)"):
        torch2flax.load(nb, head=ScaledLinear(5))


def test_init_model_converts_the_backbone_without_its_classifier():
    from torch2flax.heads import GeMHead, HeadModel
    from torch2flax.train import TrainConfig
    from torch2flax.train.trainer import init_model

    config = TrainConfig(train="x", val="y", num_classes=3, model="resnet18", image_size=SIZE,
                         head="gem:p=2", drop_rate=0.2)
    module, variables, reinitialized = init_model(config)
    assert isinstance(module, HeadModel) and module.head == GeMHead(3, p=2.0)
    assert module.backbone.num_classes == 0 and "fc" not in variables["params"]["backbone"]
    assert module.backbone.drop_rate == 0.2
    assert reinitialized == ("head.p", "head.fc.kernel", "head.fc.bias")
    assert variables["params"]["head"]["fc"]["kernel"].shape == (512, 3)


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    return write_flower_splits(tmp_path_factory.mktemp("flowers"), train=256, val=70, test=21,
                               num_classes=NUM_CLASSES, size=SIZE, shards=(2, 1, 1))


# slow: a fit; core: a training test every stack runs
@pytest.mark.slow
@pytest.mark.core
def test_mlp_head_trains_saves_loads_and_predicts(small, flowers, tmp_path):
    """From a reduced resnet18 file (test_train.py's quarter-width model) with its 1000-class
    classifier: the trainer drops the classifier, adds the MLP head and learns; `best.msgpack`
    loads and predicts."""
    import torch2flax
    from torch2flax.heads import HeadModel, MLPHead
    from torch2flax.train import TrainConfig, fit, predict

    sets, globs = flowers
    import torch

    torch.manual_seed(0)
    init = tmp_path / "r18_l1111.msgpack"
    torch2flax.save(init, *torch2flax.convert("resnet18", **REDUCED_RESNET18))  # 1000 classes
    out = tmp_path / "run"
    config = TrainConfig(train=globs["train"], val=globs["val"], num_classes=NUM_CLASSES, init=str(init),
                         head="mlp:64,dropout=0.1", image_size=SIZE, crop_pct=1.0, scale_min=0.5,
                         batch_size=32, epochs=5, lr=3e-3, warmup_epochs=0.5, num_workers=0, num_devices=1,
                         seed=0, out=str(out))
    result = fit(config, progress=False)
    history = result.history
    assert result.reinitialized == ("head.fc1.kernel", "head.norm.scale", "head.norm.bias",
                                    "head.fc2.kernel", "head.fc2.bias")
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"], history
    assert result.best_macro_f1 >= 0.9, history
    # The checkpoint resumes (model, head and optimiser state rebuilt): nothing is left to run.
    again = fit(config, resume=True, progress=False)
    assert [r["epoch"] for r in again.history] == [0, 1, 2, 3, 4] and again.best_macro_f1 == result.best_macro_f1

    model, variables = torch2flax.load(out / "best.msgpack")
    assert isinstance(model, HeadModel) and model.head == MLPHead(NUM_CLASSES, hidden=64, dropout=0.1)
    assert "fc" not in variables["params"]["backbone"] and model.backbone.num_classes == 0
    sub = tmp_path / "submission.csv"
    pred = predict(str(out / "best.msgpack"), globs["test"], str(sub), batch_size=8, num_workers=0,
                   progress=False)
    with open(sub) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "label"] and [r[0] for r in rows[1:]] == sets["test"].ids
    assert pred.probs.shape == (21, NUM_CLASSES) and np.allclose(pred.probs.sum(1), 1.0, atol=1e-5)
    assert [int(r[1]) for r in rows[1:]] == list(pred.probs.argmax(1))


# slow: an exported architecture
@pytest.mark.slow
def test_gem_head_on_an_exported_backbone_runs_saves_and_loads(tmp_path):
    """timm's `test_convnext` (no native twin: an exported graph) under a GeM head."""
    import jax

    import torch2flax
    from torch2flax.heads import GeMHead

    module, variables = torch2flax.convert("test_convnext", backend="export", image_size=SIZE, num_classes=0)
    model, both = torch2flax.with_head(module, variables, GeMHead(3, p=2.0))
    assert _leaves_equal(both["params"]["backbone"], variables["params"])
    assert jax.tree.map(np.shape, dict(both["params"]["head"])) == {"p": (1,), "fc": {"kernel": (64, 3), "bias": (3,)}}
    x = np.random.default_rng(2).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
    # Jitted with the module static: the loaded model, equal to the original, reuses the program.
    run = jax.jit(lambda m, v, x: m.apply(v, x), static_argnums=0)
    logits = np.asarray(run(model, both, x))
    assert logits.shape == (2, 3) and np.isfinite(logits).all()
    torch2flax.save(tmp_path / "cx.msgpack", model, both)
    side = json.loads((tmp_path / "cx.msgpack.json").read_text())
    assert side["backend"] == "export" and side["head"]["qualname"] == "GeMHead"
    loaded, loaded_vars = torch2flax.load(tmp_path / "cx.msgpack")
    assert loaded == model and hash(loaded) == hash(model)
    assert np.array_equal(np.asarray(run(loaded, loaded_vars, x)), logits)
    # Intermediate features and Grad-CAM reach into the exported backbone under the head.
    from torch2flax.features import feature_info, forward_intermediates
    from torch2flax.train.explain import gradcam

    last = feature_info(module)[-1].name
    _, ref = forward_intermediates(module, variables, x, last)
    out, feats = forward_intermediates(model, both, x, f"backbone.{last}")
    assert [f.name for f in feature_info(model)] == [f"backbone.{f.name}" for f in feature_info(module)]
    np.testing.assert_array_equal(np.asarray(feats[f"backbone.{last}"]), np.asarray(ref[last]))
    np.testing.assert_allclose(np.asarray(out), logits, rtol=1e-6, atol=1e-6)
    heat = np.asarray(gradcam(model, both, x, layer=f"backbone.{last}", target=1))
    assert heat.shape == (2, SIZE, SIZE) and 0.0 <= heat.min() and heat.max() <= 1.0 + 1e-6
