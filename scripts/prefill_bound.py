"""The share of the GPU's dense peak that the vLLM dense runs of silicon_dev would need if
every prompt were prefilled in full.

A closed loop of ``C`` clients finishes a request every ``(TTFT + (OSL - 1) TPOT) / C``
seconds, so from a run's measured TTFT and TPOT the engine takes in ``C x ISL x TPOT /
(TTFT + (OSL - 1) TPOT)`` prompt tokens per decode step. Their weight-GEMM FLOPs (twice the
decoder layers' parameters per token, split over TP), done in the measured TPOT less what
every decode step must read from HBM at its peak bandwidth, need this share of the dense peak
of the run's weight dtype. What a step reads: the layers' weights once, and the KV cache of
the sequences decoding in it (a client decodes ``(OSL - 1) TPOT`` of every ``TTFT + (OSL - 1)
TPOT`` seconds, and a sequence halfway through its output holds ``ISL + OSL / 2`` tokens; the
KV dtype as ``apex_jax.benchmark_runs`` assumes it, its heads split over TP). A prefix-cache
hit skips prefill, never these reads. It is a lower bound on what a full prefill of every
prompt needs: prefill attention, collectives, the LM head and the engine's overhead are left
out. A share above 1 means the run cannot have prefilled every prompt in full. Prints each
run (the share, then the same without the KV read) and, per model and dtype, the median and
largest share.

    python scripts/prefill_bound.py
"""

from __future__ import annotations

import argparse

import numpy as np

from apex_jax.benchmark_runs import load_benchmark_runs
from apex_jax.deployment import resolve_model
from apex_jax.dtypes import dtype_bytes
from apex_jax.hardware import resolve_gpu


def peak_share(run: dict[str, str], *, with_kv_read: bool = True) -> float:
    """The share of the dense peak one run (a row of the measured-runs schema) needs;
    ``with_kv_read=False`` leaves the decoding sequences' KV read out of the step."""
    model, gpu = resolve_model(run["model"]), resolve_gpu(run["gpu"])
    tp, dtype = int(run["tp"]), run["weight_dtype"]
    concurrency, isl, osl = (int(run[k]) for k in ("concurrency", "isl", "osl"))
    ttft_s, tpot_s = float(run["ttft_mean_s"]), float(run["tpot_mean_s"])
    request_s = ttft_s + (osl - 1) * tpot_s
    prompt_tokens = concurrency * isl * tpot_s / request_s
    layer_params = model.num_layers * model.params_per_layer / tp
    read_bytes = layer_params * dtype_bytes(dtype)
    if with_kv_read:
        num_decoding = concurrency * (osl - 1) * tpot_s / request_s
        kv_bytes_per_token = model.kv_bytes_per_token(run["kv_dtype"]) / min(
            tp, model.num_kv_heads
        )
        read_bytes += num_decoding * (isl + osl / 2.0) * kv_bytes_per_token
    flops = 2.0 * layer_params * prompt_tokens
    step_s = tpot_s - read_bytes / gpu.hbm_bandwidth_bytes_per_s
    return flops / max(step_s, 1e-12) / gpu.peak_flops[dtype]


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    runs = load_benchmark_runs()
    groups: dict[str, list[float]] = {}
    print(
        f"{'model':<34} {'dtype':<5} {'TP':>2} {'ISL':>5} {'OSL':>5} {'conc':>4}  peak share"
        "  (without KV read)"
    )
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
            f"  {peak_share(run, with_kv_read=False):18.2f}"
        )
    for key, shares in groups.items():
        print(f"{key}: {len(shares)} runs, median {np.median(shares):.2f}, max {max(shares):.2f}")


if __name__ == "__main__":
    main()
