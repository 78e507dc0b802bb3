"""Intermediate features vs timm, and Grad-CAM / Grad-CAM++ vs the `grad-cam` package.

Random-init timm models with randomised BatchNorm statistics; each converted model serves
several checks (conversion is the expensive part).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch

import torch2flax
from tests.helpers import randomize_batchnorm
from torch2flax.features import feature_info, forward_intermediates
from torch2flax.train.explain import class_activation_maps, default_layer, gradcam

FEATURE_TOL = 1e-5  # relative to the largest value of the map (the converter's parity tolerance)
CAM_TOL = 1e-4  # max abs on heatmaps normalised as pytorch-grad-cam normalises them


@functools.cache
def converted(name: str, backend: str, size: int):
    """(timm model, flax module, variables, NCHW input) for a 7-class random-init model."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7).eval()
    randomize_batchnorm(model)
    kwargs = dict(backend=backend, image_size=size) if backend == "export" else {}
    module, variables = torch2flax.convert(model, **kwargs)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model, module, variables, x


def nhwc(x: torch.Tensor) -> jax.Array:
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


# slow: full-size models
@pytest.mark.slow
@pytest.mark.parametrize("name,backend,size", [("resnet50", "native", 64), ("convnext_atto", "export", 64)])
def test_every_stage_equals_timm_forward_intermediates(name, backend, size):
    model, module, variables, x = converted(name, backend, size)
    with torch.no_grad():
        ref = model.forward_intermediates(x, intermediates_only=True)
        ref_logits = model(x).numpy()
    info = feature_info(module)
    # timm before 1.0.15 or so (the lower end's 1.0.12) also returns ConvNeXt's stem output first.
    ref = ref[len(ref) - len(info):]
    assert [f.name for f in info] == [f["module"] for f in model.feature_info]
    logits, feats = jax.jit(lambda v, x: forward_intermediates(module, v, x))(variables, nhwc(x))
    assert np.abs(np.asarray(logits) - ref_logits).max() <= FEATURE_TOL * np.abs(ref_logits).max()
    assert list(feats) == [f.name for f in info] and len(ref) == len(info)
    for f, r in zip(info, ref):
        r = r.numpy().transpose(0, 2, 3, 1)
        got = np.asarray(feats[f.name])
        assert got.shape == r.shape and r.shape[-1] == f.channels and r.shape[1] == size // f.reduction
        assert np.abs(got - r).max() <= FEATURE_TOL * np.abs(r).max(), f.name


# slow: a full-size resnet50
@pytest.mark.slow
def test_inner_module_names_taps_and_errors():
    model, module, variables, x = converted("resnet50", "native", 64)
    # Any module of timm's tree, not only the stages; and a tap shifts everything downstream.
    acts = {}
    def keep(name):  # a copy: timm's ReLUs run in place; returns None so the output stays timm's
        return lambda module, args, out: acts.__setitem__(name, out.detach().clone())

    hooks = [model.get_submodule(n).register_forward_hook(keep(n)) for n in ("layer3.1", "layer2.0.bn2")]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    logits, feats = forward_intermediates(module, variables, nhwc(x), ["layer3.1", "layer2.0.bn2"])
    for n in acts:
        r = acts[n].numpy().transpose(0, 2, 3, 1)
        assert np.abs(np.asarray(feats[n]) - r).max() <= FEATURE_TOL * np.abs(r).max(), n
    zero = jnp.zeros_like(feats["layer3.1"])
    same, _ = forward_intermediates(module, variables, nhwc(x), "layer3.1", taps={"layer3.1": zero})
    moved, _ = forward_intermediates(module, variables, nhwc(x), "layer3.1", taps={"layer3.1": zero + 1.0})
    np.testing.assert_array_equal(np.asarray(same), np.asarray(logits))
    assert np.abs(np.asarray(moved) - np.asarray(logits)).max() > 1e-3
    with pytest.raises(ValueError, match="layer9"):
        forward_intermediates(module, variables, nhwc(x), ["layer9"])


