"""Test-wide setup: simulate 8 CPU devices so multi-device code runs everywhere.

XLA reads XLA_FLAGS once, when jax initialises its backends, so this must run
before any test module imports jax.
"""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

# The TPU compile tests' libtpu (tests/test_tpu_check.py). Where the stack installs a libtpu of its
# own (Colab's 0.0.21.1, which crashes compiling for a topology with jax 0.7.2), jax loads that one
# when it starts, and a plugin loads once per process: so the paired one is named before jax starts.
if os.environ.get("TORCH2FLAX_TEST_LIBTPU"):
    import importlib.util

    if importlib.util.find_spec("libtpu") is not None:
        os.environ.setdefault("TPU_LIBRARY_PATH", os.environ["TORCH2FLAX_TEST_LIBTPU"])

import pytest  # noqa: E402

DEVICE_COUNTS = (1, 8)


@pytest.fixture(params=DEVICE_COUNTS, ids=lambda n: f"{n}dev")
def devices(request):
    """The first 1 or 8 local devices; a test using it runs once per count."""
    import jax

    local = jax.local_devices()
    if len(local) < request.param:
        pytest.fail(
            f"need {request.param} devices, jax sees {len(local)}: XLA_FLAGS was set "
            "after jax initialised (import jax only inside tests or fixtures)"
        )
    return local[: request.param]


@pytest.fixture(scope="session")
def r18():
    """A timm resnet18 (eval mode) with randomised BatchNorm, and a copy of its state dict."""
    import timm
    import torch

    from tests.helpers import randomize_batchnorm

    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model("resnet18", pretrained=False), seed=2).eval()
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def pytest_configure(config):
    # JAX's persistent compilation cache, under pytest's cache dir: a rerun (and every
    # subprocess the CLI tests start, which inherit the variables) reuses compiled programs.
    if getattr(config, "cache", None) is not None:
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(config.cache.mkdir("jax-compilation-cache")))
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


# The longest test files, longest first: with `--dist loadfile --no-loadscope-reorder` (Makefile)
# pytest-xdist hands out files in collection order (by default it orders them by test count, which
# sent the 2-test, 3-minute shell fine-tune file last: one worker ran it alone for 3 minutes).
_LONGEST_FIRST = ("test_export.py", "test_tpu_check.py", "test_train.py", "test_demo.py", "test_finetune.py", "test_multihost.py",
                  "test_models_resnet.py", "test_notebook.py", "test_export_api.py", "test_heads.py", "test_ops.py",
                  "test_cv.py", "test_explain.py", "test_nnx.py", "test_io.py", "test_layers.py")


# The tiers are markers on the tests (registered in setup.cfg). `slow`: subprocess and shell runs,
# fits, full-size models, TPU compiles, and every exported architecture but one; `make test-fast`
# runs the rest, each module's unit tests, in about a minute; `make test` runs both. `core`: the
# parity and training tests that every stack runs with the fast tier (`.ci/stack NAME test core`).
# A new test is in the fast tier unless it is marked.


# The suite's time is mostly XLA's compile time (most tests compile a program and run it once or
# twice: one op, one training step, a parity check), which LLVM's optimisation passes dominate.
# Without them programs compile ~40% faster (an exported ConvNeXt's training step: 15 s -> 9 s)
# and compute the same IEEE results (XLA's fast-math stays off); training runs pay in step time,
# but the whole suite is faster (docs/benchmarks.md). Set before jax is imported, so the CLI
# subprocesses the tests start compile the same way. TORCH2FLAX_TEST_XLA_DEFAULTS=1 runs every test
# as users compile it (no CI stack sets it since 2026-12-07: the Makefile's test-oldest says why).
# Unoptimised, XLA:CPU's older elemental emitters also compile about twice as fast as its MLIR
# fusion emitters (that ConvNeXt step: 6.8 s -> 3.0 s) for slower loops (a 4-epoch fit's steps:
# ~1.5x); over the suite, 30 s less of `make test` (2026-12-06).
def _known_xla_flags(flags: tuple[str, ...]) -> list[str]:
    """The `flags` the installed XLA accepts. XLA aborts the process on an XLA_FLAGS entry it does not
    know ("Unknown flag in XLA_FLAGS", jax 0.12's XLA on --xla_cpu_use_fusion_emitters), so each
    test-only flag is tried in a child process first. The answer is kept in the environment, so the
    xdist workers and the CLI subprocesses the tests start do not ask again."""
    import subprocess
    import sys

    key = "TORCH2FLAX_TEST_XLA_FLAGS_OK"
    if key not in os.environ:
        probe = "import jax; jax.devices('cpu')"
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        ok = [f for f in flags if subprocess.run([sys.executable, "-c", probe], capture_output=True,
                                                 env={**env, "XLA_FLAGS": f}).returncode == 0]
        os.environ[key] = " ".join(ok)
    return os.environ[key].split()


if os.environ.get("TORCH2FLAX_TEST_XLA_DEFAULTS") != "1":
    # jax 0.7's XLA:CPU at backend optimisation level 0 (what JAX_DISABLE_MOST_OPTIMIZATIONS sets)
    # computes wrong gradients: the SE-ResNet-50 (layers 1,1,1,1) train step of test_models_resnet
    # came out 1.2e-2 from timm's float64 gradients on jax 0.7.2 (Colab's stack, 2026-12-07), against
    # 4.4e-6 at the default level and 3.3e-6 for torch 2.9's own float32; the flag that does it is
    # --xla_backend_optimization_level=0 (--xla_llvm_disable_expensive_passes alone is right). jax
    # 0.10 and 0.12 are right at level 0. So on jax < 0.8 only LLVM's expensive passes are skipped.
    _flags = ["--xla_cpu_use_fusion_emitters=false"]
    from tests.helpers import jax_before

    if jax_before((0, 8)):
        _flags.append("--xla_llvm_disable_expensive_passes=true")
    else:
        os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    for _flag in _known_xla_flags(tuple(_flags)):
        if _flag.split("=")[0] not in os.environ["XLA_FLAGS"]:
            os.environ["XLA_FLAGS"] += " " + _flag


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept
