"""Request- and plan-level serving metrics.

Definitions (matching vLLM's benchmark and Vidur):

- TTFT: first token time minus the request's arrival, so queueing counts.
- TPOT: ``(finish - first token) / (output_tokens - 1)``, over requests with more than one
  output token. ``tpot_token_mean_s`` weights it by tokens instead, ``sum(finish - first) /
  sum(output_tokens - 1)``: the mean of vLLM's ``time_per_output_token`` histogram.
- E2E latency: finish minus arrival.
- Makespan: last finish minus first arrival; throughputs divide by it.
- SLO attainment: the fraction of requests whose TTFT meets the SLO
  (``slo_ttft_attainment``), whose TPOT does (``slo_tpot_attainment``; a request with one
  output token has no TPOT and meets it), and whose TTFT and TPOT both do
  (``slo_attainment``). ``slo_throughput_req_s`` counts the requests meeting both per second
  of makespan, at the workload's own rate. It is *not* goodput: DistServe's goodput is the
  highest arrival rate at which ``SLO.attainment`` of the requests meet both targets, which
  needs replays at several rates (``apex_jax.objectives``).

Work and utilisation (:func:`work_metrics`), over the whole run of a plan:

- ``mfu`` (model FLOPs utilisation): the FLOPs the model needs for the requests, divided by
  what the plan's GPUs could do in the makespan at the datasheet peak of the dtype its GEMMs
  run in (``act_dtype``, boost clock). A request with ``p`` prompt and ``o`` output tokens
  runs ``n = p + o - 1`` tokens through the decoder: ``n`` times the weight GEMMs of every
  layer, ``o`` times the LM head, and attention over ``n (n + 1) / 2`` (query, key) pairs
  per layer (causal). Recomputation after preemption, padding and an encoder's FLOPs are not
  model work and are not counted.
- ``mbu`` (model bandwidth utilisation): the bytes the model must read from device memory,
  divided by what the plan's GPUs could read in the makespan at peak HBM bandwidth. Every
  engine iteration reads all weights once (a replica's pipeline stages together hold one copy;
  MoE experts counted whole, an upper bound); every decode step reads the KV cache of its
  request (``p + t`` tokens for the ``t``-th step). Prefill KV traffic is left out.
- ``tokens_per_iter``: tokens processed per engine iteration, ``sum(p + o - 1)`` over the
  summed iterations of all replicas (virtual engines) of the plan.
- ``avg_batch_seqs``: sequences per iteration, ``sum(o) / iterations``: each request takes
  part in one iteration per output token. Exact without chunked prefills spanning several
  iterations and without preemption, which add iterations a request takes part in.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from apex_jax.dtypes import dtype_name
from apex_jax.hardware import GpuSpec
from apex_jax.model_spec import ModelSpec
from apex_jax.status import OK, status_name

__all__ = [
    "METRIC_KEYS",
    "SLO",
    "SLO_KEYS",
    "WORK_KEYS",
    "model_work",
    "summarize_requests",
    "work_metrics",
]

METRIC_KEYS: tuple[str, ...] = (
    "ttft_mean_s",
    "ttft_p50_s",
    "ttft_p90_s",
    "ttft_p99_s",
    "tpot_mean_s",
    "tpot_p50_s",
    "tpot_p90_s",
    "tpot_p99_s",
    "tpot_token_mean_s",
    "e2e_mean_s",
    "e2e_p50_s",
    "e2e_p90_s",
    "e2e_p99_s",
    "e2e_sum_s",
    "makespan_s",
    "throughput_req_s",
    "throughput_out_tok_s",
    "energy_j",
    "energy_per_output_token_j",
    "avg_power_w",
)
# Filled in by the evaluation, which knows the plan's GPUs and power model.
_ENERGY_KEYS = ("energy_j", "energy_per_output_token_j", "avg_power_w")
# Utilisation and batching of a plan's run (:func:`work_metrics`).
WORK_KEYS: tuple[str, ...] = ("mfu", "mbu", "tokens_per_iter", "avg_batch_seqs")
# Present only when an SLO is given.
SLO_KEYS: tuple[str, ...] = (
    "slo_ttft_attainment",
    "slo_tpot_attainment",
    "slo_attainment",
    "slo_throughput_req_s",
)


@dataclasses.dataclass(frozen=True)
class SLO:
    """Latency targets of a request, in seconds, and the fraction of requests that must meet
    both (``attainment``, DistServe's X%: the bar of goodput and of ``fewest_gpus``)."""

    ttft_s: float = math.inf
    tpot_s: float = math.inf
    attainment: float = 0.9

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"SLO {name} must be > 0 seconds (got {value})")
        if not 0 < self.attainment <= 1:
            raise ValueError(f"SLO attainment must be in (0, 1] (got {self.attainment})")


def _stats(values: np.ndarray, prefix: str) -> dict[str, float]:
    if values.size == 0:
        return {f"{prefix}_{k}_s": float("nan") for k in ("mean", "p50", "p90", "p99")}
    p50, p90, p99 = np.percentile(values, (50, 90, 99))
    return {
        f"{prefix}_mean_s": float(np.mean(values)),
        f"{prefix}_p50_s": float(p50),
        f"{prefix}_p90_s": float(p90),
        f"{prefix}_p99_s": float(p99),
    }


