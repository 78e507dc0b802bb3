"""The package's shape: no import cycles, no backend dispatch by attribute probing, no model
surgery in `train/`."""
import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The repository's folders and the package names they install as (setup.cfg's package_dir).
PACKAGES = {"torch2flax": "torch2flax", "loaders": "torch2flax.loaders", "train": "torch2flax.train"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Every torch2flax module `name` imports, at module level or inside functions."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import mod` imports pkg.mod when that is a module, else pkg.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:  # `import torch2flax.export.model` -> that module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    # A package's __init__ runs before any of its modules: importing `a.b` imports `a` too.
    graph = {n: _imports(n, p, known) for n, p in modules.items()}
    return graph


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    assert len(graph) > 40 and "torch2flax.export.model" in graph["torch2flax.export.backend"]
    # Package __init__ files only re-export (lazily, by name): edges from a package to its own
    # modules are how Python loads it, not a dependency of the package on them.
    graph = {n: {m for m in deps if not m.startswith(n + ".")} for n, deps in graph.items()}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_export_never_imports_the_converter():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("torch2flax.export"):
            assert "torch2flax.converter" not in deps, name


def test_no_backend_dispatch_by_hasattr():
    # What tells the backends' modules apart (the contract's methods and fields); timm's own
    # optional methods on torch models (`no_weight_decay`) are not backend dispatch.
    probes = re.compile(r"hasattr\([^,]+,\s*\"(variable_shapes|image_size|intermediates|feature_info|"
                        r"model_name|timm_kwargs|instance_key|spec)\"\)")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for n, p in _modules().items()
                 for i, line in enumerate(p.read_text().splitlines(), 1) if probes.search(line)]
    assert offenders == []


def test_train_holds_no_model_surgery():
    """`train/` composes: it builds models through torch2flax.prepare_model, never by cloning or
    re-heading them itself."""
    # Setting the compute dtype and the BatchNorm sync axis (`clone(dtype=..., axis_name=...)`) is
    # how Flax runs any module, not surgery.
    surgery = re.compile(r"\.clone\((?!dtype=)|with_head\(|reset_classifier|num_classes=0|freeze_kwargs|"
                         r"headless\(|\.backbone\b")
    offenders = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for n, p in _modules().items()
                 if n.startswith("torch2flax.train")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if surgery.search(line)]
    assert offenders == []


def _top_level_names(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def test_the_trainer_holds_only_the_run():
    """`train/trainer.py` is setup, the epochs and the result: the stop agreement lives in
    `preemption`, the bad-image report in `bad_images`, the CV orchestration in `cv`, data
    assembly in `data`, the epoch loop's parts in `loop`."""
    homes = {"preemption": {"agree", "Control", "StopReason"}, "bad_images": {"host_batches", "write_bad_images"},
             "cv": {"fit_folds", "write_oof"}, "data": {"index_splits", "build_loaders", "Folds",
                                                        "training_augmentation", "check_labels"},
             "loop": {"train_epoch", "evaluate", "EpochMeter"}}
    trainer = _top_level_names(ROOT / "train" / "trainer.py")
    for module, names in homes.items():
        assert names <= _top_level_names(ROOT / "train" / f"{module}.py"), module
        assert not names & trainer, f"trainer.py defines {sorted(names & trainer)}, which belong in {module}.py"
    assert len((ROOT / "train" / "trainer.py").read_text().splitlines()) < 400


def test_no_two_public_functions_share_a_name():
    """One name, one meaning: a public function or class is defined in one module only. Two names
    are one meaning in two places by design: the CLI modules' `register(subparsers)` (each adds its
    own subcommands), and `torch2flax.nnx.convert`, which is `torch2flax.convert` in NNX form."""
    seen: dict[str, list[str]] = {}
    for name, path in _modules().items():
        for fn in _top_level_names(path):
            if not fn.startswith("_"):
                seen.setdefault(fn, []).append(name)
    shared = {fn: mods for fn, mods in seen.items() if len(mods) > 1 and fn != "register"}
    assert shared == {"convert": ["torch2flax.converter", "torch2flax.nnx"]}
    assert sorted(seen["register"]) == ["torch2flax.commands", "torch2flax.loaders.cli", "torch2flax.train.cli"]


def test_no_flag_means_two_things_in_two_commands():
    """A flag's help says what it takes; the same flag in two commands takes the same kind of thing
    (a timm state dict is --timm-checkpoint everywhere; --checkpoint is a torch2flax file)."""
    import argparse

    from torch2flax.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    dests: dict[str, set[str]] = {}
    for parser in sub.choices.values():
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:  # a deprecated spelling
                continue
            for flag in action.option_strings:
                dests.setdefault(flag, set()).add(action.dest)
    assert {f: d for f, d in dests.items() if len(d) > 1} == {}
    timm_state = {c for c, p in sub.choices.items() if "--timm-checkpoint" in p._option_string_actions}
    assert timm_state == {"convert", "verify", "train", "tpu-check"}
    for command in ("predict", "gradcam"):  # --checkpoint: a torch2flax .msgpack or run folder
        assert "torch2flax" in sub.choices[command]._option_string_actions["--checkpoint"].help
