"""The batching recurrence of one serving replica, as a JAX loop.

Semantics are those of :mod:`apex_jax.reference` (read its docstring first); this module
reproduces them request by request, with two changes that only affect speed:

- A run of decode iterations with an unchanged batch (no arrival seen, no sequence finishing,
  a KV page free whenever a sequence is considered, the KV total within one affine piece of
  the decode-attention cost) is advanced in one step. Its iteration times form an arithmetic
  series because only the KV lengths grow, so their sum is closed-form.
- Admission of never-admitted requests uses prefix sums over the trace and binary search
  instead of a walk.

State lives in fixed-size slots ``[S]``: the requests in the system (running or preempted),
kept compact and in queue order (the running queue, then the preempted front of the waiting
queue), so admission and preemption are prefix sums over slots. The step is written for one lane (one replica
of one plan); :func:`run_lanes` vmaps it inside a single outer ``while_loop`` over the batched
state, which stops when no lane is live.

:func:`step` runs named phases, the same names as in the reference, so that a disagreement
points at one of them: :func:`_queues` (the running set and the waiting queue, after an idle
jump), :func:`_schedule_running` (the running sequences within the token budget, and
preemption victims), :func:`_admit` (admission from the waiting queue),
:func:`_batch_features` (the iteration's batch and what its cost depends on),
:func:`_run_cost` (wall time and energy), :func:`_apply` (the state after the batch ran),
:func:`_retire` (finished requests) and :func:`_compact` (slots in the next queue order).
Two phases exist only here: :func:`_window` (the next never-admitted requests) and
:func:`_run_length` (how many identical iterations one step covers).
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
    "LaneResult",
    "LaneState",
    "Slots",
    "init_state",
    "make_lane_inputs",
    "run_lanes",
    "stack_lanes",
    "step",
]

EMPTY = -1  # slot holds no request
NEVER = jnp.inf  # time of an event that will not happen
_BIG_INT = 2**30  # "unbounded" iteration count; far above any cap
_NUM_PLACES = 6  # classes of _next_order


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


class Slots(NamedTuple):
    """The requests in the system, one per slot, compact: the running queue, then the
    preempted requests in waiting order; slots ``>= next_req - num_finished`` are empty."""

    req: jax.Array  # [S] int32, request id or EMPTY
    prompt: jax.Array  # [S] int32
    output: jax.Array  # [S] int32
    gen: jax.Array  # [S] int32, tokens generated so far
    pending: jax.Array  # [S] int32, prefill tokens still to compute (0 when decoding)
    held: jax.Array  # [S] int32, KV pages held
    is_running: jax.Array  # [S] bool, False = preempted, waiting for recompute
    first_token_s: jax.Array  # [S] float64


# What a slot holds once its request is gone (one value per Slots field).
_EMPTY_SLOT = Slots(EMPTY, 0, 0, 0, 0, 0, False, 0.0)


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
    slots: Slots  # fields [S]
    first_token_s: jax.Array  # [N] float64, NaN until the request finishes
    finish_s: jax.Array  # [N] float64, NaN until the request finishes


class LaneResult(NamedTuple):
    """What simulating one lane gives; fields gain a leading lane axis ``[L]`` when batched.

    Returned by :func:`run_lanes` (JAX arrays) and by
    :func:`apex_jax.reference.simulate_reference` (Python numbers, NumPy arrays).
    """

    status: jax.Array  # [] int32, a code of apex_jax.status
    first_token_s: jax.Array  # [N] float64, NaN for unfinished requests
    finish_s: jax.Array  # [N] float64, NaN for unfinished requests
    num_iters: jax.Array  # [] int32, engine iterations simulated
    num_preemptions: jax.Array  # [] int32
    dynamic_energy_j: jax.Array  # [] float64, above-idle energy of the replica's GPUs


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
        slots=Slots(
            req=jnp.full(num_slots, EMPTY, i32),
            prompt=zeros_s,
            output=zeros_s,
            gen=zeros_s,
            pending=zeros_s,
            held=zeros_s,
            is_running=jnp.zeros(num_slots, bool),
            first_token_s=jnp.zeros(num_slots, jnp.float64),
        ),
        first_token_s=jnp.full(n, jnp.nan, jnp.float64),
        finish_s=jnp.full(n, jnp.nan, jnp.float64),
    )


class _Window(NamedTuple):
    """The next ``W = S + 1`` never-admitted requests. Only they can matter to one step: at
    most ``S`` fit in the slots, and one more tells an overflow. Windows keep every per-step
    search O(S) instead of O(log N) gathers or O(N) scans."""

    arrival_s: jax.Array  # [W] float64
    prompt: jax.Array  # [W] int32
    output: jax.Array  # [W] int32
    tokens_before: jax.Array  # [W + 1] int32, prompt tokens of the first i, i = 0..W
    blocks_before: jax.Array  # [W + 1] int32, KV pages of the first i prompts
    pairs_before: jax.Array  # [W + 1] float64, prefill pairs of the first i prompts


class _Queues(NamedTuple):
    """The running sequences and the waiting queue at the start of a step."""

    now_s: jax.Array  # [] float64, after any jump over an idle gap
    num_in_system: jax.Array  # [] int32, occupied slots
    num_new_waiting: jax.Array  # [] int32, arrived and sent, never admitted
    num_sendable: jax.Array  # [] int32, never-admitted requests the closed-loop gate lets in
    is_running: jax.Array  # [S] bool
    is_preempted: jax.Array  # [S] bool, waiting to be recomputed
    is_decoding: jax.Array  # [S] bool, running with its prefill done
    is_prefilling: jax.Array  # [S] bool, running with prefill tokens pending
    seq_len: jax.Array  # [S] int32, prompt plus generated tokens
    num_running: jax.Array  # [] int32
    num_preempted: jax.Array  # [] int32


class _Schedule(NamedTuple):
    """The running sequences scheduled within the token budget, in queue order."""

    take: jax.Array  # [S] int32, tokens each reached running sequence gets
    is_scheduled: jax.Array  # [S] bool, gets tokens and is not a victim
    need: jax.Array  # [S] int32, KV pages a decode opens
    is_victim: jax.Array  # [S] bool, preempted to free pages (if the running batch runs)
    any_victim: jax.Array  # [] bool
    num_tokens: jax.Array  # [] int32, tokens of the scheduled sequences
    freed_blocks: jax.Array  # [] int32, pages the victims release
    needed_blocks: jax.Array  # [] int32, pages the scheduled decodes open


class _Admission(NamedTuple):
    """Requests admitted from the waiting queue: preempted ones (in slots), then new ones
    (the first ``num_new`` of the window)."""

    is_admitted: jax.Array  # [S] bool, preempted slot admitted for recompute
    chunk: jax.Array  # [S] int32, prefill tokens of an admitted preempted slot
    num_preempted: jax.Array  # [] int32, preempted requests admitted
    preempted_tokens: jax.Array  # [] int32
    preempted_blocks: jax.Array  # [] int32, KV pages they take
    num_new: jax.Array  # [] int32, never-admitted requests admitted
    new_tokens: jax.Array  # [] int32, their prefill tokens this iteration
    new_blocks: jax.Array  # [] int32, KV pages they take
    last: jax.Array  # [] int32, window index of the last new request (0 if none)
    last_chunk: jax.Array  # [] int32, its prefill tokens this iteration (may be partial)
    num_admitted: jax.Array  # [] int32
    is_overflow: jax.Array  # [] bool, more new requests than free slots


class _Batch(NamedTuple):
    """The iteration's batch and the features its cost depends on."""

    is_decoding: jax.Array  # [S] bool, running sequence decoding one token
    is_prefilling: jax.Array  # [S] bool, running sequence computing a prefill chunk
    fill_take: jax.Array  # [S] int32, prefill tokens of a prefilling sequence
    is_victim: jax.Array  # [S] bool, preempted in this step
    batch_size: jax.Array  # [] int32, decoding sequences
    num_tokens: jax.Array  # [] int32
    num_sampled: jax.Array  # [] int32, sequences that yield a token
    prefill_pairs: jax.Array  # [] float64, (query, key) pairs of the prefill attention
    kv_tokens: jax.Array  # [] float64, KV length summed over decoding sequences
    base_s: jax.Array  # [] float64, iteration time at zero KV on the batch's affine piece
    slope_s_per_kv_token: jax.Array  # [] float64, decode attention time per KV token
    kv_tokens_end: jax.Array  # [] float64, KV total where the affine piece ends (or inf)
    is_pure_decode: jax.Array  # [] bool, every running sequence decodes, nothing else runs
    has_work: jax.Array  # [] bool, the batch computes anything


