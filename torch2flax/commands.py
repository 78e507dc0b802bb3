"""`torch2flax list | convert | verify`: the converter from the shell.

Heavy imports (jax, torch, timm) happen inside the handlers so `--help` stays instant.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from torch2flax.backend import backend_choices, backend_names
from torch2flax.utils import add_deprecated_alias

DEFAULT_TOL = 1e-4


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "list", help="list the timm models torch2flax converts, and with which backend",
        description="timm model names matching PATTERN, each marked with the backend `convert` uses: "
        "native (a hand-written Flax twin) or export (its torch.export graph run in JAX).")
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch filter, e.g. 'resnet*'")
    p.add_argument("--backend", choices=backend_names(), default=None, help="only names using this backend")
    p.set_defaults(func=cmd_list)

    p = subparsers.add_parser(
        "convert", help="convert a timm model to Flax and check parity",
        description="Convert a timm model (random init, hub weights or a local checkpoint) to a Flax "
        "msgpack + JSON sidecar, then compare logits and features with timm on a random batch.")
    p.add_argument("name", help="timm model name (see `torch2flax list`)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pretrained", action="store_true", help="timm's pretrained weights from the hub")
    src.add_argument("--timm-checkpoint", dest="checkpoint", metavar="PATH",
                     help="a timm state dict: .pth/.pt/.bin/.safetensors")
    add_deprecated_alias(src, "--checkpoint", "--timm-checkpoint", "checkpoint")
    p.add_argument("--num-classes", type=int, default=None, help="new head size (freshly initialised)")
    p.add_argument("--backend", choices=backend_choices(), default="auto",
                   help="native Flax twin, exported graph, or auto (native where one exists)")
    p.add_argument("--out", required=True, metavar="FILE.msgpack", help="output file (+ FILE.msgpack.json)")
    p.add_argument("--no-verify", action="store_true", help="skip the parity check")
    p.add_argument("--portable", action="store_true",
                   help="also store the eval forward as a jax.export program for cpu, cuda and tpu (at --image-size), "
                        "which torch2flax.load and predict run with no torch or timm installed")
    _check_args(p)
    p.set_defaults(func=cmd_convert)

    p = subparsers.add_parser(
        "verify", help="compare a converted model with timm",
        description="Rebuild the timm model with the same weights (from --timm-checkpoint, or the msgpack "
        "converted back to torch) and print the errors of logits and features; exit 1 above tolerance.")
    p.add_argument("file", metavar="FILE.msgpack")
    p.add_argument("--timm-checkpoint", dest="checkpoint", metavar="PATH",
                   help="compare against this timm state dict (.pth/.pt/.bin/.safetensors)")
    add_deprecated_alias(p, "--checkpoint", "--timm-checkpoint", "checkpoint")
    _check_args(p)
    p.set_defaults(func=cmd_verify)


def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", type=int, default=None,
                   help="square input size of the check (default: the model's pretrained input size)")
    p.add_argument("--batch-size", type=int, default=2, help="batch size of the check (default 2)")
    add_deprecated_alias(p, "--size", "--image-size", "image_size", type=int)
    add_deprecated_alias(p, "--batch", "--batch-size", "batch_size", type=int)
    p.add_argument("--tol", type=float, default=DEFAULT_TOL,
                   help="max |flax - timm| / max(1, max |timm|) allowed (default %(default)g)")


def cmd_list(args: argparse.Namespace) -> int:
    import fnmatch

    from torch2flax.models import list_models
    from torch2flax.timm_names import timm_model_names

    native = set(list_models())
    names = sorted(n for n in native | timm_model_names() if fnmatch.fnmatch(n, args.pattern))
    rows = [(n, "native" if n in native else "export") for n in names]
    rows = [r for r in rows if args.backend in (None, r[1])]
    if not rows:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    width = max(len(n) for n, _ in rows)
    print("\n".join(f"{n:<{width}}  {b}" for n, b in rows))
    return 0


def _report(errors: dict[str, float], tol: float) -> bool:
    ok = True
    for what in ("logits", "features"):
        abs_err, rel_err = errors[f"{what}_abs"], errors[f"{what}_rel"]
        passed = rel_err <= tol
        ok &= passed
        print(f"  {what:<8} max abs err {abs_err:.3e}  rel err {rel_err:.3e}  "
              f"{'ok' if passed else 'FAIL'} (tol {tol:g})")
    return ok


def _hw(module, size: int | None) -> tuple[int, int]:
    from torch2flax.backend import input_hw

    return input_hw(module, size)  # an exported graph runs at the size it was exported at


def cmd_convert(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from torch2flax.timm_names import check_model_name

    check_model_name(args.name)  # before the seconds of importing jax, torch and timm

    steps = ["convert"] + ([] if args.no_verify else ["verify"]) + ["save"]
    bar = tqdm(total=len(steps), desc=f"{args.name}", unit="step", file=sys.stderr)
    try:
        from torch2flax import io
        from torch2flax.converter import convert_with_timm, parity_errors

        bar.set_postfix_str("converting")
        t0 = time.perf_counter()
        result, model = convert_with_timm(args.name, pretrained=args.pretrained, checkpoint=args.checkpoint,
                                          num_classes=args.num_classes, backend=args.backend,
                                          image_size=args.image_size)
        module, variables = result
        bar.update()
        seconds = time.perf_counter() - t0
        ok = True
        errors = None
        if not args.no_verify:
            bar.set_postfix_str("checking parity (compiling)")
            errors = parity_errors(model, module, variables, batch=args.batch_size, input_hw=_hw(module, args.image_size))
            bar.update()
        bar.set_postfix_str("saving")
        if args.portable:
            bar.set_postfix_str("writing the portable program")
        paths = io.save(args.out, module, variables, portable=args.portable, image_size=args.image_size)
        bar.update()
    finally:  # an error is reported by the command line (torch2flax.cli.main), after the bar
        bar.close()
    print(f"converted {args.name} in {seconds:.1f}s"
          + (f" (head re-initialised: {', '.join(result.reinitialized)})" if result.reinitialized else ""))
    if errors is not None:
        print(f"parity vs timm, batch {args.batch_size} at {'x'.join(map(str, _hw(module, args.image_size)))}:")
        ok = _report(errors, args.tol)
    for p in paths:
        print(f"wrote {p} ({os.path.getsize(p) / 1e6:.1f} MB)")
    return 0 if ok else 1


def cmd_verify(args: argparse.Namespace) -> int:
    from torch2flax import io
    from torch2flax.converter import parity_errors, timm_from_flax
    from torch2flax.prepare import model_name
    from torch2flax.timm_source import load_into_timm, load_timm_state_dict

    module, variables = io.load(args.file, portable=False)
    name = model_name(module)
    if args.checkpoint:
        model = timm_from_flax(module, variables)  # the architecture, then the checkpoint's weights
        load_into_timm(model, load_timm_state_dict(args.checkpoint), source=f"checkpoint {args.checkpoint}")
        reference = args.checkpoint
    else:
        model = timm_from_flax(module, variables)
        reference = f"{args.file} converted back to torch"
    hw = _hw(module, args.image_size)
    print(f"verifying {args.file} ({name}) against timm with weights from {reference}, "
          f"batch {args.batch_size} at {hw[0]}x{hw[1]}:")
    errors = parity_errors(model, module, variables, batch=args.batch_size, input_hw=hw)
    return 0 if _report(errors, args.tol) else 1
