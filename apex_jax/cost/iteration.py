"""Per-iteration time of one serving iteration, from measured kernels and calibrated models.

An iteration is described by five aggregate features of its batch:

- ``num_tokens``: tokens pushed through the GEMMs (prompt tokens being prefilled plus one per
  decoding sequence);
- ``num_sampled``: sequences that produce a token (they pay the LM head and sampling);
- ``prefill_pairs``: query-key pairs of causal prefill attention, ``sum L (L + 1) / 2``;
- ``num_decoding``: sequences decoding one token (the decode-attention batch);
- ``decode_kv_tokens``: KV entries read by decode attention, the sum of the decoding
  sequences' lengths.

Decode attention is read off a grid (``decode_attn_grid_s``): linear in the batch between
:data:`DECODE_BATCH_KNOTS`, and for a fixed batch piecewise linear in ``decode_kv_tokens``
with breakpoints :data:`DECODE_KV_KNOTS`. So for a fixed batch the whole time is affine in
``decode_kv_tokens`` up to the next breakpoint: :func:`decode_time_parts_s` gives that piece
and where it ends, and the engine advances a run of identical decode iterations in closed
form up to there.

The engine's host work adds to the device's: a fixed overhead per iteration and a cost per
sampled sequence, and an iteration without a CUDA graph (any prefill pairs, or more decoding
sequences than ``max_graph_batch``) lasts at least the host's eager launch of every layer
(``eager_floor_s``) plus that host work. Where the floor binds, the time is flat in
``decode_kv_tokens`` and its piece ends where the device part reaches the floor, so the
closed form holds there too (see :mod:`apex_jax.engine_config` for the figures).

Where the per-plan constants come from (:func:`cost_coeffs`):

* Everything that scales with ``num_tokens`` (every layer's GEMMs or fused MoE, norms, rotary,
  activation, residual adds, embedding, the tensor-parallel all-reduces) is evaluated per
  operator at the knots of :data:`TOKEN_KNOTS` and summed into a monotone piecewise-linear
  curve of ``num_tokens``; the LM head and sampling likewise over ``num_sampled``
  (:data:`SAMPLED_KNOTS`).
* Each operator's time is **looked up in the measured table** of the GPU where the shape is
  covered (:mod:`apex_jax.cost.tables`: GEMM ``(m, n, k, dtype)``, MoE, attention head
  configurations, NCCL collectives of 2/4/8 GPUs in one node), and taken from the
  **calibrated analytic model** (:mod:`apex_jax.cost.kernels` with the GPU's fitted
  :class:`~apex_jax.cost.kernels.KernelParams`) otherwise: other shapes, other GPUs, other
  dtypes, multi-node. :func:`cost_sources` tells which, and :func:`cost_coeffs` logs it.
* :class:`~apex_jax.hardware.HardwareParams` act on top, as multipliers relative to their
  defaults: a table value is scaled by ``model(adjusted) / model(calibrated)``, so the default
  ``HardwareParams`` reproduce the tables exactly and every constant stays differentiable.
* Plans equal in their cost columns share their constants. The distinct plans' operator
  call sites, shapes and table values are gathered once on the host
  (:mod:`apex_jax.cost.sites`, NumPy); the kernel models of all sites are then evaluated by
  one jitted function written for one plan and vmapped over the plans (:func:`cost_coeffs`),
  so building the constants costs one compile per model and GPU, not a loop per plan.

The constants of a plan form a :class:`CostCoeffs` pytree of arrays: scalars per plan and
one slope vector per curve, so batches of plans stack and index with ``jax.tree_util``.

The iteration time is the whole model's: the engine's host overhead, every pipeline stage and
the ``pp - 1`` stage transfers. :func:`pipeline_parts_s` tells which parts run off the stages
(the host, the transfers) and which on the last stage only (the LM head and sampling); the
rest is layer work, which a pipeline stage does in proportion to its layers (see
:mod:`apex_jax.simulator`).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from apex_jax.background import in_background
from apex_jax.cost import kernels as K
from apex_jax.cost import parallel as PC
from apex_jax.cost import sites as S
from apex_jax.cost.sites import (
    DECODE_BATCH_KNOTS,
    DECODE_KV_KNOTS,
    DECODE_KV_POINTS,
    SAMPLED_KNOTS,
    TOKEN_KNOTS,
)
from apex_jax.dtypes import DTYPES
from apex_jax.engine_config import DEFAULT_ENGINE, ENGINE_PRESETS
from apex_jax.hardware import GpuSpec, HardwareParams, default_hardware_params
from apex_jax.model_spec import ModelSpec
from apex_jax.plans import COL

__all__ = [
    "DECODE_BATCH_KNOTS",
    "DECODE_KV_KNOTS",
    "PRICING_COMPILER_OPTIONS",
    "SAMPLED_KNOTS",
    "TOKEN_KNOTS",
    "CostCoeffs",
    "TimeParts",
    "cost_coeffs",
    "cost_coeffs_ahead",
    "cost_sources",
    "decode_time_parts_s",
    "is_traced",
    "iteration_time_s",
    "pipeline_parts_s",
]

log = logging.getLogger(__name__)


class CostCoeffs(NamedTuple):
    """Constants of the iteration-time model of a batch ``B`` of plans (``B = ()`` for one
    plan), float64 seconds; a pytree of arrays, so batches stack and index with
    ``jax.tree_util.tree_map`` and the engine vmaps over them.

    ``token_curve_*`` is a monotone piecewise-linear function of ``num_tokens`` with knots
    :data:`TOKEN_KNOTS`: ``base`` at the first knot, then one slope per segment starting at
    each knot, the last slope going on beyond the last knot (``K_tok = len(TOKEN_KNOTS)``);
    ``sampled_curve_*`` is the same over ``num_sampled`` with :data:`SAMPLED_KNOTS`
    (``K_s``), ``enc_curve_*`` over an encoder-decoder prefill's prompt tokens.
    ``decode_attn_grid_s`` is decode attention at every pair of :data:`DECODE_BATCH_KNOTS`
    (``K_db``) and the points 0, :data:`DECODE_KV_KNOTS`, twice the last knot (``K_dkv``).

    The first ten fields are a plain roofline, for hand-written constants; the measured-kernel
    model of :func:`cost_coeffs` leaves its GEMM, LM-head and per-KV-entry decode terms at
    zero and prices those operators in the curves and the grid. Build with :meth:`zeros` and
    ``_replace``.
    """

    fixed_s: ArrayLike  # [*B] engine overhead
    gemm_compute_s_per_token: ArrayLike  # [*B] roofline GEMMs: compute side per token
    gemm_weight_s: ArrayLike  # [*B] roofline GEMMs: streaming the weights once
    gemm_act_s_per_token: ArrayLike  # [*B] roofline GEMMs: activations per token
    lm_head_compute_s_per_token: ArrayLike  # [*B] roofline LM head per sampled sequence
    lm_head_weight_s: ArrayLike  # [*B] roofline LM head: streaming its weights
    prefill_attn_s_per_pair: ArrayLike  # [*B] causal prefill attention, all layers, per pair
    decode_attn_s_per_kv_token: ArrayLike  # [*B] decode attention, all layers, per KV entry
    comm_fixed_s: ArrayLike  # [*B] collective and stage-transfer latencies
    comm_s_per_token: ArrayLike  # [*B] collective and stage-transfer time per token (linear)
    prefill_attn_fixed_s: ArrayLike  # [*B] prefill-attention latencies, paid when pairs > 0
    decode_attn_grid_s: ArrayLike  # [*B, K_db, K_dkv] decode attention, all layers, at the grid
    token_curve_base_s: ArrayLike  # [*B] token curve at TOKEN_KNOTS[0]
    token_curve_slopes_s_per_token: ArrayLike  # [*B, K_tok] token curve's slopes
    sampled_curve_base_s: ArrayLike  # [*B] sampled curve at SAMPLED_KNOTS[0]
    sampled_curve_slopes_s_per_seq: ArrayLike  # [*B, K_s] sampled curve's slopes
    is_encoder_decoder: ArrayLike  # [*B] 1.0 for an encoder-decoder model, else 0.0
    enc_fixed_s: ArrayLike  # [*B] encoder attention kernel latencies
    enc_attn_s_per_pair: ArrayLike  # [*B] bidirectional encoder attention, per causal pair
    enc_curve_base_s: ArrayLike  # [*B] encoder curve at TOKEN_KNOTS[0]
    enc_curve_slopes_s_per_token: ArrayLike  # [*B, K_tok] encoder curve's slopes
    host_s: ArrayLike  # [*B] of fixed_s: the engine's per-iteration host overhead
    transfer_fixed_s: ArrayLike  # [*B] of comm_fixed_s: the pp - 1 stage transfers' latency
    transfer_s_per_token: ArrayLike  # [*B] of comm_s_per_token: the stage transfers per token
    host_s_per_seq: ArrayLike  # [*B] the engine's host work per sequence that yields a token
    eager_floor_s: ArrayLike  # [*B] launching every layer's kernels without a CUDA graph
    max_graph_batch: ArrayLike  # [*B] largest decode-only batch that replays a CUDA graph

    @classmethod
    def zeros(cls, batch_shape: tuple[int, ...] = ()) -> CostCoeffs:
        """All-zero constants (NumPy float64) of a ``batch_shape`` batch of plans."""
        return cls(
            **{
                name: np.zeros(tuple(batch_shape) + _SLOPE_LENGTHS.get(name, ()), np.float64)
                for name in cls._fields
            }
        )


# Trailing shape of the slope fields; every other field is one number per plan.
_SLOPE_LENGTHS: dict[str, tuple[int, ...]] = {
    "token_curve_slopes_s_per_token": (len(TOKEN_KNOTS),),
    "sampled_curve_slopes_s_per_seq": (len(SAMPLED_KNOTS),),
    "enc_curve_slopes_s_per_token": (len(TOKEN_KNOTS),),
    "decode_attn_grid_s": (len(DECODE_BATCH_KNOTS), len(DECODE_KV_POINTS)),
}


def _curve(base, slopes, knots, x, xp):
    """``base + sum_i slopes[..., i] * clip(x - knot_i, 0, width_i)``, the last segment
    unbounded; ``slopes`` is ``[*B, K]`` for ``K`` knots."""
    total = base
    for i, knot in enumerate(knots):
        if i + 1 < len(knots):
            total = total + slopes[..., i] * xp.clip(x - knot, 0.0, knots[i + 1] - knot)
        else:
            total = total + slopes[..., i] * xp.maximum(x - knot, 0.0)
    return total


class TimeParts(NamedTuple):
    """An iteration's time as an affine function of its decode KV entries ``k``,
    ``base_s + slope_s_per_kv_token * k``, exact for ``k`` from the features' value up to
    ``kv_tokens_end`` (the next breakpoint of :data:`DECODE_KV_KNOTS`; ``inf`` past the last).
    Fields broadcast like the features and the plans' batch shape."""

    base_s: ArrayLike
    slope_s_per_kv_token: ArrayLike
    kv_tokens_end: ArrayLike


