"""`torch2flax train`, `predict`, `gradcam`, `demo` and `doctor`."""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from torch2flax.errors import ConfigError, MissingFileError
from torch2flax.train.config import TrainConfig, field_value, fixed_on_resume
from torch2flax.utils import add_deprecated_alias

# train/tpu_check.TPUS' keys (that module imports jax: kept out of `--help`'s path).
TPU_NAMES = ("v3-8", "v4-8", "v5e-1", "v5e-4", "v5e-8", "v5p-8", "v6e-1", "v6e-8")
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _shown(default: Any, f: dataclasses.Field) -> str:
    if isinstance(default, bool):
        return f"--{'' if default else 'no-'}{f.name.replace('_', '-')}"
    return "none" if default in (None, "") else str(default)


def add_setting(parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, *,
                default: Any = None, help: str | None = None, config_default: bool = False, **overrides: Any) -> None:
    """The flag of TrainConfig field `name`, from its declaration (`train.config.setting`): name,
    type, choices, help and default. The train command leaves its default None (`config_default`)
    so that only flags given override a config file or a resumed run; other commands give theirs."""
    f = _FIELDS[name]
    meta = f.metadata
    flag = _flag(name)
    shown = f.default if config_default else default
    text = help or meta["help"]
    kwargs: dict[str, Any] = dict(dest=name, default=None if config_default else default,
                                  help=text if "(default" in text else f"{text} (default: {_shown(shown, f)})")
    kind = str(f.type)
    if kind == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        # The config's own coercion and check, so a flag and a YAML key accept the same values.
        def parse(text: str, f: dataclasses.Field = f) -> Any:
            try:
                return field_value(f, None if text == "none" and "None" in str(f.type) else text)
            except ConfigError as e:
                raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None

        parse.__name__ = kind  # argparse names it in "invalid ... value"
        kwargs["type"] = parse
        if meta["choices"] is not None:
            kwargs["metavar"] = "{" + ",".join("none" if c is None else str(c) for c in meta["choices"]) + "}"
        if "list[str]" in kind:
            kwargs["nargs"] = "+"
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
    kwargs.update(overrides)
    parser.add_argument(flag, **kwargs)
    for alias in meta["aliases"]:
        add_deprecated_alias(parser, alias, flag, name, **{k: v for k, v in kwargs.items() if k in ("type", "nargs")})


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    # Every TrainConfig field is a flag, generated from its declaration.
    for name in _FIELDS:
        add_setting(parser, name, config_default=True)


def _add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    """How this process joins a multi-host run (`train.distributed`); launch settings, not run settings."""
    from torch2flax.train import distributed as d

    g = parser.add_argument_group("multi-host (one process per host, every process runs the same command)")
    g.add_argument("--distributed", action="store_true",
                   help=f"join a multi-process run, detected by JAX on a Cloud TPU pod slice, SLURM or "
                   f"Open MPI (env {d.ENV_DISTRIBUTED}=1)")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help=f"process 0's address and a free port, elsewhere (env {d.ENV_COORDINATOR})")
    g.add_argument("--num-processes", type=int, metavar="N", help=f"with --coordinator (env {d.ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", type=int, metavar="I", help=f"0..N-1, with --coordinator (env {d.ENV_PROCESS_ID})")
    g.add_argument("--peer-timeout", type=int, metavar="S",
                   help=f"seconds before a silent (dead) process stops the others (env {d.ENV_PEER_TIMEOUT}; "
                   f"default {d.DEFAULT_PEER_TIMEOUT})")


