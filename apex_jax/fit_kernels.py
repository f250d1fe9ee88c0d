"""Fit :class:`~apex_jax.cost.kernels.KernelParams` to one GPU's measured kernel tables with optax.

``apex-jax calibrate hardware=h100`` (or :func:`calibrate_from_config`):

1. loads every bundled table of the GPU (:mod:`apex_jax.cost.tables`) as one dataset per
   operator: GEMM, prefill attention, decode attention, fused MoE, collectives, p2p and the
   elementwise operators of Vidur's layer profiles;
2. cross-validates over **whole shapes**: each dataset's rows are grouped by shape
   (:data:`SHAPE_GROUPS`: a GEMM's ``(n, k)``, an attention head configuration, an MoE
   configuration, a collective's group size, a p2p message-size octave, and for the
   elementwise operators the whole profiled model), the shapes are dealt into ``folds``
   (seeded), and each fold is predicted by a fit that saw none of its shapes. The cost model
   uses the fitted model only where the tables do not cover a shape, so this is the error that
   matters; random rows of the same grids would measure interpolation instead;
3. each fit minimises a pseudo-Huber loss of ``log(predicted / measured)`` (close to its mean
   absolute value) per operator, summed over operators, with Adam over the log-space
   constants (full batch, one jit-compiled loop);
4. reports the absolute percentage error of the out-of-fold predictions per operator (median,
   p90, count, shapes) and per elementwise kind and collective, fits the constants once more
   on every row, writes them as JSON, ``calibration_report.json`` and, when matplotlib is
   installed, one predicted-vs-measured plot per operator;
5. reports how the engine's decode attention, piecewise linear in the KV entries, reproduces
   the measured decode table, against the single least-squares plane it replaced
   (:func:`decode_segments_error`).

The fitted constants load by GPU name with :func:`apex_jax.cost.kernels.load_calibrated`, which
the cost model uses; this module is only needed to fit them.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from apex_jax.cost import kernels as K
from apex_jax.cost import tables as ct
from apex_jax.cost.iteration import CostCoeffs, iteration_time_s
from apex_jax.cost.sites import DECODE_BATCH_KNOTS, DECODE_KV_POINTS, decode_table_time_s
from apex_jax.hardware import GpuSpec, get_gpu
from apex_jax.io import write_atomic, write_json

__all__ = [
    "OPERATORS",
    "SHAPE_GROUPS",
    "TARGETS_PCT",
    "calibrate",
    "calibrate_from_config",
    "decode_segments_error",
    "fit_params",
    "format_report",
    "operator_datasets",
    "predict_operator_s",
    "shape_folds",
    "write_outputs",
]

OPERATORS: tuple[str, ...] = (
    "gemm",
    "prefill_attention",
    "decode_attention",
    "moe",
    "collectives",
    "p2p",
    "elementwise",
)
# Vidur's elementwise operators, in the order of the ``kind`` code of the elementwise dataset.
_ELEMENTWISE = ("input_layernorm", "post_attention_layernorm", "attn_rope", "mlp_act", "add", "emb")

Dataset = dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


def _gemm_dataset(gpu_name: str) -> Dataset:
    t = ct.load_gemm(gpu_name)
    # Block-scaled fp8 rows are read as a table only; the constants are 16-bit and fp8's.
    keep = t["dtype"] != "fp8_block"
    return {
        "m": t["m"][keep],
        "n": t["n"][keep],
        "k": t["k"][keep],
        "fp8": (t["dtype"][keep] == "fp8").astype(np.float64),
        "time_s": t["time_s"][keep],
    }


def _prefill_dataset(gpu_name: str) -> Dataset:
    t = ct.load_context_attention(gpu_name)
    return {
        "batch": t["batch"],
        "seq_len": t["isl"],
        "heads": t["heads"],
        "kv_heads": t["kv_heads"],
        "head_dim": t["head_dim"],
        "kv_bytes": np.where(t["kv_dtype"] == "fp8", 1.0, 2.0),
        "fp8": (t["kv_dtype"] == "fp8").astype(np.float64),
        "time_s": t["time_s"],
    }


def _decode_dataset(gpu_name: str) -> Dataset:
    t = ct.load_generation_attention(gpu_name)
    return {
        "batch": t["batch"],
        "kv_tokens": t["batch"] * t["kv_len"],
        "heads": t["heads"],
        "kv_heads": t["kv_heads"],
        "head_dim": t["head_dim"],
        "kv_bytes": np.where(t["kv_dtype"] == "fp8", 1.0, 2.0),
        "fp8": (t["kv_dtype"] == "fp8").astype(np.float64),
        "time_s": t["time_s"],
    }


@functools.lru_cache(maxsize=None)
def _power_law_load(tokens: int, topk: int, experts: int, ep: int, alpha: float) -> float:
    return ct.power_law_rank_load(tokens, topk, experts, ep, alpha)


def _moe_dataset(gpu_name: str, distribution: str | None = "balanced") -> Dataset:
    t = ct.load_moe(gpu_name, distribution=distribution)
    keep = np.isin(t["dtype"], ["bf16", "fp8"])
    if distribution is None:
        keep &= t["distribution"] != "balanced"
    return {
        "tokens": t["tokens"][keep],
        "hidden": t["hidden"][keep],
        "inter": t["inter"][keep],
        "topk": t["topk"][keep],
        "experts": t["experts"][keep],
        "tp": t["tp"][keep],
        "ep": t["ep"][keep],
        "gated": t["gated"][keep],
        # The busiest rank's routed rows over the mean rank's (1 when balanced).
        "load": np.array(
            [
                _power_law_load(int(n), int(k), int(e), int(ep), float(name[len("power_law_") :]))
                if name.startswith("power_law_")
                else 1.0
                for name, n, k, e, ep in zip(
                    t["distribution"][keep],
                    t["tokens"][keep],
                    t["topk"][keep],
                    t["experts"][keep],
                    t["ep"][keep],
                )
            ]
        ),
        "fp8": (t["dtype"][keep] == "fp8").astype(np.float64),
        "time_s": t["time_s"][keep],
    }


def _collective_dataset(gpu_name: str) -> Dataset:
    t = ct.load_collectives(gpu_name)
    op = np.array([K.COLLECTIVE_OPS.index(o) for o in t["op"]], np.float64)
    return {
        "op": op,
        "bytes": t["bytes"],
        "num_gpus": t["num_gpus"],
        "num_nodes": t["num_nodes"],
        "time_s": t["time_s"],
    }


def _p2p_dataset(gpu_name: str) -> Dataset:
    t = ct.load_p2p(gpu_name)
    return {"bytes": t["bytes"], "inter_node": t["inter_node"], "time_s": t["time_s"]}


def _elementwise_dataset(gpu_name: str, models: Sequence[str] | None = None) -> Dataset:
    parts = []
    profiled = ct.vidur_models(gpu_name)
    for model in models if models is not None else profiled:
        t = ct.load_vidur_mlp(gpu_name, model)
        head_dim = t["hidden"] / t["heads"]
        for code, op in enumerate(_ELEMENTWISE):
            time_s = t[f"{op}_s"]
            ok = np.isfinite(time_s) & (time_s > 0)
            parts.append(
                {
                    "kind": np.full(int(ok.sum()), float(code)),
                    # Which profiled model the row comes from (the cross-validation's shape).
                    "model": np.full(int(ok.sum()), float(profiled.index(model))),
                    "tokens": t["tokens"][ok],
                    "hidden": t["hidden"][ok],
                    "heads": (t["heads"] / t["tp"])[ok],
                    "kv_heads": np.maximum(t["kv_heads"] / t["tp"], 1.0)[ok],
                    "head_dim": head_dim[ok],
                    "inter": (t["inter"] / t["tp"])[ok],
                    "gated": t["gated"][ok],
                    "time_s": time_s[ok],
                }
            )
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


_LOADERS: dict[str, Callable[[str], Dataset]] = {
    "gemm": _gemm_dataset,
    "prefill_attention": _prefill_dataset,
    "decode_attention": _decode_dataset,
    "moe": _moe_dataset,
    "collectives": _collective_dataset,
    "p2p": _p2p_dataset,
    "elementwise": _elementwise_dataset,
}
_TABLE_OF = {
    "gemm": "gemm",
    "prefill_attention": "context_attention",
    "decode_attention": "generation_attention",
    "moe": "moe",
    "collectives": "collectives",
    "p2p": "p2p",
    "elementwise": "vidur_mlp",
}


def operator_datasets(gpu_name: str, operators: Sequence[str] | None = None) -> dict[str, Dataset]:
    """Every measured dataset of a GPU, by operator (times in seconds, sizes in bytes)."""
    available = set(ct.available_tables(gpu_name))
    chosen = OPERATORS if operators is None else tuple(operators)
    unknown = sorted(set(chosen) - set(OPERATORS))
    if unknown:
        raise ValueError(f"unknown operators {unknown}: choose from {', '.join(OPERATORS)}")
    out = {}
    for op in chosen:
        if _TABLE_OF[op] in available:
            data = _LOADERS[op](gpu_name)
            keep = np.isfinite(data["time_s"]) & (data["time_s"] > 0)
            out[op] = {k: v[keep] for k, v in data.items()}
    if not out:
        raise ValueError(f"no measured kernel tables for {gpu_name}")
    return out


# The KernelParams fields each operator's fit sets (by name prefix); the network fields are
# shared by collectives and p2p.
_FIELD_PREFIXES: dict[str, tuple[str, ...]] = {
    "gemm": ("log_gemm_",),
    "prefill_attention": ("log_prefill_",),
    "decode_attention": ("log_decode_",),
    "moe": ("log_moe_",),
    "collectives": ("log_coll_", "log_inter_node_", "log_network_"),
    "p2p": ("log_p2p_", "log_inter_node_", "log_network_"),
    "elementwise": ("log_elementwise_",),
}


def _merge_fitted(
    base: K.KernelParams, fitted: K.KernelParams, operators: Sequence[str]
) -> K.KernelParams:
    """``base`` with the fields of ``operators`` (:data:`_FIELD_PREFIXES`) from ``fitted``."""
    prefixes = tuple(p for op in operators for p in _FIELD_PREFIXES[op])
    return base._replace(
        **{name: getattr(fitted, name) for name in base._fields if name.startswith(prefixes)}
    )


# What one "shape" is per operator: the rows the cross-validation holds out together.
SHAPE_GROUPS: dict[str, str] = {
    "gemm": "(n, k): every m and dtype of a weight shape",
    "prefill_attention": "(heads, kv_heads, head_dim): every batch, length and KV dtype",
    "decode_attention": "(heads, kv_heads, head_dim): every batch, length and KV dtype",
    "moe": "(hidden, inter, topk, experts): every token count, TP / EP layout and dtype",
    "collectives": "group size: every op and message size over that many GPUs",
    "p2p": "message-size octave, within and across nodes",
    "elementwise": "profiled model: every operator, TP degree and token count of a model",
}


def _shape_columns(op: str, data: Dataset) -> list[np.ndarray]:
    """The columns whose values together identify a row's shape (see :data:`SHAPE_GROUPS`)."""
    if op == "gemm":
        return [data["n"], data["k"]]
    if op in ("prefill_attention", "decode_attention"):
        return [data["heads"], data["kv_heads"], data["head_dim"]]
    if op == "moe":
        return [data["hidden"], data["inter"], data["topk"], data["experts"]]
    if op == "collectives":
        return [data["num_gpus"]]
    if op == "p2p":
        return [np.floor(np.log2(data["bytes"]))]
    if op == "elementwise":
        return [data["model"]]
    raise ValueError(f"unknown operator {op!r}")