# Where decode attention changes slope: batch knots, KV breakpoints and the KV points' widths.
_BATCH_KNOTS = np.asarray(DECODE_BATCH_KNOTS)
_KV_BREAKPOINTS = DECODE_KV_POINTS[1:-1]
_KV_WIDTHS = np.diff(DECODE_KV_POINTS)


def _decode_attention(c: CostCoeffs, num_decoding, decode_kv_tokens, xp) -> TimeParts:
    """Decode attention of ``num_decoding`` sequences reading ``decode_kv_tokens`` KV entries:
    the grid, linear in the batch between its knots (the last segment continued) and
    piecewise linear in the KV entries between DECODE_KV_POINTS (likewise); zero without
    decoding sequences. Written with ramps and masks, no gathers: the engine runs it every
    step of every lane."""
    batch = xp.asarray(num_decoding, dtype=xp.float64)[..., None]
    kv = xp.asarray(decode_kv_tokens, dtype=xp.float64)[..., None]
    grid = c.decode_attn_grid_s
    # Along the batch: the first row plus each knot-to-knot difference times its ramp.
    ramp = xp.maximum((batch - _BATCH_KNOTS[:-1]) / np.diff(_BATCH_KNOTS), 0.0)
    ramp = xp.concatenate([xp.minimum(ramp[..., :-1], 1.0), ramp[..., -1:]], axis=-1)
    by_kv = grid[..., 0, :] + xp.sum(ramp[..., None] * xp.diff(grid, axis=-2), axis=-2)
    # Along the KV entries: one slope per segment, the last one unbounded.
    slopes = xp.diff(by_kv, axis=-1) / _KV_WIDTHS  # [..., K_dkv - 1]
    filled = xp.maximum(kv - DECODE_KV_POINTS[:-1], 0.0)
    filled = xp.concatenate([xp.minimum(filled[..., :-1], _KV_WIDTHS[:-1]), filled[..., -1:]], -1)
    value = by_kv[..., 0] + xp.sum(slopes * filled, axis=-1)
    is_inside = (kv >= DECODE_KV_POINTS[:-1]) & (
        xp.concatenate([kv < _KV_BREAKPOINTS, xp.ones_like(kv, dtype=bool)], axis=-1)
    )
    slope = xp.sum(xp.where(is_inside, slopes, 0.0), axis=-1)
    end = xp.min(xp.where(_KV_BREAKPOINTS > kv, _KV_BREAKPOINTS, xp.inf), axis=-1)
    is_decoding = batch[..., 0] > 0
    kv = kv[..., 0]
    return TimeParts(
        xp.where(is_decoding, value - slope * kv, 0.0),
        xp.where(is_decoding, slope, 0.0),
        xp.where(is_decoding, end, xp.inf),
    )


