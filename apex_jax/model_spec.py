"""Static shapes of the models that serving plans are searched for.

A `ModelSpec` holds plain Python ints and bools, never arrays. Memory, cost model and plan
space derive array shapes and constants from it, so it is frozen and hashable: it can be a
static argument of a jitted function.

Counts describe a pre-norm decoder block: q, k, v and o projections, an MLP with three
matrices (gated, SwiGLU-style) or two (up and down), and one weight vector per norm. Bias
vectors and learned position embeddings are left out: they are below 0.1% of the weights of
every catalog model, and they cost no GEMM time.

Specs come from a catalog keyed by HuggingFace id (`MODEL_CATALOG`), from short aliases, or
from any HuggingFace `config.json` (`load_model`, `model_from_hf_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from apex_jax.dtypes import dtype_bytes
from apex_jax.paths import DATA_DIR

__all__ = [
    "MODEL_CATALOG",
    "ModelSpec",
    "list_models",
    "load_model",
    "model_from_hf_config",
]

_DATA_DIR = DATA_DIR / "models"

# Int fields that may be 0 (every other int field of ModelSpec must be >= 1).
_ZERO_ALLOWED = frozenset({"num_encoder_layers"})


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Shape of a transformer, decoder-only or encoder-decoder, as static Python values.

    Attributes:
        name: Canonical name, e.g. `"meta-llama/Llama-3.1-70B"`, or the path a config was
            read from.
        num_layers: Number of transformer blocks.
        hidden_size: Width of the residual stream.
        num_heads: Number of query heads.
        num_kv_heads: Number of key/value heads: `num_heads` for MHA, fewer for GQA, 1 for MQA.
        head_dim: Width of one attention head.
        intermediate_size: Width of one MLP matrix; per expert for MoE.
        vocab_size: Number of tokens in the vocabulary.
        is_gated_mlp: True for a gated MLP (gate, up and down matrices), False for up and
            down only.
        num_experts: Experts per MoE layer; 1 for a dense model.
        num_experts_per_tok: Experts each token is routed to (top-k); 1 for a dense model.
        max_position_embeddings: Longest sequence, prompt plus output, in tokens.
        tie_word_embeddings: True if the LM head reuses the input embedding matrix.
        is_encoder_decoder: True for an encoder-decoder model (T5, Whisper). Its encoder has
            `num_encoder_layers` blocks of the decoder's width, heads and MLP shape, and each
            of its `num_layers` decoder blocks adds a cross-attention (q, k, v, o and a norm).
            How such a model maps onto the engine is described in `apex_jax.cost.parallel`.
        num_encoder_layers: Encoder blocks; 0 for a decoder-only model.
        moe_capacity_factor: Expert capacity as a multiple of the mean expert load; an expert
            computes (and the all-to-all moves) its full capacity, and tokens over it are
            dropped, as in GShard. 0 means dropless routing (vLLM's fused MoE), where each
            expert computes exactly the tokens routed to it.
        moe_routing_skew: Routing imbalance of dropless MoE: the busiest expert receives
            `1 + moe_routing_skew` times the mean expert load (0 = perfectly balanced). It is
            a property of the router on the served traffic, not of the weights, so the
            catalog leaves it at 0 and a deployment sets it (`model.moe_routing_skew=0.3`).
    """

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    is_gated_mlp: bool
    num_experts: int = 1
    num_experts_per_tok: int = 1
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    is_encoder_decoder: bool = False
    num_encoder_layers: int = 0
    moe_capacity_factor: float = 0.0
    moe_routing_skew: float = 0.0

    def __post_init__(self) -> None:
        # Reject numpy or JAX scalars and floats here: a traced or float shape would only
        # fail much later, deep inside a jitted cost model.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            lowest = 0 if field.name in _ZERO_ALLOWED else 1
            if field.type in ("int", int) and (type(value) is not int or value < lowest):
                kind = "non-negative" if lowest == 0 else "positive"
                raise ValueError(
                    f"ModelSpec {self.name!r}: {field.name} must be a {kind} Python int, "
                    f"got {value!r}"
                )
            if field.type in ("bool", bool) and type(value) is not bool:
                raise ValueError(
                    f"ModelSpec {self.name!r}: {field.name} must be a bool, got {value!r}"
                )
            if field.type in ("float", float) and (
                type(value) not in (int, float) or not math.isfinite(value) or value < 0
            ):
                raise ValueError(
                    f"ModelSpec {self.name!r}: {field.name} must be a finite number >= 0, "
                    f"got {value!r}"
                )
        if self.is_encoder_decoder != (self.num_encoder_layers > 0):
            raise ValueError(
                f"ModelSpec {self.name!r}: is_encoder_decoder={self.is_encoder_decoder} but "
                f"num_encoder_layers={self.num_encoder_layers}: an encoder-decoder model needs "
                "encoder layers, a decoder-only model none"
            )
        if 0 < self.moe_capacity_factor < 1:
            raise ValueError(
                f"ModelSpec {self.name!r}: moe_capacity_factor must be 0 (dropless) or >= 1, "
                f"got {self.moe_capacity_factor}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelSpec {self.name!r}: num_heads ({self.num_heads}) must be a multiple "
                f"of num_kv_heads ({self.num_kv_heads})"
            )
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"ModelSpec {self.name!r}: num_experts_per_tok ({self.num_experts_per_tok}) "
                f"exceeds num_experts ({self.num_experts})"
            )

    @property
    def is_moe(self) -> bool:
        """True if the MLP is a mixture of experts."""
        return self.num_experts > 1

    @property
    def attn_params_per_layer(self) -> int:
        """Weights of the q, k, v and o projections of one layer (biases ignored)."""
        q_and_o = 2 * self.hidden_size * self.num_heads * self.head_dim
        k_and_v = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        return q_and_o + k_and_v

    @property
    def mlp_params_per_expert(self) -> int:
        """Weights of one expert's MLP; of the whole MLP for a dense model."""
        num_matrices = 3 if self.is_gated_mlp else 2
        return num_matrices * self.hidden_size * self.intermediate_size

    @property
    def router_params_per_layer(self) -> int:
        """Weights of the MoE router, a `[hidden_size, num_experts]` matrix; 0 if dense."""
        return self.hidden_size * self.num_experts if self.is_moe else 0

    @property
    def mlp_params_per_layer(self) -> int:
        """Weights of one layer's MLP: all experts plus the router."""
        return self.num_experts * self.mlp_params_per_expert + self.router_params_per_layer

    @property
    def active_mlp_params_per_layer(self) -> int:
        """MLP weights one token touches: its top-k experts plus the router."""
        return self.num_experts_per_tok * self.mlp_params_per_expert + self.router_params_per_layer

    @property
    def norm_params_per_layer(self) -> int:
        """Weights of the two norms of one layer (one scale vector each)."""
        return 2 * self.hidden_size

    @property
    def cross_attn_params_per_layer(self) -> int:
        """Weights of one decoder block's cross-attention (q, k, v, o); 0 without an encoder."""
        return self.attn_params_per_layer if self.is_encoder_decoder else 0

    @property
    def params_per_layer(self) -> int:
        """All weights of one (decoder) transformer block, its cross-attention included."""
        cross_norm = self.hidden_size if self.is_encoder_decoder else 0
        return (
            self.attn_params_per_layer
            + self.cross_attn_params_per_layer
            + self.mlp_params_per_layer
            + self.norm_params_per_layer
            + cross_norm
        )

    @property
    def encoder_params_per_layer(self) -> int:
        """All weights of one encoder block (self-attention, dense MLP, two norms); 0 if none."""
        if not self.is_encoder_decoder:
            return 0
        return self.attn_params_per_layer + self.mlp_params_per_expert + self.norm_params_per_layer

    @property
    def encoder_params(self) -> int:
        """All encoder weights, its final norm included; 0 for a decoder-only model."""
        if not self.is_encoder_decoder:
            return 0
        return self.num_encoder_layers * self.encoder_params_per_layer + self.hidden_size

    @property
    def embedding_params(self) -> int:
        """Input embedding plus LM head; counted once when they are tied."""
        num_matrices = 1 if self.tie_word_embeddings else 2
        return num_matrices * self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """All weights of the model; the final norm adds one `hidden_size` vector."""
        return (
            self.num_layers * self.params_per_layer
            + self.embedding_params
            + self.hidden_size
            + self.encoder_params
        )

    @property
    def num_active_params(self) -> int:
        """Weights one token passes through: `num_params` with only its top-k experts of
        each MoE layer (equal to `num_params` for a dense model)."""
        inactive = self.num_experts - self.num_experts_per_tok
        return self.num_params - self.num_layers * inactive * self.mlp_params_per_expert

    @property
    def lm_head_flops_per_token(self) -> float:
        """FLOPs of the LM head GEMM for one token: `2 * hidden_size * vocab_size`."""
        return 2.0 * self.hidden_size * self.vocab_size

    def weight_bytes(self, dtype: str) -> float:
        """Bytes of all weights stored in `dtype` (a name known to `apex_jax.dtypes`)."""
        return self.num_params * dtype_bytes(dtype)

    def kv_bytes_per_token(self, kv_dtype: str) -> float:
        """Bytes of KV cache one token occupies, keys and values of all layers together."""
        return 2.0 * self.num_kv_heads * self.head_dim * self.num_layers * dtype_bytes(kv_dtype)

    def gemm_flops_per_token_per_layer(self) -> float:
        """FLOPs of one token's weight GEMMs in one layer.

        Counts the attention projections and the MLP weights the token is routed through,
        at 2 FLOPs per multiply-add. Attention scores are separate
        (`attn_flops_per_token_pair_per_layer`) because they grow with context length.
        """
        return 2.0 * (self.attn_params_per_layer + self.active_mlp_params_per_layer)

    def attn_flops_per_token_pair_per_layer(self) -> float:
        """FLOPs of `QK^T` and `PV` for one (query token, key token) pair in one layer.

        Each of the two products is one multiply-add per head dimension of every query head,
        hence `4 * num_heads * head_dim`. KV heads don't enter: GQA shares K and V between
        query heads but every query head still does its own products.
        """
        return 4.0 * self.num_heads * self.head_dim


