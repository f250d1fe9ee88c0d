"""The JAX engine against the plain-Python reference, request by request."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    NUM_REQUESTS,
    NUM_SLOTS,
    engine_case,
    pipeline_coeffs,
    roofline_coeffs,
    run_engine,
    run_engine_growing,
    run_pipeline,
    run_reference,
    scenarios,
    served,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apex_jax.cost.iteration import iteration_time_s
from apex_jax.cost.sites import DECODE_KV_KNOTS
from apex_jax.status import MAX_ITERS, OK, SLOT_OVERFLOW

RTOL = 1e-9


def assert_same(engine, i, ref, case):
    """Lane ``i`` of an engine run against the reference on ``case``, request by request."""
    assert int(engine.status[i]) == ref.status
    if ref.status != OK:
        return
    is_served = served(*case[1:4])
    n = int(is_served.sum())
    assert int(engine.num_iters[i]) == ref.num_iters
    assert int(engine.num_preemptions[i]) == ref.num_preemptions
    assert np.isnan(ref.finish_s[~is_served]).all()
    np.testing.assert_allclose(engine.first_token_s[i, :n], ref.first_token_s[is_served], rtol=RTOL)
    np.testing.assert_allclose(engine.finish_s[i, :n], ref.finish_s[is_served], rtol=RTOL)
    np.testing.assert_allclose(engine.sent_s[i, :n], ref.sent_s[is_served], rtol=RTOL)
    np.testing.assert_allclose(
        engine.dynamic_energy_j[i], ref.dynamic_energy_j, rtol=1e-7, atol=1e-12
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_engine_matches_reference(case):
    engine = run_engine_growing([engine_case(*case)])
    ref = run_reference(*case)
    assert_same(engine, 0, ref, case)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scenarios(),
    st.sampled_from([0.0, 1e-4, 2e-3]),
    st.sampled_from([0.0, 0.5, 1.001, 1.01, 1.05, 3.0]),
    st.sampled_from([0, 1, 3, 256]),
)
def test_engine_matches_reference_with_host_costs(case, per_seq_s, floor_ratio, max_graph):
    """Host time per sampled sequence and the eager floor (prefill iterations, and decode
    batches above the largest CUDA graph, which run many rounds) take the same time in both.
    The floor is drawn near a one-sequence decode iteration's time, so that decode runs cross
    from the floor to the device time as their KV grows. A binding floor makes iterations of
    equal length, so the requests' delays are made distinct: a delayed arrival then never
    ties with an iteration's end, which the two would break apart in the last bit."""
    scale = float(case[4][0]) / 5e-3
    one_decode_s = iteration_time_s(roofline_coeffs(case[4]), 1.0, 1.0, 0.0, 1.0, 0.0, xp=np)
    host = np.array([per_seq_s * scale, floor_ratio * float(one_decode_s), float(max_graph)])
    delay_s = case[6] * (1.0 + 1e-3 * np.sqrt(np.arange(len(case[6])) + 2.0))
    case = (*case[:4], np.concatenate([case[4], host]), case[5], delay_s, *case[7:])
    engine = run_engine_growing([engine_case(*case)])
    ref = run_reference(*case)
    assert_same(engine, 0, ref, case)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scenarios(),
    st.lists(st.integers(1, 4), min_size=2, max_size=3),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
)
def test_pipeline_replica_matches_reference(case, stage_layers, host_fraction, transfer_frac):
    """Virtual engines sharing uneven stages, virtual engine by virtual engine."""
    coeffs = pipeline_coeffs(case[4], host_fraction, transfer_frac)
    engine, refs, masks = run_pipeline(case, stage_layers, coeffs)
    for v, (ref, is_served) in enumerate(zip(refs, masks)):
        assert int(engine.status[v]) == ref.status
        if ref.status != OK:
            continue
        n = int(is_served.sum())
        assert int(engine.num_iters[v]) == ref.num_iters
        assert int(engine.num_preemptions[v]) == ref.num_preemptions
        np.testing.assert_allclose(
            engine.first_token_s[v, :n], ref.first_token_s[is_served], rtol=RTOL
        )
        np.testing.assert_allclose(engine.finish_s[v, :n], ref.finish_s[is_served], rtol=RTOL)
        np.testing.assert_allclose(engine.sent_s[v, :n], ref.sent_s[is_served], rtol=RTOL)
        np.testing.assert_allclose(
            engine.dynamic_energy_j[v], ref.dynamic_energy_j, rtol=1e-7, atol=1e-12
        )


