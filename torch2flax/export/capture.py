"""The torch side: export a timm model's methods to core ATen with a dynamic batch."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.export import Dim, ExportedProgram

from torch2flax.errors import ConfigError

# Methods we export, and how each is called on the timm model.
METHODS = ("forward", "forward_features", "forward_head", "forward_head_pre_logits")


class _Method(torch.nn.Module):
    """Exposes one method of a timm model as `forward`, so torch.export can capture it.

    Parameter names gain the prefix `model.`, which `interpreter.lower` strips.
    """

    def __init__(self, model: torch.nn.Module, method: str):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, x: torch.Tensor) -> Any:
        if self.method == "forward_head_pre_logits":
            return self.model.forward_head(x, pre_logits=True)
        return getattr(self.model, self.method)(x)


def example_input(model: torch.nn.Module, input_size: Sequence[int], method: str, batch: int = 2) -> torch.Tensor:
    """A seeded random batch for `method`: images, or forward_features' output for the head."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *input_size, generator=gen)
    if method.startswith("forward_head"):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            x = model.forward_features(x)
        model.train(was_training)
    return x


def export_timm(
    model: torch.nn.Module,
    *,
    train: bool,
    input_size: Sequence[int],
    method: str = "forward",
    batch: int = 2,
    dynamic_batch: bool = True,
) -> ExportedProgram:
    """`torch.export` one method of a timm model in eval or train mode, decomposed to core ATen.

    `input_size` is (C, H, W), fixed in the graph; the batch dimension is
    symbolic (min 2: training BatchNorm refuses a batch of 1), so one program
    serves every batch size. In train mode the graph carries BatchNorm's
    running-stat updates as `buffers_to_mutate` and dropout / drop-path as
    random ops. The model's own train/eval mode and buffers are left as they were.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    x = example_input(model, input_size, method, batch)
    target = model if method == "forward" else _Method(model, method)
    dynamic = ({0: Dim("batch", min=2)},) if dynamic_batch else None
    was_training = model.training
    try:
        model.train(train)
        ep = torch.export.export(target, (x,), dynamic_shapes=dynamic)
    finally:
        model.train(was_training)
    return ep.run_decompositions(decompositions())


def decompositions() -> Any:
    """torch.export's core-ATen table without `aten._safe_softmax` and `aten.linear`, which the
    interpreter lowers whole (`ops.safe_softmax` and `ops.linear` say why)."""
    table = torch.export.default_decompositions()
    table.pop(torch.ops.aten._safe_softmax.default, None)
    table.pop(torch.ops.aten.linear.default, None)
    return table
