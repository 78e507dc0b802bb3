"""One config object drives a run (big_vision style): CLI flags and config files both fill it."""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch2flax.backend import backend_names
from torch2flax.errors import ConfigError, MissingFileError

DEFAULT_MODEL = "resnet18"


TTA_MODES = (None, "hflip")  # test-time augmentation: none, or the mirrored images too


@dataclass
class TrainConfig:
    """Everything a training run needs; saved to `out/config.json` so a run can resume."""

    # data
    train: str | list[str] = ""  # glob(s); several are merged (e.g. Kaggle's train and val, for folds)
    val: str = ""
    num_classes: int = 0
    image_size: int = 224
    crop_pct: float | None = None  # eval centre crop; None: the model's pretrained_cfg value
    scale_min: float = 0.08  # RandomResizedCrop lower scale bound
    hflip: bool = True
    color_jitter: float = 0.0
    # a recipe added after the crop and flips ("kaggle", "trivialaugment"), or an albumentations
    # pipeline saved with A.save (.yaml/.json) that replaces the training augmentation (copied into out/)
    augment: str | None = None
    num_workers: int | str = "auto"  # "auto": from the host's usable CPUs and memory (make_loader)
    skip_bad_images: bool = False  # an undecodable image: substituted, counted and listed, not fatal
    # model
    model: str | None = None  # timm name; default resnet18, or with `init` the file's model
    backend: str = "auto"  # auto | native | export (see torch2flax.convert)
    pretrained: bool = False
    checkpoint: str | None = None  # timm state dict (.pth/.safetensors) to start from
    init: str | None = None  # a torch2flax .msgpack to start from
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    head: str | None = None  # add-on head spec, e.g. "mlp:512,dropout=0.3" or "gem" (torch2flax.heads)
    # optimisation
    epochs: int = 10
    batch_size: int = 64  # global batch: over every device of every process
    lr: float = 1e-3
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    accum_steps: int = 1
    ema_decay: float = 0.0  # 0 disables the EMA of parameters
    # MixUp / CutMix (train.mix, timm's semantics), in the compiled step; validation is never mixed
    mixup: float = 0.0  # Beta alpha; 0: off (timm's recipes: 0.8, or 0.2 for small models)
    cutmix: float = 0.0  # Beta alpha; 0: off (timm's recipes: 1.0)
    mix_prob: float = 1.0  # chance a batch is mixed
    switch_prob: float = 0.5  # with both on: chance of CutMix rather than MixUp
    # execution
    dtype: str = "float32"  # float32 | bfloat16 (compute dtype; parameters stay float32)
    parallel: str = "pmap"  # pmap | jit
    sync_bn: bool = True
    num_devices: int | None = None  # None: every local device
    seed: int = 0
    out: str = "runs/train"
    # preemption (train.preemption): checkpoints within epochs, and a clean stop before a limit
    checkpoint_every: str | None = None  # "500" (steps) or "10m"; None: at the end of each epoch only
    time_limit: str | None = None  # e.g. "8h45m": stop with a checkpoint before this much time has passed
    keep_checkpoints: int = 2  # training checkpoints kept in out/checkpoints (the newest)
    async_checkpoints: bool = True  # write them in a background thread while training goes on
    # cross-validation (train.cv): fold `fold` of `train` is the validation set; out/fold{I}/ per fold
    folds: int = 0  # K; 0: `train` and `val` as given
    fold: int | str = "all"  # 0..K-1, or "all": every fold in turn
    fold_seed: int = 0  # folds depend only on (record id, label, folds, fold_seed)
    tta: str | None = None  # TTA of the out-of-fold predictions ("hflip"), and `predict`'s for this run

    def __post_init__(self) -> None:
        for name in ("checkpoint_every", "time_limit"):  # YAML reads `500` or `3600` as numbers
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                setattr(self, name, str(value))
        for f in dataclasses.fields(self):  # YAML, JSON and the CLI give strings and ints for floats
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), str(f.type)))
        if self.model is None and not self.init:
            self.model = DEFAULT_MODEL
        choices = {"optimizer": ("adamw", "sgd"), "dtype": ("float32", "bfloat16"),
                   "parallel": ("pmap", "jit"), "backend": ("auto", *backend_names())}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config.{name}={getattr(self, name)!r}: expected one of {allowed}")
        self.num_workers = _num_workers(self.num_workers)
        if self.num_classes == 1 or self.num_classes < 0:
            raise ConfigError(f"config.num_classes={self.num_classes}: a classifier needs at least 2 classes "
                             "(softmax over one class gives a loss of 0 and learns nothing)")
        self._check_folds()
        if self.keep_checkpoints < 1:
            raise ConfigError(f"config.keep_checkpoints={self.keep_checkpoints}: must be >= 1 (a run resumes "
                             "from its newest checkpoint)")
        if self.accum_steps < 1:
            raise ConfigError(f"config.accum_steps={self.accum_steps}: must be >= 1")
        for name in ("mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config.{name}={getattr(self, name)}: a Beta alpha, >= 0 (0: off)")
        for name in ("mix_prob", "switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"config.{name}={getattr(self, name)}: a probability, in [0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"config.ema_decay={self.ema_decay}: must be in [0, 1)")
        from torch2flax.train.preemption import Every, parse_duration

        for name, parse in (("checkpoint_every", Every.parse), ("time_limit", parse_duration)):
            if getattr(self, name) is not None:
                try:
                    parse(getattr(self, name))
                except ValueError as e:
                    raise ConfigError(f"config.{name}={getattr(self, name)!r}: {e}") from None

    def _check_folds(self) -> None:
        if self.tta not in TTA_MODES:
            raise ConfigError(f"config.tta={self.tta!r}: expected None or 'hflip'")
        if isinstance(self.fold, str) and self.fold.strip().isdigit():
            self.fold = int(self.fold)
        if self.fold != "all" and (not isinstance(self.fold, int) or isinstance(self.fold, bool)):
            raise ConfigError(f"config.fold={self.fold!r}: expected 'all' or a fold number")
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
    if "str" in kinds and "int" in kinds:  # num_workers: "auto" or an int, checked by its own rule
        return value
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


def _num_workers(value: Any) -> int | str:
    """"auto" or an int >= 0 (digit strings from a command line or a YAML file included)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise ConfigError(f"config.num_workers={value!r}: expected 'auto' or an int >= 0")


def dumps(config: TrainConfig) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
