"""The exported-graph backend (`torch2flax.export`) against timm.

Each architecture is converted once per module (a module-scoped fixture) from a
shrunken timm model with randomised BatchNorm statistics, and checked for eval
parity and for one training step (loss, every gradient, updated batch_stats),
gradients from `jax.grad` against timm's `.backward()`. Deep random-BN nets
are ill-conditioned enough that timm's own float32 gradients differ from
float64 by more than 1e-4; there the bound is twice that measured difference.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import randomize_batchnorm

EVAL_TOL = 1e-4
TRAIN_TOL = 1e-4


def _effnet(variant: str, **kwargs):
    # timm's efficientnet_b0 entry points fix the width/depth multipliers; the generator takes them.
    from timm.models.efficientnet import _gen_efficientnet

    return _gen_efficientnet(variant, channel_multiplier=0.25, depth_multiplier=0.1, num_classes=10, **kwargs)


def _timm(name: str, **kwargs):
    import timm

    return lambda: timm.create_model(name, num_classes=10, drop_rate=0.0, drop_path_rate=0.0, **kwargs)


# name -> (timm model factory, image size): the architectures the issue names, each shrunk through
# timm's own kwargs (depths, widths, image size) to the smallest model that still has every kind of
# block (depthwise/grouped/TF-"same" convs, squeeze-excite, LayerNorm, GELU, window and relative-
# position attention, rotary embeddings, weight-standardised convs), since export and XLA compile
# time grow with the graph.
CASES = {
    "efficientnet_b0": (lambda: _effnet("efficientnet_b0"), 32),
    "tf_efficientnet_b0": (lambda: _effnet("tf_efficientnet_b0", bn_eps=1e-3, pad_type="same"), 32),
    "mobilenetv3_small_100": (_timm("mobilenetv3_small_100", depth_multiplier=0.5), 32),
    "convnext_atto": (_timm("convnext_atto", depths=(1, 1, 2, 1), dims=(16, 32, 48, 64)), 32),
    "regnetx_002": (_timm("regnetx_002", depth=7), 32),
    "vit_tiny_patch16_224": (_timm("vit_tiny_patch16_224", depth=2, img_size=32), 32),
    "deit_tiny_patch16_224": (_timm("deit_tiny_patch16_224", depth=2, img_size=32), 32),
    "swin_tiny_patch4_window7_224": (_timm("swin_tiny_patch4_window7_224", depths=(2, 1, 1, 1), embed_dim=24,
                                           num_heads=(1, 2, 3, 6), img_size=64, window_size=4), 64),
    "eva02_tiny_patch14_224": (_timm("eva02_tiny_patch14_224", depth=2, img_size=28), 28),
    "coatnet_nano_rw_224": (_timm("coatnet_nano_rw_224", depths=(1, 1, 1, 1), img_size=64), 64),
    "nf_regnet_b0": (_timm("nf_regnet_b0", depths=(1, 1, 1, 1)), 32),
}


# slow: every exported architecture but one, which stays in the fast tier (its eval parity only).
@pytest.fixture(scope="module", params=[n if n == "efficientnet_b0" else pytest.param(n, marks=pytest.mark.slow)
                                        for n in CASES])
def case(request):
    """(timm model, ExportedModel, variables, images NCHW, labels) for one architecture."""
    import torch

    from torch2flax.export import convert_exported
    from torch2flax.export.parity import random_batch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    factory, size = CASES[request.param]
    model = randomize_batchnorm(factory(), seed=1).eval()
    module, variables = convert_exported(model, image_size=size)
    x, labels = random_batch(module, batch=4)
    return model, module, variables, x, labels


@pytest.mark.core
def test_eval_parity(case):
    from torch2flax.export.parity import eval_parity

    model, module, variables, x, _ = case
    err = eval_parity(model, module, variables, x)
    assert err["rel"] <= EVAL_TOL, err


@pytest.mark.slow
@pytest.mark.core
def test_train_step_parity(case):
    from torch2flax.export.parity import train_parity

    model, module, variables, x, labels = case
    err = train_parity(model, module, variables, x, labels, tol=TRAIN_TOL)
    assert err["ok"], err
    if "batch_stats" in variables:
        assert err["batch_stats"]["floor"] > 0  # the step really updated the running stats


# The full-size members of the families the shell fine-tune trains at timm's test sizes
# (tests/test_finetune.py): every block at timm's depth and width, on a 32 px image. Eval only:
# the full efficientnet_b0's training step alone takes a minute to compile here.
FULL_SIZE = {"efficientnet_b0": {}, "vit_tiny_patch16_224": {"img_size": 32}}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_eval_parity(name):
    import timm
    import torch

    from torch2flax.export import convert_exported
    from torch2flax.export.parity import eval_parity, random_batch

    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model(name, num_classes=10, **FULL_SIZE[name]), seed=1).eval()
    module, variables = convert_exported(model, image_size=32)
    x, _ = random_batch(module, batch=2)
    err = eval_parity(model, module, variables, x)
    assert err["rel"] <= EVAL_TOL, err


def test_a_float64_zero_gradient_is_judged_by_float32_noise():
    """A bias gradient that a normalisation makes exactly zero is rounding noise in float32: it passes
    below 1e-6 x the largest gradient norm, and an error of a real gradient's size still fails."""
    from torch2flax.export.parity import _within_bounds

    big = np.linspace(1.0, 2.0, 100)
    ref64 = {"w": big, "zero_bias": np.full(8, 1e-16)}
    ref32 = {"w": big * (1 + 1e-7), "zero_bias": np.full(8, 1e-9)}  # timm float32: noise 1.8e-4 of the floor
    floor = 1e-6 * np.linalg.norm(big)
    # 0.5 x the floor, 2,700x timm's own noise: fails the relative rule, passes as float32 noise
    noisy = {"w": big, "zero_bias": np.full(8, 0.5 * floor / np.sqrt(8))}
    assert _within_bounds(noisy, ref32, ref64, tol=1e-4)["ok"]
    wrong = {"w": big, "zero_bias": np.full(8, 1e-3)}  # a gradient where there is none
    assert not _within_bounds(wrong, ref32, ref64, tol=1e-4)["ok"]
    assert not _within_bounds({"w": big * 1.01, "zero_bias": ref32["zero_bias"]}, ref32, ref64, tol=1e-4)["ok"]


# ---------------------------------------------------------------------- errors, methods, rebuilding


class _BesselNet:
    """A torch module using an op outside the table (aten.i0)."""

    @staticmethod
    def build():
        import torch

        class BesselNet(torch.nn.Module):
            num_classes = 4

            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 4, 3)

            def forward(self, x):
                return torch.special.i0(self.conv(x)).mean((2, 3))  # the unsupported line

            def reset_classifier(self, n):
                raise NotImplementedError

        return BesselNet()


def test_unsupported_op_fails_at_conversion_naming_op_node_and_line():
    from torch2flax.export import UnsupportedOpError, convert_exported

    with pytest.raises(UnsupportedOpError) as info:
        convert_exported(_BesselNet.build(), image_size=8)
    msg = str(info.value)
    assert "aten.i0.default" in msg and "BesselNet" in msg and "'i0'" in msg
    assert "test_export.py" in msg and "the unsupported line" in msg
    assert "\n" not in msg  # one line, as the CLI prints every user error
