"""Workload modes as the engine under test would see them."""

from __future__ import annotations

import numpy as np
import pytest

import apex_jax.metrics as metrics_module
from apex_jax.api import simulate
from apex_jax.deployment import make_case
from apex_jax.engine_config import VERSION_COSTS, resolve_engine
from apex_jax.evaluate import evaluate_cases

MODEL, GPU = "meta-llama/Llama-3.1-8B", "H100-SXM-80GB"


def _per_request(monkeypatch, num_gpus=1, plan=None, **kwargs):
    seen = {}
    original = metrics_module.summarize_requests

    def spy(arrival, first, finish, output, status, *rest):
        seen.update(arrival=np.array(arrival), first=np.array(first), finish=np.array(finish))
        return original(arrival, first, finish, output, status, *rest)

    monkeypatch.setattr("apex_jax.evaluate.summarize_requests", spy)
    result = simulate(MODEL, GPU, num_gpus, plan or {"tp": 1}, **kwargs)
    return result, seen


def test_static_batch_prefills_together_without_chunking(monkeypatch):
    result, seen = _per_request(
        monkeypatch,
        workload={"kind": "static_batch", "batch_size": 8, "isl": 512, "osl": 16},
        engine={"version": "0.6.0", "chunked_prefill": False, "max_model_len": 8192},
    )
    assert result["status"] == "OK"
    assert np.all(seen["arrival"] == 0.0)
    assert np.ptp(seen["first"]) == 0.0  # one prefill iteration for the whole batch


def test_static_batch_is_chunked_by_the_token_budget(monkeypatch):
    _, seen = _per_request(
        monkeypatch,
        workload={"kind": "static_batch", "batch_size": 8, "isl": 512, "osl": 16},
        engine={"version": "0.6.0", "chunked_prefill": True, "max_num_batched_tokens": 512},
    )
    # A 512-token budget prefills one prompt per iteration, in arrival order.
    assert np.all(np.diff(seen["first"]) > 0)


def _closed_loop(concurrency=4, isl=256, osl=32, num_requests=16, lockstep=False):
    return {
        "kind": "closed_loop",
        "concurrency": concurrency,
        "isl": isl,
        "osl": osl,
        "num_requests": num_requests,
        "lockstep": lockstep,
    }


def test_closed_loop_ttft_counts_from_release_not_from_zero(monkeypatch):
    result, seen = _per_request(monkeypatch, workload=_closed_loop())
    assert result["status"] == "OK"
    # Later requests are released by completions: from the third round on they are sent
    # at a finish time; the second round is spread over one round from the first finish.
    sent = seen["arrival"]
    first_finish = np.min(seen["finish"])
    assert np.all(np.diff(sent[4:8]) >= 0)
    assert np.all((sent[4:8] >= first_finish) & (sent[4:8] < 2 * first_finish))
    assert_sent_at_finishes(sent[8:], seen["finish"])
    assert np.all(seen["first"] - sent < 0.5 * seen["first"][4:].min())


def assert_sent_at_finishes(sent, finish):
    """Every send time is one of the finish times (to rounding)."""
    gaps = np.min(np.abs(np.asarray(sent)[:, None] - np.asarray(finish)[None, :]), axis=1)
    np.testing.assert_allclose(gaps, 0.0, atol=1e-12)


def test_lockstep_closed_loop_sends_at_finishes(monkeypatch):
    result, seen = _per_request(
        monkeypatch,
        workload=_closed_loop(lockstep=True),
        # An 8,192-token budget prefills a round in one iteration.
        engine={"version": "0.12.0"},
    )
    assert result["status"] == "OK"
    assert np.all(seen["arrival"][:4] == 0.0)
    assert_sent_at_finishes(seen["arrival"][4:], seen["finish"])
    # Equal requests sent together finish together: four rounds, four distinct finishes.
    assert len(np.unique(np.round(seen["finish"], 12))) == 4


def _round_ttft_s(monkeypatch, lockstep: bool, concurrency: int = 8, rounds: int = 6):
    """Mean TTFT of each round of a closed loop whose whole round fits one prefill iteration,
    and the number of distinct first-token times in its last round."""
    _, seen = _per_request(
        monkeypatch,
        workload=_closed_loop(concurrency, 512, 64, rounds * concurrency, lockstep),
        engine={"version": "0.12.0"},
    )
    ttft = (seen["first"] - seen["arrival"]).reshape(rounds, concurrency)
    return ttft.mean(axis=1), len(np.unique(np.round(seen["first"][-concurrency:], 12)))


