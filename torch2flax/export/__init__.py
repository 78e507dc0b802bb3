"""The exported-graph backend: any timm model in Flax via `torch.export` and an ATen op table we own.

`convert_exported(name_or_model)` exports the timm model's eval graph (dynamic
batch, fixed image size; the train graph on first use), checks it against the op
table (`ops.OPS`) and returns `(ExportedModel, variables)`, where `ExportedModel` is a
Flax linen module with the native models' contract (NHWC input,
`__call__(x, train)`, `forward_features`, `forward_head`, `batch_stats`).
"""
from torch2flax.export.backend import ExportBackend  # registers the "export" backend
from torch2flax.export.capture import export_timm
from torch2flax.export.interpreter import GraphError, Program, UnsupportedOpError, lower, run
from torch2flax.export.model import (
    ExportedModel,
    ExportSpec,
    convert_exported,
    exported_state_dict,
    program,
    timm_from_exported,
)
from torch2flax.export.ops import OPS

__all__ = [
    "OPS", "ExportBackend", "ExportSpec", "ExportedModel", "GraphError", "Program", "UnsupportedOpError", "convert_exported",
    "export_timm", "exported_state_dict", "lower", "program", "run", "timm_from_exported",
]
