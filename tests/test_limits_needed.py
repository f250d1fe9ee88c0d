"""What a run needed of its limits (``LaneResult.*_needed``): the engine agrees with the
reference, and the same lane under any limits between these and its own runs exactly the
same (what lets evaluate share one run between plans whose knobs never bind)."""

from __future__ import annotations

import numpy as np
from conftest import (
    engine_case,
    pipeline_coeffs,
    run_engine,
    run_pipeline,
    run_reference,
    scenarios,
    served,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apex_jax.status import OK

NEEDS = ("seqs_needed", "tokens_needed", "pages_needed")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_engine_needs_match_reference(case):
    engine = run_engine([engine_case(*case)])
    ref = run_reference(*case)
    # A lane that serves nothing is never simulated (evaluate marks it OK).
    if ref.status != OK or not served(*case[1:4]).any():
        return
    assert [int(getattr(engine, k)[0]) for k in NEEDS] == [getattr(ref, k) for k in NEEDS]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.lists(st.integers(1, 4), min_size=2, max_size=3))
def test_pipeline_needs_match_reference(case, stage_layers):
    # A replica that serves nothing is never simulated (evaluate marks it OK).
    if not served(*case[1:4]).any():
        return
    engine, refs, _ = run_pipeline(case, stage_layers, pipeline_coeffs(case[4], 0.2, 0.3))
    for v, ref in enumerate(refs):
        if ref.status == OK:
            assert [int(getattr(engine, k)[v]) for k in NEEDS] == [getattr(ref, k) for k in NEEDS]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.data())
def test_limits_between_the_needs_and_its_own_run_the_same(case, data):
    arrival, prompt, output, limits, vector, concurrency, delay_s, think_frac = case
    # Only the requests served under the lane's own limits (looser ones may serve more).
    mine = served(prompt, output, limits)
    arrival, prompt, output, delay_s, think_frac = (
        np.broadcast_to(np.asarray(x), np.shape(mine))[mine]
        for x in (arrival, prompt, output, delay_s, think_frac)
    )
    case = (arrival, prompt, output, limits, vector, concurrency, delay_s, think_frac)
    ref = run_reference(*case)
    needs = [getattr(ref, k) for k in NEEDS]
    if ref.status != OK:
        return
    blocks, watermark = limits["num_kv_blocks"], limits["watermark_blocks"]
    assert needs[0] <= limits["max_num_seqs"] and needs[1] <= limits["max_num_batched_tokens"]
    assert needs[2] <= blocks - watermark
    other_watermark = data.draw(st.integers(watermark, blocks - needs[2]))
    other = {
        **limits,
        "max_num_seqs": data.draw(st.integers(needs[0], limits["max_num_seqs"])),
        "max_num_batched_tokens": data.draw(
            st.integers(needs[1], limits["max_num_batched_tokens"])
        ),
        "num_kv_blocks": data.draw(st.integers(needs[2] + other_watermark, blocks)),
        "watermark_blocks": other_watermark,
    }
    moved = (*case[:3], other, *case[4:])
    assert served(prompt, output, other).all()
    again = run_reference(*moved)
    assert again.status == OK
    assert again.num_iters == ref.num_iters and again.num_preemptions == ref.num_preemptions
    np.testing.assert_array_equal(again.first_token_s, ref.first_token_s)
    np.testing.assert_array_equal(again.finish_s, ref.finish_s)
    assert again.dynamic_energy_j == ref.dynamic_energy_j
    # The engine splits decode runs where pages could run short, so its clock may round
    # differently; the decisions are the same.
    engine = run_engine([engine_case(*case), engine_case(*moved)])
    assert int(engine.num_iters[0]) == int(engine.num_iters[1])
    n = len(arrival)
    np.testing.assert_allclose(engine.finish_s[1, :n], engine.finish_s[0, :n], rtol=1e-12)
