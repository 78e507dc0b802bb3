"""`torch2flax tpu-check`: the trainer's steps compiled for TPUs on this CPU machine (libtpu
describes the TPU; train/tpu_check.py). Reduced models only: a full-size model's TPU compile
takes minutes on 2 cores (the full-size sweep is benchmarks/tpu_check.py).

libtpu comes from TORCH2FLAX_TEST_LIBTPU (the Makefile and .ci/stack set it to the libtpu the
stack's jax pairs with, `.ci/libtpu.py path`), else whatever jax would load itself. It is made
visible to this file's worker only, through TPU_LIBRARY_PATH, after jax started its CPU backend.
"""
from __future__ import annotations

import json
import math
import os
import subprocess

import numpy as np
import pytest

from tests.helpers import console_script, save_reduced_resnet18

NUM_CLASSES = 5
# timm's test_efficientnet goes through the exported-graph backend (depthwise convs, SE, SiLU).
EXPORTED = "test_efficientnet"


@pytest.fixture(scope="module")
def libtpu():
    import jax

    from torch2flax.train.tpu_check import how_to_get_libtpu, libtpu_found

    path, env_before = os.environ.get("TORCH2FLAX_TEST_LIBTPU"), os.environ.get("TPU_LIBRARY_PATH")
    if path:
        os.environ["TPU_LIBRARY_PATH"] = path
    if libtpu_found()[0] is None:
        pytest.fail("no libtpu for the TPU compile tests: `make test` sets TORCH2FLAX_TEST_LIBTPU "
                    f"(python3 .ci/libtpu.py path .venv); or {how_to_get_libtpu()}")
    # As users compile: the suite's JAX_DISABLE_MOST_OPTIMIZATIONS (tests/conftest.py) would give the
    # TPU compiler's -O0 memory plan; the persistent cache is for the CPU programs.
    def value(name):  # flags with a context manager are attributes; the others only read()
        return getattr(jax.config, name) if hasattr(jax.config, name) else jax.config.read(name)

    names = ("jax_disable_most_optimizations", "jax_enable_compilation_cache")
    before = {name: value(name) for name in names}
    for name in names:
        jax.config.update(name, False)
    yield libtpu_found()
    for name in names:
        jax.config.update(name, before[name])
    # The CLI subprocesses of the test files after this one in the worker start without it (with it,
    # each would start a TPU backend); this process keeps the plugin it loaded.
    if env_before is None:
        os.environ.pop("TPU_LIBRARY_PATH", None)
    else:
        os.environ["TPU_LIBRARY_PATH"] = env_before


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """The training tests' reduced resnet18 (native backend) as a model file."""
    return str(save_reduced_resnet18(tmp_path_factory.mktemp("tpu") / "r18.msgpack", NUM_CLASSES))


def _config(**kw):
    from torch2flax.train.config import TrainConfig

    return TrainConfig(**{"num_classes": NUM_CLASSES, "dtype": "bfloat16", **kw})


def _param_bytes(variables) -> int:
    import jax

    return sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(variables["params"]))


# ---------------------------------------------------------------------------------------- search


def _linear_hbm(base: float, per_image: float, capacity: float, calls: list, power: float = 1.0):
    """A stand-in compiler: memory = base + per_image * batch ** power, refused above `capacity`."""
    from torch2flax.train.tpu_check import Compiled

    def fits(global_batch: int) -> Compiled:
        calls.append(global_batch)
        total = int(base + per_image * global_batch**power)
        if total > capacity:
            return Compiled(global_batch, False, f"RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. "
                            f"Used {total / 2**30:.2f}G of {capacity / 2**30:.2f}G hbm.", True)
        return Compiled(global_batch, True, memory={"total": total})

    return fits


@pytest.mark.parametrize("start,base,per_image,power,most", [
    (64, 2e9, 11e6, 1.0, 5), (512, 1e9, 90e6, 1.0, 6), (8, 14e9, 3e6, 1.0, 6),
    # memory per image falling with the batch (XLA:TPU's plan changes under pressure: measured, a
    # reduced resnet18 at 384 px took 3.2 GiB at 32 images and fitted 634): the line overshoots
    (32, 0.1e9, 300e6, 0.6, 9)])