class _Run(NamedTuple):
    """The iterations one step covers."""

    num_iters: jax.Array  # [] int32, 0 when the batch is empty
    duration_s: jax.Array  # [] float64
    dynamic_energy_j: jax.Array  # [] float64, above-idle energy of the replica's GPUs


def _busy(e: EnergyCoeffs, num_tokens, prefill_pairs, decode_kv_tokens):
    """Power-weighted busy time of one iteration (see :mod:`apex_jax.cost.energy`)."""
    compute = num_tokens * e.compute_s_per_token + prefill_pairs * e.compute_s_per_pair
    memory = e.memory_s_fixed + decode_kv_tokens * e.memory_s_per_kv_token
    return compute + MEMORY_POWER_WEIGHT * memory


def _busy_and_time(e: EnergyCoeffs, b: _Batch):
    """Busy time and wall time of decode iteration ``j`` of a run, as ``x0 + j * step``."""
    batch = b.batch_size.astype(jnp.float64)
    busy0 = _busy(e, batch, 0.0, b.kv_tokens)
    busy_step = MEMORY_POWER_WEIGHT * batch * e.memory_s_per_kv_token
    slope = b.slope_s_per_kv_token
    return busy0, busy_step, b.base_s + slope * b.kv_tokens, slope * batch


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


