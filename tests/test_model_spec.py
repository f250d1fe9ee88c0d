"""Tests for ModelSpec, the model catalog and HuggingFace config parsing."""

import dataclasses
import json
from pathlib import Path

import jax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from apex_jax import model_spec
from apex_jax.model_spec import (
    MODEL_CATALOG,
    ModelSpec,
    list_models,
    load_model,
    model_from_hf_config,
)

BUNDLED_DIR = Path(model_spec.__file__).parent / "data" / "models"

# Published parameter totals. The exact ones are the safetensors counts on each model's
# HuggingFace page: these models have no biases, so the no-bias count must match exactly.
EXACT_PARAMS = {
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248,
    "meta-llama/Llama-3.1-70B": 70_553_706_496,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "mistralai/Mixtral-8x7B-v0.1": 46_702_792_704,
}
# Rounded totals from model cards and papers, checked within 2%.
APPROX_PARAMS = {
    "meta-llama/Llama-2-7b-hf": 6.74e9,
    "meta-llama/Llama-2-70b-hf": 69.0e9,
    "meta-llama/Meta-Llama-3-70B": 70.6e9,
    "meta-llama/Llama-3.1-8B": 8.03e9,
    "meta-llama/Llama-3.1-70B": 70.6e9,
    "meta-llama/Llama-3.1-405B": 405e9,
    "mistralai/Mistral-7B-v0.1": 7.24e9,
    "mistralai/Mistral-Large-Instruct-2407": 123e9,
    "mistralai/Mixtral-8x7B-v0.1": 46.7e9,
    "mistralai/Mixtral-8x22B-v0.1": 141e9,
    "Qwen/Qwen-72B": 72e9,
    "microsoft/phi-2": 2.78e9,  # the card says "2.7 billion"; the Hub page counts 2.78B
    "openai/gpt3-175b": 175e9,
    "Qwen/Qwen3-235B-A22B": 235e9,  # the model card: 235B in total, 22B activated
    "MiniMaxAI/MiniMax-M2": 230e9,  # the model card: 230B in total, 10B activated
}

ALIASES = {
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
    "llama3.1-70b": "meta-llama/Llama-3.1-70B",
    "Llama-3.1-70B": "meta-llama/Llama-3.1-70B",
    "meta-llama/llama-3.1-70b": "meta-llama/Llama-3.1-70B",
    "meta-llama/Llama-3.1-70B-Instruct": "meta-llama/Llama-3.1-70B",
    "meta-llama/Meta-Llama-3.1-70B": "meta-llama/Llama-3.1-70B",
    "meta-llama/Meta-Llama-3.1-70B-Instruct": "meta-llama/Llama-3.1-70B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-405b": "meta-llama/Llama-3.1-405B",
    "meta-llama/Llama-3.1-405B-Instruct": "meta-llama/Llama-3.1-405B",
    "llama-3-70b": "meta-llama/Meta-Llama-3-70B",
    "llama3-70b": "meta-llama/Meta-Llama-3-70B",
    "meta-llama/Meta-Llama-3-8B-Instruct": "meta-llama/Meta-Llama-3-8B",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "meta-llama/Llama-2-70b-chat-hf": "meta-llama/Llama-2-70b-hf",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "mistralai/Mistral-7B-Instruct-v0.1": "mistralai/Mistral-7B-v0.1",
    "mistral-large": "mistralai/Mistral-Large-Instruct-2407",
    "mistral-large-2407": "mistralai/Mistral-Large-Instruct-2407",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "mistralai/Mixtral-8x7B-Instruct-v0.1": "mistralai/Mixtral-8x7B-v0.1",
    "mixtral-8x22b": "mistralai/Mixtral-8x22B-v0.1",
    "qwen-72b": "Qwen/Qwen-72B",
    "Qwen/Qwen-72B-Chat": "Qwen/Qwen-72B",
    "phi-2": "microsoft/phi-2",
    "gpt3-175b": "openai/gpt3-175b",
    "gpt-3": "openai/gpt3-175b",
}

LLAMA_31_70B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "max_position_embeddings": 131072,
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
    "vocab_size": 128256,
}


def _same_shape(a: ModelSpec, b: ModelSpec) -> bool:
    return dataclasses.replace(a, name="") == dataclasses.replace(b, name="")


def _write_config(directory: Path, cfg: dict, filename: str = "config.json") -> Path:
    path = directory / filename
    path.write_text(json.dumps(cfg))
    return path