def _start_distributed(args: argparse.Namespace) -> bool:
    """Join the multi-host run the flags or the environment ask for; True where this process writes."""
    from torch2flax.train import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           peer_timeout=args.peer_timeout, enabled=args.distributed or None)
    return distributed.is_main()


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="fine-tune a timm backbone in Flax on TFRecord data",
                              description="Fine-tune a converted timm model; flags override --config.")
    p.add_argument("--config", help="YAML or JSON file with TrainConfig fields")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its newest checkpoint (DIR/checkpoints/<step>)")
    p.add_argument("--stop-after-epochs", type=int, metavar="N",
                   help="end this invocation after N epochs; continue later with --resume")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--tpu-check", metavar="TPU", choices=sorted(TPU_NAMES),
                   help="first compile this run's steps for that TPU (`torch2flax tpu-check`): stop if they do "
                   "not fit, else print the HBM they take and train")
    _add_config_flags(p)
    _add_distributed_flags(p)
    p.set_defaults(func=cmd_train)

    q = subparsers.add_parser("predict", help="predict a test split and write submission.csv")
    q.add_argument("--checkpoint", required=True, nargs="+", metavar="CKPT",
                   help="a .msgpack written by `torch2flax train`, a run folder (its best.msgpack) or a "
                   "cross-validation folder (every fold's); several make an ensemble (probabilities averaged)")
    q.add_argument("--weights", nargs="+", type=float, metavar="W",
                   help="one weight per --checkpoint (default equal; a CV folder's folds share its weight)")
    q.add_argument("--test", required=True, help="glob of test TFRecord files")
    q.add_argument("--out", default="submission.csv", help="CSV to write (id,label)")
    add_setting(q, "tta", nargs="+", help="test-time augmentation: one for every --checkpoint or one each "
                "(default: what each checkpoint's run used for its out-of-fold predictions)")
    q.add_argument("--probs", help="also save class probabilities to this .npy")
    add_setting(q, "batch_size", default=64, help="global batch over every device of every process")
    add_setting(q, "image_size", help="image size (default: the checkpoint's)")
    for name in ("num_workers", "parallel", "dtype"):
        add_setting(q, name, default=_FIELDS[name].default)
    add_setting(q, "compile_cache", default="auto")
    q.add_argument("--full-model", action="store_true",
                   help="rebuild each model from timm even where its file holds a portable program (the default "
                        "runs the program: no torch.export, no timm needed)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_distributed_flags(q)
    q.set_defaults(func=cmd_predict)

    g = subparsers.add_parser("gradcam", help="Grad-CAM overlays of a trained model on images",
                              description="Write one Grad-CAM overlay PNG per image (the image at the model's "
                              "input size, heatmap over it; PNG title: predicted and true class) and grid.png.")
    g.add_argument("--checkpoint", required=True, help="a .msgpack written by `torch2flax train` (or convert)")
    g.add_argument("--images", required=True, help="glob of image files (.jpg/.png) or of TFRecord files")
    g.add_argument("--layer", help="timm module name, e.g. layer4 or stages.3 (default: the deepest "
                   "feature stage with at least a 4x4 map)")
    g.add_argument("--class", dest="target", type=int, help="explain this class (default: each image's prediction)")
    g.add_argument("--num", type=int, default=16, help="how many images (default %(default)s)")
    g.add_argument("--method", choices=("gradcam", "gradcam++"), default="gradcam")
    g.add_argument("--out", required=True, help="folder to write the PNGs to")
    g.set_defaults(func=cmd_gradcam)

    d = subparsers.add_parser("demo", help="the whole job on scikit-learn's digits (no downloads)",
                              description="Write digits TFRecords, convert a timm backbone, fine-tune "
                              "it on every local device, predict the test split, print a summary.")
    d.add_argument("--out", default="runs/demo", help="output folder (default %(default)s)")
    add_setting(d, "model", default="resnet18", help="timm model name (see `torch2flax list`)")
    add_setting(d, "epochs", default=8)
    add_setting(d, "batch_size", default=64)
    add_setting(d, "image_size", default=32)
    add_setting(d, "num_workers", default="auto")
    add_setting(d, "compile_cache", default="auto")
    add_setting(d, "pretrained", default=True, help="start from timm's pretrained weights when the hub is "
                "reachable (--no-pretrained: random weights, without trying the hub)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    c = subparsers.add_parser("cv", help="the cross-validation score of a `train --folds` run",
                              description="Gather the out-of-fold predictions of the finished folds of a "
                              "`train --folds K` run into OUT/oof.csv and OUT/cv.json (macro F1 and accuracy "
                              "over all OOF rows, per fold, mean and std) and name the folds still missing.")
    c.add_argument("out", metavar="OUT", nargs="+",
                   help="the run folder (holding fold0/, fold1/, ...); several: the CV score of their weighted "
                   "ensemble (out-of-fold probabilities averaged), to choose weights before submitting")
    c.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per OUT (default equal)")
    c.set_defaults(func=cmd_cv)

    t = subparsers.add_parser(
        "tpu-check", help="compile a run's train and eval steps for a TPU (here, without one): fit, HBM, FLOPs",
        description="Compile the trainer's own train and eval steps for a TPU slice, on this machine (libtpu "
        "describes the TPU; no TPU needed), and report whether they compile, HBM per device, the largest "
        "global batch that compiles, FLOPs per image and a roofline bound. Nothing is trained or timed.")
    t.add_argument("source", nargs="?", metavar="MODEL",
                   help="a timm name, a torch2flax .msgpack file or a run folder (its config.json); "
                   "or give --model / --init / --config")
    t.add_argument("--tpu", default="v5e-8", choices=sorted(TPU_NAMES), help="the TPU slice (default %(default)s)")
    t.add_argument("--no-search", dest="search", action="store_false",
                   help="only the given batch: skip the search for the largest one (each try is a compile)")
    t.add_argument("--json", action="store_true", help="print the report as one JSON object")
    t.add_argument("--quiet", action="store_true", help="no progress lines (one per compile)")
    t.add_argument("--config", metavar="FILE", help="YAML/JSON run config (flags override it)")
    _add_config_flags(t)
    t.set_defaults(func=cmd_tpu_check)

    x = subparsers.add_parser(
        "export-timm", help="write a model's weights as a timm state dict (.safetensors or .pth), for PyTorch",
        description="Write the weights of a torch2flax model (converted or fine-tuned; BatchNorm statistics "
        "included) as a timm state dict, and print the timm.create_model call that loads it. A model with an "
        "add-on head has no timm twin and is refused.")
    x.add_argument("source", metavar="FILE|RUN", help="a torch2flax .msgpack (from convert or train) or a run "
                   "folder (its best.msgpack)")
    x.add_argument("--out", required=True, metavar="FILE", help="the state dict to write: .safetensors, or "
                   ".pth/.pt/.bin (torch.save)")
    x.set_defaults(func=cmd_export_timm)

    e = subparsers.add_parser("doctor", help="report versions, devices and host limits, and what will hurt a run",
                              description="Report package versions, JAX's devices, CPUs, memory and /dev/shm, "
                              "and warn about what breaks or slows a run here (a jax/libtpu mismatch, JAX on "
                              "CPU beside a GPU, /dev/shm too small for the loader workers, ...), each with a fix.")
    add_setting(e, "batch_size", default=128, help="global batch to check for")
    add_setting(e, "image_size", default=224, help="image size to check for")
    add_setting(e, "num_workers", default="auto")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.set_defaults(func=cmd_doctor)


def cv_folder(resume: str, saved: str) -> str:
    """`--resume DIR`'s output folder: DIR, or for one fold's folder (DIR = OUT/fold{I}) the
    cross-validation folder OUT it belongs to (a fold's config.json names its fold)."""
    import json

    try:
        with open(saved) as f:
            values = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"--resume {resume}: {saved} is not a JSON config ({e}): the run's own config.json "
                          "was damaged; restore it, or start a new run") from e
    if not isinstance(values, dict):
        return resume  # TrainConfig.from_file says what is wrong with it
    fold = values.get("fold")
    if values.get("folds") and isinstance(fold, int) and os.path.basename(os.path.normpath(resume)) == f"fold{fold}":
        return os.path.dirname(os.path.normpath(resume))
    return resume


