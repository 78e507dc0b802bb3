"""Every TrainConfig setting is declared once (train.config.setting): the flags, their help and
defaults, the choices and the checks all come from that declaration."""
import argparse
import ast
import dataclasses
import pathlib

import pytest

from torch2flax.errors import ConfigError
from torch2flax.train import TrainConfig
from torch2flax.train import config as config_module

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _subparser(command: str) -> argparse.ArgumentParser:
    from torch2flax.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("command", ["train", "tpu-check"])
def test_every_field_has_a_flag_with_its_help_type_and_default(command):
    parser = _subparser(command)
    actions = {a.dest: a for a in parser._actions if a.help != argparse.SUPPRESS}
    text = parser.format_help()
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        assert isinstance(meta["help"], str) and len(meta["help"]) > 10, f.name
        action = actions[f.name]
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        assert flag in action.option_strings and flag in text, f.name
        assert action.default is None, f.name  # a flag not given leaves the config file's value
        assert action.help.startswith(meta["help"]), f.name
        default = f.default
        shown = (f"--{'' if default else 'no-'}{f.name.replace('_', '-')}" if isinstance(default, bool)
                 else "none" if default in (None, "") else str(default))
        if "(default" not in meta["help"]:  # else the declaration says what None means
            assert action.help.endswith(f"(default: {shown})"), (f.name, action.help)
        else:
            assert default is None, f.name
        if str(f.type) == "bool":
            assert isinstance(action, argparse.BooleanOptionalAction), f.name
        else:
            assert callable(action.type), f.name  # the config's own coercion and check
        for alias in meta["aliases"]:  # an old spelling: hidden from --help, same destination
            assert parser._option_string_actions[alias].dest == f.name and alias + " " not in text
    assert len([a for a in parser._actions if a.dest in {f.name for f in dataclasses.fields(TrainConfig)}
                and a.help != argparse.SUPPRESS]) == len(dataclasses.fields(TrainConfig))


@pytest.mark.parametrize("flags,message", [
    (["--ema-decay", "1.0"], "must be in [0, 1)"),
    (["--dtype", "float16"], "expected one of ('float32', 'bfloat16')"),
    (["--num-workers", "-2"], "expected 'auto' or an int >= 0"),
    (["--time-limit", "soon"], "is not a duration"),
    (["--mix-prob", "1.5"], "a probability, in [0, 1]"),
])
def test_a_flag_and_a_config_key_are_checked_by_the_same_declaration(flags, message, capsys):
    name = flags[0][2:].replace("-", "_")
    with pytest.raises(ConfigError) as from_python:
        TrainConfig(**{name: flags[1]})
    assert message in str(from_python.value)
    with pytest.raises(SystemExit) as exit_info:
        _subparser("train").parse_args(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_resume_fixed_fields_and_choices_come_from_the_declarations():
    assert config_module.fixed_on_resume() == tuple(
        f.name for f in dataclasses.fields(TrainConfig) if f.metadata["fixed_on_resume"])
    assert {"model", "checkpoint", "image_size", "batch_size", "seed", "train"} <= set(config_module.fixed_on_resume())
    assert "lr" not in config_module.fixed_on_resume()
    predict = {a.dest: a for a in _subparser("predict")._actions}
    args = _subparser("predict").parse_args(["--checkpoint", "c", "--test", "t", "--tta", "hflip", "none",
                                             "--dtype", "bfloat16"])
    assert args.tta == ["hflip", None] and args.dtype == "bfloat16"
    assert predict["dtype"].help == TrainConfig.__dataclass_fields__["dtype"].metadata["help"] + " (default: float32)"


def _choice_lists() -> dict[str, frozenset]:
    named = {"TTA_MODES": config_module.TTA_MODES, "DTYPES": config_module.DTYPES,
             "OPTIMIZERS": config_module.OPTIMIZERS, "PARALLEL_MODES": config_module.PARALLEL_MODES,
             "BACKEND_CHOICES": config_module.BACKEND_CHOICES}
    return {k: frozenset(v for v in values if isinstance(v, str)) for k, values in named.items()}


def test_no_choice_list_is_written_twice():
    """A tuple, list or set literal holding two or more values of a named choice list is a second
    spelling of it (grep-able: `rg '"pmap", "jit"'`); only the declaration may hold one."""
    lists = _choice_lists()
    found: dict[str, list[str]] = {name: [] for name in lists}
    for folder in ("torch2flax", "loaders", "train"):
        for file in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(file.read_text(), str(file))
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                    continue
                strings = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                for name, values in lists.items():
                    if len(strings & values) >= min(2, len(values)) and len(values) >= 2:
                        found[name].append(f"{file.relative_to(ROOT)}:{node.lineno}")
    for name, places in found.items():
        assert len(places) <= 1, f"{name} spelled in {places}: use train.config.{name}"
    assert len(found["PARALLEL_MODES"]) == 1 and found["PARALLEL_MODES"][0].startswith("loaders/collate.py")
    # declared where a portable program is written for each (torch2flax knows nothing of training)
    assert len(found["DTYPES"]) == 1 and found["DTYPES"][0].startswith("torch2flax/portable.py")