def decode_time_parts_s(
    c: CostCoeffs, num_tokens, num_sampled, prefill_pairs, num_decoding, decode_kv_tokens, xp=jnp
) -> TimeParts:
    """An iteration's time as the affine piece in its decode KV entries that holds them.

    ``iteration_time_s = base_s + slope_s_per_kv_token * decode_kv_tokens``, and the same
    piece prices every KV total up to ``kv_tokens_end`` with the other features unchanged:
    a run of decode iterations is closed-form up to there. ``xp`` is the array namespace,
    ``jax.numpy`` in the engine and ``numpy`` in the reference, so both evaluate one formula.
    The features broadcast against the plans' batch shape.

    For an encoder-decoder model (``c.is_encoder_decoder == 1``, no chunked prefill) an
    iteration with prefill pairs is a prefill iteration: its ``num_tokens`` prompt tokens go
    through the encoder and its ``num_sampled`` first tokens through the decoder; a decode
    iteration is decoder only (see :mod:`apex_jax.cost.parallel`).
    """
    enc = _encoder_prefill(c, prefill_pairs, xp)
    prompt_tokens = num_tokens
    num_tokens = _decoder_tokens(enc, num_tokens, num_sampled)
    gemm = xp.maximum(
        num_tokens * c.gemm_compute_s_per_token,
        c.gemm_weight_s + num_tokens * c.gemm_act_s_per_token,
    )
    lm_head, sampled_part = _lm_head_parts_s(c, num_sampled, xp)
    tokens_part = _curve(
        c.token_curve_base_s, c.token_curve_slopes_s_per_token, TOKEN_KNOTS, num_tokens, xp
    )
    attention = _decode_attention(c, num_decoding, decode_kv_tokens, xp)
    host_s = c.host_s + num_sampled * c.host_s_per_seq
    base = (
        c.fixed_s
        + num_sampled * c.host_s_per_seq
        + gemm
        + lm_head
        + tokens_part
        + sampled_part
        + attention.base_s
        + (1.0 - enc) * prefill_pairs * c.prefill_attn_s_per_pair
        + (1.0 - enc) * xp.where(prefill_pairs > 0, c.prefill_attn_fixed_s, 0.0)
        + c.comm_fixed_s
        + num_tokens * c.comm_s_per_token
    )
    encoder = (
        _curve(c.enc_curve_base_s, c.enc_curve_slopes_s_per_token, TOKEN_KNOTS, prompt_tokens, xp)
        + prefill_pairs * c.enc_attn_s_per_pair
        + c.enc_fixed_s
    )
    base = base + enc * encoder
    slope = c.decode_attn_s_per_kv_token + attention.slope_s_per_kv_token
    # Without a CUDA graph the host launches every kernel, and the GPU cannot finish before
    # the host has launched them all: the device part is at least the eager floor. Where the
    # floor binds the time is flat in the KV entries, up to where the device part reaches it.
    is_eager = (prefill_pairs > 0) | (num_decoding > c.max_graph_batch)
    shortfall_s = c.eager_floor_s - (base - host_s + slope * decode_kv_tokens)
    is_floored = is_eager & (shortfall_s > 0.0)
    crossing = decode_kv_tokens + shortfall_s / xp.where(slope > 0.0, slope, 1.0)
    return TimeParts(
        xp.where(is_floored, host_s + c.eager_floor_s, base),
        xp.where(is_floored, 0.0, slope),
        xp.where(
            is_floored & (slope > 0.0),
            xp.minimum(attention.kv_tokens_end, crossing),
            attention.kv_tokens_end,
        ),
    )


def iteration_time_s(
    c: CostCoeffs, num_tokens, num_sampled, prefill_pairs, num_decoding, decode_kv_tokens, xp=jnp
):
    """Wall time of one iteration in seconds (see the module docstring for the features)."""
    parts = decode_time_parts_s(
        c, num_tokens, num_sampled, prefill_pairs, num_decoding, decode_kv_tokens, xp=xp
    )
    return parts.base_s + parts.slope_s_per_kv_token * decode_kv_tokens


def pipeline_parts_s(c: CostCoeffs, num_tokens, num_sampled, prefill_pairs, xp=jnp):
    """``(off_stage_s, last_stage_s)`` of an iteration's time in a pipeline.

    ``off_stage_s`` runs on no stage: the engine's host overhead (fixed and per sampled
    sequence) and the ``pp - 1`` stage transfers of the hidden states. ``last_stage_s`` runs
    on the last stage only: the LM head and sampling. The rest of :func:`iteration_time_s`
    (including all of the decode attention, and an eager floor's excess) is layer work, done
    by each stage in proportion to its layers; the embedding and the final norm, well under
    1% of a layer's work, count with the layers.
    """
    enc = _encoder_prefill(c, prefill_pairs, xp)
    num_tokens = _decoder_tokens(enc, num_tokens, num_sampled)
    lm_head, sampled_part = _lm_head_parts_s(c, num_sampled, xp)
    transfers = c.transfer_fixed_s + num_tokens * c.transfer_s_per_token
    return c.host_s + num_sampled * c.host_s_per_seq + transfers, lm_head + sampled_part


