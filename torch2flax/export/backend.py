"""The export backend: any timm model, run from its `torch.export` graph (`ExportedModel`)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch2flax.backend import Backend, register_backend
from torch2flax.errors import ConfigError
from torch2flax.export.model import (
    ExportedModel,
    freeze_kwargs,
    from_source,
    timm_from_exported,
)
from torch2flax.utils import thaw_value


def fixed_size_kwargs(name: str, image_size: int | tuple[int, int] | None) -> dict[str, Any]:
    """`img_size=` for a model whose graph fixes its input size (ViT-style position embeddings),
    so timm builds it at the size asked for and resamples pretrained position embeddings itself."""
    import timm

    if image_size is None:
        return {}
    cfg = timm.models.get_pretrained_cfg(name)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if cfg is None or not getattr(cfg, "fixed_input_size", False) or tuple(cfg.input_size[1:]) == size:
        return {}
    return {"img_size": size if size[0] != size[1] else size[0]}


def export_versions() -> dict[str, str]:
    """The torch and timm an exported model's graph comes from: `load` re-exports it with the
    loading side's, so a file records them to name both sides when the graphs disagree."""
    import timm
    import torch

    return {"torch": torch.__version__.split("+")[0], "timm": timm.__version__}


@register_backend
class ExportBackend(Backend):
    """Any timm model: its exported core-ATen graph, run by `torch2flax.export.interpreter`."""

    name = "export"
    module_types = (ExportedModel,)
    runs_own_graph = True

    def supports(self, architecture: str) -> bool:
        return True  # whatever timm builds; an op outside the op table fails at conversion, named

    def timm_kwargs(self, name: str, image_size: int | tuple[int, int] | None) -> dict[str, Any]:
        return fixed_size_kwargs(name, image_size)

    def convert(self, source: Any, image_size: int | tuple[int, int] | None = None) -> tuple[Any, Any]:
        return from_source(source, image_size)

    def variable_shapes(self, module: Any) -> Any:
        return module.variable_shapes()

    def to_timm(self, module: Any, variables: Mapping[str, Any]) -> Any:
        return timm_from_exported(module, variables)

    def timm_create_kwargs(self, module: Any) -> dict[str, Any]:
        spec = module.spec
        if spec.instance_key is not None:
            raise ConfigError(f"{spec.model_name} was converted from a timm model instance, whose "
                              "create_model arguments are unknown: convert it by name to export it to timm")
        return {**{k: thaw_value(v) for k, v in spec.timm_kwargs}, "num_classes": spec.num_classes,
                "in_chans": spec.in_chans}

    def model_name(self, module: Any) -> str:
        return module.model_name

    def config(self, module: Any) -> dict[str, Any]:
        return module.config()

    def from_config(self, model_name: str, config: Mapping[str, Any]) -> Any:
        return ExportedModel.from_config(config)

    def file_fields(self, module: Any) -> dict[str, Any]:
        return {"exported_with": export_versions()}

    def mismatch_hint(self, config: Mapping[str, Any]) -> str:
        # The graph was exported again here, from this side's torch and timm; the file's variables
        # fit the graph the writing side's versions gave.
        versions = lambda v: ", ".join(f"{k} {x}" for k, x in v.items())
        written = config.get("exported_with")
        return (f"The file's {config['model']} graph was exported with "
                f"{versions(written) if written else 'unrecorded versions (an older file)'}; this "
                f"process re-exported it with {versions(export_versions())}, whose graph differs: load "
                "it with the writing side's torch and timm, or convert the model again here")

    def with_run_settings(self, module: Any, *, drop_rate: float, drop_path_rate: float,
                          image_size: int | None = None) -> Any:
        # An exported graph is fixed at its image size and has its drop rates baked in: a change
        # re-exports from timm (the cache key is the module's fields).
        if image_size is not None and tuple(module.image_size) != (image_size, image_size):
            raise ConfigError(f"the model was exported at {module.image_size[0]}x{module.image_size[1]}, but the "
                             f"run trains at image_size={image_size}: convert again with --size "
                             f"{image_size} (the exported graph has a fixed input size)")
        kwargs = dict(module.timm_kwargs)
        for key, rate in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
            if rate or key in kwargs:  # unset stays unset: some timm models take no drop_path_rate
                kwargs[key] = rate
        return module.clone(timm_kwargs=freeze_kwargs(kwargs))

    def fixed_input_size(self, module: Any) -> tuple[int, int] | None:
        return tuple(module.image_size)  # type: ignore[return-value]