def shape_folds(op: str, data: Dataset, num_folds: int, seed: int) -> np.ndarray:
    """Fold of every row, ``[n]`` int: whole shapes (:data:`SHAPE_GROUPS`) are shuffled
    (seeded) and dealt round-robin into ``num_folds`` folds, so a fold's shapes are absent
    from the other folds. With fewer shapes than folds, some folds hold none of them."""
    if num_folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {num_folds}")
    _, shape = np.unique(np.stack(_shape_columns(op, data), axis=1), axis=0, return_inverse=True)
    shape = shape.reshape(-1)
    order = np.random.default_rng(seed).permutation(int(shape.max()) + 1)
    fold_of_shape = np.empty_like(order)
    fold_of_shape[order] = np.arange(len(order)) % num_folds
    return fold_of_shape[shape]


def _subsample(data: Dataset, rows: np.ndarray, max_rows: int | None, seed: int) -> Dataset:
    """``data`` at ``rows`` (bool mask or indices), randomly cut to at most ``max_rows``."""
    index = np.flatnonzero(rows) if rows.dtype == bool else rows
    if max_rows is not None and len(index) > max_rows:
        index = np.sort(np.random.default_rng(seed).choice(index, max_rows, replace=False))
    return {k: v[index] for k, v in data.items()}


