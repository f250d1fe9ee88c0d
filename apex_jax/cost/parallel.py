"""What a plan's layout costs: per-cell work split, resharding collectives, MoE routing,
encoders, topology and clock, vectorised over the plan tensor.

This module turns plan columns into the layout's *physical* facts: how cells split the
work, which collectives a layer issues and their messages per token of the replica's batch,
MoE routing load, stage transfers across nodes, and each GPU's placement.
:mod:`apex_jax.cost.sites` turns them into per-GPU call sites (GEMM shapes, collectives,
attention) that the cost model (:func:`apex_jax.cost.iteration.cost_coeffs`) prices on a
GPU. Everything here is static NumPy computed once per plan; nothing is traced.

Cell-level plans
----------------
A stage has ``tp`` GPUs. Its attention cell runs ``d_a = tp / attn_tp`` replicas of
``attn_tp`` GPUs and its FFN cell ``d_m = tp / mlp_tp`` replicas of ``mlp_tp`` GPUs. Cell
replicas split the batch by sequence, assumed evenly: an attention GPU computes ``1 / d_a``
of the tokens with ``1 / attn_tp`` of the heads, and reads the KV cache of ``1 / d_a`` of
the sequences. Compute per GPU is therefore ``1 / tp`` of the cell's in every layout; what
changes is the weights each GPU streams (``1 / attn_tp``, ``1 / mlp_tp``), KV-head
replication (only once ``attn_tp`` exceeds the KV heads), and the collectives.

Resharding collectives (per layer, sizes per token of the batch, ``H`` hidden, 2 bytes)
------------------------------------------------------------------------------------------
After a cell, every GPU of a TP group holds partial sums of its replica's tokens; the next
cell needs its own replica's tokens, complete, on each of its GPUs. With equal layouts that is
one **AllReduce** over the group (a classic TP plan: two per layer). Otherwise it is a
**ReduceScatter** over the producer's group (each GPU keeps ``1 / tp`` of the stage's tokens,
reduced) and an **AllGather** over the consumer's group. Only the tokens that cross move:
the ReduceScatter's message is the producer replica's ``1 / d_a`` of the tokens, the
AllGather's the consumer replica's. An MoE cell with ``ep`` ranks of ``mlp_tp / ep`` GPUs
(expert TP) adds an **AllToAll** dispatch and combine over the ranks: each token goes to the
ranks holding its top-k experts, so a GPU sends ``u * (ep - 1)`` copies of each of its
``1 / tp`` tokens, where ``u`` is the probability that a token's top-k hit a given rank
(``1 - C(E - g, k) / C(E, k)`` for ``g = E / ep`` experts per rank); inside a rank the
AllGather / ReduceScatter run over its expert-TP GPUs on the tokens routed to the rank.

MoE routing
-----------
Top-k routing sends ``k`` copies of each token. The busiest EP rank sets the layer's time:
with dropless routing (``ModelSpec.moe_capacity_factor == 0``) the hottest expert receives
``1 + s`` times the mean load (``s = moe_routing_skew``), which raises the load of a rank of
``g`` experts to ``1 + s (E - g) / (g (E - 1))`` times its mean (the hot expert plus ``g - 1``
average ones; 1 for pure expert TP, ``1 + s`` for one expert per rank). With a capacity
factor ``c`` every expert computes (and the all-to-all moves) its full capacity of ``c``
times the mean load, and tokens over it are dropped.

Encoder-decoder models (T5, Whisper) on the engine
--------------------------------------------------
The engine tracks one sequence per request: its prompt is the **encoder input** and its
output the decoder's tokens. A prefill iteration runs the encoder over the prompt
(bidirectional attention: about twice the engine's causal query-key pairs), projects the
encoder output into every decoder layer's cross-attention keys and values, and decodes the
first token. A decode iteration runs the decoder: self-attention over the generated tokens
plus cross-attention over the prompt, so the KV entries it reads are still the sequence's
prompt plus generated tokens, and the cache holds the same bytes per token for both. vLLM
has no chunked prefill for these models (a validity rule), so an iteration is either all
prefill (``prefill_pairs > 0``: ``num_tokens`` prompt tokens go through the encoder,
``num_sampled`` first tokens through the decoder) or all decode. The encoder has its own
layout (``enc_tp``, ``tp / enc_tp`` replicas), planned separately from the decoder's cells,
as APEX does; its weights are read in prefill iterations only.

Topology and placement
----------------------
A node has ``gpus_per_node`` GPUs joined by NVLink; nodes talk over the network (one NIC
per GPU). A stage's GPUs either divide a node or, with ``plan_space.cross_node_stages``,
fill whole nodes (a validity rule). The placement is canonical, so that plans equal up to a
permutation of GPUs or nodes are one plan: replicas fill the GPUs in order, stage after
stage; inside a stage every cell replica takes a contiguous block of GPUs, and inside an FFN
replica every EP rank a contiguous block of its expert-TP GPUs (expert TP stays in as few
nodes as it can, EP spans the replica's). A cell collective whose group spans several nodes
is hierarchical (:func:`apex_jax.cost.kernels.collective_time_s`: NVLink inside each node,
the network between them), and is priced by the model, since the measured tables hold one
node. A stage-to-stage transfer crosses the network when the next stage starts a new node;
the worst replica's count is used. :func:`placement` says where each group sits.

Clock
-----
``gpu_clock_mhz`` below the boost clock slows compute-bound work (GEMM and attention math)
by ``boost / clock``; memory-bound work (weight and KV reads) and communication keep their
speed, since HBM and NVLink run on their own clocks. Power is not modelled here.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

from apex_jax.memory import CellLayout, cell_layout
from apex_jax.model_spec import ModelSpec
from apex_jax.plans import COL

__all__ = [
    "COLLECTIVE_KINDS",
    "Collective",
    "cross_node_transfers",
    "group_nodes",
    "layout_collectives",
    "moe_load_factor",
    "moe_rank_hit_probability",
    "placement",
]

ACT_BYTES = 2.0  # activations and collective messages are bf16/fp16
COLLECTIVE_KINDS = ("all_reduce", "reduce_scatter", "all_gather", "alltoall")


class Collective(NamedTuple):
    """One kind of collective a plan issues; every field ``[P]`` float64.

    ``message_bytes_per_token`` follows the nccl-tests convention (the full buffer: the input
    of an all-reduce or reduce-scatter, the output of an all-gather, the send buffer of an
    all-to-all), per token of the replica's batch. A GPU moves ``(g - 1) / g`` of it
    (``2 (g - 1) / g`` for an all-reduce) over its links, for group size ``g``.
    """

    kind: str  # one of COLLECTIVE_KINDS
    group: np.ndarray  # [P] GPUs taking part
    message_bytes_per_token: np.ndarray  # [P] bytes
    calls: np.ndarray  # [P] calls per iteration (0 where the plan has none)
    prefill_only: bool  # issued by the encoder, in prefill iterations only
    nodes: np.ndarray  # [P] nodes the group spans (1: NVLink only)


def moe_rank_hit_probability(num_experts: int, top_k: int, experts_per_rank: np.ndarray):
    """Probability that a token's ``top_k`` distinct experts include one of a rank's
    ``experts_per_rank`` experts: ``1 - C(E - g, k) / C(E, k)``, ``[P]``."""
    g = np.asarray(experts_per_rank, np.float64)
    miss = np.array([math.comb(num_experts - int(x), top_k) for x in g.ravel()], np.float64)
    miss = miss.reshape(g.shape) / math.comb(num_experts, top_k)
    return 1.0 - miss


def moe_load_factor(model: ModelSpec, ep: np.ndarray) -> np.ndarray:
    """Load of the busiest EP rank over the mean rank load, ``[P]`` (1 for a dense model).

    See the module docstring: ``capacity_factor`` when one is set, else
    ``1 + skew * (E - g) / (g * (E - 1))`` with ``g = E / ep`` experts per rank.
    """
    ep = np.asarray(ep, np.float64)
    if not model.is_moe:
        return np.ones_like(ep)
    if model.moe_capacity_factor > 0:
        return np.full_like(ep, float(model.moe_capacity_factor))
    experts = float(model.num_experts)
    g = experts / ep
    return 1.0 + model.moe_routing_skew * (experts - g) / (g * (experts - 1.0))


def cross_node_transfers(plans: np.ndarray, gpus_per_node: int) -> np.ndarray:
    """Stage-to-stage transfers that cross a node boundary, worst replica, ``[P]`` float64.

    Replica ``r`` holds GPUs ``[r R, (r + 1) R)`` with ``R = tp * pp``; stage ``s`` starts at
    GPU ``r R + s tp``, and the transfer into it crosses nodes when that is a multiple of
    ``gpus_per_node`` (stages never straddle nodes: ``tp`` divides the node).
    """
    plans = np.asarray(plans)
    out = np.zeros(plans.shape[0])
    keys = plans[:, [COL["dp"], COL["tp"], COL["pp"]]]
    for dp, tp, pp in {tuple(int(v) for v in k) for k in keys}:
        replica = tp * pp
        starts = np.arange(dp)[:, None] * replica + np.arange(1, pp)[None, :] * tp
        worst = float((starts % gpus_per_node == 0).sum(axis=1).max()) if pp > 1 else 0.0
        out[(keys == (dp, tp, pp)).all(axis=1)] = worst
    return out


def group_nodes(block: np.ndarray, gpus_per_node: int) -> np.ndarray:
    """Nodes the widest of a stage's contiguous blocks of ``block`` GPUs spans, ``[P]``
    float64 (block ``k`` holds GPUs ``[k b, (k + 1) b)`` of a stage that starts a node; with
    ``b`` dividing the node that is 1)."""
    block = np.asarray(block, np.float64)
    out = np.ones_like(block)
    for b in np.unique(block).astype(np.int64).tolist():
        # The pattern of blocks over nodes repeats every lcm(b, node) GPUs.
        starts = np.arange(0, math.lcm(b, gpus_per_node), b)
        spans = (starts + b - 1) // gpus_per_node - starts // gpus_per_node + 1
        out[block == b] = float(spans.max())
    return out


# The plan columns its placement depends on (what cell_layout and cross_node_transfers read).
_PLACEMENT_COLUMNS = ("dp", "tp", "pp", "attn_tp", "mlp_tp", "ep", "enc_tp")


def placement(row: np.ndarray, gpus_per_node: int, model: ModelSpec | None = None) -> str:
    """Where a plan's parallel groups sit (see the module docstring), e.g.
    ``DP4: a replica spans 2 nodes · PP2: 1 of 1 stage transfers crosses nodes · stage TP8
    inside a node · attn TP8 inside a node · moe EP8 inside a node``."""
    row = np.asarray(row, np.int32)
    layout = tuple(int(row[COL[c]]) for c in _PLACEMENT_COLUMNS)
    return _layout_placement(layout, row.size, gpus_per_node, model)


@functools.lru_cache(maxsize=4096)
def _layout_placement(
    layout: tuple[int, ...], num_columns: int, gpus_per_node: int, model: ModelSpec | None
) -> str:
    """:func:`placement` of the plans with this layout (:data:`_PLACEMENT_COLUMNS`): once per
    layout, which a plan space repeats over its dtypes and engine knobs."""
    plans = np.zeros((1, num_columns), np.int32)
    plans[0, [COL[c] for c in _PLACEMENT_COLUMNS]] = layout
    dp, tp, pp = (int(plans[0, COL[k]]) for k in ("dp", "tp", "pp"))
    c = cell_layout(plans, model) if model is not None else None
    replica = tp * pp
    if replica <= gpus_per_node:
        parts = [f"DP{dp}: {gpus_per_node // replica} replicas a node"]
    else:
        parts = [f"DP{dp}: a replica spans {math.ceil(replica / gpus_per_node)} nodes"]
    if pp > 1:
        crossing = int(cross_node_transfers(plans, gpus_per_node)[0])
        parts.append(f"PP{pp}: {crossing} of {pp - 1} stage transfers cross nodes")

    def where(label: str, gpus: float, nodes: float) -> str:
        text = f"{label}{int(gpus)}"
        return f"{text} inside a node" if nodes <= 1 else f"{text} spans {int(nodes)} nodes"

    parts.append(where("stage TP", tp, group_nodes([tp], gpus_per_node)[0]))
    if c is not None:
        for label, gpus in (("attn TP", c.attn_tp), ("mlp TP", c.mlp_tp)):
            if model.is_moe and label == "mlp TP":
                label = "moe EP" if c.ep[0] > 1 else "moe TP"
                gpus = c.ep if c.ep[0] > 1 else gpus
            if gpus[0] > 1:
                nodes = group_nodes(c.mlp_tp if label == "moe EP" else gpus, gpus_per_node)
                parts.append(where(label, gpus[0], nodes[0]))
    return " · ".join(parts)


def layout_collectives(
    plans: np.ndarray, model: ModelSpec, gpus_per_node: int | None = None
) -> list[Collective]:
    """Every collective a plan's layout issues per iteration (see the module docstring);
    ``gpus_per_node`` sets the nodes each group spans (None: every group in one node)."""
    c = cell_layout(plans, model)

    def nodes(block: np.ndarray) -> np.ndarray:
        if gpus_per_node is None:
            return np.ones_like(block)
        return group_nodes(block, gpus_per_node)

    h_bytes = model.hidden_size * ACT_BYTES
    layers = float(model.num_layers)
    one = np.ones_like(c.stage)
    ep = c.ep
    g = model.num_experts / ep
    hit = (
        moe_rank_hit_probability(model.num_experts, model.num_experts_per_tok, g)
        if model.is_moe
        else one
    )
    a2a_load = np.where(ep > 1, moe_load_factor(model, ep), 1.0)
    # Equal attention and FFN layouts without EP: partial sums are all-reduced in place.
    fused = (c.attn_tp == c.mlp_tp) & (ep == 1)
    attn_share = 1.0 / c.attn_dp  # tokens of one attention replica, per token of the batch
    rank_share = hit * a2a_load / c.mlp_dp  # tokens routed to one FFN rank
    cross = 1.0 if model.is_encoder_decoder else 0.0
    out = [
        # Attention <-> FFN, equal layouts: two all-reduces a layer (three with cross-attention).
        Collective(
            "all_reduce",
            c.stage,
            attn_share * h_bytes,
            np.where(fused, layers * (2.0 + cross) * _has(c.stage), 0.0),
            False,
            nodes(c.stage),
        ),
        # Different layouts: reduce-scatter out of each cell, all-gather into the next.
        Collective(
            "reduce_scatter",
            c.attn_tp,
            attn_share * h_bytes,
            np.where(fused, 0.0, layers * _has(c.attn_tp)),
            False,
            nodes(c.attn_tp),
        ),
        Collective(
            "all_gather",
            c.attn_tp,
            attn_share * h_bytes,
            np.where(fused, 0.0, layers * _has(c.attn_tp)),
            False,
            nodes(c.attn_tp),
        ),
        Collective(
            "all_gather",
            c.expert_tp,
            rank_share * h_bytes,
            np.where(fused, 0.0, layers * _has(c.expert_tp)),
            False,
            nodes(c.expert_tp),
        ),
        Collective(
            "reduce_scatter",
            c.expert_tp,
            rank_share * h_bytes,
            np.where(fused, 0.0, layers * _has(c.expert_tp)),
            False,
            nodes(c.expert_tp),
        ),
        # Cross-attention (encoder-decoder) shares the attention layout: one all-reduce.
        Collective(
            "all_reduce",
            c.attn_tp,
            attn_share * h_bytes,
            np.where(fused, 0.0, layers * cross * _has(c.attn_tp)),
            False,
            nodes(c.attn_tp),
        ),
        # MoE dispatch and combine over the EP ranks: a GPU's 1/tp of the tokens, u * ep
        # copies each (counting the one that stays).
        Collective(
            "alltoall",
            ep,
            hit * ep * a2a_load / c.stage * h_bytes,
            layers * 2.0 * _has(ep),
            False,
            nodes(c.mlp_tp),
        ),
    ]
    return out + _encoder_collectives(c, model, nodes)


def _encoder_collectives(c: CellLayout, model: ModelSpec, nodes) -> list[Collective]:
    """The encoder's all-reduces and the hand-off of its output (prefill iterations only);
    ``nodes(block)`` gives the nodes a block of GPUs spans."""
    if not model.is_encoder_decoder:
        return []
    h_bytes = model.hidden_size * ACT_BYTES
    enc_layers = float(model.num_encoder_layers)
    handoff = (c.enc_dp != c.attn_dp) & (c.attn_tp > 1)
    return [
        Collective(
            "all_reduce",
            c.enc_tp,
            h_bytes / c.enc_dp,
            enc_layers * 2.0 * _has(c.enc_tp),
            True,
            nodes(c.enc_tp),
        ),
        # The encoder output moves to the decoder attention layout once.
        Collective(
            "all_gather",
            c.attn_tp,
            (1.0 / c.attn_dp) * h_bytes,
            handoff * np.ones_like(c.stage),
            True,
            nodes(c.attn_tp),
        ),
    ]


def _has(group: np.ndarray) -> np.ndarray:
    """1.0 where a group has more than one GPU (a collective happens), else 0.0."""
    return (group > 1).astype(np.float64)
