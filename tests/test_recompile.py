"""The engine compiles once per shape: new data of the same shape reuses the executable."""

from __future__ import annotations

import logging

import jax

from apex_jax.deployment import make_case
from apex_jax.evaluate import evaluate_cases, num_compiled
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