def summarize_requests(
    arrival_s: np.ndarray,
    first_token_s: np.ndarray,
    finish_s: np.ndarray,
    output_tokens: np.ndarray,
    status: int,
    slo: SLO | None = None,
) -> dict[str, object]:
    """Plan-level metrics from per-request times (all ``[N]``, seconds).

    Non-OK plans get their status and NaN metrics: a partial run's latencies would flatter it;
    so does a replica that served no request. With an ``slo`` the result also has
    :data:`SLO_KEYS`.
    """
    out: dict[str, object] = {"status": status_name(status), "num_requests": len(arrival_s)}
    if status != OK or len(arrival_s) == 0:
        out.update({key: float("nan") for key in METRIC_KEYS if key not in _ENERGY_KEYS})
        if slo is not None:
            out.update({key: float("nan") for key in SLO_KEYS})
        return out
    arrival_s = np.asarray(arrival_s, np.float64)
    ttft = first_token_s - arrival_s
    e2e = finish_s - arrival_s
    multi = output_tokens > 1
    tpot = (finish_s[multi] - first_token_s[multi]) / (output_tokens[multi] - 1)
    makespan = float(np.max(finish_s) - np.min(arrival_s))
    out.update(_stats(ttft, "ttft"))
    out.update(_stats(tpot, "tpot"))
    decode_tokens = float(np.sum(output_tokens[multi] - 1))
    decode_s = float(np.sum(finish_s[multi] - first_token_s[multi]))
    out["tpot_token_mean_s"] = decode_s / decode_tokens if decode_tokens else float("nan")
    out.update(_stats(e2e, "e2e"))
    out["e2e_sum_s"] = float(np.sum(e2e))
    out["makespan_s"] = makespan
    safe = makespan if makespan > 0 else float("nan")
    out["throughput_req_s"] = len(arrival_s) / safe
    out["throughput_out_tok_s"] = float(np.sum(output_tokens)) / safe
    if slo is not None:
        per_token = np.zeros_like(ttft)
        per_token[multi] = tpot
        ttft_met = ttft <= slo.ttft_s
        tpot_met = per_token <= slo.tpot_s
        met = ttft_met & tpot_met
        out["slo_ttft_attainment"] = float(np.mean(ttft_met))
        out["slo_tpot_attainment"] = float(np.mean(tpot_met))
        out["slo_attainment"] = float(np.mean(met))
        out["slo_throughput_req_s"] = float(np.sum(met)) / safe
    return out


def model_work(
    model: ModelSpec, prompt_tokens: np.ndarray, output_tokens: np.ndarray
) -> tuple[float, float]:
    """FLOPs and KV-cache reads (in tokens) the model needs for these requests.

    Args:
        model: the model.
        prompt_tokens, output_tokens: ``[N]`` lengths.

    Returns:
        ``(flops, kv_tokens_read)``: the model FLOPs of every request (see the module
        docstring) and the KV entries (tokens) its decode steps read,
        ``sum((o - 1) p + (o - 1) o / 2)``.
    """
    p = np.asarray(prompt_tokens, np.float64)
    o = np.asarray(output_tokens, np.float64)
    n = p + o - 1.0
    flops = (
        n * model.num_layers * model.gemm_flops_per_token_per_layer()
        + o * model.lm_head_flops_per_token
        + n * (n + 1.0) / 2.0 * model.num_layers * model.attn_flops_per_token_pair_per_layer()
    )
    kv_tokens_read = (o - 1.0) * p + (o - 1.0) * o / 2.0
    return float(np.sum(flops)), float(np.sum(kv_tokens_read))


def work_metrics(
    model: ModelSpec,
    gpu: GpuSpec,
    plan: dict[str, object],
    prompt_tokens: np.ndarray,
    output_tokens: np.ndarray,
    num_iters_total: int,
    makespan_s: float,
) -> dict[str, float]:
    """:data:`WORK_KEYS` of a plan's run (definitions in the module docstring).

    Args:
        model, gpu: what is served on what.
        plan: the plan as :func:`apex_jax.plans.plan_to_dict` decodes it.
        prompt_tokens, output_tokens: ``[N]`` lengths of the requests served.
        num_iters_total: engine iterations summed over the plan's replicas.
        makespan_s: the run's makespan.
    """
    num_gpus = int(plan["dp"]) * int(plan["tp"]) * int(plan["pp"])
    flops, kv_tokens = model_work(model, prompt_tokens, output_tokens)
    weight_bytes = model.weight_bytes(dtype_name(plan["weight_dtype"]))
    bytes_read = (
        num_iters_total * weight_bytes
        + kv_tokens * model.kv_bytes_per_token(dtype_name(plan["kv_dtype"]))
    )
    gpu_s = num_gpus * makespan_s if makespan_s > 0 else float("nan")
    iters = num_iters_total if num_iters_total > 0 else float("nan")
    tokens = float(np.sum(np.asarray(prompt_tokens, np.float64) + output_tokens - 1))
    return {
        "mfu": flops / (gpu_s * gpu.peak_flops[dtype_name(plan["act_dtype"])]),
        "mbu": bytes_read / (gpu_s * gpu.hbm_bandwidth_bytes_per_s),
        "tokens_per_iter": tokens / iters,
        "avg_batch_seqs": float(np.sum(output_tokens)) / iters,
    }
