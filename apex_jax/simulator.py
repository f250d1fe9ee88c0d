"""The batching recurrence of one serving replica, as a JAX loop.

Semantics are those of :mod:`apex_jax.reference` (read its docstring first); this module
reproduces them request by request, with three changes that only affect speed:

- A replica of ``pp`` pipeline stages runs ``pp`` virtual engines in rounds (reference rule
  7). Only an engine whose batch may change is scheduled again (its *event*): its decode run
  ended (a sequence finishes, pages may run short, the KV total reaches the end of the
  decode-attention cost's affine piece), an arrival could join it, or its batch was not a
  pure decode and ran its one round. Every other engine keeps its batch as a closed-form
  descriptor (:class:`EngineRun`): its own iteration time and busy time grow by a fixed
  amount per round, because only the KV lengths grow. A step schedules at most one engine,
  so it costs one engine's phases however deep the pipeline.
- A run of rounds with unchanged batches is advanced in one step. A round lasts the largest
  of the engines' own iteration times and the stages' loads, each affine in the round, so
  the run's time is an arithmetic series while the same term is the largest; the run stops
  where another term takes over, at any engine's event, or where the power model switches
  sides. An engine's slots see the first round of a batch when it is scheduled, and the
  rest of a decode run (tokens, pages) at its next event; every time its requests record is
  the end of its run, written then.
- Admission of never-admitted requests uses prefix sums over the trace and binary search
  instead of a walk.

Each engine also records what its run needed of its limits (:class:`EngineState`,
``*_needed``): the same lane under any limits between these and its own makes every
scheduling decision the same, so :func:`apex_jax.evaluate.evaluate_cases` copies its result instead of
simulating it.

Arrival times are state (``ReplicaState.arrival_s``): a closed loop's later requests get
theirs as requests finish (:func:`_send`), so admission treats them as known open-loop
arrivals.

Each virtual engine's requests in the system (running or preempted) live in fixed-size
slots ``[S]``, kept compact and in queue order (the running queue, then the preempted front
of the waiting queue), so admission and preemption are prefix sums over slots. A replica's
state has one row per virtual engine ``[V, ...]`` (``V = 1`` without pipeline parallelism);
:func:`step` is written for one replica, and :func:`run_lanes` vmaps it inside a single
outer ``while_loop`` over the batched state, which stops when no replica is live.

The phases of scheduling one engine have the reference's names, so that a disagreement
points at one of them: :func:`_queues` (the running set and the waiting queue at the round's
start), :func:`_schedule_running` (the running sequences within the token budget, and
preemption victims), :func:`_admit` (admission from the waiting queue),
:func:`_batch_features` (the batch and what its cost depends on), :func:`_apply` (the state
after the batch's first round), :func:`_retire` (finished requests) and :func:`_compact`
(slots in the next queue order); :func:`_round_series` is the reference's
``_round_time_s`` and :func:`_advance` runs the rounds (wall time and energy). Phases that
exist only here: :func:`_window` (the next never-admitted requests), :func:`_describe` (the
engine's run descriptor and how long it may repeat), :func:`_decode_rounds` (the rest of a
decode run) and the run length inside :func:`_advance`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from apex_jax.cost.energy import MEMORY_POWER_WEIGHT, EnergyCoeffs
from apex_jax.cost.iteration import CostCoeffs, decode_time_parts_s, pipeline_parts_s
from apex_jax.status import INFEASIBLE, LIVE, MAX_ITERS, OK, SLOT_OVERFLOW

__all__ = [
    "EMPTY",
    "NEVER",
    "EngineRun",
    "EngineState",
    "LaneInputs",
    "LaneResult",
    "ReplicaState",
    "Slots",
    "cached_prefix_tokens",
    "engine_arrivals",
    "init_state",
    "make_lane_inputs",
    "run_lanes",
    "stack_lanes",
    "stack_replicas",
    "step",
]

EMPTY = -1  # slot holds no request
NEVER = jnp.inf  # time of an event that will not happen
_BIG_INT = 2**30  # "unbounded" round count; far above any cap
_NUM_PLACES = 6  # classes of _next_order
# A slot's first-token time while its batch's round is still running: the end of the
# engine's run, written at its next event (times are never negative).
_AT_RUN_END = -1.0
# Per-request fields of LaneInputs: only _window and _send read them, a few entries per step
# (arrival_s and sent_s only seed the state).
_REQUEST_FIELDS = (
    "sent_s",
    "arrival_s",
    "delay_s",
    "think_frac",
    "prompt",
    "cached",
    "output",
    "cum_prompt",
    "cum_blocks",
    "cum_pairs",
)


class LaneInputs(NamedTuple):
    """Everything one virtual engine reads; fields gain leading axes when batched (``[V]``
    in a replica, ``[R, V]`` in a batch)."""

    sent_s: jax.Array  # [N] float64, send times known before simulating; +inf for the rest
    arrival_s: jax.Array  # [N] float64, engine_arrivals(sent_s, delay_s); padding is +inf
    delay_s: jax.Array  # [N] float64, from a request's send to its arrival at the engine
    think_frac: jax.Array  # [N] float64, closed loop: send waits this fraction of the release time
    prompt: jax.Array  # [N] int32
    cached: jax.Array  # [N] int32, prompt tokens a first admission finds in the prefix cache
    output: jax.Array  # [N] int32
    cum_prompt: jax.Array  # [N + 1] int32, prefix sums of prompt - cached (tokens to compute)
    cum_blocks: jax.Array  # [N + 1] int32, prefix sums of ceil(prompt / block_size)
    # [N + 1] float64, prefix sums of the computed tokens' pairs, (p (p + 1) - c (c + 1)) / 2
    cum_pairs: jax.Array
    num_requests: jax.Array  # [] int32, real (unpadded) requests
    gate: jax.Array  # [] int32, closed-loop clients (requests sent at t = 0); N for open loop
    max_num_seqs: jax.Array  # [] int32
    max_num_batched_tokens: jax.Array  # [] int32
    block_size: jax.Array  # [] int32
    num_kv_blocks: jax.Array  # [] int32
    watermark_blocks: jax.Array  # [] int32
    chunked_prefill: jax.Array  # [] int32, 1 = chunked prefill on
    stage_share: jax.Array  # [P] float64, the replica's stages' fractions of the layers; 0 past pp
    initial_status: jax.Array  # [] int32, LIVE or a status decided before simulation
    coeffs: CostCoeffs  # one plan's: fields [] float64, slopes [K]
    energy: EnergyCoeffs  # one plan's: fields [] float64


class Slots(NamedTuple):
    """The requests in an engine's system, one per slot, compact: the running queue, then
    the preempted requests in waiting order; slots ``>= next_req - num_finished`` are empty."""

    req: jax.Array  # [S] int32, request id or EMPTY
    prompt: jax.Array  # [S] int32
    output: jax.Array  # [S] int32
    gen: jax.Array  # [S] int32, tokens generated so far
    pending: jax.Array  # [S] int32, prefill tokens still to compute (0 when decoding)
    held: jax.Array  # [S] int32, KV pages held
    is_running: jax.Array  # [S] bool, False = preempted, waiting for recompute
    first_token_s: jax.Array  # [S] float64, _AT_RUN_END until the round that yields it ends


# What a slot holds once its request is gone (one value per Slots field).
_EMPTY_SLOT = Slots(EMPTY, 0, 0, 0, 0, 0, False, 0.0)


class EngineState(NamedTuple):
    """One virtual engine's requests and counters, as of its last event (its slots have
    seen the first round of its current batch)."""

    next_req: jax.Array  # [] int32, first request never admitted
    num_finished: jax.Array  # [] int32
    num_iters: jax.Array  # [] int32, engine iterations simulated
    num_preemptions: jax.Array  # [] int32
    dynamic_energy_j: jax.Array  # [] float64, above-idle energy of the replica's GPUs
    free_blocks: jax.Array  # [] int32
    # What the run needed of its limits so far (_record_needs), each at most the limit: the
    # most sequences max_num_seqs counted in a batch; the most tokens an iteration asked for (every running
    # sequence's next tokens and the admitted prompts whole); the most KV pages held after a
    # round plus one, against the pages above the watermark (all of these once a sequence
    # was preempted).
    seqs_needed: jax.Array  # [] int32
    tokens_needed: jax.Array  # [] int32
    pages_needed: jax.Array  # [] int32
    slots: Slots  # fields [S]


class EngineRun(NamedTuple):
    """A virtual engine's batch since its last event, the same every round until its next:
    round ``r`` of the run (``r = 0, 1, ...``) takes ``own0_s + r * own_step_s`` through
    the whole pipeline and ``busy0_s + r * busy_step_s`` of power-weighted busy time."""

    has_work: jax.Array  # [] bool, the batch computes anything
    is_pure_decode: jax.Array  # [] bool, every running sequence decodes, nothing else runs
    is_stuck: jax.Array  # [] bool, requests wait but nothing can run or be preempted
    num_victims: jax.Array  # [] int32, preempted by the batch (counted when its round runs)
    num_rounds: jax.Array  # [] int32, rounds run since the event
    rounds_left: jax.Array  # [] int32, rounds before the next event; _BIG_INT: none pending
    wake_s: jax.Array  # [] float64, an arrival that reschedules it at the first round
    #   starting at or after it; NEVER if none can change its batch
    own0_s: jax.Array  # [] float64
    own_step_s: jax.Array  # [] float64
    off_s: jax.Array  # [] float64, of own time on no stage: host and stage transfers
    last_s: jax.Array  # [] float64, of own time on the last stage only: LM head, sampling
    busy0_s: jax.Array  # [] float64
    busy_step_s: jax.Array  # [] float64
    order: jax.Array  # [S] int32, each slot's place in the queues after the batch


class ReplicaState(NamedTuple):
    """Loop carry of one replica: its virtual engines (``V`` rows) sharing one clock."""

    now_s: jax.Array  # [] float64, the current round boundary
    status: jax.Array  # [] int32, LIVE while simulating
    is_due: jax.Array  # [V] bool, the engine is scheduled again at this boundary
    engines: EngineState  # fields [V, ...]
    runs: EngineRun  # fields [V, ...]
    first_token_s: jax.Array  # [V, N] float64, NaN until the request finishes
    finish_s: jax.Array  # [V, N] float64, NaN until the request finishes
    sent_s: jax.Array  # [V, N] float64, +inf until a closed loop sends the request
    arrival_s: jax.Array  # [V, N + S + 2] float64, at the engine; +inf until sent and padding


class LaneResult(NamedTuple):
    """What simulating one virtual engine gives; fields gain leading axes when batched
    (``[R, V]`` from :func:`run_lanes`).

    Returned by :func:`run_lanes` (JAX arrays) and by
    :func:`apex_jax.reference.simulate_reference` (Python numbers, NumPy arrays).
    """

    status: jax.Array  # [] int32, a code of apex_jax.status (its replica's)
    first_token_s: jax.Array  # [N] float64, NaN for unfinished requests
    finish_s: jax.Array  # [N] float64, NaN for unfinished requests
    sent_s: jax.Array  # [N] float64, when each request was sent (TTFT counts from it)
    num_iters: jax.Array  # [] int32, engine iterations simulated
    num_preemptions: jax.Array  # [] int32
    dynamic_energy_j: jax.Array  # [] float64, above-idle energy of the replica's GPUs
    # What the run needed of its limits (EngineState): the same lane under a max_num_seqs,
    # token budget and KV pages above the watermark between these and its own (and no more
    # pages nor a lower watermark than its own) runs exactly the same.
    seqs_needed: jax.Array  # [] int32
    tokens_needed: jax.Array  # [] int32
    pages_needed: jax.Array  # [] int32


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
    delay_s=0.0,
    think_frac=0.0,
    initial_status: int = LIVE,
    stage_layers: Sequence[int] = (1,),
    num_stages: int | None = None,
    cached_tokens=0,
) -> LaneInputs:
    """Build one lane's inputs in NumPy, padded to ``num_requests``.

    Args:
        arrival_s, prompt_tokens, output_tokens: the replica's ``[n]`` requests, by arrival.
            ``arrival_s`` are send times; a closed loop sends its first ``concurrency`` then.
        limits: engine limits (see :class:`apex_jax.reference.EngineLimits`).
        coeffs: the plan's cost coefficients (batch shape ``()``).
        energy: the plan's power-model constants (default: zeros, no energy).
        num_requests: padded request capacity ``N >= n`` (a static shape).
        concurrency: closed-loop clients; 0 for open loop.
        delay_s: ``[n]`` or scalar seconds from each request's send to its arrival at the
            engine (see :func:`engine_arrivals`); 0 sends straight into the engine.
        think_frac: ``[n]`` or scalar; in a closed loop, a request released at time ``t`` (by
            a finish) is sent at ``t (1 + think_frac)`` (see :func:`_send`); 0 sends it at once.
        initial_status: ``LIVE``, or a status decided before simulation (OOM, INFEASIBLE).
        stage_layers: layers of each pipeline stage of the replica (``pp`` entries).
        num_stages: padded stage count ``P >= pp`` (a static shape; default ``pp``).
        cached_tokens: ``[n]`` or scalar prompt tokens of each request whose KV the prefix
            cache holds when it is first admitted (:func:`cached_prefix_tokens` keeps the
            whole blocks the engine can reuse).
    """
    n = len(arrival_s)
    pp = len(stage_layers)
    num_stages = pp if num_stages is None else num_stages
    if n > num_requests:
        raise ValueError(f"lane has {n} requests but the padded capacity is {num_requests}")
    if not 1 <= pp <= num_stages or min(stage_layers) < 1:
        raise ValueError(f"stage layers {list(stage_layers)} do not fit {num_stages} stages")
    share = np.zeros(num_stages)
    share[:pp] = np.asarray(stage_layers, np.float64) / float(sum(stage_layers))
    sent = np.full(num_requests, np.inf)
    delay = np.zeros(num_requests)
    think = np.zeros(num_requests)
    prompt = np.zeros(num_requests, np.int32)
    output = np.ones(num_requests, np.int32)
    num_sent = min(concurrency, n) if concurrency > 0 else n
    sent[:num_sent] = np.asarray(arrival_s, np.float64)[:num_sent]
    delay[:n] = delay_s
    think[:n] = think_frac
    prompt[:n] = prompt_tokens
    output[:n] = output_tokens
    bs = int(limits["block_size"])
    cached = np.zeros(num_requests, np.int32)
    cached[:n] = cached_prefix_tokens(prompt[:n], cached_tokens, bs)
    computed = prompt - cached
    pairs = (prompt * (prompt + 1.0) - cached * (cached + 1.0)) / 2.0
    zero = np.zeros(1, np.int64)
    i32 = np.int32
    return LaneInputs(
        sent_s=sent,
        arrival_s=engine_arrivals(sent, delay),
        delay_s=delay,
        think_frac=think,
        prompt=prompt,
        cached=cached,
        output=output,
        cum_prompt=np.concatenate([zero, np.cumsum(computed, dtype=np.int64)]).astype(i32),
        cum_blocks=np.concatenate([zero, np.cumsum(-(-prompt // bs), dtype=np.int64)]).astype(i32),
        cum_pairs=np.concatenate([[0.0], np.cumsum(pairs)]),
        num_requests=i32(n),
        gate=i32(concurrency if concurrency > 0 else n),
        max_num_seqs=i32(limits["max_num_seqs"]),
        max_num_batched_tokens=i32(limits["max_num_batched_tokens"]),
        block_size=i32(bs),
        num_kv_blocks=i32(limits["num_kv_blocks"]),
        watermark_blocks=i32(limits["watermark_blocks"]),
        chunked_prefill=i32(limits.get("chunked_prefill", 0)),
        stage_share=share,
        initial_status=i32(initial_status),
        coeffs=jax.tree_util.tree_map(_host_f64, coeffs),
        energy=jax.tree_util.tree_map(
            _host_f64, EnergyCoeffs.zeros() if energy is None else energy
        ),
    )


def _host_f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def cached_prefix_tokens(prompt_tokens, cached_tokens, block_size: int) -> np.ndarray:
    """The prompt tokens a request's prefill skips, ``[n]`` int32: of the ``cached_tokens``
    (``[n]`` or scalar) of its prompt (``[n]``) whose KV the prefix cache holds, the whole
    blocks of ``block_size`` tokens, and never the prompt's last token, which the engine
    computes to sample the first output token (vLLM V1's ``KVCacheManager`` looks up at
    most ``prompt - 1`` tokens, in full blocks). The request still attends over its whole
    prompt and holds its pages: only the computation of the cached tokens is saved."""
    prompt = np.asarray(prompt_tokens, np.int64)
    cached = np.minimum(np.broadcast_to(np.asarray(cached_tokens, np.int64), prompt.shape), prompt - 1)
    return (np.maximum(cached, 0) // int(block_size) * int(block_size)).astype(np.int32)


def engine_arrivals(sent_s, delay_s) -> np.ndarray:
    """When requests sent at ``sent_s`` (``[n]``, non-decreasing) reach the engine: each after
    its own ``delay_s`` (``[n]``), but not before the request sent ahead of it, because the
    frontend passes requests on in the order it got them: ``a_i = max(s_i + d_i, a_{i-1})``.
    The engine applies the same rule to the requests a closed loop sends as it runs."""
    return np.maximum.accumulate(np.asarray(sent_s, np.float64) + np.asarray(delay_s, np.float64))


def stack_lanes(lanes: list[LaneInputs]) -> LaneInputs:
    """Stack single-lane inputs along a new leading lane axis."""
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *lanes)


def stack_replicas(replicas: list[list[LaneInputs]]) -> LaneInputs:
    """Stack replicas of ``V`` virtual engines each into inputs ``[R, V, ...]``."""
    num_engines = len(replicas[0])
    if any(len(engines) != num_engines for engines in replicas):
        raise ValueError("every replica must have the same number of virtual engines")
    # One stack per field over every lane, then split the lane axis: a stack per replica
    # and field costs a NumPy call each, thousands per chunk.
    flat = stack_lanes([lane for engines in replicas for lane in engines])
    return jax.tree_util.tree_map(
        lambda x: x.reshape((len(replicas), num_engines) + x.shape[1:]), flat
    )


def _num_padding(num_slots: int) -> int:
    """Requests padded past the end, so that windows (``num_slots + 1`` requests) from any
    ``next_req <= N`` stay in bounds."""
    return num_slots + 2


def init_state(inputs: LaneInputs, *, num_slots: int) -> ReplicaState:
    """Empty system at t = 0 for one replica (``inputs`` fields ``[V, ...]``): live while any
    of its engines is, every live engine due to be scheduled."""
    num_engines, n = inputs.arrival_s.shape
    i32 = jnp.int32
    f64 = jnp.float64
    zeros_v = jnp.zeros(num_engines, i32)
    zeros_vs = jnp.zeros((num_engines, num_slots), i32)
    is_live = inputs.initial_status == LIVE
    return ReplicaState(
        now_s=jnp.zeros((), f64),
        status=jnp.where(jnp.any(is_live), LIVE, inputs.initial_status[0]).astype(i32),
        is_due=is_live,
        engines=EngineState(
            next_req=zeros_v,
            num_finished=zeros_v,
            num_iters=zeros_v,
            num_preemptions=zeros_v,
            dynamic_energy_j=jnp.zeros(num_engines, f64),
            free_blocks=inputs.num_kv_blocks.astype(i32),
            seqs_needed=zeros_v,
            tokens_needed=zeros_v,
            pages_needed=zeros_v,
            slots=Slots(
                req=jnp.full((num_engines, num_slots), EMPTY, i32),
                prompt=zeros_vs,
                output=zeros_vs,
                gen=zeros_vs,
                pending=zeros_vs,
                held=zeros_vs,
                is_running=jnp.zeros((num_engines, num_slots), bool),
                first_token_s=jnp.zeros((num_engines, num_slots), f64),
            ),
        ),
        runs=EngineRun(
            has_work=jnp.zeros(num_engines, bool),
            is_pure_decode=jnp.zeros(num_engines, bool),
            is_stuck=jnp.zeros(num_engines, bool),
            num_victims=zeros_v,
            num_rounds=zeros_v,
            rounds_left=jnp.full(num_engines, _BIG_INT, i32),
            wake_s=jnp.full(num_engines, NEVER, f64),
            own0_s=jnp.zeros(num_engines, f64),
            own_step_s=jnp.zeros(num_engines, f64),
            off_s=jnp.zeros(num_engines, f64),
            last_s=jnp.zeros(num_engines, f64),
            busy0_s=jnp.zeros(num_engines, f64),
            busy_step_s=jnp.zeros(num_engines, f64),
            order=zeros_vs,
        ),
        first_token_s=jnp.full((num_engines, n), jnp.nan, f64),
        finish_s=jnp.full((num_engines, n), jnp.nan, f64),
        sent_s=jnp.asarray(inputs.sent_s, f64),
        arrival_s=jnp.pad(
            jnp.asarray(inputs.arrival_s, f64),
            ((0, 0), (0, _num_padding(num_slots))),
            constant_values=jnp.inf,
        ),
    )


class _Window(NamedTuple):
    """The next ``W = S + 1`` never-admitted requests of an engine. Only they can matter to
    one event: at most ``S`` fit in the slots, and one more tells an overflow. Windows keep
    every per-step search O(S) instead of O(log N) gathers or O(N) scans."""

    arrival_s: jax.Array  # [W] float64
    prompt: jax.Array  # [W] int32
    cached: jax.Array  # [W] int32, prompt tokens found in the prefix cache
    output: jax.Array  # [W] int32
    tokens_before: jax.Array  # [W + 1] int32, prompt tokens to compute of the first i, i = 0..W
    blocks_before: jax.Array  # [W + 1] int32, KV pages of the first i prompts
    pairs_before: jax.Array  # [W + 1] float64, prefill pairs of the first i prompts


class _Queues(NamedTuple):
    """The running sequences and the waiting queue at the start of a round."""

    now_s: jax.Array  # [] float64
    num_in_system: jax.Array  # [] int32, occupied slots
    num_new_waiting: jax.Array  # [] int32, arrived, never admitted
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
    demand_tokens: jax.Array  # [] int32, tokens every running sequence would take unlimited
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


class _Series(NamedTuple):
    """Round ``j`` of a run (``j = 0, 1, ...``) lasts ``time0_s + j * step_s``."""

    time0_s: jax.Array  # [] float64
    step_s: jax.Array  # [] float64


def _busy(e: EnergyCoeffs, num_tokens, prefill_pairs, decode_kv_tokens):
    """Power-weighted busy time of one iteration (see :mod:`apex_jax.cost.energy`)."""
    compute = num_tokens * e.compute_s_per_token + prefill_pairs * e.compute_s_per_pair
    memory = e.memory_s_fixed + decode_kv_tokens * e.memory_s_per_kv_token
    return compute + MEMORY_POWER_WEIGHT * memory


def _first_crossing(gap0, gap_step):
    """Rounds ``j >= 1`` before the affine ``gap0 + j gap_step`` changes sign."""
    towards_zero = (gap0 >= 0.0) & (gap_step < 0.0) | (gap0 < 0.0) & (gap_step > 0.0)
    j = jnp.floor(-gap0 / jnp.where(gap_step == 0.0, 1.0, gap_step)) + 1.0
    j = jnp.clip(j, 1.0, float(_BIG_INT))
    return jnp.where(towards_zero, j, float(_BIG_INT)).astype(jnp.int32)


def _ceil_div(a, b):
    return -((-a) // b)


def _sum_i32(x):
    return jnp.sum(x, dtype=jnp.int32)


def _run_time_s(series: _Series, k):
    """``T(k) = k time0 + step k (k - 1) / 2``: wall time of ``k`` rounds (float64 ``k``)."""
    return k * series.time0_s + series.step_s * k * (k - 1.0) / 2.0


def _first_round_at_or_after(series: _Series, gap_s):
    """Smallest ``j >= 1`` whose start time ``T(j) >= gap_s`` (:func:`_run_time_s`);
    ``_BIG_INT`` if never."""
    q = 0.5 * series.step_s
    lin = series.time0_s - q
    # Stable root of q j^2 + lin j - gap = 0 (lin > 0: a batch's KV is at least its size).
    root = 2.0 * gap_s / (lin + jnp.sqrt(lin * lin + 4.0 * q * gap_s))
    j = jnp.maximum(1.0, jnp.ceil(jnp.minimum(root, float(_BIG_INT))))
    j = jnp.where((j > 1.0) & (_run_time_s(series, j - 1.0) >= gap_s), j - 1.0, j)
    j = jnp.where(_run_time_s(series, j) < gap_s, j + 1.0, j)
    return jnp.where(jnp.isfinite(gap_s), j, float(_BIG_INT)).astype(jnp.int32)


def _window(inputs: LaneInputs, arrival_s, engine, next_req, size: int) -> _Window:
    """Engine ``engine``'s ``size`` requests from ``next_req`` on (per-request fields of
    ``inputs`` and the arrivals ``arrival_s`` are ``[V, N]``, padded past the end)."""

    engine = jnp.asarray(engine, jnp.int32)

    def take(x, extra=0):
        return jax.lax.dynamic_slice(x, (engine, next_req), (1, size + extra))[0]

    cum_prompt = take(inputs.cum_prompt, 1)
    cum_blocks = take(inputs.cum_blocks, 1)
    cum_pairs = take(inputs.cum_pairs, 1)
    return _Window(
        arrival_s=take(arrival_s),
        prompt=take(inputs.prompt),
        cached=take(inputs.cached),
        output=take(inputs.output),
        tokens_before=cum_prompt - cum_prompt[0],
        blocks_before=cum_blocks - cum_blocks[0],
        pairs_before=cum_pairs - cum_pairs[0],
    )


def _queues(inputs: LaneInputs, st: EngineState, win: _Window, now_s) -> _Queues:
    """The running set and the waiting queue at the round's start ``now_s``."""
    slots = st.slots
    iota = jnp.arange(slots.req.shape[0], dtype=jnp.int32)
    num_in_system = st.next_req - st.num_finished
    occupied = iota < num_in_system
    is_running = occupied & slots.is_running
    is_preempted = occupied & ~slots.is_running
    return _Queues(
        now_s=now_s,
        num_in_system=num_in_system,
        # Arrivals are non-decreasing, and +inf until a closed loop sends the request.
        num_new_waiting=_sum_i32(win.arrival_s <= now_s),
        is_running=is_running,
        is_preempted=is_preempted,
        is_decoding=is_running & (slots.pending == 0),
        is_prefilling=is_running & (slots.pending > 0),
        seq_len=slots.prompt + slots.gen,
        num_running=_sum_i32(is_running),
        num_preempted=_sum_i32(is_preempted),
    )


