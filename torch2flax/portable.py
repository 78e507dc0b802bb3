"""Portable inference programs: a model's eval-mode forward, serialized beside its weights.

`portable_program(module, variables)` lowers `module.apply(variables, x, train=False)` with `jax.export`
for cpu, cuda and tpu (lowering needs no such hardware), with a symbolic batch size and the
image size fixed, once per compute dtype. `io.save(..., portable=True)` stores it in the model
file; `io.load` then returns a `PortableModule` that runs the program: loading needs neither
torch nor timm, nor the timm version that exported the graph, and costs no `torch.export`.

Why not `Exported.serialize()`: its format follows jax's own 6-month window. Measured
2026-12-07 on the CI stacks, a file jax 0.12.1 serialized is refused by jax 0.10.2 (StableHLO
newer than it reads) and by 0.7.2 (serialization version 13), one from 0.10.2 runs on 0.7.2 with
`nr_devices` read as 0, and 0.12.1 refuses 0.7.2's as expired. So a file stores what is stable
across that range: the StableHLO portable artifact, written at the version the oldest supported
jaxlib reads (`STABLEHLO_TARGET`), plus the calling-convention facts `jax.export` needs. The reader
rebuilds an `Exported` around it from its own jax: it exports a stand-in function of the same
signature and replaces the module (`dataclasses.replace` of jax's public dataclass).

A portable program is the forward pass only: training from it, Grad-CAM, intermediate features
and `export-timm` need the full model (`load(path, portable=False)`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from torch2flax.errors import ConfigError, DataError

PORTABLE_VERSION = 1
PLATFORMS = ("cpu", "cuda", "tpu")
# The compute dtypes a program is written for (the trainer's and predict's `--dtype` choices;
# parameters stay float32 in both, as in `module.clone(dtype=...)`).
DTYPES = ("float32", "bfloat16")
# jaxlib 0.7.2 (setup.cfg's lowest jax) reads StableHLO up to 1.13.0; later jaxlibs read every
# version back to 0.9.0. A program written at this version loads on every supported jax.
STABLEHLO_TARGET = "1.13.0"
BATCH = "b"  # the symbolic batch dimension


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def _shape(shape: Sequence[Any]) -> list[Any]:
    return [d if isinstance(d, int) else str(d) for d in shape]


def portable_program(module: Any, variables: Mapping, *, image_size: int | tuple[int, int] | None = None,
                     dtypes: Sequence[str] = DTYPES, platforms: Sequence[str] = PLATFORMS) -> dict[str, Any]:
    """The serialized eval forward of `module` at `image_size` (default: its fixed size if it has
    one, else its pretrained size), one program per dtype: the record `io.save(..., portable=True)`
    stores under the file's `"portable"` key."""
    import jax
    import jax.numpy as jnp
    from jax import export
    from jax.extend.mlir.dialects import stablehlo

    from torch2flax.backend import input_hw

    # A size given is the size the model runs at (the trainer's validation size), even for an exported
    # graph traced at another (a convnet's graph runs at any size); else its fixed or pretrained size.
    if image_size:
        image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(map(int, image_size))
    else:
        image_size = input_hw(module)
    in_chans = int(module.in_chans)
    tree = _collections(variables)
    spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    (b,) = export.symbolic_shape(BATCH)
    target = min(STABLEHLO_TARGET, stablehlo.get_current_version(), key=_version_key)
    programs = {}
    for name in dtypes:
        dtype = getattr(jnp, name)
        fn = functools.partial(_forward, module.clone(dtype=dtype))
        x = jax.ShapeDtypeStruct((b, *image_size, in_chans), dtype)
        try:
            exp = export.export(jax.jit(fn), platforms=tuple(platforms))(spec, x)
        except Exception as e:  # noqa: BLE001 - named with the model and dtype, then re-raised
            raise RuntimeError(f"could not export the {name} forward pass of {type(module).__name__} for "
                               f"{'/'.join(platforms)} ({type(e).__name__}: {e})") from e
        (out,) = exp.out_avals
        programs[name] = {
            "stablehlo": bytes(stablehlo.serialize_portable_artifact_str(exp.mlir_module(), target)),
            # the writer's default; 9 and 10 are both read by jax 0.7.2 through 0.12.1
            "calling_convention_version": int(exp.calling_convention_version),
            "module_kept_var_idx": [int(i) for i in exp.module_kept_var_idx],
            "uses_global_constants": bool(exp.uses_global_constants),
            "out_shape": _shape(out.shape), "out_dtype": str(out.dtype),
        }
    cfg = module.pretrained_cfg
    return {"version": PORTABLE_VERSION, "platforms": list(platforms), "stablehlo_version": target,
            "input_shape": [BATCH, *image_size, in_chans], "jax": jax.__version__, "programs": programs,
            "variables": {"/".join(k): [list(v.shape), str(v.dtype)] for k, v in _flat(tree).items()},
            "pretrained_cfg": cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})}


