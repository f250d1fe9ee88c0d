"""Objectives, checked on small cases whose answer is known by construction.

Most cases run the real engine with a fixed-step cost model: every engine iteration of a plan
takes ``STEP_S`` (10 ms with bf16 weights, 5 ms with fp8), and ``max_num_seqs=1`` makes each
replica a first-come-first-served single server. A request with ``o`` output tokens then
holds its replica for ``o`` iterations, and every latency follows by hand. The goodput
bisection is also compared with a brute-force scan of rates under the real cost model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from apex_jax import search
from apex_jax.cost.iteration import CostCoeffs
from apex_jax.deployment import Case, make_deployment
from apex_jax.dtypes import dtype_name
from apex_jax.evaluate import evaluate_cases
from apex_jax.metrics import SLO
from apex_jax.objectives import (
    FEWEST_GPUS,
    GOODPUT,
    OBJECTIVES,
    GoodputSettings,
    arrival_rate_req_s,
    bisect_rate_scale,
    cost_per_mtok_usd,
    get_objective,
    heuristic_plan,
    objective_ratio,
    pareto_mask,
    rank,
    scale_arrivals,
)
from apex_jax.plans import COL, PlanSpace, plan_row
from apex_jax.workload import Workload, poisson

MODEL = "meta-llama/Llama-3.1-8B"
GPU = "H100-SXM-80GB"
STEP_S = {"bf16": 0.010, "fp8": 0.005}
PRICE_USD_PER_GPU_HOUR = 3.0


@pytest.fixture
def fixed_step_cost(monkeypatch):
    """Replace the cost model of searches: a plan's every iteration takes STEP_S."""

    def case_coeffs(cases, hw):
        steps = [STEP_S[dtype_name(int(c.plan[COL["weight_dtype"]]))] for c in cases]
        return CostCoeffs.zeros((len(cases),))._replace(fixed_s=np.array(steps))

    monkeypatch.setattr(search, "case_coeffs", case_coeffs)


def _space(dp=(1, 2, 4), weight_dtype=("bf16", "fp8")) -> PlanSpace:
    """DP x TP1 single-server replicas on up to 4 GPUs."""
    return PlanSpace(
        dp=list(dp),
        tp=[1],
        pp=[1],
        weight_dtype=weight_dtype,
        max_num_seqs=(1,),
        max_num_batched_tokens=(2048,),
        chunked_prefill=(1,),
        use_all_gpus=False,
    )


def _workload(arrival_s, output_tokens) -> Workload:
    n = len(arrival_s)
    return Workload("constructed", np.asarray(arrival_s, float), np.full(n, 16), output_tokens)


def _search(workload, objective, space=None, **kwargs):
    # Requests reach the engine as they are sent, so that queues are the constructed ones.
    engine = {"name": "vllm", "frontend_delay_s": 0.0}
    deployment = make_deployment(MODEL, GPU, 4, engine, gpus_per_node=4)
    return search.run_search(
        deployment,
        workload,
        space or _space(),
        objective=objective,
        gpu_price_usd_per_hour=PRICE_USD_PER_GPU_HOUR,
        **kwargs,
    )


def _fifo_times(arrival_s, output_tokens, dp: int, step_s: float):
    """First-token and finish times of single-server replicas, request i on replica i % dp."""
    first = np.zeros(len(arrival_s))
    finish = np.zeros(len(arrival_s))
    free_at = np.zeros(dp)
    for i, (arrival, out) in enumerate(zip(arrival_s, output_tokens)):
        start = max(arrival, free_at[i % dp])
        first[i] = start + step_s
        finish[i] = start + out * step_s
        free_at[i % dp] = finish[i]
    return first, finish


def _key(r) -> tuple[int, str]:
    return int(r["dp"]), str(r["weight_dtype"])


# --------------------------------------------------------------------------------------------
# Latency and throughput: a burst of 8 requests at t = 0, 3 output tokens each
# --------------------------------------------------------------------------------------------

