"""The vLLM V1 engine's per-iteration overhead, from measured runs that are not the dev file.

Replays the closed-loop benchmarks of ``apex_jax/data/validation/silicon_dev.csv`` in which vLLM
0.12.0 serves one model (by default Qwen3-32B in bf16 on 2, 4 and 8 H100s, 90 runs; see its
``SOURCES.md``), as ``apex-jax validate dataset=silicon_dev`` replays them (the same KV dtypes,
prompt pools and warm-ups, :mod:`apex_jax.benchmark_runs`), at concurrency up to 32 by default,
where a decode iteration is mostly the batch's kernels and queueing is small, once with no
overhead and once with 1 ms. The predicted TPOT grows by ``d`` ms per ms of overhead, so each
run's overhead is ``(measured - predicted at 0) / d``; the script prints every run's and their
median, the figure the V1 presets carry (``VERSION_COSTS`` in ``apex_jax/engine_config.py``).
The residual also holds the kernel model's own error on these shapes: the spread across runs
shows its size.

``--held-out MODEL`` then predicts another model's runs (at every concurrency; one weight
dtype with ``--held-out-precision``) with that median, at least 0, and prints their TTFT
and TPOT MAPE: the leave-one-model-out check of the figure.

    python scripts/iteration_overhead.py [--model Qwen/Qwen3-32B] [--precision bf16]
        [--max-concurrency 32] [--held-out MODEL] [--held-out-precision bf16]
"""

from __future__ import annotations

import argparse

import numpy as np

import apex_jax
from apex_jax.benchmark_runs import load_benchmark_runs


def _case(run: dict[str, str], overhead_s: float) -> dict:
    """``simulate_many`` arguments of one run (a row of the measured-runs schema)."""
    workload = {"kind": "closed_loop"}
    harness = ("num_prompts", "num_warmup_requests")
    workload |= {k: int(run[k]) for k in ("concurrency", "isl", "osl", "num_requests", *harness)}
    return {
        "model": run["model"],
        "hardware": run["gpu"],
        "num_gpus": int(run["num_gpus"]),
        "plan": {"dp": 1, "tp": int(run["tp"]), "pp": 1}
        | {k: run[k] for k in ("weight_dtype", "kv_dtype")},
        "workload": workload,
        "engine": {
            "name": run["engine"],
            "version": run["engine_version"],
            "iteration_overhead_s": overhead_s,
        },
    }


def predicted(runs: list[dict[str, str]], overhead_s: float) -> dict[str, np.ndarray]:
    """Predicted mean TTFT and TPOT (ms) of every run with the engine overhead ``overhead_s``."""
    results = apex_jax.simulate_many([_case(run, overhead_s) for run in runs])
    bad = [r["status"] for r in results if r["status"] != "OK"]
    if bad:
        raise RuntimeError(f"{len(bad)} runs did not simulate: {sorted(set(bad))}")
    return {m: np.array([r[m] for r in results]) * 1e3 for m in ("ttft_mean_s", "tpot_mean_s")}


def model_runs(model: str, precision: str | None) -> list[dict[str, str]]:
    """The file's simulated runs of ``model`` (in one weight dtype, or all of them)."""
    every = load_benchmark_runs()
    runs = [
        run
        for row, run in zip(every.rows, every.measured_runs)
        if row["model_path"] == model and precision in (None, run["weight_dtype"])
    ]
    if not runs:
        raise SystemExit(f"no simulated runs of {model} {precision or ''} in the file")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen/Qwen3-32B")
    parser.add_argument("--precision", default="bf16", help="weight dtype of the runs")
    parser.add_argument("--max-concurrency", type=int, default=32)
    parser.add_argument("--held-out", help="a model whose runs to predict with the median")
    parser.add_argument("--held-out-precision", help="its weight dtype (default: all)")
    args = parser.parse_args()
    runs = [
        run
        for run in model_runs(args.model, args.precision)
        if int(run["concurrency"]) <= args.max_concurrency
    ]
    measured = np.array([float(run["tpot_mean_s"]) for run in runs]) * 1e3
    at_zero = predicted(runs, 0.0)["tpot_mean_s"]
    per_ms = predicted(runs, 1e-3)["tpot_mean_s"] - at_zero
    overhead_ms = (measured - at_zero) / per_ms
    print(
        f"{'TP':>3} {'ISL':>5} {'OSL':>5} {'conc':>5} {'TPOT meas':>10} {'pred at 0':>10} "
        f"{'overhead ms':>12}"
    )
    for run, m, p, o in zip(runs, measured, at_zero, overhead_ms):
        print(
            f"{run['tp']:>3} {run['isl']:>5} {run['osl']:>5} {run['concurrency']:>5} "
            f"{m:>10.2f} {p:>10.2f} {o:>12.2f}"
        )
    q25, q50, q75 = np.percentile(overhead_ms, [25, 50, 75])
    print(f"{len(runs)} runs: median overhead {q50:.2f} ms (interquartile {q25:.2f}-{q75:.2f} ms)")
    if args.held_out:
        held = model_runs(args.held_out, args.held_out_precision)
        pred = predicted(held, max(q50, 0.0) * 1e-3)
        mape = {
            m: 100.0 * np.mean(np.abs(pred[m] / (np.array([float(r[m]) for r in held]) * 1e3) - 1))
            for m in pred
        }
        print(
            f"{args.held_out} ({len(held)} runs) with {max(q50, 0.0):.2f} ms: MAPE TTFT "
            f"{mape['ttft_mean_s']:.1f}%, TPOT {mape['tpot_mean_s']:.1f}%"
        )


if __name__ == "__main__":
    main()