def _encoder_prefill(c: CostCoeffs, prefill_pairs, xp):
    """1.0 in an encoder-decoder prefill iteration, else 0.0 (decoder-only models: always 0)."""
    return c.is_encoder_decoder * xp.where(prefill_pairs > 0, 1.0, 0.0)


def _decoder_tokens(enc, num_tokens, num_sampled):
    """Tokens through the decoder: an encoder-decoder prefill decodes only its first tokens."""
    return num_tokens + enc * (num_sampled - num_tokens)


def _lm_head_parts_s(c: CostCoeffs, num_sampled, xp):
    """``(roofline LM head, measured LM head and sampling curve)`` of ``num_sampled`` rows."""
    lm_head = xp.maximum(num_sampled * c.lm_head_compute_s_per_token, c.lm_head_weight_s)
    sampled_part = _curve(
        c.sampled_curve_base_s, c.sampled_curve_slopes_s_per_seq, SAMPLED_KNOTS, num_sampled, xp
    )
    return lm_head, sampled_part


# --------------------------------------------------------------------------------------------
# Building the constants
# --------------------------------------------------------------------------------------------


def _adjust(kp: K.KernelParams, hw: HardwareParams, log_clock_scale) -> K.KernelParams:
    """Kernel constants moved by the HardwareParams' offsets from their defaults, and by the
    SM clock (compute throughput scales with the clock; memory and links do not)."""
    d = default_hardware_params()
    compute = hw.log_compute_eff - d.log_compute_eff + log_clock_scale
    attn = hw.log_attn_compute_eff - d.log_attn_compute_eff + log_clock_scale
    memory = hw.log_memory_eff - d.log_memory_eff
    link = hw.log_link_eff - d.log_link_eff
    coll_lat = hw.log_collective_latency_s - d.log_collective_latency_s
    kern_lat = hw.log_kernel_latency_s - d.log_kernel_latency_s
    return kp._replace(
        log_gemm_eff=kp.log_gemm_eff + compute,
        log_moe_eff=kp.log_moe_eff + compute,
        log_prefill_eff=kp.log_prefill_eff + attn,
        log_decode_eff=kp.log_decode_eff + attn,
        log_gemm_mem_eff=kp.log_gemm_mem_eff + memory,
        log_gemm_quant_eff=kp.log_gemm_quant_eff + memory,
        log_moe_mem_eff=kp.log_moe_mem_eff + memory,
        log_prefill_mem_eff=kp.log_prefill_mem_eff + memory,
        log_decode_mem_eff=kp.log_decode_mem_eff + memory,
        log_elementwise_eff=kp.log_elementwise_eff + memory,
        log_coll_eff=kp.log_coll_eff + link,
        log_p2p_eff=kp.log_p2p_eff + link,
        log_network_eff=kp.log_network_eff + link,
        log_coll_latency_s=kp.log_coll_latency_s + coll_lat,
        log_p2p_latency_s=kp.log_p2p_latency_s + coll_lat,
        log_inter_node_latency_s=kp.log_inter_node_latency_s + coll_lat,
        log_gemm_latency_s=kp.log_gemm_latency_s + kern_lat,
        log_moe_latency_s=kp.log_moe_latency_s + kern_lat,
        log_prefill_latency_s=kp.log_prefill_latency_s + kern_lat,
        log_decode_latency_s=kp.log_decode_latency_s + kern_lat,
        log_elementwise_latency_s=kp.log_elementwise_latency_s + kern_lat,
    )


class _Ops:
    """Operator times of one plan's call sites (:mod:`apex_jax.cost.sites`): the calibrated
    kernel model scaled by the HardwareParams' offsets (``adj``), and where a table measured
    the site, the measurement scaled by ``model(adj) / model(kp)``. Each kernel model runs
    once, vmapped over the two parameter sets."""

    def __init__(self, gpu: GpuSpec, kp: K.KernelParams, adj: K.KernelParams, kinds: S.SiteKinds):
        self.gpu, self.adj, self.kinds = gpu, adj, kinds
        self._both = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), kp, adj)

    def at_both(self, model: Callable[[K.KernelParams], Any]):
        """``model`` at the calibrated and at the adjusted constants (leading axis of 2)."""
        return jax.vmap(model)(self._both)

    def _mixed(self, measured: S.Measured, model: Callable[[K.KernelParams], Any]):
        cal, adj = self.at_both(model)
        return jnp.where(measured.covered, measured.seconds * adj / cal, adj)

    def by_precision(self, precision: S.Precision, time_s: Callable[[str], Any]):
        """``time_s(compute_dtype)`` for the plan's compute dtype (a traced index into the
        static ``kinds.compute_dtypes``: every variant is evaluated, one is kept)."""
        values = [time_s(compute) for compute in self.kinds.compute_dtypes]
        return values[0] if len(values) == 1 else jnp.stack(values)[precision.variant]

    def gemm(self, g: S.Gemm):
        wb, ab = g.precision.weight_bytes, g.precision.act_bytes

        def model(p):
            return self.by_precision(
                g.precision,
                lambda compute: K.gemm_time_s(
                    p, self.gpu, g.m, g.n, g.k, compute_dtype=compute, weight_bytes=wb, act_bytes=ab
                ),
            )

        return self._mixed(g.measured, model)

    def moe(self, site: S.Moe, model: ModelSpec):
        shape = (model.hidden_size, model.intermediate_size)
        shape += (model.num_experts_per_tok, model.num_experts)
        args = {"tp": site.tp, "ep": site.ep, "load": site.load, "gated": model.is_gated_mlp}
        args["weight_bytes"] = site.precision.weight_bytes

        def kernel(p):
            return self.by_precision(
                site.precision,
                lambda compute: K.moe_time_s(
                    p, self.gpu, site.tokens, *shape, compute_dtype=compute, **args
                ),
            )

        return self._mixed(site.measured, kernel)

    def collective(self, kind: str, c: S.Collective):
        """``(mixed, model at adj)`` seconds of one call of a collective at every knot."""
        cal, adj = self.at_both(
            lambda p: K.collective_time_s(
                p, self.gpu, kind, c.message_bytes, c.group, num_nodes=c.nodes
            )
        )
        return jnp.where(c.measured.covered, c.measured.seconds * adj / cal, adj), adj

    def prefill_per_pair_and_latency(self, a: S.PrefillAttention, head_dim: int):
        """``(seconds per query-key pair, kernel latency)`` of one layer's prefill attention:
        the mean of ``(t - latency) / pairs`` over prompts of PREFILL_LENGTHS, batch 1."""
        lengths = S.PREFILL_LENGTHS
        pairs = lengths * (lengths + 1.0) / 2.0
        cal_t, adj_t = self.at_both(
            lambda p: K.prefill_attention_time_s(
                p, self.gpu, 1.0, lengths, a.heads, a.kv_heads, head_dim, kv_bytes=a.kv_bytes
            )
        )
        adj_lat = jnp.exp(self.adj.log_prefill_latency_s)
        scaled = a.seconds * adj_t / cal_t
        table_lat = jnp.minimum(adj_lat, 0.5 * scaled[0])
        per_pair = jnp.where(
            a.has_table,
            jnp.mean((scaled - table_lat) / pairs),
            jnp.mean((adj_t - adj_lat) / pairs),
        )
        return per_pair, jnp.where(a.has_table, table_lat, adj_lat)

    def decode_grid(self, a: S.DecodeAttention, head_dim: int):
        """One layer's decode attention at the grid's pairs, ``[K_db, K_dkv]``: the measured
        table scaled by ``model(adj) / model(kp)`` where one holds the head configuration,
        the model at ``adj`` otherwise."""
        cal, adj = self.at_both(
            lambda p: K.decode_attention_time_s(
                p,
                self.gpu,
                a.batch[:, None],
                a.kv_tokens,
                a.heads,
                a.kv_heads,
                head_dim,
                kv_bytes=a.kv_bytes,
            )
        )
        return jnp.where(a.has_table, a.seconds * adj / cal, adj)


