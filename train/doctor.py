"""`torch2flax doctor`: what this environment is, and what in it will hurt a run.

Most failures on Kaggle and Colab come from the environment, not the code: a jax that does not
match the image's libtpu, JAX silently on CPU next to a GPU, a 64 MB Docker /dev/shm under
loader workers, torch and JAX both grabbing GPU memory, a DataLoader forked from a process that
runs JAX's threads. `collect` gathers the facts (the platform too: Kaggle, Colab, a Cloud TPU VM)
and turns those into warnings that say what to do; `format_report` and `summary_line` print them.

Every probe of the outside world (installed distributions, importable modules, JAX, files under
/dev, /proc, /sys and /kaggle) goes through a small module-level function so that tests can patch
it; environment variables come from `collect`'s `env`.

Notebook::

    import torch2flax
    torch2flax.doctor(batch_size=64, image_size=384)
"""
from __future__ import annotations

import glob
import importlib.util
import math
import multiprocessing as mp
import os
import platform
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

__all__ = ["DoctorWarning", "Report", "collect", "doctor", "format_report", "summary_line"]

# Distributions reported, in order; the first of a tuple that is installed gives the version.
PACKAGES: dict[str, tuple[str, ...]] = {
    "jax": ("jax",), "jaxlib": ("jaxlib",), "libtpu": ("libtpu", "libtpu-nightly"), "flax": ("flax",),
    "optax": ("optax",), "orbax-checkpoint": ("orbax-checkpoint",), "grain": ("grain",), "torch": ("torch",),
    "torchvision": ("torchvision",), "timm": ("timm",), "albumentations": ("albumentations",),
    "numpy": ("numpy",), "scipy": ("scipy",),
    "opencv": ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless", "opencv-contrib-python"),
}
# Environment variables that change what JAX does with the devices; shown when set.
ENV_VARS = ("JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES", "XLA_PYTHON_CLIENT_MEM_FRACTION",
            "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_ALLOCATOR", "XLA_FLAGS")
PREFETCH_FACTOR = 2  # make_loader's default
# fit builds a training and a validation loader; both keep their workers (and the workers their
# shared-memory slots) for the whole run.
LOADERS = 2
_TPU_LOCKFILE = "/tmp/libtpu_lockfile"
# Platforms recognised: stable key -> display name.
PLATFORMS = {"kaggle": "Kaggle", "colab": "Colab", "cloud-tpu-vm": "Cloud TPU VM", "other": "other"}
# Environment variables each platform sets in its notebooks' kernels.
KAGGLE_ENV = ("KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE", "KAGGLE_DATA_PROXY_TOKEN")
COLAB_ENV = ("COLAB_RELEASE_TAG", "COLAB_GPU", "COLAB_TPU_ADDR", "COLAB_BACKEND_VERSION")
TPU_VM_ENV = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID")
# (jax, libtpu) pairs a platform ships although jax[tpu] pins another libtpu: they run on that
# platform's TPUs, and are no user's upgrade, so they get no warning. Colab's TPU runtime
# (googlecolab/backend-info, 2026-08-19); Kaggle's TPU image forces libtpu 0.0.17 for torch_xla 2.8.
SHIPPED_PAIRS = {"colab": {("0.7.2", "0.0.21.1")}, "kaggle": {("0.7.2", "0.0.17")}}


@dataclass
class DoctorWarning:
    """A problem found: `what` is wrong, `fix` says what to do; `key` is its name in `summary_line`."""

    key: str
    what: str
    fix: str


