"""The Python API contract: ``simulate`` and ``simulate_many``, their keys, their errors, and
invariants of the per-request times behind the metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

import apex_jax
import apex_jax.evaluate
from apex_jax.api import PlanDoesNotFitError
from apex_jax.metrics import METRIC_KEYS
from apex_jax.plans import COLUMNS
from apex_jax.workload import load_trace

# The README's example, on the first 50 requests of the bundled trace to keep it fast.
README_KWARGS = {
    "model": "meta-llama/Llama-3.1-70B",
    "hardware": "H100-SXM-80GB",
    "num_gpus": 8,
    "plan": {"dp": 2, "tp": 4, "pp": 1, "weight_dtype": "bf16", "kv_dtype": "bf16"},
    "engine": {"name": "vllm", "version": "0.6.0"},
}

STATIC_8B = {
    "model": "meta-llama/Llama-3.1-8B",
    "hardware": "h100",
    "num_gpus": 1,
    "plan": {"dp": 1, "tp": 1},
    "workload": {"kind": "static_batch", "batch_size": 8, "isl": 512, "osl": 128},
}

POISSON_70B_TP8 = {
    "model": "meta-llama/Llama-3.1-70B",
    "hardware": "H100-SXM-80GB",
    "num_gpus": 8,
    "plan": {"dp": 1, "tp": 8},
    "workload": {
        "kind": "poisson",
        "num_requests": 30,
        "rate_per_s": 1.0,
        "prompt_tokens": {"dist": "uniform", "low": 32, "high": 1024},
        "output_tokens": {"dist": "uniform", "low": 1, "high": 256},
        "seed": 3,
    },
}

# Few KV pages and a burst of long requests: the engine must preempt.
PREEMPTING_8B = {
    "model": "meta-llama/Llama-3.1-8B",
    "hardware": "H100-SXM-80GB",
    "num_gpus": 1,
    "plan": {"dp": 1, "tp": 1},
    "workload": {
        "kind": "poisson",
        "num_requests": 30,
        "rate_per_s": 50.0,
        "prompt_tokens": {"dist": "uniform", "low": 256, "high": 2048},
        "output_tokens": {"dist": "uniform", "low": 64, "high": 512},
        "seed": 1,
    },
    "engine": {
        "name": "vllm",
        "max_num_batched_tokens": 4096,
        "max_model_len": 4096,
        "gpu_memory_utilization": 0.24,
    },
}

CLOSED_LOOP_70B = {
    "model": "meta-llama/Llama-3.1-70B",
    "hardware": "H100-SXM-80GB",
    "num_gpus": 8,
    "plan": {"dp": 2, "tp": 4},
    "workload": {
        "kind": "closed_loop",
        "concurrency": 6,
        "isl": 300,
        "osl": 40,
        "num_requests": 40,
    },
}

DOCUMENTED_KEYS = {
    "status",
    *METRIC_KEYS,
    *(c for c in COLUMNS if c != "gpu_mem_util_permille"),
    "gpu_mem_util",
    "plan",
    "num_requests",
    "num_iters_max_replica",
    "num_preemptions",
    "weight_gb_per_gpu",
    "activation_gb_per_gpu",
    "kv_gb_per_gpu",
    "num_kv_blocks",
}


@pytest.fixture(scope="module")
def short_trace():
    return load_trace("lmsys_05.csv").head(50)


@pytest.fixture(scope="module")
def readme_result(short_trace):
    return apex_jax.simulate(**README_KWARGS, workload=short_trace)


def test_readme_example_returns_every_documented_key(readme_result):
    r = readme_result
    assert DOCUMENTED_KEYS <= set(r), sorted(DOCUMENTED_KEYS - set(r))
    assert r["status"] == "OK"
    assert r["num_requests"] == 50
    for key in METRIC_KEYS:
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, key
    assert (r["dp"], r["tp"], r["pp"]) == (2, 4, 1)
    assert (r["weight_dtype"], r["kv_dtype"]) == ("bf16", "bf16")


def test_readme_metrics_are_consistent(readme_result):
    r = readme_result
    assert r["ttft_mean_s"] <= r["e2e_mean_s"]
    for stat in ("ttft", "tpot"):
        p50, p90, p99 = (r[f"{stat}_p{q}_s"] for q in (50, 90, 99))
        assert p50 <= p90 <= p99
    assert r["e2e_sum_s"] == pytest.approx(r["e2e_mean_s"] * r["num_requests"], rel=1e-12)
    assert r["throughput_req_s"] == pytest.approx(r["num_requests"] / r["makespan_s"], rel=1e-12)
    assert r["e2e_mean_s"] <= r["makespan_s"]


def _assert_same_result(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        if isinstance(value, float):
            np.testing.assert_allclose(b[key], value, rtol=1e-9, err_msg=key)
        else:
            assert b[key] == value, key


def test_simulate_many_equals_separate_simulate_calls(short_trace, readme_result):
    # Different models, plans and workloads in one batch must not leak into each other.
    static_24 = STATIC_8B | {"workload": STATIC_8B["workload"] | {"batch_size": 24}}
    cases = [dict(README_KWARGS, workload=short_trace), static_24, POISSON_70B_TP8]
    together = apex_jax.simulate_many(cases)
    assert len(together) == 3
    separate = [readme_result] + [apex_jax.simulate(**case) for case in cases[1:]]
    for alone, batched in zip(separate, together):
        assert alone["status"] == "OK"
        _assert_same_result(alone, batched)


def test_simulate_many_reports_oom_instead_of_raising():
    cases = [STATIC_8B, dict(STATIC_8B, model="meta-llama/Llama-3.1-70B")]
    fits, too_big = apex_jax.simulate_many(cases)
    assert fits["status"] == "OK" and fits["status_reason"] == ""
    assert too_big["status"] == "OOM"
    assert "does not fit" in too_big["status_reason"]
    assert all(math.isnan(too_big[k]) for k in METRIC_KEYS)


# --------------------------------------------------------------------------------------------
# Bad inputs: each a ValueError whose message names the input.
# --------------------------------------------------------------------------------------------


def test_malformed_trace_line_names_the_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(
        "request_id,arrival_s,prompt_tokens,output_tokens\n"
        "a,0.0,100,10\n"
        "b,0.5,ten,10\n"
        "c,1.0,100,10\n"
    )
    with pytest.raises(ValueError) as info:
        apex_jax.simulate(**STATIC_8B | {"workload": {"kind": "trace", "path": str(path)}})
    message = str(info.value)
    assert "line 3" in message and "prompt_tokens" in message and "'ten'" in message


def test_unknown_gpu_suggests_the_right_name():
    with pytest.raises(ValueError) as info:
        apex_jax.simulate(**STATIC_8B | {"hardware": "H1000"})
    assert "H1000" in str(info.value) and "H100-SXM-80GB" in str(info.value)


def test_plan_that_cannot_fit_raises_plan_does_not_fit():
    with pytest.raises(PlanDoesNotFitError) as info:
        apex_jax.simulate(**POISSON_70B_TP8 | {"plan": {"dp": 8, "tp": 1, "weight_dtype": "bf16"}})
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "does not fit" in message and "H100-SXM-80GB" in message and "tp" in message


@pytest.mark.parametrize("rate", [-1, 0, float("nan")])
def test_non_positive_rate_names_the_rate(rate):
    workload = dict(POISSON_70B_TP8["workload"], rate_per_s=rate)
    with pytest.raises(ValueError, match="rate_per_s"):
        apex_jax.simulate(**POISSON_70B_TP8 | {"workload": workload})


def test_plan_needing_more_gpus_than_the_cluster_names_num_gpus():
    with pytest.raises(ValueError) as info:
        apex_jax.simulate(**POISSON_70B_TP8 | {"plan": {"dp": 2, "tp": 8}})
    assert "num_gpus" in str(info.value) and "16" in str(info.value)


@pytest.mark.parametrize(
    "override, named",
    [
        ({"model": "meta-llama/Llama-9-1B"}, "Llama-9-1B"),
        ({"plan": {"dq": 2}}, "dq"),
        ({"plan": {"tp": 3}}, "tp=3"),
        ({"workload": {"kind": "zipf"}}, "zipf"),
        ({"workload": {"kind": "trace", "path": "no_such_trace.csv"}}, "no_such_trace.csv"),
        ({"engine": {"name": "vllm", "max_num_seq": 8}}, "max_num_seq"),
        ({"engine": {"name": "vllm", "iteration_overhead_s": -1e-3}}, "iteration_overhead_s"),
        ({"engine": {"name": "vllm", "frontend_delay_s": -1e-3}}, "frontend_delay_s"),
        ({"engine": {"name": "vllm", "sampler_sort_s_per_logit": -1e-10}}, "sampler_sort"),
        ({"engine": {"name": "vllm", "host_s_per_seq": -1e-3}}, "host_s_per_seq"),
        ({"engine": {"name": "vllm", "eager_s_per_layer": 1.0}}, "eager_s_per_layer"),
        ({"engine": {"name": "vllm", "max_graph_batch": -1}}, "max_graph_batch"),
        ({"num_gpus": 0}, "num_gpus"),
    ],
)
def test_other_bad_inputs_name_the_input(override, named):
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        apex_jax.simulate(**STATIC_8B | override)
    assert named in str(info.value)


# --------------------------------------------------------------------------------------------
# Invariants of the per-request times that the metrics summarise.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def per_request(short_trace):
    """Per-request arrays of three runs, captured where the API summarises them."""
    captured = []
    original = apex_jax.evaluate.summarize_requests

    def spy(arrival, first, finish, output_tokens, status, *rest):
        captured.append(
            {
                "arrival": np.array(arrival, np.float64),
                "first": np.array(first),
                "finish": np.array(finish),
                "output_tokens": np.array(output_tokens),
            }
        )
        return original(arrival, first, finish, output_tokens, status, *rest)

    patch = pytest.MonkeyPatch()
    patch.setattr(apex_jax.evaluate, "summarize_requests", spy)
    try:
        cases = [dict(README_KWARGS, workload=short_trace), PREEMPTING_8B, CLOSED_LOOP_70B]
        results = apex_jax.simulate_many(cases)
    finally:
        patch.undo()
    assert len(captured) == len(cases)
    return list(zip(results, captured))


def test_runs_cover_preemption_and_closed_loops(per_request):
    statuses = [r["status"] for r, _ in per_request]
    assert statuses == ["OK", "OK", "OK"]
    assert per_request[1][0]["num_preemptions"] > 0, "the preemption case no longer preempts"


def test_requests_are_conserved(per_request):
    for result, times in per_request:
        n = result["num_requests"]
        for name in ("arrival", "first", "finish"):
            assert times[name].shape == (n,), name
            assert times[name].dtype == np.float64, name
            assert np.isfinite(times[name]).all(), f"{name}: some request never got there"


def test_time_order_of_every_request(per_request):
    for _, t in per_request:
        assert (t["first"] >= t["arrival"]).all()
        assert (t["finish"] >= t["first"]).all()
        ttft = t["first"] - t["arrival"]
        e2e = t["finish"] - t["arrival"]
        assert (ttft <= e2e).all()
        # One decode iteration per output token after the first: more tokens take time.
        multi = t["output_tokens"] > 1
        assert (t["finish"][multi] > t["first"][multi]).all()


def test_closed_loop_sends_a_request_only_after_one_finishes(per_request):
    result, t = per_request[2]
    concurrency, dp = 6, result["dp"]
    finishes = np.sort(t["finish"])
    for replica in range(dp):
        ids = np.arange(result["num_requests"])[replica::dp]
        gate = concurrency // dp + (1 if replica < concurrency % dp else 0)
        arrivals = t["arrival"][ids]
        assert (arrivals[:gate] == 0).all()
        assert (arrivals[gate:] > 0).all()
        # From the third round on, every request is sent when one finishes.
        sent = arrivals[2 * gate :]
        gaps = np.min(np.abs(sent[:, None] - finishes[None, :]), axis=1)
        np.testing.assert_allclose(gaps, 0.0, atol=1e-12)
