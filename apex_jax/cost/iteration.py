"""Per-iteration time of one serving iteration, from measured kernels and calibrated models.

An iteration is described by four aggregate features of its batch:

- ``num_tokens``: tokens pushed through the GEMMs (prompt tokens being prefilled plus one per
  decoding sequence);
- ``num_sampled``: sequences that produce a token (they pay the LM head and sampling);
- ``prefill_pairs``: query-key pairs of causal prefill attention, ``sum L (L + 1) / 2``;
- ``decode_kv_tokens``: KV entries read by decode attention, the sum of the decoding
  sequences' lengths.

The time is ``base(num_tokens, num_sampled, prefill_pairs) + slope * decode_kv_tokens``:
decode attention is linear in the KV it reads for a fixed batch. That split is what lets the
engine advance a run of identical decode iterations in closed form.

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

The constants of a plan form a :class:`CostCoeffs` pytree of arrays: scalars per plan and
one slope vector per curve, so batches of plans stack and index with ``jax.tree_util``.

Pipeline stages run one after another in this version: the iteration pays every stage and
the stage transfers.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from apex_jax.cost import kernels as K
from apex_jax.cost import parallel as PC
from apex_jax.cost import tables as ct
from apex_jax.dtypes import DTYPES
from apex_jax.engine_config import DEFAULT_ENGINE, ENGINE_PRESETS
from apex_jax.hardware import GpuSpec, HardwareParams, default_hardware_params
from apex_jax.memory import CellLayout, cell_layout
from apex_jax.model_spec import ModelSpec
from apex_jax.plans import COL

__all__ = [
    "SAMPLED_KNOTS",
    "TOKEN_KNOTS",
    "CostCoeffs",
    "cost_coeffs",
    "cost_sources",
    "decode_time_parts_s",
    "iteration_time_s",
]

log = logging.getLogger(__name__)

# Knots (in tokens) of the piecewise-linear curves; beyond the last knot the last slope goes on.
TOKEN_KNOTS: tuple[float, ...] = tuple(float(2**i) for i in range(15))  # 1 ... 16384
SAMPLED_KNOTS: tuple[float, ...] = (1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0)


class CostCoeffs(NamedTuple):
    """Constants of the iteration-time model of a batch ``B`` of plans (``B = ()`` for one
    plan), float64 seconds; a pytree of arrays, so batches stack and index with
    ``jax.tree_util.tree_map`` and the engine vmaps over them.

    ``token_curve_*`` is a monotone piecewise-linear function of ``num_tokens`` with knots
    :data:`TOKEN_KNOTS`: ``base`` at the first knot, then one slope per segment starting at
    each knot, the last slope going on beyond the last knot (``K_tok = len(TOKEN_KNOTS)``);
    ``sampled_curve_*`` is the same over ``num_sampled`` with :data:`SAMPLED_KNOTS`
    (``K_s``), ``enc_curve_*`` over an encoder-decoder prefill's prompt tokens.

    The first ten fields are a plain roofline, for hand-written constants; the measured-kernel
    model of :func:`cost_coeffs` leaves its GEMM and LM-head terms at zero and prices those
    operators in the curves. Build with :meth:`zeros` and ``_replace``.
    """

    fixed_s: ArrayLike  # [*B] engine overhead and decode-attention kernel latencies
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
    decode_attn_s_per_seq: ArrayLike  # [*B] decode attention per sampled sequence
    token_curve_base_s: ArrayLike  # [*B] token curve at TOKEN_KNOTS[0]
    token_curve_slopes_s_per_token: ArrayLike  # [*B, K_tok] token curve's slopes
    sampled_curve_base_s: ArrayLike  # [*B] sampled curve at SAMPLED_KNOTS[0]
    sampled_curve_slopes_s_per_seq: ArrayLike  # [*B, K_s] sampled curve's slopes
    is_encoder_decoder: ArrayLike  # [*B] 1.0 for an encoder-decoder model, else 0.0
    enc_fixed_s: ArrayLike  # [*B] encoder attention kernel latencies
    enc_attn_s_per_pair: ArrayLike  # [*B] bidirectional encoder attention, per causal pair
    enc_curve_base_s: ArrayLike  # [*B] encoder curve at TOKEN_KNOTS[0]
    enc_curve_slopes_s_per_token: ArrayLike  # [*B, K_tok] encoder curve's slopes

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
_SLOPE_LENGTHS: dict[str, tuple[int]] = {
    "token_curve_slopes_s_per_token": (len(TOKEN_KNOTS),),
    "sampled_curve_slopes_s_per_seq": (len(SAMPLED_KNOTS),),
    "enc_curve_slopes_s_per_token": (len(TOKEN_KNOTS),),
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


def decode_time_parts_s(c: CostCoeffs, num_tokens, num_sampled, prefill_pairs, xp=jnp):
    """Split an iteration's time into ``(base_s, slope_s_per_kv_token)``.

    ``iteration_time_s = base_s + slope_s_per_kv_token * decode_kv_tokens``. ``xp`` is the
    array namespace, ``jax.numpy`` in the engine and ``numpy`` in the reference, so both
    evaluate one formula. The features broadcast against the plans' batch shape.

    For an encoder-decoder model (``c.is_encoder_decoder == 1``, no chunked prefill) an
    iteration with prefill pairs is a prefill iteration: its ``num_tokens`` prompt tokens go
    through the encoder and its ``num_sampled`` first tokens through the decoder; a decode
    iteration is decoder only (see :mod:`apex_jax.cost.parallel`).
    """
    # 1.0 in an encoder-decoder prefill iteration, else 0.0 (decoder-only models: always 0).
    enc = c.is_encoder_decoder * xp.where(prefill_pairs > 0, 1.0, 0.0)
    prompt_tokens = num_tokens
    num_tokens = num_tokens + enc * (num_sampled - num_tokens)  # tokens through the decoder
    gemm = xp.maximum(
        num_tokens * c.gemm_compute_s_per_token,
        c.gemm_weight_s + num_tokens * c.gemm_act_s_per_token,
    )
    lm_head = xp.maximum(num_sampled * c.lm_head_compute_s_per_token, c.lm_head_weight_s)
    tokens_part = _curve(
        c.token_curve_base_s, c.token_curve_slopes_s_per_token, TOKEN_KNOTS, num_tokens, xp
    )
    sampled_part = _curve(
        c.sampled_curve_base_s, c.sampled_curve_slopes_s_per_seq, SAMPLED_KNOTS, num_sampled, xp
    )
    base = (
        c.fixed_s
        + gemm
        + lm_head
        + tokens_part
        + sampled_part
        + num_sampled * c.decode_attn_s_per_seq
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
    return base + enc * encoder, c.decode_attn_s_per_kv_token


def iteration_time_s(
    c: CostCoeffs, num_tokens, num_sampled, prefill_pairs, decode_kv_tokens, xp=jnp
):
    """Wall time of one iteration in seconds (see the module docstring for the features)."""
    base, slope = decode_time_parts_s(c, num_tokens, num_sampled, prefill_pairs, xp=xp)
    return base + slope * decode_kv_tokens


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


def _grid(kind: str, gpu_name: str, which) -> ct.Grid:
    if kind == "gemm":
        return ct.gemm_grids(gpu_name)[which]
    if kind == "moe":
        return ct.moe_grids(gpu_name)[which]
    return ct.collective_grids(gpu_name)[which]


def _lookup(key: tuple, x, *rest) -> tuple[np.ndarray, np.ndarray]:
    """``(covered, seconds)`` of a table at points ``(x, *rest)``, as NumPy (cached)."""
    return _lookup_cached(key, tuple(np.asarray(x, np.float64).tolist()), rest)


@functools.lru_cache(maxsize=4096)
def _lookup_cached(key: tuple, x: tuple, rest: tuple) -> tuple[np.ndarray, np.ndarray]:
    # The table and the points are constants: evaluate now even while a caller is being
    # traced (a calibration differentiating through the simulator), not as traced ops.
    with jax.ensure_compile_time_eval():
        grid = _grid(*key)
        coords = [np.asarray(x)] + [np.full(len(x), r) for r in rest]
        return ct.grid_covers(grid, *coords), np.asarray(ct.interp_grid(grid, *coords))


class _Ops:
    """Operator times of one GPU: table where covered, calibrated model otherwise, both scaled
    by the HardwareParams' offsets. Records which source each lookup used."""

    def __init__(self, gpu: GpuSpec, kp: K.KernelParams, adj: K.KernelParams):
        self.gpu, self.kp, self.adj = gpu, kp, adj
        self.sources: dict[str, set[str]] = collections.defaultdict(set)

    def _mix(self, what, covered, table_s, model_cal, model_adj):
        covered = np.asarray(covered, bool)
        if covered.any():
            self.sources[what].add("table")
        if not covered.all():
            self.sources[what].add("model")
        table_s = jnp.where(covered, jnp.asarray(table_s), 1.0)
        return jnp.where(covered, table_s * model_adj / model_cal, model_adj)

    def gemm(self, m, n, k, weight_dtype: str):
        compute, wb, ab = K.gemm_precision(weight_dtype, self.gpu)
        args = {"compute_dtype": compute, "weight_bytes": wb, "act_bytes": ab}
        adj = K.gemm_time_s(self.adj, self.gpu, m, n, k, **args)
        grids = ct.gemm_grids(self.gpu.name)
        # A table measures what is stored; weight-only quantisation has no table.
        table_dtype = {"bf16": "bf16", "fp16": "fp16", "fp8": "fp8"}.get(weight_dtype)
        if table_dtype == "fp16" and "fp16" not in grids:
            table_dtype = "bf16"
        if table_dtype == "bf16" and "bf16" not in grids and "fp16" in grids:
            table_dtype = "fp16"
        grid = grids.get(table_dtype) if compute in ("bf16", "fp16", "fp8") else None
        if grid is None:
            self.sources["gemm"].add("model")
            return adj
        cal = K.gemm_time_s(self.kp, self.gpu, m, n, k, **args)
        covered, table = _lookup(("gemm", self.gpu.name, table_dtype), m, float(n), float(k))
        return self._mix("gemm", covered, table, cal, adj)

    def moe(self, tokens, model: ModelSpec, tp: int, weight_dtype: str, ep: int = 1):
        compute, wb, _ = K.gemm_precision(weight_dtype, self.gpu)
        args = {
            "tp": tp,
            "ep": ep,
            "compute_dtype": compute,
            "weight_bytes": wb,
            "gated": model.is_gated_mlp,
        }
        shape = (
            model.hidden_size,
            model.intermediate_size,
            model.num_experts_per_tok,
            model.num_experts,
        )
        adj = K.moe_time_s(self.adj, self.gpu, tokens, *shape, **args)
        name = {"bf16": "bf16", "fp16": "bf16", "fp8": "fp8", "int4": "int4"}.get(weight_dtype)
        key = ("moe", self.gpu.name, (name, *shape, tp, ep))
        if key[2] not in ct.moe_grids(self.gpu.name):
            self.sources["moe"].add("model")
            return adj
        cal = K.moe_time_s(self.kp, self.gpu, tokens, *shape, **args)
        return self._mix("moe", *_lookup(key, tokens), cal, adj)

    def collective(self, op: str, message_bytes, num_gpus: int):
        """One collective (``all_reduce``, ``all_gather``, ``reduce_scatter``, ``alltoall``)
        over ``num_gpus`` GPUs of one node; ``message_bytes`` as nccl-tests counts it."""
        adj = K.collective_time_s(self.adj, self.gpu, op, message_bytes, num_gpus)
        key = (op, self.gpu.name, (op, num_gpus))
        if key[2] not in ct.collective_grids(self.gpu.name):
            self.sources[op].add("model")
            return adj
        cal = K.collective_time_s(self.kp, self.gpu, op, message_bytes, num_gpus)
        return self._mix(op, *_lookup(key, message_bytes), cal, adj)

    def prefill_per_pair_and_latency(self, heads, kv_heads, head_dim, kv_dtype: str):
        """``(seconds per query-key pair, kernel latency)`` of one layer's prefill attention:
        the mean of ``(t - latency) / pairs`` over prompts of 1K-8K tokens, batch 1."""
        _, kv_bytes = K.attention_precision(kv_dtype, self.gpu)
        lengths = np.array([1024.0, 2048.0, 4096.0, 8192.0])
        pairs = lengths * (lengths + 1.0) / 2.0

        def model(p):
            t = K.prefill_attention_time_s(
                p, self.gpu, 1.0, lengths, heads, kv_heads, head_dim, kv_bytes=kv_bytes
            )
            return t, jnp.exp(p.log_prefill_latency_s)

        adj_t, adj_lat = model(self.adj)
        table = ct.attention_slices(self.gpu.name, "context").get(
            (int(heads), int(kv_heads), int(head_dim), kv_dtype)
        )
        measured = None
        if table is not None:
            rows = (table["batch"] == 1) & np.isin(table["isl"], lengths)
            if rows.sum() == len(lengths):
                order = np.argsort(table["isl"][rows])
                measured = table["time_s"][rows][order]
        if measured is None:
            self.sources["prefill_attention"].add("model")
            return jnp.mean((adj_t - adj_lat) / pairs), adj_lat
        self.sources["prefill_attention"].add("table")
        cal_t, _cal_lat = model(self.kp)
        scaled = measured * adj_t / cal_t
        lat = jnp.minimum(adj_lat, 0.5 * scaled[0])
        return jnp.mean((scaled - lat) / pairs), lat

    def decode_parts(self, heads, kv_heads, head_dim, kv_dtype: str):
        """``(latency, per sequence, per KV token)`` of one layer's decode attention.

        From the table: a least-squares fit of ``a + b * batch + c * kv_tokens`` to the
        measured head configuration (relative error, batches up to 512); from the model: its
        own affine parts at a batch of 64 sequences."""
        _, kv_bytes = K.attention_precision(kv_dtype, self.gpu)

        def model(p, batch):
            fixed, per_token = K.decode_attention_parts_s(
                p, self.gpu, batch, heads, kv_heads, head_dim, kv_bytes=kv_bytes
            )
            lat = jnp.exp(p.log_decode_latency_s)
            return lat, (fixed - lat) / batch, per_token

        adj = model(self.adj, 64.0)
        table = ct.attention_slices(self.gpu.name, "generation").get(
            (int(heads), int(kv_heads), int(head_dim), kv_dtype)
        )
        if table is None or len(table["time_s"]) < 12:
            self.sources["decode_attention"].add("model")
            return adj
        rows = table["batch"] <= 512
        b, kv = table["batch"][rows], table["batch"][rows] * table["kv_len"][rows]
        t = table["time_s"][rows]
        design = np.stack([np.ones_like(b), b, kv], axis=1) / t[:, None]
        coef = np.linalg.lstsq(design, np.ones_like(t), rcond=None)[0]
        coef = np.maximum(coef, [1e-7, 0.0, 1e-15])
        self.sources["decode_attention"].add("table")
        cal = model(self.kp, 64.0)
        return tuple(c * a / k for c, a, k in zip(coef, adj, cal))