BURST = _workload(np.zeros(8), np.full(8, 3))


def _expected_burst(dp: int, dtype: str) -> dict[str, float]:
    first, finish = _fifo_times(BURST.arrival_s, BURST.output_tokens, dp, STEP_S[dtype])
    ttft, e2e = first - BURST.arrival_s, finish - BURST.arrival_s
    tpot = (finish - first) / (BURST.output_tokens - 1)
    return {
        "ttft_mean_s": ttft.mean(),
        "ttft_p99_s": np.percentile(ttft, 99),
        "tpot_mean_s": tpot.mean(),
        "tpot_p99_s": np.percentile(tpot, 99),
        "e2e_mean_s": e2e.mean(),
        "e2e_p99_s": np.percentile(e2e, 99),
        "throughput_out_tok_s": BURST.output_tokens.sum() / finish.max(),
    }


@pytest.mark.parametrize(
    "objective",
    [
        "ttft_mean_s",
        "ttft_p99_s",
        "tpot_mean_s",
        "tpot_p99_s",
        "e2e_mean_s",
        "e2e_p99_s",
        "throughput_out_tok_s",
    ],
)
def test_latency_and_throughput_objectives_rank_as_constructed(fixed_step_cost, objective):
    result = _search(BURST, objective)
    ranked = result["ranked"]
    assert {_key(r) for r in ranked} == {(d, t) for d in (1, 2, 4) for t in STEP_S}
    expected = {_key(r): _expected_burst(*_key(r))[objective] for r in ranked}
    for r in ranked:
        assert r[objective] == pytest.approx(expected[_key(r)], rel=1e-9)
    sign = OBJECTIVES[objective].sign
    best = min(expected.values(), key=lambda v: sign * v)
    assert ranked[0][objective] == pytest.approx(best, rel=1e-9)
    values = [sign * r[objective] for r in ranked]
    assert values == sorted(values)
    # fp8 steps are twice as fast: it is always the best plan's dtype.
    assert ranked[0]["weight_dtype"] == "fp8"


# --------------------------------------------------------------------------------------------
# Energy and cost: one request, so extra replicas only idle
# --------------------------------------------------------------------------------------------

LONE = _workload([0.0], [5])


def test_energy_per_token_charges_idle_replicas(fixed_step_cost):
    ranked = _search(LONE, "energy_per_output_token_j")["ranked"]
    by_key = {_key(r): r for r in ranked}
    gpu = make_deployment(MODEL, GPU, 1).gpu
    for dtype, step_s in STEP_S.items():
        one = by_key[(1, dtype)]
        assert one["makespan_s"] == pytest.approx(5 * step_s, rel=1e-12)
        for dp in (2, 4):
            extra_j = by_key[(dp, dtype)]["energy_j"] - one["energy_j"]
            # The same work, plus dp - 1 idle GPUs for the whole makespan.
            assert extra_j == pytest.approx((dp - 1) * gpu.idle_w * one["makespan_s"], rel=1e-9)
    assert ranked[0]["dp"] == 1
    per_dtype = [r for r in ranked if r["weight_dtype"] == "bf16"]
    assert [r["dp"] for r in per_dtype] == [1, 2, 4]


def test_cost_per_million_tokens_is_gpu_hours_over_tokens(fixed_step_cost):
    ranked = _search(LONE, "cost_per_mtok_usd")["ranked"]
    for r in ranked:
        gpu_hours = r["dp"] * 5 * STEP_S[r["weight_dtype"]] / 3600.0
        assert r["cost_per_mtok_usd"] == pytest.approx(
            gpu_hours * PRICE_USD_PER_GPU_HOUR / 5 * 1e6, rel=1e-9
        )
    assert _key(ranked[0]) == (1, "fp8")