def test_closed_loop_steady_state_lockstep_vs_desynchronised(monkeypatch):
    """In lockstep every round prefills as one burst, so each round's TTFT equals the first
    round's; desynchronised clients prefill apart from the second round on, each meeting a
    batch of decodes instead of the whole round, so their steady-state TTFT is far lower."""
    lockstep, lockstep_firsts = _round_ttft_s(monkeypatch, True)
    spread, spread_firsts = _round_ttft_s(monkeypatch, False)
    assert lockstep_firsts == 1
    np.testing.assert_allclose(lockstep, lockstep[0], rtol=1e-9)
    # Both send the first round at once: the same burst.
    assert spread[0] == pytest.approx(lockstep[0], rel=1e-12)
    assert spread_firsts > 4
    assert np.all(spread[2:] < 0.5 * lockstep[2:])


def test_poisson_arrivals_keep_their_rate():
    result = simulate(
        MODEL,
        GPU,
        1,
        {"tp": 1},
        {
            "kind": "poisson",
            "num_requests": 400,
            "rate_per_s": 5.0,
            "prompt_tokens": 128,
            "output_tokens": 16,
            "seed": 0,
        },
    )
    # A lightly loaded engine finishes requests at the offered rate.
    assert abs(result["throughput_req_s"] - 5.0) < 0.75


def _max_in_flight(arrival, finish) -> int:
    """Most requests sent and not finished at once (a request is done at its finish time)."""
    return max(int(np.sum((arrival <= t) & (t < finish))) for t in arrival)


@pytest.mark.parametrize(
    ("plan", "concurrency"),
    [({"dp": 1, "pp": 8}, 2), ({"dp": 2, "pp": 4}, 3), ({"dp": 8, "pp": 1}, 5)],
)
def test_closed_loop_clients_are_shared_by_every_lane(monkeypatch, plan, concurrency):
    """More lanes (replicas x virtual engines) than clients: the plan still keeps exactly
    ``concurrency`` requests in flight, never one per lane."""
    result, seen = _per_request(
        monkeypatch,
        num_gpus=8,
        plan=plan,
        workload={
            "kind": "closed_loop",
            "concurrency": concurrency,
            "isl": 128,
            "osl": 16,
            "num_requests": 24,
        },
    )
    assert result["status"] == "OK"
    assert _max_in_flight(seen["arrival"], seen["finish"]) == concurrency


@pytest.mark.parametrize("version, delay_s", [("0.12.0", 10e-3), ("0.6.0", 11e-3)])
def test_frontend_delay_shows_in_ttft_only(version, delay_s):
    """Each preset's per-request frontend delay (V1: HTTP, tokenisation, detokenisation
    above vLLM's own metric; 0.6: the part of its own TTFT metric the iterations miss) adds
    to a request's TTFT and leaves its decode alone: one request alone is shifted by exactly
    the delay."""
    workload = {"kind": "static_batch", "batch_size": 1, "isl": 256, "osl": 8}
    engine = resolve_engine({"name": "vllm", "version": version})
    assert engine.frontend_delay_s == VERSION_COSTS[("vllm", version)].frontend_delay.seconds == delay_s
    with_delay, without = (
        simulate(MODEL, GPU, 1, {"tp": 1}, workload, engine={"version": version, **extra})
        for extra in ({}, {"frontend_delay_s": 0.0})
    )
    assert with_delay["ttft_mean_s"] - without["ttft_mean_s"] == pytest.approx(delay_s, rel=1e-9)
    assert with_delay["tpot_mean_s"] == pytest.approx(without["tpot_mean_s"], rel=1e-12)


def test_a_prompt_pool_hits_the_prefix_cache_after_the_first_round():
    """Requests that resend a pool's prompt prefill only its last block: from the second
    round on their TTFT falls to a fraction of the first round's, and the JAX engine and
    the reference agree on every request."""
    pooled = _closed_loop(4, 2048, 16, 16) | {"num_prompts": 4}
    cases = [
        make_case(MODEL, GPU, 1, {"tp": 1}, workload, {"name": "vllm", "version": "0.12.0"})
        for workload in (pooled, _closed_loop(4, 2048, 16, 16))
    ]
    (hit, fresh), _ = evaluate_cases(cases, per_request=True)
    (ref,), _ = evaluate_cases(cases[:1], per_request=True, use_reference=True)

    def ttft_s(result):
        requests = result["requests"]
        return np.asarray(requests["first_token_s"]) - np.asarray(requests["arrival_s"])

    assert np.all(ttft_s(hit)[4:] < 0.5 * ttft_s(hit)[:4].min())
    assert ttft_s(hit)[4:].mean() < 0.5 * ttft_s(fresh)[4:].mean()
    for key in ("first_token_s", "finish_s"):
        np.testing.assert_allclose(ref["requests"][key], hit["requests"][key], rtol=1e-9)