def _curve_coeffs(values, knots: tuple[float, ...]) -> tuple[Any, jax.Array]:
    """``(base, slopes [K])`` of the monotone piecewise-linear curve through ``values``
    (``[K + 1]``) at ``knots`` and twice the last knot; negative slopes clamp to zero."""
    xs = np.asarray(knots + (2.0 * knots[-1],))
    return values[0], jnp.maximum(jnp.diff(values) / np.diff(xs), 0.0)


def _gemm_weight_dtype(weight: str, act: str) -> str:
    """The weight dtype whose GEMM cost a ``weight`` x ``act`` plan pays: fp8 weights with
    16-bit activations run weight-only (W8A16), which costs as 8-bit weight-only (int8)."""
    return "int8" if weight == "fp8" and act in ("bf16", "fp16") else weight


class _PlanShape(NamedTuple):
    """Per-GPU shapes of one plan, from its cell layout (:mod:`apex_jax.cost.parallel`): an
    attention GPU computes ``1 / attn_dp`` of the tokens with ``1 / attn_tp`` of the heads,
    an FFN GPU ``1 / mlp_dp`` of the tokens. Static Python numbers and NumPy knots."""

    row: np.ndarray  # [F] the plan
    cells: CellLayout  # fields [1]
    tp: int  # GPUs per pipeline stage
    pp: int  # pipeline stages
    attn_dp: float  # attention replicas per stage
    mlp_tp: int  # GPUs per FFN replica
    mlp_dp: float  # FFN replicas per stage
    weight_dtype: str  # the weight dtype whose GEMM cost the plan pays
    kv_dtype: str
    heads: float  # query heads per attention GPU
    kv_heads: float  # KV heads per attention GPU
    m: np.ndarray  # [K_tok + 1] replica batch tokens: TOKEN_KNOTS, then twice the last
    m_attn: np.ndarray  # [K_tok + 1] tokens one attention GPU handles
    m_ffn: np.ndarray  # [K_tok + 1] tokens one FFN GPU handles
    m_res: np.ndarray  # [K_tok + 1] residual-stream tokens one GPU holds


