"""Work and communication of cell-level, MoE, encoder and pipeline layouts: the collectives
(apex_jax.cost.parallel) and the per-GPU call sites the cost model prices
(apex_jax.cost.sites), checked against values computed independently here."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from apex_jax.cost.parallel import (
    cross_node_transfers,
    layout_collectives,
    moe_load_factor,
    moe_rank_hit_probability,
)
from apex_jax.cost.sites import TOKEN_POINTS, plan_sites
from apex_jax.hardware import get_gpu
from apex_jax.model_spec import load_model
from apex_jax.plans import COL, plan_row

H100 = get_gpu("H100-SXM-80GB")


def _rows(*plans):
    return np.stack([plan_row(p) for p in plans])


def _sites(model, *plans, gpus_per_node=8):
    rows = _rows(*plans)
    clock_mhz = rows[:, COL["gpu_clock_mhz"]].astype(np.float64)
    sites, _, _ = plan_sites(
        rows,
        model,
        H100,
        network_transfers=cross_node_transfers(rows, gpus_per_node),
        clock_mhz=np.where(clock_mhz > 0, clock_mhz, H100.max_clock_mhz),
        gpus_per_node=gpus_per_node,
    )
    return sites


def _comm(model, *plans, gpus_per_node=8):
    """Per plan, ``(bytes, calls)`` of the decoder's collectives, then of the encoder's: the
    bytes one GPU moves per token of the batch, ``(g - 1) / g`` of each nccl-tests message
    (twice that for an all-reduce) over group size ``g``."""
    out = np.zeros((4, len(plans)))
    for c in layout_collectives(_rows(*plans), model, gpus_per_node):
        g = np.maximum(c.group, 1.0)
        share = (2.0 if c.kind == "all_reduce" else 1.0) * (g - 1.0) / g
        offset = 2 if c.prefill_only else 0
        out[offset] += c.calls * share * c.message_bytes_per_token
        out[offset + 1] += c.calls
    return out


def _gemm_work(sites, encoder: bool = False):
    """``(FLOPs per token of the batch, weight elements)`` one GPU computes and streams in
    one layer's GEMMs (decoder: the decode-time ones; encoder: the ``enc_`` sites)."""
    flops, weights = 0.0, 0.0
    for name, gemm in sites.gemms.items():
        if name in ("lm", "cross_kv") or name.startswith("enc_") != encoder:
            continue
        flops = flops + 2.0 * gemm.n * gemm.k * gemm.m[:, 0] / TOKEN_POINTS[0]
        weights = weights + gemm.n * gemm.k
    return flops, weights


def _kv_reads_per_kv_token(sites):
    """KV heads one GPU reads per KV entry of the batch: its replica's share, replicated."""
    return sites.decode.kv_heads / sites.attn_dp


@pytest.mark.parametrize("experts, top_k", [(8, 2), (8, 1), (16, 4), (6, 2)])
def test_rank_hit_probability_by_counting(experts, top_k):
    for ep in [d for d in range(1, experts + 1) if experts % d == 0]:
        g = experts // ep
        rank = set(range(g))
        subsets = list(itertools.combinations(range(experts), top_k))
        hits = sum(1 for s in subsets if rank & set(s)) / len(subsets)
        assert moe_rank_hit_probability(experts, top_k, np.array([g]))[0] == pytest.approx(hits)


def test_moe_load_factor():
    mixtral = load_model("mistralai/Mixtral-8x7B-v0.1")
    ep = np.array([1.0, 2.0, 4.0, 8.0])
    np.testing.assert_array_equal(moe_load_factor(mixtral, ep), 1.0)
    skewed = dataclasses.replace(mixtral, moe_routing_skew=0.5)
    load = moe_load_factor(skewed, ep)
    # Expert TP spreads every expert over every GPU; one expert a rank carries the hot one.
    assert load[0] == 1.0 and load[-1] == pytest.approx(1.5)
    assert (np.diff(load) > 0).all()
    # Two ranks of four experts: the hot expert plus three average ones, of a mean of four.
    others = (8 - 1.5) / 7
    assert load[1] == pytest.approx((1.5 + 3 * others) / 4)
    capped = dataclasses.replace(mixtral, moe_capacity_factor=1.25)
    np.testing.assert_array_equal(moe_load_factor(capped, ep), 1.25)
    dense = load_model("meta-llama/Llama-3.1-8B")
    np.testing.assert_array_equal(moe_load_factor(dense, ep), 1.0)


