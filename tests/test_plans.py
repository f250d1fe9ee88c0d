"""The plan tensor: enumeration rules, encoding round trips and errors that name the key."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from apex_jax.model_spec import load_model
from apex_jax.plans import (
    COL,
    COLUMNS,
    NUM_COLUMNS,
    PlanSpace,
    check_plan,
    describe_plan,
    enumerate_plans,
    plan_row,
    plan_to_dict,
)

_SHAPE_KEYS = ("num_gpus", "gpus_per_node", "num_layers", "num_heads", "num_kv_heads")


def _enumerate(space: PlanSpace | None = None, **shape):
    """Enumerate for Llama-3.1-70B's shape on 1 x 8 GPUs unless ``shape`` overrides it."""
    args = dict(zip(_SHAPE_KEYS, (8, 8, 80, 64, 8)))
    args.update(shape)
    return enumerate_plans(space or PlanSpace(), **args)


def _parallel(plans: np.ndarray) -> set[tuple[int, int, int]]:
    return {(int(r[COL["dp"]]), int(r[COL["tp"]]), int(r[COL["pp"]])) for r in plans}


def _expected(num_gpus, gpus_per_node, num_layers, num_heads, num_kv_heads, use_all=True):
    """The rules of issue 2 plus the topology rule of issue 5 (a stage's GPUs divide a node,
    so TP never straddles nodes), written independently of plans.py."""
    out = set()
    divisors = [d for d in range(1, num_gpus + 1) if num_gpus % d == 0]
    for dp, tp, pp in itertools.product(divisors, repeat=3):
        used = dp * tp * pp
        if used > num_gpus or (use_all and used != num_gpus):
            continue
        kv_ok = num_kv_heads % tp == 0 or tp % num_kv_heads == 0
        if num_heads % tp == 0 and kv_ok and gpus_per_node % tp == 0 and pp <= num_layers:
            out.add((dp, tp, pp))
    return out


def test_llama_70b_on_8_gpus_is_every_dp_tp_pp_split():
    m = load_model("meta-llama/Llama-3.1-70B")
    plans = _enumerate(num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads)
    assert plans.dtype == np.int32
    assert plans.shape == (10, NUM_COLUMNS)
    assert _parallel(plans) == {
        (dp, tp, pp)
        for dp, tp, pp in itertools.product([1, 2, 4, 8], repeat=3)
        if dp * tp * pp == 8
    }


@pytest.mark.parametrize(
    "shape",
    [
        # num_gpus, gpus_per_node, num_layers, num_heads, num_kv_heads
        (8, 8, 80, 64, 8),
        (12, 4, 32, 12, 12),
        (16, 8, 2, 24, 3),
        (32, 8, 126, 128, 8),
        (6, 6, 40, 6, 1),
    ],
)
@pytest.mark.parametrize("use_all", [True, False])
def test_enumeration_matches_the_rules(shape, use_all):
    plans = _enumerate(PlanSpace(use_all_gpus=use_all), **dict(zip(_SHAPE_KEYS, shape)))
    assert _parallel(plans) == _expected(*shape, use_all=use_all)
    assert len({tuple(r) for r in plans}) == len(plans), "duplicate plans"


def test_tp_must_divide_the_heads():
    # 12 heads: tp 8 does not divide them, tp 4 does.
    plans = _enumerate(num_heads=12, num_kv_heads=12)
    tps = set(plans[:, COL["tp"]].tolist())
    assert 4 in tps and 8 not in tps
    assert all(12 % tp == 0 for tp in tps)


def test_tp_must_split_or_replicate_kv_heads():
    # 24 query heads, 3 KV heads: tp 2 divides the query heads but neither divides nor is a
    # multiple of 3 KV heads; tp 6 is a multiple (vLLM replicates KV heads).
    plans = _enumerate(num_gpus=12, gpus_per_node=12, num_heads=24, num_kv_heads=3)
    tps = set(plans[:, COL["tp"]].tolist())
    assert 2 not in tps and 4 not in tps
    assert {1, 3, 6, 12} <= tps


def test_tp_stays_inside_a_node():
    plans = _enumerate(num_gpus=16, gpus_per_node=4)
    tps = plans[:, COL["tp"]]
    assert tps.max() == 4
    # The rest of the cluster is reached by DP and PP.
    assert (plans[:, COL["dp"]] * tps * plans[:, COL["pp"]] == 16).all()
    assert plans[:, COL["pp"]].max() == 16


