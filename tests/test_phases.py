"""The engine's phases against the reference's phases of the same name, iteration by iteration.

The reference runs a case one iteration at a time. Before each iteration its state is
converted to an engine state, and every engine phase (one iteration, without event skipping)
must agree with the reference phase of the same name, so a disagreement names its phase. The
engine-only run lengths (:func:`apex_jax.simulator._describe`, event skipping) are covered
end to end by test_engine_vs_reference, and here where a decode run must stop at a cost
breakpoint; the round time of virtual engines sharing stages here round by round.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    NUM_REQUESTS,
    NUM_SLOTS,
    engine_case,
    pipeline_coeffs,
    replica_engines,
    scenarios,
    served,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apex_jax import reference as ref
from apex_jax import simulator as sim
from apex_jax.status import LIVE

RTOL = 1e-12
MAX_ITERATIONS_CHECKED = 300


def _inputs(lane_in: sim.LaneInputs):
    """``(replica inputs [1, ...] padded, the engine's own fields)`` of a lone engine."""
    inputs = sim._pad_requests(sim.stack_lanes([lane_in]), NUM_SLOTS + 2)
    return inputs, jax.tree.map(lambda x: x[0], sim._engine_fields(inputs))


def _up_to_batch(
    inputs: sim.LaneInputs, engine: sim.LaneInputs, st: sim.EngineState, arrival_s, now_s
):
    """The engine's phases up to the batch at the round's start ``now_s`` (``arrival_s``:
    ``[1, N + S + 2]``): ``(win, q, sch, adm, b)``."""
    win = sim._window(inputs, arrival_s, 0, st.next_req, NUM_SLOTS + 1)
    q = sim._queues(engine, st, win, now_s)
    sch = sim._schedule_running(engine, st, q)
    adm = sim._admit(engine, st, win, q, sch)
    return win, q, sch, adm, sim._batch_features(engine, st, win, q, sch, adm)


@jax.jit
def _engine_phases(inputs: sim.LaneInputs, st: sim.EngineState, times, now_s):
    engine = jax.tree.map(lambda x: x[0], sim._engine_fields(inputs))
    sent_s, arrival_s = times
    win, q, sch, adm, b = _up_to_batch(inputs, engine, st, arrival_s, now_s)
    run = sim._describe(engine, st, win, q, sch, adm, b)
    # A lone engine's round is its own iteration.
    series, _ = sim._round_series(engine.stage_share, jax.tree.map(lambda x: x[None], run))
    applied = sim._apply(engine, st, win, q, sch, adm, b)
    end_s = now_s + series.time0_s
    # One round ran: the run ends, as at the engine's next event.
    ended, finished, first_s = sim._end_run(engine, applied, run._replace(num_rounds=1), end_s)
    sent = sim._send(inputs, sent_s, arrival_s, 0, end_s, st.num_finished, finished, True)
    return q, sch, adm, b, run, series, applied, ended, finished, first_s, sent


def _engine_state(lane: ref._Lane, st: ref._State) -> sim.EngineState:
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
    return sim.EngineState(
        next_req=i32(st.next_req),
        num_finished=i32(st.num_finished),
        num_iters=i32(st.num_iters),
        num_preemptions=i32(st.num_preemptions),
        dynamic_energy_j=np.float64(st.dynamic_energy_j),
        free_blocks=i32(st.free_blocks),
        seqs_needed=i32(st.seqs_needed),
        tokens_needed=i32(st.tokens_needed),
        pages_needed=i32(st.pages_needed),
        slots=slots,
    )


def _times(states: list[ref._State]):
    """The reference's send and arrival times in engine form: ``[V, N]`` and ``[V, N + S +
    2]``, padded with +inf (never sent)."""

    def column(times, size):
        return np.array(list(times) + [np.inf] * (size - len(times)), np.float64)

    return (
        np.stack([column(st.sent_s, NUM_REQUESTS) for st in states]),
        np.stack([column(st.arrival_s, NUM_REQUESTS + NUM_SLOTS + 2) for st in states]),
    )


def _make_lane(case, lane_in: sim.LaneInputs, concurrency=0, delay_s=0.0, think_frac=0.0):
    """The reference lane of a case's served requests (``case``: arrival, prompt, output,
    limits, ...), with the engine lane's constants."""
    arrival, prompt, output, limits = case[:4]
    is_served = served(prompt, output, limits)

    def mine(x):
        return np.broadcast_to(np.asarray(x), np.shape(arrival))[is_served]

    return ref._make_lane(
        mine(arrival),
        mine(prompt),
        mine(output),
        limits,
        lane_in.coeffs,
        concurrency,
        lane_in.energy,
        mine(delay_s),
        mine(think_frac),
    )


def _reqs(slots, mask) -> list[int]:
    return [int(r) for r in np.asarray(slots.req)[np.asarray(mask)]]


def _check_queues(e, q: ref._Queues, est):
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
    # New requests before the last are admitted whole (but a cached prefix); the last may
    # get a partial chunk.
    engine += [(r, lane.prompt[r] - lane.cached[r]) for r in new_reqs[:-1]]
    engine += [(r, int(e.last_chunk)) for r in new_reqs[-1:]]
    assert engine == [(s.req, c) for s, c, *_ in adm.admitted], "_admit: requests and chunks"
    assert int(e.num_admitted) == len(adm.admitted), "_admit: count"
    assert int(e.preempted_tokens + e.new_tokens) == adm.num_tokens, "_admit: tokens"
    pages = int(e.preempted_blocks + e.new_blocks)
    assert pages == sum(need for _, _, need, _ in adm.admitted), "_admit: KV pages"


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


def _check_run(run: sim.EngineRun, series, lane: ref._Lane, b: ref._Batch, round_s: float):
    """The batch's descriptor: its own time is the reference's iteration time (a lone
    engine's round), and its busy time gives the reference's energy for one round."""
    np.testing.assert_allclose(series.time0_s, round_s, rtol=RTOL, err_msg="_describe: time")
    expected = ref._run_cost(lane, b, round_s)
    e = lane.energy
    energy_j = e.num_gpus * e.dynamic_w * min(float(run.busy0_s), round_s) if b.has_work else 0.0
    # Busy times that cancel to near zero differ by rounding between the two sides; a
    # picosecond of busy time at full power bounds that.
    np.testing.assert_allclose(
        energy_j,
        expected.dynamic_energy_j,
        rtol=1e-9,
        atol=e.num_gpus * e.dynamic_w * 1e-12,
        err_msg="_describe: J",
    )


def _check_slots(engine: sim.Slots, expected: sim.Slots, phase: str):
    for name in ("req", "prompt", "output", "gen", "pending", "held", "is_running"):
        np.testing.assert_array_equal(
            getattr(engine, name), getattr(expected, name), err_msg=f"{phase}: slot {name}"
        )
    np.testing.assert_allclose(
        engine.first_token_s, expected.first_token_s, rtol=RTOL, err_msg=f"{phase}: first token"
    )


def _check_counters(engine: sim.EngineState, expected: sim.EngineState, phase: str):
    # Iterations and preemptions count when the rounds run (_advance), end to end elsewhere.
    for name in ("next_req", "num_finished", "free_blocks"):
        assert int(getattr(engine, name)) == int(getattr(expected, name)), f"{phase}: {name}"


def _check_iteration(inputs: sim.LaneInputs, lane: ref._Lane, st: ref._State) -> None:
    """Run one reference iteration on ``st`` (in place), checking each engine phase."""
    est = _engine_state(lane, st)
    now_s = ref._idle_until_s(lane, st)
    eq, esch, eadm, eb, erun, series, applied, ended, finished, first_s, sent = _engine_phases(
        inputs, est, _times([st]), now_s
    )
    q = ref._queues(lane, st, now_s)
    _check_queues(eq, q, est)
    sch = ref._schedule_running(lane, st, q)
    _check_schedule(esch, sch, est)
    adm = ref._admit(lane, st, q, sch)
    _check_admission(eadm, adm, lane, est)
    b = ref._batch_features(lane, sch, adm)
    _check_batch(eb, b, est)
    round_s = ref._round_time_s([lane], [b], [1.0])
    _check_run(erun, series, lane, b, round_s)
    run = ref._run_cost(lane, b, round_s)
    ref._apply(lane, st, q, adm, b, run, q.now_s + run.duration_s)
    after_apply = _engine_state(lane, st)
    _check_counters(applied, after_apply, "_apply")
    # First tokens are stamped at the run's end, when the engine's next event reads them.
    num = len(st.system)
    resolved = applied.slots._replace(first_token_s=first_s)
    _check_slots(
        jax.tree.map(lambda x: x[:num], resolved),
        jax.tree.map(lambda x: x[:num], after_apply.slots),
        "_apply",
    )
    done = ref._retire(lane, st)
    _check_counters(ended, _engine_state(lane, st), "_retire")
    for name, engine, expected in zip(("sent_s", "arrival_s"), sent, _times([st])):
        np.testing.assert_allclose(engine, expected, rtol=RTOL, err_msg=f"_retire: {name}")
    finished = np.asarray(finished)
    assert sorted(finished[finished >= 0].tolist()) == sorted(s.req for s in done), "_retire: who"
    for s in done:
        slot = int(np.flatnonzero(finished == s.req)[0])
        np.testing.assert_allclose(
            first_s[slot], st.first_token_s[s.req], rtol=RTOL, err_msg="_retire: first token"
        )
        np.testing.assert_allclose(
            q.now_s + round_s, st.finish_s[s.req], rtol=RTOL, err_msg="_retire: finish"
        )
    ref._compact(st, q, adm, b, done)
    _check_slots(ended.slots, _engine_state(lane, st).slots, "_compact")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_engine_phases_match_reference_phases(case):
    lane_in = engine_case(*case)
    inputs, _ = _inputs(lane_in)
    lane = _make_lane(case, lane_in, *case[5:])
    st = ref._initial_state(lane)
    for _ in range(MAX_ITERATIONS_CHECKED):
        if st.num_finished == len(lane.sent_s):
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
    lane = _make_lane(case, lane_in)
    st = ref._initial_state(lane)
    st.system = copy.deepcopy(system)
    st.next_req = max(s.req for s in system) + 1
    st.free_blocks = free_blocks
    _check_iteration(_inputs(lane_in)[0], lane, st)


@jax.jit
def _decode_run(inputs: sim.LaneInputs, st: sim.EngineState, arrival_s, now_s):
    engine = jax.tree.map(lambda x: x[0], sim._engine_fields(inputs))
    win, q, sch, adm, b = _up_to_batch(inputs, engine, st, arrival_s, now_s)
    return b, sim._describe(engine, st, win, q, sch, adm, b).rounds_left


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
    lane = _make_lane(case, lane_in)
    st = ref._initial_state(lane)
    ref._round([(lane, st)], [1.0], None)  # the prefill: every sequence now decodes
    run_decode = jax.jit(_decode_run)
    b, k = run_decode(_inputs(lane_in)[0], _engine_state(lane, st), _times([st])[1], st.now_s)
    assert bool(b.is_pure_decode) and int(b.batch_size) == n
    assert int(k) == expected


@jax.jit
def _engine_round_s(inputs: sim.LaneInputs, est: sim.EngineState, arrival_s, now_s):
    """The round's time from the engine's phases: every virtual engine scheduled at the
    round's start, then :func:`apex_jax.simulator._round_series` over their runs."""

    def describe(v):
        engine = jax.tree.map(lambda x: x[v], sim._engine_fields(inputs))
        st = jax.tree.map(lambda x: x[v], est)
        win = sim._window(inputs, arrival_s, v, st.next_req, NUM_SLOTS + 1)
        return sim._schedule(engine, st, win, now_s)[1]

    runs = jax.vmap(describe)(jnp.arange(est.next_req.shape[0]))
    return sim._round_series(inputs.stage_share[0], runs)[0].time0_s


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.lists(st.integers(1, 4), min_size=2, max_size=3))
def test_round_time_matches_reference_round_by_round(case, stage_layers):
    """Virtual engines sharing uneven stages: before every reference round, the engine's
    round time (:func:`apex_jax.simulator._round_series`) from the same states agrees with
    the reference's."""
    arrival, prompt, output, limits, vector, concurrency, delay_s, think_frac = case
    coeffs = pipeline_coeffs(vector, 0.5, 0.5)
    lanes, inputs = [], []
    for a, p, o, clients, d, f in replica_engines(
        arrival, prompt, output, concurrency, delay_s, think_frac, len(stage_layers)
    ):
        is_served = served(p, o, limits)
        requests = (a[is_served], p[is_served], o[is_served])
        waits = (d[is_served], f[is_served])
        inputs.append(
            sim.make_lane_inputs(
                *requests,
                limits,
                coeffs,
                num_requests=NUM_REQUESTS,
                concurrency=clients,
                delay_s=waits[0],
                think_frac=waits[1],
                stage_layers=stage_layers,
            )
        )
        lanes.append(ref._make_lane(*requests, limits, coeffs, clients, None, *waits))
    padded = sim._pad_requests(sim.stack_lanes(inputs), NUM_SLOTS + 2)
    states = [(lane, ref._initial_state(lane)) for lane in lanes]
    share = [layers / sum(stage_layers) for layers in stage_layers]
    for _ in range(MAX_ITERATIONS_CHECKED):
        if all(st_.num_finished >= len(lane.sent_s) for lane, st_ in states):
            break
        est = sim.stack_lanes([_engine_state(lane, st_) for lane, st_ in states])
        now_s = min(ref._idle_until_s(lane, st_) for lane, st_ in states)
        plans = []
        for lane, st_ in states:
            q = ref._queues(lane, st_, now_s)
            sch = ref._schedule_running(lane, st_, q)
            plans.append(ref._batch_features(lane, sch, ref._admit(lane, st_, q, sch)))
        round_s = _engine_round_s(padded, est, _times([st_ for _, st_ in states])[1], now_s)
        expected_s = ref._round_time_s(lanes, plans, share)
        np.testing.assert_allclose(round_s, expected_s, rtol=RTOL, atol=1e-300, err_msg="round")
        assert ref._round(states, share, None) == LIVE