def test_classic_tp_plan_pays_two_all_reduces_a_layer():
    model = load_model("meta-llama/Llama-3.1-70B")
    for tp in (1, 2, 4, 8):
        comm_bytes, calls, _, _ = _comm(model, {"tp": tp})
        per_layer = 2 * 2 * (tp - 1) / tp * model.hidden_size * 2
        assert comm_bytes[0] == pytest.approx(model.num_layers * per_layer)
        assert calls[0] == (2 * model.num_layers if tp > 1 else 0)


def test_attention_dp_reshards_with_reduce_scatter_and_all_gather():
    """Attention 2 x TP4, FFN TP8 on 8 GPUs: each layer reduce-scatters and all-gathers half
    the tokens over 4 GPUs around attention, and all the tokens over 8 around the FFN."""
    model = load_model("meta-llama/Llama-3.1-70B")
    comm_bytes, calls, _, _ = _comm(model, {"tp": 8, "attn_tp": 4, "mlp_tp": 8})
    h = model.hidden_size * 2
    per_layer = 2 * (3 / 4) * 0.5 * h + 2 * (7 / 8) * 1.0 * h
    assert comm_bytes[0] == pytest.approx(model.num_layers * per_layer)
    assert calls[0] == 4 * model.num_layers
    kinds = {
        (col.kind, int(col.group[0]))
        for col in layout_collectives(_rows({"tp": 8, "attn_tp": 4}), model)
        if col.calls[0]
    }
    assert kinds == {
        ("reduce_scatter", 4),
        ("all_gather", 4),
        ("reduce_scatter", 8),
        ("all_gather", 8),
    }


def test_cell_layouts_split_compute_but_not_weights():
    model = load_model("meta-llama/Llama-3.1-70B")
    layouts = [
        {"tp": 8},
        {"tp": 8, "attn_tp": 4},
        {"tp": 8, "attn_tp": 2},
        {"tp": 8, "mlp_tp": 4},
        {"tp": 8, "mlp_tp": 1},
    ]
    sites = _sites(model, *layouts)
    flops, weights = _gemm_work(sites)
    # Every GPU computes 1/8 of every cell, and reads 1/8 of the KV (8 KV heads >= attn TP).
    h = model.hidden_size
    per_layer = 2 * (2 * h * h + 2 * h * model.head_dim * model.num_kv_heads)
    per_layer += 2 * model.mlp_params_per_expert
    np.testing.assert_allclose(flops, per_layer / 8, rtol=1e-12)
    np.testing.assert_allclose(_kv_reads_per_kv_token(sites), model.num_kv_heads / 8)
    # Narrower cells stream more weights per GPU.
    assert (weights[1:] > weights[0]).all()
    assert weights[2] > weights[1]


def test_kv_head_replication_costs_reads_only_past_the_kv_heads():
    model = load_model("meta-llama/Llama-3.1-8B")  # 8 KV heads
    reads = _kv_reads_per_kv_token(
        _sites(model, {"tp": 8}, {"tp": 8, "attn_tp": 8}, {"tp": 4}, {"tp": 8, "attn_tp": 4})
    )
    np.testing.assert_allclose(reads[[0, 1, 3]], reads[0])
    mqa = dataclasses.replace(model, num_kv_heads=1)
    r = _kv_reads_per_kv_token(_sites(mqa, {"tp": 8}, {"tp": 8, "attn_tp": 1}))
    # TP8 replicates the one KV head on all 8 GPUs, each reading every token; 8 attention
    # replicas each read only their own sequences.
    assert r[0] == pytest.approx(8 * r[1])