# ---------------------------------------------------------------------------------------
# Reading HuggingFace config.json files
# ---------------------------------------------------------------------------------------

# Llama's descendants: a gated MLP, and a config class that unties the LM head by default.
_LLAMA_LIKE_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen", "qwen2", "qwen3", "qwen3_moe")
# model_type values whose MLP is gated (gate, up and down matrices).
_GATED_MODEL_TYPES = frozenset({*_LLAMA_LIKE_MODEL_TYPES, "minimax_m2", "gemma", "gemma2"})
# model_type values with a two-matrix MLP, whatever their activation is called.
_TWO_MATRIX_MODEL_TYPES = frozenset(
    {"gpt2", "gpt_bigcode", "gptj", "gpt_neox", "opt", "bloom", "falcon", "phi", "phi-msft"}
)
# HuggingFace's base config ties embeddings unless the model's config class says otherwise;
# these are the model types whose classes default to untied.
_UNTIED_BY_DEFAULT = frozenset({*_LLAMA_LIKE_MODEL_TYPES, "phi", "phi-msft", "gpt_neox", "gptj"})
# Keys of MoE layouts that a single expert width cannot describe (shared experts, dense
# layers between the MoE ones). Reading such a config as Mixtral-style would mis-size it.
_UNSUPPORTED_MOE_KEYS = (
    "n_shared_experts",
    "shared_expert_intermediate_size",
    "shared_intermediate_size",
    "first_k_dense_replace",
    "mlp_only_layers",
)
# model_type values whose experts are `moe_intermediate_size` wide (their
# `intermediate_size` is the width of dense layers that a decoder_sparse_step of 1 and no
# mlp_only_layers leave out): Qwen3-MoE.
_MOE_WIDTH_MODEL_TYPES = frozenset({"qwen3_moe"})