def _plan_shape(model: ModelSpec, row: np.ndarray) -> _PlanShape:
    cells = cell_layout(row[None, :], model)
    attn_dp, mlp_dp = float(cells.attn_dp[0]), float(cells.mlp_dp[0])
    m = np.asarray(TOKEN_KNOTS + (2.0 * TOKEN_KNOTS[-1],))
    m_attn, m_ffn = m / attn_dp, m / mlp_dp
    return _PlanShape(
        row=row,
        cells=cells,
        tp=int(row[COL["tp"]]),
        pp=int(row[COL["pp"]]),
        attn_dp=attn_dp,
        mlp_tp=int(cells.mlp_tp[0]),
        mlp_dp=mlp_dp,
        weight_dtype=_gemm_weight_dtype(
            DTYPES[int(row[COL["weight_dtype"]])], DTYPES[int(row[COL["act_dtype"]])]
        ),
        kv_dtype=DTYPES[int(row[COL["kv_dtype"]])],
        heads=model.num_heads / int(cells.attn_tp[0]),
        kv_heads=float(cells.kv_heads_per_gpu[0]),
        m=m,
        m_attn=m_attn,
        m_ffn=m_ffn,
        m_res=np.maximum(m_attn, m_ffn),
    )


def _attention_layer_s(ops: _Ops, model: ModelSpec, sh: _PlanShape):
    """One decoder layer's attention projections at every token knot, ``[K_tok + 1]``: q, k,
    v and output, plus an encoder-decoder layer's cross-attention q and o, norm and add."""
    gpu, adj, hidden, d = ops.gpu, ops.adj, model.hidden_size, model.head_dim
    qkv = ops.gemm(sh.m_attn, (sh.heads + 2.0 * sh.kv_heads) * d, hidden, sh.weight_dtype)
    out_proj = ops.gemm(sh.m_attn, hidden, sh.heads * d, sh.weight_dtype)
    cross = 0.0
    if model.is_encoder_decoder:
        cross = (
            ops.gemm(sh.m_attn, sh.heads * d, hidden, sh.weight_dtype)
            + ops.gemm(sh.m_attn, hidden, sh.heads * d, sh.weight_dtype)
            + K.norm_time_s(adj, gpu, sh.m_res, hidden)
            + K.add_time_s(adj, gpu, sh.m_res, hidden)
        )
    return qkv + out_proj + cross