def _curve_coeffs(values, knots: tuple[float, ...]) -> tuple[Any, jax.Array]:
    """``(base, slopes [K])`` of the monotone piecewise-linear curve through ``values``
    (``[K + 1]``) at ``knots`` and twice the last knot.

    Where ``values`` dip (measured tables are not monotone at small sizes), the curve holds
    the highest value so far and rejoins ``values`` once they pass it, so a dip does not
    raise everything after it (as zeroing the negative slopes would)."""
    xs = np.asarray(knots + (2.0 * knots[-1],))
    return values[0], jnp.diff(jax.lax.cummax(values)) / np.diff(xs)


def _attention_layer_s(ops: _Ops, model: ModelSpec, f: S.PlanSites):
    """One decoder layer's attention projections at every token knot, ``[K_tok + 1]``: q, k,
    v and output, plus an encoder-decoder layer's cross-attention q and o, norm and add."""
    cross = 0.0
    if model.is_encoder_decoder:
        cross = (
            ops.gemm(f.gemms["cross_q"])
            + ops.gemm(f.gemms["cross_o"])
            + K.norm_time_s(ops.adj, ops.gpu, f.m_res, model.hidden_size)
            + K.add_time_s(ops.adj, ops.gpu, f.m_res, model.hidden_size)
        )
    return ops.gemm(f.gemms["qkv"]) + ops.gemm(f.gemms["out"]) + cross


def _mlp_layer_s(ops: _Ops, model: ModelSpec, f: S.PlanSites):
    """``(mlp, activation)`` of one layer at every token knot, ``[K_tok + 1]`` each: the
    dense MLP's GEMMs, or the fused MoE at its busiest expert-parallel rank's load plus the
    router GEMM (whose activation runs inside the fused kernel: 0)."""
    if model.is_moe:
        return ops.moe(f.moe, model) + ops.gemm(f.gemms["router"]), 0.0
    mlp = ops.gemm(f.gemms["up"]) + ops.gemm(f.gemms["down"])
    activation = K.activation_time_s(ops.adj, ops.gpu, f.m_ffn, f.inter, gated=model.is_gated_mlp)
    return mlp, activation


def _elementwise_layer_s(ops: _Ops, model: ModelSpec, f: S.PlanSites, activation_s):
    """One layer's norms, rotary embedding, activation and residual adds, ``[K_tok + 1]``."""
    gpu, adj, hidden = ops.gpu, ops.adj, model.hidden_size
    return (
        2.0 * K.norm_time_s(adj, gpu, f.m_res, hidden)
        + K.rope_time_s(adj, gpu, f.m_attn, f.heads, f.kv_heads, model.head_dim)
        + activation_s
        + 2.0 * K.add_time_s(adj, gpu, f.m_res, hidden)
    )


def _decoder_collectives_s(ops: _Ops, f: S.PlanSites):
    """``(total [K_tok + 1], fixed_s, s_per_token)`` of the layout's decoder collectives (a
    classic TP plan: two all-reduces per layer) at every token knot, and the affine lower
    bound ``fixed_s + s_per_token * tokens`` the engine's linear terms carry; the curve
    carries the rest. Collectives a plan does not issue have zero calls."""
    total, analytic = 0.0, 0.0
    for (kind, prefill_only), c in zip(ops.kinds.collectives, f.collectives):
        if not prefill_only:
            mixed, model_s = ops.collective(kind, c)
            total = total + c.calls * mixed
            analytic = analytic + c.calls * model_s
    m = S.TOKEN_POINTS
    # The linear part's slope is the smallest marginal cost of the analytic collectives
    # (positive); where a measured table is flatter still, the curve holds its level.
    per_token = jnp.min(jnp.diff(analytic) / np.diff(m))
    return total, total[0] - per_token * m[0], per_token


def _stage_transfers(ops: _Ops, model: ModelSpec, f: S.PlanSites):
    """``(fixed_s, per_token_s)`` of the pipeline's ``pp - 1`` stage transfers together (p2p
    of the hidden states); those that enter a new node cross the network."""
    fixed_s = per_token_s = jnp.zeros(())
    for j, inter_node in enumerate((False, True)):
        zero = K.p2p_time_s(ops.adj, ops.gpu, 0.0, inter_node=inter_node)
        one_token = K.p2p_time_s(ops.adj, ops.gpu, model.hidden_size * 2.0, inter_node=inter_node)
        fixed_s = fixed_s + f.transfers[j] * zero
        per_token_s = per_token_s + f.transfers[j] * (one_token - zero)
    return fixed_s, per_token_s


