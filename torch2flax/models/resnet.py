"""timm's ResNet family (ResNet, ResNet-D, ResNeXt, Wide ResNet, SE-ResNet) in Flax linen.

Submodule names mirror timm's module tree (`conv1`, `bn1`, `layer1`..`layer4`
with blocks `0`, `1`, ..., `downsample`, `se`, `fc`) so `torch2flax.converter`
maps weights by path alone. Inputs are NHWC.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from torch2flax.errors import ConfigError
from torch2flax.layers import Activation, BatchNorm, Conv, Dense, DropPath, avg_pool, global_pool, max_pool

Array = jax.Array

# torch module types a timm ResNet may contain for the conversion to be faithful;
# anything else (DropBlock2d, anti-aliasing, other attention) has no counterpart here.
TORCH_MODULE_TYPES = frozenset({
    "ResNet", "BasicBlock", "Bottleneck", "Sequential", "Conv2d", "BatchNorm2d", "Linear",
    "ReLU", "MaxPool2d", "AvgPool2d", "Identity", "Flatten", "SelectAdaptivePool2d",
    "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "SEModule", "Sigmoid", "DropPath",
})


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """timm's channel rounding (nearest multiple of `divisor`, not below `round_limit * v`)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


@dataclasses.dataclass(frozen=True)
class BlockCfg:
    """The network-wide settings blocks need (hashable, so it can be a module field)."""

    block: str
    cardinality: int
    base_width: int
    avg_down: bool
    attn_layer: str | None
    drop_path_rate: float
    zero_init_last: bool
    bn_eps: float
    bn_momentum: float
    dtype: Any
    axis_name: str | None


def _bn(cfg: Any, name: str | None, zero_init: bool = False) -> BatchNorm:
    return BatchNorm(
        momentum=cfg.bn_momentum, epsilon=cfg.bn_eps, dtype=cfg.dtype, axis_name=cfg.axis_name,
        scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones, name=name,
    )


class SEModule(nn.Module):
    """timm's `SEModule`: mean over space, 1x1 conv, ReLU, 1x1 conv, sigmoid gate."""

    channels: int
    rd_ratio: float = 1.0 / 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        rd = make_divisible(self.channels * self.rd_ratio, 8, round_limit=0.0)
        s = x.mean(axis=(1, 2), keepdims=True)
        s = nn.relu(Conv(rd, 1, use_bias=True, dtype=self.dtype, name="fc1")(s))
        s = Conv(self.channels, 1, use_bias=True, dtype=self.dtype, name="fc2")(s)
        return x * nn.sigmoid(s)


class Downsample(nn.Module):
    """Projection shortcut: conv+BN (`downsample_conv`) or avg-pool+conv+BN (ResNet-D `downsample_avg`)."""

    cfg: Any
    features: int
    stride: int
    avg: bool

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        cfg = self.cfg
        if self.avg:
            if self.stride != 1:
                x = avg_pool(x, 2, self.stride, ceil_mode=True, count_include_pad=False)
            x = Conv(self.features, 1, dtype=cfg.dtype, name="1")(x)
            return _bn(cfg, "2")(x, use_running_average=not train)
        x = Conv(self.features, 1, self.stride, dtype=cfg.dtype, name="0")(x)
        return _bn(cfg, "1")(x, use_running_average=not train)


class _Block(nn.Module):
    """What BasicBlock and Bottleneck share: the fields and the residual tail."""

    cfg: Any
    planes: int
    stride: int = 1
    downsample: bool = False
    drop_path: float = 0.0

    def _residual(self, x: Array, shortcut: Array, out: int, train: bool) -> Array:
        """SE (when configured), drop-path, the shortcut (projected when it must be) and ReLU."""
        cfg = self.cfg
        if cfg.attn_layer == "se":
            x = SEModule(out, dtype=cfg.dtype, name="se")(x)
        x = DropPath(self.drop_path)(x, deterministic=not train)
        if self.downsample:
            shortcut = Downsample(cfg, out, self.stride, cfg.avg_down, name="downsample")(shortcut, train)
        return nn.relu(x + shortcut)


class BasicBlock(_Block):
    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        cfg = self.cfg
        out = self.planes * self.expansion
        shortcut = x
        x = Conv(self.planes, 3, self.stride, 1, dtype=cfg.dtype, name="conv1")(x)
        x = nn.relu(_bn(cfg, "bn1")(x, use_running_average=not train))
        x = Conv(out, 3, 1, 1, dtype=cfg.dtype, name="conv2")(x)
        x = _bn(cfg, "bn2", zero_init=cfg.zero_init_last)(x, use_running_average=not train)
        return self._residual(x, shortcut, out, train)


