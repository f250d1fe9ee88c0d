"""Per-GPU memory of every plan, vectorised over the plan tensor.

The KV capacity follows vLLM's accounting: the engine may use ``gpu_memory_utilization`` of
HBM; from that it subtracts the weights of the GPU's pipeline stage, the peak activations of a
profiling forward pass at the full token budget, and a fixed reserve; the rest becomes KV
pages of ``block_size`` tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from apex_jax.dtypes import DTYPE_BYTES, DTYPES
from apex_jax.hardware import GpuSpec
from apex_jax.model_spec import ModelSpec
from apex_jax.plans import COL

__all__ = ["ENGINE_RESERVE_BYTES", "MemoryPlan", "memory_plan"]

# CUDA-graph pools, NCCL buffers and the CUDA context that vLLM does not count as KV. vLLM
# 0.6 captures graphs for decode batch sizes up to 256; together these are typically 1-2 GiB
# per GPU, so 1.5 GB is a middle estimate until a measurement calibrates it.
ENGINE_RESERVE_BYTES = 1.5e9

# Logits are materialised in fp32 before sampling.
_LOGIT_BYTES = 4.0

_BYTES_BY_CODE = np.asarray([DTYPE_BYTES[name] for name in DTYPES])


class MemoryPlan(NamedTuple):
    """Memory per GPU of each plan; every field is ``[P]``."""

    weight_bytes: np.ndarray  # [P] float64, largest pipeline stage
    activation_bytes: np.ndarray  # [P] float64, profiling peak
    kv_bytes: np.ndarray  # [P] float64, left for KV pages (may be negative)
    kv_bytes_per_token: np.ndarray  # [P] float64, one token over the stage's layers
    num_kv_blocks: np.ndarray  # [P] int64, KV pages per replica (0 when OOM)
    is_oom: np.ndarray  # [P] bool, weights + activations + reserve exceed the budget


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
    tp = plans[:, COL["tp"]].astype(np.float64)
    pp = plans[:, COL["pp"]].astype(np.float64)
    w_bytes = _BYTES_BY_CODE[plans[:, COL["weight_dtype"]]]
    kv_bytes_el = _BYTES_BY_CODE[plans[:, COL["kv_dtype"]]]
    budget_tokens = plans[:, COL["max_num_batched_tokens"]].astype(np.float64)
    max_seqs = plans[:, COL["max_num_seqs"]].astype(np.float64)
    block_size = plans[:, COL["block_size"]].astype(np.float64)
    util = plans[:, COL["gpu_mem_util_permille"]].astype(np.float64) / 1000.0

    layers_per_stage = np.ceil(model.num_layers / pp)
    # With one stage the GPU holds the embedding and the LM head; with several, the first and
    # last stage hold one each, and the larger of the two sizes the stage.
    edge_params = np.where(pp > 1, model.embedding_params / 2.0, model.embedding_params)
    stage_params = layers_per_stage * model.params_per_layer + edge_params
    weight_bytes = stage_params * w_bytes / tp

    # vLLM replicates KV heads when TP exceeds their number.
    kv_heads_per_gpu = np.maximum(1.0, model.num_kv_heads / tp)
    kv_bytes_per_token = 2.0 * kv_heads_per_gpu * model.head_dim * layers_per_stage * kv_bytes_el

    act_bytes_el = 2.0
    q_width = (model.num_heads / tp + 2.0 * kv_heads_per_gpu) * model.head_dim
    mlp_width = (
        (2.0 if model.is_gated_mlp else 1.0)
        * model.intermediate_size
        * model.num_experts_per_tok
        / tp
    )
    per_token = (2.0 * model.hidden_size + q_width + mlp_width) * act_bytes_el
    activation_bytes = budget_tokens * per_token + max_seqs * model.vocab_size / tp * _LOGIT_BYTES

    kv_bytes = (
        util * gpu.hbm_capacity_bytes - weight_bytes - activation_bytes - ENGINE_RESERVE_BYTES
    )
    num_blocks = np.floor(np.maximum(kv_bytes, 0.0) / (kv_bytes_per_token * block_size))
    is_oom = num_blocks < 1
    return MemoryPlan(
        weight_bytes=weight_bytes,
        activation_bytes=activation_bytes,
        kv_bytes=kv_bytes,
        kv_bytes_per_token=kv_bytes_per_token,
        num_kv_blocks=np.where(is_oom, 0, num_blocks).astype(np.int64),
        is_oom=is_oom,
    )
