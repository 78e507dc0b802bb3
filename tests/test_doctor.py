"""`torch2flax doctor`: facts and warnings, each probe of the environment patched.

JAX itself is real here (conftest: 8 CPU devices); what the tests fake is what surrounds it:
installed distributions, device files, /dev/shm, cgroup files and the start method.
"""
import dataclasses
import json
import platform
import sys
from importlib import metadata
from types import SimpleNamespace

import pytest

from torch2flax.train import doctor as d

PACKAGE_NAMES = ("Python", "jax", "jaxlib", "libtpu", "flax", "optax", "orbax-checkpoint", "grain", "torch",
                 "torchvision", "timm", "albumentations", "numpy", "scipy", "opencv")
JAX_VERSION = metadata.version("jax")
PYTHON = platform.python_version()
BIG_SHM = SimpleNamespace(f_frsize=4096, f_blocks=(1 << 40) // 4096, f_bavail=(1 << 40) // 4096)  # 1 TiB


def _fake_dists(overrides):
    real = d._dist_version

    def version(name):
        return overrides[name] if name in overrides else real(name)
    return version


def _row(text, name):
    """The value of the report row `name`."""
    [value] = [line[len(name) + 2:].strip() for line in text.splitlines() if line.startswith(f"  {name}  ")]
    return value


def _fake_glob(nodes):
    return lambda pattern: [n for n in nodes if n.startswith(pattern.split("[")[0])
                            and n[len(pattern.split("[")[0]):][:1].isdigit()]


def _on_tpu(monkeypatch, libtpu, requires):
    """JAX on 4 TPU chips (/dev/accel0-3) with `libtpu` installed and jax's metadata requiring `requires`."""
    monkeypatch.setattr(d, "_jax_runtime", lambda: dict(
        backend="tpu", device_kinds=["TPU v5 lite"] * 4, local_device_count=4, process_count=1,
        process_index=0, matmul_precision=None))
    monkeypatch.setattr(d, "_glob", _fake_glob([f"/dev/accel{i}" for i in range(4)]))
    monkeypatch.setattr(d, "_dist_version", _fake_dists({"libtpu": libtpu, "libtpu-nightly": None}))
    monkeypatch.setattr(d, "_dist_requires", lambda name: requires if name == "jax" else [])


@pytest.fixture
def healthy(monkeypatch):
    """No libtpu, no accelerator device files, a big /dev/shm, forkserver: nothing to warn about."""
    monkeypatch.setattr(d, "_dist_version", _fake_dists({"libtpu": None, "libtpu-nightly": None}))
    monkeypatch.setattr(d, "_glob", _fake_glob([]))
    monkeypatch.setattr(d, "_exists", lambda path: False)
    monkeypatch.setattr(d, "_importable", lambda name: False)
    monkeypatch.setattr(d, "_statvfs", lambda path: BIG_SHM)
    monkeypatch.setattr(d, "_start_method", lambda: ("forkserver", True))
    # No platform's own pair: on Colab's stack the installed jax 0.7.2 would make a test's libtpu one.
    monkeypatch.setattr(d, "SHIPPED_PAIRS", {})
    return monkeypatch


def test_healthy_environment_has_no_warnings(healthy):
    report = d.collect(env={})
    assert report.warnings == []
    assert report.backend == "cpu" and report.devices == [("cpu", 8)] and report.local_device_count == 8
    assert (report.process_count, report.process_index) == (1, 0)
    assert report.versions["jax"] == JAX_VERSION and report.versions["libtpu"] is None
    assert report.shm_free == 1 << 40 and report.gpu_present is False
    assert (report.platform, report.platform_key, report.accelerator_type) == ("other", "other", None)
    assert report.tpu_host is False and report.libtpu_pair_ok is None
    text = d.format_report(report)
    assert text.splitlines()[:2] == [f"platform: other (Python {PYTHON})", "versions"]
    assert "jax/libtpu" not in text  # not a TPU host: no pairing line
    for name in PACKAGE_NAMES:
        assert _row(text, name) == (report.versions[name] or "not installed"), name
    assert _row(text, "backend") == "cpu" and _row(text, "devices") == "8 x cpu"
    assert "warnings: none" in text and "fix:" not in text


def test_libtpu_without_tpu_names_both_versions(healthy):
    healthy.setattr(d, "_dist_version", _fake_dists({"libtpu": "0.0.17", "libtpu-nightly": None}))
    report = d.collect(env={})
    assert [w.key for w in report.warnings] == ["libtpu without TPU"]
    what = report.warnings[0].what
    assert f"jax {JAX_VERSION}" in what and "libtpu 0.0.17" in what
    assert "no TPU device" in what  # no /dev/accel*: this machine has no TPU at all
    assert report.tpu_host is False and "jax/libtpu" not in d.format_report(report)


def test_libtpu_mismatch_on_a_tpu_machine(healthy):
    # A TPU is attached but JAX sees none, and this jax pins another libtpu: one warning (not also
    # "libtpu without TPU" or "JAX on CPU with a TPU present"), naming the pin and the install command.
    healthy.setattr(d, "_dist_version", _fake_dists({"libtpu": "0.0.17", "libtpu-nightly": None}))
    healthy.setattr(d, "_glob", _fake_glob(["/dev/accel0", "/dev/accel1"]))
    healthy.setattr(d, "_dist_requires", lambda name: ['libtpu==0.0.42.*; extra == "tpu"'] if name == "jax" else [])
    healthy.setattr(d, "_exists", lambda path: path == "/tmp/libtpu_lockfile")
    report = d.collect(env={})
    assert report.gpu_present and report.accelerator_nodes == ["/dev/accel0", "/dev/accel1"]
    assert (report.platform, report.tpu_host, report.libtpu_pair_ok) == ("Cloud TPU VM", True, False)
    [w] = report.warnings
    assert w.key == "jax/libtpu mismatch"
    assert w.what == (f"jax {JAX_VERSION} pairs with libtpu 0.0.42.* (jax[tpu]=={JAX_VERSION}), but libtpu 0.0.17 "
                      "is installed; JAX sees no TPU (backend: cpu): the mismatch, or another process holds it "
                      "(/tmp/libtpu_lockfile exists)")
    assert f'pip install "jax[tpu]=={JAX_VERSION}"' in w.fix and "pip install -U" not in w.fix
    assert "sudo lsof" in w.fix and "Factory reset" not in w.fix  # a Cloud TPU VM: no image to reset


def test_libtpu_that_matches_but_tpu_unseen_blames_another_process(healthy):
    healthy.setattr(d, "_dist_version", _fake_dists({"libtpu": "0.0.42.1", "libtpu-nightly": None}))
    healthy.setattr(d, "_glob", _fake_glob(["/dev/vfio/0"]))
    healthy.setattr(d, "_dist_requires", lambda name: ['libtpu==0.0.42.*; extra == "tpu"'] if name == "jax" else [])
    report = d.collect(env={})
    assert report.libtpu_pair_ok is True
    [w] = report.warnings
    assert w.key == "libtpu without TPU" and "another process most likely holds the TPU" in w.what
    assert "pip install" not in w.fix and "sudo lsof" in w.fix  # nothing to install: the pair is right


@pytest.mark.parametrize("env, paths, module, nodes, key", [
    ({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, (), False, [], "kaggle"),
    ({"KAGGLE_URL_BASE": "https://www.kaggle.com"}, (), False, [], "kaggle"),
    ({"KAGGLE_DATA_PROXY_TOKEN": "t"}, (), False, [], "kaggle"),
    ({}, ("/kaggle/input",), False, [], "kaggle"),
    ({"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, (), False, ["/dev/vfio/0"], "kaggle"),  # Kaggle's TPU: still Kaggle
    ({"COLAB_RELEASE_TAG": "release-colab_20250101"}, (), False, [], "colab"),
    ({"COLAB_GPU": "1"}, (), False, [], "colab"),
    ({"COLAB_TPU_ADDR": "grpc://10.0.0.2:8470"}, (), False, [], "colab"),
    ({"COLAB_BACKEND_VERSION": "next"}, (), False, [], "colab"),
    ({}, (), True, [], "colab"),  # google.colab importable
    ({"COLAB_GPU": "0"}, ("/kaggle/input",), False, [], "colab"),  # an environment variable beats a folder
    ({}, (), False, ["/dev/accel0"], "cloud-tpu-vm"),
    ({}, (), False, ["/dev/vfio/0", "/dev/vfio/1"], "cloud-tpu-vm"),
    ({"TPU_ACCELERATOR_TYPE": "v5litepod-8"}, (), False, [], "cloud-tpu-vm"),
    ({"TPU_WORKER_ID": "0"}, (), False, [], "cloud-tpu-vm"),
    ({}, (), False, ["/dev/vfio/vfio", "/dev/nvidia0"], "other"),  # /dev/vfio/vfio alone is no TPU
])
def test_platform_recognised(healthy, env, paths, module, nodes, key):
    healthy.setattr(d, "_exists", lambda path: path in paths)
    healthy.setattr(d, "_importable", lambda name: module and name == "google.colab")
    healthy.setattr(d, "_glob", _fake_glob(nodes))
    report = d.collect(env=env)
    assert (report.platform_key, report.platform) == (key, d.PLATFORMS[key])
    assert report.accelerator_type == env.get("TPU_ACCELERATOR_TYPE")


def test_platform_and_python_in_report_summary_and_json(healthy):
    report = d.collect(env={"COLAB_RELEASE_TAG": "r"})
    assert d.format_report(report).splitlines()[0] == f"platform: Colab (Python {PYTHON})"
    assert f" cpu x8 (1 process) | platform: Colab (Python {PYTHON}) | torch" in d.summary_line(report)
    report = d.collect(env={"TPU_ACCELERATOR_TYPE": "v5litepod-8"})
    assert d.format_report(report).splitlines()[0] == f"platform: Cloud TPU VM v5litepod-8 (Python {PYTHON})"
    data = json.loads(json.dumps(dataclasses.asdict(report)))
    assert (data["platform"], data["platform_key"], data["accelerator_type"]) == ("Cloud TPU VM", "cloud-tpu-vm",
                                                                                  "v5litepod-8")
    assert data["versions"]["Python"] == PYTHON


def test_importable_does_not_import():
    assert "tabnanny" not in sys.modules  # the stdlib module this checks is one nothing here imports
    assert d._importable("tabnanny") is True and "tabnanny" not in sys.modules
    assert d._importable("no_such_package_t2f.colab") is False  # a missing parent: False, not ImportError


def test_tpu_host_with_the_paired_libtpu(healthy):
    _on_tpu(healthy, "0.0.42.1", ['jaxlib==1; extra == "tpu"', 'libtpu==0.0.42.*; extra == "tpu"'])
    report = d.collect(env={"KAGGLE_KERNEL_RUN_TYPE": "Interactive"})
    assert (report.platform, report.backend, report.devices) == ("Kaggle", "tpu", [("TPU v5 lite", 4)])
    assert (report.tpu_host, report.libtpu_expected, report.libtpu_pair_ok) == (True, "0.0.42.*", True)
    assert report.warnings == []
    assert _row(d.format_report(report), "jax/libtpu") == (
        f"jax {JAX_VERSION} pairs with libtpu 0.0.42.* (jax[tpu]=={JAX_VERSION}); installed: libtpu 0.0.42.1 — ok")
    assert d.summary_line(report).endswith("| 0 warnings")


@pytest.mark.parametrize("env, undo, other_undo", [
    ({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, "Run > Factory reset", "Disconnect and delete runtime"),
    ({"COLAB_RELEASE_TAG": "r"}, "Runtime > Disconnect and delete runtime", "Factory reset"),
    ({}, None, "never upgrade jax by hand"),  # a Cloud TPU VM: no image pairs them
])
def test_tpu_host_with_a_mismatched_libtpu(healthy, env, undo, other_undo):
    _on_tpu(healthy, "0.0.21.1", ['libtpu==0.0.23; extra == "tpu"'])
    report = d.collect(env=env)
    assert (report.tpu_host, report.libtpu_expected, report.libtpu_pair_ok) == (True, "0.0.23", False)
    [w] = report.warnings
    assert w.key == "jax/libtpu mismatch"
    assert w.what == f"jax {JAX_VERSION} pairs with libtpu 0.0.23 (jax[tpu]=={JAX_VERSION}), but libtpu 0.0.21.1 is installed"
    assert w.fix.startswith(f'Install the libtpu this jax pairs with, without moving jax: `pip install "jax[tpu]=={JAX_VERSION}"`.')
    if undo:
        assert "never upgrade jax by hand" in w.fix and undo in w.fix
    assert other_undo not in w.fix and "sudo lsof" not in w.fix  # JAX sees the TPU: nothing holds it
    assert _row(d.format_report(report), "jax/libtpu") == (
        f"jax {JAX_VERSION} pairs with libtpu 0.0.23 (jax[tpu]=={JAX_VERSION}); installed: libtpu 0.0.21.1 — mismatch")
    assert d.summary_line(report).endswith("| 1 warning: jax/libtpu mismatch — run torch2flax doctor")
    data = json.loads(json.dumps(dataclasses.asdict(report)))
    assert (data["libtpu_expected"], data["libtpu_pair_ok"], data["tpu_host"]) == ("0.0.23", False, True)


@pytest.mark.parametrize("env,platform,libtpu", [({"COLAB_RELEASE_TAG": "r"}, "Colab", "0.0.21.1"),
                                                  ({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, "Kaggle", "0.0.17")])
def test_the_pair_a_platform_ships_is_named_and_not_warned_about(healthy, env, platform, libtpu):
    # Colab's runtime ships jax 0.7.2 with libtpu 0.0.21.1, Kaggle's image with 0.0.17; jax[tpu]==0.7.2 pins 0.0.23.
    healthy.setitem(d.SHIPPED_PAIRS, platform.lower(), {(JAX_VERSION, libtpu)})
    _on_tpu(healthy, libtpu, ['libtpu==0.0.23; extra == "tpu"'])
    report = d.collect(env=env)
    assert (report.libtpu_pair_ok, report.libtpu_shipped, report.warnings) == (False, True, [])
    assert _row(d.format_report(report), "jax/libtpu") == (
        f"jax {JAX_VERSION} pairs with libtpu 0.0.23 (jax[tpu]=={JAX_VERSION}); installed: libtpu {libtpu} — "
        f"not jax[tpu]'s pin, but the pair {platform} ships")
    # The same libtpu under another jax is a user's upgrade: warned about.
    healthy.setitem(d.SHIPPED_PAIRS, platform.lower(), {("0.0.0", libtpu)})
    assert [w.key for w in d.collect(env=env).warnings] == ["jax/libtpu mismatch"]


def test_tpu_host_whose_jax_names_no_libtpu(healthy):
    _on_tpu(healthy, "0.0.23", ['jaxlib<=0.7.2,>=0.7.2', 'numpy>=1.26'])  # a jax without the tpu extra
    report = d.collect(env={})
    assert (report.platform_key, report.libtpu_expected, report.libtpu_pair_ok) == ("cloud-tpu-vm", None, None)
    assert report.warnings == []  # nothing to compare is no mismatch
    assert _row(d.format_report(report), "jax/libtpu") == (
        f"jax {JAX_VERSION} pairs with libtpu unknown (jax's metadata names no libtpu for its tpu extra); "
        "installed: libtpu 0.0.23 — unknown")


def test_tpu_host_without_libtpu(healthy):
    # JAX on CPU next to a TPU and no libtpu: the pairing line says "missing", the one warning names the pin.
    healthy.setattr(d, "_glob", _fake_glob(["/dev/accel0"]))
    healthy.setattr(d, "_dist_requires", lambda name: ['libtpu==0.0.42.*; extra == "tpu"'] if name == "jax" else [])
    report = d.collect(env={"COLAB_RELEASE_TAG": "r"})
    assert (report.platform, report.tpu_host, report.libtpu_expected, report.libtpu_pair_ok) == (
        "Colab", True, "0.0.42.*", None)
    assert _row(d.format_report(report), "jax/libtpu") == (
        f"jax {JAX_VERSION} pairs with libtpu 0.0.42.* (jax[tpu]=={JAX_VERSION}); installed: no libtpu — missing")
    [w] = report.warnings
    assert w.key == "JAX on CPU with a TPU present" and "libtpu is not installed" in w.what
    assert f'libtpu this jax pins (libtpu 0.0.42.*): `pip install "jax[tpu]=={JAX_VERSION}"`' in w.fix


def test_libtpu_on_kaggle_without_a_tpu(healthy):
    # libtpu installed on Kaggle makes a TPU host (the pairing line shows) even where no TPU is attached;
    # a mismatch there is said, and so is the missing TPU.
    healthy.setattr(d, "_dist_version", _fake_dists({"libtpu": "0.0.21.1", "libtpu-nightly": None}))
    healthy.setattr(d, "_dist_requires", lambda name: ['libtpu==0.0.23; extra == "tpu"'] if name == "jax" else [])
    report = d.collect(env={"KAGGLE_URL_BASE": "https://www.kaggle.com"})
    assert (report.platform, report.tpu_host, report.gpu_present) == ("Kaggle", True, False)
    assert [w.key for w in report.warnings] == ["jax/libtpu mismatch", "libtpu without TPU"]
    assert _row(d.format_report(report), "jax/libtpu").endswith("installed: libtpu 0.0.21.1 — mismatch")


def test_small_shm(healthy):
    from torch2flax.loaders.loader import slots_per_worker

    healthy.setattr(d, "_statvfs", lambda path: SimpleNamespace(f_frsize=1000, f_blocks=64_000, f_bavail=64_000))
    report = d.collect(batch_size=128, image_size=224, num_workers=2, env={})
    # a slot: 64-byte header, 128 images, int64 labels, bool mask; train + validation loader.
    slot = 64 + 128 * 224 * 224 * 3 + 128 * 8 + 128
    assert report.num_workers == 2 and report.shm_needed == 2 * 2 * slots_per_worker(2, 2) * slot == 385_376_000
    [w] = report.warnings
    assert w.key == "/dev/shm small"
    assert "64 MB free" in w.what and "385 MB" in w.what
    assert "--num-workers 0" in w.fix and "--shm-size=" in w.fix  # even 1 worker needs 270 MB


def test_no_workers_need_no_shm(healthy):
    healthy.setattr(d, "_statvfs", lambda path: SimpleNamespace(f_frsize=1000, f_blocks=64_000, f_bavail=64_000))
    report = d.collect(num_workers=0, env={})
    assert report.shm_needed == 0 and report.warnings == []


def test_auto_workers_follow_the_cpus_found(healthy):
    healthy.setattr(d, "_affinity", lambda: 1)
    report = d.collect(env={})
    assert (report.cpus_affinity, report.num_workers, report.shm_needed) == (1, 0, 0)
    assert report.num_workers_reason.startswith("auto: 1 usable CPU")


def test_gpu_present_but_jax_on_cpu(healthy):
    healthy.setattr(d, "_glob", _fake_glob(["/dev/nvidia0"]))
    healthy.setattr(d, "_dist_version", _fake_dists({"libtpu": None, "libtpu-nightly": None,
                                                     "jax-cuda12-plugin": None, "jax-cuda13-plugin": None}))
    report = d.collect(env={})
    assert report.gpu_present and report.backend == "cpu"
    [w] = report.warnings
    assert w.key == "JAX on CPU with a GPU present" and "/dev/nvidia0" in w.what
    assert f'pip install "jax[cuda12]=={JAX_VERSION}"' in w.fix


def test_torch_cuda_and_jax_on_one_gpu(healthy):
    healthy.setattr(d, "_jax_runtime", lambda: dict(
        backend="gpu", device_kinds=["NVIDIA H100 80GB HBM3"], local_device_count=1, process_count=1,
        process_index=0, matmul_precision=None))
    healthy.setattr(d, "_glob", _fake_glob(["/dev/nvidia0"]))
    healthy.setattr(d, "_torch_cuda", lambda: "12.6")
    [w] = d.collect(env={}).warnings
    assert w.key == "torch and JAX share the GPU" and "CUDA 12.6" in w.what
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=.5" in w.fix and "whl/cpu" in w.fix
    assert d.collect(env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}).warnings == []  # already split


def test_fork_start_method(healthy):
    healthy.setattr(d, "_start_method", lambda: ("fork", False))
    report = d.collect(env={})
    [w] = report.warnings
    assert w.key == "fork start method" and "platform's default" in w.what
    assert 'multiprocessing_context="forkserver"' in w.fix and 'set_start_method("forkserver")' in w.fix


def test_jax_that_fails_to_start_is_reported(healthy):
    def broken():
        raise RuntimeError("Unable to initialize backend 'tpu': TPU initialization failed\nmore detail")
    healthy.setattr(d, "_jax_runtime", broken)
    report = d.collect(env={})
    assert report.backend == "unavailable" and report.devices == []
    [w] = report.warnings
    assert w.key == "JAX failed to start" and w.what.endswith("TPU initialization failed")
    assert _row(d.format_report(report), "backend") == "unavailable"


@pytest.mark.parametrize("text, cpus", [("max 100000", None), ("150000 100000\n", 1.5), ("200000 100000", 2.0),
                                         ("", None)])
def test_parse_cpu_max(text, cpus):
    assert d.parse_cpu_max(text) == cpus


def test_cpu_quota_from_cgroup_files(healthy):
    files = {"/sys/fs/cgroup/cpu.max": "150000 100000\n"}
    healthy.setattr(d, "_read", lambda path: files.get(path))
    assert d.collect(env={}).cpu_quota == 1.5
    files.clear()  # cgroup v1
    files.update({"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "50000\n", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"})
    report = d.collect(env={})
    assert report.cpu_quota == 0.5
    assert report.memory_total is None  # /proc/meminfo unreadable too: unknown, not a crash
    files["/sys/fs/cgroup/cpu/cpu.cfs_quota_us"] = "-1\n"
    assert d.collect(env={}).cpu_quota is None


@pytest.mark.parametrize("version, requires, installed, cuda", [
    ("2.8.0+cu126", [], set(), "12.6"),
    ("2.8.0+cpu", [], set(), None),
    ("2.14.1", ['cuda-toolkit[cublas,cudart]==13.0.3; platform_system == "Linux"'], {"cuda-toolkit"}, "13.0"),
    ("2.4.0", ['nvidia-cuda-runtime-cu12==12.1.105; platform_system == "Linux"'], {"nvidia-cuda-runtime-cu12"}, "12.1"),
    ("2.14.1", ['cuda-toolkit[cublas]==13.0.3; platform_system == "Linux"'], set(), None),  # macOS: not installed
])
def test_torch_cuda_without_importing_torch(monkeypatch, version, requires, installed, cuda):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(d, "_dist_version", lambda name: version if name == "torch" else
                        ("1" if name in installed else None))
    monkeypatch.setattr(d, "_dist_requires", lambda name: requires if name == "torch" else [])
    assert d._torch_cuda() == cuda


def test_summary_line(healthy):
    line = d.summary_line(d.collect(env={}))
    assert "\n" not in line
    assert line.startswith(f"doctor: jax {JAX_VERSION} cpu x8 (1 process) | platform: other (Python {PYTHON}) | torch ")
    assert line.endswith("| 0 warnings")
    healthy.setattr(d, "_dist_version", _fake_dists({"libtpu": "0.0.17", "libtpu-nightly": None}))
    healthy.setattr(d, "_statvfs", lambda path: SimpleNamespace(f_frsize=1000, f_blocks=64_000, f_bavail=64_000))
    report = d.collect(num_workers=2, env={})
    line = d.summary_line(report)
    assert "\n" not in line
    assert line.endswith("| 2 warnings: libtpu without TPU; /dev/shm small — run torch2flax doctor")
    assert repr(report) == f"<Report {line}>"  # a notebook echoes one line, not the whole dataclass


def test_cli_json_and_text(healthy, capsys):
    from torch2flax.cli import main

    assert main(["doctor", "--json", "--batch-size", "64", "--num-workers", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backend"] == "cpu" and data["devices"] == [["cpu", 8]]
    assert data["versions"]["jax"] == JAX_VERSION and (data["batch_size"], data["num_workers"]) == (64, 1)
    assert (data["platform"], data["tpu_host"], data["libtpu_pair_ok"]) == ("other", False, None)
    healthy.setattr(d, "_start_method", lambda: ("fork", False))
    assert main(["doctor"]) == 0  # warnings are advice: still exit 0
    out = capsys.readouterr().out
    assert out.startswith(f"platform: other (Python {PYTHON})\nversions\n") and "warnings (1)" in out and "     fix: Use torch2flax.make_loader" in out


def test_notebook_entry_point(healthy, capsys):
    import torch2flax

    assert torch2flax.doctor is d.doctor
    report = torch2flax.doctor(batch_size=64, image_size=96)
    assert isinstance(report, d.Report) and (report.batch_size, report.image_size) == (64, 96)
    assert capsys.readouterr().out == d.format_report(report) + "\n"


def test_notebook_summary_is_one_line_then_each_warning_with_its_fix(healthy, capsys):
    report = d.doctor(summary=True)
    assert capsys.readouterr().out.splitlines() == [d.summary_line(report)]
    healthy.setattr(d, "_start_method", lambda: ("fork", False))
    report = d.doctor(summary=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(report.warnings) == 1 and lines[0] == d.summary_line(report) and "1 warning: fork" in lines[0]
    assert lines[1:] == [f"  {report.warnings[0].what}", f"  fix: {report.warnings[0].fix}"]