def _schedule_running(inputs: LaneInputs, st: EngineState, q: _Queues) -> _Schedule:
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
        demand_tokens=_sum_i32(demand),
        is_scheduled=is_scheduled,
        need=need,
        is_victim=is_victim,
        any_victim=jnp.any(is_victim),
        num_tokens=_sum_i32(jnp.where(is_scheduled, take, 0)),
        freed_blocks=_sum_i32(jnp.where(is_victim, slots.held, 0)),
        needed_blocks=_sum_i32(jnp.where(is_scheduled, need, 0)),
    )


def _admit(
    inputs: LaneInputs, st: EngineState, win: _Window, q: _Queues, sch: _Schedule
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
        jnp.where(q.num_new_waiting > 0, win.prompt[0] - win.cached[0], 0),
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
    inputs: LaneInputs, st: EngineState, win: _Window, q: _Queues, sch: _Schedule, adm: _Admission
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
            win.pairs_before[adm.last]
            + last_chunk_f * (win.cached[adm.last] + (last_chunk_f + 1.0) / 2.0),
            0.0,
        )
    )
    last_is_whole = (adm.last_chunk == win.prompt[adm.last] - win.cached[adm.last]).astype(i32)
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


def _describe(
    inputs: LaneInputs,
    st: EngineState,
    win: _Window,
    q: _Queues,
    sch: _Schedule,
    adm: _Admission,
    b: _Batch,
) -> EngineRun:
    """The batch as a run descriptor: its time and busy time per round, and how many rounds
    it repeats before this engine's next event. A pure decode batch repeats until a
    sequence finishes, pages may run short or the KV total passes the end of the cost's
    affine piece (a decode-attention breakpoint), and an arrival that could join wakes it;
    any other batch runs one round; an engine with only victims is rescheduled after the
    round, one with nothing at all when an arrival wakes it."""
    f64 = jnp.float64
    slots = st.slots
    batch = b.batch_size.astype(f64)
    k_finish = jnp.min(jnp.where(b.is_decoding, slots.output - slots.gen, _BIG_INT))
    # Each sequence opens at most ceil((k - 1) / block_size) pages after the first round;
    # within k <= block_size * floor((spare - 1) / batch) + 1 rounds a page stays free
    # whenever a sequence is considered, so nobody is preempted.
    spare = st.free_blocks - sch.needed_blocks
    k_pages = inputs.block_size * ((spare - 1) // jnp.maximum(b.batch_size, 1)) + 1
    # Round j of the run reads kv_tokens + j * batch KV entries; its piece holds up to
    # kv_tokens_end inclusive (the pieces meet there).
    room = (b.kv_tokens_end - b.kv_tokens) / jnp.maximum(batch, 1.0)
    k_piece = (jnp.floor(jnp.minimum(room, float(_BIG_INT - 1))) + 1.0).astype(jnp.int32)
    k_decode = jnp.minimum(jnp.minimum(k_finish, k_pages), k_piece)
    rounds_left = jnp.where(
        b.has_work,
        jnp.where(b.is_pure_decode, k_decode, 1),
        jnp.where(sch.any_victim, 1, _BIG_INT),
    )
    # An arrival can change the schedule only when nobody is waiting: waiting requests were
    # not admitted, and FCFS keeps a later arrival behind them while pages only shrink.
    wake_s = jnp.where(q.num_new_waiting == 0, win.arrival_s[0], NEVER)
    num_tokens = b.num_tokens.astype(f64)
    off_s, last_s = pipeline_parts_s(
        inputs.coeffs, num_tokens, b.num_sampled.astype(f64), b.prefill_pairs
    )
    e = inputs.energy
    return EngineRun(
        has_work=b.has_work,
        is_pure_decode=b.is_pure_decode,
        is_stuck=~b.has_work & ~sch.any_victim & (q.num_in_system + q.num_new_waiting > 0),
        num_victims=_sum_i32(b.is_victim),
        num_rounds=jnp.zeros((), jnp.int32),
        rounds_left=rounds_left.astype(jnp.int32),
        wake_s=wake_s,
        own0_s=b.base_s + b.slope_s_per_kv_token * b.kv_tokens,
        own_step_s=jnp.where(b.is_pure_decode, b.slope_s_per_kv_token * batch, 0.0),
        off_s=off_s,
        last_s=last_s,
        busy0_s=_busy(e, num_tokens, b.prefill_pairs, b.kv_tokens),
        busy_step_s=jnp.where(
            b.is_pure_decode, MEMORY_POWER_WEIGHT * batch * e.memory_s_per_kv_token, 0.0
        ),
        order=_next_order(q, adm, b),
    )


def _apply(
    inputs: LaneInputs,
    st: EngineState,
    win: _Window,
    q: _Queues,
    sch: _Schedule,
    adm: _Admission,
    b: _Batch,
) -> EngineState:
    """The state after the batch's first round: victims preempted, admitted requests placed
    after the occupied slots, every sequence's tokens and pages updated; a first token is
    stamped at the run's end (:data:`_AT_RUN_END`). Finished sequences are still in their
    slots."""
    slots = st.slots
    k = b.has_work.astype(jnp.int32)
    iota = jnp.arange(slots.req.shape[0], dtype=jnp.int32)
    is_new = (iota >= q.num_in_system) & (iota < q.num_in_system + adm.num_new)
    is_last_new = iota == q.num_in_system + adm.num_new - 1
    new_pos = jnp.clip(iota - q.num_in_system, 0, win.prompt.shape[0] - 1)
    admitted = adm.is_admitted | is_new
    prompt = jnp.where(is_new, win.prompt[new_pos], slots.prompt)
    gen0 = jnp.where(is_new, 0, slots.gen)
    len0 = prompt + gen0
    # A new request computes its prompt but the cached prefix; a preempted one recomputes all.
    to_compute = len0 - jnp.where(is_new, win.cached[new_pos], 0)
    admit_chunk = jnp.where(
        adm.is_admitted,
        adm.chunk,
        jnp.where(is_new, jnp.where(is_last_new, adm.last_chunk, to_compute), 0),
    )
    pending = jnp.where(
        admitted,
        to_compute - admit_chunk,
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
        next_req=st.next_req + adm.num_new,
        free_blocks=free_blocks,
        slots=Slots(
            req=jnp.where(is_new, st.next_req + new_pos, slots.req),
            prompt=prompt,
            output=jnp.where(is_new, win.output[new_pos], slots.output),
            gen=gen,
            pending=pending,
            held=held,
            is_running=(slots.is_running | admitted) & ~b.is_victim,
            first_token_s=jnp.where((gen0 == 0) & (gen > 0), _AT_RUN_END, slots.first_token_s),
        ),
    )


def _decode_rounds(inputs: LaneInputs, st: EngineState, num_rounds) -> EngineState:
    """The state after ``num_rounds`` more rounds of a pure decode batch (``[]`` int32; 0
    leaves it as it is): every running sequence decodes, opening pages as its KV grows."""
    slots = st.slots
    occupied = jnp.arange(slots.req.shape[0], dtype=jnp.int32) < st.next_req - st.num_finished
    is_decoding = occupied & slots.is_running & (slots.pending == 0) & (num_rounds > 0)
    seq_len = slots.prompt + slots.gen
    held_dec = jnp.maximum(slots.held, _ceil_div(seq_len + num_rounds - 1, inputs.block_size))
    held = jnp.where(is_decoding, held_dec, slots.held)
    return st._replace(
        free_blocks=st.free_blocks - _sum_i32(held - slots.held),
        slots=slots._replace(gen=slots.gen + jnp.where(is_decoding, num_rounds, 0), held=held),
    )


def _retire(st: EngineState):
    """Sequences that yielded their last token finish now and free their pages.

    Returns:
        The state (finished sequences still in their slots), the ``[S]`` bool mask of
        slots that stay in the system and the ``[S]`` bool mask of those that finish.
    """
    slots = st.slots
    occupied = jnp.arange(slots.req.shape[0], dtype=jnp.int32) < st.next_req - st.num_finished
    is_finishing = occupied & slots.is_running & (slots.pending == 0) & (slots.gen >= slots.output)
    retired = st._replace(
        num_finished=st.num_finished + _sum_i32(is_finishing),
        free_blocks=st.free_blocks + _sum_i32(jnp.where(is_finishing, slots.held, 0)),
    )
    return retired, occupied & ~is_finishing, is_finishing


def _send(inputs: LaneInputs, sent_s, arrival_s, e, now_s, num_finished, finished, is_event):
    """Closed loop: engine ``e``'s finishes at ``now_s`` (``finished``: ``[S]`` request ids,
    ``EMPTY`` elsewhere; ``num_finished`` before them) release its requests ``gate +
    num_finished + j``; each is sent at ``now_s (1 + think_frac)`` and reaches the engine
    after its delay, not before the one sent ahead of it (:func:`engine_arrivals`). Past the
    last request (always in open loop) nothing is sent; nothing at all unless ``is_event``.
    Only scalars and ``[S]`` entries are read and written, so a step copies nothing ``[N]``.

    Args:
        inputs: the replica's, per-request fields ``[V, N]``.
        sent_s, arrival_s: the replica's ``[V, N]`` and ``[V, N + S + 2]`` (``ReplicaState``).

    Returns:
        ``sent_s`` and ``arrival_s`` with the released requests' times written.
    """
    n = sent_s.shape[1]
    iota = jnp.arange(finished.shape[0], dtype=jnp.int32)
    first = inputs.gate[e] + num_finished
    idx = first + iota
    is_sent = (iota < _sum_i32(finished != EMPTY)) & (idx < inputs.num_requests[e]) & is_event
    at = jnp.clip(idx, 0, n - 1)
    ahead = jnp.clip(first - 1, 0, n - 1)
    # The first finish's time: the first request released was sent then (exact while it
    # does not wait, think_frac[gate] = 0).
    first_finish_s = jnp.where(
        num_finished > 0, sent_s[e, jnp.minimum(inputs.gate[e], n - 1)], now_s
    )
    ready_s = jnp.maximum(now_s, first_finish_s * (1.0 + inputs.think_frac[e, at]))
    # Requests are sent in order: a client ready before the one ahead of it sends with it.
    send_s = jnp.maximum(jax.lax.cummax(jnp.where(is_sent, ready_s, -jnp.inf)), sent_s[e, ahead])
    reach_s = jax.lax.cummax(jnp.where(is_sent, send_s + inputs.delay_s[e, at], -jnp.inf))
    reach_s = jnp.maximum(reach_s, arrival_s[e, ahead])
    target = jnp.where(is_sent, idx, arrival_s.shape[1])
    return (
        sent_s.at[e, target].set(send_s, mode="drop"),
        arrival_s.at[e, target].set(reach_s, mode="drop"),
    )


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


def _end_run(inputs: LaneInputs, st: EngineState, run: EngineRun, now_s):
    """An engine at its event ``now_s``, the end of its run: the rest of a decode run
    applied, first tokens stamped, finished sequences retired and the slots in queue order.

    Returns:
        The state and, per slot before compaction, ``[S]`` int32 request ids of the finished
        sequences (``EMPTY`` elsewhere) and ``[S]`` float64 first-token times.
    """
    num_rounds = jnp.where(run.is_pure_decode, jnp.maximum(run.num_rounds - 1, 0), 0)
    st = _decode_rounds(inputs, st, num_rounds)
    # A decode run holds the most pages in its last round.
    st = st._replace(pages_needed=_pages_needed(inputs, st, False))
    slots = st.slots
    first_s = jnp.where(slots.first_token_s == _AT_RUN_END, now_s, slots.first_token_s)
    st, is_kept, is_finishing = _retire(st._replace(slots=slots._replace(first_token_s=first_s)))
    finished = jnp.where(is_finishing, slots.req, EMPTY)
    return st._replace(slots=_compact(st.slots, is_kept, run.order)), finished, first_s


def _schedule(inputs: LaneInputs, st: EngineState, win: _Window, now_s):
    """Schedule an engine's next batch at the round's start ``now_s``.

    Returns:
        The state after the batch's first round (:func:`_apply`), its :class:`EngineRun`
        and whether the slots overflowed (``[]`` bool).
    """
    q = _queues(inputs, st, win, now_s)
    sch = _schedule_running(inputs, st, q)
    adm = _admit(inputs, st, win, q, sch)
    b = _batch_features(inputs, st, win, q, sch, adm)
    run = _describe(inputs, st, win, q, sch, adm, b)
    applied = _apply(inputs, st, win, q, sch, adm, b)
    return _record_needs(inputs, applied, q, sch, adm, win), run, adm.is_overflow


def _pages_needed(inputs: LaneInputs, st: EngineState, is_preempting):
    """``st.pages_needed`` with the pages held after a round (``st``) plus one folded in, at
    most the pages above the watermark, and all of them if the round preempted."""
    own = inputs.num_kv_blocks - inputs.watermark_blocks
    held = jnp.minimum(inputs.num_kv_blocks - st.free_blocks + 1, own)
    return jnp.maximum(st.pages_needed, jnp.where(is_preempting, own, held))


def _record_needs(
    inputs: LaneInputs, st: EngineState, q: _Queues, sch: _Schedule, adm: _Admission, win: _Window
) -> EngineState:
    """``st`` (after the batch's first round) with the batch's needs of its limits folded
    in (see :class:`EngineState`).

    The same lane under limits between the needs and its own decides the same: every
    decision compares a quantity with a limit, and these are the quantities. A running
    sequence gets its tokens, and a waiting request gets in, exactly when the sequences,
    tokens and pages it would take fit; less room admits no one more (the limits are at
    most its own) and no one less (the batch needed no more). Tokens that go short cut the
    batch where the budget ends, and preemption where pages run out, so then only the same
    budget (needed: the budget itself) or pages (all of them) decide the same. Without
    chunked prefill, an iteration that admits runs only the prefills, so the running
    sequences' tokens and the prompts count apart."""
    # The sequences max_num_seqs counts: with chunked prefill those scheduling kept.
    chunked = inputs.chunked_prefill > 0
    is_counted = jnp.where(chunked, sch.is_scheduled, q.is_running)
    prompts = win.tokens_before[adm.num_new] + _sum_i32(jnp.where(adm.is_admitted, q.seq_len, 0))
    tokens = jnp.where(
        chunked,
        sch.demand_tokens + prompts,
        jnp.maximum(sch.demand_tokens, prompts),
    )
    return st._replace(
        seqs_needed=jnp.maximum(st.seqs_needed, _sum_i32(is_counted) + adm.num_admitted),
        tokens_needed=jnp.maximum(
            st.tokens_needed, jnp.minimum(tokens, inputs.max_num_batched_tokens)
        ),
        pages_needed=_pages_needed(inputs, st, sch.any_victim),
    )


def _round_series(stage_share, runs: EngineRun):
    """The round's time as a :class:`_Series` from the engines' runs (fields ``[V]``, the
    rounds each has run so far counted) and the rounds before another term of its maximum
    takes over (``[]`` int32; ``_BIG_INT`` if none).

    A round lasts as long as the slower of two limits: every virtual engine's batch passes
    the whole pipeline (its own iteration time: host, every stage, the transfers), and each
    stage (``stage_share`` ``[P]``, its fraction of the layers) does the layer work of every
    batch of the round plus, on the last stage, their LM heads and sampling. An engine
    without work adds nothing; with none anywhere the round takes no time.
    """
    f64 = jnp.float64
    num_stages = _sum_i32(stage_share > 0.0)
    is_last = jnp.arange(stage_share.shape[0]) == num_stages - 1
    own_s = runs.own0_s + runs.num_rounds.astype(f64) * runs.own_step_s  # [V]
    active = runs.has_work.astype(f64)
    layers_s = jnp.sum(active * (own_s - runs.off_s - runs.last_s))
    stage0_s = stage_share * layers_s + jnp.where(is_last, jnp.sum(active * runs.last_s), 0.0)
    stage_step_s = stage_share * jnp.sum(active * runs.own_step_s)
    is_stage = (num_stages > 1) & (stage_share > 0.0)
    is_term = jnp.concatenate([runs.has_work, is_stage])
    time0 = jnp.where(is_term, jnp.concatenate([own_s, stage0_s]), -jnp.inf)
    step = jnp.where(is_term, jnp.concatenate([runs.own_step_s, stage_step_s]), 0.0)
    best0 = jnp.max(time0)
    # Among terms tied now, the fastest-growing one stays the maximum longest.
    pick = jnp.argmax(jnp.where(time0 == best0, step, -jnp.inf))
    is_any = jnp.any(is_term)
    series = _Series(jnp.where(is_any, best0, 0.0), step[pick])
    gap0 = jnp.where(is_term, jnp.where(is_any, best0, 0.0) - time0, 0.0)
    num_switch = jnp.min(jnp.where(is_term, _first_crossing(gap0, step[pick] - step), _BIG_INT))
    return series, num_switch


def _advance(inputs: LaneInputs, st: ReplicaState, *, max_iters: int) -> ReplicaState:
    """Once no engine is due: the replica's status (OK once every request finished,
    MAX_ITERS at the cap over all engines' iterations, INFEASIBLE if no engine could run or
    preempt anything), then its rounds up to the next event, or the jump over an idle gap to
    the next arrival. A replica that is not live or has engines due is returned unchanged."""
    f64 = jnp.float64
    eng, runs = st.engines, st.runs
    is_settled = (st.status == LIVE) & ~jnp.any(st.is_due)
    is_pending = runs.rounds_left < _BIG_INT  # [V] a batch or victims scheduled, not yet run
    any_pending = jnp.any(is_pending)
    num_iters = _sum_i32(eng.num_iters)
    status = jnp.select(
        [
            jnp.all(eng.num_finished >= inputs.num_requests),
            num_iters >= max_iters,
            ~any_pending & jnp.any(runs.is_stuck),
        ],
        [OK, MAX_ITERS, INFEASIBLE],
        LIVE,
    )
    status = jnp.where(is_settled, status, st.status).astype(jnp.int32)
    go = is_settled & (status == LIVE)

    series, num_switch = _round_series(inputs.stage_share[0], runs)
    r = runs.num_rounds.astype(f64)
    busy_s = runs.busy0_s + r * runs.busy_step_s  # [V] this round's
    # Power follows min(busy, round time); inside one step the min must not switch sides,
    # so a run stops where it would (busy and time are both affine in the round).
    k_power = jnp.where(
        runs.has_work,
        _first_crossing(series.time0_s - busy_s, series.step_s - runs.busy_step_s),
        _BIG_INT,
    )
    k_arrival = _first_round_at_or_after(series, runs.wake_s - st.now_s)
    num_active = jnp.maximum(_sum_i32(runs.has_work), 1)
    cap = _ceil_div(max_iters - num_iters, num_active)
    k = jnp.minimum(jnp.min(jnp.minimum(runs.rounds_left, k_arrival)), num_switch)
    k = jnp.maximum(jnp.minimum(jnp.min(k_power), jnp.minimum(k, cap)), 1)
    # Nothing scheduled anywhere: no round runs, the clock jumps to the next arrival.
    k = jnp.where(any_pending, k, 0)
    kf = k.astype(f64)
    duration_s = _run_time_s(series, kf)
    run_busy_s = kf * busy_s + runs.busy_step_s * kf * (kf - 1.0) / 2.0
    busy_s = jnp.where(series.time0_s - busy_s >= 0.0, run_busy_s, duration_s)
    e = inputs.energy
    energy_j = jnp.where(runs.has_work, e.num_gpus * e.dynamic_w * busy_s, 0.0)
    now_s = jnp.where(
        any_pending, st.now_s + duration_s, jnp.maximum(st.now_s, jnp.min(runs.wake_s))
    )
    rounds_left = jnp.where(is_pending, runs.rounds_left - k, _BIG_INT)
    is_first = is_pending & (runs.num_rounds == 0) & (k > 0)

    def kept(new, old):
        # Only the fields that change: selecting the slots or the per-request arrays whole
        # would copy them every step.
        return jnp.where(go, new, old)

    return st._replace(
        now_s=kept(now_s, st.now_s),
        status=status,
        is_due=kept((rounds_left <= 0) | (runs.wake_s <= now_s), st.is_due),
        engines=eng._replace(
            num_iters=kept(eng.num_iters + jnp.where(runs.has_work, k, 0), eng.num_iters),
            num_preemptions=kept(
                eng.num_preemptions + jnp.where(is_first, runs.num_victims, 0),
                eng.num_preemptions,
            ),
            dynamic_energy_j=kept(eng.dynamic_energy_j + energy_j, eng.dynamic_energy_j),
        ),
        runs=runs._replace(
            num_rounds=kept(runs.num_rounds + jnp.where(is_pending, k, 0), runs.num_rounds),
            rounds_left=kept(rounds_left, runs.rounds_left),
        ),
    )


def _engine_fields(inputs: LaneInputs) -> LaneInputs:
    """``inputs`` without the per-request fields (only :func:`_window` reads those)."""
    return inputs._replace(**dict.fromkeys(_REQUEST_FIELDS))


def step(inputs: LaneInputs, st: ReplicaState, *, max_iters: int) -> ReplicaState:
    """Advance one replica (``inputs`` fields ``[V, ...]``) by one event: the first engine
    due ends its run and is scheduled again; once none is due, the rounds run up to the
    next event. A replica that is not live is returned unchanged."""
    num_engines, num_slots = st.engines.slots.req.shape
    iota = jnp.arange(num_engines, dtype=jnp.int32)
    # One engine needs no search (a static index keeps its rows plain slices).
    e = jnp.min(jnp.where(st.is_due, iota, num_engines - 1)) if num_engines > 1 else 0
    is_event = st.is_due[e] & (st.status == LIVE)
    # The engines of a replica share the plan (limits, cost and power constants, stages):
    # row 0's, a static slice; they differ in their requests and closed-loop clients.
    engine = jax.tree.map(lambda x: x[0], _engine_fields(inputs))
    engine = engine._replace(gate=inputs.gate[e], num_requests=inputs.num_requests[e])
    before = jax.tree.map(lambda x: x[e], st.engines)
    ended, finished, first_s = _end_run(
        engine, before, jax.tree.map(lambda x: x[e], st.runs), st.now_s
    )
    sent_s, arrival_s = _send(
        inputs, st.sent_s, st.arrival_s, e, st.now_s, before.num_finished, finished, is_event
    )
    win = _window(inputs, arrival_s, e, ended.next_req, num_slots + 1)
    scheduled, run, is_overflow = _schedule(engine, ended, win, st.now_s)

    is_written = (iota == e) & is_event  # [V]

    def put(rows, row):
        # A dense select: a scatter of one row per replica costs more on CPU.
        return jax.tree.map(
            lambda x, y: jnp.where(is_written.reshape((-1,) + (1,) * y.ndim), y, x), rows, row
        )

    # A masked scatter: selecting the per-request arrays whole would copy O(V N) per step.
    target = jnp.where(is_event & (finished != EMPTY), finished, st.finish_s.shape[1])
    st = st._replace(
        status=jnp.where(is_event & is_overflow, SLOT_OVERFLOW, st.status).astype(jnp.int32),
        is_due=st.is_due & ~is_written,
        engines=put(st.engines, scheduled),
        runs=put(st.runs, run),
        first_token_s=st.first_token_s.at[e, target].set(first_s, mode="drop"),
        finish_s=st.finish_s.at[e, target].set(st.now_s, mode="drop"),
        sent_s=sent_s,
        arrival_s=arrival_s,
    )
    return _advance(inputs, st, max_iters=max_iters)


def _pad_requests(inputs: LaneInputs, extra: int) -> LaneInputs:
    """Pad the per-request arrays (last axis) so that windows past the end stay in bounds:
    prefix sums stay flat (the arrivals are padded in :func:`init_state`)."""

    def pad(x, mode, value=0):
        widths = [(0, 0)] * (x.ndim - 1) + [(0, extra)]
        if mode == "edge":
            return jnp.pad(x, widths, mode="edge")
        return jnp.pad(x, widths, constant_values=value)

    return inputs._replace(
        prompt=pad(inputs.prompt, "constant", 0),
        cached=pad(inputs.cached, "constant", 0),
        output=pad(inputs.output, "constant", 1),
        cum_prompt=pad(inputs.cum_prompt, "edge"),
        cum_blocks=pad(inputs.cum_blocks, "edge"),
        cum_pairs=pad(inputs.cum_pairs, "edge"),
    )


def run_lanes(inputs: LaneInputs, *, num_slots: int, max_iters: int) -> LaneResult:
    """Simulate every replica of a batch to completion.

    One outer ``while_loop`` over the replica-major state, with :func:`step` vmapped inside,
    stops when no replica is live. ``vmap`` of a per-replica ``while_loop`` would instead
    select the whole carry of every replica at every step (notes/jax-on-cpu.md).

    Args:
        inputs: :class:`LaneInputs` with leading axes ``[R, V, ...]``: ``R`` replicas of
            ``V`` virtual engines each (a replica with fewer pads with engines that have no
            requests and start finished).
        num_slots: static slot capacity, at least every engine's ``max_num_seqs``.
        max_iters: static iteration cap per replica, over its engines.

    Returns:
        :class:`LaneResult`, fields ``[R, V, ...]``, one row per virtual engine.
    """
    state = jax.vmap(lambda x: init_state(x, num_slots=num_slots))(inputs)
    inputs = _pad_requests(inputs, _num_padding(num_slots))
    batched_step = jax.vmap(lambda x, s: step(x, s, max_iters=max_iters))

    def cond(s):
        return jnp.any(s.status == LIVE)

    final = jax.lax.while_loop(cond, lambda s: batched_step(inputs, s), state)
    eng = final.engines
    return LaneResult(
        status=jnp.broadcast_to(final.status[:, None], eng.num_iters.shape),
        first_token_s=final.first_token_s,
        finish_s=final.finish_s,
        sent_s=final.sent_s,
        num_iters=eng.num_iters,
        num_preemptions=eng.num_preemptions,
        dynamic_energy_j=eng.dynamic_energy_j,
        seqs_needed=eng.seqs_needed,
        tokens_needed=eng.tokens_needed,
        pages_needed=eng.pages_needed,
    )
