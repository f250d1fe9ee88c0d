"""Golden outputs of a few small end-to-end runs.

The files in ``tests/golden/`` are written by ``scripts/update_golden.py``. When the cost model,
memory model or engine changes on purpose, rerun that script and review the diff.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

import apex_jax

ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = ROOT / "tests" / "golden"
SCRIPT = ROOT / "scripts" / "update_golden.py"
RTOL = 1e-6
HINT = (
    "If the cost model, memory model or engine changed on purpose, regenerate the golden files "
    "with `python scripts/update_golden.py` and review their diff."
)


def _golden_files() -> list[Path]:
    return sorted(GOLDEN_DIR.glob("*.json"))


def _load_script():
    spec = importlib.util.spec_from_file_location("update_golden", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def golden() -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in _golden_files()}


@pytest.fixture(scope="module")
def current(golden) -> dict[str, dict]:
    """Today's results of every golden case, in one batched call as the script makes them."""
    results = apex_jax.simulate_many([g["case"] for g in golden.values()])
    return dict(zip(golden, results))


def test_golden_files_match_the_script_cases(golden):
    script = _load_script()
    assert len(golden) >= 2
    assert set(golden) == set(script.CASES), HINT
    for name, g in golden.items():
        assert g["case"] == script.CASES[name], f"{name}: case edited without regenerating. {HINT}"


def _differences(expected: dict, actual: dict) -> list[str]:
    problems = []
    for key, want in expected.items():
        if key not in actual:
            problems.append(f"{key}: missing (golden {want!r})")
            continue
        got = actual[key]
        if want is None:
            if not (isinstance(got, float) and math.isnan(got)):
                problems.append(f"{key}: golden NaN, now {got!r}")
        elif isinstance(want, str) or isinstance(got, str):
            if got != want:
                problems.append(f"{key}: golden {want!r}, now {got!r}")
        elif not math.isclose(got, want, rel_tol=RTOL, abs_tol=0.0):
            rel = abs(got - want) / abs(want) if want else math.inf
            problems.append(f"{key}: golden {want!r}, now {got!r} (rel diff {rel:.2e})")
    return problems


@pytest.mark.parametrize("name", [p.stem for p in _golden_files()])
def test_end_to_end_run_matches_golden(name, golden, current):
    problems = _differences(golden[name]["result"], current[name])
    if problems:
        pytest.fail(
            f"{name} differs from tests/golden/{name}.json (rtol {RTOL}):\n  "
            + "\n  ".join(problems)
            + f"\n{HINT}",
            pytrace=False,
        )