def _lm_head_s(ops: _Ops, model: ModelSpec, f: S.PlanSites):
    """LM head and sampling at every sampled-sequence knot, ``[K_s + 1]``."""
    gpu, adj, hidden, vocab = ops.gpu, ops.adj, model.hidden_size, model.vocab_size
    site = f.gemms["lm"]
    s = S.SAMPLED_POINTS

    def sampling(compute):
        # The sampling model prices the LM head GEMM too: keep only what it adds.
        precision = {"compute_dtype": compute, "weight_bytes": site.precision.weight_bytes}
        return K.lm_head_sampling_time_s(
            adj, gpu, s, hidden, vocab, tp=f.tp, **precision
        ) - K.gemm_time_s(adj, gpu, s, vocab / f.tp, hidden, act_bytes=2.0, **precision)

    return ops.gemm(site) + ops.by_precision(site.precision, sampling)


def _attention_coeffs(ops: _Ops, model: ModelSpec, f: S.PlanSites):
    """Prefill- and decode-attention constants: each attention replica serves ``1 / attn_dp``
    of the sequences (decode attention: the busiest replica's share of the batch)."""
    layers = float(model.num_layers)
    per_pair, prefill_lat = ops.prefill_per_pair_and_latency(f.prefill, model.head_dim)
    return {
        "prefill_attn_s_per_pair": layers * per_pair / f.attn_dp,
        "prefill_attn_fixed_s": layers * prefill_lat,
        "decode_attn_grid_s": layers * ops.decode_grid(f.decode, model.head_dim),
    }


def _encoder_coeffs(ops: _Ops, model: ModelSpec, f: S.PlanSites) -> dict[str, Any]:
    """Encoder constants of an encoder-decoder plan (empty for a decoder-only one): the
    encoder over ``tp / enc_tp`` replicas, every decoder layer's cross-attention keys and
    values of the prompt, and the encoder's collectives, per prompt token of a prefill."""
    if not model.is_encoder_decoder:
        return {}
    gpu, adj, hidden, enc = ops.gpu, ops.adj, model.hidden_size, f.encoder
    layer = (
        ops.gemm(f.gemms["enc_qkv"])
        + ops.gemm(f.gemms["enc_out"])
        + ops.gemm(f.gemms["enc_up"])
        + ops.gemm(f.gemms["enc_down"])
        + K.activation_time_s(adj, gpu, enc.m_enc, enc.inter, gated=model.is_gated_mlp)
        + 2.0 * K.norm_time_s(adj, gpu, enc.m_enc, hidden)
        + 2.0 * K.add_time_s(adj, gpu, enc.m_enc, hidden)
    )
    total = model.num_encoder_layers * layer + model.num_layers * ops.gemm(f.gemms["cross_kv"])
    total = total + K.embedding_time_s(adj, gpu, S.TOKEN_POINTS, hidden / f.tp)
    for (kind, prefill_only), c in zip(ops.kinds.collectives, f.collectives):
        if prefill_only:
            total = total + c.calls * ops.collective(kind, c)[0]
    per_pair, latency = ops.prefill_per_pair_and_latency(enc.attention, model.head_dim)
    base, slopes = _curve_coeffs(total, TOKEN_KNOTS)
    return {
        "is_encoder_decoder": 1.0,
        "enc_fixed_s": model.num_encoder_layers * latency,
        # Bidirectional: about twice the causal pairs the engine counts.
        "enc_attn_s_per_pair": 2.0 * model.num_encoder_layers * per_pair / enc.enc_dp,
        "enc_curve_base_s": base,
        "enc_curve_slopes_s_per_token": slopes,
    }


def _plan_coeffs(
    f: S.PlanSites,
    kp: K.KernelParams,
    hw: HardwareParams,
    *,
    model: ModelSpec,
    gpu: GpuSpec,
    kinds: S.SiteKinds,
) -> CostCoeffs:
    """Constants of one plan from its call sites: its layers' token-proportional operators
    and collectives over :data:`TOKEN_KNOTS`, the LM head over :data:`SAMPLED_KNOTS`,
    attention, stage transfers and the encoder. Written for one plan; vmapped over plans."""
    ops = _Ops(gpu, kp, _adjust(kp, hw, f.log_clock_scale), kinds)
    m, adj, hidden = S.TOKEN_POINTS, ops.adj, model.hidden_size
    mlp_s, activation_s = _mlp_layer_s(ops, model, f)
    per_layer = (
        _attention_layer_s(ops, model, f)
        + mlp_s
        + _elementwise_layer_s(ops, model, f, activation_s)
    )
    tokens_s = float(model.num_layers) * per_layer + K.embedding_time_s(adj, gpu, m, hidden / f.tp)
    tokens_s = tokens_s + K.norm_time_s(adj, gpu, m, hidden)
    coll_s, comm_fixed, comm_per_token = _decoder_collectives_s(ops, f)
    tokens_s = tokens_s + coll_s - (comm_fixed + comm_per_token * m)
    transfer_fixed, transfer_per_token = _stage_transfers(ops, model, f)
    token_base, token_slopes = _curve_coeffs(tokens_s, TOKEN_KNOTS)
    sampled_base, sampled_slopes = _curve_coeffs(_lm_head_s(ops, model, f), SAMPLED_KNOTS)
    out = {
        **_attention_coeffs(ops, model, f),
        "comm_fixed_s": comm_fixed + transfer_fixed,
        "comm_s_per_token": comm_per_token + transfer_per_token,
        "transfer_fixed_s": transfer_fixed,
        "transfer_s_per_token": transfer_per_token,
        "token_curve_base_s": token_base,
        "token_curve_slopes_s_per_token": token_slopes,
        "sampled_curve_base_s": sampled_base,
        "sampled_curve_slopes_s_per_seq": sampled_slopes,
        **_encoder_coeffs(ops, model, f),
    }
    coeffs = CostCoeffs.zeros()._replace(**out)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), coeffs)


def _price(sites: S.PlanSites, kp, hw, *, model: ModelSpec, gpu: GpuSpec, kinds: S.SiteKinds):
    """:class:`CostCoeffs` ``[U]`` of ``U`` plans' call sites: :func:`_plan_coeffs` vmapped
    over the plans."""
    one_plan = functools.partial(_plan_coeffs, model=model, gpu=gpu, kinds=kinds)
    return jax.vmap(one_plan, in_axes=(0, None, None))(sites, kp, hw)


