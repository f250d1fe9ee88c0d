"""Per-operator time of one GPU kernel: differentiable analytic models with calibrated constants.

Every public ``*_time_s`` function returns **seconds** for one call of the operator on one GPU
(shapes are per GPU, i.e. already divided by tensor parallelism). All are written with
``jax.numpy``: they take NumPy or JAX arrays of any broadcast shape, run under ``jit`` and
``vmap``, and are differentiable with respect to :class:`KernelParams`.

The constants are dimensionless multipliers and latencies stored as natural logs in
:class:`KernelParams`, a pytree kept apart from :class:`~apex_jax.hardware.HardwareParams`:
``KernelParams`` describes kernels and is fitted per GPU to measured kernel tables
(``apex-jax calibrate``, :mod:`apex_jax.fit_kernels`); ``HardwareParams`` holds the engine-level
multipliers (per-iteration overhead, global compute / memory / link scale) that the cost model
applies on top, and that end-to-end measurements calibrate. The fits that ship with the package
(H100, H200, A100, in ``apex_jax/data/calibrated/kernels/``) load by GPU name with
:func:`load_calibrated`; a GPU without one gets :func:`default_kernel_params`.

Models
======
* **GEMM** ``y[m, n] = x[m, k] W[n, k]^T``: a roofline whose compute side runs at
  ``peak * eff * occupancy`` and whose memory side streams ``W``, ``x`` and ``y`` at
  ``bandwidth * mem_eff``. Occupancy is a product of saturation curves ``z / (z + z_half)``
  in ``m`` (tile fill at small ``m``), ``n``, ``k`` (pipeline depth) and ``m * n`` (waves of
  output tiles over the SMs). The two sides are combined with a smooth maximum
  (``(a^p + b^p)^(1/p)``) and a per-kernel fixed latency is added.
* **Prefill attention** (causal FlashAttention): the same roofline over the causal FLOPs
  ``4 b h d L (L + 1) / 2`` and the bytes of Q, K, V and O, with an occupancy curve in the
  number of query tiles ``b h L``.
* **Decode attention** over a paged KV cache: ``latency + b * per_sequence + kv_tokens *
  per_kv_token``, exactly affine in the total KV tokens read for a fixed batch. The per-token
  cost is a smooth maximum of reading ``2 kv_heads d`` KV elements and the ``4 h d`` FLOPs,
  slowed by an occupancy curve in ``b * kv_heads`` (few sequences cannot use every SM).
* **Fused MoE** (:func:`moe_time_s`): grouped GEMMs whose weight side streams the active
  local experts and whose compute side runs the routed rows at an efficiency curve in rows
  per active expert and expert width; plus per-row permute / activation / combine traffic
  (this GPU's rows and every routed row of the layer) and per-token routing. Separate
  constants for 16-bit and fp8 experts.
* **Collectives** (``all_reduce``, ``all_gather``, ``reduce_scatter``, ``alltoall``):
  alpha-beta, ``alpha(op, n) + bus_bytes / (link_bandwidth * eff(op))``; the bus bytes are
  ``2 (n - 1) / n`` of the message for all-reduce and ``(n - 1) / n`` for the others
  (nccl-tests' bus bandwidth convention). A group spanning ``nodes`` nodes of ``l = n /
  nodes`` GPUs each is hierarchical: all-reduce, reduce-scatter and all-gather run their
  intra-node part over NVLink (``l`` GPUs, the whole message) and their inter-node part over
  the network (``nodes`` GPUs, ``1 / l`` of the message: each of a node's ``l`` GPUs drives
  its own NIC); an all-to-all sends ``(l - 1) / n`` of its buffer over NVLink and ``(n - l)
  / n`` over the network at once, so the slower of the two sets its time. Crossing nodes
  adds the inter-node latency.
* **P2P** send/recv: ``alpha + bytes / (link * eff)``, within or across nodes.
* **Elementwise** (RMSNorm/LayerNorm, rotary, activation, residual add, embedding gather,
  sampling): memory-bound, ``latency + bytes / (bandwidth * elementwise_eff)``.
* **Host costs** (scheduler, input preparation, output processing, launches outside CUDA
  graphs, Python): ``EngineConfig.iteration_overhead_s`` per iteration, ``host_s_per_seq``
  per sampled sequence and the eager launch floor (``eager_s_per_layer``) per engine
  version, scaled by ``HardwareParams.log_iteration_overhead_scale``; kernel tables cannot
  see them (:mod:`apex_jax.engine_config`, :func:`apex_jax.cost.iteration.decode_time_parts_s`).

Precision rules
===============
Which format a kernel *computes* in, and how many bytes it *reads*, for each stored format
(:func:`gemm_precision`, :func:`attention_precision`):

=============  ===========================================  ==================  ============
weights        GEMM math                                    weight bytes        act. bytes
=============  ===========================================  ==================  ============
fp32           TF32 tensor cores (fp32 CUDA cores on Volta)  4                   4
bf16 / fp16    bf16 / fp16 tensor cores                     2                   2
fp8            fp8 tensor cores (W8A8, activations           1                   1
               quantised per tensor) where the GPU has fp8
               (Hopper); else weight-only W8A16 at the
               16-bit rate (Ampere, Volta; Marlin kernels)
fp8_block      as fp8 (activations quantised per group of    1                   1
               128); the constants are fp8's, the fused-MoE
               table its own (:mod:`apex_jax.cost.sites`)
int8           weight-only W8A16: dequantised in the         1                   2
               kernel, 16-bit rate
int4           weight-only W4A16 (AWQ/GPTQ/Marlin),          0.5                 2
               16-bit rate
=============  ===========================================  ==================  ============

Attention always computes in 16 bits (bf16; fp16 on Volta, which has no bf16 tensor cores);
an fp8 KV cache halves the KV bytes that decode attention reads and the KV cache holds, and
is dequantised on load. The measured attention tables are bf16 compute with bf16 or fp8 KV.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from apex_jax.dtypes import dtype_bytes, dtype_name
from apex_jax.hardware import GpuSpec, get_gpu
from apex_jax.paths import DATA_DIR

__all__ = [
    "COLLECTIVE_OPS",
    "KernelParams",
    "activation_time_s",
    "add_time_s",
    "attention_precision",
    "calibrated_dir",
    "collective_time_s",
    "decode_attention_parts_s",
    "decode_attention_time_s",
    "default_kernel_params",
    "embedding_time_s",
    "gemm_precision",
    "gemm_time_s",
    "lm_head_sampling_time_s",
    "load_calibrated",
    "moe_time_s",
    "norm_time_s",
    "p2p_time_s",
    "params_from_json",
    "params_to_json",
    "prefill_attention_time_s",
    "rope_time_s",
]

COLLECTIVE_OPS: tuple[str, ...] = ("all_reduce", "all_gather", "reduce_scatter", "alltoall")
_ACT = 2.0  # bytes of a 16-bit activation


class KernelParams(NamedTuple):
    """Calibratable constants of the per-operator models, all natural logs, float64 ``[]``.

    Efficiencies multiply a :class:`~apex_jax.hardware.GpuSpec` peak; ``*_half`` are the
    half-saturation points of occupancy curves ``z / (z + z_half)`` (in the unit of ``z``);
    latencies are seconds; ``log_*_sharpness`` is ``log(p - 1)`` of a smooth maximum.
    """

    # GEMM; each field is [2]: index 0 for 16-bit (and fp32) GEMMs, index 1 for fp8 (W8A8)
    log_gemm_eff: jax.Array  # [2] achieved / peak FLOP/s
    log_gemm_mem_eff: jax.Array  # [2] achieved / peak HBM bandwidth
    log_gemm_latency_s: jax.Array  # [2] fixed time of one GEMM
    log_gemm_m_half: jax.Array  # [2] tokens (tile fill)
    log_gemm_n_half: jax.Array  # [2] output features
    log_gemm_k_half: jax.Array  # [2] reduction depth (pipeline fill)
    log_gemm_mn_half: jax.Array  # [2] output elements m * n (waves of tiles)
    log_gemm_mnk_half: jax.Array  # [2] multiply-adds m * n * k
    log_gemm_mem_n_half: jax.Array  # [2] output features (memory-side parallelism)
    log_gemm_mem_k_half: jax.Array  # [2] reduction depth (memory-side parallelism)
    log_gemm_sharpness: jax.Array  # [2]
    log_gemm_quant_eff: jax.Array  # [] bandwidth efficiency of quantising x to fp8
    # Prefill attention
    log_prefill_eff: jax.Array  # [] achieved / peak 16-bit FLOP/s
    log_prefill_mem_eff: jax.Array  # []
    log_prefill_latency_s: jax.Array  # []
    log_prefill_rows_half: jax.Array  # [] query rows b * h * L
    log_prefill_len_half: jax.Array  # [] prompt length (per-sequence tile fill)
    log_prefill_fp8_kv_factor: jax.Array  # [] time factor with an fp8 KV cache
    log_prefill_dim_half: jax.Array  # [] head dim (narrow heads use tensor cores worse)
    log_prefill_sharpness: jax.Array  # []
    # Decode attention
    log_decode_mem_eff: jax.Array  # []
    log_decode_eff: jax.Array  # [] achieved / peak 16-bit FLOP/s
    log_decode_latency_s: jax.Array  # []
    log_decode_seq_s: jax.Array  # [] per sequence in the batch
    log_decode_occ_half: jax.Array  # [] sequences x KV heads
    log_decode_fp8_kv_factor: jax.Array  # [] per-token time factor with an fp8 KV cache
    log_decode_dim_exponent: jax.Array  # [] per-token time grows as (head_dim / 128)^this
    log_decode_sharpness: jax.Array  # []
    # Fused MoE; each field is [2]: index 0 for 16-bit experts, index 1 for fp8 (W8A8)
    log_moe_eff: jax.Array  # [2] achieved / peak FLOP/s of the grouped GEMMs
    log_moe_mem_eff: jax.Array  # [2] achieved / peak HBM bandwidth streaming expert weights
    log_moe_latency_s: jax.Array  # [2] fixed time of the layer (routing, launches)
    log_moe_token_s: jax.Array  # [2] per token entering the layer (top-k selection)
    log_moe_rows_half: jax.Array  # [2] routed rows per active expert (tile fill)
    log_moe_n_half: jax.Array  # [2] expert width per GPU (narrow experts use SMs worse)
    log_moe_row_eff: jax.Array  # [2] bandwidth of the per-row traffic of this GPU's rows
    log_moe_global_row_eff: jax.Array  # [2] same, of every routed row of the layer (see doc)
    log_moe_sharpness: jax.Array  # [2]
    # Collectives and p2p
    log_coll_latency_s: jax.Array  # [4] per op in COLLECTIVE_OPS, at 2 GPUs, low-latency protocol
    log_coll_latency_growth: jax.Array  # [] latency growth per doubling of GPUs
    log_coll_eff: jax.Array  # [4] achieved / peak link bandwidth per op, low-latency protocol
    log_coll_bulk_latency_ratio: jax.Array  # [] latency of the bulk protocol / low-latency one
    log_coll_bulk_eff_ratio: jax.Array  # [] bandwidth of the bulk protocol / low-latency one
    log_coll_sharpness: jax.Array  # [] sharpness of the soft minimum over protocols
    log_inter_node_latency_s: jax.Array  # [] extra latency of a hop across nodes
    log_network_eff: jax.Array  # [] achieved / peak network bandwidth
    log_p2p_latency_s: jax.Array  # []
    log_p2p_eff: jax.Array  # []
    # Elementwise
    log_elementwise_eff: jax.Array  # []
    log_elementwise_latency_s: jax.Array  # []


_DEFAULTS: dict[str, float | tuple[float, ...]] = {
    "log_gemm_eff": (math.log(0.9), math.log(0.65)),
    "log_gemm_mem_eff": (math.log(0.9), math.log(0.9)),
    "log_gemm_latency_s": (math.log(3e-6), math.log(6e-6)),
    "log_gemm_m_half": (math.log(1.5), math.log(1.5)),
    "log_gemm_n_half": (math.log(8.0), math.log(8.0)),
    "log_gemm_k_half": (math.log(12.0), math.log(12.0)),
    "log_gemm_mn_half": (math.log(3e4), math.log(3e4)),
    "log_gemm_mnk_half": (math.log(2e6), math.log(2e6)),
    "log_gemm_mem_n_half": (math.log(1.0), math.log(100.0)),
    "log_gemm_mem_k_half": (math.log(2.0), math.log(100.0)),
    "log_gemm_sharpness": (math.log(0.5), math.log(0.5)),
    "log_gemm_quant_eff": math.log(0.4),
    "log_prefill_eff": math.log(0.6),
    "log_prefill_mem_eff": math.log(0.6),
    "log_prefill_latency_s": math.log(10e-6),
    "log_prefill_rows_half": math.log(1e4),
    "log_prefill_len_half": math.log(64.0),
    "log_prefill_fp8_kv_factor": 0.0,
    "log_prefill_dim_half": math.log(16.0),
    "log_prefill_sharpness": math.log(3.0),
    "log_decode_mem_eff": math.log(0.7),
    "log_decode_eff": math.log(0.3),
    "log_decode_latency_s": math.log(10e-6),
    "log_decode_seq_s": math.log(20e-9),
    "log_decode_occ_half": math.log(32.0),
    "log_decode_fp8_kv_factor": 0.0,
    "log_decode_dim_exponent": math.log(0.3),
    "log_decode_sharpness": math.log(3.0),
    "log_moe_eff": (math.log(0.5), math.log(0.25)),
    "log_moe_mem_eff": (math.log(0.8), math.log(0.3)),
    "log_moe_latency_s": (math.log(30e-6), math.log(30e-6)),
    "log_moe_token_s": (math.log(2e-9), math.log(2e-9)),
    "log_moe_rows_half": (math.log(32.0), math.log(32.0)),
    "log_moe_n_half": (math.log(64.0), math.log(64.0)),
    "log_moe_row_eff": (math.log(0.5), math.log(0.5)),
    "log_moe_global_row_eff": (math.log(0.5), math.log(0.05)),
    "log_moe_sharpness": (math.log(3.0), math.log(3.0)),
    "log_coll_latency_s": (math.log(8e-6),) * 4,
    "log_coll_latency_growth": math.log(0.3),
    "log_coll_eff": (math.log(0.3),) * 4,
    "log_coll_bulk_latency_ratio": 1.0,
    "log_coll_bulk_eff_ratio": 1.0,
    "log_coll_sharpness": math.log(10.0),
    "log_inter_node_latency_s": math.log(15e-6),
    "log_network_eff": math.log(0.8),
    "log_p2p_latency_s": math.log(8e-6),
    "log_p2p_eff": math.log(0.7),
    "log_elementwise_eff": math.log(0.6),
    "log_elementwise_latency_s": math.log(4e-6),
}


def default_kernel_params() -> KernelParams:
    """Uncalibrated starting values (float64; needs ``jax_enable_x64``)."""
    return KernelParams(**{k: jnp.asarray(v, jnp.float64) for k, v in _DEFAULTS.items()})


# --------------------------------------------------------------------------------------------
# The shipped calibrated constants
# --------------------------------------------------------------------------------------------


def calibrated_dir() -> Path:
    """Folder of the shipped fitted constants (``<GPU name>.json``)."""
    return DATA_DIR / "calibrated" / "kernels"


def params_to_json(params: KernelParams) -> dict[str, Any]:
    """Plain-JSON form of the constants (logs, as stored)."""
    out = {}
    for name, value in params._asdict().items():
        array = np.asarray(value, np.float64)
        out[name] = array.tolist() if array.ndim else float(array)
    return out


def params_from_json(values: Mapping[str, Any]) -> KernelParams:
    """Constants from :func:`params_to_json` output; missing fields take their defaults, and a
    scalar stored for a per-dtype field (an older file) applies to every dtype."""
    base = default_kernel_params()
    fields = {}
    for name, default in base._asdict().items():
        value = values.get(name)
        fields[name] = (
            default
            if value is None
            else jnp.broadcast_to(jnp.asarray(value, jnp.float64), default.shape)
        )
    return KernelParams(**fields)


@functools.lru_cache(maxsize=16)
def _load_file(path: str, mtime_ns: int) -> dict[str, Any]:
    """The parsed file; keyed by modification time so that a newly installed fit is read."""
    del mtime_ns
    return json.loads(Path(path).read_text())


def load_calibrated(gpu_name: str, *, fallback: bool = True) -> KernelParams:
    """Fitted kernel constants of a GPU, by catalog name or alias.

    Args:
        gpu_name: e.g. ``"h100"`` or ``"H100-SXM-80GB"``.
        fallback: return :func:`default_kernel_params` when no fit ships for the GPU
            (otherwise raise ``FileNotFoundError``).
    """
    try:
        gpu = get_gpu(gpu_name)
    except ValueError:
        # A custom GPU (hardware.gpu_from_dict) is no catalog entry, and no fit ships for it.
        if fallback:
            return default_kernel_params()
        raise
    path = calibrated_dir() / f"{gpu.name}.json"
    if not path.exists():
        if fallback:
            return default_kernel_params()
        raise FileNotFoundError(f"no calibrated kernel constants for {gpu.name} ({path})")
    return params_from_json(_load_file(str(path), path.stat().st_mtime_ns)["params"])


# --------------------------------------------------------------------------------------------
# Precision rules
# --------------------------------------------------------------------------------------------


def gemm_precision(weight_dtype: str | int, gpu: GpuSpec) -> tuple[str, float, float]:
    """``(compute_dtype, weight_bytes, activation_bytes)`` of a linear layer (see module doc)."""
    name = dtype_name(weight_dtype)
    if name == "fp32":
        return "fp32", 4.0, 4.0
    if name in ("bf16", "fp16"):
        return name, 2.0, _ACT
    if name in ("fp8", "fp8_block") and gpu.peak_flops["fp8"] > gpu.peak_flops["fp16"]:
        return "fp8", 1.0, 1.0
    # Weight-only quantisation: dequantised inside the kernel, 16-bit math.
    return _sixteen_bit(gpu), dtype_bytes(name), _ACT


def attention_precision(kv_dtype: str | int, gpu: GpuSpec) -> tuple[str, float]:
    """``(compute_dtype, kv_bytes_per_element)`` of attention over a KV cache of ``kv_dtype``."""
    return _sixteen_bit(gpu), dtype_bytes(kv_dtype)


def _sixteen_bit(gpu: GpuSpec) -> str:
    # Volta has fp16 tensor cores only; engines run 16-bit attention there in fp16.
    return "bf16" if gpu.peak_flops["bf16"] >= gpu.peak_flops["fp16"] else "fp16"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _f(x) -> jax.Array:
    return jnp.asarray(x, jnp.float64)


def _smooth_max(a, b, log_sharpness):
    """``(a^p + b^p)^(1/p)`` with ``p = 1 + exp(log_sharpness)``, computed in log space."""
    p = 1.0 + jnp.exp(log_sharpness)
    return jnp.exp(jnp.logaddexp(p * jnp.log(a), p * jnp.log(b)) / p)


def _sat(z, log_half):
    """Saturation curve ``z / (z + z_half)`` in (0, 1)."""
    return z / (z + jnp.exp(log_half))


# --------------------------------------------------------------------------------------------
# GEMM
# --------------------------------------------------------------------------------------------


def gemm_time_s(
    p: KernelParams,
    gpu: GpuSpec,
    m,
    n,
    k,
    *,
    compute_dtype: str = "bf16",
    weight_bytes: float | None = None,
    act_bytes: float | None = None,
):
    """Seconds of one GEMM ``x[m, k] @ W[n, k]^T`` on one GPU.

    Args:
        p: kernel constants.
        gpu: the GPU (static).
        m: tokens (rows of ``x``), any shape.
        n: output features.
        k: input features.
        compute_dtype: tensor-core format of the math (see :func:`gemm_precision`).
        weight_bytes: bytes per weight element (default: that of ``compute_dtype``).
        act_bytes: bytes per activation element of ``x`` (default: that of ``compute_dtype``).

    Returns:
        Seconds, float64, broadcast shape of ``m, n, k``.
    """
    m, n, k = _f(m), _f(n), _f(k)
    width = dtype_bytes(compute_dtype)
    wb = width if weight_bytes is None else weight_bytes
    ab = width if act_bytes is None else act_bytes
    fp8 = compute_dtype == "fp8"
    i = 1 if fp8 else 0
    occupancy = (
        _sat(m, p.log_gemm_m_half[i])
        * _sat(n, p.log_gemm_n_half[i])
        * _sat(k, p.log_gemm_k_half[i])
        * _sat(m * n, p.log_gemm_mn_half[i])
        * _sat(m * n * k, p.log_gemm_mnk_half[i])
    )
    peak = gpu.peak_flops[compute_dtype] * jnp.exp(p.log_gemm_eff[i])
    t_compute = 2.0 * m * n * k / (peak * occupancy)
    bw = gpu.hbm_bandwidth_bytes_per_s * jnp.exp(p.log_gemm_mem_eff[i])
    bw = bw * _sat(n, p.log_gemm_mem_n_half[i]) * _sat(k, p.log_gemm_mem_k_half[i])
    t_memory = (n * k * wb + m * k * ab + m * n * _ACT) / bw
    t = jnp.exp(p.log_gemm_latency_s[i]) + _smooth_max(t_compute, t_memory, p.log_gemm_sharpness[i])
    if fp8:
        # W8A8 quantises x (read 16-bit, write 8-bit) before the GEMM.
        quant_bw = gpu.hbm_bandwidth_bytes_per_s * jnp.exp(p.log_gemm_quant_eff)
        t = t + m * k * (_ACT + 1.0) / quant_bw
    return t


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


def prefill_attention_time_s(
    p: KernelParams, gpu: GpuSpec, batch, seq_len, heads, kv_heads, head_dim, *, kv_bytes=2.0
):
    """Seconds of causal prefill attention for ``batch`` prompts of ``seq_len`` tokens.

    Heads are per GPU. ``kv_bytes`` is the KV-cache element width (2 for bf16, 1 for fp8).
    """
    b, L, h, kvh, d = _f(batch), _f(seq_len), _f(heads), _f(kv_heads), _f(head_dim)
    flops = 4.0 * b * h * d * L * (L + 1.0) / 2.0
    rows = b * h * L
    occupancy = (
        _sat(rows, p.log_prefill_rows_half)
        * _sat(L, p.log_prefill_len_half)
        * _sat(d, p.log_prefill_dim_half)
    )
    peak = gpu.peak_flops[_sixteen_bit(gpu)]
    t_compute = flops / (peak * jnp.exp(p.log_prefill_eff) * occupancy)
    bytes_moved = b * L * d * (2.0 * h * _ACT + 2.0 * kvh * (_ACT + kv_bytes))
    t_memory = bytes_moved / (gpu.hbm_bandwidth_bytes_per_s * jnp.exp(p.log_prefill_mem_eff))
    fp8 = jnp.where(_f(kv_bytes) < 2.0, jnp.exp(p.log_prefill_fp8_kv_factor), 1.0)
    core = _smooth_max(t_compute, t_memory, p.log_prefill_sharpness)
    return jnp.exp(p.log_prefill_latency_s) + fp8 * core


def decode_attention_parts_s(
    p: KernelParams, gpu: GpuSpec, batch, heads, kv_heads, head_dim, *, kv_bytes=2.0
):
    """``(fixed_s, per_kv_token_s)`` of decode attention: time = fixed + per_token * kv_tokens.

    ``kv_tokens`` is the total KV entries read, summed over the ``batch`` sequences. Both parts
    depend on the batch and head shape only, so the time is exactly affine in ``kv_tokens``
    for a fixed batch.
    """
    b, h, kvh, d = _f(batch), _f(heads), _f(kv_heads), _f(head_dim)
    bw = gpu.hbm_bandwidth_bytes_per_s * jnp.exp(p.log_decode_mem_eff)
    t_read = 2.0 * kvh * d * kv_bytes / bw
    t_math = 4.0 * h * d / (gpu.peak_flops[_sixteen_bit(gpu)] * jnp.exp(p.log_decode_eff))
    fp8 = jnp.where(_f(kv_bytes) < 2.0, jnp.exp(p.log_decode_fp8_kv_factor), 1.0)
    occupancy = _sat(b * kvh, p.log_decode_occ_half)
    width = (d / 128.0) ** jnp.exp(p.log_decode_dim_exponent)
    per_token = fp8 * width * _smooth_max(t_read, t_math, p.log_decode_sharpness) / occupancy
    # One work item per (sequence, KV head): page-table walk, softmax, output write.
    fixed = jnp.exp(p.log_decode_latency_s) + b * kvh * jnp.exp(p.log_decode_seq_s)
    return fixed, per_token


def decode_attention_time_s(
    p: KernelParams, gpu: GpuSpec, batch, kv_tokens, heads, kv_heads, head_dim, *, kv_bytes=2.0
):
    """Seconds of one decode-attention call over ``kv_tokens`` KV entries in total.

    Affine in ``kv_tokens`` for a fixed ``batch`` (see :func:`decode_attention_parts_s`).
    """
    fixed, per_token = decode_attention_parts_s(
        p, gpu, batch, heads, kv_heads, head_dim, kv_bytes=kv_bytes
    )
    return fixed + per_token * _f(kv_tokens)


# --------------------------------------------------------------------------------------------
# MoE
# --------------------------------------------------------------------------------------------


def moe_time_s(
    p: KernelParams,
    gpu: GpuSpec,
    tokens,
    hidden,
    inter,
    topk,
    experts,
    *,
    tp=1,
    ep=1,
    load=1.0,
    compute_dtype: str = "bf16",
    weight_bytes: float | None = None,
    gated: bool = True,
):
    """Seconds of one fused MoE layer (routing, grouped expert GEMMs, combine) on one GPU.

    Args:
        p: kernel constants.
        gpu: the GPU (static).
        tokens: tokens entering the layer (every token of the EP group), any shape.
        hidden: model width.
        inter: the full expert width (divided by ``tp`` here).
        topk: experts per token.
        experts: experts of the layer (``experts / ep`` live on this GPU).
        tp: expert tensor parallelism.
        ep: expert parallelism.
        load: this GPU's routed rows over the mean, ``tokens * topk / ep`` (1 when balanced;
            the busiest rank's factor under skewed routing).
        compute_dtype: tensor-core format of the grouped GEMMs (``fp8`` is W8A8).
        weight_bytes: bytes per expert weight (default: that of ``compute_dtype``).
        gated: gate and up projections (three matrices per expert) or one up projection.

    Returns:
        Seconds, float64, of the broadcast shape of ``tokens``.

    The layer streams the weights of its *active* local experts and runs the routed rows
    through them; the routed rows fill the local experts one row per expert first (balanced
    routing, as the measured tables route), so ``min(experts / ep, rows)`` experts are active.
    The grouped GEMMs run at an efficiency that grows with the rows per active expert (tiles
    of a fixed height are padded) and with the expert width per GPU. Around them, the routed
    rows are permuted, activated and summed: traffic per row of ``2 hidden + inter / tp``
    elements, counted for this GPU's rows and, separately, for every routed row of the layer,
    because an expert-parallel fused kernel may walk (and zero) the rows other ranks own.
    """
    t, hd, it, kk, e = _f(tokens), _f(hidden), _f(inter), _f(topk), _f(experts)
    it = it / _f(tp)
    i = 1 if compute_dtype == "fp8" else 0
    routed = t * kk  # rows of the whole layer
    rows = routed / _f(ep) * _f(load)  # rows this GPU's experts process
    active = jnp.minimum(e / _f(ep), jnp.maximum(rows, 1.0))
    mats = jnp.where(jnp.asarray(gated, bool), 3.0, 2.0)
    width = dtype_bytes(compute_dtype)
    wb = width if weight_bytes is None else weight_bytes
    bw = gpu.hbm_bandwidth_bytes_per_s
    t_weights = active * mats * hd * it * wb / (bw * jnp.exp(p.log_moe_mem_eff[i]))
    eff = (
        jnp.exp(p.log_moe_eff[i])
        * _sat(rows / active, p.log_moe_rows_half[i])
        * _sat(it, p.log_moe_n_half[i])
    )
    t_compute = 2.0 * rows * mats * hd * it / (gpu.peak_flops[compute_dtype] * eff)
    core = _smooth_max(t_compute, t_weights, p.log_moe_sharpness[i])
    row_bytes = (2.0 * hd + (mats - 1.0) * it) * _ACT
    t_rows = row_bytes * (
        rows / (bw * jnp.exp(p.log_moe_row_eff[i]))
        + routed / (bw * jnp.exp(p.log_moe_global_row_eff[i]))
    )
    return jnp.exp(p.log_moe_latency_s[i]) + t * jnp.exp(p.log_moe_token_s[i]) + t_rows + core


# --------------------------------------------------------------------------------------------
# Communication
# --------------------------------------------------------------------------------------------


def collective_time_s(
    p: KernelParams, gpu: GpuSpec, op: str, message_bytes, num_gpus, *, num_nodes=1
):
    """Seconds of one NCCL collective over ``num_gpus`` GPUs (alpha-beta, two protocols).

    NCCL picks, per message, the faster of a low-latency protocol (small alpha, a fraction of
    the link bandwidth) and a bulk protocol (larger alpha, full bandwidth); the model takes a
    soft minimum of the two alpha-beta lines. Across nodes the collective is hierarchical
    (see the module docstring): inside one node it is exactly the one-node model.

    Args:
        p: kernel constants.
        gpu: the GPU (static).
        op: one of :data:`COLLECTIVE_OPS`.
        message_bytes: the message as nccl-tests counts it (the full buffer), any shape.
        num_gpus: participating GPUs (>= 2).
        num_nodes: nodes they span, with ``num_gpus / num_nodes`` GPUs in each.

    Returns:
        Seconds, float64.
    """
    i = COLLECTIVE_OPS.index(op)
    s, n, nodes = _f(message_bytes), _f(num_gpus), jnp.maximum(_f(num_nodes), 1.0)
    local = n / nodes  # GPUs of the group in one node
    nvlink = gpu.nvlink_bandwidth_bytes_per_s
    network = gpu.network_bandwidth_bytes_per_s * jnp.exp(p.log_network_eff)
    if op == "alltoall":
        link_s = jnp.maximum((local - 1.0) / n * s / nvlink, (n - local) / n * s / network)
    else:
        phases = 2.0 if op == "all_reduce" else 1.0
        intra = phases * (local - 1.0) / jnp.maximum(local, 1.0) * s / nvlink
        inter = phases * (nodes - 1.0) / nodes * s / (jnp.maximum(local, 1.0) * network)
        link_s = intra + inter
    eff = jnp.exp(p.log_coll_eff[i])
    alpha = jnp.exp(p.log_coll_latency_s[i]) * (
        1.0 + jnp.exp(p.log_coll_latency_growth) * jnp.log2(jnp.maximum(n, 2.0) / 2.0)
    )
    extra = jnp.where(nodes > 1.0, jnp.exp(p.log_inter_node_latency_s), 0.0)
    low_latency = alpha + extra + link_s / eff
    bulk = (
        alpha * jnp.exp(p.log_coll_bulk_latency_ratio)
        + extra
        + link_s / (eff * jnp.exp(p.log_coll_bulk_eff_ratio))
    )
    sharp = jnp.exp(p.log_coll_sharpness)
    soft_min = -jnp.logaddexp(-sharp * jnp.log(low_latency), -sharp * jnp.log(bulk)) / sharp
    return jnp.exp(soft_min)


def p2p_time_s(p: KernelParams, gpu: GpuSpec, message_bytes, *, inter_node=False):
    """Seconds of one point-to-point send/recv of ``message_bytes`` between two GPUs."""
    s = _f(message_bytes)
    cross = jnp.asarray(inter_node, bool)
    link = jnp.where(
        cross,
        gpu.network_bandwidth_bytes_per_s * jnp.exp(p.log_network_eff),
        gpu.nvlink_bandwidth_bytes_per_s * jnp.exp(p.log_p2p_eff),
    )
    alpha = jnp.exp(p.log_p2p_latency_s) + jnp.where(
        cross, jnp.exp(p.log_inter_node_latency_s), 0.0
    )
    return alpha + s / link


# --------------------------------------------------------------------------------------------
# Elementwise operators
# --------------------------------------------------------------------------------------------


def _elementwise(p: KernelParams, gpu: GpuSpec, bytes_moved):
    bw = gpu.hbm_bandwidth_bytes_per_s * jnp.exp(p.log_elementwise_eff)
    return jnp.exp(p.log_elementwise_latency_s) + _f(bytes_moved) / bw


def norm_time_s(p: KernelParams, gpu: GpuSpec, tokens, hidden):
    """Seconds of one RMSNorm/LayerNorm over ``tokens x hidden`` (read, write, weight)."""
    t, hd = _f(tokens), _f(hidden)
    return _elementwise(p, gpu, (2.0 * t * hd + hd) * _ACT)


def rope_time_s(p: KernelParams, gpu: GpuSpec, tokens, heads, kv_heads, head_dim):
    """Seconds of rotary embedding applied in place to Q and K (heads per GPU)."""
    t = _f(tokens)
    width = (_f(heads) + _f(kv_heads)) * _f(head_dim)
    return _elementwise(p, gpu, 2.0 * t * width * _ACT + t * _f(head_dim) * 4.0)


def activation_time_s(p: KernelParams, gpu: GpuSpec, tokens, inter, *, gated=True):
    """Seconds of the MLP activation (SiLU-and-multiply when gated) over ``inter`` features
    per GPU."""
    t, it = _f(tokens), _f(inter)
    reads = jnp.where(jnp.asarray(gated, bool), 2.0, 1.0)
    return _elementwise(p, gpu, (reads + 1.0) * t * it * _ACT)


def add_time_s(p: KernelParams, gpu: GpuSpec, tokens, hidden):
    """Seconds of one residual add over ``tokens x hidden``."""
    return _elementwise(p, gpu, 3.0 * _f(tokens) * _f(hidden) * _ACT)


def embedding_time_s(p: KernelParams, gpu: GpuSpec, tokens, hidden):
    """Seconds of the embedding gather for ``tokens`` rows of width ``hidden`` (per GPU)."""
    return _elementwise(p, gpu, 2.0 * _f(tokens) * _f(hidden) * _ACT)


def lm_head_sampling_time_s(
    p: KernelParams,
    gpu: GpuSpec,
    num_sampled,
    hidden,
    vocab,
    *,
    tp=1,
    compute_dtype: str = "bf16",
    weight_bytes: float | None = None,
):
    """Seconds of the LM head GEMM for ``num_sampled`` rows plus sampling their tokens.

    The LM head is a GEMM of ``vocab / tp`` outputs; sampling is an elementwise pass that is
    assumed to read and write the fp32 logits three times (softmax, penalties / top-p, draw).
    No measured table covers sampling: its byte count is an assumption.
    """
    s = _f(num_sampled)
    gemm = gemm_time_s(
        p,
        gpu,
        jnp.maximum(s, 1.0),
        _f(vocab) / _f(tp),
        hidden,
        compute_dtype=compute_dtype,
        weight_bytes=weight_bytes,
        act_bytes=_ACT,
    )
    sampling = _elementwise(p, gpu, 3.0 * 2.0 * s * _f(vocab) * 4.0)
    return gemm + sampling
