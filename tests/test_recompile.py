"""The engine compiles once per shape: new data of the same shape reuses the executable."""

from __future__ import annotations

import logging

import jax

from apex_jax.deployment import make_case
from apex_jax.evaluate import (
    _PENDING,
    DEFAULT_MAX_ITERS,
    _chunks,
    case_coeffs,
    evaluate_cases,
    num_compiled,
    replica_groups,
    split_lanes,
)
from apex_jax.hardware import default_hardware_params


def _cases(seed: int, rate: float = 1.0):
    workload = {
        "kind": "poisson",
        "num_requests": 30,
        "rate_per_s": rate,
        "prompt_tokens": {"dist": "uniform", "low": 32, "high": 1024},
        "output_tokens": {"dist": "uniform", "low": 1, "high": 256},
        "seed": seed,
    }
    return [
        make_case("meta-llama/Llama-3.1-70B", "H100-SXM-80GB", 8, plan, workload)
        for plan in ({"dp": 1, "tp": 8}, {"dp": 1, "tp": 4, "pp": 2})
    ]


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _xla_compilations(function):
    """Run ``function`` and return its result and the names of what XLA compiled meanwhile."""
    handler = _Collect()
    logger = logging.getLogger("jax")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with jax.log_compiles(True):
            result = function()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return result, [m for m in handler.messages if m.startswith("Compiling ")]


def test_second_call_with_same_shapes_does_not_recompile():
    first, _ = evaluate_cases(_cases(seed=0))
    compiled = num_compiled()
    (second, stats), xla = _xla_compilations(lambda: evaluate_cases(_cases(seed=1, rate=1.5)))
    assert num_compiled() == compiled
    # Not the engine, and not any small op on the way to it either.
    assert xla == []
    assert stats.compile_s == 0.0
    assert [r["status"] for r in first + second] == ["OK"] * 4
    # The second call really ran on its own data.
    assert first[0]["ttft_mean_s"] != second[0]["ttft_mean_s"]


def test_new_hardware_constants_do_not_recompile():
    cases = _cases(seed=0)
    base, _ = evaluate_cases(cases)
    compiled = num_compiled()
    hw = default_hardware_params()
    slower = hw._replace(log_memory_eff=hw.log_memory_eff - 0.5)
    changed, stats = evaluate_cases(cases, slower)
    assert num_compiled() == compiled
    assert stats.compile_s == 0.0
    assert changed[0]["tpot_mean_s"] > base[0]["tpot_mean_s"]


def test_probes_and_the_other_replicas_share_one_engine_compiled_ahead():
    # Three plans equal but for max_num_seqs run as one probe replica, in an engine call of
    # their own; the other plans' 24 replicas in the next. Both calls pad their chunks to
    # the evaluation's one shape (a chunk of 1 and one of 24 were two shapes), which
    # compiled in the background before the first call.
    workload = {
        "kind": "poisson",
        "num_requests": 34,
        "rate_per_s": 2.0,
        "prompt_tokens": {"dist": "uniform", "low": 32, "high": 256},
        "output_tokens": {"dist": "uniform", "low": 1, "high": 16},
        "seed": 5,
    }
    plans = [{"dp": 1, "tp": 8, "max_num_seqs": n} for n in (64, 128, 256)]
    plans += [{"dp": 8, "tp": 1, "kv_dtype": kv} for kv in ("bf16", "fp8")]
    plans += [{"dp": 8, "tp": 1, "weight_dtype": "fp8", "kv_dtype": "fp8"}]
    cases = [make_case("meta-llama/Llama-3.1-8B", "H100-SXM-80GB", 8, p, workload) for p in plans]
    compiled = num_compiled()
    # An iteration cap of its own: no earlier test compiled this engine.
    results, stats = evaluate_cases(cases, max_iters=DEFAULT_MAX_ITERS + 7)
    assert [r["status"] for r in results] == ["OK"] * len(plans)
    assert stats.num_unbound_lanes == 3 and stats.num_chunks == 2
    assert num_compiled() == compiled + 1 and not _PENDING
    assert 0.0 <= stats.compile_hidden_s <= stats.compile_s


def test_lanes_are_chunked_by_length_with_the_same_results():
    # A DP1 plan (one lane of all 64 requests) and a DP8 plan (8 lanes of 8): the short
    # lanes must not step as long as the long one, and where lanes run cannot change them.
    workload = {
        "kind": "poisson",
        "num_requests": 64,
        "rate_per_s": 4.0,
        "prompt_tokens": {"dist": "uniform", "low": 32, "high": 512},
        "output_tokens": {"dist": "uniform", "low": 1, "high": 64},
        "seed": 3,
    }
    cases = [
        make_case("meta-llama/Llama-3.1-8B", "H100-SXM-80GB", 8, plan, workload)
        for plan in ({"dp": 1, "tp": 8}, {"dp": 8, "tp": 1})
    ]
    lanes = split_lanes(cases, case_coeffs(cases, default_hardware_params())).lanes
    chunks = _chunks(replica_groups(lanes), lanes, per_chunk=4)
    sizes = [[sum(len(lanes[k].request_ids) for k in group) for group in c] for c in chunks]
    assert sizes == [[64], [8] * 4, [8] * 4]
    together, _ = evaluate_cases(cases)
    alone = [evaluate_cases([case])[0][0] for case in cases]
    for a, b in zip(together, alone):
        assert a["status"] == b["status"] == "OK"
        assert a["ttft_mean_s"] == b["ttft_mean_s"] and a["e2e_mean_s"] == b["e2e_mean_s"]


def test_a_rate_search_reuses_the_engines_of_its_first_evaluation():
    # A later round of a rate search evaluates a few of the plans (here the PP1 plan alone,
    # whose own lanes would be shallower and shorter) at the first evaluation's lane shape
    # and the slots it needed: no new engine, the same results.
    first, stats = evaluate_cases(_cases(seed=4))
    compiled = num_compiled()
    alone = _cases(seed=4)[:1]
    slots = [first[0]["num_slots"]]
    assert slots[0] > 0 and stats.lane_shape[1] == 2
    (again, again_stats), xla = _xla_compilations(
        lambda: evaluate_cases(alone, start_slots=slots, lane_shape=stats.lane_shape)
    )
    assert num_compiled() == compiled and again_stats.compile_s == 0.0 and xla == []
    assert again_stats.lane_shape == stats.lane_shape
    for key in ("ttft_mean_s", "tpot_p99_s", "e2e_mean_s", "num_slots"):
        assert again[0][key] == first[0][key], key


def test_starting_with_more_slots_gives_the_same_results():
    cases = _cases(seed=5, rate=20.0)
    from_few, _ = evaluate_cases(cases)
    from_many, _ = evaluate_cases(cases, start_slots=[512, 512])
    for a, b in zip(from_few, from_many):
        assert a["status"] == b["status"] == "OK"
        assert a["num_slots"] < b["num_slots"]
        for key in ("ttft_mean_s", "tpot_p99_s", "makespan_s", "num_preemptions"):
            assert a[key] == b[key], key
