"""Work and communication of cell-level, MoE, encoder and pipeline layouts
(apex_jax.cost.parallel), checked against values computed independently here."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest

from apex_jax.cost.parallel import (
    cross_node_transfers,
    layout_collectives,
    layout_cost,
    moe_load_factor,
    moe_rank_hit_probability,
)
from apex_jax.hardware import get_gpu
from apex_jax.model_spec import load_model
from apex_jax.plans import plan_row

H100 = get_gpu("H100-SXM-80GB")


def _rows(*plans):
    return np.stack([plan_row(p) for p in plans])


def _cost(model, *plans, gpus_per_node=8):
    return layout_cost(_rows(*plans), model, H100, gpus_per_node=gpus_per_node)


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
        c = _cost(model, {"tp": tp})
        per_layer = 2 * 2 * (tp - 1) / tp * model.hidden_size * 2
        assert c.comm_bytes_per_token[0] == pytest.approx(model.num_layers * per_layer)
        assert c.comm_calls[0] == (2 * model.num_layers if tp > 1 else 0)


def test_attention_dp_reshards_with_reduce_scatter_and_all_gather():
    """Attention 2 x TP4, FFN TP8 on 8 GPUs: each layer reduce-scatters and all-gathers half
    the tokens over 4 GPUs around attention, and all the tokens over 8 around the FFN."""
    model = load_model("meta-llama/Llama-3.1-70B")
    c = _cost(model, {"tp": 8, "attn_tp": 4, "mlp_tp": 8})
    h = model.hidden_size * 2
    per_layer = 2 * (3 / 4) * 0.5 * h + 2 * (7 / 8) * 1.0 * h
    assert c.comm_bytes_per_token[0] == pytest.approx(model.num_layers * per_layer)
    assert c.comm_calls[0] == 4 * model.num_layers
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
    c = _cost(model, *layouts)
    # Every GPU computes 1/8 of every cell, and reads 1/8 of the KV (8 KV heads >= attn TP).
    np.testing.assert_allclose(c.gemm_flops_per_token, c.gemm_flops_per_token[0], rtol=1e-12)
    np.testing.assert_allclose(
        c.decode_kv_elems_per_kv_token, c.decode_kv_elems_per_kv_token[0], rtol=1e-12
    )
    # Narrower cells stream more weights per GPU.
    assert (c.gemm_weight_params[1:] > c.gemm_weight_params[0]).all()
    assert c.gemm_weight_params[2] > c.gemm_weight_params[1]


def test_kv_head_replication_costs_reads_only_past_the_kv_heads():
    model = load_model("meta-llama/Llama-3.1-8B")  # 8 KV heads
    c = _cost(model, {"tp": 8}, {"tp": 8, "attn_tp": 8}, {"tp": 4}, {"tp": 8, "attn_tp": 4})
    np.testing.assert_allclose(
        c.decode_kv_elems_per_kv_token[[0, 1, 3]], c.decode_kv_elems_per_kv_token[0]
    )
    mqa = dataclasses.replace(model, num_kv_heads=1)
    r = _cost(mqa, {"tp": 8}, {"tp": 8, "attn_tp": 1})
    # TP8 replicates the one KV head on all 8 GPUs, each reading every token; 8 attention
    # replicas each read only their own sequences.
    assert r.decode_kv_elems_per_kv_token[0] == pytest.approx(8 * r.decode_kv_elems_per_kv_token[1])


def test_expert_parallelism_adds_all_to_all_and_skew_raises_compute():
    mixtral = load_model("mistralai/Mixtral-8x7B-v0.1")
    plans = [
        {"tp": 8, "mlp_tp": 8},
        {"tp": 8, "mlp_tp": 8, "ep": 8},
        {"tp": 8, "mlp_tp": 8, "ep": 2},
    ]
    c = _cost(mixtral, *plans)
    h = mixtral.hidden_size * 2
    # EP8, one expert a rank: RS/AG over 8 GPUs around attention, then each GPU sends its
    # 1/8 of the tokens to the ranks of their two experts (7 of 8 are remote), and back.
    hit = moe_rank_hit_probability(8, 2, np.array([1.0]))[0]
    per_layer = 2 * (7 / 8) * h + 2 * (1 / 8) * hit * 8 * (7 / 8) * h
    assert c.comm_bytes_per_token[1] == pytest.approx(mixtral.num_layers * per_layer)
    assert c.comm_calls[1] == mixtral.num_layers * 4
    np.testing.assert_allclose(c.gemm_flops_per_token, c.gemm_flops_per_token[0])
    skewed = dataclasses.replace(mixtral, moe_routing_skew=1.0)
    s = _cost(skewed, *plans)
    assert s.gemm_flops_per_token[0] == c.gemm_flops_per_token[0]
    assert s.gemm_flops_per_token[1] > s.gemm_flops_per_token[2] > s.gemm_flops_per_token[0]
    assert s.comm_bytes_per_token[1] > c.comm_bytes_per_token[1]


def test_cross_node_transfers_follow_the_placement():
    rows = _rows(
        {"tp": 8, "pp": 2},  # two stages, one per node
        {"tp": 4, "pp": 4},  # 4 stages over 2 nodes: one crossing
        {"dp": 2, "tp": 4, "pp": 2},  # each replica is one node
        {"tp": 2, "pp": 8},
        {"tp": 8},
        {"dp": 4, "tp": 1, "pp": 4},
    )
    np.testing.assert_array_equal(cross_node_transfers(rows, 8), [1, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(cross_node_transfers(rows, 4), [1, 3, 1, 3, 0, 0])
    model = load_model("meta-llama/Llama-3.1-70B")
    c = layout_cost(rows, model, H100, gpus_per_node=8)
    h = model.hidden_size * 2
    np.testing.assert_allclose(c.pp_network_bytes_per_token, np.array([1, 1, 0, 1, 0, 0]) * h)
    np.testing.assert_allclose(
        c.pp_nvlink_bytes_per_token + c.pp_network_bytes_per_token,
        (rows[:, 2] - 1) * h,
    )


def test_clock_slows_compute_only():
    model = load_model("meta-llama/Llama-3.1-8B")
    c = _cost(model, {"gpu_clock_mhz": 1980}, {"gpu_clock_mhz": 990}, {})
    np.testing.assert_allclose(c.compute_slowdown, [1.0, 2.0, 1.0])


def test_encoder_terms():
    whisper = load_model("openai/whisper-large-v3")
    llama = load_model("meta-llama/Llama-3.1-8B")
    assert not _cost(llama, {"tp": 2}).enc_flops_per_token.any()
    c = _cost(whisper, {"tp": 4, "enc_tp": 4}, {"tp": 4, "enc_tp": 1}, {"tp": 4, "enc_tp": 2})
    assert (c.is_encoder_decoder == 1).all()
    # Encoder replicas split the prompts: same math per GPU, more weights, fewer collectives.
    np.testing.assert_allclose(c.enc_flops_per_token, c.enc_flops_per_token[0])
    assert c.enc_weight_params[1] > c.enc_weight_params[2] > c.enc_weight_params[0]
    assert c.enc_comm_calls[0] == 2 * whisper.num_encoder_layers
    h = whisper.hidden_size * 2
    enc = 2 * 2 * (3 / 4) * h * whisper.num_encoder_layers
    assert c.enc_comm_bytes_per_token[0] == pytest.approx(enc)
    # Encoder 4 x TP1 hands its output to the TP4 decoder attention: one all-gather.
    assert c.enc_comm_bytes_per_token[1] == pytest.approx((3 / 4) * h)
    # Decode-time GEMMs: self-attention, the cross-attention's q and o projections (its k
    # and v are computed once, at prefill), and the MLP.
    h_attn = whisper.hidden_size * whisper.num_heads * whisper.head_dim
    per_layer = 2 * (4 * h_attn + 2 * h_attn + whisper.mlp_params_per_expert)
    assert c.gemm_flops_per_token[0] == pytest.approx(whisper.num_layers * per_layer / 4)
    assert math.isclose(c.enc_flops_per_pair[0], 2 * 4 * 20 * 64 * 32 / 4)