def _mlp_layer_s(ops: _Ops, model: ModelSpec, sh: _PlanShape):
    """``(mlp, activation)`` of one layer at every token knot, ``[K_tok + 1]`` each: the
    dense MLP's GEMMs, or the fused MoE at its busiest expert-parallel rank's load plus the
    router GEMM (whose activation runs inside the fused kernel: 0)."""
    hidden = model.hidden_size
    if model.is_moe:
        load = float(PC.moe_load_factor(model, sh.cells.ep)[0])
        ep, expert_tp = int(sh.cells.ep[0]), int(sh.cells.expert_tp[0])
        mlp = ops.moe(sh.m_ffn * load, model, expert_tp, sh.weight_dtype, ep=ep)
        return mlp + ops.gemm(sh.m_ffn, model.num_experts, hidden, "bf16"), 0.0
    inter = model.intermediate_size / sh.mlp_tp
    up_width = (2.0 if model.is_gated_mlp else 1.0) * inter
    mlp = ops.gemm(sh.m_ffn, up_width, hidden, sh.weight_dtype)
    mlp = mlp + ops.gemm(sh.m_ffn, hidden, inter, sh.weight_dtype)
    return mlp, K.activation_time_s(ops.adj, ops.gpu, sh.m_ffn, inter, gated=model.is_gated_mlp)


