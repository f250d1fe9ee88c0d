"""Per-GPU memory of every plan, vectorised over the plan tensor.

The KV capacity follows vLLM's accounting: the engine may use ``gpu_memory_utilization`` of
HBM; from that it subtracts the weights of the GPU's pipeline stage, the peak activations of a
profiling forward pass at the full token budget, and a fixed reserve; the rest becomes KV
pages of ``block_size`` tokens. Every stage of a pipeline does this for its own layers and
the engine keeps the fewest pages any stage has, so the *binding* stage (the one with the
fewest KV tokens) sets the replica's capacity and is the one reported.

Cell layouts (see :mod:`apex_jax.plans`) change what a GPU holds:

- attention weights are split ``attn_tp`` ways (KV-head weights are replicated once
  ``attn_tp`` exceeds the KV heads, as vLLM does), FFN weights ``mlp_tp`` ways (an MoE
  replica holds ``num_experts / ep`` experts per rank, each split ``mlp_tp / ep`` ways, which
  is ``num_experts * expert / mlp_tp`` per GPU), encoder weights ``enc_tp`` ways, and the
  embedding, LM head and norms over the whole stage;
- with ``tp / attn_tp`` attention replicas each replica keeps the KV cache of its own
  sequences, so the replica's KV pages are that many times one attention group's pages
  (sequences are assumed spread evenly over the attention replicas);
- the profiling pass puts ``budget / replicas`` tokens through each cell replica.

Before serving, vLLM refuses to start (:func:`startup_refusals`) when the KV cache of a GPU
holds fewer tokens than ``max_model_len`` (``raise_if_cache_size_invalid`` in
``vllm/worker/worker.py``, from the pages the memory profile left: the binding stage's, before
they are shared among the pipeline's virtual engines), or when the token budget is below
``max_model_len`` with chunked prefill off (``SchedulerConfig._verify_args`` in
``vllm/config.py``). Such plans are INFEASIBLE before they are simulated, with vLLM's message
as their reason (:func:`startup_checks`, :func:`startup_refusals`).

Encoder-decoder models hold their encoder layers too (split over the stages like the decoder
layers); their KV cache holds the cross-attention keys and values of the prompt and the
self-attention keys and values of the generated tokens, the same bytes per token.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from apex_jax.dtypes import DTYPE_BYTES, DTYPES
from apex_jax.hardware import GpuSpec
from apex_jax.model_spec import ModelSpec
from apex_jax.plans import COL, stage_layers_matrix

__all__ = [
    "ENGINE_RESERVE_BYTES",
    "MemoryPlan",
    "StartupChecks",
    "cell_layout",
    "kv_cache_tokens",
    "memory_plan",
    "startup_checks",
    "startup_refusals",
]

# CUDA-graph pools, NCCL buffers and the CUDA context that vLLM does not count as KV. vLLM
# 0.6 captures graphs for decode batch sizes up to 256; together these are typically 1-2 GiB
# per GPU, so 1.5 GB is a middle estimate until a measurement calibrates it.
ENGINE_RESERVE_BYTES = 1.5e9

# Logits are materialised in fp32 before sampling.
_LOGIT_BYTES = 4.0
# Activations are bf16/fp16 whatever the GEMM input type.
_ACT_BYTES = 2.0

_BYTES_BY_CODE = np.asarray([DTYPE_BYTES[name] for name in DTYPES])


class CellLayout(NamedTuple):
    """The cell layout of each plan as float64 ``[P]`` arrays."""

    stage: np.ndarray  # GPUs per pipeline stage (the tp column)
    attn_tp: np.ndarray  # GPUs per attention replica
    attn_dp: np.ndarray  # attention replicas per stage
    mlp_tp: np.ndarray  # GPUs per FFN replica
    mlp_dp: np.ndarray  # FFN replicas per stage
    ep: np.ndarray  # expert-parallel ranks per FFN replica
    expert_tp: np.ndarray  # GPUs per expert-parallel rank
    enc_tp: np.ndarray  # GPUs per encoder replica (the stage's when the column is 0)
    enc_dp: np.ndarray  # encoder replicas per stage
    kv_heads_per_gpu: np.ndarray  # KV heads an attention GPU holds (>= 1: replicated)


def cell_layout(plans: np.ndarray, model: ModelSpec) -> CellLayout:
    """Read the cell layout columns of a plan tensor (int32 ``[P, F]``)."""
    plans = np.asarray(plans)
    f = np.float64
    stage = plans[:, COL["tp"]].astype(f)
    attn_tp = plans[:, COL["attn_tp"]].astype(f)
    mlp_tp = plans[:, COL["mlp_tp"]].astype(f)
    ep = plans[:, COL["ep"]].astype(f)
    enc_tp = plans[:, COL["enc_tp"]].astype(f)
    enc_tp = np.where(enc_tp > 0, enc_tp, stage)
    return CellLayout(
        stage=stage,
        attn_tp=attn_tp,
        attn_dp=stage / attn_tp,
        mlp_tp=mlp_tp,
        mlp_dp=stage / mlp_tp,
        ep=ep,
        expert_tp=mlp_tp / ep,
        enc_tp=enc_tp,
        enc_dp=stage / enc_tp,
        kv_heads_per_gpu=np.maximum(1.0, model.num_kv_heads / attn_tp),
    )


class MemoryPlan(NamedTuple):
    """Memory per GPU of each plan; every field is ``[P]``.

    Per-GPU fields describe the binding pipeline stage (the one with the fewest KV tokens).
    """

    weight_bytes: np.ndarray  # [P] float64, the binding stage's weights
    activation_bytes: np.ndarray  # [P] float64, profiling peak
    kv_bytes: np.ndarray  # [P] float64, left for KV pages (may be negative)
    kv_bytes_per_token: np.ndarray  # [P] float64, one token over the stage's layers
    num_kv_blocks: np.ndarray  # [P] int64, KV pages per replica (0 when OOM)
    is_oom: np.ndarray  # [P] bool, weights + activations + reserve exceed the budget


def _stage_edges(pp: np.ndarray, model: ModelSpec) -> np.ndarray:
    """Embedding / LM-head parameters of each stage, ``[P, S]``.

    One stage holds both (once if tied); in a pipeline the first holds the embedding and the
    last the LM head, a full matrix each even when tied.
    """
    width = int(pp.max())
    matrix = float(model.vocab_size * model.hidden_size)
    edges = np.zeros((pp.size, width))
    edges[:, 0] = np.where(pp > 1, matrix, float(model.embedding_params))
    last = (pp - 1).astype(np.int64)
    edges[np.arange(pp.size), last] += np.where(pp > 1, matrix, 0.0)
    return edges


def memory_plan(plans: np.ndarray, model: ModelSpec, gpu: GpuSpec) -> MemoryPlan:
    """Compute per-GPU memory and KV capacity for a whole plan tensor at once.

    Args:
        plans: int32 ``[P, F]`` plan tensor.
        model: the served model.
        gpu: the GPU every replica runs on.

    Returns:
        A :class:`MemoryPlan` of ``[P]`` arrays.
    """
    plans = np.asarray(plans)
    c = cell_layout(plans, model)
    pp = plans[:, COL["pp"]].astype(np.int64)
    w_bytes = _BYTES_BY_CODE[plans[:, COL["weight_dtype"]]]
    kv_bytes_el = _BYTES_BY_CODE[plans[:, COL["kv_dtype"]]]
    budget_tokens = plans[:, COL["max_num_batched_tokens"]].astype(np.float64)
    max_seqs = plans[:, COL["max_num_seqs"]].astype(np.float64)
    block_size = plans[:, COL["block_size"]].astype(np.float64)
    util = plans[:, COL["gpu_mem_util_permille"]].astype(np.float64) / 1000.0

    # Weights of one layer on one GPU, by cell. Query and output projections split over the
    # attention GPUs; key and value projections too until each GPU holds a single KV head.
    h, hd = float(model.hidden_size), float(model.head_dim)
    q_and_o = 2.0 * h * model.num_heads * hd / c.attn_tp
    k_and_v = 2.0 * h * hd * c.kv_heads_per_gpu
    attn_gpu = (q_and_o + k_and_v) * (2.0 if model.is_encoder_decoder else 1.0)
    mlp_gpu = model.mlp_params_per_layer / c.mlp_tp
    norms = (
        model.params_per_layer
        - model.attn_params_per_layer
        - model.cross_attn_params_per_layer
        - model.mlp_params_per_layer
    )
    norms_gpu = norms / c.stage
    layer_gpu = attn_gpu + mlp_gpu + norms_gpu
    encoder_layer_gpu = model.encoder_params_per_layer / c.enc_tp

    dec_layers = stage_layers_matrix(model.num_layers, pp)  # [P, S]
    enc_layers = stage_layers_matrix(model.num_encoder_layers, pp)  # [P, S]
    edges = _stage_edges(pp, model) / c.stage[:, None]
    stage_weight_params = (
        dec_layers * layer_gpu[:, None] + enc_layers * encoder_layer_gpu[:, None] + edges
    )
    stage_weight_bytes = stage_weight_params * w_bytes[:, None]

    # One token's KV bytes on an attention GPU of each stage (cross-attention KV of a prompt
    # token and self-attention KV of a generated token are the same size).
    kv_token_gpu = 2.0 * c.kv_heads_per_gpu * hd * kv_bytes_el
    stage_kv_per_token = dec_layers * kv_token_gpu[:, None]

    # The profiling pass: each cell replica takes its share of the budget.
    attn_tokens = budget_tokens / c.attn_dp
    mlp_tokens = budget_tokens / c.mlp_dp
    q_width = (model.num_heads / c.attn_tp + 2.0 * c.kv_heads_per_gpu) * hd
    gated = 2.0 if model.is_gated_mlp else 1.0
    mlp_width = gated * model.intermediate_size * model.num_experts_per_tok / c.mlp_tp
    residual_tokens = np.maximum(attn_tokens, mlp_tokens)
    decoder_act = (
        2.0 * h * residual_tokens + q_width * attn_tokens + mlp_width * mlp_tokens
    ) * _ACT_BYTES
    activation_bytes = decoder_act
    if model.is_encoder_decoder:
        # The encoder pass runs before the decoder's, so the peak is the larger of the two.
        enc_tokens = budget_tokens / c.enc_dp
        enc_width = (
            2.0 * h + (3.0 * model.num_heads * hd + gated * model.intermediate_size) / c.enc_tp
        )
        activation_bytes = np.maximum(decoder_act, enc_width * enc_tokens * _ACT_BYTES)
    activation_bytes = activation_bytes + max_seqs * model.vocab_size / c.stage * _LOGIT_BYTES

    base = util * gpu.hbm_capacity_bytes - activation_bytes - ENGINE_RESERVE_BYTES
    stage_kv_bytes = base[:, None] - stage_weight_bytes
    page_bytes = stage_kv_per_token * block_size[:, None]
    # Pages of one attention group of each stage; stages past pp hold nothing (inf pages).
    with np.errstate(divide="ignore", invalid="ignore"):
        stage_pages = np.where(
            dec_layers > 0,
            np.floor(np.maximum(stage_kv_bytes, 0.0) / page_bytes),
            np.inf,
        )
    binding = np.argmin(stage_pages, axis=1)
    rows = np.arange(plans.shape[0])
    group_pages = stage_pages[rows, binding]
    is_oom = group_pages < 1
    num_blocks = np.where(is_oom, 0.0, group_pages * c.attn_dp)
    return MemoryPlan(
        weight_bytes=stage_weight_bytes[rows, binding],
        activation_bytes=activation_bytes,
        kv_bytes=stage_kv_bytes[rows, binding],
        kv_bytes_per_token=stage_kv_per_token[rows, binding],
        num_kv_blocks=num_blocks.astype(np.int64),
        is_oom=is_oom,
    )


def kv_cache_tokens(plans: np.ndarray, memory: MemoryPlan) -> np.ndarray:
    """Tokens the KV cache of one GPU holds (``[P]`` int64): its pages times ``block_size``.

    A GPU of an attention replica holds that replica's pages (``num_kv_blocks / attn_dp``),
    and one sequence lives in one replica; in a classic plan this is the replica's cache.
    """
    plans = np.asarray(plans)
    attn_dp = plans[:, COL["tp"]] // plans[:, COL["attn_tp"]]
    block_size = plans[:, COL["block_size"]].astype(np.int64)
    return memory.num_kv_blocks // attn_dp * block_size


class StartupChecks(NamedTuple):
    """vLLM's start-up checks of each plan; every field ``[P]``."""

    is_budget_short: np.ndarray  # bool, budget below max_model_len without chunked prefill
    is_kv_short: np.ndarray  # bool, a plan that fits whose KV cache is shorter than that
    kv_tokens: np.ndarray  # int64, tokens one GPU's KV cache holds (kv_cache_tokens)
    max_model_len: np.ndarray  # int64, the engine's model length

    @property
    def is_refused(self) -> np.ndarray:
        """``[P]`` bool: vLLM would not start the plan."""
        return self.is_budget_short | self.is_kv_short


