"""One config object drives a run (big_vision style): CLI flags and config files both fill it.

Each `TrainConfig` field is declared once, with `setting(...)`: its default, `--help` text,
choices, resume rule and check. The command line (`train/cli.py`), YAML/JSON reading and
`--help` are generated from those declarations, as Hugging Face's `HfArgumentParser` generates
argparse from `TrainingArguments` (argparse has no dataclass support of its own).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch2flax.backend import backend_choices
from torch2flax.errors import ConfigError, MissingFileError
from torch2flax.loaders.collate import LAYOUTS
from torch2flax.portable import DTYPES as PORTABLE_DTYPES

DEFAULT_MODEL = "resnet18"

# Each choice list, named once (`tests/test_config_declared_once.py` greps for a second spelling).
TTA_MODES = (None, "hflip")  # test-time augmentation: none, or the mirrored images too
# compute dtypes, parameters staying float32 (train.steps.COMPUTE_DTYPES): torch2flax.portable's,
# which writes a program for each
DTYPES = PORTABLE_DTYPES
OPTIMIZERS = ("adamw", "sgd")
PARALLEL_MODES = LAYOUTS  # pmap | jit: the batch layouts loaders.device puts on the devices
BACKEND_CHOICES = backend_choices()


def setting(default: Any, help: str, *, choices: tuple | None = None, check: Callable[[Any], str | None] | None = None,
            fixed_on_resume: bool = False, flag: str | None = None, metavar: str | None = None,
            aliases: tuple[str, ...] = ()) -> Any:
    """A `TrainConfig` field and everything the CLI and the checks need to know of it.

    `check(value)` returns what is wrong with a value (None: fine); `fixed_on_resume`: `--resume`
    refuses a change (the model and the data order); `flag`: the option's name when it is not the
    field's; `aliases`: old spellings, hidden, that print one deprecation line."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "check": check, "fixed_on_resume": fixed_on_resume,
        "flag": flag, "metavar": metavar, "aliases": aliases})


def _at_least(low: float, why: str = "") -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be >= {low:g}{why}"


def _probability(v: float) -> str | None:
    return None if 0.0 <= v <= 1.0 else "a probability, in [0, 1]"


