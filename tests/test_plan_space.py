"""The full plan space (issue 5): APEX's plan kinds, MoE expert parallelism, encoder-decoder
models, the extra axes, validity rules, descriptions, memory and the space summary."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import apex_jax
from apex_jax.hardware import get_gpu
from apex_jax.memory import memory_plan
from apex_jax.model_spec import load_model
from apex_jax.plans import (
    COL,
    REASONS,
    PlanSpace,
    describe_plan,
    enumerate_space,
    plan_from_description,
    plan_row,
    plan_to_dict,
    stage_layers,
)

LLAMA3_70B = "meta-llama/Meta-Llama-3-70B"
MIXTRAL = "mistralai/Mixtral-8x7B-v0.1"
T5 = "google/flan-t5-xxl"
WHISPER = "openai/whisper-large-v3"


@pytest.fixture(scope="module")
def llama_space():
    return apex_jax.plan_space(model=LLAMA3_70B, hardware="H100-SXM-80GB", num_gpus=8)


@pytest.fixture(scope="module")
def mixtral_space():
    return apex_jax.plan_space(model=MIXTRAL, hardware="H100-SXM-80GB", num_gpus=8)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _cell(replicas: int, gpus: int, text: str) -> str:
    return text if replicas == 1 else f"DP{replicas}×{text}"


def _apex_kinds(num_gpus: int, model) -> set[str]:
    """The parallel schedules APEX's search engine generates for a decoder of one attention
    and one FFN cell on one node, written from its rules (apex_plus/search/engine.py):
    model replicas and stages over divisors with the blocks dividing evenly, per cell a
    replica count over the stage's divisors and a task split needing at least as many heads
    (or MLP filters) as GPUs, cell replica counts coprime; weight-OOM plans are kept here
    (our space marks them OOM instead of leaving them out)."""
    kinds = set()
    for dp in _divisors(num_gpus):
        for pp in _divisors(num_gpus // dp):
            if model.num_layers % pp:
                continue
            n = num_gpus // dp // pp
            attn = [(r, n // r) for r in _divisors(n) if model.num_heads >= n // r]
            mlp = [(r, n // r) for r in _divisors(n) if model.intermediate_size >= n // r]
            for (ra, ta), (rm, tm) in itertools.product(attn, mlp):
                if math.gcd(ra, rm) != 1:
                    continue
                kinds.add(
                    f"DP{dp} · PP{pp} · attn {_cell(ra, ta, f'TP{ta}')} · "
                    f"mlp {_cell(rm, tm, f'TP{tm}')}"
                )
    return kinds


def test_llama_3_70b_on_8_h100_has_every_apex_kind_and_1000_plans(llama_space):
    kinds = llama_space.kinds()
    apex = _apex_kinds(8, load_model(LLAMA3_70B))
    assert len(apex) == 30
    assert apex <= set(kinds), sorted(apex - set(kinds))
    # The kinds, for the record (pytest -s shows them).
    print("\n".join(kinds))
    assert len(llama_space) >= 1000
    assert len(llama_space.describe()) == len(llama_space)
    # Cell-level plans, not only DP x TP x PP: attention DP and FFN DP inside a stage.
    assert any("attn DP" in k for k in kinds) and any("mlp DP" in k for k in kinds)
    # The extra axes are in the default space.
    plans = llama_space.plans
    for column, values in (
        ("weight_dtype", 2),
        ("kv_dtype", 2),
        ("max_num_seqs", 2),
        ("chunked_prefill", 2),
        ("gpu_clock_mhz", 2),
    ):
        assert len(np.unique(plans[:, COL[column]])) == values, column
    # Most of them fit; bf16 weights on one GPU do not.
    assert llama_space.fits.sum() >= 1000 and not llama_space.fits.all()


def test_mixtral_has_expert_parallel_plans(mixtral_space):
    kinds = mixtral_space.kinds()
    ep_kinds = [k for k in kinds if "EP" in k]
    assert ep_kinds and all("moe" in k for k in kinds)
    for text in ("moe EP8", "moe EP2×TP4", "moe EP4", "moe TP8"):
        assert any(text in k for k in kinds), text
    ep = mixtral_space.plans[:, COL["ep"]]
    assert (ep > 1).any() and (mixtral_space.fits & (ep > 1)).any()
    # EP ranks split the 8 experts evenly and expert TP splits the rest of the FFN group.
    mlp_tp = mixtral_space.plans[:, COL["mlp_tp"]]
    assert (8 % ep == 0).all() and (mlp_tp % ep == 0).all()


@pytest.mark.parametrize("name", [T5, WHISPER])
def test_encoder_decoder_models_plan_their_encoder(name):
    space = apex_jax.plan_space(model=name, hardware="h100", num_gpus=8)
    plans = space.plans
    enc_tp, tp = plans[:, COL["enc_tp"]], plans[:, COL["tp"]]
    assert (enc_tp >= 1).all() and (tp % enc_tp == 0).all()
    assert (enc_tp < tp).any(), "encoder replicas inside a stage"
    # vLLM has no chunked prefill for encoder-decoder models.
    assert (plans[:, COL["chunked_prefill"]] == 0).all()
    assert all(d.split(" · ")[2].startswith("enc ") for d in space.describe())


def test_describe_reads_back_and_is_unique(llama_space, mixtral_space):
    whisper = apex_jax.plan_space(model=WHISPER, hardware="h100", num_gpus=8)
    for space in (llama_space, mixtral_space, whisper):
        texts = space.describe()
        assert len(set(texts)) == len(texts)
        for row, text in zip(space.plans, texts):
            np.testing.assert_array_equal(plan_from_description(text), row, err_msg=text)


def test_issue_example_description():
    row = plan_row(
        {
            "dp": 2,
            "tp": 4,
            "mlp_tp": 4,
            "ep": 4,
            "weight_dtype": "fp8",
            "kv_dtype": "fp8",
            "max_num_seqs": 256,
            "max_num_batched_tokens": 2048,
            "chunked_prefill": 1,
            "gpu_clock_mhz": 1980,
        }
    )
    text = "DP2 · PP1 · attn TP4 · moe EP4 · W fp8 / KV fp8 · seqs 256 · chunk 2048 · 1980 MHz"
    assert describe_plan(row) == text
    np.testing.assert_array_equal(plan_from_description(text), row)
    with pytest.raises(ValueError, match="not part of a plan description"):
        plan_from_description("DP2 · PP1 · attn TP4 · gremlins 3")


def test_classic_plan_rows_keep_their_meaning():
    row = plan_row({"dp": 2, "tp": 4, "weight_dtype": "fp8"})
    assert row[COL["attn_tp"]] == row[COL["mlp_tp"]] == 4 and row[COL["ep"]] == 1
    assert row[COL["enc_tp"]] == 0 and row[COL["gpu_clock_mhz"]] == 0
    # fp8 weights run W8A8 by default, int8 weights weight-only with bf16 activations.
    assert plan_to_dict(row)["act_dtype"] == "fp8"
    assert plan_to_dict(plan_row({"weight_dtype": "int8"}))["act_dtype"] == "bf16"


# ------------------------------------------------------------------------------------------
# Validity rules
# ------------------------------------------------------------------------------------------


def _space(model, **axes):
    return enumerate_space(
        PlanSpace(**axes), num_gpus=8, gpus_per_node=8, model=load_model(model), max_clock_mhz=1980
    )


def test_cell_replica_counts_are_coprime_and_split_heads():
    e = _space(WHISPER, attn_dp=None, mlp_dp=None, enc_dp=None)
    c = e.plans
    attn_dp = c[:, COL["tp"]] // c[:, COL["attn_tp"]]
    mlp_dp = c[:, COL["tp"]] // c[:, COL["mlp_tp"]]
    assert all(math.gcd(int(a), int(m)) == 1 for a, m in zip(attn_dp, mlp_dp))
    # Whisper's 20 heads: attention TP 8 is impossible, FFN TP 8 is fine.
    assert (20 % c[:, COL["attn_tp"]] == 0).all() and (c[:, COL["mlp_tp"]] == 8).any()
    assert set(e.dropped) <= set(REASONS)
    assert e.dropped["attention and FFN replica counts share a factor (that is model-level DP)"] > 0


def test_stages_stay_inside_a_node_across_nodes():
    model = load_model(LLAMA3_70B)
    e = enumerate_space(
        PlanSpace(attn_dp=None, mlp_dp=None), num_gpus=16, gpus_per_node=8, model=model
    )
    assert (8 % e.plans[:, COL["tp"]] == 0).all()
    assert (e.plans[:, COL["dp"]] * e.plans[:, COL["tp"]] * e.plans[:, COL["pp"]] == 16).all()


def test_uneven_pipeline_splits():
    assert stage_layers(80, 3) == [27, 27, 26]
    # The longer stages are the middle ones: the ends also hold the embedding and LM head.
    assert stage_layers(10, 4) == [2, 3, 3, 2]
    for layers, pp in itertools.product([1, 7, 32, 80, 81, 126], [1, 2, 3, 4, 5, 8]):
        if pp > layers:
            continue
        counts = stage_layers(layers, pp)
        assert sum(counts) == layers and max(counts) - min(counts) <= 1
    # Uneven splits are in the space unless turned off.
    on = _space("meta-llama/Llama-3.1-8B", pp=[3], use_all_gpus=False).plans
    assert (on[:, COL["pp"]] == 3).any()
    off = _space("meta-llama/Llama-3.1-8B", pp=[3, 4], use_all_gpus=False, uneven_pp=False)
    assert (off.plans[:, COL["pp"]] == 4).all() and off.dropped


def test_engine_knob_rules():
    e = _space(
        T5,
        chunked_prefill=(0, 1),
        max_num_batched_tokens=(1024, 4096),
        max_num_seqs=(256, 2048),
        weight_dtype=("bf16", "int4"),
        act_dtype=("auto", "fp8"),
        gpu_clock_mhz=(1980, 2500),
    )
    p = e.plans
    assert (p[:, COL["chunked_prefill"]] == 0).all()
    assert (p[:, COL["max_num_batched_tokens"]] >= p[:, COL["max_num_seqs"]]).all()
    assert (p[:, COL["gpu_clock_mhz"]] <= 1980).all()
    for reason in (
        "chunked prefill on an encoder-decoder model (vLLM rejects it)",
        "max_num_batched_tokens below max_num_seqs (vLLM rejects it)",
        "GPU clock above the GPU's boost clock",
        "no GEMM kernel takes these weight and activation dtypes",
    ):
        assert e.dropped.get(reason, 0) > 0, reason


@pytest.mark.parametrize(
    "plan, message",
    [
        ({"tp": 8, "attn_tp": 4, "mlp_tp": 2}, "share a factor"),
        ({"tp": 8, "mlp_tp": 8, "ep": 2}, "EP > 1 on a dense model"),
        ({"tp": 8, "attn_tp": 3}, "attn_tp"),
    ],
)
def test_invalid_explicit_plans_name_the_rule(plan, message):
    with pytest.raises(ValueError, match=message):
        apex_jax.simulate(
            model="meta-llama/Llama-3.1-8B",
            hardware="h100",
            num_gpus=8,
            plan=plan,
            workload={"kind": "static_batch", "batch_size": 2, "isl": 64, "osl": 4},
        )


def test_chunked_prefill_is_rejected_for_encoder_decoder_models():
    with pytest.raises(ValueError, match="chunked prefill"):
        apex_jax.simulate(
            model=WHISPER,
            hardware="h100",
            num_gpus=1,
            plan={"chunked_prefill": 1, "max_num_batched_tokens": 512},
            workload={"kind": "static_batch", "batch_size": 2, "isl": 1500, "osl": 8},
            engine={"name": "vllm", "version": "0.6.0"},
        )


# ------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [LLAMA3_70B, MIXTRAL, WHISPER, "openai/gpt3-175b"])
def test_memory_vectorised_equals_per_row(name):
    model = load_model(name)
    gpu = get_gpu("H100-SXM-80GB")
    space = PlanSpace(
        attn_dp=None,
        mlp_dp=None,
        ep=None,
        enc_dp=None,
        weight_dtype=("bf16", "fp8"),
        kv_dtype=("bf16", "fp8"),
        max_num_batched_tokens=(2048, 8192),
        chunked_prefill=(0,),
        use_all_gpus=False,
    )
    plans = enumerate_space(space, num_gpus=8, gpus_per_node=8, model=model).plans
    whole = memory_plan(plans, model, gpu)
    assert whole.is_oom.any() or name == WHISPER
    for i in range(0, len(plans), 7):
        one = memory_plan(plans[i : i + 1], model, gpu)
        for field, values in zip(whole._fields, whole):
            np.testing.assert_array_equal(getattr(one, field)[0], values[i], err_msg=field)


def test_attention_dp_multiplies_kv_pages_and_ffn_dp_replicates_weights():
    model = load_model(LLAMA3_70B)
    gpu = get_gpu("h100")
    rows = np.stack(
        [
            plan_row({"tp": 8}),
            plan_row({"tp": 8, "attn_tp": 4}),  # 2 attention replicas
            plan_row({"tp": 8, "mlp_tp": 4}),  # 2 FFN replicas
        ]
    )
    mem = memory_plan(rows, model, gpu)
    # Narrower cells hold more weights per GPU.
    assert mem.weight_bytes[1] > mem.weight_bytes[0] and mem.weight_bytes[2] > mem.weight_bytes[0]
    # Each attention replica keeps its own sequences' KV: pages per GPU group times replicas.
    per_group = np.floor(mem.kv_bytes[1] / (mem.kv_bytes_per_token[1] * 16))
    assert mem.num_kv_blocks[1] == 2 * per_group
    assert mem.kv_bytes_per_token[1] == 2 * mem.kv_bytes_per_token[0]


def test_uneven_pipeline_memory_binds_on_the_fullest_stage():
    model = load_model("meta-llama/Llama-3.1-8B")  # 32 layers
    gpu = get_gpu("h100")
    mem = memory_plan(np.stack([plan_row({"pp": 3}), plan_row({"pp": 4})]), model, gpu)
    layer_kv = 2 * model.num_kv_heads * model.head_dim * 2
    # Stages of 11/11/10 layers: the binding stage holds 11 layers of KV per token.
    assert mem.kv_bytes_per_token[0] == 11 * layer_kv
    assert mem.kv_bytes_per_token[1] == 8 * layer_kv


# ------------------------------------------------------------------------------------------
# The summary
# ------------------------------------------------------------------------------------------


def test_summary_counts_add_up(llama_space):
    from apex_jax.workload import workload_from_dict

    workload = workload_from_dict({"kind": "static_batch", "batch_size": 4, "isl": 9000, "osl": 16})
    s = llama_space.summary(workload)
    assert s["num_plans"] == len(llama_space) == s["num_layouts"] * s["num_knob_settings"]
    for axis, counts in s["axes"].items():
        assert sum(counts.values()) == len(llama_space), axis
    assert s["num_plans"] + sum(s["left_out"].values()) == s["num_candidates"]
    assert sum(s["oom"].values()) + sum(s["refused"].values()) + s["fit"] == s["num_plans"]
    # 9,016-token requests exceed Llama-3's 8,192-token context.
    assert s["rejecting"]["a request exceeds max_model_len"] == s["fit"]
    text = llama_space.format_summary(workload)
    assert "Plans per axis value" in text and "left out" in text and "OOM" in text
