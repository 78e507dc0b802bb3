"""Compile a run's training and evaluation steps for a TPU, on any machine, before a TPU session.

`tpu_check(config, tpu="v5e-8")` builds the trainer's own `train_step`/`eval_step` (the
functions `fit` runs, through `trainer.build_steps`) for a TPU topology that libtpu describes
without the hardware (`jax.experimental.topologies`), lowers them with abstract arguments
(`jax.ShapeDtypeStruct`s: no weights or images cross to any device) and reads what XLA:TPU
says: compiled or the compiler's error, HBM per device (`memory_analysis`), FLOPs and bytes
accessed (`cost_analysis`). The largest batch is found by compiling: XLA:TPU refuses a program
that does not fit in HBM ("Ran out of memory in memory space hbm").

What it cannot tell: time. `cost_analysis()["optimal_seconds"]` is not one (negative for a
ResNet-50 step, and 5x apart between two libtpu versions for one matmul), so the only speed
figure here is a roofline *bound* from the chip's peak bf16 FLOP/s and HBM bandwidth. The
memory figure is XLA's plan for one device; the runtime reserves a little more (libtpu says
how much in its out-of-memory message).

On a machine with a TPU of the target's kind and size, the local devices are compiled for
directly; anywhere else libtpu must be importable (`pip install "torch2flax[tpu-check]"`, which
brings the libtpu the installed jax pins) or named by `TPU_LIBRARY_PATH`.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from torch2flax.errors import ConfigError
from torch2flax.train.config import TrainConfig
from torch2flax.train.parallel import AXIS, Parallel

GiB = 1024**3


@dataclass(frozen=True)
class TPU:
    """A single-host slice: its libtpu topology and the per-device figures of the Cloud TPU docs."""

    name: str
    topology: str  # libtpu's name for it (`get_topology_desc`)
    host_bounds: tuple[int, int, int]  # the whole slice is one host (pmap needs its devices local)
    devices: int  # what jax sees
    device_kind: str
    hbm_gib: float  # per device
    peak_bf16_tflops: float  # per device
    hbm_gbps: float  # per device, GB/s
    chip_config: str = ""  # libtpu's chip_config_name, where the default is not what a slice shows jax

    def topology_kwargs(self) -> dict[str, Any]:
        """`get_topology_desc`'s arguments for this slice (the child probe's too)."""
        kw: dict[str, Any] = {"topology_name": self.topology, "chips_per_host_bounds": list(self.host_bounds)}
        return {**kw, "chip_config_name": self.chip_config} if self.chip_config else kw


# Per-device peak bf16 FLOP/s and HBM bandwidth (cloud.google.com/tpu/docs/system-architecture-tpu-vm,
# the v4/v5e/v5p/v6e pages): v3 123 TFLOP/s and 900 GB/s per chip, shared by its 2 cores (one device each).
# A v4 chip's two cores are one megacore device (a v4-8 shows jax 4): libtpu's "v4:2x2x1" describes 8
# single-core devices unless asked for the "megacore" chip config (then 4 devices of 32 GiB).
TPUS = {t.name: t for t in (
    TPU("v3-8", "v3:2x2", (2, 2, 1), 8, "TPU v3", 16, 61.5, 450),
    TPU("v4-8", "v4:2x2x1", (2, 2, 1), 4, "TPU v4", 32, 275, 1200, chip_config="megacore"),
    TPU("v5e-1", "v5e:1x1", (1, 1, 1), 1, "TPU v5 lite", 16, 197, 819),
    TPU("v5e-4", "v5e:2x2", (2, 2, 1), 4, "TPU v5 lite", 16, 197, 819),
    TPU("v5e-8", "v5e:2x4", (2, 4, 1), 8, "TPU v5 lite", 16, 197, 819),
    TPU("v5p-8", "v5p:2x2x1", (2, 2, 1), 4, "TPU v5", 95, 459, 2765),
    TPU("v6e-1", "v6e:1x1", (1, 1, 1), 1, "TPU v6 lite", 32, 918, 1640),
    TPU("v6e-8", "v6e:2x4", (2, 4, 1), 8, "TPU v6 lite", 32, 918, 1640),
)}


class TPUCheckError(ConfigError):
    """The check cannot run here (no usable libtpu, an unknown target, a batch the slice cannot split): a fix
    the user can make (a `ConfigError`, so a `ValueError` too)."""


def target(name: str) -> TPU:
    if name not in TPUS:
        raise TPUCheckError(f"unknown TPU {name!r}: expected one of {', '.join(TPUS)}")
    return TPUS[name]


# ----------------------------------------------------------------------------- libtpu


def libtpu_expected() -> str | None:
    """The libtpu the installed jax pins in its `tpu` extra (`jax[tpu]`), e.g. "0.0.23" or "0.0.42.*"."""
    for req in importlib.metadata.requires("jax") or ():
        m = re.match(r"libtpu\s*==\s*([\w.*]+).*extra\s*==\s*['\"]tpu['\"]", req)
        if m:
            return m.group(1)
    return None


def libtpu_found() -> tuple[str | None, str | None]:
    """`(library path, version)` of the libtpu a compile here uses: the one this process loaded
    already, else `TPU_LIBRARY_PATH`, else the installed `libtpu` package (jax's order). The
    version is None where nothing says it."""
    loaded = _loaded_libtpu()
    if loaded:
        return loaded, _version_at(loaded)
    path = os.environ.get("TPU_LIBRARY_PATH")
    if path and os.path.isfile(path):
        return path, _version_at(path)  # an unpacked wheel keeps its dist-info beside the package folder
    try:
        import libtpu
    except ImportError:
        return None, None
    return libtpu.get_library_path(), importlib.metadata.version("libtpu")


def _loaded_libtpu() -> str | None:
    """The libtpu.so this process has mapped already (jax loads the installed libtpu when it starts
    its backends, TPU or not), which is the one any compile here will use: a plugin loads once."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if line.rstrip().endswith("/libtpu.so"):
                    return line.split(None, 5)[-1].strip()
    except OSError:  # not Linux: libtpu runs on Linux only
        pass
    return None


def _version_at(path: str) -> str | None:
    top = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    infos = [d for d in os.listdir(top) if re.match(r"libtpu-[\w.]+\.dist-info$", d)] if os.path.isdir(top) else []
    return infos[0][len("libtpu-"):-len(".dist-info")] if len(infos) == 1 else None


def _pairs(version: str | None, expected: str | None) -> bool:
    if version is None or expected is None:
        return True  # nothing to compare: the probe decides
    return version == expected or (expected.endswith(".*") and version.startswith(expected[:-1]))


def how_to_get_libtpu() -> str:
    expected = libtpu_expected()
    pin = f"libtpu=={expected}" if expected else "libtpu"
    # jax named on the same line: where an index lacks jax's own libtpu, pip would otherwise move jax
    # to a version it finds one for (measured: jax 0.12.1 -> 0.12.0.1 where libtpu 0.0.53 was missing).
    return (f'pip install "torch2flax[tpu-check]" "jax=={jax.__version__}" (brings {pin}, jax\'s own pair); '
            f'or, to keep the libtpu installed here (a TPU runtime\'s), `pip download --no-deps "{pin}"`, unzip '
            "the wheel and set TPU_LIBRARY_PATH=<folder>/libtpu/libtpu.so")


_PROBE = """
import json, sys, jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
t = topologies.get_topology_desc(platform="tpu", **json.loads(sys.argv[1]))
s = jax.ShapeDtypeStruct((128, 128), jnp.bfloat16, sharding=NamedSharding(Mesh(t.devices, ("b",)), P()))
jax.jit(lambda x: x @ x).lower(s).compile()
"""


@functools.cache
def _probe(path: str, topology_kwargs: str) -> tuple[int, str]:
    # ALLOW_MULTIPLE_LIBTPU_LOAD: this process may hold libtpu's lockfile (jax starts a TPU backend
    # whenever libtpu is installed, even with no TPU); the child only describes a topology.
    env = {**os.environ, "TPU_LIBRARY_PATH": path, "TPU_SKIP_MDS_QUERY": "1", "JAX_PLATFORMS": "cpu",
           "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    done = subprocess.run([sys.executable, "-c", _PROBE, topology_kwargs], env=env,
                          capture_output=True, text=True, timeout=600)
    return done.returncode, done.stderr


def tpu_devices(tpu: TPU) -> tuple[list[Any], str]:
    """The devices to compile for and where they come from: this machine's TPU when it is the
    target, else libtpu's description of the target's topology."""
    local = jax.local_devices()
    if local[0].platform == "tpu":
        if local[0].device_kind == tpu.device_kind and len(local) == tpu.devices:
            return local, "this machine's TPU"
    path, version = libtpu_found()
    if path is None:
        raise TPUCheckError(f"compiling for a {tpu.name} needs libtpu, and none is installed: {how_to_get_libtpu()}")
    # A libtpu that does not pair with jax can crash the process (SIGSEGV compiling for a topology: jax
    # 0.7.2 with libtpu 0.0.21.1), which would take a notebook's kernel with it: try it in a child first.
    code, err = _probe(path, json.dumps(tpu.topology_kwargs()))  # a string: the cache's key
    if code != 0:
        expected = libtpu_expected()
        why = f"killed by signal {-code}" if code < 0 else "failed: " + _last_lines(err, 3)
        loaded = (" (this process loaded it when jax started; to use another, set TPU_LIBRARY_PATH before "
                  "jax is imported: restart the kernel, or run `torch2flax tpu-check` in a shell)"
                  if _loaded_libtpu() else "")
        raise TPUCheckError(
            f"libtpu {version or '(version unknown)'} at {path} {why} compiling a test program for a {tpu.name}"
            + loaded + (f"; jax {jax.__version__} pairs with libtpu {expected}" if not _pairs(version, expected) else "")
            + f": {how_to_get_libtpu()}")
    os.environ["TPU_LIBRARY_PATH"] = path  # jax loads the plugin on first use, from here
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off a TPU VM
    # libtpu's lockfile guards a TPU's chips; describing a topology opens none, and another process
    # (a notebook that ran a check, a second shell) may hold the lock.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="tpu", **tpu.topology_kwargs())
    note = f"libtpu {version or path}'s {tpu.topology} topology"
    if not _pairs(version, libtpu_expected()):
        note += f" (jax {jax.__version__} pins libtpu {libtpu_expected()}: an unpaired libtpu)"
    return list(topo.devices), note


def _last_lines(text: str, n: int) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


# ----------------------------------------------------------------------------- compiling


@dataclass
class Compiled:
    """One step compiled (or refused) at one global batch."""

    global_batch: int
    fits: bool
    error: str | None = None  # the compiler's message (None: compiled)
    out_of_memory: bool = False
    seconds: float = 0.0
    memory: dict[str, int] = field(default_factory=dict)  # XLA's per-device bytes
    flops: float | None = None  # per device, per step
    bytes_accessed: float | None = None
    ops: dict[str, int] = field(default_factory=dict)  # layout work in the optimized HLO: transposes, copies
    lowering_failed: bool = False  # the error came from lowering the step, before the TPU compiler


def _is_oom(message: str) -> bool:
    return "RESOURCE_EXHAUSTED" in message or "Ran out of memory" in message


def _cost(compiled: Any) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # jax < 0.8: one dict per program
        cost = cost[0] if cost else {}
    return dict(cost or {})


def _memory(compiled: Any) -> dict[str, int]:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0)) for k in ("argument", "output", "alias", "temp",
                                                                    "generated_code")}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    return out