def test_batched_lanes_do_not_leak(coeffs):
    """Different lanes in one batch give what each gives alone."""
    rng = np.random.default_rng(1)
    cases = []
    for _ in range(6):
        n = int(rng.integers(5, NUM_REQUESTS))
        limits = {
            "max_num_seqs": int(rng.integers(1, NUM_SLOTS)),
            "max_num_batched_tokens": 2048,
            "block_size": 4,
            "num_kv_blocks": int(rng.integers(100, 400)),
            "watermark_blocks": 1,
            "max_model_len": 10_000,
        }
        cases.append(
            (
                np.sort(rng.uniform(0, 3, n)),
                rng.integers(1, 300, n),
                rng.integers(1, 100, n),
                limits,
                coeffs * rng.uniform(0.5, 2.0),
                0,
            )
        )
    together = run_engine([engine_case(*c) for c in cases])
    for i, case in enumerate(cases):
        alone = run_engine([engine_case(*case)])
        n = len(case[0])
        assert int(alone.status[0]) == int(together.status[i]) == OK
        assert int(alone.num_iters[0]) == int(together.num_iters[i])
        np.testing.assert_array_equal(alone.finish_s[0, :n], together.finish_s[i, :n])
        assert_same(together, i, run_reference(*case), case)


def _limits(**over):
    limits = {
        "max_num_seqs": 8,
        "max_num_batched_tokens": 4096,
        "block_size": 16,
        "num_kv_blocks": 1000,
        "watermark_blocks": 0,
        "max_model_len": 100_000,
    }
    limits.update(over)
    return limits


def _check(case):
    engine = run_engine([engine_case(*case)])
    ref = run_reference(*case)
    assert_same(engine, 0, ref, case)
    return engine, ref


def test_single_request(coeffs):
    engine, ref = _check((np.array([0.5]), np.array([100]), np.array([10]), _limits(), coeffs))
    assert ref.num_iters == 10  # one prefill, nine decodes
    assert engine.first_token_s[0, 0] > 0.5


def test_long_gaps_between_arrivals(coeffs):
    arrival = np.array([0.0, 100.0, 100.0, 5000.0])
    engine, _ref = _check(
        (arrival, np.array([10, 20, 30, 40]), np.array([5, 5, 5, 5]), _limits(), coeffs)
    )
    assert engine.first_token_s[0, 3] > 5000.0


@pytest.mark.parametrize(
    "prompt, output",
    [
        # Three sequences read 303 KV entries after their prefill and 3 more per iteration
        # (fewer as they finish): the decode runs cross the breakpoints 512 and 4096.
        ([100, 100, 100], [1500, 1200, 900]),
        # Four long prompts start just below 4096 and cross it.
        ([1000, 1000, 1000, 1000], [300, 250, 200, 150]),
    ],
)
def test_decode_runs_crossing_breakpoints_match_reference(prompt, output, coeffs):
    kv_first = sum(p + 1 for p in prompt)
    kv_last = kv_first + len(prompt) * (min(output) - 2)
    assert any(kv_first < knot <= kv_last for knot in DECODE_KV_KNOTS)
    case = (
        np.zeros(len(prompt)),
        np.asarray(prompt),
        np.asarray(output),
        _limits(num_kv_blocks=2000),
        coeffs,
    )
    engine, ref = _check(case)  # request by request, to 1e-9
    # One prefill iteration, then the longest request's decodes.
    assert ref.num_iters == int(engine.num_iters[0]) == max(output)