# ----------------------------------------------------------------------------- catalog


def test_required_catalog_models_are_present():
    required = {
        "meta-llama/Llama-2-7b-hf",
        "meta-llama/Llama-2-70b-hf",
        "meta-llama/Meta-Llama-3-8B",
        "meta-llama/Meta-Llama-3-70B",
        "meta-llama/Llama-3.1-8B",
        "meta-llama/Llama-3.1-70B",
        "meta-llama/Llama-3.1-405B",
        "mistralai/Mistral-7B-v0.1",
        "mistralai/Mistral-Large-Instruct-2407",
        "mistralai/Mixtral-8x7B-v0.1",
        "mistralai/Mixtral-8x22B-v0.1",
        "Qwen/Qwen-72B",
        "microsoft/phi-2",
        "openai/gpt3-175b",
    }
    assert required <= set(MODEL_CATALOG)
    assert list_models() == sorted(MODEL_CATALOG)


@pytest.mark.parametrize("name", sorted(MODEL_CATALOG))
def test_every_catalog_model_loads_by_name(name):
    spec = load_model(name)
    assert spec is MODEL_CATALOG[name]
    assert spec.name == name
    assert load_model(name.lower()) is spec
    assert load_model(name.upper()) is spec
    assert spec.num_params > 0


@pytest.mark.parametrize(("alias", "name"), sorted(ALIASES.items()))
def test_aliases_resolve_to_base_shapes(alias, name):
    assert load_model(alias) is MODEL_CATALOG[name]


@pytest.mark.parametrize(("name", "expected"), sorted(EXACT_PARAMS.items()))
def test_num_params_match_published_counts_exactly(name, expected):
    assert MODEL_CATALOG[name].num_params == expected


@pytest.mark.parametrize(("name", "expected"), sorted(APPROX_PARAMS.items()))
def test_num_params_close_to_published_totals(name, expected):
    assert MODEL_CATALOG[name].num_params == pytest.approx(expected, rel=0.02)


def test_catalog_values_of_hand_written_models():
    large = MODEL_CATALOG["mistralai/Mistral-Large-Instruct-2407"]
    assert (large.num_layers, large.hidden_size, large.intermediate_size) == (88, 12288, 28672)
    assert (large.num_heads, large.num_kv_heads, large.vocab_size) == (96, 8, 32768)

    qwen = MODEL_CATALOG["Qwen/Qwen-72B"]
    assert qwen.num_kv_heads == qwen.num_heads == 64
    assert qwen.intermediate_size == 24576  # half of the config's 49152, see the catalog
    assert qwen.is_gated_mlp

    phi = MODEL_CATALOG["microsoft/phi-2"]
    assert not phi.is_gated_mlp
    assert (phi.hidden_size, phi.intermediate_size, phi.vocab_size) == (2560, 10240, 51200)

    gpt3 = MODEL_CATALOG["openai/gpt3-175b"]
    assert not gpt3.is_gated_mlp and gpt3.tie_word_embeddings
    assert gpt3.embedding_params == gpt3.vocab_size * gpt3.hidden_size


@pytest.mark.parametrize(
    ("filename", "name"),
    [
        ("llama3_70b_config.json", "meta-llama/Meta-Llama-3-70B"),
        ("llama3.1_70b_config.json", "meta-llama/Llama-3.1-70B"),
    ],
)
def test_bundled_llama_configs_equal_catalog(filename, name):
    assert _same_shape(load_model(BUNDLED_DIR / filename), MODEL_CATALOG[name])


@pytest.mark.parametrize(
    ("filename", "name"),
    [
        ("mistral_config.json", "mistralai/Mistral-7B-v0.3"),
        ("mixtral8x7b_config.json", "mistralai/Mixtral-8x7B-v0.1"),
        ("mixtral8x22b_config.json", "mistralai/Mixtral-8x22B-v0.1"),
    ],
)
def test_bundled_mistral_configs_differ_only_in_kv_heads(filename, name):
    # APEX+'s copies use MQA; the catalog restores the published 8 KV heads.
    apex_plus = load_model(BUNDLED_DIR / filename)
    published = MODEL_CATALOG[name]
    assert apex_plus.num_kv_heads == 1
    assert published.num_kv_heads == 8
    assert _same_shape(dataclasses.replace(apex_plus, num_kv_heads=8), published)


def test_bundled_folder_has_attribution():
    text = (BUNDLED_DIR / "SOURCES.md").read_text()
    assert "MIT" in text
    assert "Copyright (c) Microsoft Corporation" in text
    assert "microsoft/apex_plus" in text