def _run_time_s(b: _Batch, k):
    """``T(k) = k base + slope (k kv0 + batch k (k - 1) / 2)``: wall time of ``k`` decode
    iterations of an unchanged batch (float64 ``k``)."""
    batch = b.batch_size.astype(jnp.float64)
    kv_part = k * b.kv_tokens + batch * k * (k - 1.0) / 2.0
    return k * b.base_s + b.slope_s_per_kv_token * kv_part


def _first_iteration_at_or_after(b: _Batch, gap_s):
    """Smallest ``j >= 1`` whose start time ``T(j) >= gap_s`` (:func:`_run_time_s`);
    ``_BIG_INT`` if never."""
    batch = b.batch_size.astype(jnp.float64)
    q = 0.5 * b.slope_s_per_kv_token * batch
    lin = b.base_s + b.slope_s_per_kv_token * b.kv_tokens - q
    # Stable root of q j^2 + lin j - gap = 0 (lin > 0 because kv0 >= batch).
    root = 2.0 * gap_s / (lin + jnp.sqrt(lin * lin + 4.0 * q * gap_s))
    j = jnp.maximum(1.0, jnp.ceil(jnp.minimum(root, float(_BIG_INT))))
    j = jnp.where((j > 1.0) & (_run_time_s(b, j - 1.0) >= gap_s), j - 1.0, j)
    j = jnp.where(_run_time_s(b, j) < gap_s, j + 1.0, j)
    return jnp.where(jnp.isfinite(gap_s), j, float(_BIG_INT)).astype(jnp.int32)


def _window(inputs: LaneInputs, next_req, size: int) -> _Window:
    """The ``size`` requests from ``next_req`` on (the inputs are padded past the end)."""

    def take(x, extra=0):
        return jax.lax.dynamic_slice(x, (next_req,), (size + extra,))

    cum_prompt = take(inputs.cum_prompt, 1)
    cum_blocks = take(inputs.cum_blocks, 1)
    cum_pairs = take(inputs.cum_pairs, 1)
    return _Window(
        arrival_s=take(inputs.arrival_s),
        prompt=take(inputs.prompt),
        output=take(inputs.output),
        tokens_before=cum_prompt - cum_prompt[0],
        blocks_before=cum_blocks - cum_blocks[0],
        pairs_before=cum_pairs - cum_pairs[0],
    )


def _queues(inputs: LaneInputs, st: LaneState, win: _Window) -> _Queues:
    """The running set and the waiting queue; with nothing in the system and nothing
    waiting, the clock first jumps to the next arrival."""
    slots = st.slots
    iota = jnp.arange(slots.req.shape[0], dtype=jnp.int32)
    num_sendable = inputs.gate + st.num_finished - st.next_req

    def num_new_waiting(now_s):
        return jnp.minimum(_sum_i32(win.arrival_s <= now_s), num_sendable)

    num_in_system = st.next_req - st.num_finished
    is_idle = (
        (num_in_system == 0)
        & (num_new_waiting(st.now_s) == 0)
        & (st.next_req < inputs.num_requests)
    )
    now_s = jnp.where(is_idle, jnp.maximum(st.now_s, win.arrival_s[0]), st.now_s)
    occupied = iota < num_in_system
    is_running = occupied & slots.is_running
    is_preempted = occupied & ~slots.is_running
    return _Queues(
        now_s=now_s,
        num_in_system=num_in_system,
        num_new_waiting=num_new_waiting(now_s),
        num_sendable=num_sendable,
        is_running=is_running,
        is_preempted=is_preempted,
        is_decoding=is_running & (slots.pending == 0),
        is_prefilling=is_running & (slots.pending > 0),
        seq_len=slots.prompt + slots.gen,
        num_running=_sum_i32(is_running),
        num_preempted=_sum_i32(is_preempted),
    )


