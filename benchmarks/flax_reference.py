"""Plain Flax classifiers for benchmarks/tpu_check.py's `compare`: what a Flax user writes without
torch2flax (flax's examples/imagenet ResNet-50, and a ViT-S/16 in the big_vision mould), so the
TPU's compiled program for our converted models has a reference. Shapes match timm's resnet50 and
vit_small_patch16_224; weights are not loaded (only the compiled program is compared)."""
from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class Bottleneck(nn.Module):
    filters: int
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)
        y = nn.relu(norm()(conv(self.filters, (1, 1))(x)))
        y = nn.relu(norm()(conv(self.filters, (3, 3), (self.strides, self.strides), padding=((1, 1), (1, 1)))(y)))
        y = norm(scale_init=nn.initializers.zeros)(conv(self.filters * 4, (1, 1))(y))
        if x.shape[-1] != self.filters * 4 or self.strides != 1:
            x = norm()(conv(self.filters * 4, (1, 1), (self.strides, self.strides))(x))
        return nn.relu(x + y)


class ResNet50(nn.Module):
    num_classes: int = 1000
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False, dtype=self.dtype)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for i, blocks in enumerate((3, 4, 6, 3)):
            for j in range(blocks):
                x = Bottleneck(64 * 2**i, 2 if i > 0 and j == 0 else 1, self.dtype)(x, train)
        return nn.Dense(self.num_classes, dtype=self.dtype)(jnp.mean(x, axis=(1, 2)))


class EncoderBlock(nn.Module):
    heads: int
    mlp: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=self.dtype)(y, y)
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
        y = nn.Dense(self.mlp, dtype=self.dtype)(y)
        return x + nn.Dense(x.shape[-1], dtype=self.dtype)(nn.gelu(y, approximate=False))


class ViTS16(nn.Module):
    num_classes: int = 1000
    width: int = 384
    depth: int = 12
    heads: int = 6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.width, (16, 16), (16, 16), padding="VALID", dtype=self.dtype)(x)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c)).astype(x.dtype), x], axis=1)
        x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, c)).astype(x.dtype)
        for _ in range(self.depth):
            x = EncoderBlock(self.heads, 4 * self.width, self.dtype)(x)
        x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x[:, 0])