# --------------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------------


def _gemm_dtypes(gpu: GpuSpec) -> tuple[str, str]:
    """(16-bit, fp8) compute formats of the GEMM table rows of a GPU."""
    sixteen = "bf16" if gpu.peak_flops["bf16"] >= gpu.peak_flops["fp16"] else "fp16"
    fp8 = "fp8" if gpu.peak_flops["fp8"] > gpu.peak_flops[sixteen] else sixteen
    return sixteen, fp8


def predict_operator_s(op: str, p: K.KernelParams, gpu: GpuSpec, d: Mapping[str, Any]):
    """Predicted seconds of every row of an operator dataset (see :func:`operator_datasets`)."""
    if op == "gemm":
        sixteen, fp8 = _gemm_dtypes(gpu)
        a = K.gemm_time_s(p, gpu, d["m"], d["n"], d["k"], compute_dtype=sixteen)
        b = K.gemm_time_s(p, gpu, d["m"], d["n"], d["k"], compute_dtype=fp8, weight_bytes=1.0)
        return jnp.where(d["fp8"] > 0, b, a)
    if op == "prefill_attention":
        return K.prefill_attention_time_s(
            p,
            gpu,
            d["batch"],
            d["seq_len"],
            d["heads"],
            d["kv_heads"],
            d["head_dim"],
            kv_bytes=d["kv_bytes"],
        )
    if op == "decode_attention":
        return K.decode_attention_time_s(
            p,
            gpu,
            d["batch"],
            d["kv_tokens"],
            d["heads"],
            d["kv_heads"],
            d["head_dim"],
            kv_bytes=d["kv_bytes"],
        )
    if op == "moe":
        sixteen, fp8 = _gemm_dtypes(gpu)
        args = (p, gpu, d["tokens"], d["hidden"], d["inter"], d["topk"], d["experts"])
        layout = {"tp": d["tp"], "ep": d["ep"], "load": d["load"], "gated": d["gated"] > 0}
        a = K.moe_time_s(*args, compute_dtype=sixteen, **layout)
        b = K.moe_time_s(*args, compute_dtype=fp8, weight_bytes=1.0, **layout)
        return jnp.where(d["fp8"] > 0, b, a)
    if op == "collectives":
        out = jnp.zeros(jnp.shape(d["bytes"]))
        for i, name in enumerate(K.COLLECTIVE_OPS):
            t = K.collective_time_s(
                p, gpu, name, d["bytes"], d["num_gpus"], num_nodes=d["num_nodes"]
            )
            out = jnp.where(d["op"] == i, t, out)
        return out
    if op == "p2p":
        return K.p2p_time_s(p, gpu, d["bytes"], inter_node=d["inter_node"] > 0)
    if op == "elementwise":
        tok = d["tokens"]
        options = (
            K.norm_time_s(p, gpu, tok, d["hidden"]),
            K.norm_time_s(p, gpu, tok, d["hidden"]),
            K.rope_time_s(p, gpu, tok, d["heads"], d["kv_heads"], d["head_dim"]),
            K.activation_time_s(p, gpu, tok, d["inter"], gated=d["gated"] > 0),
            K.add_time_s(p, gpu, tok, d["hidden"]),
            K.embedding_time_s(p, gpu, tok, d["hidden"]),
        )
        out = options[0]
        for code, t in enumerate(options):
            out = jnp.where(d["kind"] == code, t, out)
        return out
    raise ValueError(f"unknown operator {op!r}")


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