def compile_once(lower: Callable[[], Any], global_batch: int) -> Compiled:
    t0 = time.perf_counter()
    try:
        lowered = lower()
    except Exception as e:  # the step could not be built for these devices (`lowering_failed`)
        return Compiled(global_batch, False, str(e), False, time.perf_counter() - t0, lowering_failed=True)
    try:
        compiled = lowered.compile()
    except Exception as e:  # the compiler's verdict is the result (XlaRuntimeError/JaxRuntimeError by version)
        message = str(e)
        return Compiled(global_batch, False, message, _is_oom(message), time.perf_counter() - t0)
    cost = _cost(compiled)
    return Compiled(global_batch, True, None, False, time.perf_counter() - t0, _memory(compiled),
                    cost.get("flops"), cost.get("bytes accessed"), hlo_ops(compiled.as_text()))


def hlo_ops(text: str) -> dict[str, int]:
    """How many of the layout-moving ops (and convolutions, for scale) the optimized HLO holds."""
    return {op: len(re.findall(rf" {op}\(", text)) for op in ("transpose", "copy", "convolution", "fusion")}


def _abstract(tree: Any, layout: str, n: int, sharding: Any) -> Any:
    if layout == "pmap":
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((n, *x.shape), x.dtype), tree)
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class StepBuilder:
    """Lowers the trainer's steps for a device set at any batch (the model is built once)."""

    def __init__(self, config: TrainConfig, devices: list[Any]):
        from torch2flax.train.state import create_train_state, make_optimizer
        from torch2flax.train.trainer import init_model

        self.module, variables, _ = init_model(config)
        tx = make_optimizer(config, 1000, self.module.no_weight_decay())  # steps/epoch: a constant of the schedule
        # Shapes only: the optimiser state and the EMA copy are never materialised.
        self.state = jax.eval_shape(lambda v: create_train_state(v, tx, seed=config.seed, ema=config.ema_decay > 0),
                                    variables)
        self.state_bytes = {k: _nbytes(getattr(self.state, k)) for k in ("params", "opt_state", "batch_stats",
                                                                         "ema_params")}
        self.devices = devices
        self.use_layout(config, config.parallel)

    def use_layout(self, config: TrainConfig, layout: str) -> None:
        """The steps for `layout` ("pmap" or "jit"); the model and state stay."""
        from torch2flax.train.trainer import build_steps

        self.config = replace(config, parallel=layout)
        self.par = Parallel(layout, self.devices)
        self.p_train, self.p_eval = build_steps(self.config, self.par, self.module)

    def _args(self, global_batch: int, *, mask: bool) -> tuple[Any, Any]:
        n = len(self.par.devices)
        size = self.config.image_size
        batch = {"image": jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.uint8),
                 "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32)}
        if mask:
            batch["mask"] = jax.ShapeDtypeStruct((global_batch,), jnp.bool_)
        if self.par.layout == "pmap":
            batch = {k: jax.ShapeDtypeStruct((n, global_batch // n, *v.shape[1:]), v.dtype) for k, v in batch.items()}
            return _abstract(self.state, "pmap", n, None), batch
        replicated = NamedSharding(self.par.mesh, PartitionSpec())
        split = NamedSharding(self.par.mesh, PartitionSpec(AXIS))
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=split) for k, v in batch.items()}
        return _abstract(self.state, "jit", n, replicated), batch

    def train(self, global_batch: int) -> Compiled:
        return compile_once(lambda: self.p_train.lower(*self._args(global_batch, mask=False)), global_batch)

    def eval(self, global_batch: int) -> Compiled:
        return compile_once(lambda: self.p_eval.lower(*self._args(global_batch, mask=True)), global_batch)

    def batch_bytes(self, global_batch: int) -> int:
        size = self.config.image_size
        return global_batch * (size * size * 3 + 4)  # uint8 images and int32 labels, all devices


def _nbytes(tree: Any) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def largest_batch(fits: Callable[[int], Compiled], start: int, devices: int, capacity: float, *,
                  tolerance: float = 0.0625, max_per_device: int = 4096) -> tuple[int | None, list[Compiled]]:
    """The largest global batch (a multiple of `devices`) that compiles, to within `tolerance`
    (relative) of the smallest that does not.

    Each try is a compile (minutes for a large model on a small host), so the next batch is
    predicted: memory grows roughly linearly with the batch (activations), so a line through two
    measured batches (`_predict`) up to `capacity` (or the usable HBM libtpu names in its
    out-of-memory message) gives the guess, kept inside the bracket so that each try shrinks it;
    before two points exist, the batch doubles or halves.
    """
    tried: list[Compiled] = []
    lo = hi = None  # per-device batches: lo compiles, hi does not
    b = max(start // devices, 1)
    while True:
        result = fits(b * devices)
        tried.append(result)
        if result.error is not None and not result.out_of_memory:
            raise _CompileError(result)
        if result.fits:
            lo = b if lo is None else max(lo, b)
        else:
            hi = b if hi is None else min(hi, b)
        if lo is None and hi == 1:
            return None, tried
        if lo is not None and (lo >= max_per_device or (hi is not None and hi - lo <= max(1, int(lo * tolerance)))):
            return lo * devices, tried
        if lo is None:
            b = hi // 2
            continue
        step = max(1, int(lo * tolerance / 2))
        guess = _predict(tried, _hbm_limit(tried) or capacity, devices)
        if hi is None:  # still growing: the line's answer, at most 8x, else double
            b = min(max(guess, lo + step), 8 * lo) if guess is not None else 2 * lo
            b = min(b, max_per_device)
        else:
            # The line's answer, an eighth of the bracket away from its ends at least: memory is not linear
            # in the batch (XLA:TPU changes its plan under pressure), so each try must shrink the bracket.
            margin = max((hi - lo) // 8, step)
            b = (lo + hi) // 2 if guess is None else min(max(guess, lo + margin), hi - margin)
            b = min(max(b, lo + 1), hi - 1)


def _predict(tried: list[Compiled], limit: float, devices: int) -> int | None:
    """The per-device batch where a line through two measured batches meets `limit`: the two
    nearest the limit among those that compiled and those refused (whose memory libtpu's
    out-of-memory message gives)."""
    points = sorted({t.global_batch: m for t in tried if (m := _measured(t, tried)) is not None}.items())
    if len(points) < 2:
        return None
    below = [p for p in points if p[1] <= limit]
    above = [p for p in points if p[1] > limit]
    (b0, m0), (b1, m1) = (below[-1], above[0]) if below and above else (points[-2], points[-1])
    slope = (m1 - m0) / (b1 - b0)
    if slope <= 0:
        return None
    return int((b0 + (limit - m0) / slope) // devices)


_SIZE = r"([\d.]+)([GMK])"  # libtpu's sizes: "15.75G"


def _bytes(match: re.Match, group: int = 1) -> float:
    return float(match.group(group)) * {"G": GiB, "M": 1024**2, "K": 1024}[match.group(group + 1)]


def _measured(t: Compiled, tried: list[Compiled]) -> float | None:
    """A try's per-device HBM: XLA's plan where it compiled, libtpu's count where it did not
    ("Used 20.00G of 15.75G hbm"; newer: "HLO temporaries (24.00G) exceeds available HBM", to which
    the non-temporary bytes of the nearest compiled batch are added)."""
    if t.fits:
        return t.memory.get("total")
    m = re.search(rf"Used {_SIZE} of", t.error or "")
    if m:
        return _bytes(m)
    m = re.search(rf"HLO temporaries \({_SIZE}\)", t.error or "")
    fitted = [f for f in tried if f.fits and f.memory]
    if m and fitted:
        near = min(fitted, key=lambda f: abs(f.global_batch - t.global_batch))
        return _bytes(m) + near.memory["total"] - near.memory["temp"]
    return None


class _CompileError(Exception):
    def __init__(self, result: Compiled):
        super().__init__(result.error)
        self.result = result


def _hbm_limit(tried: list[Compiled]) -> float | None:
    """The usable HBM libtpu reported in an out-of-memory message ("Used 20.00G of 15.75G hbm")."""
    for t in tried:
        m = re.search(rf"of {_SIZE} hbm|exceeds available HBM \({_SIZE}\)", t.error or "")
        if m:
            return _bytes(m, 1 if m.group(1) else 3)
    return None


# ----------------------------------------------------------------------------- the report


@dataclass
class TPUReport:
    tpu: str
    devices: int
    device_kind: str
    compiled_for: str  # this machine's TPU, or libtpu's topology
    model: str
    image_size: int
    dtype: str
    parallel: str  # the layout compiled (jit where pmap could not be lowered)
    note: str | None
    global_batch: int
    per_device_batch: int
    compiled: bool
    error: str | None
    fits: bool
    out_of_memory: bool  # refused for HBM (else `error` is another compiler error)
    hbm_per_device: int  # nominal capacity (bytes)
    memory: dict[str, int]  # XLA's per-device bytes: argument, output, alias, temp, generated_code, total
    state: dict[str, int]  # logical bytes of the replicated state: params, opt_state, batch_stats, ema_params
    batch_per_device: int
    flops_per_image: float | None
    bytes_per_image: float | None
    bound_images_per_s: float | None  # roofline bound over all devices: min(compute, HBM bandwidth)
    bound_by: str | None
    hlo_ops: dict[str, int]  # the train step's optimized HLO: transposes, copies, convolutions, fusions
    eval_memory: dict[str, int] | None
    eval_flops_per_image: float | None
    largest_global_batch: int | None
    search_capped: bool  # the largest batch is the search's cap (max_per_device), not HBM's limit
    search: list[dict[str, Any]]
    compile_seconds: float
    versions: dict[str, str | None]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def tpu_check(config: TrainConfig, tpu: str = "v5e-8", *, search: bool = True, eval_step: bool = True,
              tolerance: float = 0.0625, max_per_device: int = 4096,
              log: Callable[[str], None] | None = None) -> TPUReport:
    """Compile `config`'s train (and eval) step for `tpu` at `config.batch_size`, and with
    `search`, find the largest global batch that compiles. Nothing is run; no weights are loaded
    (`pretrained`/`checkpoint` are dropped: shapes are all that count)."""
    spec = target(tpu)
    log = log or (lambda s: None)
    t_start = time.perf_counter()
    config = replace(config, pretrained=False, checkpoint=None, num_devices=None)
    if not config.num_classes:  # the file's classes, else timm's ImageNet head
        if config.init:
            import torch2flax.io as io

            config = replace(config, num_classes=io.load(config.init, portable=False)[0].num_classes)
        else:
            config = replace(config, num_classes=1000)
    if config.batch_size % spec.devices:
        raise TPUCheckError(f"batch_size={config.batch_size} does not split over the {spec.devices} devices of a "
                            f"{tpu}: use a multiple of {spec.devices}")
    devices, source = tpu_devices(spec)
    devices = devices[: spec.devices]
    log(f"tpu-check: compiling {config.model or config.init} for a {tpu} ({len(devices)} x {devices[0].device_kind}, "
        f"{source})")
    note = None
    builder = StepBuilder(config, devices)
    first = builder.train(config.batch_size)
    if first.lowering_failed and config.parallel == "pmap":  # pmap over a topology's devices: some jax refuse it
        note = (f"pmap could not be lowered for this topology ({_last_lines(first.error, 1)}); "
                "compiled the --parallel jit program instead (same step, NamedSharding over a mesh)")
        builder.use_layout(config, "jit")
        first = builder.train(config.batch_size)
    log(f"tpu-check: batch {config.batch_size}: " + ("compiled" if first.fits else "refused")
        + f" in {first.seconds:.0f} s")
    if first.error is not None and not first.out_of_memory:
        search = False  # not a memory question: the compiler's error is the answer
    largest, cache = None, {first.global_batch: first}
    if search:

        def fits(global_batch: int) -> Compiled:
            if global_batch not in cache:
                cache[global_batch] = builder.train(global_batch)
                r = cache[global_batch]
                log(f"tpu-check: batch {global_batch}: " + ("compiled" if r.fits else "out of HBM" if r.out_of_memory
                                                            else "refused") + f" in {r.seconds:.0f} s")
            return cache[global_batch]

        try:
            largest, _ = largest_batch(fits, config.batch_size, len(devices), spec.hbm_gib * GiB,
                                       tolerance=tolerance, max_per_device=max_per_device)
        except _CompileError:
            pass  # a batch the compiler refused for another reason than HBM: the search stops there
    tried = sorted(cache.values(), key=lambda t: t.global_batch)
    ev = builder.eval(config.batch_size) if eval_step and first.fits else None
    n, per_device = len(devices), config.batch_size // len(devices)
    flops_img = first.flops / per_device if first.flops else None
    bytes_img = first.bytes_accessed / per_device if first.bytes_accessed else None
    bound, by = None, None
    if flops_img:
        compute = spec.peak_bf16_tflops * 1e12 / flops_img * n
        memory = spec.hbm_gbps * 1e9 / bytes_img * n if bytes_img else float("inf")
        bound, by = min(compute, memory), ("compute" if compute <= memory else "HBM bandwidth")
    _, libtpu_version = libtpu_found()
    return TPUReport(
        tpu=tpu, devices=n, device_kind=devices[0].device_kind, compiled_for=source,
        model=config.model or os.fspath(config.init), image_size=config.image_size, dtype=config.dtype,
        parallel=builder.par.layout, note=note, global_batch=config.batch_size, per_device_batch=per_device,
        compiled=first.error is None, error=first.error, fits=first.fits, out_of_memory=first.out_of_memory,
        hbm_per_device=int(spec.hbm_gib * GiB), memory=first.memory, state=builder.state_bytes,
        batch_per_device=builder.batch_bytes(config.batch_size) // n,
        flops_per_image=flops_img, bytes_per_image=bytes_img, bound_images_per_s=bound, bound_by=by,
        hlo_ops=first.ops,
        eval_memory=ev.memory if ev and ev.fits else None,
        eval_flops_per_image=ev.flops / per_device if ev and ev.flops else None,
        largest_global_batch=largest, search_capped=largest is not None and largest >= max_per_device * n,
        search=[{"global_batch": t.global_batch, "fits": t.fits, "total_bytes": t.memory.get("total"),
                 "seconds": round(t.seconds, 1)} for t in tried],
        compile_seconds=time.perf_counter() - t_start,
        versions={"jax": jax.__version__, "libtpu": libtpu_version, "libtpu_paired": libtpu_expected()})


def _gib(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 4 else f"{n / 1024**2:.1f} MiB"


def format_tpu_report(r: TPUReport) -> str:
    lines = [f"tpu-check: {r.model} on a {r.tpu} ({r.devices} x {r.device_kind}; {r.compiled_for})",
             f"  step: {r.parallel}, {r.dtype}, {r.image_size} px, global batch {r.global_batch} "
             f"({r.per_device_batch} per device)"]
    if r.note:
        lines.append(f"  note: {r.note}")
    if r.error and not r.out_of_memory:
        lines.append("  NOT COMPILED: the TPU compiler refused the train step:")
        lines += ["    " + ln for ln in r.error.strip().splitlines()[:20]]
        return "\n".join(lines)
    if r.fits:
        m, s = r.memory, r.state
        lines += [
            "  compiled: yes",
            f"  HBM per device: {_gib(m.get('total'))} of {_gib(r.hbm_per_device)} "
            f"({100 * m.get('total', 0) / r.hbm_per_device:.0f}%)",
            f"    parameters + optimiser state: {_gib(s['params'] + s['opt_state'])} "
            f"(params {_gib(s['params'])}, optimiser {_gib(s['opt_state'])}"
            + (f", EMA {_gib(s['ema_params'])}" if s["ema_params"] else "")
            + f", BatchNorm statistics {_gib(s['batch_stats'])})",
            f"    arguments (state + this device's batch, XLA's layout): {_gib(m.get('argument'))}",
            f"    temporaries (activations, gradients, scratch): {_gib(m.get('temp'))}",
            f"    outputs not written in place: {_gib(m.get('output', 0) - m.get('alias', 0))}; "
            f"program: {_gib(m.get('generated_code'))}"]
        if r.eval_memory:
            lines.append(f"  eval step: {_gib(r.eval_memory['total'])} per device"
                         + (f", {r.eval_flops_per_image / 1e9:.2f} GFLOP per image" if r.eval_flops_per_image else ""))
    else:
        lines.append(f"  does NOT fit: {_last_lines(r.error or '', 1)[:300]}")
        lines += ["    " + ln for ln in (r.error or "").strip().splitlines()[1:12]]
    if r.flops_per_image:
        lines.append(f"  train step: {r.flops_per_image / 1e9:.2f} GFLOP and {r.bytes_per_image / 1e6:.1f} MB of HBM "
                     f"traffic per image")
        lines.append(f"  roofline bound: at most {r.bound_images_per_s:,.0f} images/s over {r.devices} devices "
                     f"({r.bound_by}-bound at the chip's peak; a bound, not a measurement)")
    if r.search:
        steps = ", ".join(f"{t['global_batch']} {'ok' if t['fits'] else 'no'}" for t in r.search)
        lines.append(f"  largest global batch that compiles: {r.largest_global_batch or 'none'}"
                     + (" (the search's cap; more may fit)" if r.search_capped else "") + f" (tried: {steps})")
    lines.append(f"  {r.compile_seconds:.0f} s; jax {r.versions['jax']}, libtpu {r.versions['libtpu'] or '?'}")
    return "\n".join(lines)