def test_largest_batch_is_within_tolerance_of_the_limit_in_few_compiles(start, base, per_image, power, most):
    from torch2flax.train.tpu_check import largest_batch

    capacity, devices, calls = 15.75 * 2**30, 8, []
    best, tried = largest_batch(_linear_hbm(base, per_image, capacity, calls, power), start, devices, 16 * 2**30)
    true_max = int(((capacity - base) / per_image) ** (1 / power)) // devices * devices
    assert best % devices == 0 and best <= true_max
    assert best >= true_max / 1.0625 - devices, (best, true_max, calls)
    assert len(calls) <= most, calls  # each is minutes for a large model
    assert [t.global_batch for t in tried] == calls


def test_largest_batch_none_when_one_image_per_device_does_not_fit_and_errors_stop_the_search():
    from torch2flax.train.tpu_check import Compiled, _CompileError, largest_batch

    calls = []
    best, tried = largest_batch(_linear_hbm(17e9, 1e6, 15.75 * 2**30, calls), 32, 8, 16 * 2**30)
    assert best is None and calls == [32, 16, 8]
    with pytest.raises(_CompileError, match="UNIMPLEMENTED"):
        largest_batch(lambda b: Compiled(b, False, "UNIMPLEMENTED: an op"), 32, 8, 16 * 2**30)


# --------------------------------------------------------------------------------------- libtpu


def test_missing_libtpu_names_the_extra(monkeypatch):
    import sys

    from torch2flax.train.tpu_check import TPUCheckError, target, tpu_devices

    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu -> ImportError
    with pytest.raises(TPUCheckError, match=r'pip install "torch2flax\[tpu-check\]" "jax=='):
        tpu_devices(target("v5e-8"))


def test_a_libtpu_that_fails_is_tried_in_a_child_and_named(tmp_path, monkeypatch):
    """A broken or unpaired libtpu (jax 0.7.2 + libtpu 0.0.21.1 dies of SIGSEGV compiling for a
    topology) fails a child process, not this one (a notebook's kernel)."""
    from torch2flax.train.tpu_check import TPUCheckError, target, tpu_devices

    bogus = tmp_path / "libtpu.so"
    bogus.write_bytes(b"not a shared library")
    monkeypatch.setenv("TPU_LIBRARY_PATH", str(bogus))
    with pytest.raises(TPUCheckError, match=f"at {bogus} (failed|killed).*compiling a test program for a v3-8"):
        tpu_devices(target("v3-8"))


def test_unknown_tpu_lists_the_known():
    from torch2flax.train.tpu_check import TPUCheckError, target

    with pytest.raises(TPUCheckError, match="unknown TPU 'v9-8': expected one of v3-8, "):
        target("v9-8")
    from torch2flax.errors import ConfigError
    from torch2flax.train.cli import TPU_NAMES
    from torch2flax.train.tpu_check import TPUS

    assert issubclass(TPUCheckError, ConfigError) and issubclass(TPUCheckError, ValueError)  # a user's fix
    assert TPU_NAMES == tuple(TPUS)  # the CLI's choices (kept free of jax's import) are the targets