def test_cost_objective_needs_a_price():
    deployment = make_deployment(MODEL, GPU, 4, gpus_per_node=4)
    with pytest.raises(ValueError, match="price"):
        search.run_search(deployment, LONE, _space(), objective="cost_per_mtok_usd")


# --------------------------------------------------------------------------------------------
# Goodput and fewest GPUs: evenly spaced single-token requests
# --------------------------------------------------------------------------------------------

NUM_EVEN = 20
EVEN = _workload(np.arange(NUM_EVEN) * 1.0, np.ones(NUM_EVEN, int))  # 1 request/s
TTFT_SLO_S = 0.021


def _constructed_goodput(dp: int, step_s: float, attainment: float) -> float:
    """Highest rate at which ``attainment`` of the requests get their token within the SLO.

    At gap ``g`` every replica sees requests ``dp * g`` apart; its k-th request waits
    ``k (step - dp g)`` when the gap is shorter than a step, so it meets the SLO while
    ``step + k (step - dp g) <= TTFT_SLO_S``. Replicas are alike, so the target needs
    ``q = ceil(ceil(attainment N) / dp)`` passing requests on each.
    """
    q = math.ceil(math.ceil(attainment * NUM_EVEN - 1e-9) / dp)
    gap_s = (step_s - (TTFT_SLO_S - step_s) / (q - 1)) / dp
    return 1.0 / gap_s


def test_goodput_matches_the_constructed_queue(fixed_step_cost):
    slo = SLO(ttft_s=TTFT_SLO_S, tpot_s=1.0, attainment=0.9)
    settings = GoodputSettings(rel_tol=0.02, max_in_flight_fraction=1.0)
    result = _search(EVEN, GOODPUT, space=_space(dp=(1, 2)), slo=slo, goodput=settings)
    ranked = result["ranked"]
    assert result["goodput"]["trace_rate_req_s"] == pytest.approx(1.0)
    for r in ranked:
        want = _constructed_goodput(r["dp"], STEP_S[r["weight_dtype"]], 0.9)
        # The bisection returns the highest rate seen to pass, within rel_tol below the truth.
        assert want / 1.02 <= r[GOODPUT] <= want * (1 + 1e-9), _key(r)
        assert not r["goodput_is_lower_bound"]
    assert _key(ranked[0]) == (2, "fp8")
    assert result["goodput"]["num_rounds"] <= settings.max_rounds


def test_fewest_gpus_meeting_a_target_rate(fixed_step_cost):
    # At 150 requests/s (gaps of 6.7 ms) one bf16 server (10 ms per request) falls behind and
    # only 4 of 20 requests make 21 ms; two bf16 servers, or one fp8 server (5 ms), keep up.
    slo = SLO(ttft_s=TTFT_SLO_S, tpot_s=1.0, attainment=0.9)
    ranked = _search(EVEN, FEWEST_GPUS, slo=slo, target_rate_req_s=150.0)["ranked"]
    assert _key(ranked[0]) == (1, "fp8") and ranked[0]["num_gpus"] == 1
    meets = {_key(r): r["meets_slo_target"] for r in ranked}
    assert meets == {(1, "bf16"): False, **{k: True for k in meets if k != (1, "bf16")}}
    bf16 = [r for r in ranked if r["weight_dtype"] == "bf16"]
    assert [r["dp"] for r in bf16] == [2, 4, 1]
    assert ranked[-1]["slo_attainment"] == pytest.approx(0.2)


def test_goodput_and_fewest_gpus_need_an_slo():
    deployment = make_deployment(MODEL, GPU, 4, gpus_per_node=4)
    for objective in (GOODPUT, FEWEST_GPUS):
        with pytest.raises(ValueError, match="slo"):
            search.run_search(deployment, EVEN, _space(), objective=objective)


def test_goodput_needs_arrival_times():
    with pytest.raises(ValueError, match="arrival rate"):
        arrival_rate_req_s(BURST)


# --------------------------------------------------------------------------------------------
# The bisection against a brute-force scan, real cost model
# --------------------------------------------------------------------------------------------


