"""Per-iteration time of one serving iteration, from a roofline.

An iteration is described by four aggregate features of its batch:

- ``num_tokens``: tokens pushed through the GEMMs (prompt tokens being prefilled plus one per
  decoding sequence);
- ``num_sampled``: sequences that produce a token (they pay the LM head);
- ``prefill_pairs``: query-key pairs of causal prefill attention, ``sum L (L + 1) / 2``;
- ``decode_kv_tokens``: KV entries read by decode attention, the sum of the decoding
  sequences' lengths.

The time is ``base(num_tokens, num_sampled, prefill_pairs) + slope * decode_kv_tokens``:
decode attention is memory-bound and linear in the KV it reads. That split is what lets the
engine advance a run of identical decode iterations in closed form.

The constants are derived once per plan into :class:`CostCoeffs`, vectorised over the plan
tensor and differentiable with respect to :class:`~apex_jax.hardware.HardwareParams`.
Pipeline stages run one after another in this first version: the iteration pays every stage
and the stage transfers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from apex_jax.dtypes import DTYPE_BYTES, DTYPES, dtype_code
from apex_jax.plans import COL

if TYPE_CHECKING:
    from apex_jax.hardware import GpuSpec, HardwareParams
    from apex_jax.model_spec import ModelSpec

__all__ = ["CostCoeffs", "cost_coeffs", "decode_time_parts_s", "iteration_time_s"]

_ACT_BYTES = 2.0  # activations and collectives move bf16/fp16


class CostCoeffs(NamedTuple):
    """Per-plan constants of the iteration-time model; every field is float64 ``[P]`` (or ``[]``)."""

    fixed_s: Any  # per-iteration overhead plus kernel launch latency of every layer
    gemm_compute_s_per_token: Any  # GEMM FLOPs of one token over all layers at achieved FLOP/s
    gemm_weight_s: Any  # streaming every layer's weights once at achieved bandwidth
    gemm_act_s_per_token: Any  # activation traffic of one token through the GEMMs
    lm_head_compute_s_per_token: Any  # LM-head FLOPs of one sampled token
    lm_head_weight_s: Any  # streaming the LM head once
    prefill_attn_s_per_pair: Any  # causal prefill attention, all layers, per query-key pair
    decode_attn_s_per_kv_token: Any  # decode attention, all layers, per KV entry read
    comm_fixed_s: Any  # collective and stage-transfer latencies per iteration
    comm_s_per_token: Any  # collective and stage-transfer bytes per token at link bandwidth


def _gemm_compute_code(weight_code: np.ndarray) -> np.ndarray:
    # fp8 weights run W8A8 GEMMs on fp8 tensor cores; int8/int4 are weight-only quantisation
    # whose kernels dequantise to bf16, so they run at the bf16 rate but read fewer bytes.
    bf16 = dtype_code("bf16")
    keep = np.isin(weight_code, [dtype_code(n) for n in ("fp32", "bf16", "fp16", "fp8")])
    return np.where(keep, weight_code, bf16)


def cost_coeffs(
    plans: np.ndarray,
    model: ModelSpec,
    gpu: GpuSpec,
    hw: HardwareParams,
    *,
    gpus_per_node: int,
) -> CostCoeffs:
    """Derive the iteration-time constants of every plan.

    Args:
        plans: int32 ``[P, F]`` plan tensor.
        model: the served model.
        gpu: the GPU type.
        hw: calibratable multipliers (scalars, shared by all plans).
        gpus_per_node: GPUs that share NVLink; larger replicas cross the network.

    Returns:
        :class:`CostCoeffs` with float64 ``[P]`` fields, in seconds.
    """
    plans = np.asarray(plans)
    tp = jnp.asarray(plans[:, COL["tp"]], jnp.float64)
    pp = jnp.asarray(plans[:, COL["pp"]], jnp.float64)
    peak = np.asarray([gpu.peak_flops[name] for name in DTYPES])
    bytes_by_code = np.asarray([DTYPE_BYTES[name] for name in DTYPES])
    gemm_peak = jnp.asarray(peak[_gemm_compute_code(plans[:, COL["weight_dtype"]])])
    # fp16 and bf16 share a rate where both exist; V100 has fp16 tensor cores only.
    attn_peak = float(gpu.peak_flops["fp16"])
    w_bytes = jnp.asarray(bytes_by_code[plans[:, COL["weight_dtype"]]])
    kv_bytes = jnp.asarray(bytes_by_code[plans[:, COL["kv_dtype"]]])

    compute_eff = jnp.exp(hw.log_compute_eff)
    attn_eff = jnp.exp(hw.log_attn_compute_eff)
    bw = gpu.hbm_bandwidth_bytes_per_s * jnp.exp(hw.log_memory_eff)
    link_eff = jnp.exp(hw.log_link_eff)
    coll_lat = jnp.exp(hw.log_collective_latency_s)

    num_layers = float(model.num_layers)
    hidden = float(model.hidden_size)
    layer_gemm_params = float(model.attn_params_per_layer + model.active_mlp_params_per_layer)
    layer_weight_params = float(model.attn_params_per_layer + model.mlp_params_per_layer)

    gemm_compute = num_layers * 2.0 * layer_gemm_params / tp / (gemm_peak * compute_eff)
    gemm_weight = num_layers * layer_weight_params * w_bytes / tp / bw
    # Each GEMM reads its input and writes its output once: roughly q/k/v/o, up/gate, down.
    io_width = 4.0 * hidden + 2.0 * model.intermediate_size * model.num_experts_per_tok
    gemm_act = num_layers * io_width * _ACT_BYTES / tp / bw

    lm_params = float(model.hidden_size * model.vocab_size)
    lm_compute = 2.0 * lm_params / tp / (gemm_peak * compute_eff)
    lm_weight = lm_params * w_bytes / tp / bw

    heads_per_gpu = model.num_heads / tp
    kv_heads_per_gpu = jnp.maximum(1.0, model.num_kv_heads / tp)
    attn_flops_per_pair = 4.0 * heads_per_gpu * model.head_dim * num_layers
    prefill_pair = attn_flops_per_pair / (attn_peak * attn_eff)
    # Decode attention reads K and V of every layer; its FLOPs are rarely the bound but the
    # max keeps large GQA groups honest.
    kv_read_bytes = 2.0 * kv_heads_per_gpu * model.head_dim * num_layers * kv_bytes
    decode_kv = jnp.maximum(kv_read_bytes / bw, attn_flops_per_pair / (attn_peak * attn_eff))

    replica_gpus = tp * pp
    nvlink = gpu.nvlink_bandwidth_bytes_per_s * link_eff
    network = gpu.network_bandwidth_bytes_per_s * link_eff
    # TP stays inside a node (enumeration rule); PP crosses nodes once a replica outgrows one.
    pp_link = jnp.where(replica_gpus > gpus_per_node, network, nvlink)
    has_tp = (tp > 1).astype(jnp.float64)
    # Two all-reduces per layer (after attention and after the MLP); a ring moves
    # 2 (tp - 1) / tp of the message per GPU.
    allreduce_per_token = 2.0 * num_layers * 2.0 * (tp - 1.0) / tp * hidden * _ACT_BYTES / nvlink
    stage_per_token = (pp - 1.0) * hidden * _ACT_BYTES / pp_link
    comm_fixed = has_tp * 2.0 * num_layers * coll_lat + (pp - 1.0) * coll_lat
    comm_per_token = has_tp * allreduce_per_token + stage_per_token

    fixed = jnp.exp(hw.log_iteration_overhead_s) + num_layers * jnp.exp(hw.log_kernel_latency_s)
    ones = jnp.ones_like(tp)
    return CostCoeffs(
        fixed_s=fixed * ones,
        gemm_compute_s_per_token=gemm_compute,
        gemm_weight_s=gemm_weight,
        gemm_act_s_per_token=gemm_act * ones,
        lm_head_compute_s_per_token=lm_compute,
        lm_head_weight_s=lm_weight,
        prefill_attn_s_per_pair=prefill_pair,
        decode_attn_s_per_kv_token=decode_kv,
        comm_fixed_s=comm_fixed,
        comm_s_per_token=comm_per_token,
    )


def decode_time_parts_s(c: CostCoeffs, num_tokens, num_sampled, prefill_pairs, xp=jnp):
    """Split an iteration's time into ``(base_s, slope_s_per_kv_token)``.

    ``iteration_time_s = base_s + slope_s_per_kv_token * decode_kv_tokens``. ``xp`` is the
    array namespace, ``jax.numpy`` in the engine and ``numpy`` in the reference, so both
    evaluate one formula.
    """
    gemm = xp.maximum(
        num_tokens * c.gemm_compute_s_per_token,
        c.gemm_weight_s + num_tokens * c.gemm_act_s_per_token,
    )
    lm_head = xp.maximum(num_sampled * c.lm_head_compute_s_per_token, c.lm_head_weight_s)
    base = (
        c.fixed_s
        + gemm
        + lm_head
        + prefill_pairs * c.prefill_attn_s_per_pair
        + c.comm_fixed_s
        + num_tokens * c.comm_s_per_token
    )
    return base, c.decode_attn_s_per_kv_token


def iteration_time_s(
    c: CostCoeffs, num_tokens, num_sampled, prefill_pairs, decode_kv_tokens, xp=jnp
):
    """Wall time of one iteration in seconds (see the module docstring for the features)."""
    base, slope = decode_time_parts_s(c, num_tokens, num_sampled, prefill_pairs, xp=xp)
    return base + slope * decode_kv_tokens