# Two methods on one model, Grad-CAM on the others (each method is one compiled program per model).
CAM_CASES = [("resnet18", "native", "layer4", ("gradcam", "gradcam++")), ("resnet50", "native", "layer4", ("gradcam",)),
             ("convnext_atto", "export", "stages.3", ("gradcam",))]


# slow: full-size models
@pytest.mark.slow
@pytest.mark.parametrize("name,backend,layer,methods", CAM_CASES)
def test_gradcam_equals_pytorch_grad_cam(name, backend, layer, methods):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, module, variables, x = converted(name, backend, 64)  # last stage 2x2, upsampled 32x
    spans = []
    for method in methods:
        cam_class = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}[method]
        for target in (None, [1, 4, 6]):
            with cam_class(model=model, target_layers=[model.get_submodule(layer)]) as cam:
                ref = cam(input_tensor=x.clone(),
                          targets=None if target is None else [ClassifierOutputTarget(c) for c in target])
            ours = class_activation_maps(module, variables, nhwc(x), layer=layer, target=target, method=method)
            heat = np.asarray(ours.heatmaps)
            assert heat.shape == ref.shape == (3, 64, 64)
            err = np.abs(heat - ref).max()
            assert err <= CAM_TOL, (method, target, err)
            if target is None:
                np.testing.assert_array_equal(np.asarray(ours.targets), cam.outputs.detach().numpy().argmax(-1))
            else:
                np.testing.assert_array_equal(np.asarray(ours.targets), target)
            spans.extend(heat.max(axis=(1, 2)) - heat.min(axis=(1, 2)))
    # Not a vacuous match of flat maps (a class whose weighted sum is negative everywhere gives
    # one): at least half of the heatmaps span [0, 1].
    assert np.mean(np.asarray(spans) > 0.99) >= 0.5, spans


def test_gradcam_validates_its_arguments():
    _, module, variables, x = converted("resnet18", "native", 64)
    with pytest.raises(ValueError, match="outside"):
        gradcam(module, variables, nhwc(x), target=7)
    with pytest.raises(ValueError, match="method"):
        gradcam(module, variables, nhwc(x), method="scorecam")
    # The deepest stage with a map of at least 4x4: the last one at 224 px, earlier on small inputs.
    assert default_layer(module, variables, (224, 224, 3)) == "layer4"
    assert default_layer(module, variables, (64, 64, 3)) == "layer3"
    assert default_layer(module, variables, (32, 32, 3)) == "layer2"
    heat = gradcam(module, variables, nhwc(x[:, :, :32, :32]))
    assert heat.shape == (3, 32, 32) and float(heat.max()) > 0.99


# slow: a full-size resnet18
@pytest.mark.slow
def test_features_and_gradcam_reach_into_a_backbone_under_an_added_head():
    """A native backbone (an exported one: tests/test_heads.py)."""
    from torch2flax.heads import GeMHead, with_head

    layer = "layer4"
    _, backbone, backbone_vars, x = converted("resnet18", "native", 64)
    model, variables = with_head(backbone, backbone_vars, GeMHead(num_classes=3), image_size=64)
    assert [f.name for f in feature_info(model)] == [f"backbone.{f.name}" for f in feature_info(backbone)]
    _, ref = forward_intermediates(backbone, backbone_vars, nhwc(x), layer)
    logits, feats = forward_intermediates(model, variables, nhwc(x), f"backbone.{layer}")
    np.testing.assert_array_equal(np.asarray(feats[f"backbone.{layer}"]), np.asarray(ref[layer]))
    # forward_intermediates compiles the model: XLA's fusions round differently from op-by-op apply.
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model.apply(variables, nhwc(x))), rtol=1e-5, atol=1e-5)
    cam = class_activation_maps(model, variables, nhwc(x), layer=f"backbone.{layer}", target=2)
    assert cam.heatmaps.shape == (3, 64, 64) and cam.logits.shape == (3, 3)
    assert float(cam.heatmaps.min()) >= 0.0 and float(cam.heatmaps.max()) <= 1.0 + 1e-6