def startup_checks(
    plans: np.ndarray, memory: MemoryPlan, max_model_len: int | np.ndarray
) -> StartupChecks:
    """vLLM's start-up checks of every plan (see the module docstring; a plan that does not
    fit at all is OOM, which the KV check leaves to ``memory.is_oom``).

    Args:
        plans: int32 ``[P, F]`` plan tensor.
        memory: their :class:`MemoryPlan`.
        max_model_len: the engine's resolved model length, one for all plans or ``[P]``.
    """
    plans = np.asarray(plans)
    lengths = np.broadcast_to(np.asarray(max_model_len, np.int64), (plans.shape[0],))
    is_budget_short = (plans[:, COL["chunked_prefill"]] == 0) & (
        plans[:, COL["max_num_batched_tokens"]] < lengths
    )
    kv_tokens = kv_cache_tokens(plans, memory)
    return StartupChecks(
        is_budget_short=is_budget_short,
        is_kv_short=~is_budget_short & ~memory.is_oom & (kv_tokens < lengths),
        kv_tokens=kv_tokens,
        max_model_len=lengths,
    )


def startup_refusals(checks: StartupChecks, plans: np.ndarray) -> list[str]:
    """Why vLLM would refuse to start each plan, quoting vLLM, then the fix ("" when it
    starts): the scheduler's arguments first, as vLLM checks them when the engine is
    configured, then the KV cache once the memory is profiled.

    Args:
        checks: the plans' :func:`startup_checks`.
        plans: int32 ``[P, F]`` plan tensor.
    """
    budget = np.asarray(plans)[:, COL["max_num_batched_tokens"]]
    out = []
    for i, length in enumerate(checks.max_model_len.tolist()):
        if checks.is_budget_short[i]:
            out.append(
                f'vLLM refuses to start: "max_num_batched_tokens ({int(budget[i])}) is smaller '
                f"than max_model_len ({length}). This effectively limits the maximum "
                "sequence length to max_num_batched_tokens and makes vLLM reject longer "
                'sequences. Please increase max_num_batched_tokens or decrease max_model_len." '
                "(or turn chunked prefill on)"
            )
        elif checks.is_kv_short[i]:
            out.append(
                f"vLLM refuses to start: \"The model's max seq len ({length}) is larger "
                "than the maximum number of tokens that can be stored in KV cache "
                f"({int(checks.kv_tokens[i])}). Try increasing `gpu_memory_utilization` or "
                'decreasing `max_model_len` when initializing the engine." (or free memory for '
                "the KV cache: more tp or pp, lower-precision weights)"
            )
        else:
            out.append("")
    return out
