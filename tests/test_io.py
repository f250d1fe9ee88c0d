"""Result files: atomic, readable by others, and JSON without NumPy types or NaN."""

from __future__ import annotations

import json
import os
import stat

import jax.numpy as jnp
import numpy as np
import pytest

from apex_jax.io import json_text, jsonable, write_atomic, write_json


@pytest.fixture
def usual_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_have_the_permissions_of_a_new_file(tmp_path, usual_umask):
    path = tmp_path / "sub" / "plans.csv"
    write_atomic(path, "a,b\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_text() == "a,b\n"


def test_a_rewrite_replaces_the_file_and_leaves_no_temporary(tmp_path, usual_umask):
    path = tmp_path / "summary.json"
    write_atomic(path, "old")
    write_json(path, {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    write_atomic(path, "old")
    with pytest.raises(TypeError):
        write_atomic(path, None)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_jsonable_converts_numpy_and_jax_values_and_drops_non_finite_numbers():
    value = {
        1: np.int64(3),
        "f": np.float32(0.5),
        "nan": float("nan"),
        "inf": np.float64(np.inf),
        "array": np.array([1.0, np.nan]),
        "jax": jnp.asarray(2.0),
        "tuple": (np.bool_(True), "é"),
    }
    assert jsonable(value) == {
        "1": 3,
        "f": 0.5,
        "nan": None,
        "inf": None,
        "array": [1.0, None],
        "jax": 2.0,
        "tuple": [True, "é"],
    }
    assert "é" in json_text(value)
    assert "NaN" not in json_text(value)