def test_goodput_bisection_agrees_with_a_scan_of_rates():
    deployment = make_deployment(MODEL, GPU, 1)
    workload = poisson(
        64,
        1.0,
        {"dist": "uniform", "low": 256, "high": 1024},
        {"dist": "uniform", "low": 32, "high": 128},
        seed=1,
    )
    knobs = deployment.engine.plan_knobs()
    plans = [
        plan_row({"dp": 1, "tp": 1, "max_num_seqs": seqs, "max_num_batched_tokens": 2048,
                  "chunked_prefill": 1}, defaults=knobs)
        for seqs in (4, 32)
    ]
    slo = SLO(ttft_s=0.3, tpot_s=0.02, attainment=0.9)
    settings = GoodputSettings(rel_tol=0.03, max_in_flight_fraction=1.0)
    cases = [Case(deployment, row, workload) for row in plans]
    first, _ = evaluate_cases(cases, slo=slo)
    rate = arrival_rate_req_s(workload)

    def evaluate_at(idx, scale):
        scaled = [Case(deployment, plans[i], scale_arrivals(workload, s)) for i, s in zip(idx, scale)]
        out, _ = evaluate_cases(scaled, slo=slo)
        return (np.array([r["slo_attainment"] for r in out]),
                np.array([r["e2e_mean_s"] for r in out]))

    found = bisect_rate_scale(
        evaluate_at,
        np.array([r["slo_attainment"] for r in first]),
        np.array([r["e2e_mean_s"] for r in first]),
        slo.attainment,
        rate,
        workload.num_requests,
        settings,
    )
    # Brute force: every plan at every rate of a fine grid, in one batched evaluation.
    grid = np.geomspace(1.0, 128.0, 100)
    scan_cases = [Case(deployment, row, scale_arrivals(workload, s)) for row in plans for s in grid]
    scan, _ = evaluate_cases(scan_cases, slo=slo)
    attainment = np.array([r["slo_attainment"] for r in scan]).reshape(len(plans), grid.size)
    in_flight = grid * rate * np.array([r["e2e_mean_s"] for r in scan]).reshape(attainment.shape)
    passes = (attainment >= slo.attainment) & (in_flight <= workload.num_requests)
    step = grid[1] / grid[0]
    for p in range(len(plans)):
        highest = grid[passes[p]].max()
        # Monotone here: every grid rate below the highest passing one passes too.
        assert passes[p][grid <= highest].all()
        assert found.passing_scale[p] / step <= highest <= found.failing_scale[p]
        assert found.failing_scale[p] <= found.passing_scale[p] * (1 + settings.rel_tol)
    assert found.passing_scale[1] > 4 * found.passing_scale[0]


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def test_bisection_brackets_a_step_function_and_flags_limits():
    thresholds = np.array([0.0005, 0.3, 3.0, 700.0, 5000.0, np.nan])

    def evaluate_at(idx, scale):
        return np.where(scale <= thresholds[idx], 1.0, 0.0), np.full(idx.size, 1e-6)

    at_1 = np.where(np.isnan(thresholds), np.nan, (thresholds >= 1.0).astype(float))
    settings = GoodputSettings(rel_tol=0.01)
    found = bisect_rate_scale(evaluate_at, at_1, np.full(6, 1e-6), 0.9, 1.0, 100, settings)
    # Below min_scale: no passing rate at all; in range: bracketed within rel_tol.
    assert found.passing_scale[0] == 0.0
    for p in (1, 2, 3):
        assert found.passing_scale[p] <= thresholds[p] < found.failing_scale[p]
        assert found.failing_scale[p] <= found.passing_scale[p] * 1.01
    # Above max_scale: stops there, a lower bound.
    assert found.passing_scale[4] == settings.max_scale and found.is_lower_bound[4]
    assert not found.is_lower_bound[:4].any()
    assert math.isnan(found.passing_scale[5])


