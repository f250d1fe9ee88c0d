"""The slow reference simulator: one iteration at a time, in plain Python.

It defines the engine semantics that :mod:`apex_jax.simulator` must reproduce request by
request. The rules follow vLLM 0.6.0's scheduler (``vllm/core/scheduler.py``) with its
default block manager (``vllm/core/block_manager_v1.py``), preemption by recompute:

1. Queues. The running queue and the waiting queue are ordered; the waiting queue is the
   preempted requests first, then the arrived requests never admitted, in arrival order. A
   request arrives at the engine a delay after it is sent, not before the request sent ahead
   of it (:func:`apex_jax.simulator.engine_arrivals`). A closed loop of ``concurrency``
   clients sends its first ``concurrency`` requests at their trace times and each later one
   when a request finishes (request ``concurrency + k - 1`` at the ``k``-th finish), so its
   arrival times are filled in as the lane runs.
2. Admission (``_schedule_prefills``) walks the waiting queue from the front and stops at the
   first request that breaks a limit: running sequences ``<= max_num_seqs``, KV pages for the
   whole prompt ``<= free - watermark`` (``can_allocate``), and the token budget. A recomputed
   request prefills its prompt plus the tokens it generated before preemption. A prefill that
   completes yields a token. Admitted requests join the tail of the running queue.
3. Chunked prefill off (``_schedule_default``): admission runs first; an iteration that admits
   runs only those prefills, whole; a prompt must fit the budget (the first in the queue may
   exceed it alone, which only a recomputed sequence can). Otherwise every running sequence
   decodes one token.
4. Chunked prefill on (``_schedule_chunked_prefill``): the running queue is scheduled first,
   from the front: a decode takes one token of the budget, an unfinished prefill the next
   chunk that fits; scheduling stops at the first sequence that gets no token. Waiting
   requests are then admitted with the budget, sequences and pages left, the last one possibly
   with a partial chunk, also in an iteration that preempted. The running queue becomes the
   sequences scheduling did not reach, then the decodes, then the chunked prefills, then the
   admitted requests.
5. Preemption (``_schedule_running`` with ``BlockSpaceManagerV1.can_append_slots``): a running
   sequence is kept only if at least one KV page is free when it is considered, whether or
   not its next token opens a page. Otherwise the tail of the running queue is preempted (its
   pages freed, its prefill to be recomputed), repeatedly, and the sequence itself when
   nobody is left behind it. A kept decode whose next token opens a KV page takes one. Each
   victim goes to the front of the waiting queue (so victims keep their running order there,
   ahead of earlier victims).
6. Sequences finish at the end of the iteration that yields their last token, and free their
   pages then. With nothing running or waiting, the clock jumps to the next arrival.
7. Pipeline parallelism, as vLLM 0.6's virtual engines: a replica of ``pp`` stages runs
   ``pp`` virtual engines, each with its own scheduler, requests and KV pages (rules 1-6
   apply to each), sharing the stages. They advance in rounds: at a round's start every
   engine schedules one batch (with nothing to do in any engine, the clock jumps to the next
   arrival), and the round lasts as long as the slower of two limits: each batch passes the
   whole pipeline (its own iteration time: host overhead, every stage, the ``pp - 1``
   transfers), and each stage does the layer work of every batch of the round, in
   proportion to its layers, the last stage also their LM heads and sampling
   (:func:`apex_jax.cost.iteration.pipeline_parts_s`). Tokens and finishes count at the
   round's end. With ``pp = 1`` a round is one iteration of the one engine.
8. Prefix cache. A request may find the KV of a prefix of its prompt already cached (each
   request's ``cached_tokens``, reduced to the whole blocks the engine can reuse and never
   the prompt's last token, :func:`apex_jax.simulator.cached_prefix_tokens`). Its first
   admission then prefills only the rest, whose queries attend over the cached prefix too,
   and it still takes the pages of its whole prompt (a cached block is not shared with
   other running requests here). A preempted request recomputes everything. Which requests
   hit, and how much of a prompt the cache still holds, is the workload's
   (:meth:`apex_jax.workload.Workload.cached_prompt_tokens`, its capacity the lane's KV
   pages); the engine does not track the cache's contents. A closed loop's warm-up is not simulated:
   benchmark tools send the measured requests only once it has finished, so the engine
   starts idle, and the warm-up's prompts are hits from the first round on.

A request that no schedule could serve is rejected before it is queued, with a reason
(:func:`rejected_requests`), and the lane serves the rest: its prompt plus output above
``max_model_len`` (the OpenAI server refuses it), more KV pages than the cache holds above
the watermark (``can_allocate`` says NEVER), or with chunked prefill off a prompt above the
token budget (``_get_prompt_limit``).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from apex_jax.cost.energy import EnergyCoeffs, iteration_energy_j
from apex_jax.cost.iteration import CostCoeffs, iteration_time_s, pipeline_parts_s
from apex_jax.simulator import LaneResult, cached_prefix_tokens, engine_arrivals
from apex_jax.status import INFEASIBLE, LIVE, MAX_ITERS, OK

__all__ = [
    "REJECTION_REASONS",
    "EngineLimits",
    "IterationRecord",
    "rejected_requests",
    "simulate_reference",
    "simulate_replica_reference",
]


class EngineLimits(dict):
    """Engine limits of one replica: ``max_num_seqs``, ``max_num_batched_tokens``,
    ``block_size``, ``num_kv_blocks``, ``watermark_blocks``, ``max_model_len`` and
    ``chunked_prefill`` (0 or 1)."""


class IterationRecord(NamedTuple):
    """The system after one iteration, for invariant tests."""

    time_s: float  # end of the iteration
    num_tokens: int  # tokens the iteration computed
    num_running: int
    num_in_system: int  # running or preempted
    num_arrived: int  # arrived at the engine by time_s
    num_finished: int
    free_blocks: int
    held_blocks: int


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# Why a request is rejected (codes of rejected_requests; 0 means it is served).
REJECTION_REASONS: dict[int, str] = {
    1: "prompt + output tokens exceed max_model_len",
    2: "prompt + output need more KV pages than the cache holds above the watermark",
    3: "prompt exceeds max_num_batched_tokens with chunked prefill off",
}


def rejected_requests(prompt, output, limits) -> np.ndarray:
    """Why each request is rejected under ``limits`` (``[N]`` int: 0 if it is served, else
    the first key of :data:`REJECTION_REASONS` that applies). A served request fits every
    schedule: its longest KV (prompt plus all output tokens but the last) fits the cache."""
    prompt = np.asarray(prompt, np.int64)
    output = np.asarray(output, np.int64)
    longest_blocks = -(-(prompt + output - 1) // int(limits["block_size"]))
    is_chunked = bool(limits.get("chunked_prefill", 0))
    reasons = np.zeros(prompt.shape, np.int64)
    for code, is_rejected in reversed(
        [
            (1, prompt + output > limits["max_model_len"]),
            (2, longest_blocks > limits["num_kv_blocks"] - limits["watermark_blocks"]),
            (3, (prompt > limits["max_num_batched_tokens"]) & (not is_chunked)),
        ]
    ):
        reasons[is_rejected] = code
    return reasons


class _Seq:
    """A request in the system."""

    __slots__ = ("gen", "held", "is_running", "pending", "req")

    def __init__(self, req: int):
        self.req = req
        self.gen = 0  # tokens generated
        self.is_running = False
        self.held = 0  # KV pages
        self.pending = 0  # prefill tokens still to compute


class _Lane(NamedTuple):
    """One lane's inputs as Python numbers."""

    sent_s: list[float]  # [N] send times known before simulating; inf for the rest
    delay_s: list[float]  # [N] from send to arrival at the engine
    think_frac: list[float]  # [N] closed loop: the send waits this fraction of the release time
    prompt: list[int]  # [N]
    cached: list[int]  # [N] prompt tokens a first admission finds in the prefix cache
    output: list[int]  # [N]
    gate: int  # closed-loop clients; N for open loop
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    num_kv_blocks: int
    watermark_blocks: int
    is_chunked: bool
    coeffs: CostCoeffs  # fields float, slopes NumPy [K]
    energy: EnergyCoeffs  # fields float


