"""Conservation laws of the engine semantics, checked iteration by iteration.

The reference records every iteration; the JAX engine is checked step by step where its own
state can be read. The differential tests tie the two together.
"""

from __future__ import annotations

import jax
import numpy as np
from conftest import (
    NUM_REQUESTS,
    NUM_SLOTS,
    pipeline_coeffs,
    plausible_coeffs,
    replica_engines,
    run_reference,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from apex_jax.simulator import _pad_requests, init_state, make_lane_inputs, stack_lanes, step
from apex_jax.status import LIVE, OK


def _case(rng, n, chunked, concurrency=0, kv_blocks=60):
    arrival = np.zeros(n) if concurrency else np.cumsum(rng.exponential(0.02, n))
    limits = {
        "max_num_seqs": 8,
        "max_num_batched_tokens": 96,
        "block_size": 4,
        "num_kv_blocks": kv_blocks,
        "watermark_blocks": 1,
        "max_model_len": 10_000,
        "chunked_prefill": chunked,
    }
    return (
        arrival,
        rng.integers(1, 90, n),
        rng.integers(1, 60, n),
        limits,
        plausible_coeffs(),
        concurrency,
    )


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), chunked=st.sampled_from([0, 1]))
def test_reference_invariants(seed, chunked):
    rng = np.random.default_rng(seed)
    case = _case(rng, 24, chunked)
    log = []
    ref = run_reference(*case, log=log)
    assert ref.status == OK
    limits = case[3]
    times = [it.time_s for it in log]
    assert np.all(np.diff(times) > 0), "the clock only moves forward"
    for it in log:
        assert it.free_blocks >= 0
        assert it.free_blocks + it.held_blocks == limits["num_kv_blocks"]
        assert it.num_running <= limits["max_num_seqs"]
        if chunked:
            assert it.num_tokens <= limits["max_num_batched_tokens"]
    assert log[-1].num_finished == 24
    assert np.all(ref.first_token_s >= case[0])
    assert np.all(ref.finish_s >= ref.first_token_s)


def test_preemption_conserves_requests_and_tokens():
    rng = np.random.default_rng(7)
    case = _case(rng, 24, 1, kv_blocks=40)
    log = []
    ref = run_reference(*case, log=log)
    assert ref.num_preemptions > 0
    assert ref.status == OK
    assert np.all(np.isfinite(ref.finish_s))
    # Every request generated exactly its output: it finished, and finishing needs gen == out.
    assert log[-1].num_in_system == 0


def test_closed_loop_keeps_concurrency_requests_in_system():
    rng = np.random.default_rng(3)
    concurrency, n = 5, 30
    log = []
    run_reference(*_case(rng, n, 1, concurrency=concurrency, kv_blocks=400), log=log)
    for it in log:
        # Requests sent and not finished: exactly C until the last C are sent.
        outstanding = it.num_arrived - it.num_finished
        assert outstanding == min(concurrency, n - it.num_finished)
        assert it.num_in_system <= outstanding


def test_engine_steps_keep_kv_within_capacity_and_time_monotone():
    """Step by step, in a pipeline replica of two virtual engines over uneven stages: each
    engine's pages are conserved and within its capacity, and the shared clock is monotone."""
    rng = np.random.default_rng(11)
    case = _case(rng, 24, 1, kv_blocks=40)
    stage_layers = (1, 2)
    engines = replica_engines(*case[:3], case[5], 0.0, 0.0, len(stage_layers))
    lanes = [
        make_lane_inputs(
            *engine[:3],
            case[3],
            pipeline_coeffs(case[4], 0.5, 0.5),
            num_requests=NUM_REQUESTS,
            stage_layers=stage_layers,
        )
        for engine in engines
    ]
    replica = stack_lanes(lanes)
    state = init_state(replica, num_slots=NUM_SLOTS)
    padded = _pad_requests(replica, NUM_SLOTS + 2)
    one_step = jax.jit(lambda x, s: step(x, s, max_iters=10**6))
    capacity = case[3]["num_kv_blocks"]
    last_now = 0.0
    while int(state.status) == LIVE:
        state = one_step(padded, state)
        assert float(state.now_s) >= last_now
        assert state.now_s.dtype == np.float64
        last_now = float(state.now_s)
        for v in range(len(lanes)):
            eng = jax.tree.map(lambda x, v=v: np.asarray(x[v]), state.engines)
            held = int(np.sum(np.where(eng.slots.req >= 0, eng.slots.held, 0)))
            assert 0 <= int(eng.free_blocks) <= capacity
            assert int(eng.free_blocks) + held == capacity
            in_system = int(eng.next_req - eng.num_finished)
            assert 0 <= in_system <= NUM_SLOTS
    assert int(state.status) == OK
    assert int(np.sum(state.engines.num_finished)) == 24