def _schedule_running(inputs: LaneInputs, st: LaneState, q: _Queues) -> _Schedule:
    """The running queue from the front within the token budget; a sequence is kept only
    while a KV page is free when it is considered, else the queue's tail is preempted, or the
    sequence itself when nobody is behind it (the reference's walk, in prefix sums)."""
    slots = st.slots
    demand = jnp.where(q.is_decoding, 1, jnp.where(q.is_prefilling, slots.pending, 0))
    budget_before = inputs.max_num_batched_tokens - (jnp.cumsum(demand) - demand)
    take = jnp.where(q.is_running, jnp.clip(budget_before, 0, demand), 0)
    is_reached = take > 0  # a prefix of the running queue
    need = jnp.where(q.is_decoding, _ceil_div(q.seq_len, inputs.block_size) - slots.held, 0)
    # Pages the victims must free for a reached sequence to stay, if all before it stayed;
    # it preempts itself when even every running sequence behind it holds fewer.
    deficit = 1 - st.free_blocks + jnp.cumsum(need) - need
    held = jnp.where(q.is_running, slots.held, 0)
    held_behind = _sum_i32(held) - jnp.cumsum(held)
    is_cut = jnp.cumsum(is_reached & (held_behind < deficit)) > 0
    last_deficit = jnp.max(jnp.where(is_reached, deficit, -_BIG_INT))
    is_victim = q.is_running & jnp.where(is_cut[-1], is_cut, held_behind < last_deficit)
    is_scheduled = is_reached & ~is_cut
    return _Schedule(
        take=take,
        is_scheduled=is_scheduled,
        need=need,
        is_victim=is_victim,
        any_victim=jnp.any(is_victim),
        num_tokens=_sum_i32(jnp.where(is_scheduled, take, 0)),
        freed_blocks=_sum_i32(jnp.where(is_victim, slots.held, 0)),
        needed_blocks=_sum_i32(jnp.where(is_scheduled, need, 0)),
    )


def _admit(
    inputs: LaneInputs, st: LaneState, win: _Window, q: _Queues, sch: _Schedule
) -> _Admission:
    """Admission from the waiting queue (preempted requests, then new arrivals), stopping at
    the first request that breaks the sequence, page or token limit."""
    num_slots = st.slots.req.shape[0]
    iota = jnp.arange(num_slots, dtype=jnp.int32)
    chunked = inputs.chunked_prefill > 0
    budget = inputs.max_num_batched_tokens
    first_pre = jnp.min(jnp.where(q.is_preempted, iota, num_slots - 1))
    head_len = jnp.where(
        q.num_preempted > 0,
        q.seq_len[first_pre],
        jnp.where(q.num_new_waiting > 0, win.prompt[0], 0),
    )
    token_room = jnp.where(chunked, budget - sch.num_tokens, jnp.maximum(budget, head_len))
    block_room = (
        jnp.where(chunked, st.free_blocks + sch.freed_blocks - sch.needed_blocks, st.free_blocks)
        - inputs.watermark_blocks
    )
    # With chunked prefill the sequence budget counts the running sequences kept.
    seq_room = inputs.max_num_seqs - jnp.where(chunked, _sum_i32(sch.is_scheduled), q.num_running)

    # Preempted requests, by prefix sums over slots.
    pre_len = jnp.where(q.is_preempted, q.seq_len, 0)
    pre_cum = jnp.cumsum(pre_len)
    pre_before = pre_cum - pre_len
    pre_tokens_fit = jnp.where(chunked, pre_before < token_room, pre_cum <= token_room)
    pre_blocks = jnp.where(q.is_preempted, _ceil_div(q.seq_len, inputs.block_size), 0)
    is_admitted = (
        q.is_preempted
        & pre_tokens_fit
        & (jnp.cumsum(q.is_preempted.astype(jnp.int32)) <= seq_room)
        & (jnp.cumsum(pre_blocks) <= block_room)
    )
    chunk = jnp.where(is_admitted, jnp.minimum(q.seq_len, token_room - pre_before), 0)
    num_pre = _sum_i32(is_admitted)
    pre_tokens = _sum_i32(chunk)
    pre_block_total = _sum_i32(jnp.where(is_admitted, pre_blocks, 0))

    # New requests, by prefix sums over the window; only once every preempted one is in.
    tokens_left = token_room - pre_tokens
    fit_tokens = jnp.where(
        chunked,
        _sum_i32(win.tokens_before[:-1] < tokens_left),
        _sum_i32(win.tokens_before[1:] <= tokens_left),
    )
    fit_blocks = _sum_i32(win.blocks_before[1:] <= block_room - pre_block_total)
    num_new = jnp.minimum(q.num_new_waiting, seq_room - num_pre)
    num_new = jnp.minimum(num_new, jnp.minimum(fit_tokens, fit_blocks))
    num_new = jnp.where(num_pre == q.num_preempted, jnp.maximum(num_new, 0), 0)
    slot_room = num_slots - q.num_in_system
    is_overflow = num_new > slot_room
    num_new = jnp.minimum(num_new, slot_room)
    new_tokens = jnp.minimum(win.tokens_before[num_new], tokens_left)
    last = jnp.maximum(num_new - 1, 0)
    return _Admission(
        is_admitted=is_admitted,
        chunk=chunk,
        num_preempted=num_pre,
        preempted_tokens=pre_tokens,
        preempted_blocks=pre_block_total,
        num_new=num_new,
        new_tokens=new_tokens,
        new_blocks=win.blocks_before[num_new],
        last=last,
        last_chunk=jnp.where(num_new > 0, new_tokens - win.tokens_before[last], 0),
        num_admitted=num_pre + num_new,
        is_overflow=is_overflow,
    )