def _first(cfg: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """Value of the first key present and not null, else None."""
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return None


def _as_int(value: Any, key: str, source: str) -> int:
    """A count from a config: a whole number >= 1 (every shape a config gives is one)."""
    # JSON writers sometimes store 8192 as 8192.0; anything else non-integral is a mistake.
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral:
        raise ValueError(f"config.json for {source}: {key!r} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"config.json for {source}: {key!r} must be >= 1, got {int(value)}")
    return int(value)


def _require_int(cfg: dict[str, Any], keys: tuple[str, ...], meaning: str, source: str) -> int:
    present = [key for key in keys if cfg.get(key) is not None]
    if not present:
        others = f" (or {', '.join(repr(k) for k in keys[1:])})" if len(keys) > 1 else ""
        raise ValueError(f"config.json for {source} lacks {keys[0]!r}{others}: add it ({meaning})")
    return _as_int(cfg[present[0]], present[0], source)


def _is_gated(cfg: dict[str, Any], model_type: str) -> bool:
    if model_type in _GATED_MODEL_TYPES:
        return True
    if model_type in _TWO_MATRIX_MODEL_TYPES:
        return False
    # Unknown architecture: SiLU/Swish MLPs in published LLMs are gated (SwiGLU), while
    # GELU/ReLU ones use two matrices.
    act = str(_first(cfg, ("hidden_act", "activation_function")) or "").lower()
    return act in ("silu", "swish", "swiglu")


def model_from_hf_config(cfg: dict[str, Any], name: str, *, source: str | None = None) -> ModelSpec:
    """Build a `ModelSpec` from the contents of a HuggingFace `config.json`.

    Reads llama/mistral/mixtral/qwen2 keys (`num_hidden_layers`, `hidden_size`, ...),
    GPT-2 style keys (`n_layer`, `n_embd`, `n_head`, `n_inner`), Qwen-1 keys (`kv_channels`,
    `seq_length`) and Mixtral MoE keys (`num_local_experts`, `num_experts_per_tok`).

    Args:
        cfg: The parsed JSON object.
        name: Name to give the spec.
        source: What the config was read from, for error messages; defaults to `name`.

    Returns:
        The model's shape.

    Raises:
        ValueError: A required field is missing or not an integer (the message names the
            field and the source), or the config describes an encoder-decoder or an MoE
            layout with shared experts, which are not modelled.
    """
    source = source or name
    model_type = str(cfg.get("model_type") or "").lower()
    if model_type in _ENCODER_DECODER_READERS:
        return _ENCODER_DECODER_READERS[model_type](cfg, name, source)
    if cfg.get("is_encoder_decoder"):
        raise ValueError(
            f"config.json for {source} describes an encoder-decoder model of type "
            f"{model_type!r}; the encoder-decoder types read are "
            f"{', '.join(sorted(_ENCODER_DECODER_READERS))}"
        )

    num_layers = _require_int(
        cfg, ("num_hidden_layers", "n_layer"), "the number of transformer blocks", source
    )
    hidden_size = _require_int(
        cfg, ("hidden_size", "n_embd"), "the width of the residual stream", source
    )
    num_heads = _require_int(
        cfg, ("num_attention_heads", "n_head"), "the number of query heads", source
    )
    vocab_size = _require_int(
        cfg, ("vocab_size",), "the number of tokens in the vocabulary", source
    )

    # Absent or null num_key_value_heads means plain multi-head attention.
    kv_value = _first(cfg, ("num_key_value_heads", "num_kv_heads"))
    num_kv_heads = (
        num_heads if kv_value is None else _as_int(kv_value, "num_key_value_heads", source)
    )
    if cfg.get("multi_query") is True:  # gpt_bigcode and falcon flag MQA this way
        num_kv_heads = 1

    head_value = _first(cfg, ("head_dim", "kv_channels"))
    if head_value is not None:
        head_dim = _as_int(head_value, "head_dim", source)
    elif hidden_size % num_heads:
        raise ValueError(
            f"config.json for {source} lacks 'head_dim' and hidden_size ({hidden_size}) is not "
            f"a multiple of num_attention_heads ({num_heads}): add 'head_dim'"
        )
    else:
        head_dim = hidden_size // num_heads

    inter_keys = ("intermediate_size", "n_inner", "ffn_dim")
    if model_type in _MOE_WIDTH_MODEL_TYPES:
        step = cfg.get("decoder_sparse_step", 1)
        if step != 1:
            raise ValueError(
                f"config.json for {source}: decoder_sparse_step={step!r} puts dense layers "
                "between the MoE ones, which is not modelled; only 1 (every layer an MoE)"
            )
        # Every layer is an MoE: the dense width does not enter.
        intermediate_size = _require_int(
            cfg, ("moe_intermediate_size",), "the width of one expert's MLP matrices", source
        )
        _require_int(cfg, ("num_experts",), "the experts of each MoE layer", source)
    elif cfg.get("moe_intermediate_size"):
        raise ValueError(
            f"config.json for {source} sets 'moe_intermediate_size' for model_type "
            f"{model_type!r}: experts narrower than the dense MLP are read for "
            f"{', '.join(sorted(_MOE_WIDTH_MODEL_TYPES))} only"
        )
    elif _first(cfg, inter_keys) is None and ("n_embd" in cfg or "n_layer" in cfg):
        # GPT-2 convention: a null n_inner means an MLP four times the model width.
        intermediate_size = 4 * hidden_size
    else:
        intermediate_size = _require_int(
            cfg, inter_keys, "the width of one MLP matrix, per expert for MoE", source
        )
    if model_type == "qwen":
        # Qwen-1 stores the width of its fused gate|up projection, twice the width of each
        # of the two matrices (its code builds w1 and w2 with intermediate_size // 2).
        intermediate_size //= 2

    for key in _UNSUPPORTED_MOE_KEYS:
        if cfg.get(key):
            raise ValueError(
                f"config.json for {source} sets {key!r}: MoE layouts with shared experts or "
                "dense layers between the MoE ones are not modelled, only every layer an MoE"
            )
    experts_value = _first(cfg, ("num_local_experts", "num_experts"))
    num_experts = (
        1 if experts_value is None else _as_int(experts_value, "num_local_experts", source)
    )
    if num_experts > 1:
        top_k = _require_int(
            cfg, ("num_experts_per_tok",), "how many experts each token is routed to", source
        )
    else:
        top_k = 1

    optional: dict[str, Any] = {}
    max_pos = _first(cfg, ("max_position_embeddings", "n_positions", "seq_length", "n_ctx"))
    if max_pos is not None:
        optional["max_position_embeddings"] = _as_int(max_pos, "max_position_embeddings", source)
    tied = cfg.get("tie_word_embeddings")
    if tied is None:
        tied = model_type not in _UNTIED_BY_DEFAULT

    return ModelSpec(
        name=name,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        is_gated_mlp=_is_gated(cfg, model_type),
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        tie_word_embeddings=bool(tied),
        **optional,
    )


def _t5_from_hf(cfg: dict[str, Any], name: str, source: str) -> ModelSpec:
    """T5 / Flan-T5 (`T5Config`): a shared embedding, relative position biases, no biases."""
    num_heads = _require_int(cfg, ("num_heads",), "the number of attention heads", source)
    encoder_layers = _require_int(cfg, ("num_layers",), "the number of encoder blocks", source)
    decoder_layers = _first(cfg, ("num_decoder_layers",))
    # "gated-gelu" (T5 v1.1, Flan-T5) has wi_0, wi_1 and wo; "relu" (original T5) wi and wo.
    gated = str(cfg.get("feed_forward_proj") or "relu").startswith("gated")
    tied = cfg.get("tie_word_embeddings")
    return ModelSpec(
        name=name,
        num_layers=encoder_layers
        if decoder_layers is None
        else _as_int(decoder_layers, "num_decoder_layers", source),
        hidden_size=_require_int(cfg, ("d_model",), "the width of the residual stream", source),
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=_require_int(cfg, ("d_kv",), "the width of one attention head", source),
        intermediate_size=_require_int(cfg, ("d_ff",), "the width of the MLP", source),
        vocab_size=_require_int(cfg, ("vocab_size",), "the number of tokens", source),
        is_gated_mlp=gated,
        # Relative position buckets set no hard limit; n_positions is only the tokenizer's
        # default truncation, so it is the serving limit unless the caller raises it.
        max_position_embeddings=_as_int(cfg.get("n_positions") or 512, "n_positions", source),
        tie_word_embeddings=True if tied is None else bool(tied),
        is_encoder_decoder=True,
        num_encoder_layers=encoder_layers,
    )


def _whisper_from_hf(cfg: dict[str, Any], name: str, source: str) -> ModelSpec:
    """Whisper (`WhisperConfig`). The engine's prompt is the encoder's input frames."""
    hidden = _require_int(cfg, ("d_model",), "the width of the residual stream", source)
    heads = _require_int(cfg, ("decoder_attention_heads",), "the decoder's heads", source)
    for key, want in (("encoder_attention_heads", heads), ("encoder_ffn_dim", None)):
        if key not in cfg:
            raise ValueError(f"config.json for {source} lacks {key!r}: add it")
        if want is not None and cfg[key] != want:
            raise ValueError(
                f"config.json for {source}: {key}={cfg[key]} differs from the decoder's {want}; "
                "encoders of another shape than the decoder are not modelled"
            )
    ffn = _require_int(cfg, ("decoder_ffn_dim",), "the width of the decoder MLP", source)
    if cfg["encoder_ffn_dim"] != ffn:
        raise ValueError(
            f"config.json for {source}: encoder_ffn_dim differs from decoder_ffn_dim; encoders "
            "of another shape than the decoder are not modelled"
        )
    source_positions = _require_int(cfg, ("max_source_positions",), "encoder frames", source)
    target_positions = _require_int(cfg, ("max_target_positions",), "decoder tokens", source)
    tied = cfg.get("tie_word_embeddings")
    return ModelSpec(
        name=name,
        num_layers=_require_int(cfg, ("decoder_layers",), "the decoder blocks", source),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=ffn,
        vocab_size=_require_int(cfg, ("vocab_size",), "the number of tokens", source),
        is_gated_mlp=False,
        # The engine tracks encoder frames plus generated tokens as one sequence.
        max_position_embeddings=source_positions + target_positions,
        tie_word_embeddings=True if tied is None else bool(tied),
        is_encoder_decoder=True,
        num_encoder_layers=_require_int(cfg, ("encoder_layers",), "the encoder blocks", source),
    )


_ENCODER_DECODER_READERS = {"t5": _t5_from_hf, "whisper": _whisper_from_hf}


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if isinstance(cfg, dict):
        return cfg
    # A bad file is a bad value, like a missing field: callers catch ValueError for both.
    raise ValueError(f"{path} does not hold a JSON object")


# ---------------------------------------------------------------------------------------
# The catalog
# ---------------------------------------------------------------------------------------


def _from_bundled(filename: str, name: str, **published: Any) -> ModelSpec:
    """Parse a bundled APEX+ config, overriding keys where it differs from the published one."""
    cfg = _read_config(_DATA_DIR / filename)
    cfg.update(published)
    return model_from_hf_config(cfg, name, source=f"apex_jax/data/models/{filename}")


# Qwen/Qwen3-235B-A22B's config.json on the HuggingFace Hub (the keys that set its shapes;
# Qwen/Qwen3-235B-A22B-FP8 has the same values and adds a quantisation_config): 94 layers,
# each an MoE of 128 experts of 1536, top-8, GQA with 64 query and 4 KV heads of 128. Its
# per-head q/k RMSNorms (256 weights a layer) are left out. 235.1B parameters, 22.2B active.
_QWEN3_235B_A22B_CONFIG = {
    "model_type": "qwen3_moe",
    "num_hidden_layers": 94,
    "hidden_size": 4096,
    "num_attention_heads": 64,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}

# MiniMaxAI/MiniMax-M2's config.json on the HuggingFace Hub (MiniMax-M2.5 is published with
# the same architecture, MiniMaxM2ForCausalLM, and shapes): 62 layers, each an MoE of 256
# experts of 1536 (Mixtral-style keys), top-8, GQA with 48 query and 8 KV heads of 128. Its
# per-layer q/k RMSNorms and its multi-token-prediction modules (used only for speculative
# decoding) are left out. 228.7B parameters, 9.8B active besides the embeddings.
_MINIMAX_M2_CONFIG = {
    "model_type": "minimax_m2",
    "num_hidden_layers": 62,
    "hidden_size": 3072,
    "num_attention_heads": 48,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 1536,
    "num_local_experts": 256,
    "num_experts_per_tok": 8,
    "shared_intermediate_size": 0,
    "vocab_size": 200064,
    "max_position_embeddings": 196608,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}


def _build_catalog() -> dict[str, ModelSpec]:
    # Most catalog models use a gated MLP and 128-wide heads.
    swiglu_128 = {"is_gated_mlp": True, "head_dim": 128}
    # One entry per model reads as a table; the formatter would split every call.
    # fmt: off
    specs = [
        # Values from each model's config.json on the HuggingFace Hub unless noted.
        ModelSpec("meta-llama/Llama-2-7b-hf", num_layers=32, hidden_size=4096, num_heads=32,
                  num_kv_heads=32, intermediate_size=11008, vocab_size=32000,
                  max_position_embeddings=4096, **swiglu_128),
        ModelSpec("meta-llama/Llama-2-70b-hf", num_layers=80, hidden_size=8192, num_heads=64,
                  num_kv_heads=8, intermediate_size=28672, vocab_size=32000,
                  max_position_embeddings=4096, **swiglu_128),
        ModelSpec("meta-llama/Meta-Llama-3-8B", num_layers=32, hidden_size=4096, num_heads=32,
                  num_kv_heads=8, intermediate_size=14336, vocab_size=128256,
                  max_position_embeddings=8192, **swiglu_128),
        # Bundled copy; its shapes equal the published config.
        _from_bundled("llama3_70b_config.json", "meta-llama/Meta-Llama-3-70B"),
        ModelSpec("meta-llama/Llama-3.1-8B", num_layers=32, hidden_size=4096, num_heads=32,
                  num_kv_heads=8, intermediate_size=14336, vocab_size=128256,
                  max_position_embeddings=131072, **swiglu_128),
        # Bundled copy; identical to the published config.
        _from_bundled("llama3.1_70b_config.json", "meta-llama/Llama-3.1-70B"),
        ModelSpec("meta-llama/Llama-3.1-405B", num_layers=126, hidden_size=16384,
                  num_heads=128, num_kv_heads=8, intermediate_size=53248, vocab_size=128256,
                  max_position_embeddings=131072, **swiglu_128),
        # A 1T dense model, Llama-3-70B's shape scaled as APEX scales models to a trillion
        # parameters: every width x2.5 (hidden 20480, 160 query heads of 128, the MLP at 3.5x
        # hidden), Llama-3's 8 KV heads and vocabulary kept, the 80 layers x2.4 (192):
        # 1.02T parameters. No such checkpoint exists; the shape is this catalog's choice.
        ModelSpec("apex-jax/Llama-3-1T", num_layers=192, hidden_size=20480, num_heads=160,
                  num_kv_heads=8, intermediate_size=71680, vocab_size=128256,
                  max_position_embeddings=8192, **swiglu_128),
        # Kimi K2 (moonshotai/Kimi-K2-Instruct config.json, DeepSeek-V3 architecture): 61
        # layers, hidden 7168, 64 heads, 384 routed experts of 2048, top-8, 163840 tokens,
        # 1.04T parameters here. Approximations: its multi-latent attention caches 576
        # values per token and layer (kv_lora_rank 512 + rope 64), held as two KV heads of
        # 128 (512 values, one head per GPU from attention TP 2 on, where MLA keeps all 576);
        # its one shared expert and its first, dense layer are left out (the first layer is
        # counted as an MoE layer, whose active compute is close to the dense one's).
        ModelSpec("moonshotai/Kimi-K2-Instruct", num_layers=61, hidden_size=7168,
                  num_heads=64, num_kv_heads=2, intermediate_size=2048, vocab_size=163840,
                  num_experts=384, num_experts_per_tok=8, max_position_embeddings=131072,
                  **swiglu_128),
        # APEX+ set num_key_value_heads to 1 in its Mistral and Mixtral copies (it models
        # their attention as MQA); the published models have 8 KV heads, which sets the
        # real KV cache size. Its Mistral file is the v0.3 one (32768-token vocabulary);
        # v0.1 has 32000 tokens and otherwise the same shapes.
        _from_bundled("mistral_config.json", "mistralai/Mistral-7B-v0.1",
                      num_key_value_heads=8, vocab_size=32000),
        _from_bundled("mistral_config.json", "mistralai/Mistral-7B-v0.3", num_key_value_heads=8),
        ModelSpec("mistralai/Mistral-Large-Instruct-2407", num_layers=88, hidden_size=12288,
                  num_heads=96, num_kv_heads=8, intermediate_size=28672, vocab_size=32768,
                  max_position_embeddings=131072, **swiglu_128),
        _from_bundled("mixtral8x7b_config.json", "mistralai/Mixtral-8x7B-v0.1",
                      num_key_value_heads=8),
        _from_bundled("mixtral8x22b_config.json", "mistralai/Mixtral-8x22B-v0.1",
                      num_key_value_heads=8),
        # The published config says intermediate_size 49152: Qwen-1 counts its fused gate|up
        # projection, so each of the three MLP matrices is 24576 wide.
        ModelSpec("Qwen/Qwen-72B", num_layers=80, hidden_size=8192, num_heads=64,
                  num_kv_heads=64, intermediate_size=24576, vocab_size=152064,
                  max_position_embeddings=32768, **swiglu_128),
        # 64 x 128-wide query heads (8192) over a 5120-wide residual stream; the per-head
        # q/k RMSNorms (256 weights a layer) are left out.
        ModelSpec("Qwen/Qwen3-32B", num_layers=64, hidden_size=5120, num_heads=64,
                  num_kv_heads=8, intermediate_size=25600, vocab_size=151936,
                  max_position_embeddings=40960, **swiglu_128),
        model_from_hf_config(_QWEN3_235B_A22B_CONFIG, "Qwen/Qwen3-235B-A22B"),
        model_from_hf_config(_MINIMAX_M2_CONFIG, "MiniMaxAI/MiniMax-M2"),
        # Two-matrix GELU MLP; the attention and MLP share one LayerNorm per block, which
        # the two-norm count overstates by 2560 weights a layer.
        ModelSpec("microsoft/phi-2", num_layers=32, hidden_size=2560, num_heads=32,
                  num_kv_heads=32, head_dim=80, intermediate_size=10240, vocab_size=51200,
                  is_gated_mlp=False, max_position_embeddings=2048),
        # GPT-3 was never published as a config.json. Shapes from Brown et al. 2020,
        # "Language Models are Few-Shot Learners", Table 2.1; it keeps GPT-2's 50257-token
        # BPE vocabulary, 4x MLP and tied embeddings (the paper reuses GPT-2's architecture).
        ModelSpec("openai/gpt3-175b", num_layers=96, hidden_size=12288, num_heads=96,
                  num_kv_heads=96, head_dim=128, intermediate_size=49152, vocab_size=50257,
                  is_gated_mlp=False, max_position_embeddings=2048, tie_word_embeddings=True),
        # Encoder-decoder models. Flan-T5-XXL (google/flan-t5-xxl config.json): 24 + 24 blocks,
        # d_model 4096, 64 heads of 64, gated-GELU MLP of 10240, 32128-token vocabulary,
        # untied LM head. Its relative position buckets set no hard length limit; 2048
        # tokens (prompt plus output) is the serving limit assumed here.
        ModelSpec("google/flan-t5-xxl", num_layers=24, num_encoder_layers=24,
                  is_encoder_decoder=True, hidden_size=4096, num_heads=64, num_kv_heads=64,
                  head_dim=64, intermediate_size=10240, vocab_size=32128, is_gated_mlp=True,
                  max_position_embeddings=2048, tie_word_embeddings=False),
        # Whisper-large-v3 (openai/whisper-large-v3 config.json): 32 + 32 blocks, d_model
        # 1280, 20 heads, GELU MLP of 5120, 51866-token vocabulary, tied LM head. The prompt
        # is the encoder's 1500 frames (30 s of audio after the stride-2 convolution) and the
        # decoder writes up to 448 tokens. The two convolutions (5.4M weights) are left out.
        ModelSpec("openai/whisper-large-v3", num_layers=32, num_encoder_layers=32,
                  is_encoder_decoder=True, hidden_size=1280, num_heads=20, num_kv_heads=20,
                  head_dim=64, intermediate_size=5120, vocab_size=51866, is_gated_mlp=False,
                  max_position_embeddings=1500 + 448, tie_word_embeddings=True),
    ]
    # fmt: on
    return {spec.name: spec for spec in specs}


MODEL_CATALOG: dict[str, ModelSpec] = _build_catalog()

# Short names beyond those derived from the catalog ids (see _alias_key).
_EXTRA_ALIASES = {
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "mixtral-8x22b": "mistralai/Mixtral-8x22B-v0.1",
    "mistral-large": "mistralai/Mistral-Large-Instruct-2407",
    "mistral-large-123b": "mistralai/Mistral-Large-Instruct-2407",
    "gpt3": "openai/gpt3-175b",
    "t5-xxl": "google/flan-t5-xxl",
    "whisper": "openai/whisper-large-v3",
    "llama3-1t": "apex-jax/Llama-3-1T",
    "kimi-k2": "moonshotai/Kimi-K2-Instruct",
    # MiniMax-M2.5 keeps MiniMax-M2's architecture and shapes (see _MINIMAX_M2_CONFIG).
    "minimax-m2.5": "MiniMaxAI/MiniMax-M2",
}

# Fine-tunes ("-Instruct", "-chat") share their base model's shapes, and "-hf"/"-base" only
# name a checkpoint format or flavour, so all of them map to the same entry.
_VARIANT_WORDS = re.compile(r"-(instruct|chat|hf|base)(?=-|$)")
# "org/model": a single leading organisation segment, as on the HuggingFace Hub.
_HUB_ID = re.compile(r"^[a-z0-9][\w.-]*/[^/]+$")


def _alias_key(name: str) -> str:
    """Spelling-insensitive key: "Meta-Llama-3.1-70B-Instruct" and "llama3.1-70b" agree."""
    key = name.strip().lower().replace("_", "-")
    if _HUB_ID.match(key):
        key = key.split("/", 1)[1]
    key = _VARIANT_WORDS.sub("", key).removeprefix("meta-")
    return re.sub(r"[-\s]", "", key)


def _build_alias_index() -> dict[str, str]:
    pairs = [(name, name) for name in MODEL_CATALOG] + list(_EXTRA_ALIASES.items())
    index: dict[str, str] = {}
    for alias, target in pairs:
        key = _alias_key(alias)
        if index.setdefault(key, target) != target:
            raise RuntimeError(f"alias {alias!r} is ambiguous: {index[key]} or {target}")
    return index


_ALIAS_INDEX = _build_alias_index()
_LOWER_IDS = {name.lower(): name for name in MODEL_CATALOG}


def list_models() -> list[str]:
    """Canonical names of all catalog models, sorted."""
    return sorted(MODEL_CATALOG)


def _config_file(path: Path) -> Path | None:
    if path.is_file():
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path / "config.json"
    return None


def _close_matches(name: str) -> list[str]:
    by_key = difflib.get_close_matches(_alias_key(name), list(_ALIAS_INDEX), n=5, cutoff=0.6)
    by_id = difflib.get_close_matches(name.strip().lower(), list(_LOWER_IDS), n=5, cutoff=0.6)
    matches = [_ALIAS_INDEX[k] for k in by_key] + [_LOWER_IDS[k] for k in by_id]
    return list(dict.fromkeys(matches))


def load_model(name_or_path: str | os.PathLike[str]) -> ModelSpec:
    """Look up a model by name, or read it from a HuggingFace `config.json`.

    Tried in order: a catalog id (case-insensitive), an existing `config.json` file or a
    directory holding one, then a short alias such as `"llama-3.1-70b"`. Aliases ignore case,
    hyphens, a `meta-` prefix and the words `Instruct`, `chat`, `hf` and `base`, so
    `"meta-llama/Meta-Llama-3.1-70B-Instruct"` gives the Llama-3.1-70B shapes.

    Args:
        name_or_path: A catalog name or alias, or a path to a `config.json` or its directory.

    Returns:
        The model's shape. A spec read from a file is named by that file's path.

    Raises:
        ValueError: The name is unknown (the message lists close catalog matches), or the
            config lacks a required field.
    """
    name = os.fspath(name_or_path)
    if name.strip().lower() in _LOWER_IDS:
        return MODEL_CATALOG[_LOWER_IDS[name.strip().lower()]]
    # A config on disk wins over an alias: "./Llama-3.1-70B" may be a modified local copy.
    config_file = _config_file(Path(name).expanduser())
    if config_file is not None:
        return model_from_hf_config(_read_config(config_file), str(config_file))
    key = _alias_key(name)
    if key in _ALIAS_INDEX:
        return MODEL_CATALOG[_ALIAS_INDEX[key]]

    matches = _close_matches(name)
    hint = f"close matches: {', '.join(matches)}" if matches else "no close match in the catalog"
    raise ValueError(
        f"unknown model {name!r} ({hint}; all names: apex_jax.model_spec.list_models()). "
        "For a model outside the catalog, pass a path to a HuggingFace config.json "
        "(the file, or a directory containing it)."
    )
