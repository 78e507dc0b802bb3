"""MixUp and CutMix inside the compiled training step, with timm's semantics (`timm.data.Mixup`,
mode "batch", `correct_lam=True`).

Per batch: with probability `prob` the batch is mixed, by CutMix with probability `switch_prob`
when both are on (else MixUp), with lam ~ Beta(alpha, alpha); each image is paired with the
batch's reversed order (timm's `x.flip(0)`). MixUp blends the pair, lam x image + (1 - lam) x
partner; CutMix pastes a box of the partner covering about 1 - lam of the image (a centre drawn
uniformly, sides floor(sqrt(1 - lam) x the image's), clipped, as timm 1.0.31 draws it; timm
1.0.12's box was one pixel shorter on odd sides) and then sets lam to the area actually kept. Targets are lam x smoothed one-hot(label) + (1 - lam) x smoothed one-hot(partner's label),
label smoothing applied before mixing as timm does. Validation is never mixed.

Drawn on the device from the step's key (no host work, no extra transfer). With several
devices the pairs and lam are drawn within each device's slice of the batch, each device with
its own key, the way timm's DistributedDataParallel training mixes each process's local batch:
pairing across devices would move images between devices every step for no statistical gain
(the pairs are a random permutation either way, since the loader shuffles). `pmap` and `jit`
mix identically: under `jit` the global batch is split into the same per-device groups.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from torch2flax.errors import ConfigError


@dataclass(frozen=True)
class MixSpec:
    """`TrainConfig.mixup`, `cutmix`, `mix_prob`, `switch_prob` (hashable: part of the compiled step)."""

    mixup: float = 0.0  # Beta alpha of MixUp; 0: off
    cutmix: float = 0.0  # Beta alpha of CutMix; 0: off
    prob: float = 1.0  # chance a batch is mixed at all
    switch_prob: float = 0.5  # with both on: chance of CutMix rather than MixUp

    @property
    def enabled(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.prob > 0


def draw(key: jax.Array, spec: MixSpec, height: int, width: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(lam, use_cutmix, box)` for one batch, as timm's `_params_per_batch` and `rand_bbox` draw
    them; `box` is (y0, y1, x0, x1). Not mixed: lam = 1."""
    k_mix, k_switch, k_mixup, k_cutmix, k_y, k_x = jax.random.split(key, 6)
    mixed = jax.random.uniform(k_mix) < spec.prob
    if spec.mixup > 0 and spec.cutmix > 0:
        use_cutmix = jax.random.uniform(k_switch) < spec.switch_prob
    else:
        use_cutmix = jnp.asarray(spec.cutmix > 0)
    lam_mixup = jax.random.beta(k_mixup, spec.mixup, spec.mixup) if spec.mixup > 0 else jnp.float32(1.0)
    lam_cutmix = jax.random.beta(k_cutmix, spec.cutmix, spec.cutmix) if spec.cutmix > 0 else jnp.float32(1.0)
    lam = jnp.where(mixed, jnp.where(use_cutmix, lam_cutmix, lam_mixup), 1.0).astype(jnp.float32)
    ratio = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = (jnp.floor(height * ratio).astype(jnp.int32), jnp.floor(width * ratio).astype(jnp.int32))
    cy, cx = jax.random.randint(k_y, (), 0, height), jax.random.randint(k_x, (), 0, width)
    box = jnp.stack([jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + (cut_h + 1) // 2, 0, height),
                     jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + (cut_w + 1) // 2, 0, width)])
    return lam, mixed & use_cutmix, box


def mix(images: jax.Array, targets: jax.Array, lam: jax.Array, use_cutmix: jax.Array,
        box: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mix NHWC `images` and their (smoothed one-hot) `targets` with each one's reversed-order
    partner, given the draw; CutMix's lam becomes the area kept (`correct_lam`)."""
    partner = images[::-1]
    h, w = images.shape[1:3]
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    inside = (rows >= box[0]) & (rows < box[1]) & (cols >= box[2]) & (cols < box[3])
    area = (box[1] - box[0]) * (box[3] - box[2])
    lam = jnp.where(use_cutmix, 1.0 - area / (h * w), lam).astype(jnp.float32)
    blended = (images.astype(jnp.float32) * lam + partner.astype(jnp.float32) * (1.0 - lam)).astype(images.dtype)
    pasted = jnp.where(inside[None, :, :, None], partner, images)
    out = jnp.where(use_cutmix, pasted, blended)
    return out, targets * lam + targets[::-1] * (1.0 - lam)


def mix_batch(key: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int, smoothing: float,
              spec: MixSpec, groups: int = 1, first_group: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
    """`(images, soft targets)`: the batch in `groups` equal consecutive slices (every device's
    slice under `jit`; under `pmap` one, this device's, numbered `first_group` = its axis index),
    slice g mixed with its own draw from `fold_in(key, first_group + g)`."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
    n, h, w = images.shape[:3]
    if n % groups or (n // groups) % 2:
        raise ConfigError(f"MixUp/CutMix pair each image within its device's slice: the per-device batch "
                          f"({n // groups}) must be even: use a --batch-size that is an even multiple of the "
                          f"device count, or turn off --mixup/--cutmix")

    def one(g, x, t):
        lam, use_cutmix, box = draw(jax.random.fold_in(key, first_group + g), spec, h, w)
        return mix(x, t, lam, use_cutmix, box)

    shape = (groups, n // groups)
    x, t = jax.vmap(one)(jnp.arange(groups), images.reshape(*shape, *images.shape[1:]),
                         targets.reshape(*shape, num_classes))
    return x.reshape(images.shape), t.reshape(targets.shape)