def _batch_features(
    inputs: LaneInputs, st: LaneState, win: _Window, q: _Queues, sch: _Schedule, adm: _Admission
) -> _Batch:
    """The batch (with chunked prefill off, an iteration that admits runs only those
    prefills) and its tokens, sampled tokens, prefill pairs, KV length and time parts."""
    i32 = jnp.int32
    f64 = jnp.float64
    is_prefill_only = (inputs.chunked_prefill <= 0) & (adm.num_admitted > 0)
    is_scheduled = sch.is_scheduled & ~is_prefill_only
    is_victim = sch.is_victim & ~is_prefill_only
    is_decoding = is_scheduled & q.is_decoding
    is_prefilling = is_scheduled & q.is_prefilling
    batch_size = _sum_i32(is_decoding)
    fill_take = jnp.where(is_prefilling, sch.take, 0)
    fill_done = (q.seq_len - st.slots.pending).astype(f64)
    fill_take_f = fill_take.astype(f64)
    pre_chunk_f = adm.chunk.astype(f64)
    last_chunk_f = adm.last_chunk.astype(f64)
    pairs = (
        jnp.sum(fill_take_f * fill_done + fill_take_f * (fill_take_f + 1.0) / 2.0)
        + jnp.sum(pre_chunk_f * (pre_chunk_f + 1.0) / 2.0)
        + jnp.where(
            adm.num_new > 0,
            win.pairs_before[adm.last] + last_chunk_f * (last_chunk_f + 1.0) / 2.0,
            0.0,
        )
    )
    last_is_whole = (adm.last_chunk == win.prompt[adm.last]).astype(i32)
    num_sampled = (
        batch_size
        + _sum_i32(is_prefilling & (sch.take == st.slots.pending))
        + _sum_i32(adm.is_admitted & (adm.chunk == q.seq_len))
        + jnp.where(adm.num_new > 0, adm.num_new - 1 + last_is_whole, 0)
    )
    num_tokens = batch_size + _sum_i32(fill_take) + adm.preempted_tokens + adm.new_tokens
    kv_tokens = jnp.sum(jnp.where(is_decoding, q.seq_len, 0), dtype=f64)
    parts = decode_time_parts_s(
        inputs.coeffs,
        num_tokens.astype(f64),
        num_sampled.astype(f64),
        pairs,
        batch_size.astype(f64),
        kv_tokens,
    )
    is_pure_decode = (
        (adm.num_admitted == 0)
        & ~jnp.any(is_prefilling)
        & ~jnp.any(is_victim)
        & (batch_size == q.num_running)
    )
    return _Batch(
        is_decoding=is_decoding,
        is_prefilling=is_prefilling,
        fill_take=fill_take,
        is_victim=is_victim,
        batch_size=batch_size,
        num_tokens=num_tokens,
        num_sampled=num_sampled,
        prefill_pairs=pairs,
        kv_tokens=kv_tokens,
        base_s=parts.base_s,
        slope_s_per_kv_token=parts.slope_s_per_kv_token,
        kv_tokens_end=parts.kv_tokens_end,
        is_pure_decode=is_pure_decode,
        has_work=(adm.num_admitted > 0) | jnp.any(is_scheduled),
    )


