"""Measured kernel tables: loading (in seconds and bytes) and grid interpolation in log space.

The tables are the subsets of public measurements bundled under ``apex_jax/data/profiles``
(see its ``SOURCES.md``; ``scripts/package_profiles.py`` rebuilds them). Every loader returns
a :class:`Table`, a dict of equal-length NumPy columns in SI units, whatever the source used:

====================  =========================  ==================================
source                time unit in the file      size unit in the file
====================  =========================  ==================================
AIConfigurator        milliseconds               NCCL ``message_size``: *elements*
APEX+                 microseconds               ``size(kb)``: KiB
Vidur                 milliseconds               ``size``: bytes
====================  =========================  ==================================

Columns after loading: times are ``time_s``; message sizes are ``bytes``.

A :class:`Grid` holds a table on a full rectangular grid of its coordinates, in log space
(``log(coordinate)`` axes, ``log(seconds)`` values). :func:`interp_grid` is multilinear
interpolation of ``log t`` over the log coordinates: exact at grid points, monotone between
adjacent grid points along every axis, differentiable, and usable inside ``jax.jit``. Queries
outside the grid are clamped to its edge; :func:`grid_covers` tells whether a point is inside
the measured region, which is how the cost model decides between table and analytic model.
"""

from __future__ import annotations

import csv
import functools
import gzip
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from apex_jax.paths import DATA_DIR

__all__ = [
    "AIC_GPUS",
    "COLLECTIVE_OPS",
    "Grid",
    "Table",
    "aic_key",
    "attention_slices",
    "available_tables",
    "build_grid",
    "collective_grids",
    "custom_all_reduce_grids",
    "gemm_grid",
    "grid_covers",
    "interp_grid",
    "load_collectives",
    "load_context_attention",
    "load_custom_allreduce",
    "load_gemm",
    "load_generation_attention",
    "load_moe",
    "load_p2p",
    "load_vidur_mlp",
    "moe_grids",
    "power_law_rank_load",
    "profiles_dir",
    "vidur_models",
]

Table = dict[str, np.ndarray]

# AIConfigurator directory name of each catalog GPU it measured.
AIC_GPUS: dict[str, str] = {
    "H100-SXM-80GB": "h100_sxm",
    "H200-SXM-141GB": "h200_sxm",
    "A100-SXM-80GB": "a100_sxm",
}
# Vidur directory name of each catalog GPU it measured.
_VIDUR_GPUS: dict[str, str] = {
    "H100-SXM-80GB": "h100",
    "A100-SXM-80GB": "a100",
    "A40-PCIE-48GB": "a40",
}
_VIDUR_NETWORK: dict[str, str] = {"H100-SXM-80GB": "h100_dgx", "A100-SXM-80GB": "a100_dgx"}
_APEX_COMM_GPUS = ("H100-SXM-80GB", "H200-SXM-141GB", "V100-PCIE-16GB")

COLLECTIVE_OPS: tuple[str, ...] = ("all_reduce", "all_gather", "reduce_scatter", "alltoall")

_MS = 1e-3
_US = 1e-6
_KIB = 1024.0
# Bytes per element of the NCCL dtypes AIConfigurator measured.
_NCCL_ELEMENT_BYTES = {"half": 2.0, "bfloat16": 2.0, "float": 4.0, "int8": 1.0, "fp8": 1.0}
# Canonical dtype names (apex_jax.dtypes) of the table dtype spellings.
_DTYPE_NAMES = {
    "bfloat16": "bf16",
    "half": "fp16",
    "float16": "fp16",
    "fp8": "fp8",
    "fp8_block": "fp8_block",
    "int4_wo": "int4",
    "float": "fp32",
}


def profiles_dir() -> Path:
    """Folder of the bundled measured profiles."""
    return DATA_DIR / "profiles"


def aic_key(gpu_name: str) -> str | None:
    """AIConfigurator folder of a catalog GPU, or ``None`` if it was not measured there."""
    return AIC_GPUS.get(gpu_name)