def _elementwise_layer_s(ops: _Ops, model: ModelSpec, sh: _PlanShape, activation_s):
    """One layer's norms, rotary embedding, activation and residual adds, ``[K_tok + 1]``."""
    gpu, adj, hidden = ops.gpu, ops.adj, model.hidden_size
    ops.sources["elementwise"].add("model")
    return (
        2.0 * K.norm_time_s(adj, gpu, sh.m_res, hidden)
        + K.rope_time_s(adj, gpu, sh.m_attn, sh.heads, sh.kv_heads, model.head_dim)
        + activation_s
        + 2.0 * K.add_time_s(adj, gpu, sh.m_res, hidden)
    )


def _decoder_collectives_s(ops: _Ops, sh: _PlanShape, collectives: list[PC.Collective]):
    """``(total [K_tok + 1], fixed_s, s_per_token)`` of the layout's decoder collectives (a
    classic TP plan: two all-reduces per layer) at every token knot, and the affine lower
    bound ``fixed_s + s_per_token * tokens`` the engine's linear terms carry; the curve
    carries the rest."""
    decoder = [c for c in collectives if not c.prefill_only]
    if not decoder:
        return 0.0, jnp.zeros(()), jnp.zeros(())
    m = sh.m
    total = sum(
        c.calls[0] * ops.collective(c.kind, m * c.message_bytes_per_token[0], int(c.group[0]))
        for c in decoder
    )
    # The linear part's slope is the smallest marginal cost of the analytic collectives
    # (positive); where a measured table is flatter still, the curve's slope clamps at 0.
    analytic = sum(
        c.calls[0]
        * K.collective_time_s(
            ops.adj, ops.gpu, c.kind, m * c.message_bytes_per_token[0], int(c.group[0])
        )
        for c in decoder
    )
    per_token = jnp.min(jnp.diff(analytic) / np.diff(m))
    return total, total[0] - per_token * m[0], per_token