@dataclasses.dataclass(slots=True)
class _State:
    """The replica, updated in place by :func:`_apply` and :func:`_retire`."""

    now_s: float
    free_blocks: int
    first_token_s: list[float]  # [N], NaN until the first token
    finish_s: list[float]  # [N], NaN until the request finishes
    sent_s: list[float]  # [N], inf until a closed loop sends the request
    arrival_s: list[float]  # [N], at the engine; inf until sent
    next_req: int = 0  # first request never admitted
    num_finished: int = 0
    num_iters: int = 0
    num_preemptions: int = 0
    dynamic_energy_j: float = 0.0
    # What the run needed of its limits so far (apex_jax.simulator.EngineState).
    seqs_needed: int = 0
    tokens_needed: int = 0
    pages_needed: int = 0
    # The running queue and the preempted part of the waiting queue, each in queue order
    # (front first); :func:`_compact` puts the running queue first.
    system: list[_Seq] = dataclasses.field(default_factory=list)


class _Queues(NamedTuple):
    now_s: float  # after any jump over an idle gap
    running: list[_Seq]  # the running queue, front first
    waiting: list[_Seq]  # preempted in queue order, then arrived never admitted


class _Schedule(NamedTuple):
    scheduled: list[tuple[_Seq, int]]  # (kept running sequence, tokens), in queue order
    victims: list[_Seq]  # in the order they were preempted
    needs: dict[int, int]  # KV pages each scheduled decode opens, by request id
    tokens_left: int  # of the budget, after every running sequence that got tokens
    free_blocks: int  # after the victims left and the decodes took their pages


