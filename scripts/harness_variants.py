"""silicon_dev's vLLM rows under each benchmark harness the README weighs.

``apex-jax validate dataset=silicon_dev`` replays every row with the harness
:mod:`apex_jax.benchmark_runs` assumes for its group (``default``). The file does not record
the harness, so the README compares that choice with the others it weighed, each a change of
the rows' ``num_prompts``, ``num_warmup_requests`` and ``range_ratio`` columns, and prints
the TTFT / TPOT MAPE of each group of rows (``all dense`` and ``all MoE`` too) under each:

- ``default``: as validated (NVIDIA's runner with distinct prompts; the fp8 rows a pool of
  100 and no warm-up);
- ``nvidia_cache_on``: NVIDIA's runner (AIConfigurator's ``genai_perf_runner.py``) on every
  row with vLLM's prefix cache on: ``12 C`` dataset entries and a warm-up of ``2 C`` whose
  prompts the first ``2 C`` measured requests resend;
- ``pool_with_warmup``: the default, with the fp8 rows' pool of 100 behind NVIDIA's warm-up;
- ``undrained``: a warm-up of ``2 C`` simulated as the first requests of the run and left
  out of the figures, without the wait for it to finish that the tools make (the measured
  phase then starts in the warm-up's steady state, not with a burst);
- ``inferencex_random``: InferenceX's load generator (``benchmarks/benchmark_lib.sh`` runs
  ``utils/bench_serving/benchmark_serving.py --dataset-name random --random-range-ratio``,
  0.8 in the aisimulate evaluation that builds such rows from it) on every row: lengths drawn
  from ``[0.8 ISL, ISL]`` and ``[0.8 OSL, OSL]`` (``closed_loop(range_ratio=...)``), every
  prompt distinct. Its warm-up (``--num-warmups 2C``, awaited before the measured requests)
  resends the first measured prompt, which caches that one request of ``10 C``; it is left
  out (no warm-up).

    python scripts/harness_variants.py [--variant default ...] [--max-rows N]
"""

from __future__ import annotations

import argparse

import numpy as np

from apex_jax.benchmark_runs import WARMUP_REQUESTS_PER_CLIENT, load_benchmark_runs
from apex_jax.evaluate import evaluate_cases
from apex_jax.measured_runs import MEASURED_COLUMNS, run_cases
from apex_jax.metrics import summarize_requests
from apex_jax.status import OK

VARIANTS = ("default", "nvidia_cache_on", "pool_with_warmup", "undrained", "inferencex_random")
# NVIDIA's runner: --num-dataset-entries 12 C (genai_perf_runner.py).
_ENTRIES_PER_CLIENT = 12
# InferenceX's --random-range-ratio in ai-dynamo/aisimulate's InferenceX evaluation.
_INFERENCEX_RANGE_RATIO = "0.8"


def _harness(run: dict[str, str], variant: str) -> tuple[dict[str, str], int]:
    """``run`` (a measured-runs row) with the prompt pool and warm-up of ``variant``, and the
    number of its first requests to leave out of the figures."""
    concurrency = int(run["concurrency"])
    warmup = WARMUP_REQUESTS_PER_CLIENT * concurrency
    if variant == "nvidia_cache_on":
        entries = _ENTRIES_PER_CLIENT * concurrency
        return run | {"num_prompts": str(entries), "num_warmup_requests": str(warmup)}, 0
    if variant == "pool_with_warmup" and int(run["num_prompts"]):
        return run | {"num_warmup_requests": str(warmup)}, 0
    if variant == "undrained":
        requests = int(run["num_requests"]) + warmup
        return run | {"num_requests": str(requests), "num_warmup_requests": "0"}, warmup
    if variant == "inferencex_random":
        distinct = {"num_prompts": "0", "num_warmup_requests": "0"}
        return run | distinct | {"range_ratio": _INFERENCEX_RANGE_RATIO}, 0
    return run, 0


def group_mape(variant: str, max_rows: int | None = None) -> dict[str, dict[str, float]]:
    """Per group of rows (``model precision``), ``all dense`` and ``all MoE`` (the first
    ``max_rows`` rows, dense ones first): the number of rows and the TTFT and TPOT MAPE (%)
    under ``variant``."""
    runs = load_benchmark_runs()
    # An MoE row's layout has an expert-parallel degree (benchmark_runs._layout).
    by_kind = sorted(zip(runs.rows, runs.measured_runs), key=lambda rm: "ep" in rm[1])
    rows = [r for r, _ in by_kind[:max_rows]]
    variants = [_harness(m, variant) for _, m in by_kind[:max_rows]]
    cases, measured = run_cases([run for run, _ in variants])
    results, _ = evaluate_cases(cases, per_request=True)
    groups: dict[str, list[list[float]]] = {}
    for row, m, r, (run, skip) in zip(rows, measured, results, variants):
        q = r["requests"]
        times = [q[key][skip:] for key in ("arrival_s", "first_token_s", "finish_s")]
        summary = summarize_requests(*times, q["output_tokens"][skip:], OK)
        errors = [abs(summary[c] / m[c] - 1.0) * 100.0 for c in MEASURED_COLUMNS]
        groups.setdefault(f"{row['model_path']} {row['precision'] or 'bf16'}", []).append(errors)
        groups.setdefault("all MoE" if "ep" in run else "all dense", []).append(errors)
    return {
        key: {"num_rows": len(e)} | dict(zip(MEASURED_COLUMNS, np.mean(e, axis=0).tolist()))
        for key, e in groups.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, action="append")
    parser.add_argument("--max-rows", type=int, help="the first N rows only (dense first)")
    args = parser.parse_args()
    for variant in args.variant or VARIANTS:
        print(variant)
        for key, m in group_mape(variant, args.max_rows).items():
            print(
                f"  {key:<42} rows {m['num_rows']:>4}   TTFT {m['ttft_mean_s']:6.1f}%"
                f"   TPOT {m['tpot_mean_s']:6.1f}%"
            )


if __name__ == "__main__":
    main()
