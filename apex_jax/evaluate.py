"""The one place where plans are batched: lanes, lane batches, the jitted engine and results.

A *lane* is one engine instance of one case: one pipeline virtual engine of a data-parallel
replica of its plan (a replica without pipeline parallelism has one). The virtual engines of
a replica share its pipeline stages, so the engine simulates them together, as one row of
``V`` lanes (:func:`apex_jax.simulator.run_lanes`). The pipeline from cases to metrics:

- :func:`split_lanes` sizes every plan's memory and splits its requests over its lanes;
- :func:`build_lane_batch` stacks the lanes of replicas into a :class:`LaneBatch` of padded
  arrays ``[R, V, ...]``, with every lane's cost and power constants gathered from per-case
  tables;
- :func:`run_batch` simulates a batch: pure JAX, so the serving fit can trace it inside its
  gradient; :func:`simulate_batch` is the one place it is compiled (once per shape, cached)
  and split across every local device;
- :func:`evaluate_cases` runs live lanes in fixed-size chunks through
  :func:`simulate_batch`, so peak memory depends on the chunk and not on the number of
  plans, reruns lanes that outgrow their slots, and turns lanes' results into one metrics
  dict per case.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import heapq
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from apex_jax.background import in_background
from apex_jax.cost.energy import EnergyCoeffs, energy_coeffs
from apex_jax.cost.iteration import CostCoeffs, cost_coeffs_ahead, is_traced, iteration_time_s
from apex_jax.cost.parallel import placement
from apex_jax.deployment import Case, Deployment
from apex_jax.engine_config import EngineConfig
from apex_jax.hardware import GpuSpec, HardwareParams, default_hardware_params
from apex_jax.memory import memory_plan, startup_checks, startup_refusals
from apex_jax.metrics import (
    SLO,
    WORK_KEYS,
    summarize_requests,
    work_metrics,
)
from apex_jax.model_spec import ModelSpec
from apex_jax.multihost import allgather_objects, my_share, process_count
from apex_jax.plans import COL, describe_plan, plan_to_dict, stage_layers
from apex_jax.reference import REJECTION_REASONS, rejected_requests, simulate_replica_reference
from apex_jax.simulator import (
    LaneInputs,
    LaneResult,
    make_lane_inputs,
    run_lanes,
    stack_lanes,
)
from apex_jax.status import INFEASIBLE, LIVE, MAX_ITERS, OK, OOM, SLOT_OVERFLOW, status_name
from apex_jax.workload import Workload

__all__ = [
    "DEFAULT_LANE_CHUNK",
    "DEFAULT_MAX_ITERS",
    "CaseLanes",
    "EngineError",
    "Lane",
    "LaneBatch",
    "RunStats",
    "build_lane_batch",
    "case_coeffs",
    "case_coeffs_ahead",
    "case_energy",
    "engine_limits",
    "evaluate_cases",
    "evaluate_plans",
    "least_loaded_assignment",
    "num_compiled",
    "oom_message",
    "oom_reason",
    "rejection_reason",
    "replica_groups",
    "run_batch",
    "set_case_constants",
    "simulate_batch",
    "slot_capacity",
    "split_lanes",
]

_LOG = logging.getLogger(__name__)

DEFAULT_MAX_ITERS = 20_000_000
# Replicas per chunk. A chunk steps until its longest replica is done, every replica paying
# for every step, so chunks of 128 group replicas of similar length more tightly than 256:
# 0.7 of the engine's CPU time on the default bench case, 0.9 on the default search's plans.
DEFAULT_LANE_CHUNK = 128
INITIAL_SLOTS = 32
# Chunks have at least this many lanes (padding lanes are finished and cost little), so that
# the small batches of a rate search reuse a few compiled shapes instead of one per size.
MIN_CHUNK_LANES = 16
# Pipelines up to this deep fill a chunk with lane_chunk replicas; deeper ones with fewer.
_SHALLOW_DEPTH = 8


class EngineError(RuntimeError):
    """The compiled engine failed on inputs that passed validation: a bug to report."""


@dataclasses.dataclass
class RunStats:
    """Where the time of an evaluation went (seconds) and how big it was."""

    num_lanes: int = 0
    num_chunks: int = 0
    compile_s: float = 0.0  # compiling the engine, whether waited for or not
    # of compile_s: the part that ran in the background while lanes were compared and batched
    compile_hidden_s: float = 0.0
    run_s: float = 0.0
    prepare_s: float = 0.0  # cost building, memory and lanes, before the engine runs
    cost_s: float = 0.0  # of prepare_s: the plans' cost and energy coefficients
    num_identical_replicas: int = 0  # live lanes copied from an identical lane of their case
    num_symmetric_plans: int = 0  # cases whose every live lane copies another case's lane
    # (requests, virtual engines) per lane of the largest padded batch: a later evaluation
    # given it as lane_shape reuses the same compiled engines.
    lane_shape: tuple[int, int] = (0, 0)
    num_unbound_lanes: int = 0  # live lanes that took the run of limits that never bound


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


class Lane(NamedTuple):
    """One engine instance of a case; static metadata, never traced."""

    case: int  # index of its case
    replica: int  # the data-parallel replica it belongs to
    request_ids: np.ndarray  # [n] int, the case's requests it serves, by arrival
    gate: int  # closed-loop clients bound to this lane; 0 for open loop
    limits: dict  # engine limits (see engine_limits)
    status: int  # LIVE, or OK / OOM / INFEASIBLE decided before simulation
    rejected: np.ndarray  # [N] int, rejection code of every request of the case (0: served)
    reason: str = ""  # why OOM or INFEASIBLE: which request, which limit, by how much
    virtual_engine: int = 0  # its place among the replica's pp virtual engines
    stage_layers: tuple[int, ...] = (1,)  # [pp] layers of each pipeline stage of the replica
    # [n] int64, prompt tokens of each request found in the prefix cache, whose capacity is
    # the lane's own KV pages (Workload.cached_prompt_tokens): fixed with the lane, so a
    # probe that loosens its limits (_unbound_probes) keeps its members' hits.
    cached_tokens: np.ndarray | None = None


class CaseLanes(NamedTuple):
    """What :func:`split_lanes` gives: the lanes of every case and each case's memory."""

    lanes: list[Lane]  # [L] every case's lanes, in case order
    memory: list[dict[str, float]]  # [C] per-GPU memory of each case's plan


class LaneBatch(NamedTuple):
    """Replicas of lanes stacked for the engine; a pytree of arrays, so it can be a jit
    argument. Row ``r`` holds the lanes of group ``r`` of :func:`replica_groups`, padded
    with lanes that have no requests."""

    inputs: LaneInputs  # fields [R, V, ...]
    lane_case: np.ndarray  # [R, V] int32, each lane's case: its row in per-case constants


def oom_reason(case: Case, weight_bytes: float, activation_bytes: float, kv_bytes: float) -> str:
    """Why a plan does not fit, from its per-GPU memory (see :class:`~apex_jax.memory.MemoryPlan`)."""
    dep = case.deployment
    util = case.plan[COL["gpu_mem_util_permille"]] / 1000.0
    return (
        f"plan does not fit: {weight_bytes / 1e9:.1f} GB of weights and "
        f"{activation_bytes / 1e9:.1f} GB of "
        f"activations per GPU leave no KV page in {util:.2f} x "
        f"{dep.gpu.hbm_capacity_bytes / 1e9:.1f} GB of {dep.gpu.name} (short by "
        f"{max(-kv_bytes, 0.0) / 1e9:.1f} GB): raise tp or pp, use lower-precision weights, or "
        "lower max_num_batched_tokens"
    )


