"""Request- and plan-level serving metrics.

Definitions (matching vLLM's benchmark and Vidur):

- TTFT: first token time minus the request's arrival, so queueing counts.
- TPOT: ``(finish - first token) / (output_tokens - 1)``, over requests with more than one
  output token. ``tpot_token_mean_s`` weights it by tokens instead, ``sum(finish - first) /
  sum(output_tokens - 1)``: the mean of vLLM's ``time_per_output_token`` histogram.
- E2E latency: finish minus arrival.
- Makespan: last finish minus first arrival; throughputs divide by it.
- SLO attainment: the fraction of requests whose TTFT and TPOT both meet the SLO (a request
  with one output token has no TPOT and needs only the TTFT); goodput is the number of such
  requests per second of makespan (DistServe's definition).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from apex_jax.status import OK, status_name

__all__ = [
    "METRIC_KEYS",
    "SLO",
    "SLO_KEYS",
    "closed_loop_arrivals",
    "summarize_requests",
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
# Present only when an SLO is given.
SLO_KEYS: tuple[str, ...] = ("slo_attainment", "goodput_req_s")


@dataclasses.dataclass(frozen=True)
class SLO:
    """Latency targets of a request, in seconds."""

    ttft_s: float = math.inf
    tpot_s: float = math.inf

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"SLO {name} must be > 0 seconds (got {value})")


def closed_loop_arrivals(finish_s: np.ndarray, concurrency: int) -> np.ndarray:
    """Arrival times of a closed loop: request ``i >= C`` is sent at the ``(i - C + 1)``-th
    completion of the replica, requests ``i < C`` at t = 0."""
    finish_s = np.asarray(finish_s, np.float64)
    arrivals = np.zeros_like(finish_s)
    done = np.sort(finish_s)
    arrivals[concurrency:] = done[: max(0, len(finish_s) - concurrency)]
    return arrivals


def _stats(values: np.ndarray, prefix: str) -> dict[str, float]:
    if values.size == 0:
        return {f"{prefix}_{k}_s": float("nan") for k in ("mean", "p50", "p90", "p99")}
    return {
        f"{prefix}_mean_s": float(np.mean(values)),
        f"{prefix}_p50_s": float(np.percentile(values, 50)),
        f"{prefix}_p90_s": float(np.percentile(values, 90)),
        f"{prefix}_p99_s": float(np.percentile(values, 99)),
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

    Non-OK plans get their status and NaN metrics: a partial run's latencies would flatter it.
    With an ``slo`` the result also has :data:`SLO_KEYS`.
    """
    out: dict[str, object] = {"status": status_name(status), "num_requests": len(arrival_s)}
    if status != OK:
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
    out["e2e_mean_s"] = float(np.mean(e2e))
    out["e2e_sum_s"] = float(np.sum(e2e))
    out["makespan_s"] = makespan
    safe = makespan if makespan > 0 else float("nan")
    out["throughput_req_s"] = len(arrival_s) / safe
    out["throughput_out_tok_s"] = float(np.sum(output_tokens)) / safe
    if slo is not None:
        per_token = np.zeros_like(ttft)
        per_token[multi] = tpot
        met = (ttft <= slo.ttft_s) & (per_token <= slo.tpot_s)
        out["slo_attainment"] = float(np.mean(met))
        out["goodput_req_s"] = float(np.sum(met)) / safe
    return out
