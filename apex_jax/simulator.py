"""The batching recurrence of one serving replica, as a JAX loop.

Semantics are those of :mod:`apex_jax.reference` (read its docstring first); this module
reproduces them request by request, with two changes that only affect speed:

- A run of decode iterations with an unchanged batch (no arrival seen, no sequence finishing,
  no KV page shortfall) is advanced in one step. Its iteration times form an arithmetic
  series because only the KV lengths grow, so their sum is closed-form.
- Admission of never-admitted requests uses prefix sums over the trace and binary search
  instead of a walk.

State lives in fixed-size slots ``[S]``: the requests in the system (running or preempted),
kept compact and in request order, so the waiting preempted requests and the preemption
victims are found by prefix sums over slots. The step is written for one lane (one replica
of one plan); :func:`run_lanes` vmaps it inside a single outer ``while_loop`` over the batched
state, which stops when no lane is live.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from apex_jax.cost.energy import MEMORY_POWER_WEIGHT, EnergyCoeffs
from apex_jax.cost.iteration import CostCoeffs, decode_time_parts_s
from apex_jax.status import INFEASIBLE, LIVE, MAX_ITERS, OK, SLOT_OVERFLOW

__all__ = [
    "EMPTY",
    "NEVER",
    "LaneInputs",
    "LaneState",
    "init_state",
    "make_lane_inputs",
    "run_lanes",
    "stack_lanes",
    "step",
]

EMPTY = -1  # slot holds no request
NEVER = jnp.inf  # time of an event that will not happen
_BIG_INT = 2**30  # "unbounded" iteration count; far above any cap


class LaneInputs(NamedTuple):
    """Everything one lane reads; each field gains a leading lane axis when batched."""

    arrival_s: jax.Array  # [N] float64, non-decreasing; padding is +inf
    prompt: jax.Array  # [N] int32
    output: jax.Array  # [N] int32
    cum_prompt: jax.Array  # [N + 1] int32, prefix sums of prompt
    cum_blocks: jax.Array  # [N + 1] int32, prefix sums of ceil(prompt / block_size)
    cum_pairs: jax.Array  # [N + 1] float64, prefix sums of prompt (prompt + 1) / 2
    num_requests: jax.Array  # [] int32, real (unpadded) requests
    gate: jax.Array  # [] int32, closed-loop clients; num_requests for open loop
    max_num_seqs: jax.Array  # [] int32
    max_num_batched_tokens: jax.Array  # [] int32
    block_size: jax.Array  # [] int32
    num_kv_blocks: jax.Array  # [] int32
    watermark_blocks: jax.Array  # [] int32
    chunked_prefill: jax.Array  # [] int32, 1 = chunked prefill on
    initial_status: jax.Array  # [] int32, LIVE or a status decided before simulation
    coeffs: CostCoeffs  # one plan's: fields [] float64, slopes [K]
    energy: EnergyCoeffs  # one plan's: fields [] float64


class LaneState(NamedTuple):
    """Loop carry of one lane."""

    now_s: jax.Array  # [] float64
    next_req: jax.Array  # [] int32, first request never admitted
    num_finished: jax.Array  # [] int32
    num_iters: jax.Array  # [] int32, engine iterations simulated
    num_preemptions: jax.Array  # [] int32
    dynamic_energy_j: jax.Array  # [] float64, above-idle energy of the replica's GPUs
    free_blocks: jax.Array  # [] int32
    status: jax.Array  # [] int32, LIVE while simulating
    slot_req: jax.Array  # [S] int32, request id or EMPTY; compact, ascending
    slot_prompt: jax.Array  # [S] int32
    slot_output: jax.Array  # [S] int32
    slot_gen: jax.Array  # [S] int32, tokens generated so far
    slot_pending: jax.Array  # [S] int32, prefill tokens still to compute (0 when decoding)
    slot_held: jax.Array  # [S] int32, KV pages held
    slot_is_running: jax.Array  # [S] bool, False = preempted, waiting for recompute
    slot_first_token_s: jax.Array  # [S] float64
    first_token_s: jax.Array  # [N] float64, NaN until the request finishes
    finish_s: jax.Array  # [N] float64, NaN until the request finishes


def make_lane_inputs(
    arrival_s,
    prompt_tokens,
    output_tokens,
    limits: dict[str, int],
    coeffs: CostCoeffs,
    energy: EnergyCoeffs | None = None,
    *,
    num_requests: int,
    concurrency: int = 0,
    initial_status: int = LIVE,
) -> LaneInputs:
    """Build one lane's inputs in NumPy, padded to ``num_requests``.

    Args:
        arrival_s, prompt_tokens, output_tokens: the replica's ``[n]`` requests, by arrival.
        limits: engine limits (see :class:`apex_jax.reference.EngineLimits`).
        coeffs: the plan's cost coefficients (batch shape ``()``).
        energy: the plan's power-model constants (default: zeros, no energy).
        num_requests: padded request capacity ``N >= n`` (a static shape).
        concurrency: closed-loop clients; 0 for open loop.
        initial_status: ``LIVE``, or a status decided before simulation (OOM, INFEASIBLE).
    """
    n = len(arrival_s)
    if n > num_requests:
        raise ValueError(f"lane has {n} requests but the padded capacity is {num_requests}")
    arrival = np.full(num_requests, np.inf)
    prompt = np.zeros(num_requests, np.int32)
    output = np.ones(num_requests, np.int32)
    arrival[:n] = arrival_s
    prompt[:n] = prompt_tokens
    output[:n] = output_tokens
    bs = int(limits["block_size"])
    zero = np.zeros(1, np.int64)
    i32 = np.int32
    return LaneInputs(
        arrival_s=arrival,
        prompt=prompt,
        output=output,
        cum_prompt=np.concatenate([zero, np.cumsum(prompt, dtype=np.int64)]).astype(i32),
        cum_blocks=np.concatenate([zero, np.cumsum(-(-prompt // bs), dtype=np.int64)]).astype(i32),
        cum_pairs=np.concatenate([[0.0], np.cumsum(prompt * (prompt + 1.0) / 2.0)]),
        num_requests=i32(n),
        gate=i32(concurrency if concurrency > 0 else n),
        max_num_seqs=i32(limits["max_num_seqs"]),
        max_num_batched_tokens=i32(limits["max_num_batched_tokens"]),
        block_size=i32(bs),
        num_kv_blocks=i32(limits["num_kv_blocks"]),
        watermark_blocks=i32(limits["watermark_blocks"]),
        chunked_prefill=i32(limits.get("chunked_prefill", 0)),
        initial_status=i32(initial_status),
        coeffs=jax.tree_util.tree_map(_host_f64, coeffs),
        energy=jax.tree_util.tree_map(
            _host_f64, EnergyCoeffs.zeros() if energy is None else energy
        ),
    )


def _host_f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def stack_lanes(lanes: list[LaneInputs]) -> LaneInputs:
    """Stack single-lane inputs along a new leading lane axis."""
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *lanes)


def init_state(inputs: LaneInputs, *, num_slots: int) -> LaneState:
    """Empty system at t = 0 for one lane."""
    n = inputs.arrival_s.shape[0]
    i32 = jnp.int32
    zeros_s = jnp.zeros(num_slots, i32)
    return LaneState(
        now_s=jnp.zeros((), jnp.float64),
        next_req=jnp.zeros((), i32),
        num_finished=jnp.zeros((), i32),
        num_iters=jnp.zeros((), i32),
        num_preemptions=jnp.zeros((), i32),
        dynamic_energy_j=jnp.zeros((), jnp.float64),
        free_blocks=inputs.num_kv_blocks.astype(i32),
        status=inputs.initial_status.astype(i32),
        slot_req=jnp.full(num_slots, EMPTY, i32),
        slot_prompt=zeros_s,
        slot_output=zeros_s,
        slot_gen=zeros_s,
        slot_pending=zeros_s,
        slot_held=zeros_s,
        slot_is_running=jnp.zeros(num_slots, bool),
        slot_first_token_s=jnp.zeros(num_slots, jnp.float64),
        first_token_s=jnp.full(n, jnp.nan, jnp.float64),
        finish_s=jnp.full(n, jnp.nan, jnp.float64),
    )


def _busy(e: EnergyCoeffs, num_tokens, prefill_pairs, decode_kv_tokens):
    """Power-weighted busy time of one iteration (see :mod:`apex_jax.cost.energy`)."""
    compute = num_tokens * e.compute_s_per_token + prefill_pairs * e.compute_s_per_pair
    memory = e.memory_s_fixed + decode_kv_tokens * e.memory_s_per_kv_token
    return compute + MEMORY_POWER_WEIGHT * memory


def _busy_and_time(e: EnergyCoeffs, base_s, slope, kv0, batch):
    """Busy time and wall time of decode iteration ``j`` of a run, as ``x0 + j * step``."""
    busy0 = _busy(e, batch, 0.0, kv0)
    busy_step = MEMORY_POWER_WEIGHT * batch * e.memory_s_per_kv_token
    return busy0, busy_step, base_s + slope * kv0, slope * batch


def _first_crossing(gap0, gap_step):
    """Iterations ``j >= 1`` before the affine ``gap0 + j gap_step`` changes sign."""
    towards_zero = (gap0 >= 0.0) & (gap_step < 0.0) | (gap0 < 0.0) & (gap_step > 0.0)
    j = jnp.floor(-gap0 / jnp.where(gap_step == 0.0, 1.0, gap_step)) + 1.0
    j = jnp.clip(j, 1.0, float(_BIG_INT))
    return jnp.where(towards_zero, j, float(_BIG_INT)).astype(jnp.int32)


def _ceil_div(a, b):
    return -((-a) // b)


def _sum_i32(x):
    return jnp.sum(x, dtype=jnp.int32)


def _first_iteration_at_or_after(base, slope, kv0, batch, gap_s):
    """Smallest ``j >= 1`` whose start time ``T(j) >= gap_s``, where
    ``T(j) = j base + slope (j kv0 + batch j (j - 1) / 2)``; ``_BIG_INT`` if never."""
    q = 0.5 * slope * batch
    lin = base + slope * kv0 - q

    def start(j):
        return j * base + slope * (j * kv0 + batch * j * (j - 1.0) / 2.0)

    # Stable root of q j^2 + lin j - gap = 0 (lin > 0 because kv0 >= batch).
    root = 2.0 * gap_s / (lin + jnp.sqrt(lin * lin + 4.0 * q * gap_s))
    j = jnp.maximum(1.0, jnp.ceil(jnp.minimum(root, float(_BIG_INT))))
    j = jnp.where((j > 1.0) & (start(j - 1.0) >= gap_s), j - 1.0, j)
    j = jnp.where(start(j) < gap_s, j + 1.0, j)
    return jnp.where(jnp.isfinite(gap_s), j, float(_BIG_INT)).astype(jnp.int32)


def step(inputs: LaneInputs, st: LaneState, *, max_iters: int) -> LaneState:
    """Advance one lane by one event: an idle jump plus one iteration, or a run of identical
    decode iterations. A lane that is not live is returned unchanged."""
    i32 = jnp.int32
    f64 = jnp.float64
    num_slots = st.slot_req.shape[0]
    iota = jnp.arange(num_slots, dtype=i32)
    bs = inputs.block_size
    chunked = inputs.chunked_prefill > 0
    budget = inputs.max_num_batched_tokens
    live = st.status == LIVE

    # Only the next W = S + 1 never-admitted requests can matter to one step: at most S fit
    # in the slots, and one more tells an overflow. Windows of the padded per-request arrays
    # keep every per-step search O(S) instead of O(log N) gathers or O(N) scans.
    win = num_slots + 1

    def window(x, extra=0):
        return jax.lax.dynamic_slice(x, (st.next_req,), (win + extra,))

    arrival_w = window(inputs.arrival_s)
    prompt_w = window(inputs.prompt)
    cum_prompt_w = window(inputs.cum_prompt, 1)
    cum_blocks_w = window(inputs.cum_blocks, 1)
    cum_pairs_w = window(inputs.cum_pairs, 1)
    gate_left = inputs.gate + st.num_finished - st.next_req

    def num_arrived_waiting(now):
        return jnp.minimum(_sum_i32(arrival_w <= now), gate_left)

    num_in_system = st.next_req - st.num_finished
    occupied = iota < num_in_system
    is_idle = (
        (num_in_system == 0)
        & (num_arrived_waiting(st.now_s) == 0)
        & (st.next_req < inputs.num_requests)
    )
    now = jnp.where(is_idle, jnp.maximum(st.now_s, arrival_w[0]), st.now_s)
    num_waiting_new = num_arrived_waiting(now)

    is_run = occupied & st.slot_is_running
    is_pre = occupied & ~st.slot_is_running
    is_dec = is_run & (st.slot_pending == 0)
    is_fill = is_run & (st.slot_pending > 0)
    num_running = _sum_i32(is_run)
    num_pre = _sum_i32(is_pre)
    slot_len = st.slot_prompt + st.slot_gen

    # ---- running sequences, in request order, within the token budget ----
    demand = jnp.where(is_dec, 1, jnp.where(is_fill, st.slot_pending, 0))
    take = jnp.where(is_run, jnp.clip(budget - (jnp.cumsum(demand) - demand), 0, demand), 0)
    sched = take > 0
    need = jnp.where(sched & is_dec, _ceil_div(slot_len, bs) - st.slot_held, 0)
    deficit = _sum_i32(need) - st.free_blocks
    weight = jnp.where(is_run, need + st.slot_held, 0)
    suffix_after = jnp.cumsum(weight[::-1])[::-1] - weight
    victim_if_run = is_run & (deficit > 0) & (suffix_after < deficit)
    any_victim = jnp.any(victim_if_run)
    sched = sched & ~victim_if_run
    used_by_running = _sum_i32(jnp.where(sched, take, 0))
    freed_by_victims = _sum_i32(jnp.where(victim_if_run, st.slot_held, 0))
    need_kept = _sum_i32(jnp.where(sched, need, 0))

    # ---- admission from the waiting queue: preempted requests, then new arrivals ----
    first_pre = jnp.min(jnp.where(is_pre, iota, num_slots - 1))
    head_len = jnp.where(
        num_pre > 0, slot_len[first_pre], jnp.where(num_waiting_new > 0, prompt_w[0], 0)
    )
    token_room = jnp.where(chunked, budget - used_by_running, jnp.maximum(budget, head_len))
    block_room = (
        jnp.where(chunked, st.free_blocks + freed_by_victims - need_kept, st.free_blocks)
        - inputs.watermark_blocks
    )
    may_admit = ~(chunked & any_victim)
    seq_room = inputs.max_num_seqs - num_running

    pre_len = jnp.where(is_pre, slot_len, 0)
    pre_cum = jnp.cumsum(pre_len)
    pre_before = pre_cum - pre_len
    pre_tokens_fit = jnp.where(chunked, pre_before < token_room, pre_cum <= token_room)
    pre_blocks = jnp.where(is_pre, _ceil_div(slot_len, bs), 0)
    admit_pre = (
        may_admit
        & is_pre
        & pre_tokens_fit
        & (jnp.cumsum(is_pre.astype(i32)) <= seq_room)
        & (jnp.cumsum(pre_blocks) <= block_room)
    )
    pre_chunk = jnp.where(admit_pre, jnp.minimum(slot_len, token_room - pre_before), 0)
    num_admit_pre = _sum_i32(admit_pre)
    pre_tokens = _sum_i32(pre_chunk)
    pre_block_total = _sum_i32(jnp.where(admit_pre, pre_blocks, 0))

    tokens_left = token_room - pre_tokens
    # Tokens and pages of the first i never-admitted requests, i = 0..W.
    new_prefix_tokens = cum_prompt_w - cum_prompt_w[0]
    new_prefix_blocks = cum_blocks_w - cum_blocks_w[0]
    fit_tokens = jnp.where(
        chunked,
        _sum_i32(new_prefix_tokens[:-1] < tokens_left),
        _sum_i32(new_prefix_tokens[1:] <= tokens_left),
    )
    fit_blocks = _sum_i32(new_prefix_blocks[1:] <= block_room - pre_block_total)
    num_new = jnp.minimum(num_waiting_new, seq_room - num_admit_pre)
    num_new = jnp.minimum(num_new, jnp.minimum(fit_tokens, fit_blocks))
    num_new = jnp.where(may_admit & (num_admit_pre == num_pre), jnp.maximum(num_new, 0), 0)
    slot_room = num_slots - num_in_system
    is_overflow = num_new > slot_room
    num_new = jnp.minimum(num_new, slot_room)
    new_end = st.next_req + num_new
    new_tokens = jnp.minimum(new_prefix_tokens[num_new], tokens_left)
    last = jnp.maximum(num_new - 1, 0)
    last_chunk = jnp.where(num_new > 0, new_tokens - new_prefix_tokens[last], 0)
    last_prompt = prompt_w[last]
    num_admitted = num_admit_pre + num_new
    is_prefill_only = ~chunked & (num_admitted > 0)

    # ---- the iteration's batch ----
    sched = sched & ~is_prefill_only
    is_victim = victim_if_run & ~is_prefill_only
    sched_dec = sched & is_dec
    sched_fill = sched & is_fill
    batch = _sum_i32(sched_dec)
    fill_take = jnp.where(sched_fill, take, 0)
    fill_done = (slot_len - st.slot_pending).astype(f64)
    fill_take_f = fill_take.astype(f64)
    pre_chunk_f = pre_chunk.astype(f64)
    last_chunk_f = last_chunk.astype(f64)
    pairs = (
        jnp.sum(fill_take_f * fill_done + fill_take_f * (fill_take_f + 1.0) / 2.0)
        + jnp.sum(pre_chunk_f * (pre_chunk_f + 1.0) / 2.0)
        + jnp.where(
            num_new > 0,
            cum_pairs_w[last] - cum_pairs_w[0] + last_chunk_f * (last_chunk_f + 1.0) / 2.0,
            0.0,
        )
    )
    num_sampled = (
        batch
        + _sum_i32(sched_fill & (take == st.slot_pending))
        + _sum_i32(admit_pre & (pre_chunk == slot_len))
        + jnp.where(num_new > 0, num_new - 1 + (last_chunk == last_prompt).astype(i32), 0)
    )
    num_tokens = batch + _sum_i32(fill_take) + pre_tokens + new_tokens
    kv0 = jnp.sum(jnp.where(sched_dec, slot_len, 0), dtype=f64)
    batch_f = batch.astype(f64)
    base_s, slope = decode_time_parts_s(
        inputs.coeffs, num_tokens.astype(f64), num_sampled.astype(f64), pairs
    )

    # ---- how many identical iterations: a pure decode batch repeats until an event ----
    is_pure_decode = (
        (num_admitted == 0) & ~jnp.any(sched_fill) & ~jnp.any(is_victim) & (batch == num_running)
    )
    k_finish = jnp.min(jnp.where(sched_dec, st.slot_output - st.slot_gen, _BIG_INT))
    # Each sequence opens at most ceil((k - 1) / block_size) pages after the first iteration,
    # so k <= block_size * floor(spare / batch) + 1 iterations cannot run out of pages.
    spare = st.free_blocks - need_kept
    k_pages = bs * (spare // jnp.maximum(batch, 1)) + 1
    # An arrival can change the schedule only when nobody is waiting: waiting requests were
    # not admitted, and FCFS keeps a later arrival behind them while pages only shrink.
    next_arrival = jnp.where((num_waiting_new == 0) & (gate_left > 0), arrival_w[0], NEVER)
    k_arrival = _first_iteration_at_or_after(base_s, slope, kv0, batch_f, next_arrival - now)
    k = jnp.minimum(jnp.minimum(k_finish, k_pages), k_arrival)
    k = jnp.maximum(jnp.minimum(k, max_iters - st.num_iters), 1)
    progressed = (num_admitted > 0) | jnp.any(sched)
    # Power follows min(busy, iteration time); inside one step the min must not switch
    # sides, so a decode run stops where it would (busy and time are both affine in j).
    e = inputs.energy
    busy0, busy_step, time0, time_step = _busy_and_time(e, base_s, slope, kv0, batch_f)
    k = jnp.minimum(k, _first_crossing(time0 - busy0, time_step - busy_step))
    k = jnp.where(is_pure_decode, k, 1)
    k = jnp.where(progressed, k, 0)
    k_f = k.astype(f64)
    dt = k_f * base_s + slope * (k_f * kv0 + batch_f * k_f * (k_f - 1.0) / 2.0)
    now_end = now + dt
    # Above-idle energy of the step's iterations: dynamic power for min(busy, time) of each
    # (idle power is added for the whole makespan afterwards, once per GPU).
    run_busy = k_f * busy0 + busy_step * k_f * (k_f - 1.0) / 2.0
    dynamic_s = jnp.where(
        is_pure_decode,
        jnp.where(time0 - busy0 >= 0.0, run_busy, dt),
        jnp.minimum(_busy(e, num_tokens.astype(f64), pairs, kv0), dt),
    )
    step_energy = e.num_gpus * e.dynamic_w * dynamic_s

    # ---- apply ----
    is_new = (iota >= num_in_system) & (iota < num_in_system + num_new)
    is_last_new = iota == num_in_system + num_new - 1
    new_pos = jnp.clip(iota - num_in_system, 0, win - 1)
    new_req = st.next_req + new_pos
    admitted = admit_pre | is_new
    slot_req = jnp.where(is_new, new_req, st.slot_req)
    slot_prompt = jnp.where(is_new, prompt_w[new_pos], st.slot_prompt)
    slot_output = jnp.where(is_new, window(inputs.output)[new_pos], st.slot_output)
    gen0 = jnp.where(is_new, 0, st.slot_gen)
    len0 = slot_prompt + gen0
    admit_chunk = jnp.where(
        admit_pre, pre_chunk, jnp.where(is_new, jnp.where(is_last_new, last_chunk, len0), 0)
    )
    slot_pending = jnp.where(
        admitted,
        len0 - admit_chunk,
        jnp.where(sched_fill, st.slot_pending - take, jnp.where(is_victim, 0, st.slot_pending)),
    )
    completes = (admitted | sched_fill) & (slot_pending == 0)
    slot_gen = gen0 + jnp.where(sched_dec, k, 0) + completes.astype(i32)
    slot_first = jnp.where((gen0 == 0) & (slot_gen > 0), now_end, st.slot_first_token_s)
    held_dec = jnp.maximum(st.slot_held, _ceil_div(slot_len + k - 1, bs))
    slot_held = jnp.where(
        admitted,
        _ceil_div(len0, bs),
        jnp.where(is_victim, 0, jnp.where(sched_dec, held_dec, st.slot_held)),
    )
    slot_is_running = (st.slot_is_running | admitted) & ~is_victim
    free_blocks = (
        st.free_blocks
        + _sum_i32(jnp.where(is_victim, st.slot_held, 0))
        - _sum_i32(jnp.where(sched_dec, held_dec - st.slot_held, 0))
        - pre_block_total
        - new_prefix_blocks[num_new]
    )
    num_preemptions = st.num_preemptions + _sum_i32(is_victim)

    # ---- finishes, then compaction back to request order ----
    occupied_after = iota < new_end - st.num_finished
    finishing = occupied_after & slot_is_running & (slot_pending == 0) & (slot_gen >= slot_output)
    target = jnp.where(finishing & live, slot_req, st.first_token_s.shape[0])
    first_token_s = st.first_token_s.at[target].set(slot_first, mode="drop")
    finish_s = st.finish_s.at[target].set(now_end, mode="drop")
    free_blocks = free_blocks + _sum_i32(jnp.where(finishing, slot_held, 0))
    keep = occupied_after & ~finishing
    dest = jnp.where(keep, jnp.cumsum(keep.astype(i32)) - 1, num_slots)

    def compact(x, fill):
        return jnp.full_like(x, fill).at[dest].set(x, mode="drop")

    num_finished = st.num_finished + _sum_i32(finishing)
    num_iters = st.num_iters + k
    status = jnp.where(num_finished >= inputs.num_requests, OK, LIVE)
    status = jnp.where((status == LIVE) & ~progressed & ~any_victim, INFEASIBLE, status)
    status = jnp.where((status == LIVE) & (num_iters >= max_iters), MAX_ITERS, status)
    status = jnp.where(is_overflow, SLOT_OVERFLOW, status)

    new = LaneState(
        now_s=now_end,
        next_req=new_end,
        num_finished=num_finished,
        num_iters=num_iters,
        num_preemptions=num_preemptions,
        dynamic_energy_j=st.dynamic_energy_j + step_energy,
        free_blocks=free_blocks,
        status=status.astype(i32),
        slot_req=compact(slot_req, EMPTY),
        slot_prompt=compact(slot_prompt, 0),
        slot_output=compact(slot_output, 0),
        slot_gen=compact(slot_gen, 0),
        slot_pending=compact(slot_pending, 0),
        slot_held=compact(slot_held, 0),
        slot_is_running=compact(slot_is_running, False),
        slot_first_token_s=compact(slot_first, 0.0),
        first_token_s=first_token_s,
        finish_s=finish_s,
    )
    # Per-request arrays were only written for live lanes (masked scatter); selecting them
    # whole would copy O(N) per lane per step.
    per_request = {"first_token_s", "finish_s"}
    return LaneState(
        *(
            getattr(new, f)
            if f in per_request
            else jnp.where(live, getattr(new, f), getattr(st, f))
            for f in LaneState._fields
        )
    )


def _pad_requests(inputs: LaneInputs, extra: int) -> LaneInputs:
    """Pad the per-request arrays (last axis) so that windows past the end stay in bounds:
    padded requests never arrive, and prefix sums stay flat."""

    def pad(x, mode, value=0):
        widths = [(0, 0)] * (x.ndim - 1) + [(0, extra)]
        if mode == "edge":
            return jnp.pad(x, widths, mode="edge")
        return jnp.pad(x, widths, constant_values=value)

    return inputs._replace(
        arrival_s=pad(inputs.arrival_s, "constant", jnp.inf),
        prompt=pad(inputs.prompt, "constant", 0),
        output=pad(inputs.output, "constant", 1),
        cum_prompt=pad(inputs.cum_prompt, "edge"),
        cum_blocks=pad(inputs.cum_blocks, "edge"),
        cum_pairs=pad(inputs.cum_pairs, "edge"),
    )


def run_lanes(inputs: LaneInputs, *, num_slots: int, max_iters: int) -> LaneState:
    """Simulate every lane of a batch to completion.

    One outer ``while_loop`` over the lane-major state, with :func:`step` vmapped inside,
    stops when no lane is live. ``vmap`` of a per-lane ``while_loop`` would instead select
    the whole carry of every lane at every step (notes/jax-on-cpu.md).

    Args:
        inputs: :class:`LaneInputs` with a leading lane axis ``[L, ...]``.
        num_slots: static slot capacity, at least every lane's ``max_num_seqs``.
        max_iters: static iteration cap per lane.

    Returns:
        The final :class:`LaneState`, fields ``[L, ...]``.
    """
    state = jax.vmap(lambda x: init_state(x, num_slots=num_slots))(inputs)
    inputs = _pad_requests(inputs, num_slots + 2)
    batched_step = jax.vmap(lambda x, s: step(x, s, max_iters=max_iters))

    def cond(s):
        return jnp.any(s.status == LIVE)

    return jax.lax.while_loop(cond, lambda s: batched_step(inputs, s), state)