def oom_message(case: Case) -> str | None:
    """Why ``case``'s plan leaves no room for the KV cache, in one line; None when it fits."""
    mem = memory_plan(case.plan[None, :], case.deployment.model, case.deployment.gpu)
    if not mem.is_oom[0]:
        return None
    return oom_reason(case, mem.weight_bytes[0], mem.activation_bytes[0], mem.kv_bytes[0])


def rejection_reason(workload: Workload, rejected: np.ndarray, limits: Mapping) -> str:
    """Why requests are rejected, one clause per limit: how many, the first such request,
    the limit it breaks and by how much (empty when every request is served).

    Args:
        workload: the case's workload.
        rejected: ``[N]`` rejection code of every request (:func:`rejected_requests`).
        limits: the engine limits of a lane (see :func:`engine_limits`).
    """
    clauses = []
    for code in REJECTION_REASONS:
        which = np.flatnonzero(rejected == code)
        if not len(which):
            continue
        i = int(which[0])
        p, o = int(workload.prompt_tokens[i]), int(workload.output_tokens[i])
        if code == 1:
            cap = int(limits["max_model_len"])
            why = f"is {p + o} tokens (prompt {p} + output {o}), over max_model_len={cap} by {p + o - cap}"
        elif code == 2:
            usable = int(limits["num_kv_blocks"]) - int(limits["watermark_blocks"])
            pages = -(-(p + o - 1) // int(limits["block_size"]))
            why = (
                f"needs {pages} KV pages of {limits['block_size']} tokens ({p} + {o} tokens) but "
                f"a replica can give one request {usable}: {pages - usable} pages too few"
            )
        else:
            budget = int(limits["max_num_batched_tokens"])
            why = (
                f"has a {p}-token prompt, over the token budget max_num_batched_tokens={budget} "
                f"by {p - budget}, and chunked prefill is off"
            )
        more = f" ({len(which)} requests in all)" if len(which) > 1 else ""
        clauses.append(f"request {i} {why}{more}")
    return "; ".join(clauses)


def _plan_lanes(
    case_idx: int,
    case: Case,
    num_kv_blocks: int,
    oom: str,
    refusal: str = "",
    coeffs: CostCoeffs | None = None,
) -> list[Lane]:
    """Split a plan into lanes: one per data-parallel replica and pipeline virtual engine.

    Like vLLM 0.6, a replica with ``pp`` stages runs ``pp`` virtual engines, each with its own
    scheduler and ``1 / pp`` of the KV pages, so that ``pp`` batches are in flight at once;
    they share the stages, whose layers :func:`apex_jax.plans.stage_layers` gives.
    Requests go round-robin over replicas (request ``i`` to replica ``i mod dp``) and, inside
    a replica, over its virtual engines; vLLM picks the least-loaded virtual engine, which
    round-robin approximates when requests are alike. With the ``least_loaded`` router and
    the plan's cost ``coeffs``, replicas are chosen by :func:`least_loaded_assignment`.
    ``oom`` is why the plan does not fit, empty if it does; ``refusal`` why vLLM would not
    start it (:func:`apex_jax.memory.startup_refusals`), which makes it INFEASIBLE unsimulated.

    A closed loop's ``concurrency`` clients are the benchmark's, shared by the whole plan:
    client ``k`` is bound to lane ``k mod (dp pp)`` and sends the requests ``i`` with
    ``i mod concurrency == k``, so each lane serves a closed loop of its own clients and a
    lane without clients gets no requests. Requests the engine rejects
    (:func:`apex_jax.reference.rejected_requests`) are left out of every lane.
    """
    dep, plan, workload = case
    dp, pp = int(plan[COL["dp"]]), int(plan[COL["pp"]])
    num_lanes = dp * pp
    layers = tuple(stage_layers(dep.model.num_layers, pp))
    limits = engine_limits(plan, num_kv_blocks // pp, dep.engine)
    rejected = rejected_requests(workload.prompt_tokens, workload.output_tokens, limits)
    clients = np.zeros(num_lanes, np.int64)
    if workload.concurrency > 0:
        clients = np.bincount(np.arange(workload.concurrency) % num_lanes, minlength=num_lanes)
        lane_of = np.arange(workload.num_requests) % workload.concurrency % num_lanes
    elif dep.engine.router == "least_loaded" and dp > 1 and coeffs is not None:
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
        ids = np.flatnonzero((lane_of == r) & (rejected == 0))
        if refusal:
            status, reason = INFEASIBLE, refusal
        elif oom or limits["num_kv_blocks"] < 1:
            status, reason = OOM, oom or "a virtual engine gets no KV page: lower pp"
        elif np.all(rejected > 0):
            status, reason = (
                INFEASIBLE,
                "every request is rejected: " + rejection_reason(workload, rejected, limits),
            )
        else:
            status, reason = (LIVE if len(ids) else OK), ""
        capacity_tokens = int(limits["num_kv_blocks"]) * int(limits["block_size"])
        lanes.append(
            Lane(
                case_idx,
                r % dp,
                ids,
                int(clients[r]),
                limits,
                status,
                rejected,
                reason,
                virtual_engine=r // dp,
                stage_layers=layers,
                cached_tokens=workload.cached_prompt_tokens(ids, int(clients[r]), capacity_tokens),
            )
        )
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
    prefill = iteration_time_s(coeffs, prompt, 1.0, prompt * (prompt + 1.0) / 2.0, 0.0, 0.0, xp=np)
    step = iteration_time_s(coeffs, 1.0, 1.0, 0.0, 1.0, prompt + output / 2.0, xp=np)
    duration = prefill + (output - 1.0) * step
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


class _PlanGroup(NamedTuple):
    """Cases that the cost and memory models take in one vectorised call."""

    model: ModelSpec
    gpu: GpuSpec
    gpus_per_node: int
    case_ids: np.ndarray  # [n] int, indices into the cases
    plans: np.ndarray  # [n, F] int32, their plan rows


def _plan_groups(cases: Sequence[Case]) -> list[_PlanGroup]:
    """The cases grouped by model, GPU and node size, with their plans stacked."""
    groups: dict[tuple, list[int]] = {}
    for i, case in enumerate(cases):
        dep = case.deployment
        groups.setdefault((dep.model, dep.gpu, dep.gpus_per_node), []).append(i)
    return [
        _PlanGroup(
            *key, np.asarray(idx), np.stack([np.asarray(cases[i].plan, np.int32) for i in idx])
        )
        for key, idx in groups.items()
    ]


def _take(constants, index):
    """Rows ``index`` of a batch of constants (any pytree with a leading batch axis)."""
    return jax.tree_util.tree_map(lambda x: x[index], constants)


def _in_case_order(blocks: list, case_ids: list[np.ndarray]):
    """Concatenate per-group constants (batch ``[len(ids)]`` each) into case order."""
    order = np.argsort(np.concatenate(case_ids), kind="stable")
    # Host arrays stay on the host: eager JAX would compile for every shape of plans.
    xp = jnp if is_traced(blocks) else np
    return jax.tree_util.tree_map(lambda *xs: xp.concatenate(xs)[order], *blocks)


def case_coeffs(cases: Sequence[Case], hw: HardwareParams) -> CostCoeffs:
    """Cost coefficients of every case, batch ``[C]`` (slopes ``[C, K]``), float64.

    Pure JAX in ``hw``, so calibration can differentiate through it.
    """
    return case_coeffs_ahead(cases, hw)()


def case_coeffs_ahead(cases: Sequence[Case], hw: HardwareParams) -> Callable[[], CostCoeffs]:
    """:func:`case_coeffs`, the pricing compiling in the background
    (:func:`~apex_jax.cost.iteration.cost_coeffs_ahead`): the returned function waits for
    it and gives the coefficients."""
    groups = _plan_groups(cases)
    # Engines of different versions pay different host costs and sampler sorts.
    engines = [case.deployment.engine for case in cases]
    keys = ("iteration_overhead_s", "host_s_per_seq", "eager_s_per_layer", "max_graph_batch")
    keys += ("sampler_sort_s_per_logit",)
    host = {key: np.array([getattr(e, key) for e in engines], np.float64) for key in keys}
    pending = [
        cost_coeffs_ahead(
            g.plans,
            g.model,
            g.gpu,
            hw,
            gpus_per_node=g.gpus_per_node,
            **{key: values[g.case_ids] for key, values in host.items()},
        )
        for g in groups
    ]
    return lambda: _in_case_order([finish() for finish in pending], [g.case_ids for g in groups])


def case_energy(cases: Sequence[Case]) -> EnergyCoeffs:
    """Power-model constants of every case, batch ``[C]``, float64 NumPy."""
    blocks, case_ids = [], []
    for g in _plan_groups(cases):
        clocks = g.plans[:, COL["gpu_clock_mhz"]]
        for clock in np.unique(clocks):
            sel = np.flatnonzero(clocks == clock)
            blocks.append(
                energy_coeffs(g.plans[sel], g.model, g.gpu, clock_mhz=float(clock) or None)
            )
            case_ids.append(g.case_ids[sel])
    return jax.tree_util.tree_map(np.asarray, _in_case_order(blocks, case_ids))


def split_lanes(cases: Sequence[Case], coeffs: CostCoeffs | None = None) -> CaseLanes:
    """Memory of every case and its lanes (replicas x virtual engines), in case order.

    ``coeffs`` (batch ``[C]``, see :func:`case_coeffs`) lets cost-aware routers place
    requests.
    """
    memory: list[dict[str, float]] = [{} for _ in cases]
    lanes_by_case: list[list[Lane]] = [[] for _ in cases]
    for g in _plan_groups(cases):
        mem = memory_plan(g.plans, g.model, g.gpu)
        lengths = [cases[i].deployment.engine.max_model_len for i in g.case_ids]
        refusals = startup_refusals(startup_checks(g.plans, mem, np.asarray(lengths)), g.plans)
        for j, i in enumerate(g.case_ids):
            memory[i] = {
                "weight_gb_per_gpu": float(mem.weight_bytes[j]) / 1e9,
                "activation_gb_per_gpu": float(mem.activation_bytes[j]) / 1e9,
                "kv_gb_per_gpu": float(max(mem.kv_bytes[j], 0.0)) / 1e9,
                "num_kv_blocks": int(mem.num_kv_blocks[j]),
            }
            oom = ""
            if mem.is_oom[j]:
                oom = oom_reason(
                    cases[i], mem.weight_bytes[j], mem.activation_bytes[j], mem.kv_bytes[j]
                )
            lanes_by_case[i] = _plan_lanes(
                int(i),
                cases[i],
                int(mem.num_kv_blocks[j]),
                oom,
                refusals[j],
                None if coeffs is None else _take(coeffs, i),
            )
    return CaseLanes([lane for lanes in lanes_by_case for lane in lanes], memory)


class _EngineShape(NamedTuple):
    """The padded shapes of an evaluation's engine runs: one per slot capacity."""

    num_replicas: int  # R, replicas per chunk in the first pass of every engine call
    num_engines: int  # V, virtual engines per replica (the deepest pipeline's)
    num_requests: int  # N, requests per lane
    num_slots: int  # slots of the first pass
    max_slots: int  # slots that hold every live lane's max_num_seqs
    per_chunk: int  # most replicas a chunk holds


def _chunk_size(num_replicas: int, per_chunk: int) -> int:
    """Replicas per chunk for ``num_replicas`` pending, at most ``per_chunk``: a power of two
    (padding replicas start finished and cost little, a new shape compiles for seconds)."""
    smallest = max(jax.local_device_count(), MIN_CHUNK_LANES)
    return min(per_chunk, _next_pow2(num_replicas, smallest))


def _engine_shape(lanes: Sequence[Lane], lane_chunk: int, lane_shape: tuple[int, int]):
    """The :class:`_EngineShape` of an evaluation's ``lanes``: from every live lane, so that
    its engine calls (probes, the rest) share one compiled engine, which can therefore
    compile before the first call (:func:`_compile_ahead`)."""
    num_requests = _next_pow2(max([len(lane.request_ids) for lane in lanes] + [1]), 16)
    every = _live_groups(lanes, [k for k, lane in enumerate(lanes) if lane.status == LIVE])
    depth = max([len(g) for g in every] + [1, lane_shape[1]])
    per_chunk = max(lane_chunk * min(depth, _SHALLOW_DEPTH) // depth, 1)
    max_slots = slot_capacity([lanes[k] for g in every for k in g])
    return _EngineShape(
        num_replicas=_chunk_size(len(every), per_chunk),
        num_engines=depth,
        num_requests=max(num_requests, lane_shape[0]),
        num_slots=min(INITIAL_SLOTS, max_slots),
        max_slots=max_slots,
        per_chunk=per_chunk,
    )


def slot_capacity(lanes: Sequence[Lane]) -> int:
    """Slots that hold every lane's largest batch: ``max_num_seqs`` rounded up to a power of
    two (a static shape, so few distinct values)."""
    return _next_pow2(max([lane.limits["max_num_seqs"] for lane in lanes] + [1]), 8)


def set_case_constants(
    batch: LaneBatch, coeffs: CostCoeffs | None = None, energy: EnergyCoeffs | None = None
) -> LaneBatch:
    """``batch`` with every lane's cost (and power) constants taken from per-case tables.

    Args:
        batch: the lanes.
        coeffs: cost coefficients of every case, batch ``[C]`` (see :func:`case_coeffs`);
            ``None`` keeps the batch's own. NumPy or JAX (traced in the serving fit).
        energy: power-model constants of every case, batch ``[C]``; ``None`` keeps them.
    """
    inputs = batch.inputs
    if coeffs is not None:
        inputs = inputs._replace(coeffs=_take(coeffs, batch.lane_case))
    if energy is not None:
        inputs = inputs._replace(energy=_take(energy, batch.lane_case))
    return batch._replace(inputs=inputs)


def replica_groups(lanes: Sequence[Lane]) -> list[list[int]]:
    """The lanes (indices into ``lanes``) of each replica, by virtual engine, in the order
    their replicas first appear."""
    groups: dict[tuple[int, int], list[int]] = {}
    for k, lane in enumerate(lanes):
        groups.setdefault((lane.case, lane.replica), []).append(k)
    return [sorted(g, key=lambda k: lanes[k].virtual_engine) for g in groups.values()]


def build_lane_batch(
    cases: Sequence[Case],
    lanes: Sequence[Lane],
    *,
    num_requests: int | None = None,
    num_engines: int | None = None,
    num_replicas: int | None = None,
    coeffs: CostCoeffs | None = None,
    energy: EnergyCoeffs | None = None,
) -> LaneBatch:
    """Stack the replicas of ``lanes`` (:func:`replica_groups`) into padded NumPy arrays.

    Args:
        cases: the cases the lanes belong to.
        lanes: the lanes (see :func:`split_lanes`), every virtual engine of each replica.
        num_requests: padded request capacity ``N`` of every lane (a static shape); default
            the longest lane's requests rounded up to a power of two.
        num_engines: padded virtual engines ``V`` per replica (a static shape); default the
            deepest pipeline's.
        num_replicas: padded replicas ``R`` (a static shape); the replicas past the lanes'
            are copies of the last that start finished. Default: the lanes' replicas.
        coeffs, energy: per-case constants, batch ``[C]`` (see :func:`set_case_constants`);
            zeros where ``None``, for a caller that passes them to :func:`run_batch`.
    """
    if num_requests is None:
        num_requests = _next_pow2(max([len(lane.request_ids) for lane in lanes] + [1]), 16)
    groups = replica_groups(lanes)
    if num_engines is None:
        num_engines = max([len(g) for g in groups] + [1])
    num_replicas = len(groups) if num_replicas is None else num_replicas
    zeros = CostCoeffs.zeros()
    made: list[LaneInputs] = []
    # [R, V] the made lane each engine copies, whether it is a padding engine
    source = np.zeros((num_replicas, num_engines), np.int64)
    is_padding = np.zeros((num_replicas, num_engines), bool)
    lane_case = np.zeros((num_replicas, num_engines), np.int32)
    for r, group in enumerate(groups):
        for k in group:
            lane = lanes[k]
            w = cases[lane.case].workload
            ids = lane.request_ids
            made.append(
                make_lane_inputs(
                    w.arrival_s[ids],
                    w.prompt_tokens[ids],
                    w.output_tokens[ids],
                    lane.limits,
                    zeros,
                    num_requests=num_requests,
                    concurrency=lane.gate,
                    delay_s=cases[lane.case].deployment.engine.frontend_delay_s,
                    think_frac=w.think_fractions(len(ids), lane.gate),
                    initial_status=lane.status,
                    stage_layers=lane.stage_layers,
                    num_stages=num_engines,
                    cached_tokens=lane.cached_tokens,
                )
            )
        # Padding engines copy the replica's last and serve nothing.
        source[r] = len(made) - len(group) + np.minimum(np.arange(num_engines), len(group) - 1)
        is_padding[r, len(group) :] = True
        lane_case[r] = lanes[group[0]].case
    last = len(groups) - 1
    source[last + 1 :], is_padding[last + 1 :] = source[last], is_padding[last]
    lane_case[last + 1 :] = lane_case[last]
    is_finished = is_padding.copy()
    is_finished[last + 1 :] = True
    # One gather per field from the lanes made: a stack of every engine's inputs costs a
    # NumPy call per engine and field, thousands per chunk.
    inputs = jax.tree_util.tree_map(lambda x: x[source], stack_lanes(made))
    inputs = inputs._replace(
        sent_s=np.where(is_padding[..., None], np.inf, inputs.sent_s),
        arrival_s=np.where(is_padding[..., None], np.inf, inputs.arrival_s),
        num_requests=np.where(is_padding, np.int32(0), inputs.num_requests),
        initial_status=np.where(is_finished, np.int32(OK), inputs.initial_status),
    )
    return set_case_constants(LaneBatch(inputs, lane_case), coeffs, energy)


def run_batch(
    batch: LaneBatch,
    coeffs: CostCoeffs | None = None,
    energy: EnergyCoeffs | None = None,
    *,
    num_slots: int,
    max_iters: int = DEFAULT_MAX_ITERS,
) -> LaneResult:
    """Simulate every replica of ``batch`` to completion; pure JAX, not jitted here.

    Args:
        batch: the replicas' lanes, ``[R, V, ...]``.
        coeffs, energy: per-case constants, batch ``[C]``, that replace the batch's own (see
            :func:`set_case_constants`); the serving fit passes them as traced arrays.
        num_slots: static slot capacity; a lane whose batch outgrows it ends
            ``SLOT_OVERFLOW`` (see :func:`slot_capacity`).
        max_iters: static iteration cap per replica; one that hits it ends ``MAX_ITERS``.

    Returns:
        :class:`~apex_jax.simulator.LaneResult`, fields ``[R, V, ...]``.
    """
    batch = set_case_constants(batch, coeffs, energy)
    return run_lanes(batch.inputs, num_slots=num_slots, max_iters=max_iters)


_COMPILED: dict[tuple, Any] = {}
# Engines compiling in the background (:func:`_compile_ahead`), by the key of _COMPILED.
_PENDING: dict[tuple, concurrent.futures.Future] = {}


def _compile_key(batch: LaneBatch, num_slots: int, max_iters: int) -> tuple:
    """What a compiled engine depends on: every input's shape and dtype, the static
    arguments, and the devices its lane axis splits over (every local device when the lanes
    divide evenly)."""
    leaves = jax.tree_util.tree_leaves(batch)
    count = jax.local_device_count()
    num_devices = count if batch.lane_case.shape[0] % count == 0 else 1
    return (tuple((x.shape, x.dtype) for x in leaves), num_slots, max_iters, num_devices)


def _compile(batch: LaneBatch, num_slots: int, max_iters: int) -> tuple[Any, float]:
    """:func:`run_batch` compiled for the shapes of ``batch`` (arrays or
    ``jax.ShapeDtypeStruct``) and the seconds it took.

    With several devices each runs its own outer loop on its own lanes (``shard_map``), so a
    device whose lanes are done stops instead of waiting on a global ``any(live)``.
    """
    start = time.perf_counter()
    num_devices = _compile_key(batch, num_slots, max_iters)[-1]
    run = functools.partial(run_batch, num_slots=num_slots, max_iters=max_iters)
    if num_devices > 1:
        mesh = jax.make_mesh(
            (num_devices,),
            ("lanes",),
            axis_types=(jax.sharding.AxisType.Auto,),
            devices=jax.local_devices()[:num_devices],
        )
        spec = jax.sharding.PartitionSpec("lanes")
        run = jax.shard_map(run, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
    lowered = jax.jit(run).lower(batch)
    traced_s = time.perf_counter() - start
    compiled = lowered.compile()
    elapsed_s = time.perf_counter() - start
    _LOG.info(
        "engine compiled for %d lanes x %d requests x %d slots: %.1f s (tracing %.1f s)",
        batch.lane_case.shape[0],
        batch.inputs.arrival_s.shape[-1],
        num_slots,
        elapsed_s,
        traced_s,
    )
    return compiled, elapsed_s


def _compile_ahead(batch: LaneBatch, num_slots: int, max_iters: int) -> None:
    """Start compiling the engine for the shapes of ``batch`` in a background thread, unless
    it is compiled or compiling: XLA releases the GIL while it compiles, so the host work
    before the first engine call (comparing lanes, building probes and lane batches) runs
    meanwhile on another core."""
    key = _compile_key(batch, num_slots, max_iters)
    if key in _COMPILED or key in _PENDING:
        return
    _PENDING[key] = in_background(
        lambda: _compile(batch, num_slots, max_iters), "apex-jax-compile"
    )


def _compiled_run(batch: LaneBatch, num_slots: int, max_iters: int, stats: RunStats):
    """:func:`run_batch` compiled for the shapes of ``batch`` (cached): the one compiling in
    the background if :func:`_compile_ahead` started it, else compiled now."""
    key = _compile_key(batch, num_slots, max_iters)
    if key not in _COMPILED:
        start = time.perf_counter()
        future = _PENDING.pop(key, None)
        if future is None:
            compiled, elapsed_s = _compile(batch, num_slots, max_iters)
        else:
            compiled, elapsed_s = future.result()
        _COMPILED[key] = compiled
        stats.compile_s += elapsed_s
        stats.compile_hidden_s += max(elapsed_s - (time.perf_counter() - start), 0.0)
    return _COMPILED[key]


def simulate_batch(
    batch: LaneBatch,
    *,
    num_slots: int,
    max_iters: int = DEFAULT_MAX_ITERS,
    stats: RunStats | None = None,
) -> LaneResult:
    """:func:`run_batch` on ``batch`` with its own constants, compiled once per shape: the
    one place the engine is jitted.

    Returns:
        :class:`~apex_jax.simulator.LaneResult` of NumPy arrays, fields ``[L, ...]``.

    Raises:
        EngineError: the engine failed on inputs that passed validation (a bug).
    """
    stats = RunStats() if stats is None else stats
    try:
        runner = _compiled_run(batch, num_slots, max_iters, stats)
        start = time.perf_counter()
        out = jax.device_get(runner(batch))
    except Exception as err:
        # Inputs were validated before tracing, so a failure here is a bug in apex_jax, not
        # bad input: keep it distinct so that it shows a traceback.
        raise EngineError(f"the engine failed on valid inputs: {err}") from err
    stats.run_s += time.perf_counter() - start
    stats.num_chunks += 1
    return out


def num_compiled() -> int:
    """How many engine executables this process has compiled (for recompilation tests)."""
    return len(_COMPILED)


def evaluate_cases(
    cases: Sequence[Case],
    hw: HardwareParams | None = None,
    *,
    max_iters: int = DEFAULT_MAX_ITERS,
    lane_chunk: int = DEFAULT_LANE_CHUNK,
    progress: Callable[[int, int], None] | None = None,
    per_replica: bool = False,
    per_request: bool = False,
    use_reference: bool = False,
    slo: SLO | None = None,
    coeffs: CostCoeffs | None = None,
    start_slots: Sequence[int] | None = None,
    lane_shape: tuple[int, int] = (0, 0),
) -> tuple[list[dict[str, Any]], RunStats]:
    """Simulate every case and return one metrics dict per case, in order.

    Cases may mix deployments and workloads: their lanes share padded shapes and run through
    the same compiled engine.

    Args:
        cases: the cases.
        hw: calibratable hardware multipliers (defaults if ``None``).
        max_iters: iteration cap per replica; lanes that hit it get ``MAX_ITERS``.
        lane_chunk: replicas per engine call (fewer for pipelines deeper than 8); bounds
            peak memory.
        progress: optional callable ``progress(done_lanes, total_lanes)``.
        per_replica: also return each replica's metrics under ``"replicas"``.
        per_request: also return the request times under ``"requests"``: ``arrival_s``,
            ``first_token_s``, ``finish_s`` and ``output_tokens``, each ``[N]``.
        slo: latency targets; adds :data:`apex_jax.metrics.SLO_KEYS`.
        use_reference: simulate with the plain-Python reference instead of the JAX engine
            (slow; for differential tests and the speed benchmark).
        coeffs: cost coefficients of the cases (batch ``[C]``, :func:`case_coeffs`) when the
            caller has them: they depend on the plans, not on the workloads, so a rate search
            reuses them; ``hw`` is then unused.
        start_slots: ``[C]`` slot capacity to start each case's lanes with (its
            ``num_slots`` at a lower arrival rate, say); smaller capacities are skipped.
            Results do not depend on it, only the time.
        lane_shape: (requests, virtual engines) to pad every lane to at least, so that
            evaluations of the same plans at other rates reuse the compiled engines
            (``stats.lane_shape`` of an earlier evaluation).

    Returns:
        ``(results, stats)``: per case a dict with ``status``, the metrics of
        :data:`apex_jax.metrics.METRIC_KEYS`, the plan, memory and engine counters
        (``num_slots``: the slot capacity its replicas completed with, 0 if none ran in
        the engine).
    """
    stats = RunStats()
    start = time.perf_counter()
    hw = default_hardware_params() if hw is None else hw
    if coeffs is None:
        priced = case_coeffs_ahead(cases, hw)
        if any(case.deployment.engine.router == "least_loaded" for case in cases):
            coeffs = priced()  # the router places requests by their cost
    energy = case_energy(cases)
    lanes_start = time.perf_counter()
    lanes, memory = split_lanes(cases, coeffs)
    starts = {} if start_slots is None else dict(enumerate(start_slots))
    # The costs' pricing compiles while the lanes are split and the engine is traced, and
    # the engine compiles while the lanes are compared and batched. In this order: XLA
    # compiles one program at a time, and the lanes' comparison needs the costs.
    shape = _start_engine(cases, lanes, lane_chunk, lane_shape, starts, max_iters, use_reference)
    lanes_s = time.perf_counter() - lanes_start
    if coeffs is None:
        coeffs = priced()
    coeffs = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), coeffs)
    stats.num_lanes = len(lanes)
    stats.prepare_s = time.perf_counter() - start
    stats.cost_s = stats.prepare_s - lanes_s
    live = [k for k, lane in enumerate(lanes) if lane.status == LIVE]
    constants = [c + e for c, e in zip(_case_digests(coeffs), _case_digests(energy))]
    source = _identical_lanes(cases, lanes, live, constants, stats)
    unique = [k for k in live if source[k] == k]
    slots_of: dict[int, int] = {}
    if progress is not None and unique:
        # Shown from the start: the first chunk's wait includes compiling the engine.
        progress(0, len(unique))

    def simulate(run_lanes: list[Lane], ks: list[int], done: int) -> dict[int, LaneResult]:
        if use_reference:
            return _run_reference(cases, run_lanes, ks, coeffs, energy, max_iters, stats)
        report = None if progress is None else lambda n, _: progress(done + n, len(unique))
        out, slots = _run_engine(
            cases,
            run_lanes,
            ks,
            shape,
            report,
            stats,
            coeffs=coeffs,
            energy=energy,
            max_iters=max_iters,
            start_slots=starts,
        )
        slots_of.update(slots)
        return out

    per_lane, taken = _share_unbound_runs(cases, lanes, unique, constants, simulate, stats)
    slots_of.update({k: slots_of[p] for k, p in taken.items() if p in slots_of})
    if progress is not None and unique:
        progress(len(per_lane), len(unique))
    rest = [k for k in unique if k not in per_lane]
    per_lane.update(simulate(lanes, rest, len(per_lane)))
    per_lane.update({k: per_lane[source[k]] for k in live if source[k] != k})
    slots_of.update({k: slots_of[source[k]] for k in live if source[k] in slots_of})
    by_case: list[list[int]] = [[] for _ in cases]
    for k, lane in enumerate(lanes):
        by_case[lane.case].append(k)
    results, summaries = [], {}
    for i, case in enumerate(cases):
        mine = [(lanes[k], per_lane.get(k)) for k in by_case[i]]
        results.append(
            _case_result(
                case, mine, memory[i], per_replica, per_request, slo, max_iters, summaries
            )
        )
        results[-1]["num_slots"] = max([slots_of.get(k, 0) for k in by_case[i]] + [0])
    return results, stats


def _case_digests(constants) -> list[bytes]:
    """One digest per case of a batch ``[C]`` of constants (every leaf's row, bit for bit)."""
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(constants)]
    rows = np.concatenate([x.reshape(len(x), -1).astype(np.float64) for x in leaves], axis=1)
    return [hashlib.sha256(row.tobytes()).digest() for row in rows]


# Engine limits that a run may not need in full (apex_jax.simulator.EngineState,
# ``*_needed``); the model length reaches the engine only through the requests served.
_SHARED_LIMITS = (
    "max_num_seqs",
    "max_num_batched_tokens",
    "num_kv_blocks",
    "watermark_blocks",
    "max_model_len",
)


def _replica_digests(
    cases, lanes, groups: list[list[int]], constants: list[bytes], ignore: Sequence[str] = ()
) -> list[bytes]:
    """One digest per replica (``groups``, lists of lane indices) of everything the engine
    sees of it: its case's cost and power ``constants`` (a digest per case), its stages, and
    per virtual engine the engine limits but ``ignore``, closed-loop clients and requests,
    arrival times and prefix-cache hits included."""
    digests = []
    for group in groups:
        head = lanes[group[0]]
        digest = hashlib.sha256(constants[head.case])
        digest.update(repr(head.stage_layers).encode())
        for k in group:
            lane = lanes[k]
            w = cases[lane.case].workload
            ids = lane.request_ids
            frontend_s = cases[lane.case].deployment.engine.frontend_delay_s
            limits = sorted((key, v) for key, v in lane.limits.items() if key not in ignore)
            knobs = (limits, lane.gate, lane.status, w.lockstep, frontend_s)
            digest.update(repr(knobs).encode())
            for column in (w.arrival_s, w.prompt_tokens, w.output_tokens):
                digest.update(np.ascontiguousarray(column[ids]).tobytes())
            digest.update(np.ascontiguousarray(lane.cached_tokens).tobytes())
        digests.append(digest.digest())
    return digests


def _identical_lanes(cases, lanes, live, constants: list[bytes], stats: RunStats) -> dict[int, int]:
    """The lane whose result each live lane takes: itself, or the lane in the same place of
    the first earlier replica with identical inputs (:func:`_replica_digests`), whose
    simulation is therefore identical: the engine is deterministic and a replica sees
    nothing but its inputs. Whole replicas compare, as their virtual engines share the
    stages. This collapses DP replicas that a workload splits evenly (a static batch, a
    closed loop of equal requests) and plans that differ only in what does not reach the
    engine. Counts both in ``stats``.
    """
    first: dict[bytes, list[int]] = {}
    source: dict[int, int] = {}
    groups = _live_groups(lanes, live)
    for digest, group in zip(_replica_digests(cases, lanes, groups, constants), groups):
        same = first.setdefault(digest, group)
        source.update(zip(group, same))
    source = {k: source[k] for k in live}
    copied_from: dict[int, set[int]] = {}
    for k in live:
        copied_from.setdefault(lanes[k].case, set()).add(lanes[source[k]].case)
    stats.num_identical_replicas += sum(
        1 for k in live if source[k] != k and lanes[source[k]].case == lanes[k].case
    )
    stats.num_symmetric_plans += sum(1 for case, src in copied_from.items() if case not in src)
    return source


class _Probe(NamedTuple):
    """A replica under the loosest limits of replicas equal but for their limits."""

    key: tuple  # the class and the limits
    lanes: list[Lane]  # [V] its virtual engines
    members: list[list[int]]  # the replicas (lane indices) that may take its run


def _unbound_probes(cases, lanes, unique, constants: list[bytes]) -> list[_Probe]:
    """Probes for the replicas of the ``unique`` lanes that equal another but for their
    engine limits (:data:`_SHARED_LIMITS`): per such class, the first replica's lanes under
    the most sequences, tokens and pages and the least watermark of any. Each member
    replica whose limits hold what the probe's run needed (:func:`_runs_the_same`) takes its
    run, exactly: under any limits at least those needs the engine decides the same at
    every step (:class:`apex_jax.simulator.EngineState`). Few requests in flight at once
    make most knobs of a plan space irrelevant, and then a class runs once instead of once
    per knob setting.
    """
    groups = _live_groups(lanes, unique)
    classes: dict[tuple, list[list[int]]] = {}
    for digest, group in zip(
        _replica_digests(cases, lanes, groups, constants, ignore=_SHARED_LIMITS), groups
    ):
        classes.setdefault((digest, _surely_needed(cases, lanes, group)), []).append(group)
    probes = []
    for digest, members in classes.items():
        if len(members) < 2:
            continue
        limits = [lanes[k].limits for group in members for k in group]
        loosest = {key: max(lim[key] for lim in limits) for key in _SHARED_LIMITS}
        loosest["watermark_blocks"] = min(lim["watermark_blocks"] for lim in limits)
        probe = [lanes[k]._replace(limits={**lanes[k].limits, **loosest}) for k in members[0]]
        key = (digest, tuple(sorted(loosest.items())))
        probes.append(_Probe(key, probe, members))
    return probes


def _surely_needed(cases, lanes, group: list[int]) -> tuple:
    """The limits of a replica (lane indices ``group``) that any run of it needs whole: a
    token budget below a prompt (it is admitted whole, or cut), and pages above the
    watermark that hold no more than the longest request (it holds all of its pages in its
    last decode, plus one free); ``None`` for the others. Only replicas equal in these can
    share a run, so they form their classes at once."""
    needed = []
    for k in group:
        lane = lanes[k]
        w, ids, lim = cases[lane.case].workload, lane.request_ids, lane.limits
        if not len(ids):
            needed.append(None)
            continue
        prompt = w.prompt_tokens[ids].astype(np.int64)
        longest = int(np.max(-(-(prompt + w.output_tokens[ids] - 1) // lim["block_size"])))
        budget = lim["max_num_batched_tokens"]
        pages = lim["num_kv_blocks"] - lim["watermark_blocks"]
        needed.append(
            (
                budget if budget < int(np.max(prompt)) else None,
                (lim["num_kv_blocks"], lim["watermark_blocks"]) if pages <= longest else None,
            )
        )
    return tuple(needed)


def _runs_the_same(limits: Mapping[str, int], probe: Mapping[str, int], out: LaneResult) -> bool:
    """Whether a lane under ``limits`` runs exactly as the finished run ``out`` of the same
    lane under the ``probe`` limits: it holds all that run needed of them and no more than
    the probe's (see :class:`apex_jax.simulator.EngineState`)."""
    return (
        int(out.status) == OK
        and int(out.seqs_needed) <= limits["max_num_seqs"] <= probe["max_num_seqs"]
        and int(out.tokens_needed)
        <= limits["max_num_batched_tokens"]
        <= probe["max_num_batched_tokens"]
        and int(out.pages_needed) <= limits["num_kv_blocks"] - limits["watermark_blocks"]
        and limits["num_kv_blocks"] <= probe["num_kv_blocks"]
        and limits["watermark_blocks"] >= probe["watermark_blocks"]
    )


def _share_unbound_runs(
    cases, lanes, unique, constants, simulate, stats
) -> tuple[dict[int, LaneResult], dict[int, int]]:
    """Results of the ``unique`` lanes whose run a probe's covers (:func:`_unbound_probes`),
    and the probe lane (an index past ``lanes``) each took its run from.

    Probes run in rounds: after each, the replicas no probe covered form the classes of the
    next (a budget that cuts long prompts, say, leaves the replicas with that budget, whose
    own probe may cover them), while a round covers anything and brings new probes.
    ``simulate(run_lanes, ks, done)`` runs lanes ``ks`` of ``run_lanes``: the cases' lanes,
    then every probe's, each probe its own replica.
    """
    per_lane: dict[int, LaneResult] = {}
    taken: dict[int, int] = {}
    tried: set[tuple] = set()
    pending = list(unique)
    run_lanes = list(lanes)
    while True:
        probes = [
            p for p in _unbound_probes(cases, lanes, pending, constants) if p.key not in tried
        ]
        if not probes:
            return per_lane, taken
        tried.update(p.key for p in probes)
        probe_ids = []
        for probe in probes:
            replica = len(run_lanes)
            probe_ids.append(list(range(len(run_lanes), len(run_lanes) + len(probe.lanes))))
            run_lanes += [lane._replace(replica=replica) for lane in probe.lanes]
        out = simulate(run_lanes, [k for ids in probe_ids for k in ids], len(per_lane))
        covered = 0
        for probe, ids in zip(probes, probe_ids):
            for group in probe.members:
                if all(
                    _runs_the_same(lanes[k].limits, run_lanes[p].limits, out[p])
                    for k, p in zip(group, ids)
                ):
                    per_lane.update((k, out[p]) for k, p in zip(group, ids))
                    taken.update(zip(group, ids))
                    covered += len(group)
        stats.num_unbound_lanes += covered
        if not covered:
            return per_lane, taken
        pending = [k for k in pending if k not in per_lane]


def _run_reference(cases, lanes, live, coeffs, energy, max_iters, stats) -> dict[int, LaneResult]:
    """Results of the replicas of the ``live`` lanes (indices into ``lanes``) from the
    plain-Python reference."""
    start = time.perf_counter()
    per_lane = {}
    for group in _live_groups(lanes, live):
        first = lanes[group[0]]
        engines = []
        for k in group:
            w = cases[lanes[k].case].workload
            ids = lanes[k].request_ids
            engines.append(
                (
                    w.arrival_s[ids],
                    w.prompt_tokens[ids],
                    w.output_tokens[ids],
                    lanes[k].gate,
                    cases[lanes[k].case].deployment.engine.frontend_delay_s,
                    w.think_fractions(len(ids), lanes[k].gate),
                    lanes[k].cached_tokens,
                )
            )
        results = simulate_replica_reference(
            engines,
            first.limits,
            _take(coeffs, first.case),
            stage_layers=first.stage_layers,
            max_iters=max_iters,
            energy=_take(energy, first.case),
        )
        per_lane.update(zip(group, results))
    stats.run_s += time.perf_counter() - start
    return per_lane


def _live_groups(lanes: Sequence[Lane], live: Sequence[int]) -> list[list[int]]:
    """The replicas (:func:`replica_groups`) with a ``live`` lane."""
    is_live = set(live)
    return [g for g in replica_groups(lanes) if is_live.intersection(g)]


def _start_engine(
    cases, lanes, lane_chunk, lane_shape, start_slots, max_iters, use_reference
) -> _EngineShape:
    """The :class:`_EngineShape` of an evaluation's ``lanes``, its first pass's engine
    compiling in the background if a live lane runs in it (one whose case's
    ``start_slots``, case index to slots, are not more) and the engine simulates."""
    shape = _engine_shape(lanes, lane_chunk, lane_shape)
    first = [
        k
        for k, lane in enumerate(lanes)
        if lane.status == LIVE
        and min(start_slots.get(lane.case, 0), shape.max_slots) <= shape.num_slots
    ]
    if first and not use_reference:
        one = build_lane_batch(
            cases,
            [lanes[k] for k in _live_groups(lanes, first[:1])[0]],
            num_requests=shape.num_requests,
            num_engines=shape.num_engines,
        )
        batch = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct((shape.num_replicas,) + x.shape[1:], x.dtype), one
        )
        _compile_ahead(batch, shape.num_slots, max_iters)
    return shape


def _run_engine(
    cases,
    lanes,
    live,
    shape: _EngineShape,
    progress,
    stats,
    *,
    coeffs,
    energy,
    max_iters,
    start_slots=None,
) -> tuple[dict[int, LaneResult], dict[int, int]]:
    """Results of the replicas of the ``live`` lanes (indices into ``lanes``) from the
    compiled engine, and the slot capacity each lane completed with.

    Replicas run in chunks (``shape``: the evaluation's, :func:`_engine_shape`), every
    replica padded to the deepest pipeline with engines that serve nothing: one shape, so
    one compile per slot count (a step schedules one virtual engine of a replica, so the
    padding costs little time; replicas of pipelines deeper than 8 come fewer to a chunk,
    which bounds its memory). Few requests are in the system at once on most traces, so
    every lane starts with few slots; a replica that overflows them stops and reruns with
    four times as many, up to its ``max_num_seqs``. A case of ``start_slots`` (case index
    to slots) skips the capacities below its own: a rate search knows what a plan needed at
    a lower rate. Replicas that never overflow are exact, so results do not depend on this.
    In a run of several processes (:mod:`apex_jax.multihost`) each simulates its share of the
    live replicas and every process receives every result.
    """
    num_requests, depth, per_chunk = shape.num_requests, shape.num_engines, shape.per_chunk
    stats.lane_shape = (max(stats.lane_shape[0], num_requests), max(stats.lane_shape[1], depth))
    max_slots = shape.max_slots
    groups = _live_groups(lanes, live)
    num_slots = shape.num_slots
    start = start_slots or {}

    def waits(group: list[int]) -> bool:
        return min(start.get(lanes[group[0]].case, 0), max_slots) > num_slots

    per_lane: dict[int, LaneResult] = {}
    slots_of: dict[int, int] = {}
    mine = my_share(groups)
    pending = mine
    if progress is not None and mine:
        # Shown from the start: the first chunk's wait includes compiling the engine.
        progress(0, sum(len(g) for g in mine))
    while pending:
        overflowed = [g for g in pending if waits(g)]
        parts = _chunks([g for g in pending if not waits(g)], lanes, per_chunk)
        # Every chunk padded to one size with replicas that start finished (status OK): the
        # first pass to the evaluation's, compiled ahead; reruns with more slots, a shape of
        # their own anyway, to the fewest that hold their replicas.
        size = shape.num_replicas
        if num_slots != shape.num_slots:
            size = _chunk_size(max(map(len, parts), default=1), per_chunk)
        for part in parts:
            batch = build_lane_batch(
                cases,
                [lanes[k] for g in part for k in g],
                num_requests=num_requests,
                num_engines=depth,
                num_replicas=size,
                coeffs=coeffs,
                energy=energy,
            )
            out = simulate_batch(batch, num_slots=num_slots, max_iters=max_iters, stats=stats)
            for r, group in enumerate(part):
                if int(out.status[r, 0]) == SLOT_OVERFLOW:
                    overflowed.append(group)
                else:
                    per_lane.update((k, _take(out, (r, v))) for v, k in enumerate(group))
                    slots_of.update(dict.fromkeys(group, num_slots))
            if progress is not None:
                progress(len(per_lane), sum(len(g) for g in mine))
        pending = overflowed
        num_slots = min(num_slots * 4, max_slots)
    if process_count() > 1:
        parts = allgather_objects((per_lane, slots_of))
        per_lane = {k: out for part, _ in parts for k, out in part.items()}
        slots_of = {k: n for _, part in parts for k, n in part.items()}
    return per_lane, slots_of


def _chunks(
    pending: list[list[int]], lanes: Sequence[Lane], per_chunk: int
) -> list[list[list[int]]]:
    """``pending`` replicas (lists of lane indices) in chunks of at most ``per_chunk``, the
    replicas with the most requests first, a chunk holding replicas within a factor of two
    of its first in requests.

    A chunk steps until its longest replica is done, and a finished replica still costs its
    share of every step: a DP1 plan's replica of a 4,096-request trace would keep the
    512-request replicas of DP8 plans stepping eight times longer than they need.
    """

    def num_requests(group: list[int]) -> int:
        return sum(len(lanes[k].request_ids) for k in group)

    chunks: list[list[list[int]]] = []
    for group in sorted(pending, key=lambda g: -num_requests(g)):
        if (
            chunks
            and len(chunks[-1]) < per_chunk
            and 2 * num_requests(group) >= num_requests(chunks[-1][0])
        ):
            chunks[-1].append(group)
        else:
            chunks.append([group])
    return chunks


def _summary(times: tuple, status: int, slo: SLO | None, summaries: dict) -> dict:
    """:func:`~apex_jax.metrics.summarize_requests` of ``times`` (arrival, first token,
    finish, output tokens, ``[N]`` each) under ``status``, computed once per distinct
    input and kept in ``summaries``: plans that share their runs share their metrics."""
    digest = hashlib.sha256(repr(status).encode())
    for x in times:
        digest.update(np.ascontiguousarray(x).tobytes())
    key = digest.digest()
    if key not in summaries:
        summaries[key] = summarize_requests(*times, status, slo)
    return summaries[key]


def _worst(statuses) -> int:
    """A plan is as good as its worst replica: any failing lane fails it."""
    return max(statuses, key=lambda s: (s != OK, s))


def _case_result(
    case: Case,
    lanes: list[tuple[Lane, LaneResult | None]],
    memory: dict,
    per_replica: bool,
    per_request: bool,
    slo: SLO | None,
    max_iters: int,
    summaries: dict,
) -> dict:
    """Metrics of a case from its lanes and their results (``None``: not simulated); a
    failed case's ``status_reason`` is that of its first lane with the worst status (empty
    for an OK case). ``summaries`` keeps request metrics across cases (:func:`_summary`)."""
    w = case.workload
    arrival = np.array(w.arrival_s, np.float64)
    first = np.full(w.num_requests, np.nan)
    finish = np.full(w.num_requests, np.nan)
    statuses, iters, iters_total, preemptions, dynamic_energy_j = [], 0, 0, 0, 0.0
    for lane, out in lanes:
        if out is None:
            statuses.append(lane.status)
            continue
        statuses.append(int(out.status))
        ids = lane.request_ids
        first[ids] = out.first_token_s[: len(ids)]
        finish[ids] = out.finish_s[: len(ids)]
        # TTFT counts from the send: a closed loop's are the engine's, filled in as it runs.
        arrival[ids] = out.sent_s[: len(ids)]
        iters = max(iters, int(out.num_iters))
        iters_total += int(out.num_iters)
        preemptions += int(out.num_preemptions)
        dynamic_energy_j += float(out.dynamic_energy_j)
    # Metrics over the requests served: vLLM answers the rejected ones with an error at once.
    rejected = lanes[0][0].rejected
    is_served = rejected == 0
    worst = _worst(statuses)
    times = (arrival[is_served], first[is_served], finish[is_served], w.output_tokens[is_served])
    result = dict(_summary(times, worst, slo, summaries))
    result["status_reason"] = "" if worst == OK else _lane_reason(case, lanes, statuses, max_iters)
    result["num_rejected"] = int(np.sum(~is_served))
    result["rejection_reason"] = rejection_reason(w, rejected, lanes[0][0].limits)
    if per_replica:
        # Lane r serves DP replica r mod dp (its virtual engines are the other lanes).
        dp = int(case.plan[COL["dp"]])
        result["replicas"] = []
        for d in range(dp):
            mine = [i for i, (lane, _) in enumerate(lanes) if lane.replica % dp == d]
            ids = np.sort(np.concatenate([lanes[i][0].request_ids for i in mine]))
            result["replicas"].append(
                summarize_requests(
                    arrival[ids],
                    first[ids],
                    finish[ids],
                    w.output_tokens[ids],
                    _worst(statuses[i] for i in mine),
                )
            )
    if per_request:
        result["requests"] = {
            "arrival_s": arrival,
            "first_token_s": first,
            "finish_s": finish,
            "output_tokens": np.asarray(w.output_tokens),
        }
    plan = plan_to_dict(case.plan)
    result.update(plan)
    result["plan"] = describe_plan(case.plan, case.deployment.model)
    result["placement"] = placement(case.plan, case.deployment.gpus_per_node, case.deployment.model)
    result["num_gpus"] = int(case.plan[COL["dp"]] * case.plan[COL["tp"]] * case.plan[COL["pp"]])
    result.update(_energy_metrics(case, result, dynamic_energy_j, w.output_tokens[is_served]))
    if result["status"] == "OK":
        dep = case.deployment
        makespan_s = result["makespan_s"]
        result.update(
            work_metrics(
                dep.model,
                dep.gpu,
                plan,
                w.prompt_tokens[is_served],
                w.output_tokens[is_served],
                iters_total,
                makespan_s,
            )
        )
    else:
        result.update(dict.fromkeys(WORK_KEYS, math.nan))
    result["num_iters_max_replica"] = iters
    result["num_iters_total"] = iters_total
    result["num_preemptions"] = preemptions
    result.update(memory)
    return result


def _lane_reason(
    case: Case, lanes: list[tuple[Lane, LaneResult | None]], statuses: list[int], max_iters: int
) -> str:
    """Why the case failed: the reason of its first lane with the worst status."""
    worst = _worst(statuses)
    k = statuses.index(worst)
    lane, out = lanes[k]
    dp, num_lanes = int(case.plan[COL["dp"]]), len(lanes)
    where = f"replica {lane.replica % dp}: " if num_lanes > 1 else ""
    if out is None:
        # OOM and rejection concern every replica alike.
        return lane.reason
    unfinished = int(np.count_nonzero(~np.isfinite(out.finish_s[: len(lane.request_ids)])))
    if worst == MAX_ITERS:
        why = (
            f"the iteration cap of {max_iters} iterations was reached with {unfinished} of "
            f"{len(lane.request_ids)} requests unfinished"
        )
    elif worst == INFEASIBLE:
        why = (
            f"the engine stopped with {unfinished} requests it could neither schedule nor make "
            "room for by preemption"
        )
    else:
        why = f"the engine ended with status {status_name(worst)}"
    return where + why


def _energy_metrics(
    case: Case, result: dict, dynamic_energy_j: float, served_output_tokens: np.ndarray
) -> dict[str, float]:
    """Energy of a finished plan: every GPU of the plan draws idle power for the whole
    makespan; iterations add their dynamic power on top (:mod:`apex_jax.cost.energy`)."""
    if result["status"] != "OK":
        return dict.fromkeys(("energy_j", "energy_per_output_token_j", "avg_power_w"), math.nan)
    num_gpus = int(case.plan[COL["dp"]] * case.plan[COL["tp"]] * case.plan[COL["pp"]])
    energy_j = dynamic_energy_j + num_gpus * case.deployment.gpu.idle_w * result["makespan_s"]
    return {
        "energy_j": energy_j,
        "energy_per_output_token_j": energy_j / float(np.sum(served_output_tokens)),
        "avg_power_w": energy_j / result["makespan_s"],
    }


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