@dataclass(repr=False)
class Report:
    """Facts about this environment (`collect`); JSON-able with `dataclasses.asdict`. Sizes are bytes,
    None where the platform does not tell."""

    platform: str  # display name: "Kaggle", "Colab", "Cloud TPU VM" or "other"
    platform_key: str  # its key in PLATFORMS: "kaggle", "colab", "cloud-tpu-vm", "other"
    accelerator_type: str | None  # TPU_ACCELERATOR_TYPE, e.g. "v5litepod-8"; None: not told
    versions: dict[str, str | None]
    libtpu_expected: str | None  # the libtpu jax[tpu]==<jax> pins (e.g. "0.0.42.*"); None: jax names none
    libtpu_pair_ok: bool | None  # installed libtpu is that one; None: no libtpu, or no pin to compare
    libtpu_shipped: bool  # not that one, but the pair this platform ships (SHIPPED_PAIRS)
    backend: str  # jax.default_backend(), or "unavailable" where JAX failed to start
    devices: list[tuple[str, int]]  # (device_kind, count) over every process's devices
    local_device_count: int
    process_count: int
    process_index: int
    matmul_precision: str | None  # None: JAX's default
    torch_cuda: str | None  # CUDA version torch was built for; None: a CPU/ROCm build or no torch
    gpu_present: bool  # an accelerator (GPU or TPU) is attached, whether or not JAX uses it
    tpu_host: bool  # a TPU is attached or in use, or libtpu is installed on Kaggle/Colab/a Cloud TPU VM
    accelerator_nodes: list[str]  # the device files that say so
    cpus_affinity: int
    cpu_quota: float | None  # cgroup CPU limit in CPUs; None: no limit
    memory_total: int | None
    memory_available: int | None
    shm_total: int | None
    shm_free: int | None
    start_method: str
    start_method_explicit: bool  # set by multiprocessing.set_start_method, not the platform default
    batch_size: int
    image_size: int
    num_workers: int  # per loader, as `torch2flax train` would choose it
    num_workers_reason: str
    shm_needed: int  # most /dev/shm the loaders' worker slots can take at this batch
    environment: dict[str, str] = field(default_factory=dict)
    warnings: list[DoctorWarning] = field(default_factory=list)

    def __repr__(self) -> str:
        # Short, so that `torch2flax.doctor()` as a notebook cell's last line does not echo the
        # whole report a second time below the printed one.
        return f"<Report {summary_line(self)}>"


# ---- probes: each touches the outside world once; tests patch them ----

def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _dist_requires(name: str) -> list[str]:
    try:
        return metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return []


def _jax_runtime() -> dict[str, Any]:
    import jax

    return dict(backend=jax.default_backend(), device_kinds=[d.device_kind for d in jax.devices()],
                local_device_count=jax.local_device_count(), process_count=jax.process_count(),
                process_index=jax.process_index(), matmul_precision=jax.config.jax_default_matmul_precision)


def _torch_cuda() -> str | None:
    """The CUDA version torch was built for, without importing torch for it."""
    torch = sys.modules.get("torch")
    if torch is not None:  # already paid for: ask it
        return getattr(getattr(torch, "version", None), "cuda", None)
    version = _dist_version("torch")
    if version is None:
        return None
    local = version.partition("+")[2]  # download.pytorch.org wheels: 2.8.0+cu126, +cpu, +rocm6.4
    if local:
        digits = local[2:]
        return f"{digits[:-1]}.{digits[-1]}" if local.startswith("cu") and digits.isdigit() else None
    # PyPI's Linux wheels carry no suffix and depend on the CUDA runtime instead; the requirement is
    # platform-gated, so it applies only where that distribution was actually installed.
    for req in _dist_requires("torch"):
        m = re.match(r"\s*(nvidia-cuda-runtime(?:-cu\d+)?|cuda-toolkit)\s*(?:\[[^\]]*\])?\s*==\s*(\d+)\.(\d+)", req)
        if m and _dist_version(m.group(1)) is not None:
            return f"{m.group(2)}.{m.group(3)}"
    return None


