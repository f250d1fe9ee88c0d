"""The engine's phases against the reference's phases of the same name, iteration by iteration.

The reference runs a case one iteration at a time. Before each iteration its state is
converted to an engine state, and every engine phase (one iteration, without event skipping)
must agree with the reference phase of the same name, so a disagreement names its phase. The
engine-only :func:`apex_jax.simulator._run_length` (event skipping) is covered end to end by
test_engine_vs_reference, and here where a decode run must stop at a cost breakpoint.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NUM_REQUESTS, NUM_SLOTS, engine_case, scenarios, served
from hypothesis import HealthCheck, given, settings

from apex_jax import reference as ref
from apex_jax import simulator as sim
from apex_jax.status import LIVE

RTOL = 1e-12
MAX_ITERATIONS_CHECKED = 300


def _up_to_batch(inputs: sim.LaneInputs, st: sim.LaneState):
    """The engine's phases up to the batch: ``(win, q, sch, adm, b)``."""
    win = sim._window(inputs, st.next_req, NUM_SLOTS + 1)
    q = sim._queues(inputs, st, win)
    sch = sim._schedule_running(inputs, st, q)
    adm = sim._admit(inputs, st, win, q, sch)
    return win, q, sch, adm, sim._batch_features(inputs, st, win, q, sch, adm)


@jax.jit
def _engine_phases(inputs: sim.LaneInputs, st: sim.LaneState):
    win, q, sch, adm, b = _up_to_batch(inputs, st)
    run = sim._run_cost(inputs, b, b.has_work.astype(jnp.int32))  # one iteration, as the reference
    applied = sim._apply(inputs, st, win, q, sch, adm, b, run)
    retired, is_kept = sim._retire(applied)
    compacted = sim._compact(retired.slots, is_kept, sim._next_order(q, adm, b))
    return q, sch, adm, b, run, applied, retired, compacted


def _engine_state(lane: ref._Lane, st: ref._State) -> sim.LaneState:
    """The reference state in engine form (per-request times are only written on finish)."""
    system = st.system
    pad = NUM_SLOTS - len(system)

    def column(values, fill, dtype):
        return np.array(list(values) + [fill] * pad, dtype)

    slots = sim.Slots(
        req=column([s.req for s in system], sim.EMPTY, np.int32),
        prompt=column([lane.prompt[s.req] for s in system], 0, np.int32),
        output=column([lane.output[s.req] for s in system], 0, np.int32),
        gen=column([s.gen for s in system], 0, np.int32),
        pending=column([s.pending for s in system], 0, np.int32),
        held=column([s.held for s in system], 0, np.int32),
        is_running=column([s.is_running for s in system], False, bool),
        first_token_s=column(
            [st.first_token_s[s.req] if s.gen else 0.0 for s in system], 0.0, np.float64
        ),
    )
    i32 = np.int32
    return sim.LaneState(
        now_s=np.float64(st.now_s),
        next_req=i32(st.next_req),
        num_finished=i32(st.num_finished),
        num_iters=i32(st.num_iters),
        num_preemptions=i32(st.num_preemptions),
        dynamic_energy_j=np.float64(st.dynamic_energy_j),
        free_blocks=i32(st.free_blocks),
        status=i32(LIVE),
        slots=slots,
        first_token_s=np.full(NUM_REQUESTS, np.nan),
        finish_s=np.full(NUM_REQUESTS, np.nan),
    )


def _reqs(slots, mask) -> list[int]:
    return [int(r) for r in np.asarray(slots.req)[np.asarray(mask)]]


def _check_queues(e, q: ref._Queues, est):
    np.testing.assert_allclose(e.now_s, q.now_s, rtol=RTOL, err_msg="_queues: idle jump")
    assert _reqs(est.slots, e.is_running) == [s.req for s in q.running], "_queues: running"
    preempted = [s.req for s in q.waiting if s.req < est.next_req]
    assert _reqs(est.slots, e.is_preempted) == preempted, "_queues: preempted"
    # The engine sees a window of S + 1 never-admitted requests: enough to fill every slot.
    num_new = min(len(q.waiting) - len(preempted), NUM_SLOTS + 1)
    assert int(e.num_new_waiting) == num_new, "_queues: new waiting"


def _check_schedule(e, sch: ref._Schedule, est):
    take, need = np.asarray(e.take), np.asarray(e.need)
    idx = np.flatnonzero(np.asarray(e.is_scheduled))
    engine = {int(est.slots.req[i]): (int(take[i]), int(need[i])) for i in idx}
    expected = {s.req: (take, sch.needs.get(s.req, 0)) for s, take in sch.scheduled}
    assert engine == expected, "_schedule_running: tokens and pages of the running"
    assert sorted(_reqs(est.slots, e.is_victim)) == sorted(v.req for v in sch.victims), (
        "_schedule_running: victims"
    )