class _Admission(NamedTuple):
    # (sequence, prefill chunk, KV pages, tokens its prefill computes in all)
    admitted: list[tuple[_Seq, int, int, int]]
    num_tokens: int


class _Batch(NamedTuple):
    scheduled: list[tuple[_Seq, int]]  # running sequences that compute, with their tokens
    victims: list[_Seq]
    needs: dict[int, int]
    num_tokens: int
    num_sampled: int  # sequences that yield a token
    prefill_pairs: float
    num_decoding: int  # sequences decoding one token
    kv_tokens: int  # KV length summed over decoding sequences
    has_work: bool


class _Run(NamedTuple):
    num_iters: int  # 1, or 0 for an empty batch
    duration_s: float
    dynamic_energy_j: float  # above the GPUs' idle power


def _num_arrived(st: _State, now_s: float) -> int:
    """Requests arrived at the engine by ``now_s`` (arrivals are non-decreasing)."""
    by_time = 0
    while by_time < len(st.arrival_s) and st.arrival_s[by_time] <= now_s:
        by_time += 1
    return by_time


def _seq_len(lane: _Lane, s: _Seq) -> int:
    return lane.prompt[s.req] + s.gen


def _to_compute(lane: _Lane, st: _State, s: _Seq) -> int:
    """Tokens a waiting sequence's prefill computes: a new request skips its cached prefix,
    a preempted one recomputes its prompt and what it generated."""
    return _seq_len(lane, s) - (lane.cached[s.req] if s.req >= st.next_req else 0)


def _idle_until_s(lane: _Lane, st: _State) -> float:
    """When the engine next has something to do: now if a request is in its system or has
    arrived, else its next arrival (``inf`` once all are admitted)."""
    if st.system or st.next_req < _num_arrived(st, st.now_s):
        return st.now_s
    if st.next_req < len(st.arrival_s):
        return max(st.now_s, st.arrival_s[st.next_req])
    return math.inf


def _queues(lane: _Lane, st: _State, now_s: float) -> _Queues:
    """The running set and the waiting queue at the round's start ``now_s``."""
    arrived = _num_arrived(st, now_s)
    waiting = [s for s in st.system if not s.is_running]
    waiting += [_Seq(r) for r in range(st.next_req, arrived)]
    return _Queues(now_s, [s for s in st.system if s.is_running], waiting)


