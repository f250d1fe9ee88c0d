"""The one place where plans are batched: lanes, chunks, the jitted engine and results.

A *lane* is one data-parallel replica of one plan. Replicas of a plan get requests
round-robin (request ``i`` to replica ``i mod dp``). Lanes are padded to bucketed shapes and
run in fixed-size chunks through a single compiled :func:`apex_jax.simulator.run_lanes`, so
peak memory depends on the chunk, not on the number of plans, and a sweep compiles a handful
of times.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from apex_jax.cost.energy import EnergyCoeffs, energy_coeffs
from apex_jax.cost.iteration import CostCoeffs, cost_coeffs, decode_time_parts_s
from apex_jax.deployment import Case, Deployment
from apex_jax.engine_config import EngineConfig
from apex_jax.hardware import HardwareParams, default_hardware_params
from apex_jax.memory import memory_plan
from apex_jax.metrics import SLO, closed_loop_arrivals, summarize_requests
from apex_jax.plans import COL, describe_plan, plan_to_dict
from apex_jax.reference import num_rejected, simulate_reference
from apex_jax.simulator import LaneInputs, LaneResult, make_lane_inputs, run_lanes, stack_lanes
from apex_jax.status import INFEASIBLE, LIVE, OK, OOM, SLOT_OVERFLOW
from apex_jax.workload import Workload

__all__ = [
    "DEFAULT_LANE_CHUNK",
    "DEFAULT_MAX_ITERS",
    "EngineError",
    "RunStats",
    "case_coeffs",
    "case_energy",
    "engine_limits",
    "evaluate_cases",
    "evaluate_plans",
    "least_loaded_assignment",
    "num_compiled",
    "prepare_lanes",
]

DEFAULT_MAX_ITERS = 20_000_000
DEFAULT_LANE_CHUNK = 256
INITIAL_SLOTS = 32


class EngineError(RuntimeError):
    """The compiled engine failed on inputs that passed validation: a bug to report."""


@dataclasses.dataclass
class RunStats:
    """Where the time of an evaluation went (seconds) and how big it was."""

    num_lanes: int = 0
    num_chunks: int = 0
    compile_s: float = 0.0
    run_s: float = 0.0
    prepare_s: float = 0.0


def _next_pow2(x: int, minimum: int) -> int:
    return max(minimum, 1 << (max(int(x), 1) - 1).bit_length())


def engine_limits(plan: np.ndarray, num_kv_blocks: int, engine: EngineConfig) -> dict[str, int]:
    """Engine limits of one replica (see :class:`apex_jax.reference.EngineLimits`)."""
    return {
        "max_num_seqs": int(plan[COL["max_num_seqs"]]),
        "max_num_batched_tokens": int(plan[COL["max_num_batched_tokens"]]),
        "block_size": int(plan[COL["block_size"]]),
        "num_kv_blocks": int(num_kv_blocks),
        # vLLM keeps int(watermark * pages) free when admitting prefills.
        "watermark_blocks": int(engine.watermark * int(num_kv_blocks)),
        "max_model_len": int(engine.max_model_len),
        "chunked_prefill": int(plan[COL["chunked_prefill"]]),
    }


_COMPILED: dict[tuple, Any] = {}


def _engine_fn(num_devices: int, num_slots: int, max_iters: int):
    """The engine over a lane batch, its lane axis split across ``num_devices`` devices.

    With several devices each runs its own outer loop on its own lanes (``shard_map``), so a
    device whose lanes are done stops instead of waiting on a global ``any(live)``.
    """
    engine = functools.partial(run_lanes, num_slots=num_slots, max_iters=max_iters)
    if num_devices == 1:
        return engine
    mesh = jax.make_mesh(
        (num_devices,),
        ("lanes",),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=jax.devices()[:num_devices],
    )
    spec = jax.sharding.PartitionSpec("lanes")
    return jax.shard_map(engine, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)


def _compiled_runner(inputs: LaneInputs, num_slots: int, max_iters: int, stats: RunStats):
    num_devices = _num_devices(jax.tree_util.tree_leaves(inputs)[0].shape[0])
    shapes = tuple((x.shape, x.dtype) for x in jax.tree_util.tree_leaves(inputs))
    key = (shapes, num_slots, max_iters, num_devices)
    if key not in _COMPILED:
        start = time.perf_counter()
        _COMPILED[key] = (
            jax.jit(_engine_fn(num_devices, num_slots, max_iters)).lower(inputs).compile()
        )
        stats.compile_s += time.perf_counter() - start
    return _COMPILED[key]


def _num_devices(num_lanes: int) -> int:
    """Devices to split a chunk over: all local ones, if the chunk divides evenly."""
    count = jax.local_device_count()
    return count if num_lanes % count == 0 else 1


def num_compiled() -> int:
    """How many engine executables this process has compiled (for recompilation tests)."""
    return len(_COMPILED)


class _Lane(NamedTuple):
    case: int
    replica: int
    request_ids: np.ndarray  # [n] indices into the case's workload
    gate: int
    limits: dict
    status: int


def _lane_arrays(
    lanes: Sequence[_Lane],
    cases: Sequence[Case],
    coeffs: CostCoeffs,
    num_requests: int,
    energy: EnergyCoeffs | None = None,
) -> LaneInputs:
    """Stacked inputs of ``lanes``; ``coeffs`` and ``energy`` are per case (batch ``[C]``)."""
    built = []
    for lane in lanes:
        w = cases[lane.case].workload
        ids = lane.request_ids
        built.append(
            make_lane_inputs(
                w.arrival_s[ids],
                w.prompt_tokens[ids],
                w.output_tokens[ids],
                lane.limits,
                _plan_of(coeffs, lane.case),
                None if energy is None else _plan_of(energy, lane.case),
                num_requests=num_requests,
                concurrency=lane.gate,
                initial_status=lane.status,
            )
        )
    return stack_lanes(built)


def _reference_lane(
    lane: _Lane,
    cases: Sequence[Case],
    coeffs: CostCoeffs,
    energy: EnergyCoeffs,
    max_iters: int,
) -> LaneResult:
    w = cases[lane.case].workload
    ids = lane.request_ids
    return simulate_reference(
        w.arrival_s[ids],
        w.prompt_tokens[ids],
        w.output_tokens[ids],
        lane.limits,
        _plan_of(coeffs, lane.case),
        concurrency=lane.gate,
        max_iters=max_iters,
        energy=_plan_of(energy, lane.case),
    )


def _plan_lanes(
    case_idx: int,
    case: Case,
    num_kv_blocks: int,
    is_oom: bool,
    coeffs: CostCoeffs | None = None,
) -> list[_Lane]:
    """Split a plan into lanes: one per data-parallel replica and pipeline virtual engine.

    Like vLLM 0.6, a replica with ``pp`` stages runs ``pp`` virtual engines, each with its own
    scheduler and ``1 / pp`` of the KV pages, so that ``pp`` batches are in flight at once.
    Requests go round-robin over replicas (request ``i`` to replica ``i mod dp``) and, inside
    a replica, over its virtual engines; vLLM picks the least-loaded virtual engine, which
    round-robin approximates when requests are alike. With the ``least_loaded`` router and
    the plan's cost ``coeffs``, replicas are chosen by :func:`least_loaded_assignment`.
    """
    dep, plan, workload = case
    dp, pp = int(plan[COL["dp"]]), int(plan[COL["pp"]])
    num_lanes = dp * pp
    limits = engine_limits(plan, num_kv_blocks // pp, dep.engine)
    if (
        dep.engine.router == "least_loaded"
        and dp > 1
        and workload.concurrency == 0
        and coeffs is not None
    ):
        replica = least_loaded_assignment(workload, dp, coeffs)
        # Inside a replica, its virtual engines still take turns.
        rank = np.zeros(workload.num_requests, np.int64)
        for d in range(dp):
            mine = np.flatnonzero(replica == d)
            rank[mine] = np.arange(len(mine))
        lane_of = replica + dp * (rank % pp)
    else:
        lane_of = np.arange(workload.num_requests) % num_lanes
    lanes = []
    for r in range(num_lanes):
        ids = np.flatnonzero(lane_of == r)
        gate = 0
        if workload.concurrency > 0:
            gate = workload.concurrency // num_lanes + (r < workload.concurrency % num_lanes)
            gate = max(int(gate), 1)
        if is_oom or limits["num_kv_blocks"] < 1:
            status = OOM
        elif num_rejected(workload.prompt_tokens[ids], workload.output_tokens[ids], limits):
            status = INFEASIBLE
        else:
            status = LIVE
        lanes.append(_Lane(case_idx, r, ids, gate, limits, status))
    return lanes


def least_loaded_assignment(workload: Workload, num_replicas: int, coeffs: CostCoeffs):
    """Replica of every request under join-the-least-loaded routing (``[N]`` int).

    A request counts as in flight on its replica from its arrival for its *unloaded* service
    time (its prefill, then its decode steps alone at its mean length), estimated from the
    plan's cost. Each arrival joins the replica with the fewest requests in flight, the
    lowest index on ties. A live router sees real queue lengths; this estimate ignores
    queueing, so it balances counts well and load only approximately.
    """
    prompt = workload.prompt_tokens.astype(np.float64)
    output = workload.output_tokens.astype(np.float64)
    prefill, _ = decode_time_parts_s(coeffs, prompt, 1.0, prompt * (prompt + 1.0) / 2.0, xp=np)
    step, slope = decode_time_parts_s(coeffs, 1.0, 1.0, 0.0, xp=np)
    duration = prefill + (output - 1.0) * (step + slope * (prompt + output / 2.0))
    ends: list[list[float]] = [[] for _ in range(num_replicas)]
    replica = np.zeros(workload.num_requests, np.int64)
    for i, (arrival, busy) in enumerate(zip(workload.arrival_s, duration)):
        for heap in ends:
            while heap and heap[0] <= arrival:
                heapq.heappop(heap)
        choice = min(range(num_replicas), key=lambda r: len(ends[r]))
        heapq.heappush(ends[choice], float(arrival + busy))
        replica[i] = choice
    return replica


def _deployment_groups(cases: Sequence[Case]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, case in enumerate(cases):
        dep = case.deployment
        groups.setdefault((dep.model, dep.gpu, dep.gpus_per_node), []).append(i)
    return groups


def _plan_of(coeffs, index):
    """One plan's (or, with an index array, some plans') constants of a batch."""
    return jax.tree_util.tree_map(lambda x: x[index], coeffs)


def _in_case_order(blocks: list, case_ids: list[np.ndarray]):
    """Concatenate per-group constants (batch ``[len(ids)]`` each) into case order."""
    order = np.argsort(np.concatenate(case_ids), kind="stable")
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs)[order], *blocks)


def case_coeffs(cases: Sequence[Case], hw: HardwareParams) -> CostCoeffs:
    """Cost coefficients of every case, batch ``[C]`` (slopes ``[C, K]``), float64.

    Pure JAX in ``hw``, so calibration can differentiate through it.
    """
    blocks, case_ids = [], []
    for (model, gpu, gpus_per_node), idx in _deployment_groups(cases).items():
        plans = np.stack([np.asarray(cases[i].plan, np.int32) for i in idx])
        blocks.append(cost_coeffs(plans, model, gpu, hw, gpus_per_node=gpus_per_node))
        case_ids.append(np.asarray(idx))
    return _in_case_order(blocks, case_ids)


def case_energy(cases: Sequence[Case]) -> EnergyCoeffs:
    """Power-model constants of every case, batch ``[C]``, float64 NumPy."""
    blocks, case_ids = [], []
    for (model, gpu, _), idx in _deployment_groups(cases).items():
        plans = np.stack([np.asarray(cases[i].plan, np.int32) for i in idx])
        clocks = plans[:, COL["gpu_clock_mhz"]]
        for clock in np.unique(clocks):
            sel = np.flatnonzero(clocks == clock)
            blocks.append(energy_coeffs(plans[sel], model, gpu, clock_mhz=float(clock) or None))
            case_ids.append(np.asarray(idx)[sel])
    return jax.tree_util.tree_map(np.asarray, _in_case_order(blocks, case_ids))


def prepare_lanes(
    cases: Sequence[Case], coeffs: CostCoeffs | None = None
) -> tuple[list[_Lane], list[dict[str, float]]]:
    """Memory of every case and its lanes (replicas x virtual engines), in case order.

    ``coeffs`` (batch ``[C]``, see :func:`case_coeffs`) lets cost-aware routers place
    requests.
    """
    memory: list[dict[str, float]] = [{} for _ in cases]
    lanes_by_case: list[list[_Lane]] = [[] for _ in cases]
    for (model, gpu, _), idx in _deployment_groups(cases).items():
        plans = np.stack([np.asarray(cases[i].plan, np.int32) for i in idx])
        mem = memory_plan(plans, model, gpu)
        for j, i in enumerate(idx):
            memory[i] = {
                "weight_gb_per_gpu": float(mem.weight_bytes[j]) / 1e9,
                "activation_gb_per_gpu": float(mem.activation_bytes[j]) / 1e9,
                "kv_gb_per_gpu": float(max(mem.kv_bytes[j], 0.0)) / 1e9,
                "num_kv_blocks": int(mem.num_kv_blocks[j]),
            }
            lanes_by_case[i] = _plan_lanes(
                i,
                cases[i],
                int(mem.num_kv_blocks[j]),
                bool(mem.is_oom[j]),
                None if coeffs is None else _plan_of(coeffs, i),
            )
    return [lane for lanes in lanes_by_case for lane in lanes], memory


def evaluate_cases(
    cases: Sequence[Case],
    hw: HardwareParams | None = None,
    *,
    max_iters: int = DEFAULT_MAX_ITERS,
    lane_chunk: int = DEFAULT_LANE_CHUNK,
    progress=None,
    per_replica: bool = False,
    use_reference: bool = False,
    slo: SLO | None = None,
) -> tuple[list[dict[str, Any]], RunStats]:
    """Simulate every case and return one metrics dict per case, in order.

    Cases may mix deployments and workloads: their lanes share padded shapes and run through
    the same compiled engine.

    Args:
        cases: the cases.
        hw: calibratable hardware multipliers (defaults if ``None``).
        max_iters: iteration cap per replica; lanes that hit it get ``MAX_ITERS``.
        lane_chunk: lanes per engine call; bounds peak memory.
        progress: optional callable ``progress(done_lanes, total_lanes)``.
        per_replica: also return each replica's metrics under ``"replicas"``.
        slo: latency targets; adds ``slo_attainment`` and ``goodput_req_s``.
        use_reference: simulate with the plain-Python reference instead of the JAX engine
            (slow; for differential tests and the speed benchmark).

    Returns:
        ``(results, stats)``: per case a dict with ``status``, the metrics of
        :data:`apex_jax.metrics.METRIC_KEYS`, the plan, memory and engine counters.
    """
    stats = RunStats()
    start = time.perf_counter()
    hw = default_hardware_params() if hw is None else hw
    coeffs = jax.tree_util.tree_map(
        lambda x: np.asarray(x, np.float64), case_coeffs(cases, hw)
    )
    energy = case_energy(cases)
    lanes, memory = prepare_lanes(cases, coeffs)
    stats.num_lanes = len(lanes)

    live = [lane for lane in lanes if lane.status == LIVE]
    num_requests = _next_pow2(max([len(lane.request_ids) for lane in lanes] + [1]), 16)
    max_slots = _next_pow2(max([lane.limits["max_num_seqs"] for lane in live] + [1]), 8)
    per_lane: dict[int, LaneResult] = {}
    stats.prepare_s = time.perf_counter() - start
    # Few requests are in the system at once on most traces, so every lane starts with few
    # slots; a lane that overflows them stops and reruns with four times as many, up to its
    # max_num_seqs. Lanes that never overflow are exact, so results do not depend on this.
    num_slots = min(INITIAL_SLOTS, max_slots)
    pending = live
    if use_reference:
        t0 = time.perf_counter()
        for lane in live:
            per_lane[id(lane)] = _reference_lane(lane, cases, coeffs, energy, max_iters)
        stats.run_s += time.perf_counter() - t0
        pending = []
    while pending:
        overflowed = []
        for begin in range(0, len(pending), lane_chunk):
            part = pending[begin : begin + lane_chunk]
            chunk = min(lane_chunk, _next_pow2(len(part), jax.local_device_count()))
            padded = part + [part[-1]._replace(status=OK)] * (chunk - len(part))
            inputs = _lane_arrays(padded, cases, coeffs, num_requests, energy)
            try:
                runner = _compiled_runner(inputs, num_slots, max_iters, stats)
                t0 = time.perf_counter()
                out = jax.device_get(runner(inputs))
            except Exception as err:
                # Inputs were validated before tracing, so a failure here is a bug in
                # apex_jax, not bad input: keep it distinct so that it shows a traceback.
                raise EngineError(f"the engine failed on valid inputs: {err}") from err
            stats.run_s += time.perf_counter() - t0
            stats.num_chunks += 1
            for j, lane in enumerate(part):
                status = int(out.status[j])
                if status == SLOT_OVERFLOW:
                    overflowed.append(lane)
                    continue
                per_lane[id(lane)] = LaneResult(
                    status,
                    out.first_token_s[j],
                    out.finish_s[j],
                    int(out.num_iters[j]),
                    int(out.num_preemptions[j]),
                    float(out.dynamic_energy_j[j]),
                )
            if progress is not None:
                progress(len(per_lane), len(live))
        pending = overflowed
        num_slots = min(num_slots * 4, max_slots)

    by_case: dict[int, list[_Lane]] = {}
    for lane in lanes:
        by_case.setdefault(lane.case, []).append(lane)
    results = []
    for i, case in enumerate(cases):
        results.append(_case_result(case, by_case[i], per_lane, memory[i], per_replica, slo))
    return results, stats


def _case_result(
    case: Case,
    lanes: list[_Lane],
    per_lane: dict,
    memory: dict,
    per_replica: bool,
    slo: SLO | None = None,
) -> dict:
    w = case.workload
    n = w.num_requests
    arrival = np.array(w.arrival_s, np.float64)
    first = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    statuses, iters, preemptions, dynamic_energy_j = [], 0, 0, 0.0
    for lane in lanes:
        if id(lane) not in per_lane:
            statuses.append(lane.status)
            continue
        status, f_tok, f_fin, n_it, n_pre, dynamic_j = per_lane[id(lane)]
        dynamic_energy_j += dynamic_j
        statuses.append(status)
        ids = lane.request_ids
        first[ids] = f_tok[: len(ids)]
        finish[ids] = f_fin[: len(ids)]
        if lane.gate > 0:
            arrival[ids] = closed_loop_arrivals(finish[ids], lane.gate)
        iters = max(iters, n_it)
        preemptions += n_pre
    # A plan is as good as its worst replica: any failing replica fails the plan.
    status = max(statuses, key=lambda s: (s != OK, s))
    result = summarize_requests(arrival, first, finish, w.output_tokens, status, slo)
    if per_replica:
        # Lane r serves DP replica r mod dp (its virtual engines are the other lanes).
        dp = int(case.plan[COL["dp"]])
        result["replicas"] = []
        for d in range(dp):
            mine = [i for i, lane in enumerate(lanes) if lane.replica % dp == d]
            ids = np.sort(np.concatenate([lanes[i].request_ids for i in mine]))
            replica_status = max((statuses[i] for i in mine), key=lambda s: (s != OK, s))
            result["replicas"].append(
                summarize_requests(
                    arrival[ids], first[ids], finish[ids], w.output_tokens[ids], replica_status
                )
            )
    result.update(plan_to_dict(case.plan))
    result["plan"] = describe_plan(case.plan, case.deployment.model)
    if result["status"] == "OK":
        # Every GPU of the plan draws idle power for the whole makespan; iterations add
        # their dynamic power on top (apex_jax.cost.energy).
        dep = case.deployment
        num_gpus = int(case.plan[COL["dp"]] * case.plan[COL["tp"]] * case.plan[COL["pp"]])
        energy_j = dynamic_energy_j + num_gpus * dep.gpu.idle_w * result["makespan_s"]
        result["energy_j"] = energy_j
        result["energy_per_output_token_j"] = energy_j / float(np.sum(w.output_tokens))
        result["avg_power_w"] = energy_j / result["makespan_s"]
    else:
        result["energy_j"] = result["energy_per_output_token_j"] = float("nan")
        result["avg_power_w"] = float("nan")
    result["num_iters_max_replica"] = iters
    result["num_preemptions"] = preemptions
    result.update(memory)
    return result


def evaluate_plans(
    plans: np.ndarray,
    deployment: Deployment,
    workload: Workload,
    hw: HardwareParams | None = None,
    **kwargs,
) -> tuple[list[dict[str, Any]], RunStats]:
    """Evaluate every row of a plan tensor for one deployment and workload."""
    cases = [Case(deployment, np.asarray(row, np.int32), workload) for row in np.asarray(plans)]
    return evaluate_cases(cases, hw, **kwargs)
