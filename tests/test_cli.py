import subprocess
import sys
from importlib import metadata

import pytest

from tests.helpers import console_script
from torch2flax.cli import main


def test_version_comes_from_package_metadata():
    out = subprocess.run([console_script(), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"torch2flax {metadata.version('torch2flax')}"


def test_help_lists_usage_and_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "usage: torch2flax" in capsys.readouterr().out


def test_unknown_command_fails(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_module_entry_point_matchesconsole_script():
    out = subprocess.run([sys.executable, "-m", "torch2flax", "--version"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith("torch2flax ")