def _schedule_running(lane: _Lane, st: _State, q: _Queues) -> _Schedule:
    """vLLM's ``_schedule_running``: the running queue from the front within the token budget;
    a sequence is kept only while a KV page is free when it is considered, else the queue's
    tail is preempted, or the sequence itself when nobody is behind it."""
    # With chunked prefill off nothing is mid-prefill and every decode fits the budget,
    # which is at least max_num_seqs.
    queue = collections.deque(q.running)
    free = st.free_blocks
    left = lane.max_num_batched_tokens
    scheduled: list[tuple[_Seq, int]] = []
    victims: list[_Seq] = []
    needs: dict[int, int] = {}
    while queue:
        s = queue[0]
        take = min(1 if s.pending == 0 else s.pending, left)
        if take == 0:
            break
        queue.popleft()
        # can_append_slots: one free page per running sequence of the group (here one).
        while free < 1 and queue:
            victim = queue.pop()
            victims.append(victim)
            free += victim.held
        if free < 1:
            victims.append(s)
            free += s.held
            break
        if s.pending == 0:
            needs[s.req] = _ceil_div(_seq_len(lane, s), lane.block_size) - s.held
            free -= needs[s.req]
        scheduled.append((s, take))
        left -= take
    return _Schedule(scheduled, victims, needs, left, free)


def _admit(lane: _Lane, st: _State, q: _Queues, sch: _Schedule) -> _Admission:
    """vLLM's ``_schedule_prefills``: admission from the waiting queue, stopping at the first
    request that breaks the sequence, page or token limit."""
    if lane.is_chunked:
        # The budget counts the sequences scheduling kept, and what they left of it.
        token_room = sch.tokens_left
        block_room = sch.free_blocks
        seq_room = lane.max_num_seqs - len(sch.scheduled)
    else:
        token_room = max(
            lane.max_num_batched_tokens, _to_compute(lane, st, q.waiting[0]) if q.waiting else 0
        )
        block_room = st.free_blocks
        seq_room = lane.max_num_seqs - len(q.running)
    block_room -= lane.watermark_blocks
    admitted: list[tuple[_Seq, int, int, int]] = []
    tokens = blocks = 0
    for s in q.waiting:
        length = _to_compute(lane, st, s)
        chunk = min(length, token_room - tokens) if lane.is_chunked else length
        need = _ceil_div(_seq_len(lane, s), lane.block_size)
        if (
            chunk <= 0
            or tokens + chunk > token_room
            or len(admitted) + 1 > seq_room
            or blocks + need > block_room
        ):
            break
        admitted.append((s, chunk, need, length))
        tokens += chunk
        blocks += need
    return _Admission(admitted, tokens)


def _batch_features(lane: _Lane, sch: _Schedule, adm: _Admission) -> _Batch:
    """The batch (with chunked prefill off, an iteration that admits runs only those
    prefills) and its tokens, sampled tokens, prefill pairs, decoding sequences and KV length."""
    scheduled, victims, needs = sch.scheduled, sch.victims, sch.needs
    if adm.admitted and not lane.is_chunked:
        scheduled, victims, needs = [], [], {}
    num_sampled = num_decoding = kv_tokens = 0
    pairs = 0.0
    for s, take in scheduled:
        if s.pending == 0:
            num_sampled += 1
            num_decoding += 1
            kv_tokens += _seq_len(lane, s)
        else:
            done = _seq_len(lane, s) - s.pending
            pairs += take * done + take * (take + 1) / 2
            num_sampled += take == s.pending
    for s, chunk, _, length in adm.admitted:
        # The chunk's queries follow the cached prefix, if any, and attend over it too.
        pairs += chunk * (_seq_len(lane, s) - length) + chunk * (chunk + 1) / 2
        num_sampled += chunk == length
    return _Batch(
        scheduled=scheduled,
        victims=victims,
        needs=needs,
        num_tokens=sum(take for _, take in scheduled) + adm.num_tokens,
        num_sampled=num_sampled,
        prefill_pairs=pairs,
        num_decoding=num_decoding,
        kv_tokens=kv_tokens,
        has_work=bool(scheduled or adm.admitted),
    )