def test_bisection_stops_where_the_trace_is_too_short():
    # Latency grows with the rate; SLOs always met: only Little's law limits the rate.
    def e2e(scale):
        return 1.0 + 0.01 * scale

    def evaluate_at(idx, scale):
        return np.ones(idx.size), e2e(scale)

    settings = GoodputSettings()
    found = bisect_rate_scale(
        evaluate_at, np.ones(1), np.array([e2e(1.0)]), 0.9, 1.0, 1000, settings
    )
    limit = settings.max_in_flight_fraction * 1000
    limit_scale = (-1.0 + math.sqrt(1.0 + 4 * 0.01 * limit)) / (2 * 0.01)  # s * e2e(s) = limit
    assert found.is_lower_bound[0]
    assert found.passing_scale[0] <= limit_scale
    assert found.passing_scale[0] * e2e(found.passing_scale[0]) <= limit
    assert found.passing_scale[0] >= limit_scale / 1.03
    assert found.num_rounds <= 8


def test_rank_orders_ok_plans_by_direction_then_failures():
    rows = [
        {"status": "OOM", "x": math.nan},
        {"status": "OK", "throughput_out_tok_s": 5.0},
        {"status": "OK", "throughput_out_tok_s": 9.0},
        {"status": "OK", "throughput_out_tok_s": math.nan},
    ]
    ranked = rank(rows, "throughput_out_tok_s")
    assert [r.get("throughput_out_tok_s") for r in ranked[:2]] == [9.0, 5.0]
    assert [r["rank"] for r in ranked] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="unknown objective"):
        get_objective("goodput")


def test_a_plan_that_rejects_requests_ranks_after_one_that_serves_all():
    rows = [
        {"status": "OK", "e2e_mean_s": 1.0, "num_rejected": 3},
        {"status": "OK", "e2e_mean_s": 4.0, "num_rejected": 0},
        {"status": "OK", "e2e_mean_s": 2.0, "num_rejected": 1},
    ]
    ranked = rank(rows, "e2e_mean_s")
    assert [r["num_rejected"] for r in ranked] == [0, 1, 3]


def test_objective_ratio_is_above_one_when_best_is_better():
    fast, slow = {"status": "OK", "e2e_mean_s": 1.0}, {"status": "OK", "e2e_mean_s": 3.0}
    assert objective_ratio(fast, slow, "e2e_mean_s") == pytest.approx(3.0)
    hi, lo = {"status": "OK", GOODPUT: 6.0}, {"status": "OK", GOODPUT: 2.0}
    assert objective_ratio(hi, lo, GOODPUT) == pytest.approx(3.0)
    assert math.isnan(objective_ratio(fast, {"status": "OOM"}, "e2e_mean_s"))


def test_pareto_mask():
    latency = np.array([1.0, 2.0, 2.0, 3.0, 1.5, np.nan])
    throughput = np.array([1.0, 3.0, 2.0, 3.0, 0.5, 9.0])
    mask = pareto_mask(throughput, latency, -1, 1)
    assert mask.tolist() == [True, True, False, False, False, False]


def test_cost_formula():
    assert cost_per_mtok_usd(8, 3.0, 3600.0, 1e6) == pytest.approx(24.0)
    assert math.isnan(cost_per_mtok_usd(8, 3.0, math.nan, 1e6))


def test_heuristic_is_tp_in_node_pp_across_nodes():
    deployment = make_deployment("meta-llama/Llama-3.1-70B", GPU, 16, gpus_per_node=8)
    row = heuristic_plan(
        deployment.model, 16, 8, deployment.engine, deployment.gpu.max_clock_mhz
    )
    assert (row[COL["dp"]], row[COL["tp"]], row[COL["pp"]]) == (1, 8, 2)
    assert dtype_name(int(row[COL["weight_dtype"]])) == "bf16"
    assert row[COL["gpu_clock_mhz"]] == round(deployment.gpu.max_clock_mhz)