def _flag(name: str) -> str:
    return _FIELDS[name].metadata["flag"] or "--" + name.replace("_", "-")


def _given(args: argparse.Namespace) -> dict:
    """The TrainConfig fields the flags set (their defaults are None: unset flags leave the config's)."""
    return {name: getattr(args, name) for name in _FIELDS if getattr(args, name) is not None}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = _given(args)
    if args.resume:
        if args.config:
            raise ConfigError("--resume reads DIR/config.json; do not pass --config as well")
        saved = os.path.join(args.resume, "config.json")
        if not os.path.exists(saved):
            raise MissingFileError(f"--resume {args.resume}: {saved} not found (is it a run folder?)")
        config = TrainConfig.from_file(saved, **{**given, "out": cv_folder(args.resume, saved)})
        before = TrainConfig.from_file(saved)
        changed = [f"{_flag(k)} {getattr(before, k)!r} -> {getattr(config, k)!r}" for k in fixed_on_resume()
                   if k in given and getattr(config, k) != getattr(before, k)]
        if changed:
            raise ConfigError(f"--resume {args.resume}: the run was started with other model or data settings "
                              f"({'; '.join(changed)}): resume without them, or start a new run")
        return config
    if args.config:
        return TrainConfig.from_file(args.config, **given)
    needed = (("--train", "train"), ("--num-classes", "num_classes")) + (() if given.get("folds") else
                                                                         (("--val", "val"),))
    missing = [flag for flag, key in needed if key not in given]
    if missing:
        raise ConfigError(f"train: missing {', '.join(missing)} (or give --config FILE)")
    return TrainConfig.from_dict(given)


