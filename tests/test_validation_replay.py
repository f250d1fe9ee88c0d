"""Replay every run of the bundled vLLM H100 measurements through ``simulate_many``.

Issue 2 asks only that every case replays without error; accuracy comes later. Each row of
``vllm_h100_dev.csv`` is one data-parallel replica of a run, so rows are grouped into one case
per (served trace, dp, tp), and each case replays the requests the run actually served.
"""

from __future__ import annotations

import csv
from collections import defaultdict

import pytest

import apex_jax
from apex_jax.paths import bundled_path
from apex_jax.workload import load_trace

pytestmark = pytest.mark.slow

DEV_CSV = "validation/vllm_h100_dev.csv"
_PER_RUN = ("model", "gpu", "gpus", "pp", "weight_dtype", "kv_dtype", "engine", "engine_version")
# Each run's launch arguments (see apex_jax/data/validation/SOURCES.md).
_LAUNCH = ("gpu_memory_utilization", "max_model_len", "custom_all_reduce")


def _rows() -> list[dict[str, str]]:
    with bundled_path(DEV_CSV).open(newline="") as stream:
        return list(csv.DictReader(stream))


def _groups() -> dict[tuple[str, int, int], list[dict[str, str]]]:
    groups: dict[tuple[str, int, int], list[dict[str, str]]] = defaultdict(list)
    for row in _rows():
        groups[(row["served_trace"], int(row["dp"]), int(row["tp"]))].append(row)
    return dict(groups)


def _case(rows: list[dict[str, str]]) -> dict:
    r = rows[0]
    return {
        "model": r["model"],
        "hardware": r["gpu"],
        "num_gpus": int(r["gpus"]),
        "plan": {
            "dp": int(r["dp"]),
            "tp": int(r["tp"]),
            "pp": int(r["pp"]),
            "weight_dtype": r["weight_dtype"],
            "kv_dtype": r["kv_dtype"],
        },
        "workload": {"kind": "trace", "path": "validation/" + r["served_trace"]},
        "engine": {
            "name": r["engine"],
            "version": r["engine_version"],
            "gpu_memory_utilization": float(r["gpu_memory_utilization"]),
            "max_model_len": int(r["max_model_len"]) if r["max_model_len"] else None,
            "custom_all_reduce": r["custom_all_reduce"] == "1",
        },
    }


GROUPS = _groups()
CASE_IDS = [f"{trace.split('/')[-1].removesuffix('.csv')}" for trace, _, _ in GROUPS]


@pytest.fixture(scope="module")
def replay() -> dict[tuple[str, int, int], dict]:
    """All cases in one batched call; raising here fails every test of the module."""
    results = apex_jax.simulate_many([_case(rows) for rows in GROUPS.values()])
    assert len(results) == len(GROUPS)
    return dict(zip(GROUPS, results))


def test_rows_group_into_whole_runs():
    rows = _rows()
    assert len(rows) > 0
    assert sum(len(g) for g in GROUPS.values()) == len(rows)
    for (trace, dp, _), group in GROUPS.items():
        assert sorted(int(r["replica"]) for r in group) == list(range(dp)), trace
        for key in _PER_RUN + _LAUNCH:
            assert len({r[key] for r in group}) == 1, f"{trace}: {key} differs between replicas"


def test_served_traces_resolve_as_bundled_names():
    for trace, dp, _ in GROUPS:
        workload = load_trace("validation/" + trace)
        assert workload.num_requests >= dp


@pytest.mark.parametrize("key", list(GROUPS), ids=CASE_IDS)
def test_case_replays_ok(replay, key):
    result = replay[key]
    trace, dp, tp = key
    assert result["status"] == "OK", result.get("message", result["status"])
    assert (result["dp"], result["tp"]) == (dp, tp)
    assert result["num_requests"] == load_trace("validation/" + trace).num_requests
    assert 0 < result["ttft_mean_s"] <= result["e2e_mean_s"]
    assert result["gpu_mem_util"] == pytest.approx(0.97)
