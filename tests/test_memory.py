"""Per-GPU memory of plans: structural invariants, not calibrated constants."""

from __future__ import annotations

import numpy as np
import pytest

from apex_jax.hardware import get_gpu
from apex_jax.memory import ENGINE_RESERVE_BYTES, memory_plan
from apex_jax.model_spec import load_model
from apex_jax.plans import COL, PlanSpace, enumerate_plans, plan_row


@pytest.fixture(scope="module")
def llama70b():
    return load_model("meta-llama/Llama-3.1-70B")


@pytest.fixture(scope="module")
def h100():
    return get_gpu("H100-SXM-80GB")


def _rows(*plans):
    return np.stack([plan_row(p) for p in plans])


def test_more_tp_means_fewer_weight_bytes_per_gpu(llama70b, h100):
    mem = memory_plan(_rows(*({"tp": tp} for tp in (1, 2, 4, 8))), llama70b, h100)
    assert (np.diff(mem.weight_bytes) < 0).all()
    # TP splits every weight evenly: the bytes times the degree stay the same.
    np.testing.assert_allclose(mem.weight_bytes * [1, 2, 4, 8], mem.weight_bytes[0], rtol=1e-12)
    # Fewer weight bytes leave more room for the KV cache.
    assert (np.diff(mem.kv_bytes) > 0).all()


def test_more_pp_means_fewer_weight_bytes_per_gpu(llama70b, h100):
    mem = memory_plan(_rows(*({"pp": pp} for pp in (1, 2, 4, 8))), llama70b, h100)
    assert (np.diff(mem.weight_bytes) < 0).all()
    assert (np.diff(mem.kv_bytes_per_token) < 0).all()


def test_fp8_weights_halve_weight_bytes(llama70b, h100):
    mem = memory_plan(_rows({"tp": 4}, {"tp": 4, "weight_dtype": "fp8"}), llama70b, h100)
    np.testing.assert_allclose(mem.weight_bytes[1], mem.weight_bytes[0] / 2, rtol=1e-12)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_fp8_kv_about_doubles_the_kv_blocks(llama70b, h100, tp):
    mem = memory_plan(_rows({"tp": tp}, {"tp": tp, "kv_dtype": "fp8"}), llama70b, h100)
    bf16, fp8 = (int(b) for b in mem.num_kv_blocks)
    assert bf16 > 0
    np.testing.assert_allclose(mem.kv_bytes_per_token[1], mem.kv_bytes_per_token[0] / 2)
    # Same bytes for KV, half the bytes per page: twice the pages, up to floor rounding.
    assert 2 * bf16 <= fp8 <= 2 * bf16 + 1


def test_llama_70b_bf16_does_not_fit_one_h100(llama70b, h100):
    mem = memory_plan(_rows({"tp": 1}, {"tp": 8}), llama70b, h100)
    assert mem.is_oom.tolist() == [True, False]
    assert mem.num_kv_blocks[0] == 0
    # 70B parameters in bf16 are ~140 GB: more than the whole GPU.
    assert mem.weight_bytes[0] > h100.hbm_capacity_bytes
    assert mem.num_kv_blocks[1] > 0


def _space_plans(model):
    space = PlanSpace(
        weight_dtype=("bf16", "fp8", "int4"),
        kv_dtype=("bf16", "fp8"),
        max_num_seqs=(64, 256),
        max_num_batched_tokens=(2048, 8192),
        block_size=(16, 32),
        gpu_mem_util=(0.5, 0.9),
        use_all_gpus=False,
    )
    return enumerate_plans(
        space,
        num_gpus=8,
        gpus_per_node=8,
        num_layers=model.num_layers,
        num_heads=model.num_heads,
        num_kv_heads=model.num_kv_heads,
    )


@pytest.mark.parametrize("model_name", ["meta-llama/Llama-3.1-70B", "mistralai/Mixtral-8x7B-v0.1"])
def test_vectorised_equals_per_row(model_name, h100):
    model = load_model(model_name)
    plans = _space_plans(model)
    whole = memory_plan(plans, model, h100)
    assert whole.is_oom.any() and not whole.is_oom.all(), "want a mix of fitting and OOM plans"
    for i, row in enumerate(plans):
        one = memory_plan(row[None, :], model, h100)
        for field, values in zip(whole._fields, whole):
            np.testing.assert_array_equal(getattr(one, field)[0], values[i], err_msg=field)


def test_memory_budget_is_conserved(llama70b, h100):
    plans = _space_plans(llama70b)
    mem = memory_plan(plans, llama70b, h100)
    util = plans[:, COL["gpu_mem_util_permille"]] / 1000.0
    budget = util * h100.hbm_capacity_bytes
    np.testing.assert_allclose(
        mem.weight_bytes + mem.activation_bytes + ENGINE_RESERVE_BYTES + mem.kv_bytes,
        budget,
        rtol=1e-12,
    )
    # The pages never take more than the bytes left for them, and OOM means not one page.
    block_size = plans[:, COL["block_size"]]
    page_bytes = mem.kv_bytes_per_token * block_size
    assert (mem.num_kv_blocks * page_bytes <= np.maximum(mem.kv_bytes, 0.0) + 1e-6).all()
    assert (mem.num_kv_blocks[~mem.is_oom] >= 1).all()
    assert (mem.num_kv_blocks[mem.is_oom] == 0).all()
    assert mem.num_kv_blocks.dtype == np.int64 and mem.is_oom.dtype == bool


def test_more_memory_utilisation_means_more_blocks(llama70b, h100):
    mem = memory_plan(
        _rows({"tp": 8, "gpu_mem_util": 0.8}, {"tp": 8, "gpu_mem_util": 0.9}), llama70b, h100
    )
    assert mem.num_kv_blocks[1] > mem.num_kv_blocks[0]
    np.testing.assert_array_equal(mem.weight_bytes[0], mem.weight_bytes[1])