class Bottleneck(_Block):
    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        cfg = self.cfg
        width = int(self.planes * (cfg.base_width / 64)) * cfg.cardinality
        out = self.planes * self.expansion
        shortcut = x
        x = Conv(width, 1, dtype=cfg.dtype, name="conv1")(x)
        x = nn.relu(_bn(cfg, "bn1")(x, use_running_average=not train))
        x = Conv(width, 3, self.stride, 1, feature_group_count=cfg.cardinality, dtype=cfg.dtype, name="conv2")(x)
        x = nn.relu(_bn(cfg, "bn2")(x, use_running_average=not train))
        x = Conv(out, 1, dtype=cfg.dtype, name="conv3")(x)
        x = _bn(cfg, "bn3", zero_init=cfg.zero_init_last)(x, use_running_average=not train)
        return self._residual(x, shortcut, out, train)


class Stage(nn.Module):
    """`layerN`: blocks named `0`, `1`, ... like timm's `nn.Sequential`."""

    cfg: Any
    planes: int
    num_blocks: int
    stride: int
    in_features: int
    first_block_idx: int
    total_blocks: int

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        cfg = self.cfg
        block_cls = Bottleneck if cfg.block == "bottleneck" else BasicBlock
        out = self.planes * block_cls.expansion
        for i in range(self.num_blocks):
            idx = self.first_block_idx + i
            # timm's stochastic depth: linear decay over all blocks of the net.
            dpr = cfg.drop_path_rate * idx / max(self.total_blocks - 1, 1)
            first = i == 0
            x = block_cls(
                cfg, self.planes, self.stride if first else 1,
                downsample=first and (self.stride != 1 or self.in_features != out),
                drop_path=dpr, name=str(i),
            )(x, train)
        return x


class DeepStem(nn.Module):
    """`conv1` of the c/d variants: three 3x3 convs (an `nn.Sequential` with BN/ReLU at 1, 2, 4, 5)."""

    cfg: Any
    widths: tuple[int, int, int]

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        cfg = self.cfg
        w0, w1, w2 = self.widths
        x = Conv(w0, 3, 2, 1, dtype=cfg.dtype, name="0")(x)
        x = nn.relu(_bn(cfg, "1")(x, use_running_average=not train))
        x = Conv(w1, 3, 1, 1, dtype=cfg.dtype, name="3")(x)
        x = nn.relu(_bn(cfg, "4")(x, use_running_average=not train))
        return Conv(w2, 3, 1, 1, dtype=cfg.dtype, name="6")(x)


