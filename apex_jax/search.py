"""Plan search: enumerate, evaluate, rank, and write results atomically.

A search simulates every plan of the space, plus the heuristic plan APEX compares against
(:func:`apex_jax.objectives.heuristic_plan`), in one batched evaluation. With an SLO it
then finds each plan's goodput when asked (rate bisection, a few more batched evaluations of
the same plans) and ranks by the objective (:mod:`apex_jax.objectives`).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from apex_jax.cost.parallel import placement
from apex_jax.deployment import Case, Deployment
from apex_jax.evaluate import RunStats, case_coeffs, case_energy, evaluate_cases
from apex_jax.hardware import HardwareParams, default_hardware_params
from apex_jax.io import jsonable
from apex_jax.metrics import SLO, SLO_KEYS
from apex_jax.objectives import (
    FEWEST_GPUS,
    GOODPUT,
    GoodputSettings,
    arrival_rate_req_s,
    bisect_rate_scale,
    cost_per_mtok_usd,
    get_objective,
    heuristic_plan,
    objective_ratio,
    rank,
    scale_arrivals,
)
from apex_jax.plan_space import PlanSet, build_plan_set
from apex_jax.plans import COL, PlanSpace, check_plan, describe_plan, plan_to_dict
from apex_jax.prune import (
    BOUNDED_COLUMNS,
    dominated_plans,
    objective_lower_bound,
    prunes_for,
    solo_lower_bounds,
)
from apex_jax.workload import Workload

__all__ = [
    "PLAN_SEP",
    "PRUNED",
    "TABLE_WIDTH",
    "SearchResult",
    "check_objective",
    "factor_parts",
    "format_cell",
    "format_table",
    "mark_equivalent",
    "plan_room",
    "results_csv",
    "run_search",
    "summary_dict",
    "table_lines",
    "wrap_parts",
]

_log = logging.getLogger(__name__)

# Status of a plan that pruning skipped (apex_jax.prune): not simulated, no metrics.
PRUNED = "PRUNED"
# With a bounded objective, the first round simulates the plans with the lowest bounds: a
# share of them, at least this many.
_FIRST_ROUND_SHARE = 16
_FIRST_ROUND_MIN = 64


class SearchResult(dict):
    """``ranked`` (list of result dicts, best first), ``heuristic`` (the heuristic plan's
    result, or None when it is not a valid plan here), ``stats``, ``plan_set``,
    ``num_plans``, ``wall_s``, ``objective``, ``slo``, ``goodput`` (the bisection's
    settings and counts, or None), ``workload`` (as simulated), ``latency_cdf``
    (``{"rate_req_s", "series": {name: request times}}`` of the best plan and the
    heuristic, or None) and ``pruned`` (plans each pruning rule removed: ``dominated``,
    ``symmetric``; DP replicas simulated once: ``identical_replicas``)."""


def _subset(coeffs: Any, idx: Sequence[int] | np.ndarray) -> Any:
    """The cost coefficients (a batch ``[C]`` pytree) of cases ``idx``."""
    index = np.asarray(idx)
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[index], coeffs)


def _add_stats(total: RunStats, part: RunStats) -> None:
    for field in dataclasses.fields(RunStats):
        a, b = getattr(total, field.name), getattr(part, field.name)
        setattr(total, field.name, tuple(map(max, a, b)) if isinstance(a, tuple) else a + b)


class _SlotHints:
    """The slot capacity each case completed with at each rate scale evaluated: a plan's
    batch grows with the arrival rate, so what it needed at a lower rate is where its next
    evaluation starts (:func:`apex_jax.evaluate.evaluate_cases`, ``start_slots``)."""

    def __init__(self, results: Sequence[dict[str, Any]]) -> None:
        self._seen: list[list[tuple[float, int]]] = [
            [(1.0, int(r.get("num_slots", 0)))] for r in results
        ]

    def at(self, idx: Sequence[int], scale: Sequence[float]) -> list[int]:
        """``[Q]`` the largest capacity case ``idx[q]`` needed at a scale <= ``scale[q]``."""
        return [max([n for s, n in self._seen[i] if s <= q] + [0]) for i, q in zip(idx, scale)]

    def add(self, idx: Sequence[int], scale: Sequence[float], results) -> None:
        for i, q, r in zip(idx, scale, results):
            self._seen[i].append((float(q), int(r.get("num_slots", 0))))


def _heuristic_case(deployment: Deployment, workload: Workload) -> Case | None:
    dep = deployment
    row = heuristic_plan(
        dep.model, dep.num_gpus, dep.gpus_per_node, dep.engine, dep.gpu.max_clock_mhz
    )
    problem = check_plan(
        row,
        deployment.model,
        num_gpus=deployment.num_gpus,
        gpus_per_node=deployment.gpus_per_node,
        max_clock_mhz=deployment.gpu.max_clock_mhz,
        max_model_len=deployment.engine.max_model_len,
    )
    if problem:
        _log.warning("no heuristic baseline: %s", problem)
        return None
    return Case(deployment, row, workload)


def _goodput(
    cases: Sequence[Case],
    coeffs: Any,
    results: list[dict[str, Any]],
    slo: SLO,
    settings: GoodputSettings,
    stats: RunStats,
    hints: _SlotHints,
    lane_chunk: int | None,
) -> dict[str, Any]:
    """Add ``goodput_req_s`` and ``goodput_is_lower_bound`` to every result (NaN and False
    for failed plans); return the bisection's settings and counts.

    Every round pads its lanes to the first evaluation's shape (``stats.lane_shape``), so
    rounds of a few plans reuse the engines compiled for all of them, and starts each plan
    at the slots it needed at a lower rate (``hints``, updated here).
    """
    workload = cases[0].workload
    base_rate = arrival_rate_req_s(workload)
    kwargs = {"lane_chunk": lane_chunk} if lane_chunk else {}
    kwargs["lane_shape"] = stats.lane_shape

    def column(rows: Sequence[dict[str, Any]], key: str) -> np.ndarray:
        return np.array([r.get(key, math.nan) if r["status"] == "OK" else math.nan for r in rows])

    def evaluate_at(idx: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scaled = [
            Case(cases[i].deployment, cases[i].plan, scale_arrivals(workload, float(s)))
            for i, s in zip(idx, scale)
        ]
        _log.info("goodput: %d plans at rate scales %.3g..%.3g", len(idx), scale.min(), scale.max())
        part, part_stats = evaluate_cases(
            scaled,
            coeffs=_subset(coeffs, idx),
            slo=slo,
            start_slots=hints.at(idx, scale),
            **kwargs,
        )
        _add_stats(stats, part_stats)
        hints.add(idx, scale, part)
        return column(part, "slo_attainment"), column(part, "e2e_mean_s")

    found = bisect_rate_scale(
        evaluate_at,
        column(results, "slo_attainment"),
        column(results, "e2e_mean_s"),
        slo.attainment,
        base_rate,
        workload.num_requests,
        settings,
    )
    for r, scale, lower in zip(results, found.passing_scale, found.is_lower_bound):
        r[GOODPUT] = float(scale * base_rate)
        r["goodput_is_lower_bound"] = bool(lower)
    return {
        **dataclasses.asdict(settings),
        "trace_rate_req_s": base_rate,
        "num_rounds": found.num_rounds,
        "num_evaluations": found.num_evaluations,
        "num_lower_bounds": int(np.sum(found.is_lower_bound)),
    }


def check_objective(
    objective: str, slo: SLO | None, gpu_name: str, gpu_price_usd_per_hour: float | None
) -> None:
    """Check, before anything is simulated, that the objective exists and has what it needs.

    Args:
        objective: An :data:`apex_jax.objectives.OBJECTIVES` name.
        slo: The latency targets, or None.
        gpu_name: The GPU, for the price message.
        gpu_price_usd_per_hour: The GPU's price, or None.

    Raises:
        ValueError: In one line, for an unknown objective (naming the closest), an objective
            that needs latency targets without an SLO (goodput, fewest GPUs, SLO
            attainment), or a cost objective without a price for the GPU.
    """
    obj = get_objective(objective)
    if (objective in (GOODPUT, FEWEST_GPUS) or obj.column in SLO_KEYS) and slo is None:
        raise ValueError(
            f"objective {objective} needs latency targets: add slo=chat or "
            "slo.ttft_s=... slo.tpot_s=..."
        )
    if obj.column == "cost_per_mtok_usd" and gpu_price_usd_per_hour is None:
        raise ValueError(
            f"objective cost_per_mtok_usd needs a price for {gpu_name}: add it to "
            "the prices table (prices.usd_per_gpu_hour)"
        )


def run_search(
    deployment: Deployment,
    workload: Workload,
    space: PlanSpace,
    *,
    objective: str = "e2e_mean_s",
    hw: HardwareParams | None = None,
    progress: Callable[[int, int], None] | None = None,
    lane_chunk: int | None = None,
    plan_set: PlanSet | None = None,
    slo: SLO | None = None,
    target_rate_req_s: float | None = None,
    goodput: GoodputSettings | None = None,
    gpu_price_usd_per_hour: float | None = None,
    prune: bool = False,
) -> SearchResult:
    """Enumerate ``space`` for ``deployment``, simulate every plan on ``workload`` and rank.

    Args:
        deployment, workload, space: what to serve, on what, and the plans to try.
        objective: an :data:`apex_jax.objectives.OBJECTIVES` name.
        hw: calibrated hardware constants (datasheet defaults if None).
        progress: ``progress(done_lanes, total_lanes)`` of the first evaluation.
        lane_chunk: replicas per engine call (see :func:`apex_jax.evaluate.evaluate_cases`).
        plan_set: the space already enumerated (``space`` is then ignored).
        slo: latency targets; adds the SLO attainment keys and ``meets_slo_target``.
        target_rate_req_s: replay the trace at this mean arrival rate instead of its own.
        goodput: bisection settings; when given, or when the objective is goodput, every plan
            gets ``goodput_req_s``.
        gpu_price_usd_per_hour: adds ``cost_per_mtok_usd`` (NaN if None).
        prune: skip plans another plan dominates (:mod:`apex_jax.prune`; objectives on
            timing only); they rank last with status :data:`PRUNED`. Identical lanes are
            simulated once either way.

    Raises:
        ValueError: an unknown objective, or goodput / fewest_gpus / a target rate without
            what they need (an SLO, an open-loop workload, a GPU price for cost).
    """
    start = time.perf_counter()
    check_objective(objective, slo, deployment.gpu.name, gpu_price_usd_per_hour)
    if objective == GOODPUT and goodput is None:
        goodput = GoodputSettings()
    if target_rate_req_s:
        workload = scale_arrivals(workload, target_rate_req_s / arrival_rate_req_s(workload))
    if goodput is not None and slo is not None:
        arrival_rate_req_s(workload)  # fail before simulating if there is no rate to scale
    if plan_set is None:
        plan_set = build_plan_set(deployment, space)
    cases = [Case(deployment, row, workload) for row in plan_set.plans]
    heuristic = _heuristic_case(deployment, workload)
    if heuristic is not None:
        cases.append(heuristic)
    coeffs = case_coeffs(cases, hw or default_hardware_params())
    kwargs = {"lane_chunk": lane_chunk} if lane_chunk else {}
    cases, coeffs, results, stats, skipped, pruned = _evaluate_pruned(
        plan_set, cases, coeffs, objective if prune else None, progress, slo, kwargs
    )
    goodput_info = None
    hints = _SlotHints(results)
    if goodput is not None and slo is not None:
        goodput_info = _goodput(cases, coeffs, results, slo, goodput, stats, hints, lane_chunk)
    output_tokens = float(np.sum(workload.output_tokens))
    for r in results:
        price = math.nan if gpu_price_usd_per_hour is None else gpu_price_usd_per_hour
        r["cost_per_mtok_usd"] = cost_per_mtok_usd(
            r["num_gpus"], price, r["makespan_s"], output_tokens
        )
        if slo is not None:
            r["meets_slo_target"] = bool(r.get("slo_attainment", 0.0) >= slo.attainment)
    heuristic_result = results[-1] if heuristic is not None else None
    case_of = {id(r): i for i, r in enumerate(results)}
    ranked = rank((results[:-1] if heuristic is not None else results) + skipped, objective)
    latency_cdf = _latency_cdf(
        cases,
        coeffs,
        results,
        ranked[0] if ranked else None,
        heuristic_result,
        case_of,
        goodput_info,
        slo,
        stats,
        hints,
    )
    mark_equivalent(ranked)
    for r in results:
        r.pop("requests", None)
    return SearchResult(
        ranked=ranked,
        heuristic=heuristic_result,
        stats=stats,
        plan_set=plan_set,
        num_plans=len(plan_set.plans),
        wall_s=time.perf_counter() - start,
        objective=objective,
        slo=slo,
        goodput=goodput_info,
        workload=workload,
        latency_cdf=latency_cdf,
        pruned=pruned,
    )


def _evaluate_pruned(
    plan_set: PlanSet,
    cases: list[Case],
    coeffs: Any,
    objective: str | None,
    progress: Callable[[int, int], None] | None,
    slo: SLO | None,
    kwargs: dict[str, Any],
) -> tuple[list[Case], Any, list[dict[str, Any]], RunStats, list[dict[str, Any]], dict]:
    """Simulate the plans that pruning for ``objective`` (None: no pruning) leaves.

    ``cases`` are the plan set's, then the heuristic's, with their ``coeffs``. Dominated
    plans are skipped (:func:`apex_jax.prune.dominated_plans`). With a bounded objective the
    plans with the lowest bounds run first, with every plan that does not fit and the
    heuristic, then only those whose bound does not exceed the best plan found
    (:func:`apex_jax.prune.solo_lower_bounds`).

    Returns:
        ``(cases, coeffs, results, stats, skipped, counts)``: the simulated cases (the
        heuristic last), their coefficients and results, the engine's statistics, a result
        row per skipped plan (status :data:`PRUNED`) and how many plans each rule removed.
    """
    dep, plans, memory = plan_set.deployment, plan_set.plans, plan_set.memory
    num_plans = len(plans)
    column = None if objective is None else get_objective(objective).column
    reasons: dict[int, str] = {}
    if column is not None and not prunes_for(column):
        _log.info("no pruning: a faster engine need not be better on %s", objective)
        column = None
    if column is not None:
        dominator = dominated_plans(
            plans,
            _subset(coeffs, np.arange(num_plans)),
            case_energy(cases[:num_plans]),
            memory.num_kv_blocks,
            memory.is_oom,
        )
        for i in np.flatnonzero(dominator >= 0).tolist():
            reasons[i] = (
                f"dominated by {describe_plan(plans[dominator[i]], dep.model)}: the same "
                "lanes and engine knobs, at least as many KV pages, every cost and power "
                "constant at most as large"
            )
    num_dominated = len(reasons)
    candidates = [i for i in range(num_plans) if i not in reasons]
    extra = list(range(num_plans, len(cases)))
    bound: dict[int, float] = {}
    if column in BOUNDED_COLUMNS and not dep.model.is_encoder_decoder:
        w = cases[0].workload
        values = objective_lower_bound(
            column,
            *solo_lower_bounds(_subset(coeffs, candidates), w.prompt_tokens, w.output_tokens),
        )
        bound = dict(zip(candidates, values.tolist()))
        fitting = sorted((i for i in candidates if not memory.is_oom[i]), key=bound.__getitem__)
        size = max(_FIRST_ROUND_MIN, len(fitting) // _FIRST_ROUND_SHARE)
        first = sorted([i for i in candidates if memory.is_oom[i]] + fitting[:size])
    else:
        first = candidates

    def simulate(idx: list[int]) -> tuple[list[dict[str, Any]], RunStats]:
        return evaluate_cases(
            [cases[i] for i in idx],
            coeffs=_subset(coeffs, idx),
            progress=progress,
            slo=slo,
            per_request=True,
            **kwargs,
        )

    order = first + extra
    results, stats = simulate(order)
    if bound:
        found = [(r[column], i) for r, i in zip(results, first) if _is_clean(r, column)]
        best_value, best = min(found) if found else (math.inf, -1)
        simulated = set(first)
        rest = [i for i in candidates if i not in simulated]
        second = [i for i in rest if bound[i] <= best_value]
        for i in (i for i in rest if bound[i] > best_value):
            reasons[i] = (
                f"cannot beat {describe_plan(plans[best], dep.model)}: with every request "
                f"served alone its {column} would be {bound[i]:.4g}, over {best_value:.4g}"
            )
        if second:
            more, more_stats = simulate(second)
            _add_stats(stats, more_stats)
            results = results[: len(first)] + more + results[len(first) :]
            order = first + second + extra
    skipped = [_pruned_result(dep, plans[i], reasons[i]) for i in sorted(reasons)]
    counts = {
        "dominated": num_dominated,
        "bounded": len(reasons) - num_dominated,
        "symmetric": stats.num_symmetric_plans,
        "identical_replicas": stats.num_identical_replicas,
    }
    _log.info(
        "pruning of %d plans: %d dominated on memory and every cost term (skipped), %d "
        "bounded by a simulated plan (skipped), %d symmetric to another plan (simulated "
        "once), %d DP replicas identical to another (simulated once)",
        num_plans,
        *counts.values(),
    )
    return [cases[i] for i in order], _subset(coeffs, order), results, stats, skipped, counts


def _is_clean(result: dict[str, Any], column: str) -> bool:
    """An OK result that rejects no request, with a finite objective: one that every plan
    rejecting requests ranks after, so that its value bounds the optimum."""
    value = result.get(column, math.nan)
    return result["status"] == "OK" and not result["num_rejected"] and math.isfinite(value)


def _pruned_result(deployment: Deployment, row: np.ndarray, reason: str) -> dict[str, Any]:
    """The result row of a plan that pruning skipped: its plan columns, status
    :data:`PRUNED` and why; no metrics."""
    model = deployment.model
    return {
        "status": PRUNED,
        "status_reason": reason,
        **plan_to_dict(row),
        "plan": describe_plan(row, model),
        "placement": placement(row, deployment.gpus_per_node, model),
        "num_gpus": int(row[COL["dp"]] * row[COL["tp"]] * row[COL["pp"]]),
    }


def _latency_cdf(
    cases: Sequence[Case],
    coeffs: Any,
    results: Sequence[dict[str, Any]],
    best: dict[str, Any] | None,
    heuristic: dict[str, Any] | None,
    case_of: dict[int, int],
    goodput_info: dict[str, Any] | None,
    slo: SLO | None,
    stats: RunStats,
    hints: _SlotHints,
) -> dict[str, Any] | None:
    """Request times of the best plan and the heuristic for the latency CDFs.

    At the trace's rate; after a goodput search at the best plan's goodput rate instead (one
    more batched evaluation of the two plans, in the search's engine shapes), where the
    comparison tells more.
    """
    pair = [(name, r) for name, r in (("best plan", best), ("heuristic plan", heuristic))]
    pair = [(name, r) for name, r in pair if r is not None and r["status"] == "OK"]
    if not pair:
        return None
    try:
        rate = arrival_rate_req_s(cases[0].workload)
    except ValueError:  # a closed loop or a batch: no arrival rate to name
        rate = None
    series = {name: r["requests"] for name, r in pair}
    if goodput_info is not None and best is not None and best[GOODPUT] > 0:
        scale = best[GOODPUT] / goodput_info["trace_rate_req_s"]
        idx = [case_of[id(r)] for _, r in pair]
        scaled = [
            Case(cases[i].deployment, cases[i].plan, scale_arrivals(cases[i].workload, scale))
            for i in idx
        ]
        part, part_stats = evaluate_cases(
            scaled,
            coeffs=_subset(coeffs, idx),
            slo=slo,
            per_request=True,
            start_slots=hints.at(idx, [scale] * len(idx)),
            lane_shape=stats.lane_shape,
        )
        _add_stats(stats, part_stats)
        series = {name: r["requests"] for (name, _), r in zip(pair, part)}
        rate = best[GOODPUT]
    return {"rate_req_s": rate, "series": series}


_CSV_LEAD = ("rank", "status", "plan")
# Per-request and per-replica detail stays out of the one-row-per-plan files.
_NESTED = ("requests", "replicas")


def results_csv(ranked: Sequence[dict[str, Any]]) -> str:
    """CSV text of ranked results: rank, status, plan, then every other result field."""
    fields = list(_CSV_LEAD)
    for r in ranked:
        fields += [k for k in r if k not in fields and k not in _NESTED]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(ranked)
    return buffer.getvalue()


def summary_dict(result: SearchResult, config: dict[str, Any]) -> dict[str, Any]:
    """The JSON summary of a search: config, objective, timing, status counts, the best plan,
    the heuristic plan and how many times better the best is on the objective."""
    stats: RunStats = result["stats"]
    ranked = result["ranked"]
    counts: dict[str, int] = {}
    for r in ranked:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    best = ranked[0] if ranked and ranked[0]["status"] == "OK" else None
    heuristic = result.get("heuristic")
    plan_set = result.get("plan_set")
    slo = result.get("slo")
    objective = result["objective"]
    return {
        "config": config,
        "objective": objective,
        "objective_column": get_objective(objective).column,
        "slo": dataclasses.asdict(slo) if slo is not None else None,
        "workload": {
            "name": result["workload"].name,
            "num_requests": result["workload"].num_requests,
        },
        "goodput": result.get("goodput"),
        "num_plans": result["num_plans"],
        "plan_space": plan_set.summary() if plan_set is not None else None,
        "status_counts": counts,
        "timing_s": {
            "wall_s": result["wall_s"],
            "compile_s": stats.compile_s,
            "run_s": stats.run_s,
            "prepare_s": stats.prepare_s,
        },
        "num_lanes": stats.num_lanes,
        "pruned": result.get("pruned"),
        "num_engine_calls": stats.num_chunks,
        "best": _row_json(best) if best else None,
        "heuristic": _row_json(heuristic) if heuristic else None,
        "speedup_vs_heuristic": _finite_or_none(
            objective_ratio(best, heuristic, objective) if best and heuristic else math.nan
        ),
    }


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _row_json(row: dict[str, Any]) -> dict[str, Any]:
    return jsonable({k: v for k, v in row.items() if k not in _NESTED})


# (result key, header with unit, format); "ms" prints seconds as milliseconds.
_TABLE_COLUMNS = (
    ("ttft_mean_s", "TTFT ms", "ms"),
    ("ttft_p99_s", "p99 ms", "ms"),
    ("tpot_mean_s", "TPOT ms", "ms"),
    ("e2e_mean_s", "E2E s", "{:.2f}"),
    ("throughput_out_tok_s", "tok/s", "{:.1f}"),
    ("energy_per_output_token_j", "J/tok", "{:.2f}"),
    ("kv_gb_per_gpu", "KV GB", "{:.1f}"),
)
# Shown when the results have them (an SLO, a price, a goodput search).
_OPTIONAL_COLUMNS = (
    ("num_gpus", "GPUs", "{:d}"),
    ("slo_attainment", "SLO %", "pct"),
    (GOODPUT, "goodput", "{:.2f}"),
    ("cost_per_mtok_usd", "USD/Mtok", "{:.2f}"),
)
# Left out, in this order, while the table is wider than TABLE_WIDTH (plans.csv has them).
_DROPPABLE = ("ttft_p99_s", "kv_gb_per_gpu", "energy_per_output_token_j")
# Characters a table line may take (a terminal of 120 columns).
TABLE_WIDTH = 120
PLAN_SEP = " · "


def format_cell(value: Any, fmt: str, row: dict[str, Any] | None = None, key: str = "") -> str:
    """One table cell: ``-`` for a missing or non-finite value, ``ms`` prints seconds as
    milliseconds, ``pct`` a fraction as a percentage; a goodput that is a lower bound (the
    trace could not test higher rates) reads ``>=``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if fmt == "ms":
        text = f"{value * 1e3:.1f}"
    elif fmt == "pct":
        text = f"{value * 100:.3g}"
    else:
        text = fmt.format(value)
    if key == GOODPUT and row is not None and row.get("goodput_is_lower_bound") in (True, "True"):
        text = ">=" + text
    return text


def _behaviour_key(result: dict[str, Any]) -> tuple:
    """Equal for plans whose simulation is the same: every request's first token and finish
    at the same times on the same number of GPUs (knobs that never bind change nothing),
    or, for a failed plan, the same status for the same reason."""
    requests = result.get("requests")
    if result["status"] != "OK" or requests is None:
        return (result["status"], result.get("status_reason", ""), result.get("num_gpus"))
    digest = hashlib.sha256()
    for name in ("first_token_s", "finish_s"):
        digest.update(np.ascontiguousarray(requests[name], np.float64).tobytes())
    return ("OK", result["num_gpus"], digest.hexdigest())


def mark_equivalent(ranked: Sequence[dict[str, Any]]) -> None:
    """Give every ranked result ``equivalent_to_rank``: the rank of the best plan whose
    simulated behaviour is identical (its own rank if it is that plan)."""
    first: dict[tuple, int] = {}
    for r in ranked:
        r["equivalent_to_rank"] = first.setdefault(_behaviour_key(r), int(r["rank"]))


def _groups(ranked: Sequence[dict[str, Any]], top_k: int) -> list[dict[str, Any]]:
    """The best ``top_k`` groups of equivalent plans: each group's best plan, with the
    group's size as ``num_equivalent``."""
    lead = [int(r.get("equivalent_to_rank") or r["rank"]) for r in ranked]
    sizes = collections.Counter(lead)
    best = [r for r, k in zip(ranked, lead) if k == int(r["rank"])]
    return [{**r, "num_equivalent": sizes[int(r["rank"])]} for r in best[:top_k]]


def factor_parts(texts: list[str], sep: str = PLAN_SEP) -> tuple[str, list[str]]:
    """The ``sep``-separated parts that every text shares (for a line above a table), and
    each text's other parts (``-`` when it has none)."""
    parts = [text.split(sep) for text in texts]
    if len(parts) < 2:
        return "", texts
    common = [p for p in parts[0] if all(p in q for q in parts[1:])]
    rows = [sep.join(p for p in q if p not in common) or "-" for q in parts]
    return sep.join(common), rows


def format_table(ranked: Sequence[dict[str, Any]], top_k: int, objective: str | None = None) -> str:
    """A fixed-width table of the best ``top_k`` groups of plans, at most
    :data:`TABLE_WIDTH` characters wide; every figure names its unit.

    Plans whose simulated behaviour is identical (``equivalent_to_rank``) share one row, the
    best-ranked one's, with their number in column ``n``; ``plans.csv`` lists each. Plan
    parts every row shares are printed once, above the table. The objective's column is
    always shown; the SLO attainment, goodput, cost and GPU-count columns when some plan has
    a finite value for them. Columns of :data:`_DROPPABLE` are left out, and then the plan
    text cut short, when the table would be wider than :data:`TABLE_WIDTH`.
    """
    rows = _groups(ranked, top_k)
    common, plans = factor_parts([str(r["plan"]) for r in rows])
    for r, plan in zip(rows, plans):
        r["plan"] = plan
    columns = [("rank", "rank", "{:d}"), ("num_equivalent", "n", "{:d}"), ("plan", "plan", "{}")]
    if any(r["status"] != "OK" for r in rows):
        columns.append(("status", "status", "{}"))
    columns += _TABLE_COLUMNS
    extra = [
        c
        for c in _OPTIONAL_COLUMNS
        if any(isinstance(r.get(c[0]), (int, float)) and math.isfinite(r[c[0]]) for r in rows)
    ]
    if objective is not None:
        obj = get_objective(objective)
        if obj.column not in {c[0] for c in columns + extra}:
            extra.insert(0, (obj.column, obj.label, "{:.4g}"))
    if objective == FEWEST_GPUS:
        extra = [c for c in extra if c[0] != "num_gpus"]
        columns.insert(3, ("num_gpus", "GPUs", "{:d}"))
    columns += extra
    for key in (None, *_DROPPABLE):
        columns = [c for c in columns if c[0] != key]
        lines = table_lines(rows, columns)
        if max(len(line) for line in lines) <= TABLE_WIDTH:
            break
    else:
        lines = table_lines(rows, columns, plan_width=plan_room(rows, columns))
    header = []
    if common:
        header += wrap_parts("every plan below: ", common.split(PLAN_SEP))
    header.append("n: plans with identical simulated behaviour (plans.csv lists each)")
    return "\n".join(header + lines)


def wrap_parts(prefix: str, parts: list[str], sep: str = PLAN_SEP) -> list[str]:
    """``prefix`` and the parts joined by ``sep``, in lines of at most TABLE_WIDTH, broken
    between parts."""
    lines, line = [], prefix
    for part in parts:
        piece = part if line in (prefix, "  ") else sep + part
        if len(line) + len(piece) > TABLE_WIDTH and line not in (prefix, "  "):
            lines.append(line)
            line, piece = "  ", part
        line += piece
    return [*lines, line]


def _cells(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> list[list[str]]:
    return [[format_cell(r.get(key), fmt, r, key) for key, _, fmt in columns] for r in rows]


def plan_room(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> int:
    """Characters left for the plan column when every other column has its width."""
    cells = _cells(rows, columns)
    others = sum(
        max([len(h)] + [len(row[i]) for row in cells]) + 2
        for i, (key, h, _) in enumerate(columns)
        if key != "plan"
    )
    return max(TABLE_WIDTH - others, len("plan"))


def table_lines(
    rows: list[dict[str, Any]], columns: list[tuple[str, str, str]], plan_width: int = 0
) -> list[str]:
    cells = _cells(rows, columns)
    if plan_width:
        i = [c[0] for c in columns].index("plan")
        for row in cells:
            if len(row[i]) > plan_width:
                row[i] = row[i][: plan_width - 1] + "…"
    headers = [h for _, h, _ in columns]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return lines