def _check_admission(e, adm: ref._Admission, lane: ref._Lane, est):
    chunk = np.asarray(e.chunk)
    engine = [(int(est.slots.req[i]), int(chunk[i])) for i in np.flatnonzero(e.is_admitted)]
    num_new = int(e.num_new)
    new_reqs = range(int(est.next_req), int(est.next_req) + num_new)
    # New requests before the last are admitted whole; the last may get a partial chunk.
    engine += [(r, lane.prompt[r]) for r in new_reqs[:-1]]
    engine += [(r, int(e.last_chunk)) for r in new_reqs[-1:]]
    assert engine == [(s.req, c) for s, c, _ in adm.admitted], "_admit: requests and chunks"
    assert int(e.num_admitted) == len(adm.admitted), "_admit: count"
    assert int(e.preempted_tokens + e.new_tokens) == adm.num_tokens, "_admit: tokens"
    pages = int(e.preempted_blocks + e.new_blocks)
    assert pages == sum(need for _, _, need in adm.admitted), "_admit: KV pages"


def _check_batch(e, b: ref._Batch, est):
    idx = np.flatnonzero(np.asarray(e.is_decoding) | np.asarray(e.is_prefilling))
    take = np.where(np.asarray(e.is_decoding), 1, np.asarray(e.fill_take))
    engine = {int(est.slots.req[i]): int(take[i]) for i in idx}
    assert engine == {s.req: take for s, take in b.scheduled}, "_batch_features: batch"
    assert sorted(_reqs(est.slots, e.is_victim)) == sorted(v.req for v in b.victims), (
        "_batch_features: victims"
    )
    assert int(e.num_tokens) == b.num_tokens, "_batch_features: tokens"
    assert int(e.num_sampled) == b.num_sampled, "_batch_features: sampled"
    assert float(e.kv_tokens) == b.kv_tokens, "_batch_features: KV tokens"
    np.testing.assert_allclose(
        e.prefill_pairs, b.prefill_pairs, rtol=RTOL, err_msg="_batch_features: pairs"
    )
    assert bool(e.has_work) == b.has_work, "_batch_features: has work"


def _check_run(e, run: ref._Run):
    assert int(e.num_iters) == run.num_iters, "_run_cost: iterations"
    np.testing.assert_allclose(e.duration_s, run.duration_s, rtol=RTOL, err_msg="_run_cost: time")
    np.testing.assert_allclose(
        e.dynamic_energy_j, run.dynamic_energy_j, rtol=1e-9, atol=1e-15, err_msg="_run_cost: J"
    )


def _check_slots(engine: sim.Slots, expected: sim.Slots, phase: str):
    for name in ("req", "prompt", "output", "gen", "pending", "held", "is_running"):
        np.testing.assert_array_equal(
            getattr(engine, name), getattr(expected, name), err_msg=f"{phase}: slot {name}"
        )
    np.testing.assert_allclose(
        engine.first_token_s, expected.first_token_s, rtol=RTOL, err_msg=f"{phase}: first token"
    )


def _check_counters(engine: sim.LaneState, expected: sim.LaneState, phase: str):
    for name in ("next_req", "num_finished", "num_iters", "num_preemptions", "free_blocks"):
        assert int(getattr(engine, name)) == int(getattr(expected, name)), f"{phase}: {name}"
    np.testing.assert_allclose(engine.now_s, expected.now_s, rtol=RTOL, err_msg=f"{phase}: now")


def _check_iteration(inputs: sim.LaneInputs, lane: ref._Lane, st: ref._State) -> None:
    """Run one reference iteration on ``st`` (in place), checking each engine phase."""
    est = _engine_state(lane, st)
    eq, esch, eadm, eb, erun, applied, retired, compacted = _engine_phases(inputs, est)
    q = ref._queues(lane, st)
    _check_queues(eq, q, est)
    sch = ref._schedule_running(lane, st, q)
    _check_schedule(esch, sch, est)
    adm = ref._admit(lane, st, q, sch)
    _check_admission(eadm, adm, lane, est)
    b = ref._batch_features(lane, sch, adm)
    _check_batch(eb, b, est)
    run = ref._run_cost(lane, b)
    _check_run(erun, run)
    ref._apply(lane, st, q, adm, b, run)
    after_apply = _engine_state(lane, st)
    _check_counters(applied, after_apply, "_apply")
    _check_slots(
        jax.tree.map(lambda x: x[: len(st.system)], applied.slots),
        jax.tree.map(lambda x: x[: len(st.system)], after_apply.slots),
        "_apply",
    )
    finished = ref._retire(lane, st)
    _check_counters(retired, _engine_state(lane, st), "_retire")
    for s in finished:
        for name in ("first_token_s", "finish_s"):
            np.testing.assert_allclose(
                getattr(retired, name)[s.req],
                getattr(st, name)[s.req],
                rtol=RTOL,
                err_msg=f"_retire: {name}",
            )
    assert int(np.isfinite(retired.finish_s).sum()) == len(finished), "_retire: who"
    ref._compact(st, q, adm, b, finished)
    _check_slots(compacted, _engine_state(lane, st).slots, "_compact")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_engine_phases_match_reference_phases(case):
    arrival, prompt, output, limits, _, concurrency = case
    is_served = served(prompt, output, limits)
    lane_in = engine_case(*case)
    inputs = sim._pad_requests(lane_in, NUM_SLOTS + 2)
    lane = ref._make_lane(
        arrival[is_served],
        prompt[is_served],
        output[is_served],
        limits,
        lane_in.coeffs,
        concurrency,
        lane_in.energy,
    )
    st = ref._initial_state(lane)
    for _ in range(MAX_ITERATIONS_CHECKED):
        if st.num_finished == len(lane.arrival_s):
            break
        _check_iteration(inputs, lane, st)