# ----------------------------------------------------------------------------- derived counts


def test_llama_31_70b_derived_quantities():
    spec = load_model("llama-3.1-70b")
    assert spec.kv_bytes_per_token("bf16") == 2 * 8 * 128 * 80 * 2 == 327680
    assert spec.kv_bytes_per_token("fp8") == 327680 / 2
    assert spec.attn_params_per_layer == 2 * 8192 * 8192 + 2 * 8192 * 1024
    assert spec.mlp_params_per_layer == spec.active_mlp_params_per_layer == 3 * 8192 * 28672
    assert spec.gemm_flops_per_token_per_layer() == 2.0 * (
        spec.attn_params_per_layer + 3 * 8192 * 28672
    )
    assert spec.attn_flops_per_token_pair_per_layer() == 4.0 * 64 * 128
    assert spec.lm_head_flops_per_token == 2.0 * 8192 * 128256
    assert spec.weight_bytes("bf16") == 2.0 * spec.num_params
    assert spec.weight_bytes("fp8") == spec.num_params
    assert spec.weight_bytes("int4") == 0.5 * spec.num_params


def test_mixtral_active_params_are_top2_experts():
    spec = MODEL_CATALOG["mistralai/Mixtral-8x7B-v0.1"]
    expert = 3 * 4096 * 14336
    router = 4096 * 8
    assert spec.is_moe
    assert spec.mlp_params_per_layer == 8 * expert + router
    assert spec.active_mlp_params_per_layer == 2 * expert + router
    active_total = (
        spec.num_layers * (spec.attn_params_per_layer + spec.active_mlp_params_per_layer + 2 * 4096)
        + spec.embedding_params
        + 4096
    )
    assert active_total == pytest.approx(12.9e9, rel=0.01)  # "12.9B active" per Mistral AI
    assert spec.gemm_flops_per_token_per_layer() == 2.0 * (
        spec.attn_params_per_layer + 2 * expert + router
    )


@pytest.mark.parametrize("name", sorted(MODEL_CATALOG))
def test_derived_values_are_static_python_numbers(name):
    spec = MODEL_CATALOG[name]
    for attr in (
        "attn_params_per_layer",
        "mlp_params_per_layer",
        "active_mlp_params_per_layer",
        "params_per_layer",
        "embedding_params",
        "num_params",
    ):
        assert type(getattr(spec, attr)) is int, attr
    assert type(spec.lm_head_flops_per_token) is float
    assert type(spec.weight_bytes("bf16")) is float
    assert type(spec.kv_bytes_per_token("bf16")) is float
    assert type(spec.gemm_flops_per_token_per_layer()) is float
    assert type(spec.attn_flops_per_token_pair_per_layer()) is float


def test_spec_is_a_valid_static_jit_argument():
    spec = MODEL_CATALOG["meta-llama/Llama-3.1-8B"]
    traces = []

    def kv_cache_bytes(tokens, spec):
        traces.append(spec.name)
        return tokens * spec.kv_bytes_per_token("bf16")

    jitted = jax.jit(kv_cache_bytes, static_argnames="spec")
    assert float(jitted(10.0, spec=spec)) == 10 * 131072
    # An equal spec built separately hits the same cache entry.
    assert float(jitted(20.0, spec=dataclasses.replace(spec))) == 20 * 131072
    assert traces == [spec.name]


shapes = st.fixed_dictionaries(
    {
        "num_layers": st.integers(1, 200),
        "hidden_size": st.integers(1, 32768),
        "num_kv_heads": st.integers(1, 16),
        "group": st.integers(1, 16),
        "head_dim": st.integers(1, 256),
        "intermediate_size": st.integers(1, 65536),
        "vocab_size": st.integers(1, 300_000),
        "is_gated_mlp": st.booleans(),
        "num_experts": st.integers(1, 64),
        "top_k": st.integers(1, 64),
        "tie_word_embeddings": st.booleans(),
    }
)