# Scale of the pseudo-Huber loss on log errors: quadratic below ~2%, absolute above, so
# that the fit targets the median error and a few pathological kernels do not dominate.
_LOSS_SCALE = 0.02


def _loss(p: K.KernelParams, gpu: GpuSpec, train: Mapping[str, Dataset]):
    total = 0.0
    for op, d in train.items():
        r = jnp.log(predict_operator_s(op, p, gpu, d)) - jnp.log(d["time_s"])
        total = total + jnp.mean(jnp.sqrt(r**2 + _LOSS_SCALE**2) - _LOSS_SCALE)
    return total


def fit_params(
    train: Mapping[str, Dataset],
    gpu: GpuSpec,
    init: K.KernelParams | None = None,
    *,
    steps: int = 2000,
    learning_rate: float = 0.05,
) -> tuple[K.KernelParams, np.ndarray]:
    """Fit the kernel constants to training data; returns ``(params, loss per step)``.

    Adam with a cosine-decayed step size over all constants, full batch, in one jit-compiled
    ``lax.scan``. Constants of operators absent from ``train`` keep their initial values.
    """
    params = K.default_kernel_params() if init is None else init
    data = {op: {k: jnp.asarray(v) for k, v in d.items()} for op, d in train.items()}
    schedule = optax.cosine_decay_schedule(learning_rate, steps, alpha=0.02)
    optimiser = optax.adam(schedule)

    @jax.jit
    def run(params, data):
        loss_and_grad = jax.value_and_grad(lambda q: _loss(q, gpu, data))

        def step(carry, _):
            q, state = carry
            value, grad = loss_and_grad(q)
            updates, state = optimiser.update(grad, state, q)
            return (optax.apply_updates(q, updates), state), value

        (params, _), losses = jax.lax.scan(step, (params, optimiser.init(params)), None, steps)
        return params, losses

    fitted, losses = run(params, data)
    return fitted, np.asarray(losses)


