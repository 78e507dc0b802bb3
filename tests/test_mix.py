"""MixUp / CutMix in the compiled step (`train.mix`) against timm's `Mixup`."""
import numpy as np
import pytest

NUM_CLASSES = 5


def _batch(n=6, h=10, w=12):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 3, h, w)).astype(np.float32), rng.integers(0, NUM_CLASSES, n)


@pytest.mark.parametrize("use_cutmix", [False, True], ids=["mixup", "cutmix"])
def test_one_draw_mixes_images_and_smoothed_targets_as_timm(use_cutmix, monkeypatch):
    """timm's Mixup (mode "batch", correct_lam, label smoothing 0.1) and ours, given the same lam
    (and for CutMix the same box, from the same NumPy draw), give the same images and targets."""
    import jax.numpy as jnp
    import optax
    import torch
    from timm.data.mixup import Mixup, rand_bbox

    from torch2flax.train.mix import mix

    x, y = _batch()
    lam = 0.6 if use_cutmix else 0.3
    timm_mix = Mixup(mixup_alpha=0.0 if use_cutmix else 1.0, cutmix_alpha=1.0 if use_cutmix else 0.0,
                     label_smoothing=0.1, num_classes=NUM_CLASSES)
    monkeypatch.setattr(timm_mix, "_params_per_batch", lambda: (lam, use_cutmix))
    np.random.seed(3)
    want_x, want_t = timm_mix(torch.from_numpy(x.copy()), torch.from_numpy(y))
    np.random.seed(3)
    box = np.array([int(v) for v in rand_bbox(x.shape, lam)]) if use_cutmix else np.zeros(4, int)
    targets = optax.smooth_labels(jnp.eye(NUM_CLASSES)[y], 0.1)
    got_x, got_t = mix(jnp.asarray(x.transpose(0, 2, 3, 1)), targets, jnp.float32(lam), jnp.asarray(use_cutmix),
                       jnp.asarray(box))
    np.testing.assert_allclose(np.asarray(got_x).transpose(0, 3, 1, 2), want_x.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_t), want_t.numpy(), rtol=1e-6, atol=1e-7)
    if use_cutmix:  # a box really was pasted, and lam became the area kept
        area = (box[1] - box[0]) * (box[3] - box[2])
        assert 0 < area < x.shape[2] * x.shape[3]
        i = next(i for i in range(len(y)) if y[i] != y[-1 - i])
        kept = 1 - area / (x.shape[2] * x.shape[3])
        assert float(got_t[i, y[i]]) == pytest.approx(kept * 0.9 + 0.1 / NUM_CLASSES, rel=1e-6)


def test_draws_follow_the_mix_and_switch_probabilities():
    import jax

    from torch2flax.train.mix import MixSpec, draw

    spec = MixSpec(mixup=1.0, cutmix=1.0, prob=0.5, switch_prob=0.25)
    keys = jax.random.split(jax.random.key(0), 4000)
    lam, cut, box = jax.vmap(lambda k: draw(k, spec, 16, 20))(keys)
    lam, cut, box = np.asarray(lam), np.asarray(cut), np.asarray(box)
    mixed = lam < 1.0
    assert abs(mixed.mean() - 0.5) < 0.03
    assert abs(cut[mixed].mean() - 0.25) < 0.03 and not cut[~mixed].any()
    assert abs(lam[mixed & ~cut].mean() - 0.5) < 0.03  # Beta(1, 1)
    assert (box[:, 0] <= box[:, 1]).all() and (box[:, 1] <= 16).all() and (box[:, 3] <= 20).all()
    assert (box >= 0).all()
    off = MixSpec(mixup=1.0, prob=0.0)
    assert not off.enabled and MixSpec(cutmix=1.0).enabled


def test_pmap_and_jit_pair_images_within_each_devices_slice():
    """Under jit the global batch splits into the devices' slices; each slice is mixed with the
    draw pmap's device of that index makes from its own slice alone: the same images and targets,
    so no pair crosses devices."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from torch2flax.train.mix import MixSpec, mix_batch

    devices = jax.local_devices()
    n = len(devices)
    spec = MixSpec(mixup=0.8, cutmix=1.0)
    key = jax.random.key(7)
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=(2 * n, 8, 8, 3)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, 2 * n))
    jit_x, jit_t = jax.jit(lambda x, y: mix_batch(key, x, y, NUM_CLASSES, 0.1, spec, groups=n))(images, labels)
    per_device = jax.pmap(lambda x, y: mix_batch(key, x, y, NUM_CLASSES, 0.1, spec, first_group=lax.axis_index("d")),
                          axis_name="d", devices=devices)
    pmap_x, pmap_t = per_device(images.reshape(n, 2, 8, 8, 3), labels.reshape(n, 2))
    # Equal up to float rounding (XLA may fuse lam * x + (1 - lam) * y into an FMA in one layout only).
    np.testing.assert_allclose(np.asarray(pmap_x).reshape(jit_x.shape), np.asarray(jit_x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pmap_t).reshape(jit_t.shape), np.asarray(jit_t), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"per-device batch \(3\) must be even"):
        mix_batch(key, images[:6], labels[:6], NUM_CLASSES, 0.1, spec, groups=2)
    from torch2flax.errors import ConfigError

    with pytest.raises(ConfigError, match="--batch-size"):
        mix_batch(key, images[:6], labels[:6], NUM_CLASSES, 0.1, spec, groups=2)