def _features(b: _Batch) -> tuple[float, float, float]:
    return float(b.num_tokens), float(b.num_sampled), float(b.prefill_pairs)


def _round_time_s(lanes: list[_Lane], batches: list[_Batch], stage_share: list[float]) -> float:
    """How long the round of these batches lasts (rule 7; 0 if none has work)."""
    active = [(lane, b) for lane, b in zip(lanes, batches) if b.has_work]
    own_s, layers_s, last_s = [], [], []
    for lane, b in active:
        decoding = (float(b.num_decoding), float(b.kv_tokens))
        own_s.append(float(iteration_time_s(lane.coeffs, *_features(b), *decoding, xp=np)))
        off, last = (float(x) for x in pipeline_parts_s(lane.coeffs, *_features(b), xp=np))
        layers_s.append(own_s[-1] - off - last)
        last_s.append(last)
    round_s = max(own_s, default=0.0)
    if len(stage_share) > 1 and active:
        for s, share in enumerate(stage_share):
            stage_s = share * sum(layers_s) + (sum(last_s) if s == len(stage_share) - 1 else 0.0)
            round_s = max(round_s, stage_s)
    return round_s


def _run_cost(lane: _Lane, b: _Batch, round_s: float) -> _Run:
    """Wall time and above-idle energy of the batch in a round of ``round_s`` (none if
    the batch is empty)."""
    if not b.has_work:
        return _Run(0, 0.0, 0.0)
    e = lane.energy
    total_j = iteration_energy_j(e, round_s, *_features(b), float(b.kv_tokens), xp=np)
    return _Run(1, round_s, float(total_j) - e.num_gpus * e.idle_w * round_s)


def _apply(
    lane: _Lane, st: _State, q: _Queues, adm: _Admission, b: _Batch, run: _Run, end_s: float
) -> None:
    """The state at the round's end ``end_s``: victims preempted, admitted requests placed
    in the system, every sequence's tokens, pages and first-token time updated. Finished
    sequences are still in the system."""
    st.now_s = end_s
    st.num_iters += run.num_iters
    st.dynamic_energy_j += run.dynamic_energy_j
    for v in b.victims:
        st.free_blocks += v.held
        v.held = 0
        v.pending = 0
        v.is_running = False
        st.num_preemptions += 1
    progressed = []
    for s, take in b.scheduled:
        if s.pending == 0:
            need = b.needs[s.req]
            st.free_blocks -= need
            s.held += need
            progressed.append(s)
        else:
            s.pending -= take
            if s.pending == 0:
                progressed.append(s)
    for s, chunk, need, length in adm.admitted:
        # New requests join the system at its end; _compact puts them in queue order.
        if s.req >= st.next_req:
            st.system.append(s)
        s.is_running = True
        s.held = need
        st.free_blocks -= need
        s.pending = length - chunk
        if s.pending == 0:
            progressed.append(s)
    for s in progressed:
        s.gen += 1
        if s.gen == 1:
            st.first_token_s[s.req] = st.now_s
    st.next_req = max([st.next_req] + [s.req + 1 for s, *_ in adm.admitted])


def _retire(lane: _Lane, st: _State) -> list[_Seq]:
    """Sequences that yielded their last token finish now and free their pages; in a closed
    loop each frees a client, which sends the next request now."""
    retired = [
        s for s in st.system if s.is_running and s.pending == 0 and s.gen >= lane.output[s.req]
    ]
    # The first finish's time: the first request released was sent then (as the engine
    # takes it; exact while that request does not wait, think_frac[gate] = 0).
    is_first = st.num_finished == 0
    for s in retired:
        st.finish_s[s.req] = st.now_s
        st.free_blocks += s.held
        sent = lane.gate + st.num_finished
        if sent < len(st.sent_s):
            first_finish_s = st.now_s if is_first else st.sent_s[lane.gate]
            ready_s = max(st.now_s, first_finish_s * (1.0 + lane.think_frac[sent]))
            st.sent_s[sent] = max(ready_s, st.sent_s[sent - 1]) if sent > 0 else ready_s
            ahead_s = st.arrival_s[sent - 1] if sent > 0 else -math.inf
            st.arrival_s[sent] = max(st.sent_s[sent] + lane.delay_s[sent], ahead_s)
        st.num_finished += 1
    return retired