def _seq(req, gen, held, is_running, pending=0):
    s = ref._Seq(req)
    s.gen, s.held, s.is_running, s.pending = gen, held, is_running, pending
    return s


# Hand-made states on boundaries that random cases rarely hit: (prompts, outputs, limits,
# sequences in the system, free KV pages).
BOUNDARY_STATES = {
    # Three decodes each need a page and none is free; the last one's two pages plus the
    # page it no longer needs cover the shortfall of three exactly, so it alone is preempted.
    "victim_pages_exactly_cover": (
        [1, 1, 1],
        [4, 4, 4],
        {"max_num_seqs": 4, "block_size": 1, "num_kv_blocks": 4, "chunked_prefill": 0},
        [_seq(0, 1, 1, True), _seq(1, 1, 1, True), _seq(2, 2, 2, True)],
        0,
    ),
    # Chunked prefill: the first recomputed request uses the whole token budget, so the next
    # one waits rather than getting an empty chunk.
    "recompute_fills_budget_exactly": (
        [60, 10, 5],
        [8, 8, 8],
        {"max_num_seqs": 4, "block_size": 16, "num_kv_blocks": 100, "chunked_prefill": 1},
        [_seq(0, 4, 0, False), _seq(1, 2, 0, False)],
        100,
    ),
}


@pytest.mark.parametrize("name", sorted(BOUNDARY_STATES))
def test_engine_phases_match_reference_phases_on_boundaries(name, coeffs):
    prompt, output, limits, system, free_blocks = BOUNDARY_STATES[name]
    limits = {
        "max_num_batched_tokens": 64,
        "watermark_blocks": 0,
        "max_model_len": 10_000,
        **limits,
    }
    arrival = np.zeros(len(prompt))
    case = (arrival, np.array(prompt), np.array(output), limits, coeffs)
    lane_in = engine_case(*case)
    lane = ref._make_lane(*case[:4], lane_in.coeffs, 0, lane_in.energy)
    st = ref._initial_state(lane)
    st.system = copy.deepcopy(system)
    st.next_req = max(s.req for s in system) + 1
    st.free_blocks = free_blocks
    _check_iteration(sim._pad_requests(lane_in, NUM_SLOTS + 2), lane, st)


@jax.jit
def _run_length(inputs: sim.LaneInputs, st: sim.LaneState):
    win, q, sch, _, b = _up_to_batch(inputs, st)
    return b, sim._run_length(inputs, st, win, q, sch, b, max_iters=1_000_000)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        # One sequence of 100 prompt tokens decodes reading 101, 102, ... KV entries: the
        # piece from the breakpoint 64 ends at 512, so 412 iterations (101 ... 512).
        ([100], 412),
        # Two sequences read 101 + 121 = 222 entries, 2 more each iteration: 146 iterations
        # (222, 224, ..., 512).
        ([100, 120], 146),
        # Exactly at a breakpoint the next piece starts, and ends at 4096: 3585 (512 ... 4096).
        ([511], 3585),
    ],
)
def test_a_decode_run_ends_where_its_piece_ends(prompt, expected, coeffs):
    n = len(prompt)
    limits = {
        "max_num_seqs": 8,
        "max_num_batched_tokens": 2048,
        "block_size": 16,
        "num_kv_blocks": 2000,
        "watermark_blocks": 0,
        "max_model_len": 10_000,
    }
    case = (np.zeros(n), np.asarray(prompt), np.full(n, 5000), limits, coeffs)
    lane_in = engine_case(*case)
    lane = ref._make_lane(*case[:4], lane_in.coeffs, 0, lane_in.energy)
    st = ref._initial_state(lane)
    ref._iterate(lane, st, None)  # the prefill: every sequence now decodes
    b, k = _run_length(sim._pad_requests(lane_in, NUM_SLOTS + 2), _engine_state(lane, st))
    assert bool(b.is_pure_decode) and int(b.batch_size) == n
    assert int(k) == expected