def cmd_train(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if not (config.init or args.resume):
        from torch2flax.timm_names import check_model_name

        check_model_name(config.model)  # before the seconds of importing jax, torch and timm
    main_process = _start_distributed(args)
    if main_process:  # the environment first: a jax/libtpu mismatch explains everything after it
        from torch2flax.train.doctor import collect, summary_line

        print(summary_line(collect(batch_size=config.batch_size, image_size=config.image_size,
                                   num_workers=config.num_workers)), flush=True)
    if args.tpu_check and main_process:
        from torch2flax.train.tpu_check import format_tpu_report, tpu_check

        report = tpu_check(config, args.tpu_check, search=False, log=lambda s: print(s, flush=True))
        print(format_tpu_report(report), flush=True)
        if not report.fits:
            raise ConfigError(f"--tpu-check {args.tpu_check}: " + (
                f"the train step does not fit in HBM at --batch-size {config.batch_size}: lower it (or "
                "--dtype bfloat16, --accum-steps)" if report.out_of_memory else
                "the TPU compiler refused the train step (above)"))
    from torch2flax.train.trainer import fit

    result = fit(config, resume=bool(args.resume), stop_after_epochs=args.stop_after_epochs,
                 progress=not args.quiet)
    if not main_process:
        return result.exit_status
    if result.reinitialized:
        print(f"re-initialised for {config.num_classes} classes: {', '.join(result.reinitialized)}")
    if result.cv is not None:
        if args.quiet:  # fit printed it otherwise
            from torch2flax.train.cv import summary

            print(summary(result.cv))
    else:
        print(f"best validation macro F1 {result.best_macro_f1:.4f}; "
              f"training {result.images_per_sec:.1f} images/s")
    print(f"wrote to {os.path.abspath(result.out)}: " + ", ".join(os.path.relpath(f, result.out) for f in result.files))
    return result.exit_status  # 128 + the signal after a SIGTERM/SIGINT stop (train.preemption)


def tpu_check_config(args: argparse.Namespace) -> TrainConfig:
    """The config `tpu-check` compiles: a run folder's config.json, or the flags (and --config)."""
    given = _given(args)
    source = args.source
    if source and os.path.isdir(source):
        saved = os.path.join(source, "config.json")
        if not os.path.exists(saved):
            raise MissingFileError(f"{source}: not a run folder ({saved} not found)")
        return TrainConfig.from_file(saved, **given)
    if source and (source.endswith(".msgpack") or os.path.isfile(source)):
        if not os.path.isfile(source):
            raise MissingFileError(f"{source}: no such model file")
        given["init"] = source
    elif source:
        given["model"] = source
    if args.config:
        return TrainConfig.from_file(args.config, **given)
    if "model" not in given and "init" not in given:
        raise ConfigError("tpu-check: name a model (a timm name, a .msgpack file or a run folder)")
    return TrainConfig.from_dict(given)


def cmd_tpu_check(args: argparse.Namespace) -> int:
    config = tpu_check_config(args)
    if config.init is None and config.model is not None:
        from torch2flax.timm_names import check_model_name

        check_model_name(config.model)
    from torch2flax.train.tpu_check import format_tpu_report, tpu_check

    report = tpu_check(config, args.tpu, search=args.search,
                       log=None if args.json or args.quiet else (lambda s: print(s, flush=True)))
    if args.json:
        import json

        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_tpu_report(report))
    return 0 if report.fits else 1  # a script can branch on it; the report says why


