"""JAX's persistent compilation cache as `train`, `predict` and `demo` use it (`train.compile_cache`):
where it goes, that a second process loads its programs from it, and that entries it cannot use
(unreadable, or written by another jax: tests/test_cross_stack.py) are compiled again, not fatal.
A resumed run loading its train and eval steps from the entries of the run it continues (a killed
`torch2flax train --compile-cache DIR`): tests/test_cv.py::test_a_fold_killed_partway_resumes_exactly."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import single_device_env

# One program, compiled with the cache at argv[1]; prints the cache hits, its value and the entries.
PROGRAM = """
import json, os, sys
import jax, jax.numpy as jnp
from torch2flax.train import compile_cache
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
path = compile_cache.enable(sys.argv[1])
value = jax.jit(lambda x: jnp.tanh(x @ x.T / 64).sum())(jnp.arange(64 * 64.0).reshape(64, 64) / 4096)
print(json.dumps({"hits": len(hits), "value": float(value), "entries": sorted(os.listdir(path)), "path": path}))
"""


def run_program(cache: str, python: str | list[str] = sys.executable, cwd: str | None = None,
                xla_flags: str | None = None) -> dict:
    """PROGRAM in a fresh process (`python`: a command, for another stack; `xla_flags`: that
    stack's, since this one's may name flags another XLA aborts on)."""
    cmd = [*([python] if isinstance(python, str) else python), "-c", PROGRAM, cache]
    env = single_device_env(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # conftest's: here the folder is the one given
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# slow: three fresh processes; core: every stack's jax reads and writes the cache
@pytest.mark.slow
@pytest.mark.core
def test_a_second_process_loads_from_the_cache_and_an_unreadable_entry_is_compiled_again(tmp_path):
    cache = str(tmp_path / "cache")
    cold = run_program(cache)
    assert cold["hits"] == 0 and cold["entries"] and cold["path"] == cache
    warm = run_program(cache)
    # every program of the first process (the jitted function and the ops building its input) comes from the cache
    assert warm["hits"] == len(cold["entries"]) and warm["value"] == cold["value"] and warm["entries"] == cold["entries"]
    for name in cold["entries"]:  # a torn or foreign file where the entry was
        with open(os.path.join(cache, name), "wb") as f:
            f.write(b"\x00not an executable" * 64)
    broken = run_program(cache)
    assert broken["hits"] == 0 and broken["value"] == cold["value"]


@pytest.fixture
def no_jax_dir(monkeypatch):
    """jax.config as a process without $JAX_COMPILATION_CACHE_DIR has it (conftest sets one)."""
    import jax

    from torch2flax.train import compile_cache

    saved = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setattr(compile_cache, "_enabled", [])
    yield
    jax.config.update("jax_compilation_cache_dir", saved)


def test_where_the_cache_goes(no_jax_dir, monkeypatch, tmp_path):
    import jax

    from torch2flax.train.compile_cache import ENV, resolve

    monkeypatch.setattr("torch2flax.train.compile_cache.on_kaggle", lambda: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve(None, "runs/a") == str(tmp_path / "xdg" / "torch2flax" / "jax-compile-cache")
    monkeypatch.setattr("torch2flax.train.compile_cache.on_kaggle", lambda: True)
    assert resolve(None, "runs/a") == os.path.abspath("runs/a/compile-cache")  # beside the run's checkpoints
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "users"))
    assert resolve(None, "runs/a") == str(tmp_path / "users")  # JAX_COMPILATION_CACHE_DIR / jax.config's
    monkeypatch.setenv(ENV, str(tmp_path / "env"))
    assert resolve(None, "runs/a") == str(tmp_path / "env")
    assert resolve(str(tmp_path / "flag"), "runs/a") == str(tmp_path / "flag")  # --compile-cache wins
    assert resolve("none", "runs/a") is None and resolve("None") is None
    assert resolve("auto", "runs/a") == str(tmp_path / "env")
    monkeypatch.setenv(ENV, "none")
    assert resolve(None, "runs/a") is None


def test_train_predict_and_demo_take_the_flag():
    from torch2flax.cli import build_parser

    parser = build_parser()
    for command in (["train", "--train", "x"], ["predict", "--checkpoint", "c", "--test", "t"], ["demo"]):
        assert parser.parse_args([*command, "--compile-cache", "none"]).compile_cache == "none"
        assert parser.parse_args([*command, "--compile-cache", "/c"]).compile_cache == "/c"
    assert parser.parse_args(["predict", "--checkpoint", "c", "--test", "t"]).compile_cache == "auto"
    assert parser.parse_args(["train", "--train", "x"]).compile_cache is None  # the config's (auto) unless given

