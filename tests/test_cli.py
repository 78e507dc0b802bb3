"""The `torch2flax` command line: entry points, convert/verify/list from the shell, a light import."""
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


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["convert", "--help"]])
def test_module_entry_point_matches_console_script(args):
    module = subprocess.run([sys.executable, "-m", "torch2flax", *args], capture_output=True, text=True)
    script = subprocess.run([console_script(), *args], capture_output=True, text=True)
    assert module.returncode == script.returncode == 0, module.stderr + script.stderr
    assert module.stdout == script.stdout and module.stdout.startswith(("torch2flax ", "usage: torch2flax"))


# slow: a full-size resnet18
@pytest.mark.slow
def test_cli_convert_then_verify(r18, tmp_path, capsys, monkeypatch):
    import timm
    from safetensors.torch import save_file

    _, state = r18
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "x.safetensors"))
    monkeypatch.chdir(tmp_path)

    def run(*args):
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, err = run("convert", "resnet18", "--timm-checkpoint", "x.safetensors", "--out", "r18.msgpack",
                         "--image-size", "32", "--batch-size", "2", "--portable")
    assert code == 0, err
    assert "logits" in out and "features" in out and "FAIL" not in out
    assert "wrote r18.msgpack" in out and "wrote r18.msgpack.json" in out
    assert (tmp_path / "r18.msgpack").stat().st_size > 46e6  # 11.7M float32 parameters
    import torch2flax

    assert torch2flax.load("r18.msgpack")[0].input_hw == (32, 32)  # --portable: the program, at --image-size

    code, out, err = run("verify", "r18.msgpack", "--timm-checkpoint", "x.safetensors", "--image-size", "32")
    assert code == 0 and out.count(" ok ") == 2 and "deprecated" not in err, out + err
    # Without a checkpoint: the msgpack converted back to torch.
    code, out, err = run("verify", "r18.msgpack", "--size", "32")
    assert code == 0 and "converted back to torch" in out, err
    # Weights that differ from the msgpack's fail verification with a non-zero exit.
    other = timm.create_model("resnet18", pretrained=False)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "y.safetensors"))
    # ... named with the old spellings, which still work and say the new ones, once each.
    code, out, err = run("verify", "r18.msgpack", "--checkpoint", "y.safetensors", "--size", "32")
    assert code == 1 and "FAIL" in out
    assert err.count("torch2flax: --checkpoint is deprecated; use --timm-checkpoint") == 1, err
    assert err.count("torch2flax: --size is deprecated; use --image-size") == 1, err


def test_cli_list_and_unknown_name(capsys):
    import timm

    from torch2flax.cli import main

    assert main(["list", "resnet1*", "--backend", "native"]) == 0
    assert capsys.readouterr().out.split() == ["resnet101", "native", "resnet152", "native", "resnet18", "native"]
    assert main(["list", "resnet1*"]) == 0
    rows = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert rows == {n: "native" if n in ("resnet101", "resnet152", "resnet18") else "export"
                    for n in timm.list_models("resnet1*")}
    assert main(["list", "vit_tiny*"]) == 0
    assert {line.split()[1] for line in capsys.readouterr().out.splitlines()} == {"export"}
    assert main(["list", "nosuchnet*"]) == 1
    assert main(["convert", "resnt50", "--out", "x.msgpack"]) == 2
    err = capsys.readouterr().err
    assert "resnt50" in err and "resnet50" in err


def test_import_stays_light():
    code = "import sys, torch2flax; print(sorted(m for m in ('jax', 'torch', 'flax', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_user_errors_end_with_one_line_and_status_2(tmp_path, capsys):
    from tests.helpers import write_flower_tfrecords

    write_flower_tfrecords(tmp_path / "t", num_records=8, num_shards=1, size=16, labels=False)
    cases = {
        "no TFRecord files match": ["train", "--train", str(tmp_path / "none" / "*.tfrec"), "--val", "x",
                                    "--num-classes", "3", "--out", str(tmp_path / "run")],
        "no checkpoint at": ["predict", "--checkpoint", str(tmp_path / "missing.msgpack"),
                             "--test", str(tmp_path / "t" / "*.tfrec")],
        "unknown model 'resnt50'": ["convert", "resnt50", "--out", str(tmp_path / "x.msgpack")],
        "missing.pth": ["convert", "resnet18", "--checkpoint", str(tmp_path / "missing.pth"),
                        "--out", str(tmp_path / "x.msgpack")],
    }
    for expected, args in cases.items():
        assert main(args) == 2, args  # returned, not raised: no traceback reaches the user
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("torch2flax: error: ") and expected in lines[-1], lines


def test_unknown_model_name_is_refused_before_heavy_imports():
    code = ("import sys; from torch2flax.cli import main; "
            "rc = main(['convert', 'efficientnet_b9x', '--out', 'x.msgpack']); "
            "print(rc, sorted(m for m in ('jax', 'torch', 'timm', 'flax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split("\n")[-2] == "2 []", out.stdout + out.stderr
    assert "unknown model 'efficientnet_b9x'" in out.stderr and "did you mean: efficientnet_b8" in out.stderr
