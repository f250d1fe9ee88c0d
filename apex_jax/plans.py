"""Plans as integer tensors.

A plan is one int32 row of a ``[P, F]`` tensor whose columns are named by :data:`COLUMNS`.
Everything numeric downstream (memory, cost, engine) reads columns by these names, so a new
axis is one new column plus the code that interprets it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from apex_jax.dtypes import dtype_code, dtype_name

__all__ = [
    "COL",
    "COLUMNS",
    "NUM_COLUMNS",
    "PlanSpace",
    "describe_plan",
    "enumerate_plans",
    "plan_row",
    "plan_to_dict",
]

# Column order is the on-disk contract of plans.csv: append, never reorder.
COLUMNS: tuple[str, ...] = (
    "dp",  # data-parallel replicas
    "tp",  # tensor-parallel degree inside a replica
    "pp",  # pipeline stages inside a replica
    "weight_dtype",  # apex_jax.dtypes code
    "kv_dtype",  # apex_jax.dtypes code
    "max_num_seqs",  # engine: running sequences per replica
    "max_num_batched_tokens",  # engine: token budget per iteration
    "block_size",  # engine: KV-cache tokens per page
    "chunked_prefill",  # engine: 0 = prefill-only iterations, 1 = chunked (issue 4)
    "gpu_mem_util_permille",  # engine: gpu_memory_utilization x 1000
)
COL: dict[str, int] = {name: i for i, name in enumerate(COLUMNS)}
NUM_COLUMNS = len(COLUMNS)

_DTYPE_COLUMNS = ("weight_dtype", "kv_dtype")


@dataclasses.dataclass(frozen=True)
class PlanSpace:
    """Values each plan axis may take; the space is their product, filtered for validity.

    ``dp``, ``tp`` and ``pp`` of ``None`` mean "every divisor of the GPU count".
    """

    dp: Sequence[int] | None = None
    tp: Sequence[int] | None = None
    pp: Sequence[int] | None = None
    weight_dtype: Sequence[str] = ("bf16",)
    kv_dtype: Sequence[str] = ("bf16",)
    max_num_seqs: Sequence[int] = (256,)
    max_num_batched_tokens: Sequence[int] = (8192,)
    block_size: Sequence[int] = (16,)
    chunked_prefill: Sequence[int] = (0,)
    gpu_mem_util: Sequence[float] = (0.9,)
    use_all_gpus: bool = True


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_plans(
    space: PlanSpace,
    *,
    num_gpus: int,
    gpus_per_node: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
) -> np.ndarray:
    """Enumerate the valid DP x TP x PP x knob plans of a space.

    Validity is structural only (a TP degree must split the heads the way vLLM requires, TP
    stays inside a node, PP has at most one layer per stage). Whether the weights fit is
    decided later, for the whole tensor at once, by :mod:`apex_jax.memory`.

    Returns:
        int32 ``[P, F]`` plan tensor with columns :data:`COLUMNS`.
    """
    divisors = _divisors(num_gpus)
    dps = list(space.dp) if space.dp is not None else divisors
    tps = list(space.tp) if space.tp is not None else divisors
    pps = list(space.pp) if space.pp is not None else divisors
    rows = []
    for dp, tp, pp in itertools.product(dps, tps, pps):
        used = dp * tp * pp
        if used > num_gpus or (space.use_all_gpus and used != num_gpus):
            continue
        if num_heads % tp != 0:
            continue
        if num_kv_heads % tp != 0 and tp % num_kv_heads != 0:
            continue
        if tp > gpus_per_node or pp > num_layers:
            continue
        for knobs in itertools.product(
            space.weight_dtype,
            space.kv_dtype,
            space.max_num_seqs,
            space.max_num_batched_tokens,
            space.block_size,
            space.chunked_prefill,
            space.gpu_mem_util,
        ):
            wd, kd, seqs, budget, bs, chunked, util = knobs
            rows.append(
                [
                    dp,
                    tp,
                    pp,
                    dtype_code(wd),
                    dtype_code(kd),
                    seqs,
                    budget,
                    bs,
                    int(chunked),
                    round(float(util) * 1000),
                ]
            )
    if not rows:
        raise ValueError(
            f"the plan space is empty for {num_gpus} GPUs ({gpus_per_node} per node): check the "
            "dp/tp/pp lists in plan_space (TP must divide the attention heads and fit in a node)"
        )
    return np.asarray(rows, dtype=np.int32).reshape(-1, NUM_COLUMNS)


def plan_row(
    plan: Mapping[str, object], defaults: Mapping[str, object] | None = None
) -> np.ndarray:
    """Encode one plan given as a dict (``{"dp": 2, "tp": 4, "kv_dtype": "fp8", ...}``).

    Missing keys come from ``defaults``; ``gpu_mem_util`` may be given as a fraction.
    Unknown keys raise ``ValueError`` naming the accepted ones.
    """
    merged: dict[str, object] = {
        "dp": 1,
        "tp": 1,
        "pp": 1,
        "weight_dtype": "bf16",
        "kv_dtype": "bf16",
        "max_num_seqs": 256,
        "max_num_batched_tokens": 8192,
        "block_size": 16,
        "chunked_prefill": 0,
        "gpu_mem_util": 0.9,
    }
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
    for name in (
        "dp",
        "tp",
        "pp",
        "max_num_seqs",
        "max_num_batched_tokens",
        "block_size",
        "gpu_mem_util_permille",
    ):
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


def describe_plan(row: Iterable[int]) -> str:
    """One-line human-readable description of a plan row."""
    p = plan_to_dict(row)
    chunk = (
        f"chunk {p['max_num_batched_tokens']}"
        if p["chunked_prefill"]
        else (f"budget {p['max_num_batched_tokens']}")
    )
    return (
        f"DP{p['dp']} · PP{p['pp']} · TP{p['tp']} · W {p['weight_dtype']} / KV {p['kv_dtype']}"
        f" · seqs {p['max_num_seqs']} · {chunk} · block {p['block_size']}"
        f" · mem {p['gpu_mem_util']:.2f}"
    )
