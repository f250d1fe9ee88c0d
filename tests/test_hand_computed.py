"""End-to-end cases whose expected times are worked out by hand from the engine's rules.

The cost is a plain roofline set by hand: ``F`` seconds per iteration, ``A`` per token through
the GEMMs, ``C`` per causal query-key pair of prefill attention and ``S`` per KV entry a
decoding sequence reads, so an iteration of ``n`` tokens, ``p`` prefill pairs and ``k`` KV
entries takes ``F + A n + C p + S k``. A prefill of ``L`` tokens has ``L (L + 1) / 2``
pairs; a sequence of ``P`` prompt tokens that has produced ``g`` tokens reads ``P + g`` KV
entries when it decodes. Each test writes out the iterations (the rules are those of the
reference's docstring), sums them, and checks the JAX engine and the reference against the
sums. Golden files check that nothing moved; these check that the numbers are right.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import engine_case, run_engine, run_reference

import apex_jax.workload as wl
from apex_jax.status import OK

F, A, C, S = 2e-3, 1e-5, 1e-8, 1e-6
COEFFS = np.array([F, A, 0.0, 0.0, 0.0, 0.0, C, S, 0.0, 0.0])  # conftest.ROOFLINE_FIELDS
LIMITS = {
    "max_num_seqs": 8,
    "max_num_batched_tokens": 2048,
    "block_size": 16,
    "num_kv_blocks": 1000,
    "watermark_blocks": 0,
    "max_model_len": 10_000,
    "chunked_prefill": 0,
}


def prefill_s(tokens, done=0):
    """One iteration prefilling ``tokens`` prompt tokens after ``done`` already computed."""
    pairs = tokens * done + tokens * (tokens + 1) / 2
    return F + A * tokens + C * pairs


def decode_s(kv_entries, batch=1):
    """One iteration decoding ``batch`` sequences that read ``kv_entries`` KV entries."""
    return F + A * batch + S * kv_entries


def simulate(arrival, prompt, output, limits, cached_tokens=0):
    case = (np.asarray(arrival, float), np.asarray(prompt), np.asarray(output), limits, COEFFS, 0)
    engine = run_engine([engine_case(*case, cached_tokens=cached_tokens)])
    ref = run_reference(*case, cached_tokens=cached_tokens)
    assert int(engine.status[0]) == ref.status == OK
    n = len(arrival)
    return (
        (engine.first_token_s[0, :n], engine.finish_s[0, :n]),
        (ref.first_token_s, ref.finish_s),
    )


def check(runs, first_token_s, finish_s):
    for first, finish in runs:
        np.testing.assert_allclose(first, first_token_s, rtol=1e-12, atol=0)
        np.testing.assert_allclose(finish, finish_s, rtol=1e-12, atol=0)


def test_one_request_prefills_then_decodes():
    # Arrives at 0.5 s with 100 prompt tokens and asks for 4: one prefill (its last token
    # samples the first output token), then 3 decodes reading 101, 102, 103 KV entries.
    first = 0.5 + (F + 100 * A + C * 5050)
    finish = first + sum(F + A + S * kv for kv in (101, 102, 103))
    assert first == pytest.approx(0.5030505, rel=1e-12)
    assert finish - first == pytest.approx(0.006336, rel=1e-12)
    check(simulate([0.5], [100], [4], LIMITS), [first], [finish])


def test_second_request_queues_behind_a_full_batch():
    # One sequence at a time. The first (100 prompt, 3 output) arrives at 0 and runs alone:
    # prefill, decodes at 101 and 102 KV entries, done. The second (50 prompt, 2 output)
    # arrived at 1 ms, waits for the slot, then prefills and decodes once at 51 entries.
    limits = LIMITS | {"max_num_seqs": 1}
    first_a = prefill_s(100)
    finish_a = first_a + decode_s(101) + decode_s(102)
    first_b = finish_a + prefill_s(50)
    finish_b = first_b + decode_s(51)
    assert finish_a == pytest.approx(0.0072735, rel=1e-12)
    assert first_b - 1e-3 == pytest.approx(0.00878625, rel=1e-12)  # TTFT, mostly queueing
    check(
        simulate([0.0, 1e-3], [100, 50], [3, 2], limits), [first_a, first_b], [finish_a, finish_b]
    )


def test_chunked_prefill_splits_a_prompt_at_the_budget():
    # A 64-token budget cuts the 100-token prompt into chunks of 64 and 36; the second chunk
    # attends to the 64 tokens before it as well (36 * 64 + 36 * 37 / 2 = 2970 pairs) and
    # samples the first token. Then one decode at 101 KV entries.
    limits = LIMITS | {"chunked_prefill": 1, "max_num_batched_tokens": 64}
    first = (F + 64 * A + C * 2080) + (F + 36 * A + C * 2970)
    finish = first + decode_s(101)
    assert prefill_s(64) + prefill_s(36, done=64) == pytest.approx(first, rel=1e-15)
    check(simulate([0.0], [100], [2], limits), [first], [finish])


def test_a_prefix_cache_hit_prefills_only_the_uncached_blocks_over_the_whole_prompt():
    # 100 prompt tokens, the whole prompt cached: the engine reuses the whole 16-token blocks
    # below the last token (96 tokens) and computes 4, whose queries attend over the 96
    # cached ones as well (4 * 96 + 4 * 5 / 2 = 394 pairs). Decoding reads the whole prompt's
    # KV (101, 102 entries). A second request, 40 tokens cached, reuses 32 and computes 68.
    first_a = prefill_s(4, done=96)
    finish_a = first_a + decode_s(101) + decode_s(102)
    assert first_a == pytest.approx(F + 4 * A + 394 * C, rel=1e-15)
    runs = simulate([0.0], [100], [3], LIMITS, cached_tokens=[100])
    check(runs, [first_a], [finish_a])
    limits = LIMITS | {"max_num_seqs": 1}
    first_b = finish_a + prefill_s(68, done=32)
    runs = simulate([0.0, 0.0], [100, 100], [3, 1], limits, cached_tokens=[1000, 40])
    check(runs, [first_a, first_b], [finish_a, first_b])


def test_a_warm_up_leaves_its_prompts_cached_for_the_first_round():
    # One client, one prompt, a warm-up of one request: the measured requests start on an
    # idle engine whose prefix cache holds the prompt, so the first one, sent at once, already
    # prefills only its last 4 tokens over the 96 cached ones, and so does the second.
    # Without the warm-up the first prefills all 100.
    workload = wl.closed_loop(1, 100, 3, 2, num_prompts=1, num_warmup_requests=1)
    cached = workload.cached_prompt_tokens(np.arange(2), 1)
    assert cached.tolist() == [100, 100]
    limits = LIMITS | {"max_num_seqs": 1}
    first_a = prefill_s(4, done=96)
    finish_a = first_a + decode_s(101) + decode_s(102)
    first_b = finish_a + prefill_s(4, done=96)
    finish_b = first_b + decode_s(101) + decode_s(102)
    runs = simulate([0.0, 0.0], [100, 100], [3, 3], limits, cached_tokens=cached)
    check(runs, [first_a, first_b], [finish_a, finish_b])
    cold = wl.closed_loop(1, 100, 3, 2, num_prompts=1).cached_prompt_tokens(np.arange(2), 1)
    assert cold.tolist() == [0, 100]