def _flat(tree: Mapping) -> dict[tuple[str, ...], Any]:
    from flax.traverse_util import flatten_dict

    return flatten_dict(tree)


def check_variables(record: Mapping[str, Any], variables: Mapping, source: str) -> None:
    """The variables stored beside a program are the ones it was exported with (path, shape, dtype)."""
    import numpy as np

    want = record.get("variables", {})
    got = {"/".join(k): [list(np.shape(v)), str(np.asarray(v).dtype)] for k, v in _flat(_collections(variables)).items()}
    if got != want:
        bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise DataError(f"{source}: its variables do not match its portable program at {bad[:5]} (file has "
                        f"{[got.get(k) for k in bad[:3]]}, the program takes {[want.get(k) for k in bad[:3]]}); "
                        "write the program again (torch2flax convert/train --portable)")


def _forward(module: Any, variables: Any, x: Any) -> Any:
    return module.apply(variables, x, train=False)


def _collections(variables: Mapping) -> dict[str, Any]:
    """The variables as plain nested dicts of the collections a forward pass reads: the program's
    argument tree, the same whether the caller holds a FrozenDict or a dict."""
    from flax.core import unfreeze

    tree = unfreeze(variables) if hasattr(variables, "unfreeze") else dict(variables)
    return {k: unfreeze(v) if hasattr(v, "unfreeze") else v for k, v in tree.items()
            if k in ("params", "batch_stats")}


def check_record(record: Any, source: str) -> None:
    """A portable record this release reads, or a DataError naming what is wrong."""
    if not isinstance(record, Mapping) or not isinstance(record.get("programs"), Mapping):
        raise DataError(f"{source}: its portable program record is malformed (no programs)")
    version = record.get("version")
    if version != PORTABLE_VERSION:
        raise DataError(f"{source}: portable program version {version!r}; this torch2flax reads version "
                        f"{PORTABLE_VERSION}: load the full model instead (load(path, portable=False), "
                        "predict --full-model)")


