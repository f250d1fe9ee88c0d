"""The share of the GPU's dense peak that the vLLM dense runs of silicon_dev would need if
every prompt were prefilled in full.

A closed loop of ``C`` clients finishes a request every ``(TTFT + (OSL - 1) TPOT) / C``
seconds, so from a run's measured TTFT and TPOT the engine takes in ``C x ISL x TPOT /
(TTFT + (OSL - 1) TPOT)`` prompt tokens per decode step. Their weight-GEMM FLOPs (twice the
decoder layers' parameters per token, split over TP), done in the measured TPOT less one read
of the layers' weights at peak HBM bandwidth, need this share of the dense peak of the run's
weight dtype. It is a lower bound on what a full prefill of every prompt needs: attention,
the KV cache, collectives, the LM head and the engine's overhead are left out. Prints each run
and, per model and dtype, the median and largest share.

    python scripts/prefill_bound.py
"""

from __future__ import annotations

import argparse

import numpy as np

from apex_jax.benchmark_runs import load_benchmark_runs
from apex_jax.deployment import resolve_model
from apex_jax.dtypes import dtype_bytes
from apex_jax.hardware import resolve_gpu


def peak_share(run: dict[str, str]) -> float:
    """The share of the dense peak one run (a row of the measured-runs schema) needs."""
    model, gpu = resolve_model(run["model"]), resolve_gpu(run["gpu"])
    tp, dtype = int(run["tp"]), run["weight_dtype"]
    concurrency, isl, osl = (int(run[k]) for k in ("concurrency", "isl", "osl"))
    ttft_s, tpot_s = float(run["ttft_mean_s"]), float(run["tpot_mean_s"])
    prompt_tokens = concurrency * isl * tpot_s / (ttft_s + (osl - 1) * tpot_s)
    layer_params = model.num_layers * model.params_per_layer / tp
    weights_s = layer_params * dtype_bytes(dtype) / gpu.hbm_bandwidth_bytes_per_s
    flops = 2.0 * layer_params * prompt_tokens
    return flops / max(tpot_s - weights_s, 1e-12) / gpu.peak_flops[dtype]


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    runs = load_benchmark_runs()
    groups: dict[str, list[float]] = {}
    print(f"{'model':<34} {'dtype':<5} {'TP':>2} {'ISL':>5} {'OSL':>5} {'conc':>4}  peak share")
    for row, run in zip(runs.rows, runs.measured_runs):
        # An MoE token reads only its experts' weights, which this dense bound does not count.
        if resolve_model(run["model"]).is_moe:
            continue
        share = peak_share(run)
        key = f"{row['model_path']} {run['weight_dtype']}"
        groups.setdefault(key, []).append(share)
        print(
            f"{row['model_path']:<34} {run['weight_dtype']:<5} {run['tp']:>2} {run['isl']:>5} "
            f"{run['osl']:>5} {run['concurrency']:>4}  {share:10.2f}"
        )
    for key, shares in groups.items():
        print(f"{key}: {len(shares)} runs, median {np.median(shares):.2f}, max {max(shares):.2f}")


if __name__ == "__main__":
    main()
