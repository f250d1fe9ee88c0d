"""Plan-space pruning: dominated plans are skipped without changing the best plan, and lanes
with identical inputs (identical DP replicas, symmetric plans) are simulated once."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from apex_jax.deployment import Case, make_case, make_deployment
from apex_jax.evaluate import case_coeffs, case_energy, evaluate_cases
from apex_jax.hardware import default_hardware_params
from apex_jax.memory import memory_plan
from apex_jax.objectives import rank
from apex_jax.plan_space import load_plan_space
from apex_jax.plans import plan_row
from apex_jax.prune import (
    dominated_plans,
    objective_lower_bound,
    prunes_for,
    solo_lower_bounds,
)
from apex_jax.search import PRUNED, run_search
from apex_jax.workload import Workload, workload_from_dict

LLAMA_8B = "meta-llama/Llama-3.1-8B"
POISSON = {
    "kind": "poisson",
    "num_requests": 96,
    "rate_per_s": 6.0,
    "prompt_tokens": {"dist": "uniform", "low": 32, "high": 900},
    "output_tokens": {"dist": "uniform", "low": 4, "high": 160},
    "seed": 11,
}


def test_pruning_never_changes_the_best_plan(caplog):
    dep = make_deployment(LLAMA_8B, "H100-SXM-80GB", 4, gpus_per_node=4)
    space = load_plan_space("default", dep.engine.plan_knobs())
    workload = workload_from_dict(POISSON)
    with caplog.at_level(logging.INFO, logger="apex_jax.search"):
        pruned = run_search(dep, workload, space, prune=True)
    full = run_search(dep, workload, space, prune=False)
    num_dominated = pruned["pruned"]["dominated"]
    assert num_dominated > 0 and full["pruned"]["dominated"] == 0
    num_bounded = pruned["pruned"]["bounded"]
    assert num_bounded > 0 and full["pruned"]["bounded"] == 0
    reasons = {r["plan"]: r["status_reason"] for r in pruned["ranked"] if r["status"] == PRUNED}
    assert len(reasons) == num_dominated + num_bounded
    assert len(pruned["ranked"]) == len(full["ranked"])
    dominated = {plan for plan, why in reasons.items() if why.startswith("dominated by ")}
    assert len(dominated) == num_dominated
    assert all(why.startswith("cannot beat ") for p, why in reasons.items() if p not in dominated)
    assert pruned["ranked"][0]["plan"] == full["ranked"][0]["plan"]
    assert pruned["ranked"][0]["e2e_mean_s"] == full["ranked"][0]["e2e_mean_s"]
    # Every simulated plan has the same metrics either way; on every timing objective the
    # best of the plans domination leaves is the best of all (bounds are per objective).
    by_plan = {r["plan"]: r for r in full["ranked"]}
    for r in pruned["ranked"]:
        if r["status"] == "OK":
            assert r["e2e_mean_s"] == by_plan[r["plan"]]["e2e_mean_s"]
    for objective in (
        "ttft_mean_s",
        "ttft_p99_s",
        "tpot_p99_s",
        "e2e_p99_s",
        "throughput_out_tok_s",
    ):
        ranked = rank(list(full["ranked"]), objective)
        kept = [r for r in ranked if r["plan"] not in dominated]
        assert kept[0][objective] == ranked[0][objective], objective
    assert any(
        f"{num_dominated} dominated on memory" in m and f"{num_bounded} bounded by" in m
        for m in caplog.messages
    )


def test_solo_bounds_are_below_every_simulated_request():
    # Queueing, shared iterations, chunked prompts and pipelines only add to a request's
    # time alone on the engine.
    workload = {**POISSON, "rate_per_s": 40.0}
    plans = [
        {"tp": 4},
        {"dp": 2, "tp": 2},
        {"tp": 2, "pp": 2},
        {"tp": 4, "attn_tp": 2},
        {"tp": 4, "chunked_prefill": 1, "max_num_batched_tokens": 256},
        {"dp": 4, "tp": 1, "max_num_seqs": 8},
    ]
    # Host work per sequence (vLLM 0.6's) grows with the batch, which a request alone never
    # sees: the bounds hold with it, and their tightness is checked on the device's costs.
    engines = [{"version": "0.6.0"}, {"version": "0.6.0", "host_s_per_seq": 0.0}]
    cases = [
        make_case(LLAMA_8B, "H100-SXM-80GB", 4, plan, workload, engine)
        for engine in engines
        for plan in plans
    ]
    results, _ = evaluate_cases(cases, per_request=True)
    w = cases[0].workload
    e2e_bound, tpot_bound = solo_lower_bounds(
        case_coeffs(cases, default_hardware_params()), w.prompt_tokens, w.output_tokens
    )
    for case, r, e2e_lb, tpot_lb in zip(cases, results, e2e_bound, tpot_bound):
        req = r["requests"]
        e2e = req["finish_s"] - req["arrival_s"]
        served = np.isfinite(e2e)
        assert served.sum() > 80 and r["num_preemptions"] >= 0
        assert np.all(e2e_lb[served] <= e2e[served] * (1 + 1e-12))
        multi = served & (w.output_tokens > 1)
        tpot = (req["finish_s"] - req["first_token_s"]) / (w.output_tokens - 1.0)
        assert np.all(tpot_lb[multi] <= tpot[multi] * (1 + 1e-12))
        if case.deployment.engine.host_s_per_seq == 0.0:
            # Tight enough to prune: the mean bound is within a factor of 2 of the mean E2E.
            assert e2e_lb[served].mean() > 0.5 * e2e[served].mean()
    means = objective_lower_bound("e2e_mean_s", e2e_bound, tpot_bound)
    assert means == pytest.approx(e2e_bound.mean(axis=1))


def test_energy_objectives_do_not_prune():
    # A faster engine may run more iterations, each streaming the weights: energy per token
    # can rise, so the energy-optimal plan could be dominated.
    assert not prunes_for("energy_per_output_token_j") and not prunes_for("mbu")
    assert prunes_for("e2e_p99_s") and prunes_for("goodput_req_s") and prunes_for("num_gpus")


def test_a_plan_dominates_one_that_is_slower_and_smaller():
    dep = make_deployment(LLAMA_8B, "H100-SXM-80GB", 2, gpus_per_node=2)
    rows = np.stack(
        [
            plan_row({"tp": 2, "weight_dtype": "fp8", "kv_dtype": "fp8"}),
            plan_row({"tp": 2, "weight_dtype": "bf16", "kv_dtype": "fp8"}),
            plan_row({"dp": 2, "tp": 1, "weight_dtype": "bf16"}),  # other lanes: not compared
            plan_row({"tp": 2, "weight_dtype": "bf16", "gpu_clock_mhz": 810}),  # less power
        ]
    )
    cases = [Case(dep, row, workload_from_dict(POISSON)) for row in rows]
    mem = memory_plan(rows, dep.model, dep.gpu)
    dominator = dominated_plans(
        rows,
        case_coeffs(cases, default_hardware_params()),
        case_energy(cases),
        mem.num_kv_blocks,
        mem.is_oom,
    )
    assert dominator.tolist() == [-1, 0, -1, -1]
    # A plan that does not fit is neither dominated nor dominating.
    oom = np.array([True, False, False, False])
    assert (
        dominated_plans(
            rows,
            case_coeffs(cases, default_hardware_params()),
            case_energy(cases),
            mem.num_kv_blocks,
            oom,
        )
        < 0
    ).all()


def test_identical_replicas_are_simulated_once_and_equal_one_replica():
    # A static batch of equal requests splits evenly: the four replicas' lanes are identical.
    batch = {"kind": "static_batch", "batch_size": 8, "isl": 256, "osl": 32}
    four = make_case(LLAMA_8B, "H100-SXM-80GB", 4, {"dp": 4, "tp": 1}, batch)
    one = make_case(LLAMA_8B, "H100-SXM-80GB", 1, {"dp": 1, "tp": 1}, {**batch, "batch_size": 2})
    (r4, r1), stats = evaluate_cases([four, one], per_replica=True)
    assert stats.num_identical_replicas == 3
    assert stats.num_symmetric_plans == 1  # the one-replica plan is one of those lanes
    for key in ("ttft_mean_s", "tpot_mean_s", "e2e_mean_s", "num_iters_max_replica"):
        assert r4[key] == r1[key]
    assert len({r["e2e_mean_s"] for r in r4["replicas"]}) == 1


def test_poisson_replicas_are_not_collapsed():
    case = make_case(LLAMA_8B, "H100-SXM-80GB", 4, {"dp": 4, "tp": 1}, POISSON)
    (r,), stats = evaluate_cases([case], per_replica=True)
    assert stats.num_identical_replicas == 0 and stats.num_symmetric_plans == 0
    assert len({x["e2e_mean_s"] for x in r["replicas"]}) == 4


def test_pipeline_replicas_collapse_only_whole():
    # DP2 x PP2: request i goes to lane i mod 4, replica (i mod 4) mod 2, virtual engine
    # (i mod 4) // 2. Both replicas' engine 0 serve one equal short request; their engines 1
    # serve a short and a long prompt, which shares the first round with engine 0. Lane by
    # lane, the engines 0 look identical; as replicas they are not.
    workload = Workload(
        name="two_pairs",
        arrival_s=np.zeros(4),
        prompt_tokens=np.array([100, 100, 100, 3000], np.int32),
        output_tokens=np.array([8, 8, 8, 8], np.int32),
    )
    case = make_case(LLAMA_8B, "H100-SXM-80GB", 4, {"dp": 2, "tp": 1, "pp": 2}, workload)
    (r,), stats = evaluate_cases([case], per_request=True)
    assert r["status"] == "OK"
    assert stats.num_identical_replicas == 0
    finish = r["requests"]["finish_s"]
    assert finish[1] > finish[0]  # replica 1's rounds wait for the long prefill
    # A static batch of equal requests: the two replicas are identical whole.
    batch = {"kind": "static_batch", "batch_size": 8, "isl": 256, "osl": 32}
    same = make_case(LLAMA_8B, "H100-SXM-80GB", 4, {"dp": 2, "tp": 1, "pp": 2}, batch)
    (r2,), stats = evaluate_cases([same], per_replica=True)
    assert stats.num_identical_replicas == 2  # both engines of the second replica
    assert len({x["e2e_mean_s"] for x in r2["replicas"]}) == 1