@functools.lru_cache(maxsize=64)
def _read_csv(path: Path) -> dict[str, np.ndarray]:
    """Columns of a (gzipped) CSV; numeric columns as float64, others as str arrays."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as stream:
        reader = csv.reader(stream)
        header = next(reader)
        rows = list(reader)
    columns: dict[str, np.ndarray] = {}
    for i, name in enumerate(header):
        raw = [row[i] for row in rows]
        try:
            columns[name] = np.array([float(v) if v != "" else np.nan for v in raw])
        except ValueError:
            columns[name] = np.array(raw)
    return columns


def _copy(columns: dict[str, np.ndarray], keep: np.ndarray | None = None) -> Table:
    if keep is None:
        return {k: v.copy() for k, v in columns.items()}
    return {k: v[keep] for k, v in columns.items()}


def _canon_dtype(values: np.ndarray) -> np.ndarray:
    return np.array([_DTYPE_NAMES.get(v, v) for v in values])


def _require(path: Path, what: str, gpu_name: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"no measured {what} table for {gpu_name} ({path})")
    return path


def available_tables(gpu_name: str) -> list[str]:
    """Names of the operator tables bundled for a catalog GPU (may be empty)."""
    names = []
    key = aic_key(gpu_name)
    if key is not None:
        names += ["gemm", "context_attention", "generation_attention", "moe", "collectives"]
    elif gpu_name == "V100-PCIE-16GB":
        names += ["gemm", "collectives"]
    elif gpu_name in _APEX_COMM_GPUS:
        names += ["collectives"]
    if gpu_name in _VIDUR_NETWORK or gpu_name in _APEX_COMM_GPUS:
        names.append("p2p")
    if gpu_name in _VIDUR_GPUS:
        names.append("vidur_mlp")
    return names


def load_gemm(gpu_name: str) -> Table:
    """Measured GEMM times ``y[m, n] = x[m, k] W[n, k]^T``.

    Columns: ``dtype`` (``bf16``, ``fp8`` or ``fp16``), ``m``, ``n``, ``k``, ``time_s``.
    AIConfigurator for H100/H200/A100, APEX+ (fp16) for the V100.
    """
    key = aic_key(gpu_name)
    if key is not None:
        c = _read_csv(
            _require(profiles_dir() / "aiconfigurator" / key / "gemm.csv.gz", "GEMM", gpu_name)
        )
        return {
            "dtype": _canon_dtype(c["gemm_dtype"]),
            "m": c["m"].copy(),
            "n": c["n"].copy(),
            "k": c["k"].copy(),
            "time_s": c["latency_ms"] * _MS,
        }
    path = profiles_dir() / "apex_plus" / "comp" / gpu_name / "gemm.csv.gz"
    c = _read_csv(_require(path, "GEMM", gpu_name))
    return {
        "dtype": _canon_dtype(c["dtype"]),
        "m": c["m"].copy(),
        "n": c["n"].copy(),
        "k": c["k"].copy(),
        "time_s": c["time_us"] * _US,
    }


def load_context_attention(gpu_name: str) -> Table:
    """Measured causal prefill attention (FlashAttention), no sliding window, bf16 compute.

    Columns: ``batch``, ``isl`` (prompt length), ``heads``, ``kv_heads`` (both per GPU),
    ``head_dim``, ``kv_dtype`` (``bf16`` or ``fp8``), ``time_s``.
    """
    key = aic_key(gpu_name)
    if key is None:
        raise FileNotFoundError(f"no measured prefill-attention table for {gpu_name}")
    c = _read_csv(profiles_dir() / "aiconfigurator" / key / "context_attention.csv.gz")
    return {
        "batch": c["batch_size"].copy(),
        "isl": c["isl"].copy(),
        "heads": c["num_heads"].copy(),
        "kv_heads": c["num_kv_heads"].copy(),
        "head_dim": c["head_dim"].copy(),
        "kv_dtype": _canon_dtype(c["kv_dtype"]),
        "time_s": c["latency_ms"] * _MS,
    }


def load_generation_attention(gpu_name: str) -> Table:
    """Measured decode attention over a paged KV cache, one query token per sequence.

    Columns: ``batch``, ``kv_len`` (past KV length ``step`` plus the new token), ``heads``,
    ``kv_heads``, ``head_dim``, ``kv_dtype``, ``time_s``.
    """
    key = aic_key(gpu_name)
    if key is None:
        raise FileNotFoundError(f"no measured decode-attention table for {gpu_name}")
    c = _read_csv(profiles_dir() / "aiconfigurator" / key / "generation_attention.csv.gz")
    return {
        "batch": c["batch_size"].copy(),
        "kv_len": c["step"] + 1.0,
        "heads": c["num_heads"].copy(),
        "kv_heads": c["num_kv_heads"].copy(),
        "head_dim": c["head_dim"].copy(),
        "kv_dtype": _canon_dtype(c["kv_dtype"]),
        "time_s": c["latency_ms"] * _MS,
    }


# MoE shapes ``(hidden, inter, topk, experts)`` of the tables whose experts are not gated (an
# up and a down projection with squared ReLU, no gate): AIConfigurator's Nemotron-H cases
# (Nemotron-3 Nano 30B-A3B, and Nemotron-3 Super and Ultra at their latent MoE width), in its
# collector/cases/models/NemotronHForCausalLM_cases.yaml; Nemotron-H's MoE uses relu2.
_NON_GATED_MOE_SHAPES = {(2688, 1856, 6, 128), (1024, 2688, 22, 512), (2048, 5120, 22, 512)}


def power_law_rank_load(tokens: int, topk: int, experts: int, ep: int, alpha: float) -> float:
    """Mean routed rows of the EP rank that AIConfigurator's power-law MoE rows time, over
    the mean rank's ``tokens * topk / ep``.

    Its collector draws each expert's share of the ``tokens * topk`` routed rows from a power
    law of exponent ``alpha`` (between 1 and ``0.8 tokens`` when there are more rows than
    experts, else between 0.01 and 2), rounds the counts so that they still sum to the rows
    (the rounding's shortfall goes to the largest counts, one row each), and times the EP
    rank with the most rows. Here the same is drawn 64 times (seeded; a token picks an expert
    at most once, so a count is capped at ``tokens``) and the busiest rank's rows averaged.
    """
    rng = np.random.default_rng(0)
    rows = tokens * topk
    low, high = (1.0, 0.8 * tokens) if rows > experts else (0.01, 2.0)
    a = 1.0 - alpha
    draws = ((high**a - low**a) * rng.random((64, experts)) + low**a) ** (1.0 / a)
    counts = np.round(draws / draws.sum(1, keepdims=True) * rows)
    shortfall = rows - counts.sum(1, keepdims=True)  # [64, 1]
    rank = np.argsort(np.argsort(-counts, axis=1), axis=1)  # 0 for each draw's largest
    per_expert = np.floor(np.abs(shortfall) / experts) + (rank < np.abs(shortfall) % experts)
    counts = np.clip(counts + np.sign(shortfall) * per_expert, 0.0, tokens)
    busiest = counts.reshape(64, ep, experts // ep).sum(2).max(1)
    return float(busiest.mean() / (rows / ep))


def load_moe(gpu_name: str, *, distribution: str | None = "balanced") -> Table:
    """Measured fused-MoE layers (routing, grouped expert GEMMs, combine).

    Columns: ``dtype``, ``tokens``, ``hidden``, ``inter``, ``topk``, ``experts``, ``tp``,
    ``ep``, ``gated`` (1.0 for gated experts, 0.0 for the non-gated Nemotron-H shapes),
    ``distribution``, ``time_s``. ``tokens`` counts every token entering the layer; the
    time is that of the EP rank the table measured: with ``balanced`` routing one of equal
    ranks, with ``power_law_<alpha>`` routing the busiest (its load:
    :func:`power_law_rank_load`).
    ``distribution=None`` keeps every routing skew; the A100 table has only power-law
    routing, which is returned when ``balanced`` is absent.
    """
    key = aic_key(gpu_name)
    if key is None:
        raise FileNotFoundError(f"no measured MoE table for {gpu_name}")
    c = _read_csv(profiles_dir() / "aiconfigurator" / key / "moe.csv.gz")
    keep = None
    if distribution is not None:
        keep = c["distribution"] == distribution
        if not keep.any():
            keep = c["distribution"] == "power_law_1.01"
    t = _copy(c, keep)
    return {
        "dtype": _canon_dtype(t["moe_dtype"]),
        "tokens": t["num_tokens"],
        "hidden": t["hidden_size"],
        "inter": t["inter_size"],
        "topk": t["topk"],
        "experts": t["num_experts"],
        "tp": t["moe_tp_size"],
        "ep": t["moe_ep_size"],
        "gated": np.array(
            [
                float(shape not in _NON_GATED_MOE_SHAPES)
                for shape in zip(
                    t["hidden_size"].astype(int),
                    t["inter_size"].astype(int),
                    t["topk"].astype(int),
                    t["num_experts"].astype(int),
                )
            ]
        ),
        "distribution": t["distribution"],
        "time_s": t["latency_ms"] * _MS,
    }


def load_collectives(gpu_name: str) -> Table:
    """Measured NCCL collectives inside one node.

    Columns: ``op`` (one of :data:`COLLECTIVE_OPS`), ``num_gpus``, ``num_nodes``, ``bytes``
    (the message size nccl-tests reports: the full buffer), ``time_s``, ``source``.
    AIConfigurator (H100/H200/A100; its ``message_size`` counts elements, converted here with
    the dtype's width) and APEX+ (H100/H200/V100; KiB, microseconds; size-0 rows dropped).
    """
    parts: list[Table] = []
    key = aic_key(gpu_name)
    if key is not None:
        c = _read_csv(profiles_dir() / "aiconfigurator" / key / "nccl.csv.gz")
        width = np.array([_NCCL_ELEMENT_BYTES[d] for d in c["nccl_dtype"]])
        parts.append(
            {
                "op": c["op_name"].copy(),
                "num_gpus": c["num_gpus"].copy(),
                "num_nodes": np.ones_like(c["num_gpus"]),
                "bytes": c["message_elements"] * width,
                "time_s": c["latency_ms"] * _MS,
                "source": np.full(len(width), "aiconfigurator"),
            }
        )
    if gpu_name in _APEX_COMM_GPUS:
        for op in COLLECTIVE_OPS:
            c = _read_csv(profiles_dir() / "apex_plus" / "comm" / gpu_name / f"{op}.csv.gz")
            keep = c["size_kib"] > 0
            parts.append(
                {
                    "op": np.full(int(keep.sum()), op),
                    "num_gpus": (c["num_gpus_per_node"] * c["num_nodes"])[keep],
                    "num_nodes": c["num_nodes"][keep],
                    "bytes": c["size_kib"][keep] * _KIB,
                    "time_s": c["time_us"][keep] * _US,
                    "source": np.full(int(keep.sum()), "apex_plus"),
                }
            )
    if not parts:
        raise FileNotFoundError(f"no measured collective table for {gpu_name}")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def load_custom_allreduce(gpu_name: str) -> Table:
    """vLLM's custom (one-/two-shot) all-reduce under CUDA graphs, bf16.

    Columns: ``num_gpus``, ``bytes``, ``time_s``. The table's eager rows are left out: they
    time one call from the host (about 20 µs whatever the size up to 256 KiB on H100), while
    in a serving iteration the host runs ahead of the GPU and the kernel time is what counts.
    """
    key = aic_key(gpu_name)
    if key is None:
        raise FileNotFoundError(f"no measured custom all-reduce table for {gpu_name}")
    c = _read_csv(profiles_dir() / "aiconfigurator" / key / "custom_allreduce.csv.gz")
    keep = c["backend"] == "vllm_graph"
    return {
        "num_gpus": c["num_gpus"][keep],
        "bytes": c["message_elements"][keep] * 2.0,
        "time_s": c["latency_ms"][keep] * _MS,
    }


def load_p2p(gpu_name: str) -> Table:
    """Measured point-to-point send/recv between two GPUs.

    Columns: ``bytes``, ``inter_node`` (1.0 when the two GPUs are on different nodes),
    ``time_s``, ``source``. Vidur's DGX setups (A100, H100; ``devices_per_node`` 1 means
    across nodes) and APEX+'s one-node send/recv (H100, H200, V100).
    """
    parts: list[Table] = []
    if gpu_name in _VIDUR_NETWORK:
        path = profiles_dir() / "vidur" / "network" / _VIDUR_NETWORK[gpu_name] / "send_recv.csv.gz"
        c = _read_csv(path)
        parts.append(
            {
                "bytes": c["size_bytes"].copy(),
                "inter_node": (c["devices_per_node"] == 1).astype(np.float64),
                "time_s": c["median_ms"] * _MS,
                "source": np.full(len(c["size_bytes"]), "vidur"),
            }
        )
    if gpu_name in _APEX_COMM_GPUS:
        c = _read_csv(profiles_dir() / "apex_plus" / "comm" / gpu_name / "sendrecv.csv.gz")
        keep = c["size_kib"] > 0
        parts.append(
            {
                "bytes": c["size_kib"][keep] * _KIB,
                "inter_node": (c["num_nodes"][keep] > 1).astype(np.float64),
                "time_s": c["time_us"][keep] * _US,
                "source": np.full(int(keep.sum()), "apex_plus"),
            }
        )
    if not parts:
        raise FileNotFoundError(f"no measured send/recv table for {gpu_name}")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def vidur_models(gpu_name: str) -> list[str]:
    """Models Vidur profiled on a GPU (``org/name``), sorted."""
    if gpu_name not in _VIDUR_GPUS:
        return []
    folder = profiles_dir() / "vidur" / "compute" / _VIDUR_GPUS[gpu_name]
    return sorted(p.name[: -len(".csv.gz")].replace("__", "/") for p in folder.glob("*.csv.gz"))


def load_vidur_mlp(gpu_name: str, model: str) -> Table:
    """Vidur's measured non-attention operators of one layer of ``model`` (medians).

    Columns: ``tokens``, ``tp``, the model shape (``heads``, ``kv_heads``, ``hidden``,
    ``inter``, ``vocab``, ``gated``) and ``<op>_s`` for ``emb``, ``input_layernorm``,
    ``attn_pre_proj``, ``attn_rope``, ``attn_post_proj``, ``post_attention_layernorm``,
    ``mlp_up_proj``, ``mlp_act``, ``mlp_down_proj``, ``add`` (NaN where not measured).
    """
    if gpu_name not in _VIDUR_GPUS:
        raise FileNotFoundError(f"no Vidur operator profiles for {gpu_name}")
    path = profiles_dir() / "vidur" / "compute" / _VIDUR_GPUS[gpu_name]
    c = _read_csv(_require(path / (model.replace("/", "__") + ".csv.gz"), "Vidur", gpu_name))
    out: Table = {
        "tokens": c["num_tokens"].copy(),
        "tp": c["num_tensor_parallel_workers"].copy(),
        "heads": c["n_head"].copy(),
        "kv_heads": c["n_kv_head"].copy(),
        "hidden": c["n_embd"].copy(),
        "inter": c["n_expanded_embd"].copy(),
        "vocab": c["vocab_size"].copy(),
        "gated": (c["use_gated_mlp"] == "True").astype(np.float64),
    }
    for name in c:
        if name.endswith("_median_ms"):
            out[name[: -len("_median_ms")] + "_s"] = c[name] * _MS
    return out


class Grid(NamedTuple):
    """A measured table on a full rectangular grid, in log space.

    Attributes:
        axes: one float64 array per coordinate, ``log`` of its grid values, increasing.
        log_time: float64 array of shape ``[len(axes[0]), len(axes[1]), ...]``, ``log`` of
            seconds; cells that were not measured hold the nearest measured value along the
            last axis (see ``measured``).
        measured: bool array of the same shape: which cells were measured.
    """

    axes: tuple[np.ndarray, ...]
    log_time: np.ndarray
    measured: np.ndarray


def build_grid(coords: Sequence[np.ndarray], time_s: np.ndarray) -> Grid:
    """Arrange scattered measurements on the grid of their distinct coordinate values.

    Duplicate points keep their median. Unmeasured cells are filled along the last axis from
    the nearest measured neighbour (then along earlier axes), so interpolation stays finite;
    :func:`grid_covers` treats a point as covered only if every corner of its cell was measured.

    Args:
        coords: one ``[N]`` array per coordinate (positive values).
        time_s: ``[N]`` measured seconds (positive).

    Returns:
        The :class:`Grid`.
    """
    values = [np.unique(np.asarray(c, np.float64)) for c in coords]
    index = tuple(np.searchsorted(v, np.asarray(c, np.float64)) for v, c in zip(values, coords))
    shape = tuple(len(v) for v in values)
    flat = np.ravel_multi_index(index, shape)
    log_t = np.log(np.asarray(time_s, np.float64))
    # Sorted by cell, then by time within a cell: a cell's median is in its middle.
    order = np.lexsort((log_t, flat))
    flat_sorted, log_sorted = flat[order], log_t[order]
    cells, starts, counts = np.unique(flat_sorted, return_index=True, return_counts=True)
    medians = (log_sorted[starts + (counts - 1) // 2] + log_sorted[starts + counts // 2]) / 2.0
    grid = np.full(int(np.prod(shape)), np.nan)
    grid[cells] = medians
    grid = grid.reshape(shape)
    measured = np.isfinite(grid)
    for axis in reversed(range(len(shape))):
        grid = _fill_along(grid, axis)
    if not np.isfinite(grid).all():
        raise ValueError("grid has no measured cell")
    return Grid(tuple(np.log(v) for v in values), grid, measured)


def _fill_along(grid: np.ndarray, axis: int) -> np.ndarray:
    """Fill NaNs from the nearest finite cell along one axis (where the line has any)."""
    moved = np.moveaxis(grid, axis, -1).copy()
    lines = moved.reshape(-1, moved.shape[-1])
    positions = np.arange(lines.shape[1])
    for line in lines:
        ok = np.isfinite(line)
        if ok.any() and not ok.all():
            known = positions[ok]
            nearest = known[np.abs(positions[:, None] - known[None, :]).argmin(axis=1)]
            line[:] = line[nearest]
    return np.moveaxis(lines.reshape(moved.shape), -1, axis)


def interp_grid(grid: Grid, *coords, xp=jnp):
    """Interpolated seconds at ``coords``: multilinear in ``log t`` over ``log`` coordinates.

    Exact at grid points; between adjacent grid points along an axis the result lies between
    their values (monotone). Coordinates outside the grid are clamped to its edge. ``xp`` is
    the array namespace: ``jax.numpy`` (the default) works on NumPy or JAX inputs under
    ``jit``, ``vmap`` and ``grad``; ``numpy`` looks up constant points on the host without
    dispatching JAX operations.

    Args:
        grid: the :class:`Grid`.
        *coords: one positive coordinate array per axis (broadcastable).
        xp: ``jax.numpy`` or ``numpy``.

    Returns:
        Seconds, float64, of the broadcast shape of ``coords``.
    """
    if len(coords) != len(grid.axes):
        raise ValueError(f"grid has {len(grid.axes)} axes, got {len(coords)} coordinates")
    table = xp.asarray(grid.log_time)
    shape = np.broadcast_shapes(*(np.shape(c) for c in coords))
    lows, weights = [], []
    for axis, c in zip(grid.axes, coords):
        axis_x = xp.asarray(axis)
        x = xp.clip(xp.log(xp.broadcast_to(xp.asarray(c, xp.float64), shape)), axis[0], axis[-1])
        if len(axis) == 1:
            lows.append(xp.zeros(shape, xp.int32))
            weights.append(xp.zeros(shape))
            continue
        i = xp.clip(xp.searchsorted(axis_x, x, side="right") - 1, 0, len(axis) - 2)
        lo, hi = axis_x[i], axis_x[i + 1]
        lows.append(i)
        weights.append((x - lo) / (hi - lo))
    result = xp.zeros(shape)
    num_axes = len(grid.axes)
    for corner in range(2**num_axes):
        idx, w = [], xp.ones(shape)
        for d in range(num_axes):
            bit = (corner >> d) & 1
            step = bit if len(grid.axes[d]) > 1 else 0
            idx.append(lows[d] + step)
            w = w * (weights[d] if bit else 1.0 - weights[d])
        result = result + w * table[tuple(idx)]
    return xp.exp(result)


def grid_covers(grid: Grid, *coords) -> np.ndarray:
    """Whether each point lies in a grid cell whose corners were all measured (NumPy bool)."""
    shape = np.broadcast_shapes(*(np.shape(c) for c in coords))
    ok = np.ones(shape, bool)
    cells = []
    for axis, c in zip(grid.axes, coords):
        x = np.log(np.broadcast_to(np.asarray(c, np.float64), shape))
        tol = 1e-9
        ok &= (x >= axis[0] - tol) & (x <= axis[-1] + tol)
        i = np.clip(np.searchsorted(axis, x + tol, side="right") - 1, 0, max(len(axis) - 2, 0))
        on_node = np.abs(x - axis[i]) <= tol
        cells.append((i, on_node, len(axis)))
    measured = grid.measured
    for corner in range(2 ** len(cells)):
        idx = []
        for d, (i, on_node, n) in enumerate(cells):
            bit = (corner >> d) & 1
            # A point on a grid node needs only that node along this axis.
            j = np.where(on_node, i, i + bit) if n > 1 else np.zeros_like(i)
            idx.append(np.clip(j, 0, n - 1))
        ok &= measured[tuple(idx)]
    return ok


# --------------------------------------------------------------------------------------------
# Grids and slices the cost model looks up (cached per GPU)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def gemm_grid(gpu_name: str, dtype: str) -> Grid | None:
    """The GEMM grid over ``(m, n, k)`` of one table dtype (``bf16``, ``fp16``, ``fp8``,
    ``fp8_block``); ``None`` if the GPU's table has none. Built on first use: a plan reads
    one or two of them."""
    if "gemm" not in available_tables(gpu_name):
        return None
    t = load_gemm(gpu_name)
    rows = t["dtype"] == dtype
    if not rows.any():
        return None
    return build_grid([t["m"][rows], t["n"][rows], t["k"][rows]], t["time_s"][rows])


@functools.lru_cache(maxsize=16)
def attention_slices(gpu_name: str, kind: str) -> dict[tuple, Table]:
    """Rows of the ``"context"`` or ``"generation"`` attention table by
    ``(heads, kv_heads, head_dim, kv_dtype)``; empty if the GPU has no such table."""
    if f"{kind}_attention" not in available_tables(gpu_name):
        return {}
    t = (
        load_context_attention(gpu_name)
        if kind == "context"
        else load_generation_attention(gpu_name)
    )
    keys = list(
        zip(
            t["heads"].astype(int),
            t["kv_heads"].astype(int),
            t["head_dim"].astype(int),
            t["kv_dtype"],
        )
    )
    out: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        out.setdefault((int(key[0]), int(key[1]), int(key[2]), str(key[3])), []).append(i)
    return {key: {c: v[np.asarray(idx)] for c, v in t.items()} for key, idx in out.items()}


@functools.lru_cache(maxsize=16)
def collective_grids(gpu_name: str) -> dict[tuple[str, int], Grid]:
    """Grids over message bytes of each measured ``(op, num_gpus)`` inside one node."""
    if "collectives" not in available_tables(gpu_name):
        return {}
    t = load_collectives(gpu_name)
    out = {}
    for op in COLLECTIVE_OPS:
        for n in np.unique(t["num_gpus"]):
            keep = (t["op"] == op) & (t["num_gpus"] == n) & (t["num_nodes"] == 1)
            if keep.sum() >= 2:
                out[(op, int(n))] = build_grid([t["bytes"][keep]], t["time_s"][keep])
    return out


@functools.lru_cache(maxsize=16)
def custom_all_reduce_grids(gpu_name: str) -> dict[int, Grid]:
    """Grids over message bytes of vLLM's custom all-reduce by group size (empty where it
    was not measured: only AIConfigurator's GPUs)."""
    if aic_key(gpu_name) is None:
        return {}
    t = load_custom_allreduce(gpu_name)
    return {
        int(n): build_grid([t["bytes"][t["num_gpus"] == n]], t["time_s"][t["num_gpus"] == n])
        for n in np.unique(t["num_gpus"])
        if (t["num_gpus"] == n).sum() >= 2
    }


@functools.lru_cache(maxsize=16)
def moe_grids(gpu_name: str) -> dict[tuple, Grid]:
    """Grids over tokens of each measured MoE shape
    ``(dtype, hidden, inter, topk, experts, tp, ep)``."""
    if "moe" not in available_tables(gpu_name):
        return {}
    t = load_moe(gpu_name)
    cols = ("hidden", "inter", "topk", "experts", "tp", "ep")
    keys = [
        tuple([str(t["dtype"][i])] + [int(t[c][i]) for c in cols]) for i in range(len(t["time_s"]))
    ]
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return {
        key: build_grid([t["tokens"][np.asarray(idx)]], t["time_s"][np.asarray(idx)])
        for key, idx in groups.items()
        if len(idx) >= 2
    }