def _add_stage_transfers(
    ops: _Ops, model: ModelSpec, sh: _PlanShape, network_transfers: int, fixed_s, per_token_s
):
    """``(fixed_s, per_token_s)`` plus the pipeline's stage transfers (p2p of the hidden
    states); those that enter a new node cross the network."""
    for count, inter_node in ((sh.pp - 1 - network_transfers, False), (network_transfers, True)):
        if count > 0:
            zero = K.p2p_time_s(ops.adj, ops.gpu, 0.0, inter_node=inter_node)
            one_token = K.p2p_time_s(
                ops.adj, ops.gpu, model.hidden_size * 2.0, inter_node=inter_node
            )
            fixed_s = fixed_s + count * zero
            per_token_s = per_token_s + count * (one_token - zero)
            ops.sources["p2p"].add("model")
    return fixed_s, per_token_s


def _lm_head_s(ops: _Ops, model: ModelSpec, sh: _PlanShape):
    """LM head and sampling at every sampled-sequence knot, ``[K_s + 1]``."""
    gpu, adj, hidden = ops.gpu, ops.adj, model.hidden_size
    s = np.asarray(SAMPLED_KNOTS + (2.0 * SAMPLED_KNOTS[-1],))
    vocab = model.vocab_size
    compute, weight_bytes, _ = K.gemm_precision(sh.weight_dtype, gpu)
    precision = {"compute_dtype": compute, "weight_bytes": weight_bytes}
    lm = ops.gemm(s, vocab / sh.tp, hidden, sh.weight_dtype)
    # The sampling model prices the LM head GEMM too: keep only what it adds.
    sampling = K.lm_head_sampling_time_s(
        adj, gpu, s, hidden, vocab, tp=sh.tp, **precision
    ) - K.gemm_time_s(adj, gpu, s, vocab / sh.tp, hidden, act_bytes=2.0, **precision)
    return lm + sampling


def _attention_coeffs(ops: _Ops, model: ModelSpec, sh: _PlanShape):
    """Prefill- and decode-attention constants (the fixed part: decode-attention latencies):
    each attention replica serves ``1 / attn_dp`` of the sequences."""
    layers = float(model.num_layers)
    d = model.head_dim
    per_pair, prefill_lat = ops.prefill_per_pair_and_latency(sh.heads, sh.kv_heads, d, sh.kv_dtype)
    dec_lat, dec_seq, dec_tok = ops.decode_parts(sh.heads, sh.kv_heads, d, sh.kv_dtype)
    return {
        "fixed_s": layers * dec_lat,
        "prefill_attn_s_per_pair": layers * per_pair / sh.attn_dp,
        "prefill_attn_fixed_s": layers * prefill_lat,
        "decode_attn_s_per_kv_token": layers * dec_tok / sh.attn_dp,
        "decode_attn_s_per_seq": layers * dec_seq / sh.attn_dp,
    }


