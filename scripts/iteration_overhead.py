"""The vLLM V1 engine's per-iteration overhead, from measured runs that are not the dev file.

Replays the closed-loop benchmarks of ``apex_jax/data/validation/silicon_dev.csv`` in which vLLM
0.12.0 serves Qwen3-32B in bf16 on 2, 4 and 8 H100s (90 runs; see its ``SOURCES.md``) with the
``vllm 0.11.0`` preset at concurrency 8-32, where a decode iteration is mostly the batch's
kernels and queueing is small, once with no overhead and once with 1 ms. The predicted TPOT
grows by ``d`` ms per ms of overhead, so each run's overhead is ``(measured - predicted at
0) / d``; the script prints every run's and their median, the figure the ``vllm 0.11.0``
preset carries (``VERSION_COSTS`` in ``apex_jax/engine_config.py``). The residual also
holds the kernel model's own error on these shapes: the spread across runs shows its size.

    python scripts/iteration_overhead.py [--max-concurrency 32]
"""

from __future__ import annotations

import argparse
import csv

import numpy as np

import apex_jax
from apex_jax.benchmark_runs import REQUESTS_PER_CLIENT
from apex_jax.paths import bundled_path

MEASUREMENTS = "validation/silicon_dev.csv"


def tpot_ms(rows: list[dict[str, str]], overhead_s: float) -> np.ndarray:
    """Predicted mean TPOT (ms) of every run with the engine overhead set to ``overhead_s``."""
    cases = [
        {
            "model": row["model_path"],
            "hardware": "H100-SXM-80GB",
            "num_gpus": int(row["tp_size"]),
            "plan": {"dp": 1, "tp": int(row["tp_size"]), "pp": 1},
            "workload": {
                "kind": "closed_loop",
                "concurrency": int(row["concurrency"]),
                "isl": int(row["isl"]),
                "osl": int(row["osl"]),
                "num_requests": REQUESTS_PER_CLIENT * int(row["concurrency"]),
            },
            "engine": {"name": "vllm", "version": "0.11.0", "iteration_overhead_s": overhead_s},
        }
        for row in rows
    ]
    results = apex_jax.simulate_many(cases)
    bad = [r["status"] for r in results if r["status"] != "OK"]
    if bad:
        raise RuntimeError(f"{len(bad)} runs did not simulate: {sorted(set(bad))}")
    return np.array([r["tpot_mean_s"] for r in results]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-concurrency", type=int, default=32)
    args = parser.parse_args()
    with open(bundled_path(MEASUREMENTS), newline="") as fh:
        rows = [
            r
            for r in csv.DictReader(fh)
            if (r["backend"], r["model_path"], r["precision"]) == ("vllm", "Qwen/Qwen3-32B", "")
            and int(r["concurrency"]) <= args.max_concurrency
        ]
    measured = np.array([float(r["silicon_tpot_ms"]) for r in rows])
    at_zero = tpot_ms(rows, 0.0)
    per_ms = tpot_ms(rows, 1e-3) - at_zero
    overhead_ms = (measured - at_zero) / per_ms
    print(
        f"{'TP':>3} {'ISL':>5} {'OSL':>5} {'conc':>5} {'TPOT meas':>10} {'pred at 0':>10} "
        f"{'overhead ms':>12}"
    )
    for row, m, p, o in zip(rows, measured, at_zero, overhead_ms):
        print(
            f"{row['tp_size']:>3} {row['isl']:>5} {row['osl']:>5} {row['concurrency']:>5} "
            f"{m:>10.2f} {p:>10.2f} {o:>12.2f}"
        )
    q25, q50, q75 = np.percentile(overhead_ms, [25, 50, 75])
    print(f"{len(rows)} runs: median overhead {q50:.2f} ms (interquartile {q25:.2f}-{q75:.2f} ms)")


if __name__ == "__main__":
    main()