def _run_length(
    inputs: LaneInputs,
    st: LaneState,
    win: _Window,
    q: _Queues,
    sch: _Schedule,
    b: _Batch,
    *,
    max_iters: int,
):
    """Iterations this step covers (``[]`` int32): a pure decode batch repeats until a
    sequence finishes, pages may run short, an arrival could join, the KV total passes the
    end of the cost's affine piece (a decode-attention breakpoint), the iteration cap, or
    the power model switches sides; any other batch runs once, an empty one not at all."""
    slots = st.slots
    k_finish = jnp.min(jnp.where(b.is_decoding, slots.output - slots.gen, _BIG_INT))
    # Each sequence opens at most ceil((k - 1) / block_size) pages after the first iteration;
    # within k <= block_size * floor((spare - 1) / batch) + 1 iterations a page stays free
    # whenever a sequence is considered, so nobody is preempted.
    spare = st.free_blocks - sch.needed_blocks
    k_pages = inputs.block_size * ((spare - 1) // jnp.maximum(b.batch_size, 1)) + 1
    # An arrival can change the schedule only when nobody is waiting: waiting requests were
    # not admitted, and FCFS keeps a later arrival behind them while pages only shrink.
    next_arrival_s = jnp.where(
        (q.num_new_waiting == 0) & (q.num_sendable > 0), win.arrival_s[0], NEVER
    )
    k_arrival = _first_iteration_at_or_after(b, next_arrival_s - q.now_s)
    # Iteration j of the run reads kv_tokens + j * batch KV entries; its piece holds up to
    # kv_tokens_end inclusive (the pieces meet there).
    room = (b.kv_tokens_end - b.kv_tokens) / jnp.maximum(b.batch_size, 1).astype(jnp.float64)
    k_piece = (jnp.floor(jnp.minimum(room, float(_BIG_INT - 1))) + 1.0).astype(jnp.int32)
    k = jnp.minimum(jnp.minimum(k_finish, k_pages), jnp.minimum(k_arrival, k_piece))
    k = jnp.maximum(jnp.minimum(k, max_iters - st.num_iters), 1)
    # Power follows min(busy, iteration time); inside one step the min must not switch
    # sides, so a decode run stops where it would (busy and time are both affine in j).
    busy0, busy_step, time0, time_step = _busy_and_time(inputs.energy, b)
    k = jnp.minimum(k, _first_crossing(time0 - busy0, time_step - busy_step))
    k = jnp.where(b.is_pure_decode, k, 1)
    return jnp.where(b.has_work, k, 0)


def _run_cost(inputs: LaneInputs, b: _Batch, num_iters) -> _Run:
    """Wall time and above-idle energy of ``num_iters`` iterations of the batch (idle power
    is added for the whole makespan afterwards, once per GPU)."""
    e = inputs.energy
    k = num_iters.astype(jnp.float64)
    duration_s = _run_time_s(b, k)
    busy0, busy_step, time0, _ = _busy_and_time(e, b)
    run_busy = k * busy0 + busy_step * k * (k - 1.0) / 2.0
    busy_s = jnp.where(
        b.is_pure_decode,
        jnp.where(time0 - busy0 >= 0.0, run_busy, duration_s),
        jnp.minimum(
            _busy(e, b.num_tokens.astype(jnp.float64), b.prefill_pairs, b.kv_tokens), duration_s
        ),
    )
    return _Run(num_iters, duration_s, e.num_gpus * e.dynamic_w * busy_s)


def _apply(
    inputs: LaneInputs,
    st: LaneState,
    win: _Window,
    q: _Queues,
    sch: _Schedule,
    adm: _Admission,
    b: _Batch,
    run: _Run,
) -> LaneState:
    """The state after the step's iterations: victims preempted, admitted requests placed
    after the occupied slots, every sequence's tokens, pages and first-token time updated.
    Finished sequences are still in their slots."""
    slots = st.slots
    k = run.num_iters
    now_s = q.now_s + run.duration_s
    iota = jnp.arange(slots.req.shape[0], dtype=jnp.int32)
    is_new = (iota >= q.num_in_system) & (iota < q.num_in_system + adm.num_new)
    is_last_new = iota == q.num_in_system + adm.num_new - 1
    new_pos = jnp.clip(iota - q.num_in_system, 0, win.prompt.shape[0] - 1)
    admitted = adm.is_admitted | is_new
    prompt = jnp.where(is_new, win.prompt[new_pos], slots.prompt)
    gen0 = jnp.where(is_new, 0, slots.gen)
    len0 = prompt + gen0
    admit_chunk = jnp.where(
        adm.is_admitted,
        adm.chunk,
        jnp.where(is_new, jnp.where(is_last_new, adm.last_chunk, len0), 0),
    )
    pending = jnp.where(
        admitted,
        len0 - admit_chunk,
        jnp.where(
            b.is_prefilling,
            slots.pending - sch.take,
            jnp.where(b.is_victim, 0, slots.pending),
        ),
    )
    completes = (admitted | b.is_prefilling) & (pending == 0)
    gen = gen0 + jnp.where(b.is_decoding, k, 0) + completes.astype(jnp.int32)
    held_dec = jnp.maximum(slots.held, _ceil_div(q.seq_len + k - 1, inputs.block_size))
    held = jnp.where(
        admitted,
        _ceil_div(len0, inputs.block_size),
        jnp.where(b.is_victim, 0, jnp.where(b.is_decoding, held_dec, slots.held)),
    )
    free_blocks = (
        st.free_blocks
        + _sum_i32(jnp.where(b.is_victim, slots.held, 0))
        - _sum_i32(jnp.where(b.is_decoding, held_dec - slots.held, 0))
        - adm.preempted_blocks
        - adm.new_blocks
    )
    return st._replace(
        now_s=now_s,
        next_req=st.next_req + adm.num_new,
        num_iters=st.num_iters + k,
        num_preemptions=st.num_preemptions + _sum_i32(b.is_victim),
        dynamic_energy_j=st.dynamic_energy_j + run.dynamic_energy_j,
        free_blocks=free_blocks,
        slots=Slots(
            req=jnp.where(is_new, st.next_req + new_pos, slots.req),
            prompt=prompt,
            output=jnp.where(is_new, win.output[new_pos], slots.output),
            gen=gen,
            pending=pending,
            held=held,
            is_running=(slots.is_running | admitted) & ~b.is_victim,
            first_token_s=jnp.where((gen0 == 0) & (gen > 0), now_s, slots.first_token_s),
        ),
    )


def _retire(st: LaneState):
    """Sequences that yielded their last token finish now: their first-token and finish
    times are recorded (only while the lane is live) and their pages freed.

    Returns:
        The state (finished sequences still in their slots) and the ``[S]`` bool mask of
        slots that stay in the system.
    """
    slots = st.slots
    occupied = jnp.arange(slots.req.shape[0], dtype=jnp.int32) < st.next_req - st.num_finished
    is_finishing = occupied & slots.is_running & (slots.pending == 0) & (slots.gen >= slots.output)
    # A masked scatter: selecting the per-request arrays of a dead lane whole would copy
    # O(N) per lane per step.
    target = jnp.where(is_finishing & (st.status == LIVE), slots.req, st.finish_s.shape[0])
    retired = st._replace(
        num_finished=st.num_finished + _sum_i32(is_finishing),
        free_blocks=st.free_blocks + _sum_i32(jnp.where(is_finishing, slots.held, 0)),
        first_token_s=st.first_token_s.at[target].set(slots.first_token_s, mode="drop"),
        finish_s=st.finish_s.at[target].set(st.now_s, mode="drop"),
    )
    return retired, occupied & ~is_finishing


def _next_order(q: _Queues, adm: _Admission, b: _Batch):
    """Each slot's place in the next iteration's queues (``[S]`` int32, the reference's
    :func:`~apex_jax.reference._compact`): 0 running and untouched, 1 decoded, 2 prefilled a
    chunk, 3 admitted (the running queue, in this order); 4 preempted now, 5 still waiting."""
    iota = jnp.arange(q.is_running.shape[0], dtype=jnp.int32)
    is_new = (iota >= q.num_in_system) & (iota < q.num_in_system + adm.num_new)
    return jnp.select(
        [b.is_decoding, b.is_prefilling, adm.is_admitted | is_new, b.is_victim, q.is_running],
        [1, 2, 3, 4, 0],
        _NUM_PLACES - 1,
    ).astype(jnp.int32)


def _compact(slots: Slots, is_kept, order) -> Slots:
    """Move the kept slots to the front, stably sorted by ``order`` (:func:`_next_order`),
    and empty the rest."""
    num_slots = slots.req.shape[0]
    is_member = (order[:, None] == jnp.arange(_NUM_PLACES)) & is_kept[:, None]  # [S, places]
    rank = jnp.cumsum(is_member, axis=0, dtype=jnp.int32)
    start = jnp.cumsum(rank[-1]) - rank[-1]
    dest = jnp.where(is_kept, jnp.sum(jnp.where(is_member, start + rank - 1, 0), axis=1), num_slots)
    return jax.tree.map(
        lambda x, fill: jnp.full_like(x, fill).at[dest].set(x, mode="drop"), slots, _EMPTY_SLOT
    )


def _status(
    inputs: LaneInputs, st: LaneState, sch: _Schedule, adm: _Admission, b: _Batch, *, max_iters: int
):
    """Status after a step (``[]`` int32): OK once every request finished; INFEASIBLE if
    nothing could run or be preempted; MAX_ITERS at the cap; SLOT_OVERFLOW if the slots
    were too few (the caller reruns with more)."""
    status = jnp.where(st.num_finished >= inputs.num_requests, OK, LIVE)
    status = jnp.where((status == LIVE) & ~b.has_work & ~sch.any_victim, INFEASIBLE, status)
    status = jnp.where((status == LIVE) & (st.num_iters >= max_iters), MAX_ITERS, status)
    return jnp.where(adm.is_overflow, SLOT_OVERFLOW, status).astype(jnp.int32)


def step(inputs: LaneInputs, st: LaneState, *, max_iters: int) -> LaneState:
    """Advance one lane by one event: an idle jump plus one iteration, or a run of identical
    decode iterations. A lane that is not live is returned unchanged."""
    win = _window(inputs, st.next_req, st.slots.req.shape[0] + 1)
    q = _queues(inputs, st, win)
    sch = _schedule_running(inputs, st, q)
    adm = _admit(inputs, st, win, q, sch)
    b = _batch_features(inputs, st, win, q, sch, adm)
    run = _run_cost(inputs, b, _run_length(inputs, st, win, q, sch, b, max_iters=max_iters))
    new, is_kept = _retire(_apply(inputs, st, win, q, sch, adm, b, run))
    new = new._replace(
        slots=_compact(new.slots, is_kept, _next_order(q, adm, b)),
        status=_status(inputs, new, sch, adm, b, max_iters=max_iters),
    )
    # The per-request arrays were written for live lanes only (in _retire).
    live = st.status == LIVE
    kept = jax.tree.map(
        lambda x, y: jnp.where(live, x, y),
        new._replace(first_token_s=None, finish_s=None),
        st._replace(first_token_s=None, finish_s=None),
    )
    return kept._replace(first_token_s=new.first_token_s, finish_s=new.finish_s)


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


def run_lanes(inputs: LaneInputs, *, num_slots: int, max_iters: int) -> LaneResult:
    """Simulate every lane of a batch to completion.

    One outer ``while_loop`` over the lane-major state, with :func:`step` vmapped inside,
    stops when no lane is live. ``vmap`` of a per-lane ``while_loop`` would instead select
    the whole carry of every lane at every step (notes/jax-on-cpu.md).

    Args:
        inputs: :class:`LaneInputs` with a leading lane axis ``[L, ...]``.
        num_slots: static slot capacity, at least every lane's ``max_num_seqs``.
        max_iters: static iteration cap per lane.

    Returns:
        :class:`LaneResult`, fields ``[L, ...]``.
    """
    state = jax.vmap(lambda x: init_state(x, num_slots=num_slots))(inputs)
    inputs = _pad_requests(inputs, num_slots + 2)
    batched_step = jax.vmap(lambda x, s: step(x, s, max_iters=max_iters))

    def cond(s):
        return jnp.any(s.status == LIVE)

    final = jax.lax.while_loop(cond, lambda s: batched_step(inputs, s), state)
    return LaneResult(*(getattr(final, name) for name in LaneResult._fields))
