"""Where apex_jax finds its own files: the package, its bundled data and the Hydra configs.

A leaf module (it imports nothing from apex_jax), so that any module may ask for a path
without pulling in the modules that use the files.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DATA_DIR",
    "PACKAGE_DIR",
    "bundled_path",
    "config_dir",
    "config_option",
    "config_options",
]

PACKAGE_DIR = Path(__file__).parent
DATA_DIR = PACKAGE_DIR / "data"


def bundled_path(relative: str) -> Path:
    """Returns the path of a file shipped in the package's `data` folder.

    Args:
        relative: Path inside `apex_jax/data`, e.g. `"traces/apex_plus/llama/lmsys_05.csv"`.

    Returns:
        The absolute path. It is not checked to exist.
    """
    return DATA_DIR / relative


def config_dir() -> str:
    """Absolute path of the Hydra config tree (a string, as Hydra wants it).

    An installed copy carries it as the package ``apex_jax.conf``; a source checkout imported
    from its root (as the tests are) finds ``conf/`` beside the package instead.
    """
    spec = importlib.util.find_spec("apex_jax.conf")
    if spec is not None and spec.submodule_search_locations:
        return str(Path(next(iter(spec.submodule_search_locations))).resolve())
    return str((PACKAGE_DIR.parent / "conf").resolve())


def config_options(group: str) -> list[str]:
    """Names of the options of a config group (the files of ``conf/<group>/``), sorted."""
    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


def config_option(group: str, name: str) -> dict[str, Any] | None:
    """The values of ``conf/<group>/<name>.yaml`` as a plain dict, or None if no such option.

    This lets the Python API take the command line's names (``model="llama3_1_70b"``,
    ``engine="vllm_0_6_0"``, ``workload="lmsys"``).
    """
    path = Path(config_dir()) / group / f"{name}.yaml"
    if "/" in name or not path.is_file():
        return None
    return yaml.safe_load(path.read_text()) or {}
