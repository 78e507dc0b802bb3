"""Every relative link in the README, CONTRIBUTING.md and docs/ points at a file that exists (and, with
`#anchor` into a Markdown file, at a heading there), so moving a page cannot leave dead links."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # '# comments' in code are no headings
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_every_relative_link_resolves():
    assert len(PAGES) >= 8 and all(p.exists() for p in PAGES)
    broken = []
    for page in PAGES:
        for target in relative_links(page):
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_the_link_check_sees_links_and_catches_a_dead_one(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](page.md#top) [gone](missing.md) [web](https://example.com)\n"
                    "```\n[in code](nowhere.md)\n```\n")
    assert relative_links(page) == ["page.md#top", "missing.md"]
    assert anchors(page) == {"top"}


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


# ------------------------------------------------------------ flags and functions the pages name

# Flags of the other tools the pages show (pip, pytest, docker, gcloud, XLA): not ours to check.
OTHER_TOOLS = {"--abi", "--cpus", "--dist", "--dry-run", "--durations", "--index-url", "--maxprocesses", "--no-deps",
               "--no-index", "--nodes", "--platform", "--python-version", "--version", "--zone", "--find-links"}
COMMAND = re.compile(r"torch2flax ([a-z][a-z-]+)\b([^`\n|;&#]*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9_-]*)")
NAME = re.compile(r"`((?:torch2flax|train|loaders)\.[A-Za-z_][\w.]*)`")


def _parsers() -> dict[str, set[str]]:
    """Each subcommand's flags (deprecated spellings left out: the pages teach the current ones)."""
    import argparse

    from torch2flax.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {c: {f for a in p._actions if a.help != argparse.SUPPRESS for f in a.option_strings}
            for c, p in sub.choices.items()}


def _script_flags() -> set[str]:
    """The flags of the benchmark and CI scripts the pages run (`python benchmarks/x.py --quick`)."""
    found = set()
    for path in [*(ROOT / "benchmarks").glob("*.py"), *(ROOT / ".ci").glob("*.py")]:
        found |= set(re.findall(r"add_argument\(\s*\"(--[a-z][a-z0-9-]*)\"", path.read_text()))
    return found


def _resolves(name: str) -> bool:
    """`torch2flax.train.checkpoint.load_checkpoint`, or `train.cv` (repository folders install
    under torch2flax): an importable module and attributes on it."""
    import importlib

    parts = name.split(".")
    if parts[0] != "torch2flax":
        parts = ["torch2flax", *parts]
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def doc_problems(text: str, parsers: dict[str, set[str]], known: set[str]) -> list[str]:
    """Flags a page gives a torch2flax command that the command lacks, flags in code that no command
    or script has, and `torch2flax.*` names that do not import."""
    text = re.sub(r"\\\n\s*", " ", text)  # a shell command continued over lines
    problems = []
    for line in text.splitlines():
        for command, rest in COMMAND.findall(line):
            if command in parsers:
                problems += [f"torch2flax {command} has no {f}" for f in FLAG.findall(rest) if f not in parsers[command]]
    every = set().union(*parsers.values()) | known | OTHER_TOOLS
    for code in re.findall(r"`([^`\n]+)`|```.*?```", text, flags=re.S):
        problems += [f"no command or script has {f}" for f in FLAG.findall(code)
                     if f not in every and not f.startswith("--xla_")]  # XLA_FLAGS / LIBTPU_INIT_ARGS
    problems += [f"{n} does not exist" for n in NAME.findall(text)
                 if not n.endswith((".py", ".md", ".csv", ".json")) and not _resolves(n)]
    return sorted(set(problems))


def test_the_pages_name_only_flags_and_functions_that_exist():
    parsers, known = _parsers(), _script_flags()
    problems = {str(p.relative_to(ROOT)): doc_problems(p.read_text(), parsers, known) for p in PAGES}
    assert {p: v for p, v in problems.items() if v} == {}


def test_the_flag_check_catches_a_wrong_flag_and_name():
    parsers = {"train": {"--epochs", "--timm-checkpoint"}, "predict": {"--checkpoint"}}
    text = ("```\ntorch2flax train --epochs 3 \\\n  --checkpoint x.pth\n```\n"
            "then `torch2flax predict --checkpoint runs/best.msgpack`, see `torch2flax.train.fit` and "
            "`torch2flax.train.no_such_thing`; `--bogus` too.\n")
    assert doc_problems(text, parsers, set()) == [
        "no command or script has --bogus", "torch2flax train has no --checkpoint",
        "torch2flax.train.no_such_thing does not exist"]
