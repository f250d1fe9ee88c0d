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

from apex_jax.cost_model import CostCoeffs, decode_time_parts_s
from apex_jax.status import INFEASIBLE, LIVE, MAX_ITERS, OK

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
    initial_status: jax.Array  # [] int32, LIVE or a status decided before simulation
    coeffs: CostCoeffs  # fields [] float64


class LaneState(NamedTuple):
    """Loop carry of one lane."""

    now_s: jax.Array  # [] float64
    next_req: jax.Array  # [] int32, first request never admitted
    num_finished: jax.Array  # [] int32
    num_iters: jax.Array  # [] int32, engine iterations simulated
    num_preemptions: jax.Array  # [] int32
    free_blocks: jax.Array  # [] int32
    status: jax.Array  # [] int32, LIVE while simulating
    slot_req: jax.Array  # [S] int32, request id or EMPTY; compact, ascending
    slot_prompt: jax.Array  # [S] int32
    slot_output: jax.Array  # [S] int32
    slot_gen: jax.Array  # [S] int32, tokens generated so far
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
    *,
    num_requests: int,
    concurrency: int = 0,
    initial_status: int = LIVE,
) -> LaneInputs:
    """Build one lane's inputs in NumPy, padded to ``num_requests``.

    Args:
        arrival_s, prompt_tokens, output_tokens: the replica's ``[n]`` requests, by arrival.
        limits: engine limits (see :class:`apex_jax.reference.EngineLimits`).
        coeffs: the plan's scalar cost coefficients.
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
        initial_status=i32(initial_status),
        coeffs=CostCoeffs(*(np.float64(np.asarray(x)) for x in coeffs)),
    )


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
        free_blocks=inputs.num_kv_blocks.astype(i32),
        status=inputs.initial_status.astype(i32),
        slot_req=jnp.full(num_slots, EMPTY, i32),
        slot_prompt=zeros_s,
        slot_output=zeros_s,
        slot_gen=zeros_s,
        slot_held=zeros_s,
        slot_is_running=jnp.zeros(num_slots, bool),
        slot_first_token_s=jnp.zeros(num_slots, jnp.float64),
        first_token_s=jnp.full(n, jnp.nan, jnp.float64),
        finish_s=jnp.full(n, jnp.nan, jnp.float64),
    )


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
    """Advance one lane by one event: an idle jump plus a prefill iteration, or a run of
    identical decode iterations. A lane that is not live is returned unchanged."""
    i32 = jnp.int32
    num_slots = st.slot_req.shape[0]
    n = inputs.arrival_s.shape[0]
    iota = jnp.arange(num_slots, dtype=i32)
    bs = inputs.block_size
    live = st.status == LIVE

    def arrived_at(now, finished):
        by_time = jnp.searchsorted(inputs.arrival_s, now, side="right").astype(i32)
        return jnp.minimum(jnp.minimum(by_time, inputs.gate + finished), inputs.num_requests)

    num_in_system = st.next_req - st.num_finished
    occupied = iota < num_in_system
    arrived = arrived_at(st.now_s, st.num_finished)
    is_idle = (num_in_system == 0) & (st.next_req >= arrived) & (st.next_req < inputs.num_requests)
    now = jnp.where(
        is_idle,
        jnp.maximum(st.now_s, inputs.arrival_s[jnp.minimum(st.next_req, n - 1)]),
        st.now_s,
    )
    arrived = arrived_at(now, st.num_finished)

    is_run = occupied & st.slot_is_running
    is_pre = occupied & ~st.slot_is_running
    num_running = _sum_i32(is_run)
    num_pre = _sum_i32(is_pre)
    slot_len = st.slot_prompt + st.slot_gen

    # ---- admission (prefill iteration) ----
    first_pre = jnp.min(jnp.where(is_pre, iota, num_slots - 1))
    next_idx = jnp.minimum(st.next_req, n - 1)
    head_len = jnp.where(
        num_pre > 0,
        slot_len[first_pre],
        jnp.where(st.next_req < arrived, inputs.prompt[next_idx], 0),
    )
    token_room = jnp.maximum(inputs.max_num_batched_tokens, head_len)
    seq_room = inputs.max_num_seqs - num_running
    block_room = st.free_blocks - inputs.watermark_blocks

    pre_len = jnp.where(is_pre, slot_len, 0)
    pre_blocks = jnp.where(is_pre, _ceil_div(slot_len, bs), 0)
    admit_pre = (
        is_pre
        & (jnp.cumsum(is_pre.astype(i32)) <= seq_room)
        & (jnp.cumsum(pre_len) <= token_room)
        & (jnp.cumsum(pre_blocks) <= block_room)
    )
    num_admit_pre = _sum_i32(admit_pre)
    pre_tokens = _sum_i32(jnp.where(admit_pre, slot_len, 0))
    pre_block_total = _sum_i32(jnp.where(admit_pre, pre_blocks, 0))
    pre_pairs = jnp.sum(jnp.where(admit_pre, slot_len * (slot_len + 1.0) / 2.0, 0.0))

    def fit_count(cum, room):
        limit = cum[st.next_req] + room
        return jnp.searchsorted(cum, limit, side="right").astype(i32) - 1 - st.next_req

    num_new = jnp.minimum(arrived - st.next_req, seq_room - num_admit_pre)
    num_new = jnp.minimum(num_new, fit_count(inputs.cum_prompt, token_room - pre_tokens))
    num_new = jnp.minimum(num_new, fit_count(inputs.cum_blocks, block_room - pre_block_total))
    num_new = jnp.where(num_admit_pre == num_pre, jnp.maximum(num_new, 0), 0)
    new_end = st.next_req + num_new
    new_tokens = inputs.cum_prompt[new_end] - inputs.cum_prompt[st.next_req]
    new_blocks = inputs.cum_blocks[new_end] - inputs.cum_blocks[st.next_req]
    new_pairs = inputs.cum_pairs[new_end] - inputs.cum_pairs[st.next_req]
    num_admitted = num_admit_pre + num_new
    is_prefill = num_admitted > 0

    prefill_base, _ = decode_time_parts_s(
        inputs.coeffs,
        (pre_tokens + new_tokens).astype(jnp.float64),
        num_admitted.astype(jnp.float64),
        pre_pairs + new_pairs,
    )

    # ---- decode, with preemption of the latest arrivals when pages run out ----
    need = jnp.where(is_run, _ceil_div(slot_len, bs) - st.slot_held, 0)
    deficit = _sum_i32(need) - st.free_blocks
    weight = jnp.where(is_run, need + st.slot_held, 0)
    suffix_after = jnp.cumsum(weight[::-1])[::-1] - weight
    is_victim = is_run & (deficit > 0) & (suffix_after < deficit)
    is_dec = is_run & ~is_victim
    batch = _sum_i32(is_dec)
    freed_by_victims = _sum_i32(jnp.where(is_victim, st.slot_held, 0))
    free_after_victims = st.free_blocks + freed_by_victims
    need_now = _sum_i32(jnp.where(is_dec, need, 0))
    kv0 = jnp.sum(jnp.where(is_dec, slot_len, 0), dtype=jnp.float64)
    batch_f = batch.astype(jnp.float64)
    dec_base, slope = decode_time_parts_s(inputs.coeffs, batch_f, batch_f, 0.0)

    k_finish = jnp.min(jnp.where(is_dec, st.slot_output - st.slot_gen, _BIG_INT))
    # Each sequence opens at most ceil((k - 1) / block_size) pages after the first iteration,
    # so k <= block_size * floor(spare / batch) + 1 iterations cannot run out of pages.
    spare = free_after_victims - need_now
    k_pages = bs * (spare // jnp.maximum(batch, 1)) + 1
    by_time = jnp.searchsorted(inputs.arrival_s, now, side="right").astype(i32)
    has_timed_arrival = (by_time < inputs.gate + st.num_finished) & (by_time < inputs.num_requests)
    next_arrival = jnp.where(
        has_timed_arrival, inputs.arrival_s[jnp.minimum(by_time, n - 1)], NEVER
    )
    k_arrival = _first_iteration_at_or_after(dec_base, slope, kv0, batch_f, next_arrival - now)
    k = jnp.minimum(jnp.minimum(k_finish, k_pages), k_arrival)
    k = jnp.minimum(k, max_iters - st.num_iters)
    k = jnp.where(jnp.any(is_victim), 1, k)
    k = jnp.where(batch > 0, jnp.maximum(k, 1), 0)
    k_f = k.astype(jnp.float64)
    dec_time = k_f * dec_base + slope * (k_f * kv0 + batch_f * k_f * (k_f - 1.0) / 2.0)
    held_after = jnp.maximum(st.slot_held, _ceil_div(slot_len + k - 1, bs))

    # ---- merge the two branches ----
    is_new = (iota >= num_in_system) & (iota < num_in_system + num_new)
    new_req = jnp.clip(st.next_req + iota - num_in_system, 0, n - 1)
    dt = jnp.where(is_prefill, prefill_base, dec_time)
    now_end = now + dt

    admitted = admit_pre | is_new
    slot_req = jnp.where(is_new, new_req, st.slot_req)
    slot_prompt = jnp.where(is_new, inputs.prompt[new_req], st.slot_prompt)
    slot_output = jnp.where(is_new, inputs.output[new_req], st.slot_output)
    slot_first = jnp.where(is_new, now_end, st.slot_first_token_s)
    admitted_len = jnp.where(is_new, slot_prompt, slot_len)
    gen_pre = jnp.where(is_new, 0, st.slot_gen)
    slot_gen = jnp.where(
        is_prefill,
        gen_pre + admitted.astype(i32),
        st.slot_gen + jnp.where(is_dec, k, 0),
    )
    slot_held = jnp.where(
        is_prefill,
        jnp.where(admitted, _ceil_div(admitted_len, bs), st.slot_held),
        jnp.where(is_victim, 0, jnp.where(is_dec, held_after, st.slot_held)),
    )
    slot_is_running = jnp.where(
        is_prefill, st.slot_is_running | admitted, st.slot_is_running & ~is_victim
    )
    free_blocks = jnp.where(
        is_prefill,
        st.free_blocks - pre_block_total - new_blocks,
        free_after_victims - _sum_i32(jnp.where(is_dec, held_after - st.slot_held, 0)),
    )
    next_req = jnp.where(is_prefill, new_end, st.next_req)
    num_preemptions = st.num_preemptions + jnp.where(is_prefill, 0, _sum_i32(is_victim))
    iters_done = jnp.where(is_prefill, 1, k)

    # ---- finishes, then compaction back to request order ----
    occupied_after = iota < next_req - st.num_finished
    finishing = occupied_after & slot_is_running & (slot_gen >= slot_output)
    target = jnp.where(finishing, slot_req, n)
    first_token_s = st.first_token_s.at[target].set(slot_first, mode="drop")
    finish_s = st.finish_s.at[target].set(now_end, mode="drop")
    num_done = _sum_i32(finishing)
    free_blocks = free_blocks + _sum_i32(jnp.where(finishing, slot_held, 0))
    keep = occupied_after & ~finishing
    dest = jnp.where(keep, jnp.cumsum(keep.astype(i32)) - 1, num_slots)

    def compact(x, fill):
        return jnp.full_like(x, fill).at[dest].set(x, mode="drop")

    num_finished = st.num_finished + num_done
    num_iters = st.num_iters + iters_done
    progressed = is_prefill | (batch > 0) | jnp.any(is_victim)
    status = jnp.where(num_finished >= inputs.num_requests, OK, LIVE)
    status = jnp.where((status == LIVE) & ~progressed, INFEASIBLE, status)
    status = jnp.where((status == LIVE) & (num_iters >= max_iters), MAX_ITERS, status)

    new = LaneState(
        now_s=now_end,
        next_req=next_req,
        num_finished=num_finished,
        num_iters=num_iters,
        num_preemptions=num_preemptions,
        free_blocks=free_blocks,
        status=status.astype(i32),
        slot_req=compact(slot_req, EMPTY),
        slot_prompt=compact(slot_prompt, 0),
        slot_output=compact(slot_output, 0),
        slot_gen=compact(slot_gen, 0),
        slot_held=compact(slot_held, 0),
        slot_is_running=compact(slot_is_running, False),
        slot_first_token_s=compact(slot_first, 0.0),
        first_token_s=first_token_s,
        finish_s=finish_s,
    )
    return jax.tree_util.tree_map(lambda a, b: jnp.where(live, a, b), new, st)


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
    batched_step = jax.vmap(lambda x, s: step(x, s, max_iters=max_iters))

    def cond(s):
        return jnp.any(s.status == LIVE)

    return jax.lax.while_loop(cond, lambda s: batched_step(inputs, s), state)