def test_kv_exhaustion_preempts_and_recomputes(coeffs):
    n = 12
    case = (
        np.zeros(n),
        np.full(n, 40),
        np.full(n, 60),
        _limits(num_kv_blocks=30, block_size=4, watermark_blocks=0),
        coeffs,
    )
    engine, ref = _check(case)
    assert ref.num_preemptions > 0
    assert int(engine.status[0]) == OK


def test_request_longer_than_kv_cache_is_rejected_and_the_rest_served(coeffs):
    case = (
        np.array([0.0, 1.0, 2.0]),
        np.array([10, 500, 20]),
        np.array([5, 5, 5]),
        _limits(num_kv_blocks=10, block_size=16),
        coeffs,
    )
    engine, ref = _check(case)
    assert ref.status == OK == int(engine.status[0])
    assert np.isnan(ref.finish_s[1]) and np.isfinite(ref.finish_s[[0, 2]]).all()


def test_iteration_cap_gives_max_iters(coeffs):
    case = (np.zeros(4), np.full(4, 10), np.full(4, 100), _limits(), coeffs)
    engine = run_engine([engine_case(*case)], max_iters=20)
    assert int(engine.status[0]) == MAX_ITERS
    assert run_reference(*case, max_iters=20).status == MAX_ITERS


@pytest.mark.parametrize("concurrency", [1, 3])
def test_closed_loop_matches_reference(coeffs, concurrency):
    n = 20
    rng = np.random.default_rng(concurrency)
    _check(
        (
            np.zeros(n),
            rng.integers(1, 200, n),
            rng.integers(1, 50, n),
            _limits(),
            coeffs,
            concurrency,
        )
    )


def test_slot_overflow_reruns_give_the_same_result(coeffs, monkeypatch):
    """Lanes that outgrow the first slot capacity rerun with more slots, exactly."""
    import apex_jax.evaluate as ev
    from apex_jax.deployment import make_case

    case = make_case(
        "meta-llama/Llama-3.1-8B",
        "H100-SXM-80GB",
        1,
        {"max_num_seqs": 64},
        {"kind": "static_batch", "batch_size": 40, "isl": 64, "osl": 8},
    )
    monkeypatch.setattr(ev, "INITIAL_SLOTS", 8)
    small_first, _ = ev.evaluate_cases([case])
    monkeypatch.setattr(ev, "INITIAL_SLOTS", 64)
    direct, _ = ev.evaluate_cases([case])
    assert small_first[0]["status"] == direct[0]["status"] == "OK"
    for key in ("ttft_mean_s", "tpot_p99_s", "makespan_s"):
        assert small_first[0][key] == direct[0][key]


def test_overflowing_lane_reports_slot_overflow(coeffs):
    limits = _limits(max_num_seqs=NUM_SLOTS)
    case = (np.zeros(20), np.full(20, 10), np.full(20, 5), limits, coeffs)
    out = run_engine([engine_case(*case)], num_slots=4)
    assert int(out.status[0]) == SLOT_OVERFLOW


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.data())
def test_engine_matches_reference_with_prefix_cache_hits(case, data):
    """Requests that find part or all of their prompt in the prefix cache (block-aligned,
    never the last token) prefill the rest over the cached context, in both; preempted ones
    recompute everything."""
    n = len(case[0])
    shares = data.draw(st.lists(st.sampled_from([0.0, 0.3, 1.0, 2.0]), min_size=n, max_size=n))
    cached = (np.asarray(shares) * case[1]).astype(np.int64)
    engine = run_engine_growing([engine_case(*case, cached_tokens=cached)])
    ref = run_reference(*case, cached_tokens=cached)
    assert_same(engine, 0, ref, case)