def _ape_pct(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    return 100.0 * np.abs(predicted - measured) / measured


def _error_summary(ape: np.ndarray) -> dict[str, Any]:
    return {
        "median_ape_pct": float(np.median(ape)) if len(ape) else math.nan,
        "p90_ape_pct": float(np.percentile(ape, 90)) if len(ape) else math.nan,
        "n_heldout": len(ape),
    }


def _max_summary(ape: np.ndarray) -> dict[str, Any]:
    return {
        "median_ape_pct": float(np.median(ape)),
        "p90_ape_pct": float(np.percentile(ape, 90)),
        "max_ape_pct": float(np.max(ape)),
        "n": len(ape),
    }


def decode_segments_error(gpu_name: str) -> dict[str, dict[str, Any]] | None:
    """How the engine prices the GPU's measured decode-attention tables (``None`` without
    one), as absolute percentage errors at every measured point (median, p90, max, count):

    - ``segments``: the engine's grid (:func:`apex_jax.cost.sites.decode_table_time_s`:
      per measured batch, piecewise linear in the KV entries between fixed breakpoints)
      through :func:`apex_jax.cost.iteration.iteration_time_s`, one attention replica;
    - ``plane``: the single least-squares plane ``a + b * batch + c * kv_tokens`` (relative
      error, batches up to 512) that priced decode attention before, linear in the KV
      entries everywhere.
    """
    gpu = get_gpu(gpu_name)
    segments, plane = [], []
    batch_knots = np.asarray(DECODE_BATCH_KNOTS)[:, None]
    for key, table in ct.attention_slices(gpu.name, "generation").items():
        if len(table["time_s"]) < 12 or len(set(table["batch"])) < 2:
            continue
        batch, measured = table["batch"], table["time_s"]
        kv_tokens = batch * table["kv_len"]
        grid = decode_table_time_s(gpu.name, key, batch_knots, DECODE_KV_POINTS)
        coeffs = CostCoeffs.zeros()._replace(decode_attn_grid_s=grid)
        engine = iteration_time_s(coeffs, 0.0, 0.0, 0.0, batch, kv_tokens, xp=np)
        segments.append(_ape_pct(engine, measured))
        rows = batch <= 512
        design = np.stack([np.ones_like(batch), batch, kv_tokens], axis=1)
        coef = np.linalg.lstsq(
            design[rows] / measured[rows, None], np.ones(rows.sum()), rcond=None
        )[0]
        plane.append(_ape_pct(design @ np.maximum(coef, [1e-7, 0.0, 1e-15]), measured))
    if not segments:
        return None
    return {
        "segments": _max_summary(np.concatenate(segments)),
        "plane": _max_summary(np.concatenate(plane)),
    }


# Per-kind rows of the report: the operators, or the formats (the ``fp8`` column: fp8 W8A8
# GEMMs and experts, an fp8 KV cache for attention), that one dataset lumps together.
_BREAKDOWN: dict[str, tuple[str, tuple[str, ...]]] = {
    "gemm": ("fp8", ("16-bit", "fp8")),
    "prefill_attention": ("fp8", ("bf16 KV", "fp8 KV")),
    "decode_attention": ("fp8", ("bf16 KV", "fp8 KV")),
    "moe": ("fp8", ("bf16", "fp8")),
    "elementwise": ("kind", _ELEMENTWISE),
    "collectives": ("op", K.COLLECTIVE_OPS),
}


# The MoE table's expert-parallel rows with skewed (power-law) routing, predicted by the fold
# that held their shape out: at the busiest rank's load that the benchmark's routing gives,
# and, to show what that load is worth, as if routing were even.
_SKEWED: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "EP, power law: rank load": lambda load: load,
    "EP, power law: even load": np.ones_like,
}