def _parses_with(kind: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        from torch2flax.train.preemption import Every, parse_duration  # jax-free; preemption imports config

        try:
            (Every.parse if kind == "every" else parse_duration)(value)
        except ValueError as e:
            return str(e)
        return None
    return check


def _num_classes(n: int) -> str | None:
    if n == 1 or n < 0:
        return ("a classifier needs at least 2 classes (softmax over one class gives a loss of 0 and learns "
                "nothing)")
    return None


@dataclass
class TrainConfig:
    """Everything a training run needs; saved to `out/config.json` so a run can resume."""

    # data
    train: str | list[str] = setting(
        "", "glob(s) of training TFRecord files; several are merged (Kaggle's train and val, for folds)",
        fixed_on_resume=True, metavar="GLOB")
    val: str = setting("", "glob of validation TFRecord files", fixed_on_resume=True)
    num_classes: int = setting(0, "number of classes (the new head's size)", check=_num_classes, fixed_on_resume=True)
    image_size: int = setting(224, "training and evaluation image size (pixels, square)", check=_at_least(1),
                              fixed_on_resume=True)
    crop_pct: float | None = setting(None, "evaluation centre crop fraction (default: the model's pretrained_cfg)")
    scale_min: float = setting(0.08, "RandomResizedCrop's lower scale bound", check=_probability)
    hflip: bool = setting(True, "random horizontal flips in training")
    color_jitter: float = setting(0.0, "ColorJitter strength in training (0: off)", check=_at_least(0))
    augment: str | None = setting(
        None, "kaggle (shift-scale-rotate, brightness/contrast, hue/saturation, blur, coarse dropout) or "
        "trivialaugment, added after the crop and flips; or a .yaml/.json pipeline saved with albumentations' "
        "A.save, which replaces the training augmentation (copied into OUT)")
    num_workers: int | str = setting(
        "auto", "loader worker processes, or 'auto': usable CPUs less one, capped by memory", metavar="N|auto")
    skip_bad_images: bool = setting(
        False, "an image that does not decode takes the next image's place instead of stopping the run; "
        "counted per epoch in metrics.csv, listed in bad_images.csv")
    # model
    model: str | None = setting(
        None, f"timm model name (see `torch2flax list`; default {DEFAULT_MODEL}, or with --init the file's model)",
        fixed_on_resume=True)
    backend: str = setting("auto", "how the model is built in Flax (see `torch2flax convert`)",
                           choices=BACKEND_CHOICES, fixed_on_resume=True)
    pretrained: bool = setting(False, "start from timm's pretrained weights (from the hub)", fixed_on_resume=True)
    checkpoint: str | None = setting(
        None, "start from a timm state dict (.pth/.pt/.bin/.safetensors)", fixed_on_resume=True,
        flag="--timm-checkpoint", metavar="PATH", aliases=("--checkpoint",))
    init: str | None = setting(None, "start from a torch2flax .msgpack (from `convert` or `train`)",
                               fixed_on_resume=True, metavar="FILE.msgpack")
    drop_rate: float = setting(0.0, "dropout before the classifier", check=_probability)
    drop_path_rate: float = setting(0.0, "stochastic depth rate", check=_probability)
    head: str | None = setting(
        None, "add-on head on the backbone's features, replacing its classifier: mlp[:HIDDEN][,dropout=P,"
        "act=relu|silu|gelu,norm=BOOL] or gem[:P][,eps=E,dropout=P,learn_p=BOOL], e.g. mlp:512,dropout=0.3",
        fixed_on_resume=True)
    # optimisation
    epochs: int = setting(10, "training epochs", check=_at_least(1))
    batch_size: int = setting(64, "global batch over every device of every process (divisible by the total "
                              "device count)", check=_at_least(1), fixed_on_resume=True)
    lr: float = setting(1e-3, "peak learning rate (after warm-up; cosine decay to lr * min_lr_ratio)",
                        check=_at_least(0))
    optimizer: str = setting("adamw", "optax optimiser", choices=OPTIMIZERS)
    momentum: float = setting(0.9, "SGD momentum", check=_probability)
    weight_decay: float = setting(0.05, "decoupled weight decay (not on biases and norms)", check=_at_least(0))
    warmup_epochs: float = setting(1.0, "linear learning-rate warm-up, in epochs", check=_at_least(0))
    min_lr_ratio: float = setting(0.01, "the cosine schedule's final learning rate, as a fraction of lr",
                                  check=_probability)
    label_smoothing: float = setting(0.1, "label smoothing of the cross-entropy", check=_probability)
    grad_clip: float | None = setting(1.0, "clip the global gradient norm to this (none: off)")
    accum_steps: int = setting(1, "gradient accumulation steps per update", check=_at_least(1))
    ema_decay: float = setting(0.0, "EMA of parameters for evaluation (0 disables)",
                               check=lambda v: None if 0.0 <= v < 1.0 else "must be in [0, 1)")
    # MixUp / CutMix (train.mix, timm's semantics), in the compiled step; validation is never mixed
    mixup: float = setting(0.0, "MixUp: Beta(alpha, alpha) mixing of image pairs and their labels (0: off; timm "
                           "uses 0.8)", check=_at_least(0, " (a Beta alpha; 0: off)"))
    cutmix: float = setting(0.0, "CutMix: paste a box of the paired image, labels mixed by area (0: off; timm "
                            "uses 1.0)", check=_at_least(0, " (a Beta alpha; 0: off)"))
    mix_prob: float = setting(1.0, "chance a batch is mixed (MixUp/CutMix)", check=_probability)
    switch_prob: float = setting(0.5, "with --mixup and --cutmix: chance of CutMix rather than MixUp",
                                 check=_probability)
    # execution
    dtype: str = setting("float32", "compute dtype; parameters stay float32", choices=DTYPES)
    parallel: str = setting("pmap", "pmap, or jit with a sharded mesh", choices=PARALLEL_MODES)
    sync_bn: bool = setting(True, "synchronise BatchNorm statistics across devices")
    num_devices: int | None = setting(None, "local devices to use (default: every one)", check=_at_least(1))
    seed: int = setting(0, "seed of initialisation, shuffling and augmentation", fixed_on_resume=True)
    out: str = setting("runs/train", "output folder")
    compile_cache: str = setting(
        "auto", "JAX's persistent compilation cache folder, so a resumed session or the next run does not compile "
        "again (auto: $TORCH2FLAX_COMPILE_CACHE, else OUT/compile-cache on Kaggle, else "
        "~/.cache/torch2flax/jax-compile-cache; none: off)", metavar="DIR|auto|none")
    portable: bool = setting(False, "when training ends, add best.msgpack's eval forward as a portable jax.export "
                             "program (cpu, cuda, tpu): predict and torch2flax.load then need no torch or timm")
    # preemption (train.preemption): checkpoints within epochs, and a clean stop before a limit
    checkpoint_every: str | None = setting(
        None, "also checkpoint every N steps (500) or every period (10m), with the loader position: --resume "
        "continues from that step exactly", check=_parses_with("every"))
    time_limit: str | None = setting(
        None, "stop with a checkpoint before this much time has passed (8h45m, 30m, 90s): leave a session's "
        "remaining time for predict", check=_parses_with("duration"))
    keep_checkpoints: int = setting(2, "training checkpoints to keep in OUT/checkpoints/<step> (the newest)",
                                    check=_at_least(1, " (a run resumes from its newest checkpoint)"))
    async_checkpoints: bool = setting(True, "write training checkpoints in a background thread while training "
                                      "goes on")
    # cross-validation (train.cv): fold `fold` of `train` is the validation set; out/fold{I}/ per fold
    folds: int = setting(
        0, "k-fold cross-validation: fold I of --train is the validation set (no --val); each fold trains in "
        "OUT/fold{I}, writes out-of-fold predictions, and OUT/oof.csv and cv.json gather them (0: off)",
        fixed_on_resume=True)
    fold: int | str = setting("all", "the fold to run, 0..K-1, or 'all': each in turn", metavar="I|all")
    fold_seed: int = setting(0, "folds depend only on (record id, label, K, this seed)", fixed_on_resume=True)
    tta: str | None = setting(None, "test-time augmentation of the out-of-fold predictions; `predict` uses it for "
                              "this run's checkpoints", choices=TTA_MODES)

    def __post_init__(self) -> None:
        for name in ("checkpoint_every", "time_limit"):  # YAML reads `500` or `3600` as numbers
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                setattr(self, name, str(value))
        for f in dataclasses.fields(self):  # YAML, JSON and the CLI give strings and ints for floats
            setattr(self, f.name, field_value(f, getattr(self, f.name)))
        if self.model is None and not self.init:
            self.model = DEFAULT_MODEL
        self._check_folds()

    def _check_folds(self) -> None:  # the settings that depend on each other
        if not self.folds:
            if self.fold != "all":
                raise ConfigError(f"config.fold={self.fold!r} needs config.folds (the number of folds K)")
            return
        if self.folds < 2:
            raise ConfigError(f"config.folds={self.folds}: k-fold cross-validation needs at least 2 folds")
        if self.fold != "all" and not 0 <= self.fold < self.folds:
            raise ConfigError(f"config.fold={self.fold}: expected 'all' or 0..{self.folds - 1}")
        if self.val:
            raise ConfigError(f"config.val={self.val!r} with config.folds={self.folds}: each fold of `train` is "
                             "the validation set in turn; give every labelled glob to `train` (--train A B)")

    def fold_numbers(self) -> list[int]:
        """The folds this config runs (every one for "all")."""
        return list(range(self.folds)) if self.fold == "all" else [int(self.fold)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(values) - known))  # a YAML key may be a number
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> TrainConfig:
        """Read a YAML or JSON file (YAML is a superset of JSON); `overrides` win."""
        import yaml

        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise MissingFileError(f"config file not found: {os.fspath(path)!r}") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: a folder, not a YAML or JSON config file") from None
        except yaml.YAMLError as e:  # on one line: where and what
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            what = getattr(e, "problem", None) or " ".join(str(e).split())
            raise ConfigError(f"{path}: not a YAML or JSON config file ({where}{what})") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a text (YAML or JSON) config file ({e})") from e
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
        return cls.from_dict({**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)



_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """`value` as the field's type (`int`, `float`, `bool`, `str`, optionally `| None`), or a
    ValueError naming the key, the value and the type. YAML 1.1 reads `5e-05` (no dot) as a
    string, and JSON, YAML and the command line differ on ints and floats: all are accepted."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return None
    if "list[str]" in kinds and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value) if len(value) != 1 else value[0]
    kind = next((k for k in kinds if k != "None"), "str")
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                return value.strip().lower() in _TRUE
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
        elif kind == "int" and not isinstance(value, bool):
            if isinstance(value, int):
                return value
            number = float(value)
            if number.is_integer():
                return int(number)
        elif kind == "float" and not isinstance(value, bool):
            return float(value)
        elif kind == "str" and isinstance(value, str):
            return value
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"config.{name}={value!r}: expected {annotation.replace(' | ', ' or ')}")


def _int_or(word: str, value: Any) -> int | str:
    """`word` ("auto", "all") or an int >= 0, digit strings from a command line or a YAML file included."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value == word or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise ValueError(f"expected {word!r} or an int >= 0")


def field_value(f: dataclasses.Field, value: Any) -> Any:
    """`value` (from Python, YAML, JSON or the command line) as field `f`'s type, checked by its
    declaration; a ConfigError names the key, the value and what was expected."""
    if str(f.type) == "int | str":  # num_workers ("auto") and fold ("all"): the default names the word
        try:
            return _int_or(f.default, value)
        except ValueError as e:
            raise ConfigError(f"config.{f.name}={value!r}: {e}") from None
    value = _coerce(f.name, value, str(f.type))
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"config.{f.name}={value!r}: expected one of {choices}")
    check = f.metadata.get("check")
    problem = check(value) if check is not None and value is not None else None
    if problem:
        raise ConfigError(f"config.{f.name}={value!r}: {problem}")
    return value


def config_kwargs(fn: Callable, config: TrainConfig) -> dict[str, Any]:
    """The config's values of `fn`'s keyword-only parameters that are also config fields (by name):
    a function's settings after its `*`, such as `prepare_model`'s or `predict_dataset`'s."""
    import inspect

    names = {f.name for f in dataclasses.fields(config)}
    return {name: getattr(config, name) for name, p in inspect.signature(fn).parameters.items()
            if p.kind is p.KEYWORD_ONLY and name in names}


def fixed_on_resume() -> tuple[str, ...]:
    """What a resumed run cannot change: the model it trains and the data order it sees."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["fixed_on_resume"])


def dumps(config: TrainConfig) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