@pytest.mark.slow
def test_a_v4_8_is_four_megacore_devices(libtpu):
    """A v4 chip's two cores are one device (jax shows a v4-8 as 4 devices of 32 GiB): libtpu's
    default "v4:2x2x1" would describe 8 single-core devices, and per-device memory would be halved."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from torch2flax.train.tpu_check import target, tpu_devices

    tpu = target("v4-8")
    devices, _ = tpu_devices(tpu)
    assert (len(devices), {d.device_kind for d in devices}, tpu.hbm_gib) == (4, {"TPU v4"}, 32)
    assert len({tuple(d.coords) for d in devices}) == 4  # one device per chip
    x = jax.ShapeDtypeStruct((4 * 128, 256), jnp.bfloat16,
                             sharding=NamedSharding(Mesh(np.array(devices), ("b",)), PartitionSpec("b")))
    compiled = jax.jit(lambda a: a @ a.T).lower(x).compile()
    assert compiled.memory_analysis().argument_size_in_bytes == 128 * 256 * 2  # a quarter of x per device


# --------------------------------------------------------------------------------------- compiling


_EXPORTED_CONFIG = dict(model=EXPORTED, image_size=32, batch_size=16, ema_decay=0.99, mixup=0.8)
_SMALL = dict(image_size=32, batch_size=16)  # 2 images per device: the quickest compiles


@pytest.fixture(scope="module")
def reports(libtpu, reduced):
    """Each case compiled once, when a test first asks for it (a TPU compile of these takes 5-15 s
    here; the core tier asks for four of the six)."""
    from torch2flax.train.tpu_check import tpu_check

    cases = {("native", "v5e-8"): dict(init=reduced, image_size=64, batch_size=64),  # the FLOP count's
             ("native", "v3-8"): dict(init=reduced, **_SMALL),
             ("export", "v5e-8"): _EXPORTED_CONFIG, ("export", "v3-8"): _EXPORTED_CONFIG,
             ("native-jit", "v3-8"): dict(init=reduced, **_SMALL, parallel="jit"),
             ("native-128", "v3-8"): dict(init=reduced, image_size=32, batch_size=128)}

    class Compiled(dict):
        def __missing__(self, key):
            config = _config(**cases[key])
            self[key] = config, tpu_check(config, key[1], search=False, eval_step="-" not in key[0])
            return self[key]

    return Compiled()


# slow: TPU compiles (libtpu, 5-30 s each). core: the train and eval steps only, since Kaggle's stack pairs
# jax 0.7.2 with libtpu 0.0.23 as Colab's does, whose full run has the rest (the FLOP count, memory, jit,
# the CLI: checks of our code, ~2 min).
@pytest.mark.slow
@pytest.mark.core
@pytest.mark.parametrize("tpu,kind,devices", [("v5e-8", "TPU v5 lite", 8), ("v3-8", "TPU v3", 8)])
@pytest.mark.parametrize("backend", ["native", "export"])
def test_train_and_eval_steps_compile_for_the_tpu_in_bfloat16(reports, reduced, backend, tpu, kind, devices):
    import torch2flax

    config, r = reports[backend, tpu]
    if backend == "native":
        variables = torch2flax.load(reduced)[1]
    else:
        variables = torch2flax.prepare_model(EXPORTED, num_classes=NUM_CLASSES, image_size=32).variables
    assert r.compiled and r.fits and r.error is None, r.error
    assert (r.devices, r.device_kind, r.parallel, r.dtype) == (devices, kind, "pmap", "bfloat16")
    assert r.state["params"] == _param_bytes(variables)
    assert r.state["ema_params"] == (r.state["params"] if config.ema_decay else 0)
    assert r.state["opt_state"] >= 2 * r.state["params"]  # AdamW's two moments
    # A replicated state is every device's argument: XLA's layout pads it, never shrinks it.
    assert r.memory["argument"] >= r.state["params"] + r.state["opt_state"] + r.batch_per_device
    assert r.memory["total"] > r.memory["argument"] and r.memory["temp"] > 0
    assert r.eval_memory["total"] < r.memory["total"]  # no gradients, no optimiser update
    assert 0 < r.eval_flops_per_image < r.flops_per_image
    assert r.bound_images_per_s > 0 and r.bound_by in ("compute", "HBM bandwidth")
    assert r.hlo_ops["convolution"] > 0 and r.hlo_ops["fusion"] > 0


@pytest.mark.slow
def test_jit_layout_compiles_with_the_same_flops_as_pmap(reports):
    pmap, jit = reports["native", "v3-8"][1], reports["native-jit", "v3-8"][1]
    assert jit.parallel == "jit" and jit.fits and jit.eval_memory is None
    assert jit.flops_per_image == pytest.approx(pmap.flops_per_image, rel=0.05)


@pytest.mark.slow
@pytest.mark.core  # Kaggle's stack (jax 0.7.2, libtpu 0.0.23) checks its cost analysis too; Colab's shares them
def test_flops_match_torch_flop_counter_for_a_conv_net(reports):
    """The train and eval steps' FLOPs per image against torch's count of timm's own passes
    (FlopCounterMode counts convolutions and matmuls, where it agrees with XLA for dense ones).
    Measured on the reduced resnet18 at 64 px, 8 images per device (libtpu 0.0.42.1, bfloat16):
    train 72.3 against 74.3 MFLOP, eval 29.1 against 31.2: XLA leaves out the taps that fall on zero
    padding and adds the elementwise work and the optimiser's; within 10% either way."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tests.helpers import REDUCED_RESNET18

    config, r = reports["native", "v5e-8"]
    model = timm.create_model("resnet18", num_classes=NUM_CLASSES, **REDUCED_RESNET18)
    x = torch.randn(8, 3, config.image_size, config.image_size)
    with FlopCounterMode(display=False) as train:
        model.train()(x).sum().backward()
    with FlopCounterMode(display=False) as evaluation, torch.no_grad():
        model.eval()(x)
    assert r.flops_per_image == pytest.approx(train.get_total_flops() / 8, rel=0.1)
    assert r.eval_flops_per_image == pytest.approx(evaluation.get_total_flops() / 8, rel=0.1)
    assert r.flops_per_image > 2 * r.eval_flops_per_image  # a backward pass costs about two forwards


