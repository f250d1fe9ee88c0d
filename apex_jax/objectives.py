"""What a search ranks plans by: objectives, the SLO-bound goodput and fewest-GPU searches,
GPU prices, the heuristic baseline plan and Pareto fronts.

An objective names a column of the results (``plans.csv``) and a direction. Two objectives
need more than one simulation of the trace:

- **goodput** (``goodput_req_s``, DistServe's definition): the highest arrival rate at which
  at least ``SLO.attainment`` of the requests meet both the TTFT and the TPOT target. The
  trace is replayed at a rate scale ``s`` (arrival gaps divided by ``s``), and
  :func:`bisect_rate_scale` finds, for every plan at once, the largest ``s`` that still meets
  the target: first by growing or shrinking ``s`` geometrically until it is bracketed, then by
  bisection in log space. Each round is one batched evaluation of every unfinished plan, each
  at its own rate scale. The result is the highest rate *seen* to meet the target, within
  ``rel_tol`` of the boundary. Attainment is assumed to fall as the rate rises; where it does
  not (small traces are noisy), bisection returns one boundary and a scan of rates may find
  a higher passing rate beyond a failing one. A finite trace can only test rates at which it
  lasts several request lifetimes: a rate also counts as missed when the mean number of
  requests in flight (Little's law) exceeds ``max_in_flight_fraction`` of the trace, and
  plans that meet the SLOs up to that limit get ``goodput_is_lower_bound`` (their
  goodput is a lower bound; a longer trace would lift it).
- **fewest GPUs** (``fewest_gpus``): the plan using the fewest GPUs among those meeting the
  attainment target at the workload's rate (``target_rate_req_s`` rescales the trace to a
  target rate first); plans that miss the target rank after every plan that meets it. It
  needs a plan space with ``use_all_gpus=false``, or every plan uses the whole cluster.

The *heuristic* plan is the usual hand-made deployment that APEX compares against: tensor
parallelism over the GPUs of a node, pipeline parallelism across nodes, no data parallelism,
bf16 weights and KV cache, the engine's default knobs and the boost clock.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from apex_jax.engine_config import EngineConfig
from apex_jax.metrics import METRIC_KEYS
from apex_jax.model_spec import ModelSpec
from apex_jax.plans import COL, plan_row
from apex_jax.workload import Workload

__all__ = [
    "FEWEST_GPUS",
    "GOODPUT",
    "OBJECTIVES",
    "GoodputSettings",
    "Objective",
    "RateBisection",
    "arrival_rate_req_s",
    "bisect_rate_scale",
    "cost_per_mtok_usd",
    "get_objective",
    "heuristic_plan",
    "objective_ratio",
    "pareto_mask",
    "rank",
    "scale_arrivals",
]

GOODPUT = "goodput_req_s"
FEWEST_GPUS = "fewest_gpus"


class Objective(NamedTuple):
    """A way to rank plans.

    Attributes:
        column: the result column ranked by (a ``plans.csv`` header).
        sign: ``+1`` to minimise the column, ``-1`` to maximise it.
        label: the column's name with its unit, for tables and plot axes.
    """

    column: str
    sign: int
    label: str


# Labels with units of the columns people rank by; other metric keys rank by their own name.
_LABELS: dict[str, str] = {
    "ttft_mean_s": "TTFT mean (s)",
    "ttft_p99_s": "TTFT p99 (s)",
    "tpot_mean_s": "TPOT mean (s)",
    "tpot_p99_s": "TPOT p99 (s)",
    "e2e_mean_s": "E2E latency mean (s)",
    "e2e_p99_s": "E2E latency p99 (s)",
    "throughput_req_s": "throughput (req/s)",
    "throughput_out_tok_s": "output throughput (tok/s)",
    "energy_j": "energy (J)",
    "energy_per_output_token_j": "energy per output token (J/tok)",
    "cost_per_mtok_usd": "cost per million output tokens (USD)",
    "slo_attainment": "SLO attainment, TTFT and TPOT (fraction)",
    "slo_throughput_req_s": "requests meeting both SLOs per second (req/s)",
    GOODPUT: "goodput (req/s)",
    "mfu": "MFU (fraction of peak FLOP/s)",
    "mbu": "MBU (fraction of peak HBM bandwidth)",
}
# Columns where more is better; every other metric is minimised.
_MAXIMISED = frozenset(
    {
        "throughput_req_s",
        "throughput_out_tok_s",
        "slo_attainment",
        "slo_ttft_attainment",
        "slo_tpot_attainment",
        "slo_throughput_req_s",
        GOODPUT,
        "mfu",
        "mbu",
    }
)

OBJECTIVES: dict[str, Objective] = {
    key: Objective(key, -1 if key in _MAXIMISED else 1, _LABELS.get(key, key))
    for key in (*METRIC_KEYS, *_LABELS)
}
OBJECTIVES[FEWEST_GPUS] = Objective("num_gpus", 1, "GPUs")


def get_objective(name: str) -> Objective:
    """The objective called ``name``; a one-line error lists the valid names."""
    if name not in OBJECTIVES:
        close = difflib.get_close_matches(str(name), list(OBJECTIVES), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"unknown objective {name!r}: {hint}use one of {', '.join(sorted(OBJECTIVES))}"
        )
    return OBJECTIVES[name]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value)


def rank(results: Sequence[dict[str, Any]], objective: str) -> list[dict[str, Any]]:
    """Order results best first and number them (``rank``, from 1).

    OK plans with a finite objective come first, best first. For ``fewest_gpus`` the plans
    that meet the SLO attainment target (``meets_slo_target``) come before those that miss it,
    and among equal GPU counts the lower mean E2E latency wins. A plan that rejects requests
    ranks after every plan that rejects fewer, whatever its objective: its metrics cover only
    the requests it serves, so they would flatter it. Failed plans follow, by status.
    """
    obj = get_objective(objective)

    def key(r: dict[str, Any]):
        value = r.get(obj.column, math.nan)
        bad = r["status"] != "OK" or not _finite(value)
        num_rejected = 0 if bad else r.get("num_rejected", 0)
        if objective == FEWEST_GPUS and not bad:
            meets = r.get("meets_slo_target", False)
            return (False, "", num_rejected, not meets, value, r["e2e_mean_s"])
        return (bad, r["status"], num_rejected, 0 if bad else obj.sign * value)

    ranked = sorted(results, key=key)
    for i, r in enumerate(ranked):
        r["rank"] = i + 1
    return ranked


def objective_ratio(best: Mapping[str, Any], other: Mapping[str, Any], objective: str) -> float:
    """How many times better ``best`` is than ``other`` on the objective (> 1: better).

    ``other / best`` for a minimised objective, ``best / other`` for a maximised one; NaN when
    either plan failed or the ratio is undefined.
    """
    obj = get_objective(objective)
    a, b = best.get(obj.column, math.nan), other.get(obj.column, math.nan)
    if best.get("status") != "OK" or other.get("status") != "OK":
        return math.nan
    if not (_finite(a) and _finite(b)) or min(a, b) <= 0:
        return math.nan
    return float(b / a if obj.sign > 0 else a / b)


# --------------------------------------------------------------------------------------------
# Arrival rates
# --------------------------------------------------------------------------------------------


def arrival_rate_req_s(workload: Workload) -> float:
    """Mean arrival rate of an open-loop workload: ``(N - 1) / (last - first arrival)``.

    Raises:
        ValueError: for a closed loop or a workload whose requests all arrive at once; they
            have no arrival rate to scale.
    """
    span = float(workload.arrival_s[-1] - workload.arrival_s[0])
    if workload.concurrency > 0 or workload.num_requests < 2 or span <= 0:
        raise ValueError(
            f"workload {workload.name!r} has no arrival rate (closed loop or all requests at "
            "once): goodput and target_rate_req_s need an open-loop trace or a poisson workload"
        )
    return (workload.num_requests - 1) / span


def scale_arrivals(workload: Workload, scale: float) -> Workload:
    """The same requests arriving ``scale`` times as fast (gaps divided by ``scale``)."""
    if not scale > 0:
        raise ValueError(f"rate scale must be > 0 (got {scale})")
    t0 = workload.arrival_s[0]
    return dataclasses.replace(
        workload,
        name=f"{workload.name}@x{scale:.4g}",
        arrival_s=t0 + (workload.arrival_s - t0) / scale,
    )


# --------------------------------------------------------------------------------------------
# Goodput: bisection over the rate scale, all plans at once
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GoodputSettings:
    """How finely and how far the goodput bisection searches.

    Attributes:
        rel_tol: stop when the failing rate scale is within ``1 + rel_tol`` of the passing one.
        growth: factor by which the rate scale grows (without a per-plan cap) or shrinks
            until the target is bracketed.
        min_scale, max_scale: the range of rate scales searched; goodput is 0 below it and
            reported as ``max_scale`` times the trace's rate above it.
        max_in_flight_fraction: a rate counts only while the trace is long enough to test it:
            while the mean number of requests in flight (Little's law: rate times mean E2E
            latency) stays below this fraction ``f`` of the trace's requests (see
            :func:`bisect_rate_scale`). The load ramps up over about the first ``f * N``
            requests and drains over about the last ``f * N``, which see less than the
            steady load; the default 0.35 leaves ``0.3 * N`` requests in the steady state,
            three times the ``0.1 * N`` that the usual 90% attainment target lets miss, so
            that a rate the steady state cannot serve fails however well the ramp and the
            drain do. (An overload, where the queue grows, shows within a few percent of
            the rate on a trace of some thousand requests: its last tenth waits longer
            than a TTFT target of a second.) Lower it for lower attainment targets.
        max_rounds: cap on batched evaluations after the first.
    """

    rel_tol: float = 0.03
    growth: float = 4.0
    min_scale: float = 1.0 / 1024
    max_scale: float = 1024.0
    max_in_flight_fraction: float = 0.35
    max_rounds: int = 24

    def __post_init__(self) -> None:
        if not self.rel_tol > 0:
            raise ValueError(f"goodput.rel_tol must be > 0 (got {self.rel_tol})")
        if not self.growth > 1:
            raise ValueError(f"goodput.growth must be > 1 (got {self.growth})")
        if not 0 < self.min_scale <= 1 <= self.max_scale:
            raise ValueError(
                "goodput needs 0 < min_scale <= 1 <= max_scale "
                f"(got {self.min_scale}, {self.max_scale})"
            )
        if not 0 < self.max_in_flight_fraction <= 1:
            raise ValueError(
                "goodput.max_in_flight_fraction must be in (0, 1] "
                f"(got {self.max_in_flight_fraction})"
            )
        if self.max_rounds < 0:
            raise ValueError(f"goodput.max_rounds must be >= 0 (got {self.max_rounds})")


class RateBisection(NamedTuple):
    """Result of :func:`bisect_rate_scale` for ``P`` plans.

    Attributes:
        passing_scale: ``[P]`` the highest rate scale seen to meet the target; 0 when none
            did (down to ``min_scale``), NaN for plans left out.
        failing_scale: ``[P]`` the lowest rate scale seen to miss it, or that the trace is
            too short to test; ``inf`` when none was tried, NaN for plans left out.
        is_lower_bound: ``[P]`` the plan met the target at every rate the trace can test
            (or up to ``max_scale``): its goodput is at least ``passing_scale`` times the
            trace's rate, and a longer trace could show more.
        num_rounds: batched evaluations run (the one at scale 1 not counted).
        num_evaluations: plan evaluations run in those rounds.
    """

    passing_scale: np.ndarray
    failing_scale: np.ndarray
    is_lower_bound: np.ndarray
    num_rounds: int
    num_evaluations: int


def bisect_rate_scale(
    evaluate_at: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    attainment_at_1: np.ndarray,
    e2e_mean_at_1_s: np.ndarray,
    target: float,
    trace_rate_req_s: float,
    num_requests: int,
    settings: GoodputSettings = GoodputSettings(),
) -> RateBisection:
    """Find, for every plan, the highest rate scale whose SLO attainment meets ``target``.

    A probe at rate scale ``s`` *passes* when the attainment meets the target and the trace
    can test the rate: the mean requests in flight, ``s * trace_rate * E2E`` (Little's law),
    stay within ``L = max_in_flight_fraction * num_requests``. Otherwise it fails, and it
    fails *by the trace* when only the second condition does not hold.

    Per plan, rounds go: up from a pass, to the highest testable scale that plan's last
    E2E latency allows, ``L / (trace_rate * E2E)`` (latency grows with the rate, so that
    estimate is optimistic), or by ``growth`` up to ``max_scale``; down from a failure at
    scale 1 by ``growth`` to ``min_scale``; after a failure by the trace at ``s``, to
    ``L / (trace_rate * E2E(s))``, a scale the trace can certainly test, when that is above
    the last pass; otherwise between a pass and a failure by bisection in log space, until the
    two are within ``1 + rel_tol``. A plan whose lowest failure is one by the trace is a lower
    bound.

    Args:
        evaluate_at: ``evaluate_at(plan_idx [Q] int, scale [Q] float) -> (attainment [Q],
            e2e_mean_s [Q])`` of plans ``plan_idx``, each replayed at its own rate scale, in
            one batched evaluation; NaN (a failed run) misses the target.
        attainment_at_1, e2e_mean_at_1_s: ``[P]`` the same at the trace's own rate; a NaN
            attainment leaves the plan out (it failed for a reason the rate does not change,
            e.g. OOM).
        target: fraction of requests that must meet both SLOs, in (0, 1].
        trace_rate_req_s: the trace's mean arrival rate (:func:`arrival_rate_req_s`).
        num_requests: requests in the trace.
        settings: tolerances and range.

    Returns:
        The bracket of every plan; ``passing_scale`` times the trace's rate is its goodput.
    """
    if not 0 < target <= 1:
        raise ValueError(f"SLO attainment target must be in (0, 1] (got {target})")
    limit = settings.max_in_flight_fraction * num_requests

    def verdict(att, e2e, scale):
        with np.errstate(invalid="ignore"):
            in_flight = scale * trace_rate_req_s * np.asarray(e2e, np.float64)
            testable = np.isfinite(in_flight) & (in_flight <= limit)
            meets = np.isfinite(att) & (np.asarray(att, np.float64) >= target)
        return meets & testable, ~testable & np.isfinite(in_flight)

    def testable_scale(e2e):
        with np.errstate(divide="ignore", invalid="ignore"):
            return limit / (trace_rate_req_s * np.asarray(e2e, np.float64))

    att = np.asarray(attainment_at_1, np.float64)
    num_plans = att.size
    included = np.isfinite(att)
    passes, by_trace = verdict(att, e2e_mean_at_1_s, np.ones(num_plans))
    passes &= included
    passing = np.where(passes, 1.0, 0.0)
    failing = np.where(passes, np.inf, 1.0)
    failed_by_trace = ~passes & by_trace
    # E2E latency at the passing and at the failing probe.
    e2e_pass = np.where(passes, e2e_mean_at_1_s, np.nan)
    e2e_fail = np.where(passes, np.nan, e2e_mean_at_1_s)
    done = ~included
    num_rounds = num_evaluations = 0
    while num_rounds < settings.max_rounds:
        grow = ~done & np.isinf(failing)
        shrink = ~done & (passing == 0)
        between = ~done & (passing > 0) & np.isfinite(failing)
        with np.errstate(invalid="ignore", divide="ignore"):
            up = np.minimum(
                np.where(
                    np.isfinite(testable_scale(e2e_pass)),
                    testable_scale(e2e_pass),
                    passing * settings.growth,
                ),
                settings.max_scale,
            )
            # After a failure by the trace, a scale the trace can certainly test, if it is
            # clearly above the last pass; else plain bisection.
            hint = np.where(failed_by_trace, testable_scale(e2e_fail), np.nan)
            use_hint = hint > passing * (1 + settings.rel_tol)
            probe = np.select(
                [grow, shrink, between & use_hint, between],
                [
                    up,
                    np.maximum(failing / settings.growth, settings.min_scale),
                    hint,
                    np.sqrt(passing * failing),
                ],
                np.nan,
            )
            # Nothing left to learn: at max_scale or the testable limit, at min_scale, or
            # within the tolerance of the failure.
            stop = (
                (grow & (up <= passing * (1 + 1e-12)))
                | (shrink & (failing <= settings.min_scale))
                | (between & ~(failing > passing * (1 + settings.rel_tol)))
            )
        done |= stop
        todo = np.flatnonzero(~done)
        if todo.size == 0:
            break
        att_q, e2e_q = evaluate_at(todo, probe[todo])
        ok, trace = verdict(att_q, e2e_q, probe[todo])
        up_idx, down_idx = todo[ok], todo[~ok]
        passing[up_idx], e2e_pass[up_idx] = probe[up_idx], np.asarray(e2e_q)[ok]
        failing[down_idx], e2e_fail[down_idx] = probe[down_idx], np.asarray(e2e_q)[~ok]
        failed_by_trace[down_idx] = trace[~ok]
        num_rounds += 1
        num_evaluations += todo.size
    is_lower_bound = included & (passing > 0) & (np.isinf(failing) | failed_by_trace)
    passing[~included] = np.nan
    failing[~included] = np.nan
    return RateBisection(passing, failing, is_lower_bound, num_rounds, num_evaluations)


# --------------------------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------------------------


def cost_per_mtok_usd(
    num_gpus: float, price_usd_per_gpu_hour: float, makespan_s: float, output_tokens: float
) -> float:
    """Rental cost of serving a million output tokens.

    Every GPU of the plan is paid for the whole makespan, idle or not:
    ``num_gpus * price * makespan_s / 3600 / output_tokens * 1e6``.
    """
    if not (_finite(makespan_s) and output_tokens > 0):
        return math.nan
    return num_gpus * price_usd_per_gpu_hour * makespan_s / 3600.0 / output_tokens * 1e6


# --------------------------------------------------------------------------------------------
# The heuristic baseline and Pareto fronts
# --------------------------------------------------------------------------------------------


def heuristic_plan(
    model: ModelSpec, num_gpus: int, gpus_per_node: int, engine: EngineConfig, max_clock_mhz: float
) -> np.ndarray:
    """The usual hand-made plan, ``[F]`` int32: TP over a node's GPUs, PP across nodes.

    One replica (no DP), bf16 weights and KV cache, the engine's default knobs, the boost
    clock (``max_clock_mhz``). On one partly used node TP spans ``num_gpus``. With more
    nodes than layers, PP takes the most nodes that divide the cluster and not the layers,
    and DP the rest.
    """
    tp = min(gpus_per_node, num_gpus)
    nodes = max(num_gpus // tp, 1)
    pp = max(d for d in range(1, nodes + 1) if nodes % d == 0 and d <= model.num_layers)
    row = plan_row(
        {"dp": nodes // pp, "tp": tp, "pp": pp, "weight_dtype": "bf16", "kv_dtype": "bf16"},
        defaults=engine.plan_knobs(),
    )
    row[COL["gpu_clock_mhz"]] = round(max_clock_mhz)
    if model.is_encoder_decoder:
        row[COL["enc_tp"]] = tp
    return row


def pareto_mask(x: np.ndarray, y: np.ndarray, x_sign: int, y_sign: int) -> np.ndarray:
    """Points no other point beats on both axes, ``[P]`` bool.

    ``x_sign`` / ``y_sign`` are ``+1`` where smaller is better and ``-1`` where larger is;
    non-finite points are never on the front. Equal points are all kept.
    """
    x = np.asarray(x, np.float64) * x_sign
    y = np.asarray(y, np.float64) * y_sign
    finite = np.isfinite(x) & np.isfinite(y)
    mask = np.zeros(x.shape, bool)
    idx = np.flatnonzero(finite)
    # Sweep by x, then y: a point is on the front if its y beats every point before it, or
    # if it equals the last point put on the front.
    order = idx[np.lexsort((y[idx], x[idx]))]
    best_y, last = math.inf, None
    for i in order:
        if y[i] < best_y:
            mask[i], best_y, last = True, y[i], (x[i], y[i])
        elif last == (x[i], y[i]):
            mask[i] = True
    return mask
