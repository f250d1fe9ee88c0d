"""Writing results: atomic file replacement and JSON text of NumPy and JAX values.

A leaf module (it imports nothing from apex_jax).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["json_text", "jsonable", "write_atomic", "write_json"]


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write a file, text or bytes (a PNG), so that readers see the old or the new content,
    never a torn one.

    The file gets the permissions of any newly created file (``0o666`` less the umask, so
    ``0644`` under the usual ``022``): results are for others to read, unlike the ``0600`` of
    a temporary file. Missing parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def jsonable(value: Any) -> Any:
    """``value`` with NumPy/JAX scalars and arrays as Python numbers and lists, mappings as
    dicts with string keys, tuples as lists, and NaN or infinite floats as ``None`` (JSON has
    no such numbers)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return jsonable(value.tolist())
    return value


def json_text(value: Any) -> str:
    """Indented JSON of :func:`jsonable` ``(value)``, non-ASCII characters kept as they are."""
    return json.dumps(jsonable(value), indent=2, ensure_ascii=False)


def write_json(path: str | Path, value: Any) -> None:
    """Write :func:`json_text` ``(value)`` to ``path`` with :func:`write_atomic`."""
    write_atomic(path, json_text(value))