@given(shapes)
def test_param_count_invariants(s):
    num_experts = s["num_experts"]
    spec = ModelSpec(
        name="random",
        num_layers=s["num_layers"],
        hidden_size=s["hidden_size"],
        num_heads=s["num_kv_heads"] * s["group"],
        num_kv_heads=s["num_kv_heads"],
        head_dim=s["head_dim"],
        intermediate_size=s["intermediate_size"],
        vocab_size=s["vocab_size"],
        is_gated_mlp=s["is_gated_mlp"],
        num_experts=num_experts,
        num_experts_per_tok=min(s["top_k"], num_experts),
        tie_word_embeddings=s["tie_word_embeddings"],
    )
    # The total decomposes into its parts.
    assert spec.num_params == (
        spec.num_layers
        * (spec.attn_params_per_layer + spec.mlp_params_per_layer + 2 * spec.hidden_size)
        + spec.embedding_params
        + spec.hidden_size
    )
    # A token never touches more MLP weights than exist, and all of them in a dense model
    # or when it is routed to every expert.
    assert spec.active_mlp_params_per_layer <= spec.mlp_params_per_layer
    if spec.num_experts_per_tok == spec.num_experts:
        assert spec.active_mlp_params_per_layer == spec.mlp_params_per_layer
    # GQA shrinks K/V, never Q/O: attention weights sit between the MQA and MHA counts.
    mha = dataclasses.replace(spec, num_kv_heads=spec.num_heads)
    assert spec.attn_params_per_layer <= mha.attn_params_per_layer
    assert spec.kv_bytes_per_token("bf16") * spec.num_heads == pytest.approx(
        mha.kv_bytes_per_token("bf16") * spec.num_kv_heads
    )
    # Untying adds exactly one vocab x hidden matrix.
    untied = dataclasses.replace(spec, tie_word_embeddings=False)
    tied = dataclasses.replace(spec, tie_word_embeddings=True)
    assert untied.num_params - tied.num_params == spec.vocab_size * spec.hidden_size
    assert spec.weight_bytes("fp32") == 2 * spec.weight_bytes("bf16") == 4 * spec.num_params


@pytest.mark.parametrize(
    "change",
    [
        {"num_layers": 0},
        {"num_kv_heads": 3},  # 64 query heads cannot be split into 3 groups
        {"hidden_size": 8192.0},
        {"num_experts_per_tok": 2},  # more than the single (dense) expert
        {"is_gated_mlp": 1},
    ],
)
def test_invalid_specs_are_rejected(change):
    with pytest.raises(ValueError, match=next(iter(change))):
        dataclasses.replace(MODEL_CATALOG["meta-llama/Llama-3.1-70B"], **change)


# ----------------------------------------------------------------------------- config files


def test_config_file_path_loads(tmp_path):
    path = _write_config(tmp_path, LLAMA_31_70B_CONFIG, "my_config.json")
    spec = load_model(str(path))
    assert spec.name == str(path)
    assert _same_shape(spec, MODEL_CATALOG["meta-llama/Llama-3.1-70B"])
    assert _same_shape(load_model(path), spec)  # a Path works too


def test_config_directory_loads(tmp_path):
    _write_config(tmp_path, {**LLAMA_31_70B_CONFIG, "num_hidden_layers": 2})
    spec = load_model(tmp_path)
    assert spec.name == str(tmp_path / "config.json")
    assert spec.num_layers == 2


def test_local_directory_named_like_catalog_model_wins(tmp_path, monkeypatch):
    # A local copy (perhaps edited) must not be replaced by the catalog entry.
    model_dir = tmp_path / "meta-llama" / "Llama-3.1-70B"
    model_dir.mkdir(parents=True)
    _write_config(model_dir, {**LLAMA_31_70B_CONFIG, "num_hidden_layers": 3})
    monkeypatch.chdir(tmp_path)
    assert load_model("./meta-llama/Llama-3.1-70B").num_layers == 3
    # The bare id is still the catalog entry.
    assert load_model("meta-llama/Llama-3.1-70B").num_layers == 80


def test_missing_field_names_the_field_and_file(tmp_path):
    cfg = dict(LLAMA_31_70B_CONFIG)
    del cfg["num_hidden_layers"]
    path = _write_config(tmp_path, cfg)
    with pytest.raises(ValueError, match="lacks 'num_hidden_layers'") as err:
        load_model(path)
    assert str(path) in str(err.value)
    assert "number of transformer blocks" in str(err.value)


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "vocab_size"])
def test_other_missing_fields_are_named(field):
    cfg = {k: v for k, v in LLAMA_31_70B_CONFIG.items() if k != field}
    with pytest.raises(ValueError, match=f"config.json for my-model lacks '{field}'"):
        model_from_hf_config(cfg, "my-model")