def _skewed_moe_rows(
    gpu_name: str, datasets: Mapping[str, Dataset], fold_of: Mapping[str, np.ndarray]
) -> tuple[Dataset, np.ndarray]:
    """``(rows, fold [n])``: the MoE table's power-law rows with expert parallelism whose
    shape the (balanced) MoE dataset holds, each in its shape's fold; empty when MoE is not
    fitted or its dataset already is the power-law rows (the A100 table has no balanced
    ones)."""
    moe = datasets.get("moe")
    if moe is None or (moe["load"] != 1.0).any():
        return {"time_s": np.zeros(0)}, np.zeros(0, int)
    rows = _moe_dataset(gpu_name, distribution=None)
    keep = np.isfinite(rows["time_s"]) & (rows["time_s"] > 0)
    fold_of_shape = {
        tuple(shape): fold
        for shape, fold in zip(np.stack(_shape_columns("moe", moe), axis=1), fold_of["moe"])
    }
    shapes = np.stack(_shape_columns("moe", rows), axis=1)
    fold = np.array([fold_of_shape.get(tuple(shape), -1) for shape in shapes])
    # Without expert parallelism every expert is on the one rank: the skew does not change
    # its rows.
    keep &= (fold >= 0) & (rows["ep"] > 1)
    return {k: v[keep] for k, v in rows.items()}, fold[keep]