@dataclasses.dataclass(frozen=True, eq=False)
class PortableModule:
    """A loaded portable program, standing in for the Flax module at inference: `apply(variables,
    x, train=False)` runs it, `clone(dtype=...)` picks the program of that compute dtype, and
    `pretrained_cfg`/`in_chans` describe the input as the full module's do. Hashed by its program,
    so the prediction step it is part of is compiled once per program (`predict_program`)."""

    record: Mapping[str, Any]
    pretrained_cfg: Mapping[str, Any]
    config: Mapping[str, Any]  # the full model's file config (what `load(path, portable=False)` rebuilds)
    source: str = "model file"
    dtype: str = "float32"

    @functools.cached_property
    def _key(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self.record["programs"]):
            digest.update(self.record["programs"][name]["stablehlo"])
        return f"{digest.hexdigest()}:{self.dtype}"

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PortableModule) and other._key == self._key

    @property
    def in_chans(self) -> int:
        return int(self.record["input_shape"][-1])

    @property
    def input_hw(self) -> tuple[int, int]:
        """The (H, W) the program was exported for; it runs at that size only."""
        return int(self.record["input_shape"][1]), int(self.record["input_shape"][2])

    @property
    def num_classes(self) -> int:
        return int(self.record["programs"][self.dtype]["out_shape"][-1])

    def clone(self, *, dtype: Any = None, **changes: Any) -> PortableModule:
        """A copy that runs the program of compute `dtype` (a name or a jnp dtype); any other
        change (a drop rate, a head) needs the full model."""
        if changes:
            raise ConfigError(f"{self.source}: a portable program cannot change {sorted(changes)}; load the full "
                              "model (load(path, portable=False)) to change the model")
        if dtype is None:
            return self
        import numpy as np

        name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
        if name not in self.record["programs"]:
            raise ConfigError(f"{self.source}: its portable program was written for {sorted(self.record['programs'])}, "
                              f"not {name}: predict with one of those dtypes or load the full model (predict --full-model)")
        return dataclasses.replace(self, dtype=name)

    def apply(self, variables: Mapping, x: Any, *, train: bool = False, **kwargs: Any) -> Any:
        """The eval-mode logits of `x` (NHWC, the program's image size), as the full module's
        `apply(variables, x, train=False)`."""
        if train or kwargs:
            what = "train=True" if train else ", ".join(sorted(kwargs))
            raise ConfigError(f"{self.source}: a portable program is the eval forward pass only ({what} needs the "
                              "full model: load(path, portable=False))")
        if tuple(x.shape[1:]) != (*self.input_hw, self.in_chans):
            raise ConfigError(f"{self.source}: its portable program takes {self.input_hw[0]}x{self.input_hw[1]} images "
                              f"with {self.in_chans} channels, got an input of shape {tuple(x.shape)}: predict at "
                              "that size (--image-size) or load the full model (predict --full-model)")
        import jax.numpy as jnp

        tree = _collections(variables)
        return _program_call(self, _tree_spec(tree))(tree, jnp.asarray(x, dtype=self.dtype))

    def __repr__(self) -> str:
        h, w = self.input_hw
        return (f"PortableModule({self.config.get('model')!r}, {h}x{w}, {self.dtype}, "
                f"platforms={self.record['platforms']}, from {self.source})")


def _tree_spec(tree: Any) -> Any:
    import jax

    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(a.shape), str(a.dtype)) for a in leaves)


@functools.lru_cache(maxsize=32)
def _program_call(module: PortableModule, spec: Any) -> Any:
    """The callable program for this module's dtype and this variable tree: jax's `Exported`
    of the reader's own version, around the stored StableHLO (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    from jax import export

    treedef, leaves = spec
    entry = module.record["programs"][module.dtype]
    variables = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaves])
    (b,) = export.symbolic_shape(BATCH)
    _, h, w, c = module.record["input_shape"]
    out_shape = tuple(b if d == BATCH else int(d) for d in entry["out_shape"])
    out_dtype = jnp.dtype(entry["out_dtype"])

    def stand_in(variables: Any, x: Any) -> Any:  # the program's signature; its body is replaced below
        return jnp.zeros((x.shape[0], *out_shape[1:]), out_dtype)

    shell = export.export(jax.jit(stand_in), platforms=tuple(module.record["platforms"]))(
        variables, jax.ShapeDtypeStruct((b, int(h), int(w), int(c)), jnp.dtype(module.dtype)))
    return dataclasses.replace(
        shell, mlir_module_serialized=entry["stablehlo"],
        calling_convention_version=entry["calling_convention_version"],
        module_kept_var_idx=tuple(entry["module_kept_var_idx"]),
        uses_global_constants=entry["uses_global_constants"]).call