def test_non_integer_field_is_rejected():
    with pytest.raises(ValueError, match="'hidden_size' must be an integer"):
        model_from_hf_config({**LLAMA_31_70B_CONFIG, "hidden_size": "8192"}, "x")


@pytest.mark.parametrize(
    "field",
    [
        "num_attention_heads",
        "num_key_value_heads",
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "vocab_size",
        "head_dim",
        "max_position_embeddings",
    ],
)
@pytest.mark.parametrize("value", [0, -8])
def test_zero_or_negative_field_is_one_line_naming_it(tmp_path, field, value):
    path = _write_config(tmp_path, {**LLAMA_31_70B_CONFIG, field: value})
    with pytest.raises(ValueError) as err:
        load_model(path)
    message = str(err.value)
    assert f"'{field}' must be >= 1, got {value}" in message
    assert str(path) in message and "\n" not in message


def test_invalid_json_is_a_value_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(path)


def test_unknown_name_suggests_close_match():
    with pytest.raises(ValueError) as err:
        load_model("lama-3.1-70b")
    message = str(err.value)
    assert "meta-llama/Llama-3.1-70B" in message
    assert "pass a path to a HuggingFace config.json" in message


def test_unknown_name_without_close_match():
    with pytest.raises(ValueError, match="no close match.*pass a path to a HuggingFace"):
        load_model("zzzzzzzz")


def test_missing_path_is_not_an_alias():
    # A path that doesn't exist must fail, not fall back to the catalog by its basename.
    with pytest.raises(ValueError, match="unknown model"):
        load_model("/no/such/dir/Llama-3.1-70B")


def test_kv_heads_default_to_attention_heads():
    cfg = {k: v for k, v in LLAMA_31_70B_CONFIG.items() if k != "num_key_value_heads"}
    assert model_from_hf_config(cfg, "mha").num_kv_heads == 64
    assert model_from_hf_config({**cfg, "num_key_value_heads": None}, "mha").num_kv_heads == 64


def test_explicit_head_dim_is_used():
    cfg = {**LLAMA_31_70B_CONFIG, "head_dim": 256}
    assert model_from_hf_config(cfg, "wide-heads").head_dim == 256
    assert model_from_hf_config(LLAMA_31_70B_CONFIG, "x").head_dim == 128


def test_mixtral_style_moe_keys():
    cfg = json.loads((BUNDLED_DIR / "mixtral8x7b_config.json").read_text())
    spec = model_from_hf_config(cfg, "mixtral")
    assert (spec.num_experts, spec.num_experts_per_tok) == (8, 2)
    del cfg["num_experts_per_tok"]
    with pytest.raises(ValueError, match="lacks 'num_experts_per_tok'"):
        model_from_hf_config(cfg, "mixtral")


def test_qwen3_moe_catalog_entry_has_published_total_and_active_counts():
    spec = MODEL_CATALOG["Qwen/Qwen3-235B-A22B"]
    assert (spec.num_experts, spec.num_experts_per_tok, spec.intermediate_size) == (128, 8, 1536)
    assert spec.num_params == pytest.approx(235e9, rel=0.01)
    assert spec.num_active_params == pytest.approx(22e9, rel=0.02)
    assert load_model("qwen3-235b-a22b") is spec


