"""Plans as integer tensors: the columns, the validity rules, enumeration and descriptions.

A plan is one int32 row of a ``[P, F]`` tensor whose columns are named by :data:`COLUMNS`.
Everything numeric downstream (memory, cost, engine) reads columns by these names, so a new
axis is one new column plus the code that interprets it.

The parallel layout of a plan has three levels, as in APEX:

- **model level**: ``dp`` replicas (each its own serving engine) of ``pp`` pipeline stages;
  each stage runs on ``tp`` GPUs. Layers are split as evenly as possible over the stages
  (:func:`stage_layers`), so ``pp`` need not divide the layers.
- **cell level**: inside a stage, each cell of a transformer block gets its own layout over
  the stage's ``tp`` GPUs. The attention cell runs ``tp / attn_tp`` replicas of ``attn_tp``
  GPUs (attention data parallelism: each replica keeps the KV cache of its own sequences);
  the FFN cell runs ``tp / mlp_tp`` replicas of ``mlp_tp`` GPUs. An MoE FFN replica splits
  its experts over ``ep`` expert-parallel ranks of ``mlp_tp / ep`` GPUs (expert TP).
  Where neighbouring cells' layouts differ, resharding collectives move the activations
  (:mod:`apex_jax.cost.parallel` sizes them).
- **encoder** (encoder-decoder models only): the encoder is planned on its own, with
  ``tp / enc_tp`` replicas of ``enc_tp`` GPUs per stage.

A plan whose cells all use the whole stage (``attn_tp == mlp_tp == tp``, ``ep == 1``) is the
classic DP x TP x PP plan, which is what :func:`plan_row` builds by default.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from apex_jax.dtypes import dtype_code, dtype_name
from apex_jax.model_spec import ModelSpec

__all__ = [
    "AUTO",
    "BOOST_CLOCK",
    "COL",
    "COLUMNS",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_GPU_MEM_UTIL_PERMILLE",
    "MAX_CLOCK",
    "NUM_COLUMNS",
    "REASONS",
    "Enumeration",
    "PlanShape",
    "PlanSpace",
    "auto_act_dtype",
    "check_plan",
    "describe_plan",
    "enumerate_plans",
    "enumerate_space",
    "plan_from_description",
    "plan_kind",
    "plan_row",
    "plan_to_dict",
    "stage_layers",
    "stage_layers_matrix",
]

# Column order is the on-disk contract of plans.csv: append, never reorder.
COLUMNS: tuple[str, ...] = (
    "dp",  # data-parallel replicas (one serving engine each)
    "tp",  # GPUs per pipeline stage; the TP degree when every cell uses all of them
    "pp",  # pipeline stages inside a replica
    "weight_dtype",  # apex_jax.dtypes code
    "kv_dtype",  # apex_jax.dtypes code
    "max_num_seqs",  # engine: running sequences per replica
    "max_num_batched_tokens",  # engine: token budget per iteration
    "block_size",  # engine: KV-cache tokens per page
    "chunked_prefill",  # engine: 0 = prefill-only iterations, 1 = chunked
    "gpu_mem_util_permille",  # engine: gpu_memory_utilization x 1000
    "attn_tp",  # attention cell: GPUs per attention replica (replicas = tp / attn_tp)
    "mlp_tp",  # FFN / MoE cell: GPUs per FFN replica (replicas = tp / mlp_tp)
    "ep",  # MoE cell: expert-parallel ranks per FFN replica (expert TP = mlp_tp / ep)
    "act_dtype",  # apex_jax.dtypes code of the activations the GEMMs take
    "gpu_clock_mhz",  # SM clock; BOOST_CLOCK (0) = the GPU's boost clock
    "enc_tp",  # encoder: GPUs per encoder replica (replicas = tp / enc_tp); 0 = no encoder
    "disable_custom_all_reduce",  # engine: 1 = TP all-reduces through NCCL, 0 = vLLM's kernel
)
COL: dict[str, int] = {name: i for i, name in enumerate(COLUMNS)}
NUM_COLUMNS = len(COLUMNS)

# Sentinels and engine defaults (vLLM's) that descriptions leave out.
BOOST_CLOCK = 0
AUTO = "auto"
MAX_CLOCK = "max"
DEFAULT_BLOCK_SIZE = 16
DEFAULT_GPU_MEM_UTIL_PERMILLE = 900

_DTYPE_COLUMNS = ("weight_dtype", "kv_dtype", "act_dtype")
_POSITIVE_COLUMNS = (
    "dp",
    "tp",
    "pp",
    "max_num_seqs",
    "max_num_batched_tokens",
    "block_size",
    "gpu_mem_util_permille",
    "attn_tp",
    "mlp_tp",
    "ep",
)


def auto_act_dtype(weight_dtype: str) -> str:
    """The activation dtype a weight dtype runs with by default.

    fp32/bf16/fp16 weights take activations of their own type and fp8 weights run W8A8 on
    fp8 tensor cores (what vLLM's fp8 checkpoints do on Hopper), block-scaled fp8 weights
    too (activations quantised to fp8 per group of 128); int8 and int4 weights are
    weight-only quantisation, dequantised to bf16 inside the GEMM.
    """
    name = dtype_name(weight_dtype)
    if name == "fp8_block":
        return "fp8"
    return name if name in ("fp32", "bf16", "fp16", "fp8") else "bf16"


def _gemm_kernel_exists(weight: str, act: str) -> bool:
    """Whether a GEMM kernel takes ``weight``-typed weights and ``act``-typed activations.

    Same-type GEMMs exist for every type but int4 (no W4A4 serving kernels); 16-bit
    activations also take any quantised weights (weight-only kernels dequantise them), and
    fp8 activations block-scaled fp8 weights.
    """
    if act == weight:
        return act not in ("int4", "fp8_block")
    if weight == "fp8_block":
        return act in ("fp8", "bf16", "fp16")
    return act in ("bf16", "fp16") and weight in ("fp8", "int8", "int4")


# ------------------------------------------------------------------------------------------
# The space
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlanSpace:
    """Values each plan axis may take; the space is their product, filtered for validity.

    ``dp``, ``tp`` and ``pp`` of ``None`` mean "every divisor of the GPU count". The cell
    axes ``attn_dp``, ``mlp_dp``, ``ep`` and ``enc_dp`` list replica counts inside a stage
    (``attn_tp = tp / attn_dp``) or EP degrees; ``None`` means every valid value, and the
    defaults of 1 give classic DP x TP x PP plans. Axes that do not apply to a model (``ep``
    for a dense model, ``enc_dp`` for a decoder-only one) collapse to their neutral value.
    In ``max_num_batched_tokens``, ``None`` means the engine's default for the plan's
    chunked-prefill setting; in ``act_dtype``, ``"auto"`` means :func:`auto_act_dtype`; in
    ``gpu_clock_mhz``, ``None`` or ``"max"`` means the GPU's boost clock (``None`` for the
    whole axis: the boost clock only). ``cross_node_stages`` lets a stage fill whole nodes
    (``tp`` a multiple of the node's GPUs), so that its cell collectives span nodes.
    """

    dp: Sequence[int] | None = None
    tp: Sequence[int] | None = None
    pp: Sequence[int] | None = None
    weight_dtype: Sequence[str] = ("bf16",)
    kv_dtype: Sequence[str] = ("bf16",)
    max_num_seqs: Sequence[int] = (256,)
    max_num_batched_tokens: Sequence[int | None] = (8192,)
    block_size: Sequence[int] = (16,)
    chunked_prefill: Sequence[int] = (0,)
    gpu_mem_util: Sequence[float] = (0.9,)
    use_all_gpus: bool = True
    attn_dp: Sequence[int] | None = (1,)
    mlp_dp: Sequence[int] | None = (1,)
    ep: Sequence[int] | None = (1,)
    enc_dp: Sequence[int] | None = (1,)
    act_dtype: Sequence[str] = (AUTO,)
    gpu_clock_mhz: Sequence[int | str | None] | None = None
    uneven_pp: bool = True
    # The engine's setting for every plan (not an axis: vLLM's kernel is never slower).
    disable_custom_all_reduce: int = 0
    cross_node_stages: bool = False


@dataclasses.dataclass(frozen=True)
class PlanShape:
    """What the validity rules need to know about a model (static Python ints).

    ``intermediate_size`` of 0 means unknown (the MLP split is not checked).
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int = 0
    num_experts: int = 1
    num_encoder_layers: int = 0

    @classmethod
    def of(cls, model: ModelSpec) -> PlanShape:
        """The shape of a :class:`~apex_jax.model_spec.ModelSpec`."""
        return cls(
            num_layers=model.num_layers,
            num_heads=model.num_heads,
            num_kv_heads=model.num_kv_heads,
            intermediate_size=model.intermediate_size,
            num_experts=model.num_experts,
            num_encoder_layers=model.num_encoder_layers,
        )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def has_encoder(self) -> bool:
        return self.num_encoder_layers > 0


# Why a candidate plan is not in the space. Enumeration counts candidates by the first rule
# they break, in this order; check_plan names the rule an explicit plan breaks.
R_GPUS = "uses more GPUs than the cluster has"
R_NODE = "stage GPUs (tp) neither divide a node nor fill whole nodes (cross_node_stages)"
R_STAGES = "more pipeline stages than layers"
R_UNEVEN = "layers do not split evenly over the stages (uneven_pp is off)"
R_CELL_SPLIT = "a cell's GPU count does not divide the stage's"
R_ATTN_HEADS = "attention TP does not split the query and KV heads"
R_MLP_SPLIT = "MLP or expert TP does not split the intermediate size"
R_EXPERTS = "EP does not divide the experts"
R_NOT_MOE = "EP > 1 on a dense model"
R_COPRIME = "attention and FFN replica counts share a factor (that is model-level DP)"
R_ENC_HEADS = "encoder TP does not split the heads"
R_NO_ENCODER = "an encoder layout on a decoder-only model"
R_ACT = "no GEMM kernel takes these weight and activation dtypes"
R_KV_FORMAT = "fp8_block is a weight format; a KV cache is fp8 per tensor (kv_dtype fp8)"
R_BUDGET_SEQS = "max_num_batched_tokens below max_num_seqs (vLLM rejects it)"
R_BUDGET_LEN = (
    "max_num_batched_tokens below max_model_len without chunked prefill (vLLM rejects it)"
)
R_CHUNKED_ENC = "chunked prefill on an encoder-decoder model (vLLM rejects it)"
R_CLOCK = "GPU clock above the GPU's boost clock"
R_DUPLICATE = "duplicate of another plan once 'auto' values are resolved"
REASONS: tuple[str, ...] = (
    R_GPUS,
    R_NODE,
    R_STAGES,
    R_UNEVEN,
    R_CELL_SPLIT,
    R_ATTN_HEADS,
    R_MLP_SPLIT,
    R_EXPERTS,
    R_NOT_MOE,
    R_COPRIME,
    R_ENC_HEADS,
    R_NO_ENCODER,
    R_ACT,
    R_KV_FORMAT,
    R_BUDGET_SEQS,
    R_BUDGET_LEN,
    R_CHUNKED_ENC,
    R_CLOCK,
    R_DUPLICATE,
)


def _splits_heads(tp: int, num_heads: int, num_kv_heads: int) -> bool:
    # vLLM splits query heads evenly and KV heads evenly, or replicates each KV head over
    # tp / num_kv_heads GPUs.
    return num_heads % tp == 0 and (num_kv_heads % tp == 0 or tp % num_kv_heads == 0)


def _layout_problem(
    layout: tuple[int, ...],
    shape: PlanShape,
    *,
    num_gpus: int,
    gpus_per_node: int,
    use_all_gpus: bool,
    uneven_pp: bool,
    cross_node_stages: bool,
) -> str | None:
    """The first rule a parallel layout breaks, or None (layout = dp, tp, pp, attn_tp,
    mlp_tp, ep, enc_tp)."""
    dp, tp, pp, attn_tp, mlp_tp, ep, enc_tp = layout
    used = dp * tp * pp
    if used > num_gpus or (use_all_gpus and used != num_gpus):
        return R_GPUS
    # Topology: stages tile the nodes. A stage inside one node runs its collectives over
    # NVLink; one that fills whole nodes (when allowed) runs them hierarchically.
    fills_nodes = cross_node_stages and tp % gpus_per_node == 0
    if gpus_per_node % tp != 0 and not fills_nodes:
        return R_NODE
    if pp > shape.num_layers:
        return R_STAGES
    if not uneven_pp and shape.num_layers % pp != 0:
        return R_UNEVEN
    if tp % attn_tp or tp % mlp_tp or mlp_tp % ep or (enc_tp and tp % enc_tp):
        return R_CELL_SPLIT
    if not _splits_heads(attn_tp, shape.num_heads, shape.num_kv_heads):
        return R_ATTN_HEADS
    expert_tp = mlp_tp // ep
    if shape.intermediate_size and shape.intermediate_size % expert_tp:
        return R_MLP_SPLIT
    if ep > 1 and not shape.is_moe:
        return R_NOT_MOE
    if shape.num_experts % ep:
        return R_EXPERTS
    # Cell replica counts with a common factor g are a model-level DP of g with one
    # scheduler instead of g; the plain dp axis covers that, so such layouts are left out.
    if math.gcd(tp // attn_tp, tp // mlp_tp) != 1:
        return R_COPRIME
    if enc_tp and not shape.has_encoder:
        return R_NO_ENCODER
    if shape.has_encoder and not _splits_heads(enc_tp or tp, shape.num_heads, shape.num_heads):
        return R_ENC_HEADS
    return None


def _knob_problem(
    knobs: tuple[Any, ...],
    shape: PlanShape,
    *,
    max_model_len: int | None,
    max_clock_mhz: float,
) -> str | None:
    """The first rule engine knobs break, or None (knobs = weight, kv, act, seqs, budget,
    block, chunked, util, clock; dtypes as names)."""
    weight, kv, act, seqs, budget, _, chunked, _, clock = knobs
    if not _gemm_kernel_exists(weight, act):
        return R_ACT
    if kv == "fp8_block":
        return R_KV_FORMAT
    if budget < seqs:
        return R_BUDGET_SEQS
    if chunked and shape.has_encoder:
        return R_CHUNKED_ENC
    if not chunked and max_model_len is not None and budget < max_model_len:
        return R_BUDGET_LEN
    if max_clock_mhz and clock > max_clock_mhz:
        return R_CLOCK
    return None


# ------------------------------------------------------------------------------------------
# Enumeration
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Enumeration:
    """The valid plans of a space and why the other candidates were left out.

    Attributes:
        plans: int32 ``[P, F]`` plan tensor.
        dropped: candidate plans left out, by reason (one of :data:`REASONS`).
        num_layouts: distinct parallel layouts in ``plans``.
        num_knob_settings: distinct dtype and engine-knob settings in ``plans``.
    """

    plans: np.ndarray
    dropped: dict[str, int]
    num_layouts: int
    num_knob_settings: int


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pick(values: Sequence[int] | None, allowed: list[int]) -> list[int]:
    """``values`` that are in ``allowed`` (all of ``allowed`` for None), in given order."""
    if values is None:
        return allowed
    return [int(v) for v in values if int(v) in allowed]


def _layouts(
    space: PlanSpace, shape: PlanShape, num_gpus: int, dropped: dict[str, int], **rules
) -> list[tuple[int, ...]]:
    divisors = _divisors(num_gpus)
    dps = list(space.dp) if space.dp is not None else divisors
    tps = list(space.tp) if space.tp is not None else divisors
    pps = list(space.pp) if space.pp is not None else divisors
    out = []
    for dp, tp, pp in itertools.product(dps, tps, pps):
        used = dp * tp * pp
        if used > num_gpus or (rules["use_all_gpus"] and used != num_gpus):
            continue  # the degrees do not tile the cluster: not a candidate at all
        stage_divisors = _divisors(tp)
        attn_dps = _pick(space.attn_dp, stage_divisors)
        mlp_dps = _pick(space.mlp_dp, stage_divisors)
        enc_dps = _pick(space.enc_dp, stage_divisors) if shape.has_encoder else [0]
        for attn_dp, mlp_dp, enc_dp in itertools.product(attn_dps, mlp_dps, enc_dps):
            mlp_tp = tp // mlp_dp
            if shape.is_moe:
                eps = _pick(space.ep, _divisors(mlp_tp))
            else:
                eps = [1]
            for ep in eps:
                layout = (dp, tp, pp, tp // attn_dp, mlp_tp, ep, tp // enc_dp if enc_dp else 0)
                problem = _layout_problem(layout, shape, num_gpus=num_gpus, **rules)
                if problem is None:
                    out.append(layout)
                else:
                    dropped[problem] = dropped.get(problem, 0) + 1
    return out


def _knob_settings(
    space: PlanSpace,
    shape: PlanShape,
    dropped: dict[str, int],
    *,
    auto_budget: Mapping[int, int] | None,
    max_model_len: int | None,
    max_clock_mhz: float,
) -> list[tuple[Any, ...]]:
    clocks = [
        max_clock_mhz if clock is None or str(clock).lower() == MAX_CLOCK else clock
        for clock in (space.gpu_clock_mhz if space.gpu_clock_mhz is not None else [None])
    ]
    out, seen = [], set()
    for weight, kv, act, seqs, budget, block, chunked, util, clock in itertools.product(
        space.weight_dtype,
        space.kv_dtype,
        space.act_dtype,
        space.max_num_seqs,
        space.max_num_batched_tokens,
        space.block_size,
        space.chunked_prefill,
        space.gpu_mem_util,
        clocks,
    ):
        weight = dtype_name(weight)
        act = auto_act_dtype(weight) if str(act).lower() == AUTO else dtype_name(act)
        if budget is None or str(budget).lower() == AUTO:
            if auto_budget is None:
                raise ValueError(
                    "max_num_batched_tokens 'auto' needs the engine's defaults: pass auto_budget"
                )
            budget = auto_budget[int(chunked)]
        knobs = (
            weight,
            dtype_name(kv),
            act,
            int(seqs),
            int(budget),
            int(block),
            int(chunked),
            round(float(util) * 1000),
            round(float(clock or BOOST_CLOCK)),
        )
        problem = _knob_problem(
            knobs, shape, max_model_len=max_model_len, max_clock_mhz=max_clock_mhz
        )
        if problem is None and knobs in seen:
            problem = R_DUPLICATE
        if problem is None:
            seen.add(knobs)
            out.append(knobs)
        else:
            dropped[problem] = dropped.get(problem, 0) + 1
    return out


def enumerate_space(
    space: PlanSpace,
    *,
    num_gpus: int,
    gpus_per_node: int,
    model: ModelSpec | None = None,
    shape: PlanShape | None = None,
    max_clock_mhz: float = 0,
    max_model_len: int | None = None,
    auto_budget: Mapping[int, int] | None = None,
) -> Enumeration:
    """Enumerate the valid plans of a space and count the candidates each rule rejects.

    Validity is structural only (see the ``R_*`` rules: TP stays in a node, a cell's TP
    splits its heads or experts, cell replica counts are coprime, engine knobs vLLM would
    reject, ...). Whether a plan fits in memory is decided later, for the whole tensor at
    once, by :mod:`apex_jax.memory`.

    Args:
        space: the values of each axis.
        num_gpus: GPUs in the cluster.
        gpus_per_node: GPUs that share NVLink.
        model: the served model (or give ``shape``).
        shape: the model's :class:`PlanShape`, if ``model`` is not given.
        max_clock_mhz: the GPU's boost clock; clocks above it are rejected (0: unchecked).
        max_model_len: the engine's model length, for the unchunked budget rule.
        auto_budget: the engine's token budget with chunked prefill off (key 0) and on (1),
            for ``None`` / ``"auto"`` budgets.

    Returns:
        An :class:`Enumeration`. Layouts vary slowest, in dp, tp, pp, attn, mlp, ep order.

    Raises:
        ValueError: the space is empty (the message lists the rules that emptied it).
    """
    if shape is None:
        if model is None:
            raise ValueError("enumerate_space needs a model or a PlanShape")
        shape = PlanShape.of(model)
    layout_drops: dict[str, int] = {}
    knob_drops: dict[str, int] = {}
    layouts = _layouts(
        space,
        shape,
        num_gpus,
        layout_drops,
        gpus_per_node=gpus_per_node,
        use_all_gpus=space.use_all_gpus,
        uneven_pp=space.uneven_pp,
        cross_node_stages=space.cross_node_stages,
    )
    knobs = _knob_settings(
        space,
        shape,
        knob_drops,
        auto_budget=auto_budget,
        max_model_len=max_model_len,
        max_clock_mhz=max_clock_mhz,
    )
    # A rejected layout takes every knob setting with it, and the other way round.
    num_knobs = len(knobs) + sum(knob_drops.values())
    dropped = {reason: count * num_knobs for reason, count in layout_drops.items()}
    for reason, count in knob_drops.items():
        dropped[reason] = dropped.get(reason, 0) + count * len(layouts)
    if not layouts or not knobs:
        why = "; ".join(f"{n} {r}" for r, n in dropped.items()) or "no candidate plans"
        raise ValueError(
            f"the plan space is empty for {num_gpus} GPUs ({gpus_per_node} per node): {why}. "
            "Check the dp/tp/pp and cell lists in plan_space (TP must divide the heads and "
            "a node) and the engine knobs."
        )
    rows = np.empty((len(layouts) * len(knobs), NUM_COLUMNS), np.int32)
    k = 0
    for dp, tp, pp, attn_tp, mlp_tp, ep, enc_tp in layouts:
        for weight, kv, act, seqs, budget, block, chunked, util, clock in knobs:
            rows[k] = _encode(
                dp=dp,
                tp=tp,
                pp=pp,
                weight_dtype=dtype_code(weight),
                kv_dtype=dtype_code(kv),
                max_num_seqs=seqs,
                max_num_batched_tokens=budget,
                block_size=block,
                chunked_prefill=chunked,
                gpu_mem_util_permille=util,
                attn_tp=attn_tp,
                mlp_tp=mlp_tp,
                ep=ep,
                act_dtype=dtype_code(act),
                gpu_clock_mhz=clock,
                enc_tp=enc_tp,
                disable_custom_all_reduce=int(space.disable_custom_all_reduce),
            )
            k += 1
    return Enumeration(
        plans=rows,
        dropped={r: dropped[r] for r in REASONS if dropped.get(r)},
        num_layouts=len(layouts),
        num_knob_settings=len(knobs),
    )


def enumerate_plans(
    space: PlanSpace,
    *,
    num_gpus: int,
    gpus_per_node: int,
    num_layers: int | None = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    model: ModelSpec | None = None,
    **kwargs,
) -> np.ndarray:
    """The plan tensor of :func:`enumerate_space` (int32 ``[P, F]``).

    Give either ``model`` or the shape of a dense decoder (``num_layers``, ``num_heads``,
    ``num_kv_heads``); other keyword arguments go to :func:`enumerate_space`.
    """
    if model is None:
        if None in (num_layers, num_heads, num_kv_heads):
            raise ValueError("enumerate_plans needs a model or num_layers/num_heads/num_kv_heads")
        kwargs["shape"] = PlanShape(int(num_layers), int(num_heads), int(num_kv_heads))
    else:
        kwargs["model"] = model
    return enumerate_space(space, num_gpus=num_gpus, gpus_per_node=gpus_per_node, **kwargs).plans


def _encode(**values: int) -> np.ndarray:
    return np.asarray([values[name] for name in COLUMNS], np.int32)


# ------------------------------------------------------------------------------------------
# Explicit plans
# ------------------------------------------------------------------------------------------


def check_plan(
    row: Sequence[int],
    model: ModelSpec,
    *,
    num_gpus: int,
    gpus_per_node: int,
    max_clock_mhz: float = 0,
    max_model_len: int | None = None,
) -> str | None:
    """The first validity rule an explicit plan row breaks, as a sentence; None if valid."""
    p = plan_to_dict(row)
    shape = PlanShape.of(model)
    layout = tuple(int(p[k]) for k in ("dp", "tp", "pp", "attn_tp", "mlp_tp", "ep", "enc_tp"))
    problem = _layout_problem(
        layout,
        shape,
        num_gpus=num_gpus,
        gpus_per_node=gpus_per_node,
        use_all_gpus=False,
        uneven_pp=True,
        cross_node_stages=True,  # an explicit plan may span nodes; its cost model says so
    )
    if problem is None:
        knobs = (
            p["weight_dtype"],
            p["kv_dtype"],
            p["act_dtype"],
            p["max_num_seqs"],
            p["max_num_batched_tokens"],
            p["block_size"],
            p["chunked_prefill"],
            0,
            p["gpu_clock_mhz"],
        )
        problem = _knob_problem(
            knobs, shape, max_model_len=max_model_len, max_clock_mhz=max_clock_mhz
        )
    if problem is None:
        return None
    return f"plan {describe_plan(row)} is invalid for {model.name} on {num_gpus} GPUs: {problem}"


_PLAN_ROW_DEFAULTS: dict[str, object] = {
    "dp": 1,
    "tp": 1,
    "pp": 1,
    "weight_dtype": "bf16",
    "kv_dtype": "bf16",
    "max_num_seqs": 256,
    "max_num_batched_tokens": 8192,
    "block_size": DEFAULT_BLOCK_SIZE,
    "chunked_prefill": 0,
    "gpu_mem_util": DEFAULT_GPU_MEM_UTIL_PERMILLE / 1000.0,
    "act_dtype": AUTO,
    "gpu_clock_mhz": BOOST_CLOCK,
    "enc_tp": 0,
    "ep": 1,
    "disable_custom_all_reduce": 0,
}


def plan_row(
    plan: Mapping[str, object], defaults: Mapping[str, object] | None = None
) -> np.ndarray:
    """Encode one plan given as a dict (``{"dp": 2, "tp": 4, "kv_dtype": "fp8", ...}``).

    Missing keys come from ``defaults``, then from the classic plan: ``attn_tp`` and
    ``mlp_tp`` equal ``tp``, ``ep`` 1, ``act_dtype`` ``"auto"``, the boost clock and no
    encoder layout (``enc_tp`` 0; :func:`apex_jax.api.make_case` fills it for
    encoder-decoder models). ``gpu_mem_util`` may be given as a fraction. Unknown keys
    raise ``ValueError`` naming the accepted ones.
    """
    merged: dict[str, object] = dict(_PLAN_ROW_DEFAULTS)
    merged.update(defaults or {})
    accepted = set(COLUMNS) | {"gpu_mem_util"}
    for key, value in plan.items():
        if key not in accepted:
            raise ValueError(
                f"unknown plan key {key!r}: accepted keys are {', '.join(sorted(accepted))}"
            )
        merged[key] = value
    if "gpu_mem_util_permille" not in plan:
        merged["gpu_mem_util_permille"] = round(float(merged["gpu_mem_util"]) * 1000)
    for cell in ("attn_tp", "mlp_tp"):
        if cell not in plan and merged.get(cell) is None:
            merged[cell] = merged["tp"]
    if str(merged["act_dtype"]).lower() == AUTO:
        try:
            merged["act_dtype"] = auto_act_dtype(str(merged["weight_dtype"]))
        except ValueError as err:
            raise ValueError(f"plan key 'weight_dtype': {err}") from None
    row = np.zeros(NUM_COLUMNS, dtype=np.int32)
    for name in COLUMNS:
        value = merged[name]
        if name in _DTYPE_COLUMNS:
            try:
                row[COL[name]] = dtype_code(str(value))
            except ValueError as err:
                raise ValueError(f"plan key {name!r}: {err}") from None
            continue
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, np.integer)) or int(value) < 0:
            raise ValueError(f"plan key {name!r} must be a non-negative integer (got {value!r})")
        row[COL[name]] = int(value)
    for name in _POSITIVE_COLUMNS:
        if row[COL[name]] < 1:
            raise ValueError(f"plan key {name!r} must be >= 1 (got {row[COL[name]]})")
    return row


def plan_to_dict(row: Iterable[int]) -> dict[str, object]:
    """Decode a plan row into a dict with dtype names and ``gpu_mem_util`` as a fraction."""
    values = [int(v) for v in row]
    out: dict[str, object] = {}
    for name, value in zip(COLUMNS, values):
        if name in _DTYPE_COLUMNS:
            out[name] = dtype_name(value)
        elif name == "gpu_mem_util_permille":
            out["gpu_mem_util"] = value / 1000.0
        else:
            out[name] = value
    return out


# ------------------------------------------------------------------------------------------
# Pipeline stages
# ------------------------------------------------------------------------------------------


def stage_layers(num_layers: int, pp: int) -> list[int]:
    """Layers of each pipeline stage: as even as possible, stages differ by at most one.

    The ``num_layers % pp`` longer stages are the middle ones first, then the first stage,
    then the last: the first stage also holds the embedding and the last the LM head, so
    this keeps the largest stage as small as it can be.
    """
    if not 1 <= pp <= num_layers:
        raise ValueError(f"pp={pp} must be between 1 and the {num_layers} layers")
    base, extra = divmod(num_layers, pp)
    order = list(range(1, pp - 1)) + [0] + ([pp - 1] if pp > 1 else [])
    counts = [base] * pp
    for stage in order[:extra]:
        counts[stage] += 1
    return counts


def stage_layers_matrix(num_layers: int, pp: np.ndarray) -> np.ndarray:
    """:func:`stage_layers` of every plan, ``[P, S]`` float64 with ``S = max(pp)``.

    Stages past a plan's ``pp`` hold 0 layers. With ``num_layers`` 0 (no encoder) every entry
    is 0.
    """
    pp = np.asarray(pp, np.int64)
    width = int(pp.max()) if pp.size else 1
    out = np.zeros((pp.size, width))
    if num_layers == 0:
        return out
    for value in np.unique(pp).tolist():
        if num_layers >= value:
            counts = stage_layers(num_layers, value)
        else:  # a stack shorter than the pipeline (an encoder): one layer a stage
            counts = [1] * num_layers + [0] * (value - num_layers)
        out[pp == value, :value] = counts
    return out


# ------------------------------------------------------------------------------------------
# Descriptions
# ------------------------------------------------------------------------------------------

_SEP = " · "
_NCCL_ALL_REDUCE = "NCCL all-reduce"


def _cell(label: str, replicas: int, text: str) -> str:
    return f"{label} {'' if replicas == 1 else f'DP{replicas}×'}{text}"


def _cells(p: Mapping[str, Any], moe: bool | None) -> list[str]:
    tp, attn_tp, mlp_tp, ep = (int(p[k]) for k in ("tp", "attn_tp", "mlp_tp", "ep"))
    parts = []
    if int(p["enc_tp"]):
        enc_tp = int(p["enc_tp"])
        parts.append(_cell("enc", tp // enc_tp, f"TP{enc_tp}"))
    parts.append(_cell("attn", tp // attn_tp, f"TP{attn_tp}"))
    expert_tp = mlp_tp // ep
    if ep == 1:
        ffn = f"TP{mlp_tp}"
    elif expert_tp == 1:
        ffn = f"EP{ep}"
    else:
        ffn = f"EP{ep}×TP{expert_tp}"
    label = "moe" if (moe if moe is not None else ep > 1) else "mlp"
    parts.append(_cell(label, tp // mlp_tp, ffn))
    return parts


def plan_kind(row: Iterable[int], model: ModelSpec | None = None) -> str:
    """The parallel layout of a plan without its dtypes and knobs, e.g.
    ``DP1 · PP2 · attn DP2×TP2 · mlp TP4``."""
    p = plan_to_dict(row)
    moe = None if model is None else model.is_moe
    return _SEP.join([f"DP{p['dp']}", f"PP{p['pp']}", *_cells(p, moe)])


def describe_plan(row: Iterable[int], model: ModelSpec | None = None) -> str:
    """One-line description of a plan row, e.g.
    ``DP2 · PP1 · attn TP4 · moe EP4 · W fp8 / KV fp8 · seqs 256 · chunk 2048 · 1980 MHz``.

    Cells read ``DP{replicas}×TP{gpus}`` (the ``DP1×`` is left out); the FFN cell is ``moe``
    for MoE models (when ``model`` is given, else when ``ep > 1``). The activation dtype, the
    block size and the memory utilisation appear only when they differ from the defaults
    (:func:`auto_act_dtype`, 16, 0.90), the clock only when it is set, ``NCCL all-reduce``
    only when vLLM's custom all-reduce is off.
    :func:`plan_from_description` reads the text back.
    """
    p = plan_to_dict(row)
    dtypes = f"W {p['weight_dtype']} / KV {p['kv_dtype']}"
    if p["act_dtype"] != auto_act_dtype(str(p["weight_dtype"])):
        dtypes += f" / A {p['act_dtype']}"
    budget = p["max_num_batched_tokens"]
    parts = [
        plan_kind(row, model),
        dtypes,
        f"seqs {p['max_num_seqs']}",
        f"chunk {budget}" if p["chunked_prefill"] else f"budget {budget}",
    ]
    if p["block_size"] != DEFAULT_BLOCK_SIZE:
        parts.append(f"block {p['block_size']}")
    if round(float(p["gpu_mem_util"]) * 1000) != DEFAULT_GPU_MEM_UTIL_PERMILLE:
        parts.append(f"mem {p['gpu_mem_util']:g}")
    if p["gpu_clock_mhz"]:
        parts.append(f"{p['gpu_clock_mhz']} MHz")
    if p["disable_custom_all_reduce"]:
        parts.append(_NCCL_ALL_REDUCE)
    return _SEP.join(parts)


_CELL_RE = re.compile(r"^(enc|attn|mlp|moe) (?:DP(\d+)×)?(?:(?:EP(\d+)(?:×TP(\d+))?)|TP(\d+))$")
_DTYPE_RE = re.compile(r"^W (\w+) / KV (\w+)(?: / A (\w+))?$")


def plan_from_description(text: str) -> np.ndarray:
    """Read a :func:`describe_plan` line back into a plan row (int32 ``[F]``).

    Raises:
        ValueError: the text is not a plan description (the message quotes the bad part).
    """
    values: dict[str, object] = {}
    for part in (s.strip() for s in text.split(_SEP.strip())):
        cell = _CELL_RE.match(part)
        dtypes = _DTYPE_RE.match(part)
        words = part.split()
        if re.fullmatch(r"(DP|PP)\d+", part):
            values[part[:2].lower()] = int(part[2:])
        elif cell:
            label, replicas, ep, expert_tp, tp = cell.groups()
            replicas = int(replicas or 1)
            if ep is not None:
                gpus, values["ep"] = int(ep) * int(expert_tp or 1), int(ep)
            else:
                gpus = int(tp)
            key = {"enc": "enc_tp", "attn": "attn_tp"}.get(label, "mlp_tp")
            values[key] = gpus
            values.setdefault("_stage", gpus * replicas)
        elif dtypes:
            values["weight_dtype"], values["kv_dtype"] = dtypes.group(1), dtypes.group(2)
            if dtypes.group(3):
                values["act_dtype"] = dtypes.group(3)
        elif len(words) == 2 and words[0] in ("seqs", "chunk", "budget", "block", "mem"):
            key = {
                "seqs": "max_num_seqs",
                "chunk": "max_num_batched_tokens",
                "budget": "max_num_batched_tokens",
                "block": "block_size",
                "mem": "gpu_mem_util",
            }[words[0]]
            values[key] = float(words[1]) if words[0] == "mem" else int(words[1])
            if words[0] in ("chunk", "budget"):
                values["chunked_prefill"] = int(words[0] == "chunk")
        elif len(words) == 2 and words[1] == "MHz" and words[0].isdigit():
            values["gpu_clock_mhz"] = int(words[0])
        elif part == _NCCL_ALL_REDUCE:
            values["disable_custom_all_reduce"] = 1
        else:
            raise ValueError(f"not part of a plan description: {part!r} in {text!r}")
    if "_stage" not in values:
        raise ValueError(f"plan description without cell layouts: {text!r}")
    values["tp"] = values.pop("_stage")
    values.setdefault("ep", 1)
    return plan_row(values)