# Compiled once per model, GPU, site kinds and bucket of U. It runs once per search on small
# arrays, so compiling fast matters more than optimising the code: no LLVM optimisation, and
# XLA's older loop emitters instead of its fusion emitters, which halves the compile (about
# 2.3 -> 1.0 s on the default search's 40 distinct plans; the same values, bit for bit).
# A calibration that compiles the pricing into its own program uses the same options.
PRICING_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_cpu_use_fusion_emitters": False,
}
_priced = jax.jit(
    _price, static_argnames=("model", "gpu", "kinds"), compiler_options=PRICING_COMPILER_OPTIONS
)
# The pricing compiled (or compiling) in the background, by _shapes of its arguments and
# its static ones (see cost_coeffs_ahead).
_PRICING: dict[tuple, concurrent.futures.Future] = {}


# Columns that set a plan's cost; plans equal in these share their constants.
_COST_COLUMNS = (
    "tp",
    "pp",
    "weight_dtype",
    "kv_dtype",
    "attn_tp",
    "mlp_tp",
    "ep",
    "act_dtype",
    "gpu_clock_mhz",
    "enc_tp",
    "disable_custom_all_reduce",
)


def _plan_key(row: np.ndarray, network_transfers: float) -> tuple[int, ...]:
    return (*(int(row[COL[c]]) for c in _COST_COLUMNS), int(network_transfers))