def test_minimax_m2_catalog_entry_has_published_total_and_active_counts():
    spec = MODEL_CATALOG["MiniMaxAI/MiniMax-M2"]
    assert (spec.num_experts, spec.num_experts_per_tok, spec.intermediate_size) == (256, 8, 1536)
    assert spec.num_params == pytest.approx(230e9, rel=0.01)
    # The model card's 10B activated parameters leave the embeddings (1.2B) out.
    assert spec.num_active_params - spec.embedding_params == pytest.approx(10e9, rel=0.03)
    assert load_model("MiniMaxAI/MiniMax-M2.5") is spec


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"intermediate_size": None}, "lacks 'intermediate_size'"),
        ({"num_local_experts": 0}, "'num_local_experts' must be >= 1"),
        ({"num_experts_per_tok": None}, "lacks 'num_experts_per_tok'"),
        ({"shared_intermediate_size": 1536}, "sets 'shared_intermediate_size'"),
        ({"hidden_size": 3072.5}, "'hidden_size' must be an integer"),
    ],
)
def test_minimax_m2_config_bad_or_missing_field_is_one_clear_error(change, message):
    cfg = {k: v for k, v in {**model_spec._MINIMAX_M2_CONFIG, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        model_from_hf_config(cfg, "minimax-m2")


QWEN3_MOE_CONFIG = model_spec._QWEN3_235B_A22B_CONFIG


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"moe_intermediate_size": None}, "lacks 'moe_intermediate_size'"),
        ({"moe_intermediate_size": 0}, "'moe_intermediate_size' must be >= 1"),
        ({"moe_intermediate_size": 1536.5}, "'moe_intermediate_size' must be an integer"),
        ({"num_experts": None}, "lacks 'num_experts'"),
        ({"num_experts_per_tok": None}, "lacks 'num_experts_per_tok'"),
        ({"num_key_value_heads": "4"}, "'num_key_value_heads' must be an integer"),
        ({"decoder_sparse_step": 2}, "decoder_sparse_step=2 puts dense layers"),
        ({"mlp_only_layers": [0, 1]}, "sets 'mlp_only_layers'"),
    ],
)
def test_qwen3_moe_config_bad_or_missing_field_is_one_clear_error(change, message):
    cfg = {k: v for k, v in {**QWEN3_MOE_CONFIG, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        model_from_hf_config(cfg, "qwen3-moe")


def test_moe_width_outside_known_types_is_rejected():
    cfg = {**LLAMA_31_70B_CONFIG, "num_experts": 64, "num_experts_per_tok": 4}
    with pytest.raises(ValueError, match="'moe_intermediate_size' for model_type"):
        model_from_hf_config({**cfg, "moe_intermediate_size": 1024}, "narrow-experts")


def test_shared_expert_moe_is_rejected():
    cfg = {**LLAMA_31_70B_CONFIG, "num_experts": 64, "num_experts_per_tok": 4}
    with pytest.raises(ValueError, match="shared_expert_intermediate_size"):
        model_from_hf_config({**cfg, "shared_expert_intermediate_size": 5632}, "qwen2-moe")


def test_gpt2_style_keys():
    # Shape of GPT-2 XL (HF config of openai-community/gpt2-xl): n_inner null means 4x.
    cfg = {
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "n_embd": 1600,
        "n_head": 25,
        "n_layer": 48,
        "n_positions": 1024,
        "n_inner": None,
        "vocab_size": 50257,
    }
    spec = model_from_hf_config(cfg, "gpt2-xl")
    assert (spec.num_layers, spec.hidden_size, spec.num_heads) == (48, 1600, 25)
    assert spec.intermediate_size == 6400
    assert spec.head_dim == 64
    assert not spec.is_gated_mlp
    assert spec.tie_word_embeddings  # GPT-2 ties its embeddings by default
    assert spec.max_position_embeddings == 1024
    assert spec.num_params == pytest.approx(1.56e9, rel=0.02)
    del cfg["n_layer"]
    with pytest.raises(ValueError, match="lacks 'num_hidden_layers' \\(or 'n_layer'\\)"):
        model_from_hf_config(cfg, "gpt2-xl")


def test_phi2_config_gives_two_matrix_mlp():
    # Keys as in the HF config of microsoft/phi-2.
    cfg = {
        "model_type": "phi",
        "hidden_act": "gelu_new",
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "max_position_embeddings": 2048,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": None,
        "tie_word_embeddings": False,
        "vocab_size": 51200,
    }
    assert _same_shape(model_from_hf_config(cfg, "phi"), MODEL_CATALOG["microsoft/phi-2"])


def test_qwen1_config_halves_intermediate_size():
    # Keys as in the HF config of Qwen/Qwen-72B.
    cfg = {
        "model_type": "qwen",
        "hidden_size": 8192,
        "intermediate_size": 49152,
        "kv_channels": 128,
        "max_position_embeddings": 32768,
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
        "seq_length": 32768,
        "tie_word_embeddings": False,
        "vocab_size": 152064,
    }
    assert _same_shape(model_from_hf_config(cfg, "qwen"), MODEL_CATALOG["Qwen/Qwen-72B"])


def test_unknown_architecture_uses_activation_to_decide_gating():
    base = {k: v for k, v in LLAMA_31_70B_CONFIG.items() if k != "model_type"}
    assert model_from_hf_config({**base, "hidden_act": "silu"}, "x").is_gated_mlp
    assert not model_from_hf_config({**base, "hidden_act": "gelu"}, "x").is_gated_mlp


def test_encoder_decoder_config_is_rejected():
    with pytest.raises(ValueError, match="encoder-decoder"):
        model_from_hf_config({**LLAMA_31_70B_CONFIG, "is_encoder_decoder": True}, "t5")