def test_pp_has_at_most_one_stage_per_layer():
    plans = _enumerate(num_layers=2)
    assert plans[:, COL["pp"]].max() == 2


def test_knob_axes_multiply_the_space():
    base = _enumerate()
    space = PlanSpace(
        weight_dtype=("bf16", "fp8"), kv_dtype=("bf16", "fp8"), max_num_seqs=(64, 256)
    )
    plans = _enumerate(space)
    assert len(plans) == 8 * len(base)
    assert _parallel(plans) == _parallel(base)
    assert set(plans[:, COL["max_num_seqs"]].tolist()) == {64, 256}


def test_explicit_degree_lists_restrict_the_space():
    plans = _enumerate(PlanSpace(tp=[4, 8], pp=[1]))
    assert _parallel(plans) == {(2, 4, 1), (1, 8, 1)}


def test_empty_space_is_a_clear_error():
    with pytest.raises(ValueError, match="plan space is empty"):
        _enumerate(PlanSpace(tp=[3]))


def test_row_dict_row_round_trip():
    space = PlanSpace(
        weight_dtype=("bf16", "fp8", "int4"),
        kv_dtype=("bf16", "fp8"),
        max_num_seqs=(128, 256),
        block_size=(16, 32),
        gpu_mem_util=(0.9, 0.97),
    )
    plans = _enumerate(space)
    descriptions = set()
    for row in plans:
        as_dict = plan_to_dict(row)
        np.testing.assert_array_equal(plan_row(as_dict), row)
        assert as_dict["weight_dtype"] in ("bf16", "fp8", "int4")
        assert as_dict["gpu_mem_util"] in (0.9, 0.97)
        text = describe_plan(row)
        for part in (f"DP{as_dict['dp']}", f"TP{as_dict['tp']}", f"PP{as_dict['pp']}"):
            assert part in text
        assert as_dict["weight_dtype"] in text and as_dict["kv_dtype"] in text
        descriptions.add(text)
    assert len(descriptions) == len(plans), "two plans share a description"


def test_plan_row_fills_defaults_and_reads_fractions():
    row = plan_row({"dp": 2, "tp": 4, "kv_dtype": "fp8", "gpu_mem_util": 0.97})
    d = plan_to_dict(row)
    assert (d["dp"], d["tp"], d["pp"]) == (2, 4, 1)
    assert d["kv_dtype"] == "fp8" and d["weight_dtype"] == "bf16"
    assert row[COL["gpu_mem_util_permille"]] == 970
    assert row.dtype == np.int32 and row.shape == (len(COLUMNS),)
    with_defaults = plan_row({"tp": 2}, defaults={"max_num_seqs": 64})
    assert with_defaults[COL["max_num_seqs"]] == 64


@pytest.mark.parametrize(
    "plan, key",
    [
        ({"dq": 2}, "dq"),
        ({"tensor_parallel": 2}, "tensor_parallel"),
        ({"tp": 0}, "tp"),
        ({"dp": -1}, "dp"),
        ({"pp": 1.5}, "pp"),
        ({"max_num_seqs": "many"}, "max_num_seqs"),
        ({"block_size": 0}, "block_size"),
        ({"kv_dtype": "fp7"}, "kv_dtype"),
        ({"weight_dtype": "float9"}, "weight_dtype"),
    ],
)
def test_bad_plan_keys_name_the_key(plan, key):
    with pytest.raises(ValueError) as info:
        plan_row(plan)
    assert repr(key) in str(info.value)


@pytest.mark.parametrize(
    ("plan", "problem"),
    [
        ({"weight_dtype": "fp8_block"}, None),  # fp8 activations, per group of 128
        ({"weight_dtype": "fp8_block", "act_dtype": "bf16"}, None),  # weight-only W8A16
        ({"weight_dtype": "fp8_block", "act_dtype": "fp8_block"}, "no GEMM kernel"),
        ({"kv_dtype": "fp8_block"}, "fp8_block is a weight format"),
    ],
)
def test_block_fp8_is_a_weight_format_with_fp8_activations(plan, problem):
    model = load_model("Qwen/Qwen3-235B-A22B")
    row = plan_row({"tp": 4} | plan)
    found = check_plan(row, model, num_gpus=4, gpus_per_node=8)
    if problem is None:
        assert found is None
        assert plan_to_dict(row)["act_dtype"] == plan.get("act_dtype", "fp8")
    else:
        assert problem in found