def _plan_coeffs(
    ops: _Ops, model: ModelSpec, row: np.ndarray, network_transfers: int
) -> dict[str, Any]:
    """Constants of one plan, by :class:`CostCoeffs` field: its layers' token-proportional
    operators and collectives over :data:`TOKEN_KNOTS`, the LM head over
    :data:`SAMPLED_KNOTS`, attention, stage transfers and the encoder."""
    gpu, adj, hidden = ops.gpu, ops.adj, model.hidden_size
    sh = _plan_shape(model, row)
    mlp_s, activation_s = _mlp_layer_s(ops, model, sh)
    per_layer = (
        _attention_layer_s(ops, model, sh)
        + mlp_s
        + _elementwise_layer_s(ops, model, sh, activation_s)
    )
    tokens_s = float(model.num_layers) * per_layer + K.embedding_time_s(
        adj, gpu, sh.m, hidden / sh.tp
    )
    tokens_s = tokens_s + K.norm_time_s(adj, gpu, sh.m, hidden)
    collectives = [c for c in PC.layout_collectives(row[None, :], model) if c.calls[0] > 0]
    coll_s, comm_fixed, comm_per_token = _decoder_collectives_s(ops, sh, collectives)
    tokens_s = tokens_s + coll_s - (comm_fixed + comm_per_token * sh.m)
    comm_fixed, comm_per_token = _add_stage_transfers(
        ops, model, sh, network_transfers, comm_fixed, comm_per_token
    )
    token_base, token_slopes = _curve_coeffs(tokens_s, TOKEN_KNOTS)
    sampled_base, sampled_slopes = _curve_coeffs(_lm_head_s(ops, model, sh), SAMPLED_KNOTS)
    return {
        **_attention_coeffs(ops, model, sh),
        "comm_fixed_s": comm_fixed,
        "comm_s_per_token": comm_per_token,
        "token_curve_base_s": token_base,
        "token_curve_slopes_s_per_token": token_slopes,
        "sampled_curve_base_s": sampled_base,
        "sampled_curve_slopes_s_per_seq": sampled_slopes,
        **_encoder_coeffs(ops, model, sh, collectives),
    }


def _encoder_coeffs(
    ops: _Ops, model: ModelSpec, sh: _PlanShape, collectives: list[PC.Collective]
) -> dict[str, Any]:
    """Encoder constants of an encoder-decoder plan (empty for a decoder-only one): the
    encoder over ``tp / enc_tp`` replicas, every decoder layer's cross-attention keys and
    values of the prompt, and the encoder's collectives, per prompt token of a prefill."""
    if not model.is_encoder_decoder:
        return {}
    gpu, adj, wd = ops.gpu, ops.adj, sh.weight_dtype
    enc_tp, enc_dp = int(sh.cells.enc_tp[0]), float(sh.cells.enc_dp[0])
    hidden, d = model.hidden_size, model.head_dim
    heads = model.num_heads / enc_tp
    inter = model.intermediate_size / enc_tp
    m_enc = sh.m / enc_dp
    up_width = (2.0 if model.is_gated_mlp else 1.0) * inter
    layer = (
        ops.gemm(m_enc, 3.0 * heads * d, hidden, wd)
        + ops.gemm(m_enc, hidden, heads * d, wd)
        + ops.gemm(m_enc, up_width, hidden, wd)
        + ops.gemm(m_enc, hidden, inter, wd)
        + K.activation_time_s(adj, gpu, m_enc, inter, gated=model.is_gated_mlp)
        + 2.0 * K.norm_time_s(adj, gpu, m_enc, hidden)
        + 2.0 * K.add_time_s(adj, gpu, m_enc, hidden)
    )
    cross_kv = ops.gemm(sh.m_attn, 2.0 * sh.kv_heads * d, hidden, wd)
    total = model.num_encoder_layers * layer + model.num_layers * cross_kv
    total = total + K.embedding_time_s(adj, gpu, sh.m, hidden / sh.tp)
    for c in collectives:
        if c.prefill_only:
            message = sh.m * c.message_bytes_per_token[0]
            total = total + c.calls[0] * ops.collective(c.kind, message, int(c.group[0]))
    # The encoder keeps no KV cache: its attention reads bf16 keys and values.
    per_pair, latency = ops.prefill_per_pair_and_latency(heads, heads, d, "bf16")
    base, slopes = _curve_coeffs(total, TOKEN_KNOTS)
    return {
        "is_encoder_decoder": 1.0,
        "enc_fixed_s": model.num_encoder_layers * latency,
        # Bidirectional: about twice the causal pairs the engine counts.
        "enc_attn_s_per_pair": 2.0 * model.num_encoder_layers * per_pair / enc_dp,
        "enc_curve_base_s": base,
        "enc_curve_slopes_s_per_token": slopes,
    }


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
)