def _record_needs(lane: _Lane, st: _State, q: _Queues, sch: _Schedule, adm: _Admission) -> None:
    """Fold a round's needs of the limits into ``st`` (before :func:`_apply`): the batch's
    sequences, and the tokens every running sequence wanted and the admitted prompts whole
    (added with chunked prefill, apart without), at most the budget."""
    demand = sum(1 if s.pending == 0 else s.pending for s in q.running)
    prompts = sum(length for *_, length in adm.admitted)
    tokens = demand + prompts if lane.is_chunked else max(demand, prompts)
    # The sequences max_num_seqs counts: with chunked prefill those scheduling kept.
    counted = len(sch.scheduled) if lane.is_chunked else len(q.running)
    st.seqs_needed = max(st.seqs_needed, counted + len(adm.admitted))
    st.tokens_needed = max(st.tokens_needed, min(tokens, lane.max_num_batched_tokens))


def _record_pages(lane: _Lane, st: _State, sch: _Schedule) -> None:
    """Fold the pages held after a round (after :func:`_apply`) plus one into ``st``, at
    most the pages above the watermark, and all of them if the round preempted."""
    own = lane.num_kv_blocks - lane.watermark_blocks
    held = min(lane.num_kv_blocks - st.free_blocks + 1, own)
    st.pages_needed = max(st.pages_needed, own if sch.victims else held)


def _compact(st: _State, q: _Queues, adm: _Admission, b: _Batch, retired: list[_Seq]) -> None:
    """The queues for the next iteration, as vLLM updates them after scheduling, without the
    retired sequences: the running queue is the running sequences the batch did not touch,
    then the decodes, then the chunked prefills, then the admitted requests; each victim is
    put at the front of the waiting queue (``extendleft``), ahead of earlier victims."""
    touched = {s.req for s, _ in b.scheduled} | {v.req for v in b.victims}
    running = [s for s in q.running if s.req not in touched]
    running += [s for s, _ in b.scheduled if s.req in b.needs]
    running += [s for s, _ in b.scheduled if s.req not in b.needs]
    running += [s for s, *_ in adm.admitted]
    waiting: collections.deque[_Seq] = collections.deque(
        s for s in st.system if not s.is_running and s.req not in touched
    )
    waiting.extendleft(b.victims)
    gone = {s.req for s in retired}
    st.system = [s for s in running if s.req not in gone] + list(waiting)


def _record(lane: _Lane, st: _State, b: _Batch) -> IterationRecord:
    return IterationRecord(
        time_s=st.now_s,
        num_tokens=b.num_tokens,
        num_running=sum(s.is_running for s in st.system),
        num_in_system=len(st.system),
        num_arrived=_num_arrived(st, st.now_s),
        num_finished=st.num_finished,
        free_blocks=st.free_blocks,
        held_blocks=sum(s.held for s in st.system),
    )


def _round(
    engines: list[tuple[_Lane, _State]],
    stage_share: list[float],
    log: list[IterationRecord] | None,
) -> int:
    """One round of every virtual engine (or one round of preemption that frees pages);
    the replica's status."""
    now_s = min(_idle_until_s(lane, st) for lane, st in engines)
    now_s = now_s if math.isfinite(now_s) else engines[0][1].now_s
    plans = []
    for lane, st in engines:
        q = _queues(lane, st, now_s)
        sch = _schedule_running(lane, st, q)
        adm = _admit(lane, st, q, sch)
        _record_needs(lane, st, q, sch, adm)
        plans.append((q, sch, adm, _batch_features(lane, sch, adm)))
    if not any(b.has_work or sch.victims for _, sch, _, b in plans):
        # Rejecting requests up front rules this out; the engine reports it the same way.
        return INFEASIBLE
    round_s = _round_time_s([lane for lane, _ in engines], [p[3] for p in plans], stage_share)
    for (lane, st), (q, sch, adm, b) in zip(engines, plans):
        run = _run_cost(lane, b, round_s)
        _apply(lane, st, q, adm, b, run, now_s + round_s)
        _record_pages(lane, st, sch)
        _compact(st, q, adm, b, _retire(lane, st))
        if log is not None and run.num_iters:
            log.append(_record(lane, st, b))
    return LIVE