def is_traced(tree) -> bool:
    """Whether any leaf of ``tree`` is being traced (by a caller's jit, grad or jvp)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def cost_coeffs_ahead(
    plans: np.ndarray,
    model: ModelSpec,
    gpu: GpuSpec,
    hw: HardwareParams,
    *,
    gpus_per_node: int,
    kernel_params: K.KernelParams | None = None,
    clock_mhz: float | None = None,
    iteration_overhead_s: ArrayLike = ENGINE_PRESETS[DEFAULT_ENGINE].iteration_overhead_s,
    sampler_sort_s_per_logit: ArrayLike = ENGINE_PRESETS[DEFAULT_ENGINE].sampler_sort_s_per_logit,
    host_s_per_seq: ArrayLike = ENGINE_PRESETS[DEFAULT_ENGINE].host_s_per_seq,
    eager_s_per_layer: ArrayLike = ENGINE_PRESETS[DEFAULT_ENGINE].eager_s_per_layer,
    max_graph_batch: ArrayLike = ENGINE_PRESETS[DEFAULT_ENGINE].max_graph_batch,
) -> Callable[[], CostCoeffs]:
    """Derive the iteration-time constants of every plan, the pricing compiling in the
    background: the call sites are measured and the pricing traced now, and the returned
    function waits for its compile and gives the constants (:func:`cost_coeffs` waits at
    once). Meanwhile the caller's Python runs (XLA releases the GIL while it compiles).

    Plans equal in their cost columns share their constants; the distinct ones are priced
    together, in one jitted function vmapped over them (:func:`_price`), from their call
    sites measured on the host (:func:`apex_jax.cost.sites.plan_sites`). The compiled
    pricing is kept per shape (:data:`_PRICING`).

    Args:
        plans: int32 ``[P, F]`` plan tensor.
        model: the served model.
        gpu: the GPU type.
        hw: engine-level multipliers (scalars, shared by all plans), applied relative to
            :func:`~apex_jax.hardware.default_hardware_params`.
        gpus_per_node: GPUs that share NVLink; larger replicas cross the network.
        kernel_params: per-operator constants (default: the GPU's calibrated fit, see
            :func:`~apex_jax.cost.kernels.load_calibrated`).
        clock_mhz: SM clock for every plan (default: each plan's ``gpu_clock_mhz``, 0
            meaning the GPU's maximum boost clock); compute throughput scales with it,
            memory and links do not.
        iteration_overhead_s: the serving engine's per-iteration overhead, ``[]`` or one per
            plan ``[P]`` (:attr:`~apex_jax.engine_config.EngineConfig.iteration_overhead_s`;
            default: the default engine's), scaled by ``hw.log_iteration_overhead_scale``.
        sampler_sort_s_per_logit: the engine's sampler sorting logits, seconds per sampled
            sequence and vocabulary entry, ``[]`` or ``[P]``
            (:attr:`~apex_jax.engine_config.EngineConfig.sampler_sort_s_per_logit`; default:
            the default engine's); linear in the sampled sequences, so it adds to the sampled
            curve's base and every slope.
        host_s_per_seq: the engine's host seconds per iteration and sampled sequence, ``[]``
            or ``[P]``, scaled like the overhead (the same host runs both).
        eager_s_per_layer: host seconds to launch one layer's kernels without a CUDA graph,
            ``[]`` or ``[P]``, scaled like the overhead; an eager iteration's device part
            takes at least this times the model's layers (encoder layers included).
        max_graph_batch: the largest decode-only batch that replays a CUDA graph, ``[]`` or
            ``[P]`` (see :mod:`apex_jax.engine_config`).

    Returns:
        A function of no arguments that gives the :class:`CostCoeffs` of batch shape ``[P]``
        (slopes ``[P, K]``), float64 seconds.
    """
    plans = np.asarray(plans)
    if len(plans) == 0:
        empty = jax.tree_util.tree_map(jnp.asarray, CostCoeffs.zeros((0,)))
        return lambda: empty
    kp = K.load_calibrated(gpu.name) if kernel_params is None else kernel_params
    distinct, sites, kinds, sources = _distinct_sites(plans, model, gpu, gpus_per_node, clock_mhz)
    _log_sources(model, gpu, dict(zip(distinct.keys, sources)))
    # Padding to a power of two bounds the compiled shapes; padded rows repeat the last plan.
    num = len(distinct.plans)
    pad = max(8, 1 << (num - 1).bit_length()) - num
    padded = jax.tree_util.tree_map(lambda x: np.concatenate([x] + [x[-1:]] * pad), sites)
    host = {
        "iteration_overhead_s": iteration_overhead_s,
        "sampler_sort_s_per_logit": sampler_sort_s_per_logit,
        "host_s_per_seq": host_s_per_seq,
        "eager_s_per_layer": eager_s_per_layer,
        "max_graph_batch": max_graph_batch,
    }
    # Inside a caller's trace (a calibration differentiating through the cost model), the
    # caller's jit compiles the pricing with the rest.
    if is_traced((kp, hw)):
        priced = _price(padded, kp, hw, model=model, gpu=gpu, kinds=kinds)
        coeffs = _with_host_terms(priced, distinct.index, hw, model, jnp, **host)
        return lambda: coeffs
    key = (_shapes((padded, kp, hw)), model, gpu, kinds)
    if key not in _PRICING:
        lowered = _priced.lower(padded, kp, hw, model=model, gpu=gpu, kinds=kinds)
        _PRICING[key] = in_background(lowered.compile, "apex-jax-pricing")
    compiling = _PRICING[key]

    def finish() -> CostCoeffs:
        # The rest is host work: eager JAX would compile every operation for every shape
        # of plans.
        priced, host_hw = jax.device_get((compiling.result()(padded, kp, hw), hw))
        return _with_host_terms(priced, distinct.index, host_hw, model, np, **host)

    return finish


def cost_coeffs(*args, **kwargs) -> CostCoeffs:
    """The constants of :func:`cost_coeffs_ahead` (the same arguments), once priced:
    :class:`CostCoeffs` of batch shape ``[P]`` (slopes ``[P, K]``), float64 seconds."""
    return cost_coeffs_ahead(*args, **kwargs)()


def _shapes(tree) -> tuple:
    """The structure and abstract values (shape, dtype, weak type) of a pytree of arrays:
    what a compiled function of it depends on."""
    leaves, structure = jax.tree_util.tree_flatten(tree)
    return (structure, tuple(jax.typeof(x) for x in leaves))


def _with_host_terms(
    priced: CostCoeffs,
    index: np.ndarray,
    hw: HardwareParams,
    model: ModelSpec,
    xp,
    *,
    iteration_overhead_s,
    sampler_sort_s_per_logit,
    host_s_per_seq,
    eager_s_per_layer,
    max_graph_batch,
) -> CostCoeffs:
    """Every plan's constants (``index``, ``[P]``: its row of the distinct plans' ``priced``)
    with the serving engine's host terms (see :func:`cost_coeffs_ahead`), in ``xp``."""
    coeffs = jax.tree_util.tree_map(lambda x: x[index], priced)
    overhead_s = iteration_overhead_s * xp.exp(hw.log_iteration_overhead_scale)
    # The overhead is the engine's host work: in a pipeline it runs on no stage.
    host_scale = xp.exp(hw.log_iteration_overhead_scale)
    shape = xp.shape(coeffs.host_s)
    num_layers = float(model.num_layers + model.num_encoder_layers)
    # Every GPU sorts the whole vocabulary of each sampled sequence's logits.
    sort_s_per_seq = xp.asarray(sampler_sort_s_per_logit) * float(model.vocab_size)
    return coeffs._replace(
        fixed_s=coeffs.fixed_s + overhead_s,
        host_s=xp.broadcast_to(overhead_s, shape),
        sampled_curve_base_s=coeffs.sampled_curve_base_s + sort_s_per_seq * SAMPLED_KNOTS[0],
        sampled_curve_slopes_s_per_seq=coeffs.sampled_curve_slopes_s_per_seq
        + xp.asarray(sort_s_per_seq)[..., None],
        host_s_per_seq=xp.broadcast_to(host_s_per_seq * host_scale, shape),
        eager_floor_s=xp.broadcast_to(eager_s_per_layer * num_layers * host_scale, shape),
        max_graph_batch=xp.broadcast_to(xp.asarray(max_graph_batch, xp.float64), shape),
    )


def cost_sources(
    plans: np.ndarray,
    model: ModelSpec,
    gpu: GpuSpec,
    *,
    gpus_per_node: int,
) -> list[dict[str, str]]:
    """Per plan and operator, where its time comes from: ``"table"``, ``"model"`` or
    ``"model+table"`` (some shapes covered by the measured table, others not)."""
    distinct, _, _, sources = _distinct_sites(np.asarray(plans), model, gpu, gpus_per_node, None)
    return [sources[j] for j in distinct.index]


class _Distinct(NamedTuple):
    """The plans that differ in what they cost, and where each plan finds its own."""

    keys: list[tuple[int, ...]]  # [U] the cost key of each distinct plan
    plans: np.ndarray  # [U, F] one plan per distinct cost key
    network_transfers: np.ndarray  # [U] stage transfers that cross nodes
    clock_mhz: np.ndarray  # [U] SM clock
    index: np.ndarray  # [P] int, the distinct plan of each plan


def _distinct_sites(plans, model: ModelSpec, gpu: GpuSpec, gpus_per_node: int, clock_mhz):
    """``(distinct plans, their sites, site kinds, sources)`` (see :func:`apex_jax.cost.sites.plan_sites`)."""
    distinct = _distinct_plans(plans, gpu, gpus_per_node, clock_mhz)
    sites, kinds, sources = S.plan_sites(
        distinct.plans,
        model,
        gpu,
        network_transfers=distinct.network_transfers,
        clock_mhz=distinct.clock_mhz,
        gpus_per_node=gpus_per_node,
    )
    return distinct, sites, kinds, sources


def _distinct_plans(plans, gpu: GpuSpec, gpus_per_node: int, clock_mhz) -> _Distinct:
    crossing = PC.cross_node_transfers(plans, gpus_per_node)
    keys = [_plan_key(row, x) for row, x in zip(plans, crossing)]
    first: dict[tuple, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    position = {k: j for j, k in enumerate(first)}
    index = np.asarray([position[k] for k in keys], np.int64)
    rows = np.asarray(list(first.values()), np.int64)
    # The plan's SM clock (0: the boost clock), unless clock_mhz overrides every plan's.
    clocks = [float(clock_mhz or plans[i, COL["gpu_clock_mhz"]] or gpu.max_clock_mhz) for i in rows]
    return _Distinct(list(first), plans[rows], crossing[rows], np.asarray(clocks), index)


@functools.lru_cache(maxsize=256)
def _logged(message: str) -> None:
    log.info(message)


def _log_sources(model, gpu, sources_by_key) -> None:
    for key, sources in sources_by_key.items():
        tp, pp, wd, kvd = key[:4]
        layout = ", ".join(f"{c} {v}" for c, v in zip(_COST_COLUMNS[4:], key[4:]))
        text = ", ".join(f"{op}: {src}" for op, src in sources.items())
        _logged(
            f"cost model {model.name} on {gpu.name} tp{tp} pp{pp} W {DTYPES[wd]} "
            f"KV {DTYPES[kvd]} ({layout}): {text}"
        )
