"""Per-iteration energy from a utilisation-driven power model, and the GPU clock knob.

Power of one GPU during an iteration of wall time ``T``::

    P = idle_w + (tdp_w - idle_w) * s(f) * u,   u = min(1, (busy_compute + k_mem * busy_memory) / T)

* ``busy_compute`` is the time the tensor cores would need for the iteration's FLOPs (GEMMs
  and attention) at the calibrated achieved rate; ``busy_memory`` the time HBM needs for its
  bytes (weights, KV cache) at the calibrated achieved bandwidth. ``k_mem`` (0.5) weighs memory
  traffic against math: streaming HBM at full speed draws about half the dynamic power of
  saturated tensor cores (an assumption, in line with published H100/A100 power breakdowns
  where memory-bound decode draws roughly 50-70% of TDP).
* ``s(f) = (f / f_max)^2`` scales dynamic power with the SM clock ``f``: dynamic power goes as
  ``f V^2`` and the voltage falls with the clock over the DVFS range; the exponent 2 (not 3)
  allows for the memory and uncore power that do not scale with the SM clock.
* The clock slows compute-bound work by ``f_max / f`` (see ``clock_mhz`` of
  :func:`apex_jax.cost.iteration.cost_coeffs`); memory- and link-bound work does not slow down.
* Idle power is drawn by every GPU of the replica for the whole iteration, also by pipeline
  stages waiting for their turn. Host CPU, NICs and cooling are not counted.

The inputs are the same aggregate features as :func:`apex_jax.cost.iteration.iteration_time_s`,
so the engine can accumulate energy per iteration, or per run of identical decode iterations
(the busy terms are affine in ``decode_kv_tokens`` too; the ``min`` makes the sum exact only
when utilisation stays below one, which it does at decode).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from apex_jax.cost import kernels as K
from apex_jax.dtypes import DTYPES
from apex_jax.hardware import GpuSpec
from apex_jax.model_spec import ModelSpec
from apex_jax.plans import COL

__all__ = [
    "MEMORY_POWER_WEIGHT",
    "EnergyCoeffs",
    "clock_power_scale",
    "energy_coeffs",
    "iteration_energy_j",
]

MEMORY_POWER_WEIGHT = 0.5
_CLOCK_POWER_EXPONENT = 2.0


class EnergyCoeffs(NamedTuple):
    """Constants of the power model of a batch ``B`` of plans (``B = ()`` for one plan),
    float64; a pytree of arrays like :class:`~apex_jax.cost.iteration.CostCoeffs`. Build with
    :func:`energy_coeffs`, or :meth:`zeros` (no energy: every iteration draws nothing)."""

    num_gpus: ArrayLike  # [*B] GPUs of one replica (tp * pp)
    idle_w: ArrayLike  # [*B] idle power of one GPU, W
    dynamic_w: ArrayLike  # [*B] (tdp - idle) * s(f) of one GPU, W
    compute_s_per_token: ArrayLike  # [*B] tensor-core busy time per token (GEMMs, all layers)
    compute_s_per_pair: ArrayLike  # [*B] tensor-core busy time per prefill query-key pair
    memory_s_fixed: ArrayLike  # [*B] HBM busy time per iteration (weights streamed once)
    memory_s_per_kv_token: ArrayLike  # [*B] HBM busy time per KV entry read

    @classmethod
    def zeros(cls, batch_shape: tuple[int, ...] = ()) -> EnergyCoeffs:
        """All-zero constants (NumPy float64) of a ``batch_shape`` batch of plans."""
        return cls(**{name: np.zeros(tuple(batch_shape), np.float64) for name in cls._fields})


def clock_power_scale(clock_mhz: float, gpu: GpuSpec) -> float:
    """Factor ``(f / f_max)^2`` on dynamic power at SM clock ``clock_mhz``."""
    if not 0 < clock_mhz <= gpu.max_clock_mhz * (1 + 1e-9):
        raise ValueError(f"clock {clock_mhz} MHz outside (0, {gpu.max_clock_mhz}] for {gpu.name}")
    return (clock_mhz / gpu.max_clock_mhz) ** _CLOCK_POWER_EXPONENT


def energy_coeffs(
    plans: np.ndarray,
    model: ModelSpec,
    gpu: GpuSpec,
    *,
    kernel_params: K.KernelParams | None = None,
    clock_mhz: float | None = None,
) -> EnergyCoeffs:
    """Power-model constants of every plan (per GPU busy times are per replica GPU).

    Args:
        plans: int32 ``[P, F]`` plan tensor.
        model: the served model.
        gpu: the GPU type.
        kernel_params: calibrated constants (default: the GPU's shipped fit).
        clock_mhz: SM clock (default: maximum boost clock).

    Returns:
        :class:`EnergyCoeffs` of batch shape ``[P]``, NumPy float64.
    """
    p = K.load_calibrated(gpu.name) if kernel_params is None else kernel_params
    clock = gpu.max_clock_mhz if clock_mhz is None else float(clock_mhz)
    clock_ratio = clock / gpu.max_clock_mhz
    plans = np.asarray(plans)
    tp = plans[:, COL["tp"]].astype(np.float64)
    pp = plans[:, COL["pp"]].astype(np.float64)
    weight = [DTYPES[int(c)] for c in plans[:, COL["weight_dtype"]]]
    kv = [DTYPES[int(c)] for c in plans[:, COL["kv_dtype"]]]
    gemm = [K.gemm_precision(w, gpu) for w in weight]
    peak = np.array([gpu.peak_flops[g[0]] for g in gemm]) * clock_ratio
    fp8 = np.array([g[0] == "fp8" for g in gemm])
    # Host NumPy: eager JAX would compile every operation for every shape of plans.
    p = jax.device_get(p)
    eff = np.where(fp8, np.exp(p.log_gemm_eff[1]), np.exp(p.log_gemm_eff[0]))
    layers = float(model.num_layers)
    # Per GPU: each GPU holds 1 / (tp * pp) of the layers' weights and does that share of FLOPs.
    flops_per_token = layers * model.gemm_flops_per_token_per_layer() / (tp * pp)
    compute_tok = flops_per_token / (peak * eff)
    attn_peak = gpu.peak_flops[K.attention_precision("bf16", gpu)[0]] * clock_ratio
    pair_flops = layers * model.attn_flops_per_token_pair_per_layer() / (tp * pp)
    compute_pair = pair_flops / (attn_peak * np.exp(p.log_prefill_eff))
    wb = np.array([g[1] for g in gemm])
    bw = gpu.hbm_bandwidth_bytes_per_s
    weights = layers * (model.attn_params_per_layer + model.mlp_params_per_layer) * wb / (tp * pp)
    memory_fixed = weights / (bw * np.exp(p.log_gemm_mem_eff[0]))
    kv_bytes = np.array([K.attention_precision(k, gpu)[1] for k in kv])
    kv_heads = np.maximum(model.num_kv_heads / tp, 1.0)
    per_kv = 2.0 * kv_heads * model.head_dim * kv_bytes * layers / pp
    memory_kv = per_kv / (bw * np.exp(p.log_decode_mem_eff))
    ones = np.ones_like(tp)
    dynamic = (gpu.tdp_w - gpu.idle_w) * clock_power_scale(clock, gpu)
    return EnergyCoeffs(
        num_gpus=tp * pp,
        idle_w=gpu.idle_w * ones,
        dynamic_w=dynamic * ones,
        compute_s_per_token=compute_tok,
        compute_s_per_pair=compute_pair * ones,
        memory_s_fixed=memory_fixed,
        memory_s_per_kv_token=memory_kv,
    )


def iteration_energy_j(
    e: EnergyCoeffs,
    iteration_s,
    num_tokens,
    num_sampled,
    prefill_pairs,
    decode_kv_tokens,
    xp=jnp,
):
    """Joules drawn by one replica's GPUs during one iteration of ``iteration_s`` seconds.

    ``iteration_s`` is :func:`apex_jax.cost.iteration.iteration_time_s` of the same features;
    ``xp`` is ``jax.numpy`` or ``numpy``. ``num_sampled`` is accepted for symmetry with the
    time model (the LM head is counted in ``num_tokens``' GEMM FLOPs at this resolution).
    """
    del num_sampled
    busy_compute = num_tokens * e.compute_s_per_token + prefill_pairs * e.compute_s_per_pair
    busy_memory = e.memory_s_fixed + decode_kv_tokens * e.memory_s_per_kv_token
    busy = busy_compute + MEMORY_POWER_WEIGHT * busy_memory
    utilisation = xp.minimum(busy / xp.maximum(iteration_s, 1e-12), 1.0)
    power = e.idle_w + e.dynamic_w * utilisation
    return e.num_gpus * power * iteration_s