def _on_host(coeffs):
    """The same constants with each scalar a Python float and each vector a NumPy array."""
    fields = {}
    for name, value in coeffs._asdict().items():
        value = np.asarray(value, np.float64)
        fields[name] = float(value) if value.ndim == 0 else value
    return type(coeffs)(**fields)


def _make_lane(
    arrival_s,
    prompt_tokens,
    output_tokens,
    limits,
    coeffs,
    concurrency,
    energy,
    delay_s=None,
    think_frac=None,
    cached_tokens=0,
) -> _Lane:
    """The arguments of :func:`simulate_reference` as a :class:`_Lane` (``delay_s`` and
    ``think_frac``: ``[N]``, zeros if None; ``cached_tokens``: ``[N]`` or scalar)."""
    num_sent = concurrency if concurrency > 0 else len(arrival_s)
    zeros = [0.0] * len(arrival_s)
    cached = cached_prefix_tokens(prompt_tokens, cached_tokens, int(limits["block_size"]))
    return _Lane(
        sent_s=[float(x) if i < num_sent else math.inf for i, x in enumerate(arrival_s)],
        delay_s=zeros if delay_s is None else [float(x) for x in delay_s],
        think_frac=zeros if think_frac is None else [float(x) for x in think_frac],
        prompt=[int(x) for x in prompt_tokens],
        cached=[int(x) for x in cached],
        output=[int(x) for x in output_tokens],
        gate=concurrency if concurrency > 0 else len(arrival_s),
        max_num_seqs=int(limits["max_num_seqs"]),
        max_num_batched_tokens=int(limits["max_num_batched_tokens"]),
        block_size=int(limits["block_size"]),
        num_kv_blocks=int(limits["num_kv_blocks"]),
        watermark_blocks=int(limits["watermark_blocks"]),
        is_chunked=bool(limits.get("chunked_prefill", 0)),
        coeffs=_on_host(coeffs),
        energy=_on_host(EnergyCoeffs.zeros() if energy is None else energy),
    )


def _initial_state(lane: _Lane) -> _State:
    """Empty system at t = 0."""
    n = len(lane.sent_s)
    return _State(
        now_s=0.0,
        free_blocks=lane.num_kv_blocks,
        first_token_s=[math.nan] * n,
        finish_s=[math.nan] * n,
        sent_s=list(lane.sent_s),
        arrival_s=[float(x) for x in engine_arrivals(lane.sent_s, lane.delay_s)] if n else [],
    )