@pytest.mark.slow
def test_memory_grows_with_the_batch(reports):
    small, large = reports["native", "v3-8"][1], reports["native-128", "v3-8"][1]
    assert large.memory["argument"] > small.memory["argument"]  # the batch is an argument
    # 2 -> 16 images per device: the activations grow, beside the gradients and the optimiser's
    # scratch, which do not (2 -> 4 left the temporaries at 9.6 MB: the scratch dominated)
    assert large.memory["temp"] > small.memory["temp"] and large.memory["total"] > small.memory["total"]
    assert large.state == small.state


@pytest.mark.slow
@pytest.mark.tpu_search
def test_the_largest_batch_compiles_within_hbm_and_1_25x_does_not(libtpu, reduced):
    """On a v5e-1 (16 GiB): the batch the search reports compiles within HBM in an independent
    compile of the same step, whose HBM equals the report's, and 1.25x that batch is refused by the
    TPU compiler for HBM. 768-px images of the reduced resnet18 fill a chip at 113-131 (libtpu
    0.0.42.1); each compile near the limit takes ~25 s here, so the search starts close to it."""
    import jax

    from torch2flax.train.parallel import Parallel
    from torch2flax.train.state import create_train_state, make_optimizer
    from torch2flax.train.tpu_check import TPUS, tpu_check, tpu_devices
    from torch2flax.train.trainer import build_steps, init_model

    size = 768
    config = _config(init=reduced, image_size=size, batch_size=112, dtype="float32")
    # tolerance 0.2: the search's last bracket is within 20%, so 1.25x its answer lies past it
    r = tpu_check(config, "v5e-1", eval_step=False, tolerance=0.2)
    fitted = {s["global_batch"]: s["total_bytes"] for s in r.search if s["fits"]}
    refused = [s["global_batch"] for s in r.search if not s["fits"]]
    assert r.largest_global_batch == max(fitted) and not r.search_capped
    assert min(refused) <= 1.2 * r.largest_global_batch + 1, r.search

    # The same step built here, from a concrete state, with its own abstract arguments.
    devices, _ = tpu_devices(TPUS["v5e-1"])
    module, variables, _ = init_model(config)
    state = create_train_state(variables, make_optimizer(config, 1000, module.no_weight_decay()), seed=0, ema=False)
    p_train, _ = build_steps(config, Parallel("pmap", devices), module)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((1, *np.shape(x)), np.asarray(x).dtype), state)

    def compile_at(batch):
        batch = {"image": jax.ShapeDtypeStruct((1, batch, size, size, 3), np.uint8),
                 "label": jax.ShapeDtypeStruct((1, batch), np.int32)}
        return p_train.lower(abstract, batch).compile()

    m = compile_at(r.largest_global_batch).memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
             + m.generated_code_size_in_bytes)
    assert total == fitted[r.largest_global_batch] <= r.hbm_per_device
    with pytest.raises(Exception, match="(RESOURCE_EXHAUSTED|Ran out of memory)"):
        compile_at(math.ceil(1.25 * r.largest_global_batch))


# ------------------------------------------------------------------------------------------- CLI


def _shell(*args, env=None):
    return subprocess.run([console_script(), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_cli_json_and_train_refuses_a_batch_that_does_not_fit(libtpu, reduced, tmp_path, capsys):
    """From the shell (a second process loading libtpu beside this one, which holds its lockfile)
    and, for `train --tpu-check`, through the CLI's main in this process."""
    from torch2flax.cli import main

    proc = _shell("tpu-check", reduced, "--tpu", "v5e-8", "--image-size", "32", "--batch-size", "16",
                  "--dtype", "bfloat16", "--no-search", "--json", env={"TPU_LIBRARY_PATH": libtpu[0]})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["compiled"] and report["tpu"] == "v5e-8" and report["per_device_batch"] == 2
    assert report["memory"]["total"] > 0 and report["flops_per_image"] > 0 and len(report["search"]) == 1

    # Before any data is read (these globs match nothing), a batch of 8192 512-px images on one
    # v5e chip is refused, and the run does not start.
    code = main(["train", "--tpu-check", "v5e-1", "--init", reduced, "--train", str(tmp_path / "none-*.tfrec"),
                 "--val", str(tmp_path / "none-*.tfrec"), "--num-classes", str(NUM_CLASSES), "--image-size", "512",
                 "--batch-size", "8192", "--out", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "does NOT fit" in out
    assert "--tpu-check v5e-1: the train step does not fit in HBM at --batch-size 8192" in err
    assert not (tmp_path / "run").exists()