def test_expert_parallelism_adds_all_to_all_and_skew_raises_compute():
    mixtral = load_model("mistralai/Mixtral-8x7B-v0.1")
    plans = [
        {"tp": 8, "mlp_tp": 8},
        {"tp": 8, "mlp_tp": 8, "ep": 8},
        {"tp": 8, "mlp_tp": 8, "ep": 2},
    ]
    comm_bytes, calls, _, _ = _comm(mixtral, *plans)
    h = mixtral.hidden_size * 2
    # EP8, one expert a rank: RS/AG over 8 GPUs around attention, then each GPU sends its
    # 1/8 of the tokens to the ranks of their two experts (7 of 8 are remote), and back.
    hit = moe_rank_hit_probability(8, 2, np.array([1.0]))[0]
    per_layer = 2 * (7 / 8) * h + 2 * (1 / 8) * hit * 8 * (7 / 8) * h
    assert comm_bytes[1] == pytest.approx(mixtral.num_layers * per_layer)
    assert calls[1] == mixtral.num_layers * 4
    # Routing taken as even: every rank carries the mean load, whatever the EP.
    moe = _sites(mixtral, *plans).moe
    np.testing.assert_array_equal(moe.load, 1.0)
    np.testing.assert_array_equal(moe.ep, [1, 8, 2])
    assert (moe.tokens == moe.tokens[0]).all()
    skewed = dataclasses.replace(mixtral, moe_routing_skew=1.0)
    load = _sites(skewed, *plans).moe.load
    assert load[0] == 1.0 and load[1] > load[2] > 1.0
    assert _comm(skewed, *plans)[0][1] > comm_bytes[1]


def test_cross_node_transfers_follow_the_placement():
    plans = (
        {"tp": 8, "pp": 2},  # two stages, one per node
        {"tp": 4, "pp": 4},  # 4 stages over 2 nodes: one crossing
        {"dp": 2, "tp": 4, "pp": 2},  # each replica is one node
        {"tp": 2, "pp": 8},
        {"tp": 8},
        {"dp": 4, "tp": 1, "pp": 4},
    )
    rows = _rows(*plans)
    np.testing.assert_array_equal(cross_node_transfers(rows, 8), [1, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(cross_node_transfers(rows, 4), [1, 3, 1, 3, 0, 0])
    transfers = _sites(load_model("meta-llama/Llama-3.1-70B"), *plans).transfers
    np.testing.assert_array_equal(transfers[:, 1], [1, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(transfers.sum(axis=1), rows[:, COL["pp"]] - 1)


def test_clock_slows_compute_only():
    model = load_model("meta-llama/Llama-3.1-8B")
    sites = _sites(model, {"gpu_clock_mhz": 1980}, {"gpu_clock_mhz": 990}, {})
    np.testing.assert_allclose(np.exp(sites.log_clock_scale), [1.0, 0.5, 1.0])


def test_encoder_terms():
    whisper = load_model("openai/whisper-large-v3")
    llama = load_model("meta-llama/Llama-3.1-8B")
    assert _sites(llama, {"tp": 2}).encoder is None
    assert not _comm(llama, {"tp": 2})[2:].any()
    plans = ({"tp": 4, "enc_tp": 4}, {"tp": 4, "enc_tp": 1}, {"tp": 4, "enc_tp": 2})
    sites = _sites(whisper, *plans)
    # Encoder replicas split the prompts: same math per GPU, more weights, fewer collectives.
    np.testing.assert_array_equal(sites.encoder.enc_dp, [1, 4, 2])
    enc_flops, enc_weights = _gemm_work(sites, encoder=True)
    np.testing.assert_allclose(enc_flops, enc_flops[0])
    assert enc_weights[1] > enc_weights[2] > enc_weights[0]
    _, _, enc_bytes, enc_calls = _comm(whisper, *plans)
    assert enc_calls[0] == 2 * whisper.num_encoder_layers
    h = whisper.hidden_size * 2
    enc = 2 * 2 * (3 / 4) * h * whisper.num_encoder_layers
    assert enc_bytes[0] == pytest.approx(enc)
    # Encoder 4 x TP1 hands its output to the TP4 decoder attention: one all-gather.
    assert enc_bytes[1] == pytest.approx((3 / 4) * h)
    # Decode-time GEMMs: self-attention, the cross-attention's q and o projections (its k
    # and v are computed once, at prefill), and the MLP.
    h_attn = whisper.hidden_size * whisper.num_heads * whisper.head_dim
    per_layer = 2 * (4 * h_attn + 2 * h_attn + whisper.mlp_params_per_expert)
    assert _gemm_work(sites)[0][0] == pytest.approx(per_layer / 4)
    # Bidirectional encoder attention: 20 heads over the encoder's TP GPUs.
    np.testing.assert_allclose(sites.encoder.attention.heads, [5, 20, 10])