def cmd_predict(args: argparse.Namespace) -> int:
    main_process = _start_distributed(args)
    from torch2flax.train.inference import RUN_TTA, predict

    result = predict(args.checkpoint, args.test, args.out, tta=args.tta or RUN_TTA, probs=args.probs,
                     weights=args.weights, batch_size=args.batch_size, image_size=args.image_size,
                     num_workers=args.num_workers, parallel=args.parallel, dtype=args.dtype,
                     portable=False if args.full_model else None, compile_cache=args.compile_cache,
                     progress=not args.quiet)
    if main_process:
        print(f"predicted {len(result.ids)} records; wrote " + ", ".join(result.files))
    return 0


def cmd_gradcam(args: argparse.Namespace) -> int:
    from torch2flax.train.explain import write_gradcam

    files, layer = write_gradcam(args.checkpoint, args.images, args.out, layer=args.layer, target=args.target,
                                 num=args.num, method=args.method)
    print(f"wrote {len(files) - 1} {args.method} overlays ({layer}) and grid.png to {os.path.abspath(args.out)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from torch2flax.train.demo import run_demo

    run_demo(args.out, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
             image_size=args.image_size, num_workers=args.num_workers, pretrained=args.pretrained,
             compile_cache=args.compile_cache, progress=not args.quiet)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from torch2flax.train.doctor import collect, format_report

    report = collect(batch_size=args.batch_size, image_size=args.image_size, num_workers=args.num_workers)
    if args.json:
        import json

        print(json.dumps(dataclasses.asdict(report), indent=2))
    else:
        print(format_report(report))
    return 0  # warnings are advice, not failure: a notebook cell or a script goes on


def cmd_cv(args: argparse.Namespace) -> int:
    from torch2flax.train.cv import CV, OOF, ensemble_report, summary, write_cv

    if len(args.out) > 1 or args.weights:
        report = ensemble_report(args.out, args.weights)
        for m in report["members"]:
            print(f"  {m['oof']} (weight {m['weight']:.3f}): OOF macro F1 {m['macro_f1']:.4f}, "
                  f"accuracy {m['accuracy']:.4f}")
        print(f"ensemble of {len(args.out)}: OOF macro F1 {report['oof_macro_f1']:.4f}, accuracy "
              f"{report['oof_accuracy']:.4f} over {report['records']} records")
        return 0
    (out,) = args.out
    report = write_cv(out)
    print(summary(report))
    written = [OOF] if report["done"] else []
    print(f"wrote {', '.join(os.path.join(out, f) for f in [*written, CV])}")
    return 0


def cmd_export_timm(args: argparse.Namespace) -> int:
    from torch2flax.converter import save_timm
    from torch2flax.train.checkpoint import load_checkpoint
    from torch2flax.train.inference import ensemble_members

    members = ensemble_members([args.source])  # a run folder: its best.msgpack
    if len(members) != 1:
        raise ConfigError(f"{args.source}: a cross-validation folder holds {len(members)} models: export one "
                          f"fold's ({os.path.join(args.source, 'fold0')}, ...)")
    module, variables, _ = load_checkpoint(members[0].checkpoint)
    name, kwargs = save_timm(args.out, module, variables)
    n = kwargs.get("num_classes")
    rest = "".join(f", {k}={v!r}" for k, v in kwargs.items() if k != "num_classes")
    print(f"wrote {os.path.abspath(args.out)} ({os.path.getsize(args.out) / 1e6:.1f} MB), the timm state dict of "
          f"{members[0].checkpoint}; in PyTorch:\n  timm.create_model({name!r}, num_classes={n}{rest}, pretrained=True, "
          f"pretrained_cfg_overlay=dict(file={args.out!r}, num_classes={n}))")
    return 0
