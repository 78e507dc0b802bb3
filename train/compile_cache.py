"""JAX's persistent compilation cache for `train`, `predict` and `demo`: compile once per machine
(or per run folder), not once per session.

On a TPU, compiling a large model's train step takes minutes, and a Kaggle session resumed after
its time limit or a preemption pays them again. JAX can keep compiled programs on disk
(`jax_compilation_cache_dir`); its cache key holds the program, jaxlib's version, the backend's
(libtpu's) version, the XLA flags and the devices, so an entry written by another jax or libtpu is
a miss, never loaded, and an unreadable entry is reported by jax as a warning and compiled again.

Where (`resolve`): `--compile-cache DIR` (`compile_cache=`; the default `auto`: what follows), else $TORCH2FLAX_COMPILE_CACHE, else
JAX's own $JAX_COMPILATION_CACHE_DIR or a folder already set with `jax.config.update`, else on
Kaggle `OUT/compile-cache` beside the run's checkpoints (a session resumed from that run folder
finds it; Kaggle keeps only /kaggle/working), else ~/.cache/torch2flax/jax-compile-cache
($XDG_CACHE_HOME). `none` turns it off. Not by default in a multi-process run on CPUs: there, on
jax 0.12.1, two processes that loaded their programs from a warm cache hung in their first
collective (tests/test_multihost.py, 2026-12-07); a folder given explicitly is still used.
"""
from __future__ import annotations

import os

ENV = "TORCH2FLAX_COMPILE_CACHE"
AUTO, OFF = "auto", "none"
RUN_SUBDIR = "compile-cache"
_enabled: list[str] = []  # the folder `enable` set last: not the user's own jax setting


def on_kaggle() -> bool:
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE")) or os.path.isdir("/kaggle/working")


def users_jax_dir() -> str | None:
    """A cache folder set outside torch2flax: $JAX_COMPILATION_CACHE_DIR or `jax.config.update`."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    return str(current) if current and current not in _enabled else None


def resolve(setting: str | None = AUTO, run_out: str | None = None) -> str | None:
    """The cache folder to use (None: off), by the order in the module docstring; `setting` is a
    folder, "none", or "auto" (None alike): the environment's or the default."""
    if setting is not None and setting.strip().lower() == AUTO:
        setting = None
    value = setting if setting is not None else os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() == OFF else os.path.abspath(os.path.expanduser(value))
    users = users_jax_dir()
    if users:
        return users
    if on_kaggle() and run_out:
        return os.path.abspath(os.path.join(run_out, RUN_SUBDIR))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "torch2flax", "jax-compile-cache")


def enable(setting: str | None = AUTO, run_out: str | None = None) -> str | None:
    """Point JAX's persistent compilation cache at `resolve(setting, run_out)` (or turn it off)
    before the first compile; returns the folder. Called again with another folder (a second run
    in the same notebook kernel), it moves the cache there."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    users = users_jax_dir()
    path = resolve(setting, run_out)
    given = setting is not None and setting.strip().lower() != AUTO
    chosen = given or os.environ.get(ENV) is not None or users is not None
    if not chosen and jax.process_count() > 1 and jax.default_backend() == "cpu":
        path = None  # see the module docstring: measured to hang
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    if jax.config.jax_compilation_cache_dir != path:
        # jax opens its cache once, at the first compile after the folder is set: reset_cache()
        # makes the next compile open the new folder (a notebook's second run with another OUT).
        compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", path)
        _enabled[:] = [path]
    return path