class ResNet(nn.Module):
    """timm `ResNet` (output stride 32, no anti-aliasing/DropBlock) for NHWC float input.

    `__call__` returns logits `(B, num_classes)`, or pooled features when
    `num_classes == 0`; `forward_features` returns the NHWC map before pooling.
    `dtype` is the computation dtype; parameters are always float32.
    """

    block: str = "basic"
    layers: tuple[int, ...] = (2, 2, 2, 2)
    channels: tuple[int, ...] = (64, 128, 256, 512)  # each stage's planes (timm's `channels=`)
    num_classes: int = 1000
    in_chans: int = 3
    global_pool: str = "avg"
    cardinality: int = 1
    base_width: int = 64
    stem_width: int = 64
    stem_type: str = ""
    avg_down: bool = False
    attn_layer: str | None = None
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    zero_init_last: bool = True
    bn_eps: float = 1e-5
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32
    axis_name: str | None = None
    pretrained_cfg: Any = None

    def setup(self):
        if self.block not in ("basic", "bottleneck"):
            raise ConfigError(f"ResNet block must be 'basic' or 'bottleneck', got {self.block!r}")
        if self.stem_type not in ("", "deep", "deep_tiered"):
            raise ConfigError(f"unsupported ResNet stem_type {self.stem_type!r}: only '', 'deep' or 'deep_tiered'")
        if self.attn_layer not in (None, "se"):
            raise ConfigError(f"unsupported attn_layer {self.attn_layer!r}: only None or 'se'")
        cfg = BlockCfg(
            self.block, self.cardinality, self.base_width, self.avg_down, self.attn_layer,
            self.drop_path_rate, self.zero_init_last, self.bn_eps, self.bn_momentum, self.dtype, self.axis_name,
        )
        deep = "deep" in self.stem_type
        inplanes = self.stem_width * 2 if deep else 64
        if deep:
            w0 = 3 * (self.stem_width // 4) if "tiered" in self.stem_type else self.stem_width
            self.conv1 = DeepStem(cfg, (w0, self.stem_width, inplanes))
        else:
            self.conv1 = Conv(inplanes, 7, 2, 3, dtype=self.dtype)
        self.bn1 = _bn(cfg, None)
        self.act1 = Activation(nn.relu)
        expansion = (Bottleneck if self.block == "bottleneck" else BasicBlock).expansion
        if len(self.layers) != 4 or len(self.channels) != 4:
            raise ConfigError(f"ResNet needs 4 stages, got layers={self.layers}, channels={self.channels}")
        total, idx, stages = sum(self.layers), 0, []
        for i, (planes, n) in enumerate(zip(self.channels, self.layers)):
            stages.append(dict(cfg=cfg, planes=planes, num_blocks=n, stride=1 if i == 0 else 2,
                               in_features=inplanes, first_block_idx=idx, total_blocks=total))
            inplanes, idx = planes * expansion, idx + n
        self.layer1 = Stage(**stages[0])
        self.layer2 = Stage(**stages[1])
        self.layer3 = Stage(**stages[2])
        self.layer4 = Stage(**stages[3])
        self.num_features = inplanes
        self.head_drop = nn.Dropout(self.drop_rate)
        if self.num_classes > 0:
            self.fc = Dense(self.num_classes, dtype=self.dtype)

    def forward_features(self, x: Array, train: bool = False) -> Array:
        x = x.astype(self.dtype)
        x = self.conv1(x, train) if isinstance(self.conv1, DeepStem) else self.conv1(x)
        x = self.act1(self.bn1(x, use_running_average=not train))
        x = max_pool(x, 3, 2, 1)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x, train)
        return x

    def feature_info(self) -> list[dict[str, Any]]:
        """timm's `feature_info` for this ResNet: the stem activation and the four stages."""
        expansion = (Bottleneck if self.block == "bottleneck" else BasicBlock).expansion
        stem = self.stem_width * 2 if "deep" in self.stem_type else 64
        return [{"module": "act1", "num_chs": stem, "reduction": 2}] + [
            {"module": f"layer{i + 1}", "num_chs": planes * expansion, "reduction": 4 * 2 ** i}
            for i, planes in enumerate(self.channels)]

    def no_weight_decay(self) -> frozenset[str]:
        """Top-level parameter names exempt from weight decay: none (timm's ResNet has no such set)."""
        return frozenset()

    def forward_head(self, x: Array, train: bool = False, pre_logits: bool = False) -> Array:
        x = global_pool(x, self.global_pool)
        if self.drop_rate > 0:
            x = self.head_drop(x, deterministic=not train)
        if pre_logits or self.num_classes == 0:
            return x
        return self.fc(x)

    def __call__(self, x: Array, train: bool = False) -> Array:
        return self.forward_head(self.forward_features(x, train), train)


def flax_kwargs(model: Any) -> dict[str, Any]:
    """Family-specific constructor arguments read from a timm ResNet (depths and widths may be
    overridden through timm's `layers=` and `channels=`, which is how the tests build small twins)."""
    stages = [getattr(model, f"layer{i}") for i in range(1, 5)]
    # A stage's planes: its first block's output channels over the block's expansion (4 in a bottleneck).
    channels = tuple(getattr(s[0], "conv3", s[0].conv2).out_channels // s[0].expansion for s in stages)
    return {"layers": tuple(len(s) for s in stages), "channels": channels}


def timm_kwargs(module: ResNet) -> dict[str, Any]:
    """The timm `create_model` arguments that rebuild `module`'s depths and widths (the inverse of
    `flax_kwargs`; `channels` only where it is not timm's default)."""
    widths = {} if module.channels == ResNet.channels else {"channels": list(module.channels)}
    return {"layers": list(module.layers), **widths}


MODEL_CLASS = ResNet
# timm name -> Flax constructor arguments (the timm model of the same name is built with its defaults).
MODELS: dict[str, dict[str, Any]] = {
    "resnet18": dict(block="basic", layers=(2, 2, 2, 2)),
    "resnet34": dict(block="basic", layers=(3, 4, 6, 3)),
    "resnet50": dict(block="bottleneck", layers=(3, 4, 6, 3)),
    "resnet101": dict(block="bottleneck", layers=(3, 4, 23, 3)),
    "resnet152": dict(block="bottleneck", layers=(3, 8, 36, 3)),
    "resnet50d": dict(block="bottleneck", layers=(3, 4, 6, 3), stem_width=32, stem_type="deep", avg_down=True),
    "resnext50_32x4d": dict(block="bottleneck", layers=(3, 4, 6, 3), cardinality=32, base_width=4),
    "wide_resnet50_2": dict(block="bottleneck", layers=(3, 4, 6, 3), base_width=128),
    "seresnet50": dict(block="bottleneck", layers=(3, 4, 6, 3), attn_layer="se"),
}
