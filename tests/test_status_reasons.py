"""Every non-OK status says why: which request, which limit, by how much; a search in which
no plan is OK exits non-zero with a summary naming the limit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from apex_jax.deployment import make_case
from apex_jax.evaluate import evaluate_cases

SMALL = {"model": "llama3.1-8b", "hardware": "h100", "num_gpus": 2}


def _static(isl: int, osl: int = 8, batch_size: int = 2) -> dict:
    return {"kind": "static_batch", "batch_size": batch_size, "isl": isl, "osl": osl}


@pytest.fixture(scope="module")
def results():
    cases = [
        make_case(**SMALL, plan={"tp": 1, "dp": 2}, workload=_static(64)),
        # 200,000 + 8 tokens against Llama-3.1's 131,072-token model length.
        make_case(**SMALL, plan={"tp": 1, "dp": 2}, workload=_static(200_000)),
        # 25% of an H100 leaves 1737 KV pages next to 16 GB of weights (27,792 tokens, so
        # vLLM starts only with max_model_len up to that), 1720 of them usable after vLLM's
        # 1% watermark: a 27,608-token request (1726 pages of 16) never fits.
        make_case(
            **SMALL,
            plan={"tp": 1},
            workload=_static(27_600, batch_size=1),
            engine={
                "gpu_memory_utilization": 0.25,
                "max_model_len": 1737 * 16,
                "chunked_prefill": True,
            },
        ),
        make_case(
            model="llama3_1_70b", hardware="h100", num_gpus=1, plan={"tp": 1}, workload=_static(64)
        ),
    ]
    return evaluate_cases(cases)[0]


def test_ok_has_an_empty_reason(results):
    assert results[0]["status"] == "OK" and results[0]["status_reason"] == ""


def test_a_request_over_max_model_len_is_named(results):
    r = results[1]
    assert r["status"] == "INFEASIBLE"
    assert r["status_reason"] == (
        "every request is rejected: request 0 is 200008 tokens (prompt 200000 + output 8), "
        "over max_model_len=131072 by 68936 (2 requests in all)"
    )


def test_a_request_over_the_kv_cache_is_named_with_the_shortfall(results):
    r = results[2]
    assert r["status"] == "INFEASIBLE"
    reason = r["status_reason"]
    assert reason.startswith(
        "every request is rejected: request 0 needs 1726 KV pages of 16 tokens (27600 + 8 tokens)"
    )
    assert reason.endswith("a replica can give one request 1720: 6 pages too few")


def test_oom_names_the_memory(results):
    r = results[3]
    assert r["status"] == "OOM"
    assert r["status_reason"].startswith("plan does not fit: 141.1 GB of weights")
    assert "short by" in r["status_reason"]


def test_max_iters_says_how_many_requests_were_left():
    case = make_case(**SMALL, plan={"tp": 1}, workload=_static(64, osl=512, batch_size=4))
    (r,), _ = evaluate_cases([case], max_iters=3)
    assert r["status"] == "MAX_ITERS"
    assert r["status_reason"] == (
        "the iteration cap of 3 iterations was reached with 4 of 4 requests unfinished"
    )


def test_a_search_with_no_ok_plan_exits_non_zero_naming_the_limit(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "apex_jax.cli",
            "search",
            "model=llama3_1_8b",
            "cluster=1x2",
            "workload=static_batch",
            "workload.isl=200000",
            "plan_space=parallel_only",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("apex-jax search: no plan is OK (")
    assert "INFEASIBLE e.g." in last and "over max_model_len=131072" in last
    assert "rank  n  plan" in proc.stdout