def _importable(name: str) -> bool:
    """Whether module `name` can be imported, without importing it (its parent packages are)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing or broken, or a module without __spec__
        return False


def _glob(pattern: str) -> list[str]:
    return sorted(glob.glob(pattern))


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _statvfs(path: str) -> Any:
    return os.statvfs(path)


def _affinity() -> int:
    from torch2flax.loaders.loader import usable_cpus  # affinity mask, os.cpu_count() where there is none

    return usable_cpus()


def _start_method() -> tuple[str, bool]:
    """(start method, set explicitly). get_start_method() without allow_none, like
    mp.get_context(), would fix the default and make a later set_start_method fail."""
    chosen = mp.get_start_method(allow_none=True)
    return (chosen, True) if chosen else (mp.get_all_start_methods()[0], False)  # first: the default


# ---- parsing ----

def parse_cpu_max(text: str | None) -> float | None:
    """cgroup v2 `cpu.max` ("QUOTA PERIOD", QUOTA "max" when unlimited) as CPUs; None: no limit."""
    parts = (text or "").split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _cpu_quota() -> float | None:
    text = _read("/sys/fs/cgroup/cpu.max")
    if text is not None:
        return parse_cpu_max(text)
    for d in ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"):  # cgroup v1; quota -1: no limit
        quota, period = _read(f"{d}/cpu.cfs_quota_us"), _read(f"{d}/cpu.cfs_period_us")
        if quota is not None and period is not None:
            return parse_cpu_max(f"{quota.strip()} {period.strip()}")
    return None


def _meminfo() -> tuple[int | None, int | None]:
    values = {}
    for line in (_read("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[key] = int(fields[0]) * 1024  # kB
    return values.get("MemTotal"), values.get("MemAvailable")


def _shm() -> tuple[int | None, int | None]:
    try:
        st = _statvfs("/dev/shm")
    except OSError:  # macOS, Windows: no /dev/shm
        return None, None
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def _slot_bytes(local_batch: int, image_size: int) -> int:
    """Bytes of one shared-memory slot (loaders.shared.SlotPool.pack): header, then uint8 images,
    int64 labels and the evaluation mask, each 64-byte aligned."""
    fields = (local_batch * image_size * image_size * 3, local_batch * 8, local_batch)
    return 64 + sum(-(-n // 64) * 64 for n in fields)


def _shm_needed(workers: int, slot_bytes: int) -> int:
    from torch2flax.loaders.loader import slots_per_worker

    return LOADERS * workers * slots_per_worker(PREFETCH_FACTOR, workers) * slot_bytes if workers else 0


def recognise_platform(env: Mapping[str, str], tpu_attached: bool) -> str:
    """The key in PLATFORMS of the platform this runs on, from `env` and the files and modules it has."""
    # Environment variables first: the platforms' kernels set them, whereas /kaggle/input and google.colab
    # can turn up elsewhere (a Docker image copied from Kaggle's, a pip-installed google-colab).
    if any(k in env for k in KAGGLE_ENV):
        return "kaggle"
    if any(k in env for k in COLAB_ENV):
        return "colab"
    if _exists("/kaggle/input"):
        return "kaggle"
    if _importable("google.colab"):
        return "colab"
    return "cloud-tpu-vm" if tpu_attached or any(k in env for k in TPU_VM_ENV) else "other"


def _sees_tpu(backend: str, device_kinds: list[str]) -> bool:
    return backend == "tpu" or any("tpu" in kind.lower() for kind in device_kinds)


def _size(n: float | None) -> str:
    if n is None:
        return "unknown"
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


# ---- collect ----

def collect(*, batch_size: int = 128, image_size: int = 224, num_workers: int | str = "auto",
            env: Mapping[str, str] | None = None) -> Report:
    """Gather the facts and the warnings for a run at `batch_size` (global) and `image_size`.

    Starts JAX's backends: in a multi-host run call it after `jax.distributed.initialize`.
    `env`: the environment variables to read (default `os.environ`).
    """
    env = os.environ if env is None else env
    versions = {"Python": platform.python_version(), "torch2flax": _dist_version("torch2flax")}
    for name, dists in PACKAGES.items():
        versions[name] = next((v for v in map(_dist_version, dists) if v is not None), None)
    warnings: list[DoctorWarning] = []

    try:
        jax_rt = _jax_runtime()
    except Exception as e:  # a doctor reports a broken JAX instead of dying of it
        jax_rt = dict(backend="unavailable", device_kinds=[], local_device_count=0, process_count=1,
                      process_index=0, matmul_precision=None)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        warnings.append(DoctorWarning(
            "JAX failed to start", f"JAX failed to start: {type(e).__name__}: {first}",
            "Install jax and jaxlib of one version: `pip install "
            + (f"\"jax=={versions['jax']}\" \"jaxlib=={versions['jax']}\"`" if versions["jax"] else "jax`")
            + " (jax[tpu] or jax[cuda12] on an accelerator), then restart the runtime."))
    kinds: dict[str, int] = {}
    for kind in jax_rt["device_kinds"]:
        kinds[kind] = kinds.get(kind, 0) + 1

    gpu_nodes = _glob("/dev/nvidia[0-9]*")
    # TPU VMs: /dev/accel* (v2-v4), numbered VFIO groups (v5e and later; /dev/vfio/vfio alone is not a TPU).
    tpu_nodes = _glob("/dev/accel[0-9]*") + _glob("/dev/vfio/[0-9]*")
    cpus = _affinity()
    memory_total, memory_available = _meminfo()
    shm_total, shm_free = _shm()
    start_method, explicit = _start_method()

    # The worker count `torch2flax train` picks, from the facts above so the report agrees with itself.
    from torch2flax.loaders.loader import MEMORY_FRACTION, training_workers

    local_batch = max(batch_size // max(jax_rt["process_count"], 1), 1)
    budget = None if memory_available is None else int(memory_available * MEMORY_FRACTION)
    workers, reason = training_workers(num_workers, batch_size=batch_size, image_size=image_size,
                                       process_count=jax_rt["process_count"], cpus=cpus, memory_budget=budget)
    slot_bytes = _slot_bytes(local_batch, image_size)
    shm_needed = _shm_needed(workers, slot_bytes)

    tpu_attached = bool(tpu_nodes) or _sees_tpu(jax_rt["backend"], jax_rt["device_kinds"])
    platform_key = recognise_platform(env, tpu_attached)
    libtpu, pin = versions["libtpu"], _expected_libtpu()
    report = Report(
        platform=PLATFORMS[platform_key], platform_key=platform_key,
        accelerator_type=env.get("TPU_ACCELERATOR_TYPE") or None, versions=versions, libtpu_expected=pin,
        libtpu_pair_ok=_matches(libtpu, pin) if libtpu and pin else None,
        libtpu_shipped=(versions["jax"], libtpu) in SHIPPED_PAIRS.get(platform_key, ()),
        backend=jax_rt["backend"], devices=list(kinds.items()),
        local_device_count=jax_rt["local_device_count"], process_count=jax_rt["process_count"],
        process_index=jax_rt["process_index"], matmul_precision=jax_rt["matmul_precision"],
        torch_cuda=_torch_cuda(), gpu_present=bool(gpu_nodes or tpu_nodes),
        tpu_host=tpu_attached or bool(libtpu and platform_key != "other"), accelerator_nodes=gpu_nodes + tpu_nodes,
        cpus_affinity=cpus, cpu_quota=_cpu_quota(), memory_total=memory_total, memory_available=memory_available,
        shm_total=shm_total, shm_free=shm_free, start_method=start_method, start_method_explicit=explicit,
        batch_size=batch_size, image_size=image_size, num_workers=workers, num_workers_reason=reason,
        shm_needed=shm_needed, environment={k: env[k] for k in ENV_VARS if k in env}, warnings=warnings)
    warnings += _check(report, gpu_nodes, tpu_nodes, slot_bytes)
    return report


def _expected_libtpu() -> str | None:
    """The libtpu the installed jax pins in its `tpu` extra (e.g. "0.0.42.*")."""
    for req in _dist_requires("jax"):
        m = re.match(r"\s*libtpu(?:-nightly)?\s*==\s*([^;\s]+)\s*;.*extra\s*==\s*.tpu.", req)
        if m:
            return m.group(1)
    return None


def _matches(version: str, pin: str) -> bool:
    return version.startswith(pin[:-1]) if pin.endswith("*") else version == pin


def _check(r: Report, gpu_nodes: list[str], tpu_nodes: list[str], slot_bytes: int) -> list[DoctorWarning]:
    out = []
    jax_v, libtpu = r.versions["jax"], r.versions["libtpu"]
    platforms = r.environment.get("JAX_PLATFORMS")
    unset = f" Unset JAX_PLATFORMS={platforms}." if platforms and r.backend == "cpu" else ""
    has_tpu = _sees_tpu(r.backend, [kind for kind, _ in r.devices])
    usable = r.backend != "unavailable"  # where JAX failed to start, that warning says it all
    lockfile = f" ({_TPU_LOCKFILE} exists)" if tpu_nodes and _exists(_TPU_LOCKFILE) else ""
    held = ("A TPU held by an earlier notebook process is freed by restarting the runtime; "
            "`sudo lsof -w /dev/accel* /dev/vfio/*` names the holder.")

    # a) jax and libtpu of different releases on a TPU host: JAX then sees no TPU, or fails in a compile.
    mismatch = r.tpu_host and r.libtpu_pair_ok is False and not r.libtpu_shipped
    if mismatch:
        what = (f"jax {jax_v} pairs with libtpu {r.libtpu_expected} (jax[tpu]=={jax_v}), but libtpu {libtpu} "
                "is installed")
        unseen = usable and not has_tpu and bool(tpu_nodes)
        if unseen:
            what += f"; JAX sees no TPU (backend: {r.backend}): the mismatch, or another process holds it{lockfile}"
        fix = f"Install the libtpu this jax pairs with, without moving jax: `pip install \"jax[tpu]=={jax_v}\"`."
        fix += {"kaggle": " On Kaggle never upgrade jax by hand: the image pairs jax with libtpu; Run > Factory "
                          "reset undoes an upgrade.",
                "colab": " On Colab never upgrade jax by hand: the runtime pairs jax with libtpu; Runtime > "
                         "Disconnect and delete runtime undoes an upgrade."}.get(r.platform_key, "")
        out.append(DoctorWarning("jax/libtpu mismatch", what, fix + (" " + held if unseen else "") + unset))

    # b) libtpu without a TPU (an attached TPU that a mismatch explains is (a)'s).
    if usable and libtpu and not has_tpu and not (mismatch and tpu_nodes):
        what = f"libtpu {libtpu} is installed but jax {jax_v} sees no TPU (backend: {r.backend})"
        if tpu_nodes:
            if r.libtpu_pair_ok:
                what += f": libtpu matches jax {jax_v}'s pin, so another process most likely holds the TPU"
            else:
                what += f": jax {jax_v} may not match libtpu {libtpu}, or another process holds the TPU"
            what += lockfile
            install = "" if r.libtpu_pair_ok else (  # a matching pair needs no install
                f"Install the libtpu this jax pins: `pip install \"jax[tpu]=={jax_v}\"`, but on Kaggle/Colab never "
                "upgrade jax by hand (the image pairs jax with libtpu; undo it with Kaggle's Run > Factory reset or "
                "Colab's Runtime > Disconnect and delete runtime). ")
            fix = install + held + unset
        else:
            what += ", and no TPU device (/dev/accel*, /dev/vfio/N) is attached"
            fix = ("Pick a TPU accelerator (Kaggle: Settings > Accelerator; Colab: Runtime > Change runtime type), "
                   "or ignore this on a CPU/GPU machine (`pip uninstall -y libtpu` silences it); in Docker on a "
                   "TPU VM, run the container with --privileged." + unset)
        out.append(DoctorWarning("libtpu without TPU", what, fix))

    # c) JAX on CPU next to an accelerator (a TPU with libtpu installed is (a)'s or (b)'s case).
    if r.backend == "cpu" and gpu_nodes:
        hidden = r.environment.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1")
        plugin = next(((d, v) for d in ("jax-cuda13-plugin", "jax-cuda12-plugin") if (v := _dist_version(d))), None)
        why = (f"{plugin[0]} {plugin[1]} is installed but did not load (a driver older than its CUDA, or a plugin "
               "version other than jax's)" if plugin else "jaxlib alone has no CUDA support")
        out.append(DoctorWarning(
            "JAX on CPU with a GPU present",
            f"JAX {jax_v} runs on the CPU although a GPU is attached ({gpu_nodes[0]}): "
            + ("CUDA_VISIBLE_DEVICES hides it" if hidden else why),
            f"Install JAX's CUDA build for this jax: `pip install \"jax[cuda12]=={jax_v}\"` (`jax[cuda13]` with an "
            "NVIDIA driver >= 580; `nvidia-smi` shows the driver), then restart; "
            "`JAX_PLATFORMS=cuda python -c 'import jax; jax.devices()'` prints why it does not load." + unset))
    elif r.backend == "cpu" and tpu_nodes and not libtpu:
        pinned = f" (libtpu {r.libtpu_expected})" if r.libtpu_expected else ""
        out.append(DoctorWarning(
            "JAX on CPU with a TPU present",
            f"JAX {jax_v} runs on the CPU although a TPU is attached ({tpu_nodes[0]}): libtpu is not installed",
            f"Install the libtpu this jax pins{pinned}: `pip install \"jax[tpu]=={jax_v}\"`, then restart the "
            "runtime; on Kaggle/Colab choose the TPU image instead of installing by hand." + unset))

    # d) /dev/shm under the loader workers' shared-memory slots.
    if r.shm_free is not None and r.shm_needed > r.shm_free:
        from torch2flax.loaders.loader import slots_per_worker

        fits = max((w for w in range(r.num_workers) if _shm_needed(w, slot_bytes) <= r.shm_free), default=0)
        per = slots_per_worker(PREFETCH_FACTOR, r.num_workers)
        out.append(DoctorWarning(
            "/dev/shm small",
            f"/dev/shm has {_size(r.shm_free)} free of {_size(r.shm_total)}, but at batch {r.batch_size} x "
            f"{r.image_size} px the loader workers can take {_size(r.shm_needed)} ({LOADERS} loaders x "
            f"{r.num_workers} workers x {per} slots x {_size(slot_bytes)}); a full /dev/shm kills workers with "
            "'bus error' or 'No space left on device'",
            f"Use `--num-workers {fits}`{'' if fits else ' (load in the main process)'} or a smaller batch, or "
            f"give /dev/shm more room: `docker run --shm-size={math.ceil(r.shm_needed / 2**30) + 1}g`, "
            "or `sudo mount -o remount,size=8G /dev/shm`."))

    # e) torch's CUDA and JAX on one GPU. Either variable already set means the user has split it.
    split = {"XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE"} & set(r.environment)
    if r.backend in ("gpu", "cuda") and r.torch_cuda and not split:
        out.append(DoctorWarning(
            "torch and JAX share the GPU",
            f"torch {r.versions['torch']} is a CUDA {r.torch_cuda} build and JAX runs on the GPU: JAX takes "
            "75% of GPU memory at start-up, so torch code on the GPU runs out of memory (or leaves JAX short)",
            "Set XLA_PYTHON_CLIENT_MEM_FRACTION=.5 (or XLA_PYTHON_CLIENT_PREALLOCATE=false) before importing jax, "
            "and keep torch on the CPU in DataLoader workers, or install the CPU torch build: "
            "`pip install torch --index-url https://download.pytorch.org/whl/cpu`."))

    # f) fork: harmless for make_loader, which starts its own workers with forkserver.
    if r.start_method == "fork":
        origin = "set by set_start_method" if r.start_method_explicit else "the platform's default"
        out.append(DoctorWarning(
            "fork start method",
            f"multiprocessing starts processes with 'fork' ({origin}): torch2flax's loaders use forkserver, but a "
            "torch DataLoader you build with workers forks this process, which runs JAX's threads, and can "
            "deadlock (JAX warns 'os.fork() was called')",
            "Use torch2flax.make_loader, or pass multiprocessing_context=\"forkserver\" to DataLoader, or call "
            "multiprocessing.set_start_method(\"forkserver\") at the top of the script."))
    return out


# ---- output ----

def _devices_text(r: Report) -> str:
    return ", ".join(f"{count} x {kind}" for kind, count in r.devices) or "none"


def _platform_text(r: Report) -> str:
    kind = f" {r.accelerator_type}" if r.accelerator_type else ""
    return f"{r.platform}{kind} (Python {r.versions['Python']})"


def _pairing_text(r: Report) -> str:
    """Whether the installed libtpu is the one the installed jax was released with."""
    jax_v, libtpu = r.versions["jax"], r.versions["libtpu"]
    if jax_v is None:
        return "jax not installed"
    pin = (f"{r.libtpu_expected} (jax[tpu]=={jax_v})" if r.libtpu_expected
           else "unknown (jax's metadata names no libtpu for its tpu extra)")
    verdict = "missing" if not libtpu else {True: "ok", False: "mismatch", None: "unknown"}[r.libtpu_pair_ok]
    if r.libtpu_shipped:
        verdict = f"not jax[tpu]'s pin, but the pair {r.platform} ships"
    return f"jax {jax_v} pairs with libtpu {pin}; installed: {f'libtpu {libtpu}' if libtpu else 'no libtpu'} — {verdict}"


def format_report(report: Report) -> str:
    """The report as text: platform, versions, JAX, host, warnings (each with a `fix:` line)."""
    r = report
    rows: list[tuple[str, str] | str] = [f"platform: {_platform_text(r)}", "versions"]
    rows += [(name, v or "not installed") for name, v in r.versions.items()]
    local = f" ({r.local_device_count} on this process)" if r.process_count > 1 else ""
    rows += ["JAX", ("backend", r.backend)]
    rows += [("jax/libtpu", _pairing_text(r))] if r.tpu_host else []  # on a TPU host always, ok or not
    rows += [("devices", _devices_text(r) + local),
             ("processes", f"{r.process_count} (this is process {r.process_index})"),
             ("matmul precision", r.matmul_precision or "default"),
             ("torch CUDA build", (r.torch_cuda or "no (CPU build)") if r.versions["torch"] else "no torch")]
    rows += [(k, v) for k, v in r.environment.items()]
    quota = f", cgroup limit {r.cpu_quota:g}" if r.cpu_quota is not None else ""
    workers = f"{r.num_workers} per loader ({r.num_workers_reason})"
    rows += ["host", ("CPUs", f"{r.cpus_affinity} usable{quota}"),
             ("memory", f"{_size(r.memory_total)} total, {_size(r.memory_available)} available"),
             ("/dev/shm", f"{_size(r.shm_total)} total, {_size(r.shm_free)} free" if r.shm_total is not None
              else "none"),
             ("accelerator", ", ".join(r.accelerator_nodes) or "none attached"),
             ("start method", r.start_method + ("" if r.start_method_explicit else " (platform default)")),
             f"loader at batch {r.batch_size} x {r.image_size} px",
             ("workers", workers), ("/dev/shm needed", f"up to {_size(r.shm_needed)}")]
    width = max(len(row[0]) for row in rows if isinstance(row, tuple)) + 2
    lines = [row if isinstance(row, str) else f"  {row[0]:<{width}}{row[1]}" for row in rows]
    lines.append(f"warnings ({len(r.warnings)})" if r.warnings else "warnings: none")
    for i, w in enumerate(r.warnings, 1):
        lines += [f"  {i}. {w.what}", f"     fix: {w.fix}"]
    return "\n".join(lines)


def summary_line(report: Report) -> str:
    """One line for the start of a training log; points at `torch2flax doctor` when there are warnings."""
    r = report
    n = sum(count for _, count in r.devices)
    procs = f"{r.process_count} process" + ("es" if r.process_count != 1 else "")
    torch = f"torch {r.versions['torch']}" + (f" CUDA {r.torch_cuda}" if r.torch_cuda else "")
    if not r.versions["torch"]:
        torch = "no torch"
    host = f"{r.cpus_affinity} CPUs, {_size(r.memory_total)} RAM, /dev/shm {_size(r.shm_free)}"
    line = f"doctor: jax {r.versions['jax']} {r.backend} x{n} ({procs}) | platform: {_platform_text(r)} | {torch} | {host} | "
    if not r.warnings:
        return line + "0 warnings"
    keys = "; ".join(w.key for w in r.warnings)
    return line + f"{len(r.warnings)} warning{'s' if len(r.warnings) > 1 else ''}: {keys} — run torch2flax doctor"


def doctor(*, batch_size: int = 128, image_size: int = 224, num_workers: int | str = "auto",
           print_report: bool = True, summary: bool = False) -> Report:
    """Check this environment for a run at `batch_size` x `image_size`; print the report and return it.
    `summary=True` prints `summary_line` and only the warnings (with their fixes): a notebook's first output."""
    report = collect(batch_size=batch_size, image_size=image_size, num_workers=num_workers)
    if summary:
        print("\n".join([summary_line(report)] + [f"  {w.what}\n  fix: {w.fix}" for w in report.warnings]))
    elif print_report:
        print(format_report(report))
    return report
