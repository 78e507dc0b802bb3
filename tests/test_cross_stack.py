"""A model file written on one end of the supported range loads on the other with the same logits.

The other stack is the Python in $TORCH2FLAX_OTHER_PYTHON: `make test-oldest` sets it to the upper
stack's venv (CI builds both), so this runs, in both directions, on the lower stack's suite;
`make test` leaves it out (`-m "not cross_stack"`).
"""
from __future__ import annotations

import json
import os
import subprocess

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


def _other(python: str, *args: str) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = single_device_env()  # one CPU device is enough, and starts faster
    proc = subprocess.run([python, "-m", "tests.cross_stack", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_files_written_on_the_other_stack_load_here_with_the_same_logits(other_python, tmp_path):
    theirs = _other(other_python, "write", str(tmp_path))
    assert theirs != cross_stack.versions(), "the other python runs the same stack"
    errors = cross_stack.check(str(tmp_path))
    assert set(errors) == set(cross_stack.MODELS)
    assert all(e <= TOL for e in errors.values()), (errors, theirs, cross_stack.versions())


def test_files_written_here_load_on_the_other_stack_with_the_same_logits(other_python, tmp_path):
    cross_stack.write(str(tmp_path))
    report = _other(other_python, "check", str(tmp_path))
    assert set(report["errors"]) == set(cross_stack.MODELS)
    assert all(e <= TOL for e in report["errors"].values()), report