def test_drawn_lengths_desynchronise_and_the_reference_agrees_request_by_request():
    """A closed loop whose lengths are drawn (InferenceX's `--random-range-ratio 0.8`): the
    JAX engine and the reference agree on every request, and uneven outputs spread the
    lockstep clients' finishes, so later rounds are not prefilled as one burst."""
    engine = {"name": "vllm", "version": "0.12.0"}
    drawn = _closed_loop(8, 1024, 64, 48, lockstep=True) | {"range_ratio": 0.8, "seed": 1}
    cases = [
        make_case(MODEL, GPU, 1, {"tp": 1}, w, engine)
        for w in (drawn, drawn | {"range_ratio": 1.0})
    ]
    (jax_run, fixed), _ = evaluate_cases(cases, per_request=True)
    (ref,), _ = evaluate_cases(cases[:1], per_request=True, use_reference=True)
    for key in ("first_token_s", "finish_s"):
        np.testing.assert_allclose(ref["requests"][key], jax_run["requests"][key], rtol=1e-9)
    np.testing.assert_array_equal(ref["requests"]["output_tokens"], jax_run["requests"]["output_tokens"])
    assert len(set(jax_run["requests"]["output_tokens"])) > 1
    later = slice(8, None)
    finishes = [np.unique(np.round(r["requests"]["finish_s"][later], 9)).size for r in (jax_run, fixed)]
    assert finishes[0] > 2 * finishes[1]


def test_a_pool_that_outgrows_the_kv_cache_misses_and_the_reference_agrees():
    """vLLM V1 evicts the least recently used blocks: 16 prompts of 2,048 tokens drawn in
    turn need about 33,000 tokens of cache a pass. With 19,744 tokens of KV pages
    (gpu_mem_util 0.25) every repeat misses and the run is that of distinct prompts, request
    by request; with 32,800 (0.27) repeats keep most of their prompt, so TTFT falls, and the
    JAX engine and the reference agree on every request. (A 4,096-token max_model_len lets
    vLLM start with so few pages.)"""
    engine = {"name": "vllm", "version": "0.12.0", "max_model_len": 4096}
    fresh = _closed_loop(4, 2048, 16, 32)
    pooled = fresh | {"num_prompts": 16}
    cases = [
        make_case(MODEL, GPU, 1, {"tp": 1, "gpu_mem_util": util}, workload, engine)
        for util in (0.25, 0.27)
        for workload in (pooled, fresh)
    ]
    (small, small_fresh, partial, partial_fresh), _ = evaluate_cases(cases, per_request=True)
    (ref,), _ = evaluate_cases(cases[2:3], per_request=True, use_reference=True)
    for key in ("first_token_s", "finish_s"):
        np.testing.assert_array_equal(small["requests"][key], small_fresh["requests"][key])
        np.testing.assert_allclose(ref["requests"][key], partial["requests"][key], rtol=1e-9)
    assert partial["ttft_mean_s"] < 0.8 * partial_fresh["ttft_mean_s"]


def test_a_warm_up_is_in_no_figure_and_caches_the_first_round():
    """A warm-up with a pool leaves its prompts cached: the measured first round, sent at
    once, already prefills only its last blocks (engine = reference on every request); a
    warm-up of distinct prompts changes no figure; the metrics count the measured requests
    only."""
    engine = {"name": "vllm", "version": "0.12.0"}
    base = _closed_loop(4, 2048, 16, 16)
    workloads = (
        base | {"num_prompts": 8, "num_warmup_requests": 8},
        base | {"num_prompts": 8},
        base | {"num_warmup_requests": 8},
        base,
    )
    cases = [make_case(MODEL, GPU, 1, {"tp": 1}, w, engine) for w in workloads]
    (warm, cold, distinct, plain), _ = evaluate_cases(cases, per_request=True)
    (ref,), _ = evaluate_cases(cases[:1], per_request=True, use_reference=True)
    for key in ("first_token_s", "finish_s"):
        np.testing.assert_allclose(ref["requests"][key], warm["requests"][key], rtol=1e-9)
    assert warm["num_requests"] == 16
    first_round = warm["requests"]["first_token_s"][:4] - warm["requests"]["arrival_s"][:4]
    cold_round = cold["requests"]["first_token_s"][:4] - cold["requests"]["arrival_s"][:4]
    assert np.all(first_round < 0.5 * cold_round.min())
    assert warm["ttft_mean_s"] < cold["ttft_mean_s"]
    assert {k: distinct[k] for k in ("ttft_mean_s", "tpot_mean_s", "makespan_s")} == {
        k: plain[k] for k in ("ttft_mean_s", "tpot_mean_s", "makespan_s")
    }
