"""vLLM's start-up checks, its custom all-reduce, and validation with each run's launch
arguments; expected figures worked out by hand or read straight from the measured tables."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from apex_jax.api import plan_space
from apex_jax.cost import tables as ct
from apex_jax.cost.iteration import iteration_time_s
from apex_jax.deployment import make_case
from apex_jax.evaluate import case_coeffs, evaluate_cases
from apex_jax.hardware import default_hardware_params
from apex_jax.plans import COL, describe_plan, plan_from_description, plan_row
from apex_jax.validate import format_validation, load_measurements, run_validation

SMALL = {"model": "llama3.1-8b", "hardware": "h100", "num_gpus": 1, "plan": {"tp": 1}}
WORKLOAD = {"kind": "static_batch", "batch_size": 2, "isl": 64, "osl": 8}

# Llama-3.1-8B on one H100 (85,520,809,984 bytes) at gpu_memory_utilization 0.25, chunked
# prefill with vLLM 0.6's 512-token budget, by hand:
#   weights   2 B x (32 x (2 x 4096^2 + 2 x 4096 x 1024 + 3 x 4096 x 14336 + 2 x 4096)
#             + 2 x 128256 x 4096 + 4096) = 16,060,522,496 B
#   profiling 2 B x 512 x (2 x 4096 + (32 + 2 x 8) x 128 + 2 x 14336)
#             + 4 B x 256 x 128256 (logits) = 175,374,336 B
#   reserve   1.5e9 B
#   page      16 tokens x 32 layers x 2 x 8 KV heads x 128 x 2 B = 2,097,152 B
#   pages     floor((0.25 x 85,520,809,984 - the three above) / page) = 1737
KV_TOKENS = 1737 * 16  # 27,792


def _refusal(results, i):
    return results[i]["status"], results[i]["status_reason"]


@pytest.fixture(scope="module")
def startup_results():
    util = {"gpu_memory_utilization": 0.25, "chunked_prefill": True}
    engines = [
        util,  # Llama-3.1's own 131,072 tokens
        dict(util, max_model_len=KV_TOKENS),  # exactly what the cache holds
        dict(util, max_model_len=KV_TOKENS + 1),
        {"chunked_prefill": False, "max_num_batched_tokens": 4096},
        {"chunked_prefill": False, "max_num_batched_tokens": 4096, "max_model_len": 4096},
    ]
    cases = [make_case(**SMALL, workload=WORKLOAD, engine=e) for e in engines]
    return evaluate_cases(cases)[0]


def test_a_kv_cache_shorter_than_the_model_length_is_refused_in_vllms_words(startup_results):
    kv_reason = (
        "vLLM refuses to start: \"The model's max seq len (131072) is larger than the maximum "
        "number of tokens that can be stored in KV cache (27792). Try increasing "
        '`gpu_memory_utilization` or decreasing `max_model_len` when initializing the engine." '
        "(or free memory for the KV cache: more tp or pp, lower-precision weights)"
    )
    assert _refusal(startup_results, 0) == ("INFEASIBLE", kv_reason)
    # Decided before simulation: nothing ran.
    assert startup_results[0]["num_iters_total"] == 0
    assert startup_results[0]["num_kv_blocks"] == 1737


def test_the_kv_check_is_at_the_token(startup_results):
    assert _refusal(startup_results, 1) == ("OK", "")
    status, reason = _refusal(startup_results, 2)
    assert status == "INFEASIBLE" and "max seq len (27793)" in reason and "(27792)" in reason


def test_a_budget_below_the_model_length_without_chunking_is_refused(startup_results):
    budget_reason = (
        'vLLM refuses to start: "max_num_batched_tokens (4096) is smaller than max_model_len '
        "(131072). This effectively limits the maximum sequence length to "
        "max_num_batched_tokens and makes vLLM reject longer sequences. Please increase "
        'max_num_batched_tokens or decrease max_model_len." (or turn chunked prefill on)'
    )
    assert _refusal(startup_results, 3) == ("INFEASIBLE", budget_reason)
    assert _refusal(startup_results, 4) == ("OK", "")


def test_plan_space_summary_counts_the_refused_plans():
    space = {"dp": [1], "tp": [1, 2, 4], "pp": [1], "gpu_mem_util": [0.9], "use_all_gpus": False}
    s = plan_space(model="meta-llama/Llama-3.1-70B", hardware="h100", num_gpus=8, space=space)
    summary = s.summary()
    # TP1: weights do not fit; TP2: 70.6 GB of weights leave ~29K KV tokens < 131,072; TP4 runs.
    assert summary["refused"]["KV cache holds fewer tokens than max_model_len"] == 1
    assert summary["fit"] == 1
    assert "vLLM refuses to start (INFEASIBLE)" in s.format_summary()


# ------------------------------------------------------------------------------------------
# Custom all-reduce
# ------------------------------------------------------------------------------------------


def _iteration_s(tp: int, custom: bool, tokens: float) -> float:
    case = make_case(
        "meta-llama/Llama-3.1-70B", "h100", 8, {"tp": tp}, WORKLOAD, {"custom_all_reduce": custom}
    )
    coeffs = jax.tree_util.tree_map(lambda x: x[0], case_coeffs([case], default_hardware_params()))
    return float(iteration_time_s(coeffs, tokens, tokens, 0.0, 0.0, 0.0))


def _custom_table_s(group: int, message_bytes: float) -> float:
    t = ct.load_custom_allreduce("H100-SXM-80GB")
    (row,) = np.flatnonzero((t["num_gpus"] == group) & (t["bytes"] == message_bytes))
    return float(t["time_s"][row])


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_nccl_all_reduce_costs_what_the_tables_say_more(tp):
    hidden_bytes = 8192 * 2  # one token of Llama-3-70B's residual stream in bf16
    nccl = ct.collective_grids("H100-SXM-80GB")[("all_reduce", tp)]
    calls = 2 * 80  # two all-reduces per layer
    for tokens in (1.0, 128.0):
        message = tokens * hidden_bytes
        extra_s = calls * (
            float(ct.interp_grid(nccl, np.asarray([message]), xp=np)[0])
            - _custom_table_s(tp, message)
        )
        assert extra_s > 0
        off, on = _iteration_s(tp, False, tokens), _iteration_s(tp, True, tokens)
        np.testing.assert_allclose(off - on, extra_s, rtol=1e-9)
    # 2,048 tokens make 32 MiB messages, over the custom kernel's 8 MiB: NCCL either way.
    np.testing.assert_allclose(_iteration_s(tp, False, 2048.0), _iteration_s(tp, True, 2048.0))


def test_custom_all_reduce_changes_nothing_without_tensor_parallelism():
    w = {"kind": "static_batch", "batch_size": 2, "isl": 64, "osl": 8}
    cases = [
        make_case(**SMALL, workload=w, engine={"custom_all_reduce": flag}) for flag in (True, False)
    ]
    coeffs = case_coeffs(cases, default_hardware_params())
    for leaf in jax.tree_util.tree_leaves(coeffs):
        np.testing.assert_array_equal(np.asarray(leaf)[0], np.asarray(leaf)[1])


# ------------------------------------------------------------------------------------------
# Validation with the recorded launch arguments
# ------------------------------------------------------------------------------------------


def test_validate_replays_each_runs_launch_arguments():
    (row,) = [
        r
        for r in load_measurements()
        if r["trace"] == "llama/lmsys_05" and r["dp"] == "1" and r["tp"] == "2"
    ]
    assert (row["max_model_len"], row["custom_all_reduce"]) == ("24272", "0")
    variants = [
        row,
        dict(row, custom_all_reduce="1"),
        # Over 32K tokens vLLM 0.6 turns chunked prefill on, with a 512-token budget.
        dict(row, max_model_len="40000"),
        # 0.90 of the GPU leaves a TP2 KV cache shorter than 24,272 tokens.
        dict(row, gpu_memory_utilization="0.9"),
        # Without --max-model-len, Llama-3.1's 131,072 tokens do not fit a TP2 KV cache.
        dict(row, max_model_len=""),
    ]
    report = run_validation(variants)
    recorded, custom, chunked, less_memory, default_length = report["rows"]
    assert recorded["status"] == custom["status"] == chunked["status"] == "OK"
    # vLLM's kernel is faster than NCCL's at decode sizes.
    assert custom["tpot_mean_s_predicted"] < recorded["tpot_mean_s_predicted"]
    # Prompts in 512-token chunks take more iterations to their first token.
    assert chunked["ttft_mean_s_predicted"] > recorded["ttft_mean_s_predicted"]
    for refused, length in ((less_memory, 24272), (default_length, 131072)):
        assert refused["status"] == "INFEASIBLE"
        assert f"max seq len ({length})" in refused["status_reason"]
        assert math.isnan(refused["tpot_mean_s_predicted"])
    assert "INFEASIBLE: vLLM refuses to start" in format_validation(report)
    assert all(math.isfinite(v) for v in report["mape_pct"].values())


def test_a_plan_without_the_custom_all_reduce_says_so_and_reads_back():
    row = plan_row({"tp": 4, "disable_custom_all_reduce": 1})
    text = describe_plan(row)
    assert text.endswith(" · NCCL all-reduce")
    np.testing.assert_array_equal(plan_from_description(text), row)
    assert "all-reduce" not in describe_plan(plan_row({"tp": 4}))
    case = make_case(**SMALL, workload=WORKLOAD, engine={"custom_all_reduce": False})
    assert case.plan[COL["disable_custom_all_reduce"]] == 1
    assert "NCCL all-reduce" in describe_plan(case.plan)
