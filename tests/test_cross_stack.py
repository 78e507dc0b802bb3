"""A model file written on one end of the supported range loads on the other with the same logits.

The other stack is the command in $TORCH2FLAX_OTHER_PYTHON: `make test-oldest` sets it to the upper
end's Python (the newest releases' venv, run in the Debian 13 root by `.ci/trixie run`, when it has
been made; else .venv's), so this runs, in both directions, on the lower stack's suite; `make test`
leaves it out (`-m "not cross_stack"`). The files go under the checkout's build/, which the Debian
root sees at the same path (not /tmp).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile

import pytest

from tests import cross_stack
from tests.helpers import single_device_env

TOL = 1e-5
# slow: subprocess runs on the other stack; core: parity every stack runs
pytestmark = [pytest.mark.cross_stack, pytest.mark.slow, pytest.mark.core]


@pytest.fixture(scope="module")
def other_python() -> str:
    python = os.environ.get("TORCH2FLAX_OTHER_PYTHON")
    if not python:
        pytest.skip("set TORCH2FLAX_OTHER_PYTHON to another stack's python (make test-oldest does)")
    return python


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def shared_dir():
    """A folder both stacks see at one path (under build/, bind-mounted into the Debian root)."""
    os.makedirs(os.path.join(ROOT, "build"), exist_ok=True)
    path = tempfile.mkdtemp(prefix="cross-stack-", dir=os.path.join(ROOT, "build"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _other(python: str, *args: str) -> dict:
    # One CPU device is enough and starts faster; none of this stack's XLA flags (conftest's are
    # chosen for this jax: another XLA aborts on a flag it does not know).
    env = {**single_device_env(), "XLA_FLAGS": ""}
    proc = subprocess.run([*shlex.split(python), "-m", "tests.cross_stack", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_files_written_on_the_other_stack_load_here_with_the_same_logits(other_python, shared_dir):
    theirs = _other(other_python, "write", shared_dir)
    assert theirs != cross_stack.versions(), "the other python runs the same stack"
    errors = cross_stack.check(shared_dir)
    assert set(errors) == set(cross_stack.MODELS)
    assert all(e <= TOL for e in errors.values()), (errors, theirs, cross_stack.versions())


def test_files_written_here_load_on_the_other_stack_with_the_same_logits(other_python, shared_dir):
    cross_stack.write(shared_dir)
    report = _other(other_python, "check", shared_dir)
    assert set(report["errors"]) == set(cross_stack.MODELS)
    assert all(e <= TOL for e in report["errors"].values()), report


def test_a_compile_cache_the_other_stack_wrote_is_compiled_again_here(other_python, shared_dir):
    """jax's cache key holds jaxlib's version: the other stack's entries are misses here (nothing
    loaded, nothing fatal), and this stack adds its own beside them."""
    from tests.test_compile_cache import run_program

    cache = os.path.join(shared_dir, "cache")
    theirs = run_program(cache, shlex.split(other_python), cwd=ROOT, xla_flags="")
    ours = run_program(cache, cwd=ROOT, xla_flags="")  # the same (no) flags: only the versions differ
    assert theirs["entries"] and ours["hits"] == 0
    assert set(theirs["entries"]) < set(ours["entries"])
    assert abs(ours["value"] - theirs["value"]) <= 1e-5 * abs(theirs["value"])
