"""apex_jax: vectorised, trace-driven search for LLM serving plans.

Importing the package switches JAX to 64-bit: simulated clocks are float64 because a
float32 clock over a one-hour trace drifts by about 1% of a token gap.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

__all__ = [
    "ServingFit",
    "__version__",
    "default_compile_cache_dir",
    "enable_compile_cache",
    "enable_x64",
    "fit_serving",
    "plan_space",
    "simulate",
    "simulate_many",
]

__version__ = "0.1.0"


def enable_x64() -> None:
    """Turn on float64 in JAX (idempotent)."""
    jax.config.update("jax_enable_x64", True)


def default_compile_cache_dir() -> Path:
    """Where compiled engines are kept between runs: ``$APEX_JAX_CACHE_DIR`` if set, else
    ``apex_jax/xla`` under ``$XDG_CACHE_HOME`` (``~/.cache`` by default)."""
    explicit = os.environ.get("APEX_JAX_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "apex_jax" / "xla"


def enable_compile_cache(path: str | os.PathLike | None = None) -> Path:
    """Keep compiled engines on disk, so that later processes load them instead of compiling.

    Compiling the engine takes seconds per lane-batch shape, and a search compiles a handful
    of shapes; every sweep job, test or repeated search in a fresh process would pay that
    again. JAX's persistent compilation cache keys each executable by its program, shapes,
    compile options and backend, so a cached engine is only ever reused for identical inputs
    to the compiler and results do not depend on the cache. The command line turns this on
    (``compile_cache=``); the Python API leaves it to the caller.

    Args:
        path: the cache directory (created if missing); default
            :func:`default_compile_cache_dir`.

    Returns:
        The directory in use.

    Raises:
        ValueError: the directory cannot be created or written.
    """
    directory = Path(path).expanduser() if path is not None else default_compile_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"compile_cache: cannot use {directory} ({err.strerror}); give a writable "
            "directory or compile_cache=off"
        ) from err
    if not os.access(directory, os.W_OK):
        raise ValueError(
            f"compile_cache: {directory} is not writable; give a writable directory or "
            "compile_cache=off"
        )
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # The engine's compiles take seconds; JAX's own sub-second helpers are not worth a file.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return directory


enable_x64()

from apex_jax.api import ServingFit, fit_serving, plan_space, simulate, simulate_many