def simulate_reference(
    arrival_s: np.ndarray,
    prompt_tokens: np.ndarray,
    output_tokens: np.ndarray,
    limits: dict[str, int],
    coeffs: CostCoeffs,
    *,
    concurrency: int = 0,
    delay_s=0.0,
    think_frac=0.0,
    cached_tokens=0,
    max_iters: int = 10_000_000,
    energy: EnergyCoeffs | None = None,
    log: list[IterationRecord] | None = None,
) -> LaneResult:
    """Simulate one replica without pipeline parallelism iteration by iteration.

    Args:
        arrival_s: ``[N]`` non-decreasing send times in seconds (in closed loop those of
            the first ``concurrency`` requests, all zero for a benchmark).
        prompt_tokens: ``[N]`` prompt lengths.
        output_tokens: ``[N]`` output lengths (>= 1).
        limits: see :class:`EngineLimits`.
        coeffs: cost coefficients of the plan (batch shape ``()``).
        concurrency: closed-loop clients; 0 means open loop.
        delay_s: ``[N]`` or scalar seconds from each request's send to its arrival at the
            engine (:func:`apex_jax.simulator.engine_arrivals`).
        think_frac: ``[N]`` or scalar; in a closed loop a request released at time ``t`` is
            sent at ``t (1 + think_frac)``.
        cached_tokens: ``[N]`` or scalar prompt tokens the prefix cache holds (rule 8).
        max_iters: iteration cap.
        energy: power-model constants; the result's ``dynamic_energy_j`` is the above-idle
            energy of the replica's GPUs over its iterations (see :mod:`apex_jax.cost.energy`).
        log: if given, one :class:`IterationRecord` is appended per iteration.

    Returns:
        :class:`apex_jax.simulator.LaneResult` of the lane: Python numbers and ``[N]``
        float64 arrays, NaN for unfinished and rejected requests (:func:`rejected_requests`:
        the lane serves the rest).
    """
    engine = (arrival_s, prompt_tokens, output_tokens, concurrency, delay_s, think_frac)
    engine += (cached_tokens,)
    (result,) = simulate_replica_reference(
        [engine], limits, coeffs, max_iters=max_iters, energy=energy, log=log
    )
    return result


def simulate_replica_reference(
    engines: Sequence[tuple],
    limits: dict[str, int],
    coeffs: CostCoeffs,
    *,
    stage_layers: Sequence[int] = (1,),
    max_iters: int = 10_000_000,
    energy: EnergyCoeffs | None = None,
    log: list[IterationRecord] | None = None,
) -> list[LaneResult]:
    """Simulate one replica round by round: its virtual engines sharing the pipeline
    stages (rule 7).

    Args:
        engines: per virtual engine, ``(arrival_s, prompt_tokens, output_tokens,
            concurrency, delay_s, think_frac)`` as in :func:`simulate_reference`, optionally
            followed by ``cached_tokens``.
        limits: each virtual engine's limits (see :class:`EngineLimits`).
        coeffs: cost coefficients of the plan (batch shape ``()``).
        stage_layers: layers of each pipeline stage (``pp`` entries).
        max_iters: iteration cap, over all virtual engines.
        energy: power-model constants (see :func:`simulate_reference`).
        log: if given, one :class:`IterationRecord` is appended per engine iteration.

    Returns:
        One :class:`apex_jax.simulator.LaneResult` per virtual engine; ``status`` is the
        replica's.
    """
    served, states = [], []
    for arrival, prompt, output, concurrency, delay_s, think_frac, *cached in engines:
        is_served = rejected_requests(prompt, output, limits) == 0
        columns = [
            np.broadcast_to(np.asarray(x), np.shape(arrival))[is_served]
            for x in (arrival, prompt, output, delay_s, think_frac, cached[0] if cached else 0)
        ]
        lane = _make_lane(*columns[:3], limits, coeffs, concurrency, energy, *columns[3:])
        served.append(is_served)
        states.append((lane, _initial_state(lane)))
    stage_share = [layers / float(sum(stage_layers)) for layers in stage_layers]
    status = LIVE
    while status == LIVE:
        if all(st.num_finished >= len(lane.sent_s) for lane, st in states):
            status = OK
        elif sum(st.num_iters for _, st in states) >= max_iters:
            status = MAX_ITERS
        else:
            status = _round(states, stage_share, log)
    results = []
    for is_served, (_, st) in zip(served, states):
        first_token_s = np.full(is_served.shape, np.nan)
        finish_s = np.full(is_served.shape, np.nan)
        sent_s = np.full(is_served.shape, np.nan)
        first_token_s[is_served] = st.first_token_s
        finish_s[is_served] = st.finish_s
        sent_s[is_served] = st.sent_s
        results.append(
            LaneResult(
                status=status,
                first_token_s=first_token_s,
                finish_s=finish_s,
                sent_s=sent_s,
                num_iters=st.num_iters,
                num_preemptions=st.num_preemptions,
                dynamic_energy_j=st.dynamic_energy_j,
                seqs_needed=st.seqs_needed,
                tokens_needed=st.tokens_needed,
                pages_needed=st.pages_needed,
            )
        )
    return results