def _plan_key(row: np.ndarray, network_transfers: float) -> tuple[int, ...]:
    return (*(int(row[COL[c]]) for c in _COST_COLUMNS), int(network_transfers))


def cost_coeffs(
    plans: np.ndarray,
    model: ModelSpec,
    gpu: GpuSpec,
    hw: HardwareParams,
    *,
    gpus_per_node: int,
    kernel_params: K.KernelParams | None = None,
    clock_mhz: float | None = None,
    iteration_overhead_s: ArrayLike = ENGINE_PRESETS[DEFAULT_ENGINE].iteration_overhead_s,
) -> CostCoeffs:
    """Derive the iteration-time constants of every plan.

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

    Returns:
        :class:`CostCoeffs` of batch shape ``[P]`` (slopes ``[P, K]``), float64 seconds.
    """
    plans = np.asarray(plans)
    coeffs, _ = _coeffs_and_sources(plans, model, gpu, hw, gpus_per_node, kernel_params, clock_mhz)
    overhead_s = iteration_overhead_s * jnp.exp(hw.log_iteration_overhead_scale)
    return coeffs._replace(fixed_s=coeffs.fixed_s + overhead_s)


def cost_sources(
    plans: np.ndarray,
    model: ModelSpec,
    gpu: GpuSpec,
    *,
    gpus_per_node: int,
) -> list[dict[str, str]]:
    """Per plan and operator, where its time comes from: ``"table"``, ``"model"`` or
    ``"table+model"`` (some shapes covered by the measured table, others not)."""
    _, sources = _coeffs_and_sources(
        np.asarray(plans), model, gpu, default_hardware_params(), gpus_per_node, None, None
    )
    return sources


def _key_coeffs(kp, hw, log_clock_scale, *, gpu, model, row, network_transfers):
    """``(constants, sources)`` of every plan sharing ``row``'s cost columns. Eager JAX (a
    jit would recompile per key); table lookups are cached."""
    ops = _Ops(gpu, kp, _adjust(kp, hw, log_clock_scale))
    out = _plan_coeffs(ops, model, row, network_transfers)
    sources = {op: "+".join(sorted(s)) for op, s in sorted(ops.sources.items())}
    coeffs = CostCoeffs.zeros()._replace(**out)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), coeffs), sources


def _coeffs_and_sources(plans, model, gpu, hw, gpus_per_node, kernel_params, clock_mhz):
    kp = K.load_calibrated(gpu.name) if kernel_params is None else kernel_params
    crossing = PC.cross_node_transfers(plans, gpus_per_node)
    keys = [_plan_key(row, x) for row, x in zip(plans, crossing)]
    unique = list(dict.fromkeys(keys))
    first = {k: i for i, k in reversed(list(enumerate(keys)))}
    per_key, sources_by_key = [], {}
    for k in unique:
        row = plans[first[k]]
        # The plan's SM clock (0: the boost clock), unless clock_mhz overrides every plan's.
        clock = float(clock_mhz or row[COL["gpu_clock_mhz"]] or gpu.max_clock_mhz)
        values, sources = _key_coeffs(
            kp,
            hw,
            math.log(clock / gpu.max_clock_mhz),
            gpu=gpu,
            model=model,
            row=row,
            network_transfers=int(crossing[first[k]]),
        )
        per_key.append(values)
        sources_by_key[k] = sources
    position = {k: j for j, k in enumerate(unique)}
    index = np.asarray([position[k] for k in keys], np.int64)
    if per_key:
        coeffs = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs)[index], *per_key)
    else:
        coeffs = jax.tree_util.tree_map(jnp.asarray, CostCoeffs.zeros((0,)))
    _log_sources(model, gpu, sources_by_key)
    return coeffs, [sources_by_key[k] for k in keys]


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
