"""Plan search: enumerate, evaluate, rank; the results as CSV text, a summary and a table."""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from apex_jax.deployment import Deployment
from apex_jax.evaluate import RunStats, evaluate_plans
from apex_jax.hardware import HardwareParams
from apex_jax.io import jsonable
from apex_jax.metrics import METRIC_KEYS, SLO
from apex_jax.plan_space import PlanSet, build_plan_set
from apex_jax.plans import PlanSpace
from apex_jax.workload import Workload

__all__ = [
    "OBJECTIVES",
    "SearchResult",
    "format_table",
    "rank",
    "results_csv",
    "run_search",
    "summary_dict",
]

# Objective name -> +1 to minimise, -1 to maximise.
OBJECTIVES: dict[str, int] = {key: 1 for key in METRIC_KEYS}
OBJECTIVES.update(
    {"throughput_req_s": -1, "throughput_out_tok_s": -1, "slo_attainment": -1, "goodput_req_s": -1}
)


class SearchResult(dict):
    """``ranked`` (list of result dicts, best first), ``stats``, ``plan_set`` and
    ``num_plans``."""


def rank(results: Sequence[dict[str, Any]], objective: str) -> list[dict[str, Any]]:
    """Order results best first: OK plans by the objective, then failed plans by status."""
    if objective not in OBJECTIVES:
        raise ValueError(
            f"unknown objective {objective!r}: use one of {', '.join(sorted(OBJECTIVES))}"
        )
    sign = OBJECTIVES[objective]

    def key(r: dict[str, Any]):
        value = r.get(objective, math.nan)
        bad = r["status"] != "OK" or not math.isfinite(value)
        return (bad, r["status"], sign * value if not bad else 0.0)

    ranked = sorted(results, key=key)
    for i, r in enumerate(ranked):
        r["rank"] = i + 1
    return ranked


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
) -> SearchResult:
    """Enumerate ``space`` for ``deployment``, simulate every plan on ``workload`` and rank.

    ``plan_set`` is the space already enumerated by :func:`~apex_jax.plan_space.build_plan_set`
    (``space`` is then ignored); the result keeps it under ``plan_set``.
    """
    start = time.perf_counter()
    if plan_set is None:
        plan_set = build_plan_set(deployment, space)
    plans = plan_set.plans
    kwargs = {"progress": progress, "slo": slo}
    if lane_chunk:
        kwargs["lane_chunk"] = lane_chunk
    results, stats = evaluate_plans(plans, deployment, workload, hw, **kwargs)
    ranked = rank(results, objective)
    return SearchResult(
        ranked=ranked,
        stats=stats,
        plan_set=plan_set,
        num_plans=len(plans),
        wall_s=time.perf_counter() - start,
        objective=objective,
    )


_CSV_LEAD = ("rank", "status", "plan")


def results_csv(ranked: Sequence[dict[str, Any]]) -> str:
    """CSV text of ranked results: rank, status, plan, then every other result field."""
    fields = list(_CSV_LEAD)
    if ranked:
        fields += [k for k in ranked[0] if k not in _CSV_LEAD]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(ranked)
    return buffer.getvalue()


def summary_dict(result: SearchResult, config: dict[str, Any]) -> dict[str, Any]:
    """The JSON summary of a search: config, timing, status counts and the best plan."""
    stats: RunStats = result["stats"]
    ranked = result["ranked"]
    counts: dict[str, int] = {}
    for r in ranked:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    best = ranked[0] if ranked and ranked[0]["status"] == "OK" else None
    plan_set = result.get("plan_set")
    return {
        "config": config,
        "objective": result["objective"],
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
        "num_engine_calls": stats.num_chunks,
        "best": jsonable(best) if best else None,
    }


_TABLE_COLUMNS = (
    ("rank", "rank", "{:d}"),
    ("plan", "plan", "{}"),
    ("status", "status", "{}"),
    ("ttft_mean_s", "TTFT mean (ms)", "ms"),
    ("ttft_p99_s", "TTFT p99 (ms)", "ms"),
    ("tpot_mean_s", "TPOT mean (ms)", "ms"),
    ("e2e_mean_s", "E2E mean (s)", "{:.2f}"),
    ("throughput_out_tok_s", "out tok/s", "{:.1f}"),
    ("kv_gb_per_gpu", "KV GB/GPU", "{:.1f}"),
)


def format_table(ranked: Sequence[dict[str, Any]], top_k: int) -> str:
    """A fixed-width table of the best ``top_k`` plans; every figure names its unit."""
    rows = []
    for r in ranked[:top_k]:
        cells = []
        for key, _, fmt in _TABLE_COLUMNS:
            v = r.get(key)
            if fmt == "ms":
                cells.append("-" if v is None or not math.isfinite(v) else f"{v * 1e3:.1f}")
            elif isinstance(v, float) and not math.isfinite(v):
                cells.append("-")
            else:
                cells.append(fmt.format(v))
        rows.append(cells)
    headers = [h for _, h, _ in _TABLE_COLUMNS]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]
    out = [
        "  ".join(h.ljust(w) for h, w in zip(headers, widths)),
        "  ".join("-" * w for w in widths),
    ]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(out)