def calibrate(
    gpu_name: str,
    *,
    operators: Sequence[str] | None = None,
    folds: int = 5,
    seed: int = 0,
    steps: int = 2000,
    learning_rate: float = 0.05,
    max_train_per_op: int | None = 20000,
    max_rows_per_op: int | None = None,
) -> dict[str, Any]:
    """Cross-validate one GPU's kernel constants over whole shapes, then fit them on all rows.

    Args:
        gpu_name: catalog GPU name or alias.
        operators: subset of :data:`OPERATORS` (default: every one with a table).
        folds: cross-validation folds; each holds out about ``1 / folds`` of every
            operator's shapes (:func:`shape_folds`).
        seed: seed of the fold assignment and the subsampling.
        steps: Adam steps per fit.
        learning_rate: peak Adam step size.
        max_train_per_op: at most this many training rows per operator and fit (random).
        max_rows_per_op: subsample each dataset to at most this many rows first (for tests).

    Returns:
        A dict with ``gpu``, ``params`` (:class:`~apex_jax.cost.kernels.KernelParams`, fitted
        on every row; the constants of operators not fitted are the GPU's shipped ones,
        :func:`~apex_jax.cost.kernels.load_calibrated`), ``folds``, ``operators`` (per
        operator ``median_ape_pct``, ``p90_ape_pct``, ``n_heldout`` over the out-of-fold
        predictions, ``n_shapes``, ``held_out_by`` and ``n_train`` of the final fit),
        ``breakdown`` (the same errors per format of the GEMMs, experts and KV cache, per
        elementwise kind and per collective, :data:`_BREAKDOWN`), ``decode_segments``
        (:func:`decode_segments_error`, when decode attention is fitted), ``heldout`` (per
        operator measured / out-of-fold predicted arrays), ``losses`` (of the final fit) and
        ``fit_s`` (all fits).
    """
    gpu = get_gpu(gpu_name)
    datasets = operator_datasets(gpu.name, operators)
    fold_of: dict[str, np.ndarray] = {}
    for i, (op, data) in enumerate(datasets.items()):
        if max_rows_per_op is not None and len(data["time_s"]) > max_rows_per_op:
            everything = np.ones(len(data["time_s"]), bool)
            datasets[op] = data = _subsample(data, everything, max_rows_per_op, seed + 100 + i)
        fold_of[op] = shape_folds(op, data, folds, seed + i)
    predicted = {op: np.full(len(d["time_s"]), np.nan) for op, d in datasets.items()}
    skewed = _skewed_moe_rows(gpu.name, datasets, fold_of)
    skewed_predicted = {name: np.full(len(skewed[0]["time_s"]), np.nan) for name in _SKEWED}
    start = time.perf_counter()
    # One bar over the folds' fits and the final one, with an ETA (on a terminal only).
    bar = tqdm(total=folds + 1, desc="kernel fits", unit="fit", file=sys.stderr, disable=None)
    for fold in range(folds):
        train = {
            op: _subsample(d, fold_of[op] != fold, max_train_per_op, seed + fold)
            for op, d in datasets.items()
        }
        params, _ = fit_params(train, gpu, steps=steps, learning_rate=learning_rate)
        bar.update()
        for op, d in datasets.items():
            held = fold_of[op] == fold
            if held.any():
                rows = {k: v[held] for k, v in d.items()}
                predicted[op][held] = np.asarray(predict_operator_s(op, params, gpu, rows))
        held = skewed[1] == fold
        if held.any():
            rows = {k: v[held] for k, v in skewed[0].items()}
            for name, load_of in _SKEWED.items():
                at_load = rows | {"load": load_of(rows["load"])}
                skewed_predicted[name][held] = np.asarray(
                    predict_operator_s("moe", params, gpu, at_load)
                )
    every = {
        op: _subsample(d, np.ones(len(d["time_s"]), bool), max_train_per_op, seed + folds)
        for op, d in datasets.items()
    }
    params, losses = fit_params(every, gpu, steps=steps, learning_rate=learning_rate)
    params = _merge_fitted(K.load_calibrated(gpu.name), params, list(datasets))
    bar.update()
    bar.close()
    fit_s = time.perf_counter() - start
    report_ops, breakdown, heldout = {}, {}, {}
    for op, d in datasets.items():
        measured = d["time_s"]
        ape = _ape_pct(predicted[op], measured)
        report_ops[op] = {
            **_error_summary(ape),
            "n_shapes": len(np.unique(np.stack(_shape_columns(op, d), axis=1), axis=0)),
            "held_out_by": SHAPE_GROUPS[op],
            "n_train": len(every[op]["time_s"]),
        }
        if op in _BREAKDOWN:
            column, names = _BREAKDOWN[op]
            for code, name in enumerate(names):
                breakdown[f"{op}/{name}"] = _error_summary(ape[d[column] == code])
        heldout[op] = {"measured_s": measured, "predicted_s": predicted[op]}
    for name, values in skewed_predicted.items():
        if len(values):
            breakdown[f"moe/{name}"] = _error_summary(_ape_pct(values, skewed[0]["time_s"]))
    return {
        "gpu": gpu.name,
        "params": params,
        "folds": folds,
        "operators": report_ops,
        "breakdown": breakdown,
        "decode_segments": (
            decode_segments_error(gpu.name) if "decode_attention" in datasets else None
        ),
        "heldout": heldout,
        "losses": losses,
        "fit_s": fit_s,
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

# Targets of the issue for the H100 (median APE on held-out points, %).
TARGETS_PCT: dict[str, float] = {
    "gemm": 10.0,
    "prefill_attention": 10.0,
    "decode_attention": 10.0,
    "collectives": 15.0,
}


def format_report(result: Mapping[str, Any]) -> str:
    """The per-operator table of out-of-fold errors, with the per-kind rows indented."""
    title = (
        f"kernel calibration for {result['gpu']}: absolute percentage error on shapes held out "
        f"of the fit ({result['folds']}-fold cross-validation over whole shapes)"
    )
    lines = [
        title,
        f"{'operator':<30} {'median %':>9} {'p90 %':>8} {'n held':>7} {'shapes':>6}  target",
    ]
    for op, r in result["operators"].items():
        target = TARGETS_PCT.get(op)
        verdict = ""
        if target is not None:
            verdict = f"<= {target:g}% {'met' if r['median_ape_pct'] <= target else 'MISSED'}"
        lines.append(
            f"{op:<30} {r['median_ape_pct']:>9.2f} {r['p90_ape_pct']:>8.2f} "
            f"{r['n_heldout']:>7d} {r['n_shapes']:>6d}  {verdict}"
        )
        for name, b in result["breakdown"].items():
            if name.startswith(f"{op}/") and b["n_heldout"]:
                lines.append(
                    f"  {name.split('/', 1)[1]:<28} {b['median_ape_pct']:>9.2f} "
                    f"{b['p90_ape_pct']:>8.2f} {b['n_heldout']:>7d}"
                )
    segments = result.get("decode_segments")
    if segments:
        lines.append(
            "decode attention as the engine prices it, against every point of the measured "
            "table (not a fit of the constants above):"
        )
        for name, label in (("plane", "one plane (before)"), ("segments", "KV segments (now)")):
            s = segments[name]
            lines.append(
                f"  {label:<28} {s['median_ape_pct']:>9.2f} {s['p90_ape_pct']:>8.2f} "
                f"{s['n']:>7d}  max {s['max_ape_pct']:.1f}%"
            )
    lines.append("a shape is:")
    lines += [f"  {op:<20} {r['held_out_by']}" for op, r in result["operators"].items()]
    lines.append(
        f"fit time {result['fit_s']:.1f} s ({result['folds']} folds and the final fit on every "
        f"row), final loss {float(result['losses'][-1]):.4f}"
    )
    return "\n".join(lines)


def _plot(result: Mapping[str, Any], out_dir: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the predicted-vs-measured plots")
        return []
    written = []
    for op, d in result["heldout"].items():
        measured, predicted = np.asarray(d["measured_s"]), np.asarray(d["predicted_s"])
        if not len(measured):
            continue
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.loglog(measured * 1e3, predicted * 1e3, ".", ms=2, alpha=0.4)
        lo = min(measured.min(), predicted.min()) * 1e3
        hi = max(measured.max(), predicted.max()) * 1e3
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        r = result["operators"][op]
        ax.set_title(
            f"{result['gpu']} {op}\nheld out: median {r['median_ape_pct']:.1f}%, "
            f"p90 {r['p90_ape_pct']:.1f}%",
            fontsize=9,
        )
        ax.set_xlabel("measured (ms)")
        ax.set_ylabel("predicted (ms)")
        fig.tight_layout()
        path = out_dir / f"{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    return written


def write_outputs(
    result: Mapping[str, Any], out_dir: str | Path, *, plots: bool = True
) -> dict[str, Any]:
    """Write ``calibration_report.json``, ``<GPU>.json`` (the fitted constants) and plots.

    ``<GPU>.json`` records the held-out errors of the operators fitted, and of the others
    those the shipped fit recorded (their constants are the shipped ones, see
    :func:`calibrate`)."""
    out_dir = Path(out_dir)
    shipped = K.calibrated_dir() / f"{result['gpu']}.json"
    heldout = json.loads(shipped.read_text()).get("heldout", {}) if shipped.exists() else {}
    params_json = {
        "gpu": result["gpu"],
        "params": K.params_to_json(result["params"]),
        "heldout": {**heldout, **result["operators"]},
    }
    params_path = out_dir / f"{result['gpu']}.json"
    write_json(params_path, params_json)
    report = {
        "gpu": result["gpu"],
        "folds": result["folds"],
        "operators": result["operators"],
        "breakdown": result["breakdown"],
        "decode_segments": result.get("decode_segments"),
        "fit_s": result["fit_s"],
        "final_loss": float(result["losses"][-1]),
        "params_file": params_path.name,
        "plots": _plot(result, out_dir) if plots else [],
    }
    write_json(out_dir / "calibration_report.json", report)
    return report


def calibrate_from_config(config: Mapping[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Run ``apex-jax calibrate`` from a plain config dict; print the table, write outputs.

    Config keys: ``hardware.name``, ``target`` (only ``kernels``), ``operators`` (list or
    null), ``folds``, ``seed``, ``steps``, ``learning_rate``, ``max_train_per_op``,
    ``max_rows_per_op``, ``plots``, ``install`` (also copy the fitted constants into the
    package's ``data/calibrated/kernels/`` so later runs use them).
    """
    target = str(config.get("target", "kernels"))
    if target != "kernels":
        raise ValueError(f"calibrate target {target!r} is not supported: use target=kernels")
    operators = config.get("operators")
    result = calibrate(
        str(config["hardware"]["name"]),
        operators=None if operators is None else [str(o) for o in operators],
        folds=int(config.get("folds", 5)),
        seed=int(config.get("seed", 0)),
        steps=int(config.get("steps", 2000)),
        learning_rate=float(config.get("learning_rate", 0.05)),
        max_train_per_op=_optional_int(config.get("max_train_per_op", 20000)),
        max_rows_per_op=_optional_int(config.get("max_rows_per_op")),
    )
    print(format_report(result))
    report = write_outputs(result, out_dir, plots=bool(config.get("plots", True)))
    if bool(config.get("install", False)):
        src = Path(out_dir) / report["params_file"]
        write_atomic(K.calibrated_dir() / report["params_file"], src.read_text())
        print(f"installed {K.calibrated_dir() / report['params_file']}", file=sys.stderr)
    # stdout carries only the report table.
    print(
        f"wrote {Path(out_dir) / 'calibration_report.json'} and {report['params_file']}",
        file=sys.stderr,
    )
    return report


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)
