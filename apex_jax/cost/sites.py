"""The operator call sites of each plan, with their shapes and measured times, on the host.

The iteration-time constants of a plan (:mod:`apex_jax.cost.iteration`) price a fixed list
of operator *call sites*: every decoder layer's q/k/v and output projections, its MLP or
fused MoE, the collectives its layout issues, its attention kernels, the LM head, the
encoder of an encoder-decoder model. This module gives, for a batch of ``U`` plans (the
distinct cost keys of a search), each site's shape and, where a measured table of the GPU
covers that shape (:mod:`apex_jax.cost.tables`), the measured seconds, as NumPy arrays with a
leading ``[U]`` axis. Everything here is constant in the calibratable parameters, so it runs
once, in NumPy, without JAX; :mod:`apex_jax.cost.iteration` evaluates the kernel models of
all sites in one jitted function vmapped over the plans, and mixes in these measurements.

Each site also says where its time comes from (``"table"``, ``"model"`` or both), per plan.

Tensor-parallel all-reduces run vLLM's custom all-reduce kernel where vLLM uses it, NCCL
elsewhere. vLLM (``vllm/distributed/device_communicators/custom_all_reduce.py``, 0.6.0 and
later) builds the kernel for groups of 2, 4, 6 or 8 GPUs in one node whose GPUs all reach each
other over NVLink (two GPUs need only peer access), and calls it for messages under its
buffer of 8 MiB; larger ones, and every all-reduce with ``--disable-custom-all-reduce``, go
to NCCL. The kernel's time is AIConfigurator's measurement of it (``custom_allreduce.csv.gz``,
H100/H200/A100, groups of 2/4/8); where no measurement covers a group or size, the all-reduce
is priced as NCCL's (its table, else the calibrated collective model).
"""

from __future__ import annotations

import collections
import functools
from typing import NamedTuple

import numpy as np

from apex_jax.cost import kernels as K
from apex_jax.cost import parallel as PC
from apex_jax.cost import tables as ct
from apex_jax.dtypes import DTYPES
from apex_jax.hardware import GpuSpec
from apex_jax.memory import CellLayout, cell_layout
from apex_jax.model_spec import ModelSpec
from apex_jax.plans import COL

__all__ = [
    "CUSTOM_ALL_REDUCE_GROUPS",
    "CUSTOM_ALL_REDUCE_MAX_BYTES",
    "DECODE_BATCH_KNOTS",
    "DECODE_KV_KNOTS",
    "DECODE_KV_POINTS",
    "PREFILL_LENGTHS",
    "SAMPLED_KNOTS",
    "SAMPLED_POINTS",
    "TOKEN_KNOTS",
    "TOKEN_POINTS",
    "Collective",
    "DecodeAttention",
    "Encoder",
    "Gemm",
    "Measured",
    "Moe",
    "PlanSites",
    "Precision",
    "PrefillAttention",
    "SiteKinds",
    "decode_table_time_s",
    "gemm_weight_dtype",
    "plan_sites",
]

# Knots (in tokens) of the iteration-time curves (apex_jax.cost.iteration); beyond the last
# knot the last slope goes on.
TOKEN_KNOTS: tuple[float, ...] = tuple(float(2**i) for i in range(15))  # 1 ... 16384
SAMPLED_KNOTS: tuple[float, ...] = (1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0)
# The points where sites are priced: the knots, then twice the last one (the tail slope).
TOKEN_POINTS = np.asarray(TOKEN_KNOTS + (2.0 * TOKEN_KNOTS[-1],))  # [K_tok + 1]
SAMPLED_POINTS = np.asarray(SAMPLED_KNOTS + (2.0 * SAMPLED_KNOTS[-1],))  # [K_s + 1]
# Prefill attention is priced per query-key pair from prompts of these lengths, batch 1.
PREFILL_LENGTHS = np.array([1024.0, 2048.0, 4096.0, 8192.0])
# Decode attention is priced on a grid (apex_jax.cost.iteration): the batch knots are the
# measured tables' batch grid; along the KV entries read (summed over the batch) it is
# piecewise linear with a few fixed breakpoints, every third octave of the tables' KV grid
# from 64 (the tables are flat below) to 2**21 (their largest KV total). The points add 0
# and a tail point past the last breakpoint, whose segment goes on beyond it.
DECODE_BATCH_KNOTS: tuple[float, ...] = tuple(float(2**i) for i in range(12))  # 1 ... 2048
DECODE_KV_KNOTS: tuple[float, ...] = tuple(float(2**i) for i in range(6, 22, 3))  # 64 ... 2**21
DECODE_KV_POINTS = np.asarray((0.0, *DECODE_KV_KNOTS, 2.0 * DECODE_KV_KNOTS[-1]))  # [K_dkv]
# vLLM's custom all-reduce: the group sizes it supports and its buffer (max_size), in bytes;
# it takes messages strictly below the buffer.
CUSTOM_ALL_REDUCE_GROUPS = (2, 4, 6, 8)
CUSTOM_ALL_REDUCE_MAX_BYTES = 8192 * 1024


class Measured(NamedTuple):
    """Measured seconds of a site at its points, where a table covers them."""

    covered: np.ndarray  # [U, *S] bool
    seconds: np.ndarray  # [U, *S] float64, 1.0 where not covered


class Precision(NamedTuple):
    """How a linear layer computes (see :func:`~apex_jax.cost.kernels.gemm_precision`)."""

    variant: np.ndarray  # [U] int, index of its compute dtype in PlanSites.compute_dtypes
    weight_bytes: np.ndarray  # [U] bytes per weight element
    act_bytes: np.ndarray  # [U] bytes per input activation element


class Gemm(NamedTuple):
    """One GEMM ``x[m, k] @ W[n, k]^T`` call site at every knot."""

    m: np.ndarray  # [U, X] rows (tokens one GPU handles) at each knot
    n: np.ndarray  # [U] output features
    k: np.ndarray  # [U] input features
    precision: Precision
    measured: Measured  # [U, X]


class Moe(NamedTuple):
    """The fused MoE layer at every knot, at the busiest expert-parallel rank's load."""

    tokens: np.ndarray  # [U, X] tokens entering the layer (the FFN replica's)
    tp: np.ndarray  # [U] expert-TP GPUs per rank
    ep: np.ndarray  # [U] expert-parallel ranks
    load: np.ndarray  # [U] the busiest rank's routed rows over the mean rank's
    precision: Precision
    measured: Measured  # [U, X]


class Collective(NamedTuple):
    """One kind of collective of the layout (its kind is static: PlanSites.collective_kinds)."""

    message_bytes: np.ndarray  # [U, X] as nccl-tests counts it, at each knot
    group: np.ndarray  # [U] GPUs taking part
    nodes: np.ndarray  # [U] nodes they span (hierarchical above 1)
    calls: np.ndarray  # [U] calls per iteration (0: the plan has none)
    measured: Measured  # [U, X]


class PrefillAttention(NamedTuple):
    """One layer's causal prefill attention over :data:`PREFILL_LENGTHS`, batch 1."""

    heads: np.ndarray  # [U] query heads per GPU
    kv_heads: np.ndarray  # [U] KV heads per GPU
    kv_bytes: np.ndarray  # [U] bytes per KV element
    has_table: np.ndarray  # [U] bool: the table measures every length
    seconds: np.ndarray  # [U, 4] measured seconds (1.0 without a table)


class DecodeAttention(NamedTuple):
    """One layer's decode attention on the busiest attention replica, at every pair of
    DECODE_BATCH_KNOTS (``K_db``) and DECODE_KV_POINTS (``K_dkv``) of the whole batch."""

    heads: np.ndarray  # [U]
    kv_heads: np.ndarray  # [U]
    kv_bytes: np.ndarray  # [U]
    batch: np.ndarray  # [U, K_db] the replica's sequences: max(knot / attn_dp, 1)
    kv_tokens: np.ndarray  # [U, K_db, K_dkv] the replica's KV entries: its share of the points
    has_table: np.ndarray  # [U] bool
    seconds: np.ndarray  # [U, K_db, K_dkv] measured table (decode_table_time_s); 1.0 without


class Encoder(NamedTuple):
    """Shapes of an encoder-decoder model's encoder, per prefill prompt token."""

    m_enc: np.ndarray  # [U, X] tokens one encoder GPU handles at each knot
    inter: np.ndarray  # [U] encoder FFN width per GPU
    enc_dp: np.ndarray  # [U] encoder replicas per stage
    attention: PrefillAttention  # bidirectional, no KV cache: bf16 keys and values


class PlanSites(NamedTuple):
    """Every call site of ``U`` plans: a pytree of NumPy arrays with a leading ``[U]`` axis
    (``None`` for sites the model does not have); the static rest is in :class:`SiteKinds`."""

    log_clock_scale: np.ndarray  # [U] log(plan clock / boost clock)
    tp: np.ndarray  # [U] GPUs per pipeline stage
    attn_dp: np.ndarray  # [U] attention replicas per stage
    heads: np.ndarray  # [U] query heads per attention GPU
    kv_heads: np.ndarray  # [U] KV heads per attention GPU
    inter: np.ndarray  # [U] FFN width per GPU of a dense MLP
    m_attn: np.ndarray  # [U, X] tokens one attention GPU handles at each knot
    m_ffn: np.ndarray  # [U, X] tokens one FFN GPU handles
    m_res: np.ndarray  # [U, X] residual-stream tokens one GPU holds
    transfers: np.ndarray  # [U, 2] stage transfers per iteration: inside a node, across
    gemms: dict[str, Gemm]  # by site name (see _gemm_shapes)
    moe: Moe | None  # MoE models only
    collectives: tuple[Collective, ...]  # in the order of SiteKinds.collectives
    prefill: PrefillAttention
    decode: DecodeAttention
    encoder: Encoder | None  # encoder-decoder models only


class SiteKinds(NamedTuple):
    """The static part of :class:`PlanSites` (hashable: a jit's static argument)."""

    compute_dtypes: tuple[str, ...]  # the GEMM compute dtypes Precision.variant indexes
    collectives: tuple[tuple[str, bool], ...]  # (kind, prefill_only) of each collective


class _Shapes(NamedTuple):
    """Per-GPU shapes of ``U`` plans (see :mod:`apex_jax.cost.parallel`)."""

    cells: CellLayout  # fields [U]
    tp: np.ndarray  # [U]
    heads: np.ndarray  # [U] query heads per attention GPU
    kv_heads: np.ndarray  # [U] KV heads per attention GPU
    attn_dp: np.ndarray  # [U]
    inter: np.ndarray  # [U] dense FFN width per GPU
    m_attn: np.ndarray  # [U, X]
    m_ffn: np.ndarray  # [U, X]
    m_res: np.ndarray  # [U, X]
    weight_dtype: list[str]  # [U] the weight dtype whose GEMM cost each plan pays
    kv_dtype: list[str]  # [U]


def gemm_weight_dtype(weight: str, act: str) -> str:
    """The weight dtype whose GEMM cost a ``weight`` x ``act`` plan pays: fp8 weights, per
    tensor or block-scaled, with 16-bit activations run weight-only (W8A16), which costs as
    8-bit weight-only (int8)."""
    return "int8" if weight in ("fp8", "fp8_block") and act in ("bf16", "fp16") else weight


def _shapes(model: ModelSpec, plans: np.ndarray) -> _Shapes:
    cells = cell_layout(plans, model)
    m_attn = TOKEN_POINTS / cells.attn_dp[:, None]
    m_ffn = TOKEN_POINTS / cells.mlp_dp[:, None]
    return _Shapes(
        cells=cells,
        tp=plans[:, COL["tp"]].astype(np.float64),
        heads=model.num_heads / cells.attn_tp,
        kv_heads=cells.kv_heads_per_gpu,
        attn_dp=cells.attn_dp,
        inter=model.intermediate_size / cells.mlp_tp,
        m_attn=m_attn,
        m_ffn=m_ffn,
        m_res=np.maximum(m_attn, m_ffn),
        weight_dtype=[
            gemm_weight_dtype(DTYPES[int(w)], DTYPES[int(a)])
            for w, a in plans[:, [COL["weight_dtype"], COL["act_dtype"]]]
        ],
        kv_dtype=[DTYPES[int(c)] for c in plans[:, COL["kv_dtype"]]],
    )


def _encoder_shapes(model: ModelSpec, cells: CellLayout) -> tuple[np.ndarray, ...]:
    """``(heads [U], ffn width [U], tokens [U, X])`` of one encoder GPU: the encoder runs
    ``tp / enc_tp`` replicas of ``enc_tp`` GPUs."""
    m_enc = TOKEN_POINTS / cells.enc_dp[:, None]
    return model.num_heads / cells.enc_tp, model.intermediate_size / cells.enc_tp, m_enc


def _gemm_shapes(model: ModelSpec, sh: _Shapes) -> dict[str, tuple]:
    """``name -> (m [U, X], n [U], k [U], weight dtypes [U])`` of every GEMM site."""
    hidden, d = float(model.hidden_size), float(model.head_dim)
    u = len(sh.tp)
    full = np.full(u, hidden)
    wd = sh.weight_dtype
    sampled = np.broadcast_to(SAMPLED_POINTS, (u, len(SAMPLED_POINTS)))
    out = {
        "qkv": (sh.m_attn, (sh.heads + 2.0 * sh.kv_heads) * d, full, wd),
        "out": (sh.m_attn, full, sh.heads * d, wd),
        "lm": (sampled, model.vocab_size / sh.tp, full, wd),
    }
    if model.is_moe:
        out["router"] = (sh.m_ffn, np.full(u, float(model.num_experts)), full, ["bf16"] * u)
    else:
        up = (2.0 if model.is_gated_mlp else 1.0) * sh.inter
        out["up"] = (sh.m_ffn, up, full, wd)
        out["down"] = (sh.m_ffn, full, sh.inter, wd)
    if model.is_encoder_decoder:
        out["cross_q"] = (sh.m_attn, sh.heads * d, full, wd)
        out["cross_o"] = (sh.m_attn, full, sh.heads * d, wd)
        out["cross_kv"] = (sh.m_attn, 2.0 * sh.kv_heads * d, full, wd)
        heads, inter, m_enc = _encoder_shapes(model, sh.cells)
        up = (2.0 if model.is_gated_mlp else 1.0) * inter
        out["enc_qkv"] = (m_enc, 3.0 * heads * d, full, wd)
        out["enc_out"] = (m_enc, full, heads * d, wd)
        out["enc_up"] = (m_enc, up, full, wd)
        out["enc_down"] = (m_enc, full, inter, wd)
    return out


class _Recorder:
    """Measures sites against the GPU's tables and records, per plan and operator, whether
    the time comes from a table, the model or both."""

    def __init__(self, gpu: GpuSpec, num_plans: int, weight_dtypes: set[str]):
        self.gpu = gpu
        self.sources: list[dict[str, set[str]]] = [
            collections.defaultdict(set) for _ in range(num_plans)
        ]
        computes = {K.gemm_precision(w, gpu)[0] for w in weight_dtypes}
        self.compute_dtypes: tuple[str, ...] = tuple(sorted(computes))

    def model_only(self, what: str, rows) -> None:
        for i in np.flatnonzero(rows):
            self.sources[i][what].add("model")

    def measure(self, what: str, grids: list, coords: list[np.ndarray], rows=None) -> Measured:
        """Table values at ``coords`` (each ``[U, X]``) from each plan's grid (``None``: no
        table); ``rows`` (``[U]`` bool) are the plans that run the site."""
        shape = coords[0].shape
        covered, seconds = np.zeros(shape, bool), np.ones(shape)
        by_grid: dict[int, list[int]] = {}
        for i, grid in enumerate(grids):
            if grid is not None:
                by_grid.setdefault(id(grid), []).append(i)
        for members in by_grid.values():
            grid, points = grids[members[0]], [c[members] for c in coords]
            covered[members] = ct.grid_covers(grid, *points)
            table = ct.interp_grid(grid, *points, xp=np)
            seconds[members] = np.where(covered[members], table, 1.0)
        runs = np.ones(len(grids), bool) if rows is None else rows
        for i in np.flatnonzero(runs):
            if covered[i].any():
                self.sources[i][what].add("table")
            if not covered[i].all():
                self.sources[i][what].add("model")
        return Measured(covered, seconds)

    def precision(self, weight_dtypes: list[str]) -> Precision:
        parts = [K.gemm_precision(w, self.gpu) for w in weight_dtypes]
        variant = [self.compute_dtypes.index(c) for c, _, _ in parts]
        return Precision(
            np.asarray(variant, np.int32),
            np.asarray([wb for _, wb, _ in parts]),
            np.asarray([ab for _, _, ab in parts]),
        )


# Weight dtypes whose GEMMs a table measures (weight-only quantisation and fp32 have none).
_GEMM_TABLE_DTYPES = ("bf16", "fp16", "fp8", "fp8_block")
_SIXTEEN_BIT_FALLBACK = {"bf16": ("fp16",), "fp16": ("bf16",)}


def _gemm_grid(gpu: GpuSpec, weight_dtype: str) -> ct.Grid | None:
    """The GEMM table a weight dtype reads (a table measures what is stored; weight-only
    quantisation and fp32 have none)."""
    compute, _, _ = K.gemm_precision(weight_dtype, gpu)
    if compute not in ("bf16", "fp16", "fp8") or weight_dtype not in _GEMM_TABLE_DTYPES:
        return None
    # A 16-bit GEMM reads the other 16-bit format's table where its own is missing.
    for table_dtype in (weight_dtype, *_SIXTEEN_BIT_FALLBACK.get(weight_dtype, ())):
        grid = ct.gemm_grid(gpu.name, table_dtype)
        if grid is not None:
            return grid
    return None


def _gemm_site(rec: _Recorder, m, n, k, weight_dtypes: list[str]) -> Gemm:
    n, k = np.asarray(n, np.float64), np.asarray(k, np.float64)
    grids = [_gemm_grid(rec.gpu, w) for w in weight_dtypes]
    coords = [m, np.broadcast_to(n[:, None], m.shape), np.broadcast_to(k[:, None], m.shape)]
    return Gemm(m, n, k, rec.precision(weight_dtypes), rec.measure("gemm", grids, coords))


def _moe_site(rec: _Recorder, model: ModelSpec, sh: _Shapes) -> Moe:
    cells = sh.cells
    load = PC.moe_load_factor(model, cells.ep)
    shape = (
        model.hidden_size,
        model.intermediate_size,
        model.num_experts_per_tok,
        model.num_experts,
    )
    grids = ct.moe_grids(rec.gpu.name)
    # Block-scaled fp8 experts have a table of their own: vLLM runs them with other kernels
    # than per-tensor fp8 ones (on H200, Qwen3-235B's experts at TP4 take 0.2 ms for 16-512
    # tokens against per-tensor fp8's 1.0-1.2 ms and bf16's 0.3 ms).
    names = {"bf16": "bf16", "fp16": "bf16", "fp8": "fp8", "fp8_block": "fp8_block"}
    names["int4"] = "int4"
    plan_grids = [
        grids.get((names.get(w), *shape, int(tp), int(ep)))
        for w, tp, ep in zip(sh.weight_dtype, cells.expert_tp, cells.ep)
    ]
    # The tables route evenly: the busiest rank is read as an even layer of more tokens.
    measured = rec.measure("moe", plan_grids, [sh.m_ffn * load[:, None]])
    return Moe(sh.m_ffn, cells.expert_tp, cells.ep, load, rec.precision(sh.weight_dtype), measured)


def _custom_all_reduce(
    rec: _Recorder, plans: np.ndarray, c: PC.Collective, message: np.ndarray, nccl: Measured
) -> Measured:
    """An all-reduce site's measured times with vLLM's custom kernel where the plan and vLLM
    use it and its table covers the message (``[U, X]``), NCCL's elsewhere."""
    # vLLM's custom kernel works inside one node only.
    is_on = (
        (plans[:, COL["disable_custom_all_reduce"]] == 0)
        & np.isin(c.group, CUSTOM_ALL_REDUCE_GROUPS)
        & (c.nodes == 1)
    )
    grids = ct.custom_all_reduce_grids(rec.gpu.name)
    plan_grids = [grids.get(int(g)) if on else None for g, on in zip(c.group, is_on)]
    has_grid = np.asarray([g is not None for g in plan_grids])
    custom = rec.measure("custom_all_reduce", plan_grids, [message], rows=has_grid & (c.calls > 0))
    use = custom.covered & (message < CUSTOM_ALL_REDUCE_MAX_BYTES)
    return Measured(nccl.covered | use, np.where(use, custom.seconds, nccl.seconds))


def _collective_sites(
    rec: _Recorder, model: ModelSpec, plans: np.ndarray, gpus_per_node: int
) -> tuple[tuple[Collective, ...], tuple[tuple[str, bool], ...]]:
    sites, kinds = [], []
    grids = ct.collective_grids(rec.gpu.name)
    for c in PC.layout_collectives(plans, model, gpus_per_node):
        message = TOKEN_POINTS[None, :] * c.message_bytes_per_token[:, None]
        # The tables measured one node: a group across nodes is the hierarchical model's.
        plan_grids = [
            grids.get((c.kind, int(g))) if n == 1 else None for g, n in zip(c.group, c.nodes)
        ]
        measured = rec.measure(c.kind, plan_grids, [message], rows=c.calls > 0)
        if c.kind == "all_reduce":
            measured = _custom_all_reduce(rec, plans, c, message, measured)
        sites.append(Collective(message, c.group, c.nodes, c.calls, measured))
        kinds.append((c.kind, c.prefill_only))
    return tuple(sites), tuple(kinds)


def _prefill_site(
    rec: _Recorder, model: ModelSpec, heads, kv_heads, kv_dtypes: list[str]
) -> PrefillAttention:
    """Measured prefill attention of each plan's head configuration at PREFILL_LENGTHS,
    batch 1, where the table has every length."""
    u = len(kv_dtypes)
    slices = ct.attention_slices(rec.gpu.name, "context")
    has_table = np.zeros(u, bool)
    seconds = np.ones((u, len(PREFILL_LENGTHS)))
    for i, (h, kvh, kv) in enumerate(zip(heads, kv_heads, kv_dtypes)):
        table = slices.get((int(h), int(kvh), int(model.head_dim), kv))
        if table is not None:
            rows = (table["batch"] == 1) & np.isin(table["isl"], PREFILL_LENGTHS)
            if rows.sum() == len(PREFILL_LENGTHS):
                has_table[i] = True
                seconds[i] = table["time_s"][rows][np.argsort(table["isl"][rows])]
        rec.sources[i]["prefill_attention"].add("table" if has_table[i] else "model")
    kv_bytes = np.asarray([K.attention_precision(kv, rec.gpu)[1] for kv in kv_dtypes])
    return PrefillAttention(
        np.asarray(heads, np.float64),
        np.asarray(kv_heads, np.float64),
        kv_bytes,
        has_table,
        seconds,
    )


def _extend_linearly(x, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Piecewise-linear interpolation through ``(xs, ys)`` at ``x``, the end segments
    continued beyond the ends (``np.interp`` would hold the end values)."""
    if len(xs) == 1:
        return np.full(np.shape(x), ys[0])
    y = np.interp(x, xs, ys)
    head = ys[0] + (x - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0])
    tail = ys[-1] + (x - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return np.where(x < xs[0], head, np.where(x > xs[-1], tail, y))


def _fit_row(kv_tokens: np.ndarray, time_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares fit (relative error) of one batch's measured times to a non-decreasing
    function of the KV entries, linear between the DECODE_KV_KNOTS inside the measured range
    and continued linearly beyond it. Returns ``(nodes, values)`` for
    :func:`_extend_linearly`: the measured range's ends and the knots inside it."""
    lo, hi = float(kv_tokens.min()), float(kv_tokens.max())
    if lo == hi:
        return np.asarray([lo]), np.asarray([np.median(time_s)])
    nodes = np.asarray([lo, *(k for k in DECODE_KV_KNOTS if lo < k < hi), hi])
    # The time at the first node, then one slope per segment; the first segment reaches down
    # and the last one up without bound.
    width = np.diff(nodes)
    lower = np.full(len(width), 0.0)
    lower[0] = -np.inf
    upper = width.copy()
    upper[-1] = np.inf
    steps = np.clip(kv_tokens[:, None] - nodes[None, :-1], lower, upper)
    design = np.concatenate([np.ones((len(kv_tokens), 1)), steps], axis=1) / time_s[:, None]
    # Active set: a negative slope is measurement noise; drop the worst and refit.
    is_free = np.ones(design.shape[1], bool)
    while True:
        coef = np.zeros(design.shape[1])
        coef[is_free] = np.linalg.lstsq(design[:, is_free], np.ones_like(time_s), rcond=None)[0]
        is_negative = (coef < 0.0) & is_free
        is_negative[0] = False
        if not is_negative.any():
            break
        is_free[np.argmin(np.where(is_negative, coef, np.inf))] = False
    values = coef[0] + np.concatenate([[0.0], np.cumsum(coef[1:] * width)])
    return nodes, values


@functools.cache
def _table_rows(gpu_name: str, key: tuple) -> tuple[np.ndarray, list]:
    """The measured batches of one decode-attention table and each one's fit (:func:`_fit_row`)."""
    table = ct.attention_slices(gpu_name, "generation")[key]
    batches = np.unique(table["batch"])
    fits = []
    for b in batches:
        rows = table["batch"] == b
        fits.append(_fit_row(b * table["kv_len"][rows], table["time_s"][rows]))
    return batches, fits


def decode_table_time_s(gpu_name: str, key: tuple, batch, kv_tokens) -> np.ndarray:
    """A measured decode-attention table (``key``: heads, KV heads, head dim, KV dtype) as the
    engine prices it: per measured batch, piecewise linear in the KV entries read (summed over
    the batch) with the DECODE_KV_KNOTS as breakpoints, fitted by least squares; linear in the
    batch between measured batches; never negative (a line continued below a batch's shortest
    measurement may cross zero). ``batch`` and ``kv_tokens`` broadcast."""
    batches, fits = _table_rows(gpu_name, key)
    batch, kv_tokens = np.broadcast_arrays(np.asarray(batch, float), np.asarray(kv_tokens, float))
    by_batch = np.stack([_extend_linearly(kv_tokens, *fit) for fit in fits])  # [rows, ...]
    row = np.clip(np.searchsorted(batches, batch, side="right") - 1, 0, len(batches) - 2)
    lo, hi = batches[row], batches[row + 1]
    u = (batch - lo) / (hi - lo)  # beyond the measured batches, the end segments go on
    below = np.take_along_axis(by_batch, row[None], axis=0)[0]
    above = np.take_along_axis(by_batch, row[None] + 1, axis=0)[0]
    return np.maximum((1.0 - u) * below + u * above, 0.0)


def _decode_site(rec: _Recorder, model: ModelSpec, sh: _Shapes) -> DecodeAttention:
    """Each plan's decode attention on its busiest attention replica (at least one sequence,
    with its share of the KV), from the measured head configuration where there is one."""
    u = len(sh.kv_dtype)
    slices = ct.attention_slices(rec.gpu.name, "generation")
    knots = np.asarray(DECODE_BATCH_KNOTS)
    batch = np.maximum(knots[None, :] / sh.attn_dp[:, None], 1.0)  # [U, K_db]
    kv_tokens = DECODE_KV_POINTS[None, None, :] * (batch / knots[None, :])[:, :, None]
    has_table = np.zeros(u, bool)
    seconds = np.ones(kv_tokens.shape)
    for i, (h, kvh, kv) in enumerate(zip(sh.heads, sh.kv_heads, sh.kv_dtype)):
        key = (int(h), int(kvh), int(model.head_dim), kv)
        table = slices.get(key)
        if table is not None and len(table["time_s"]) >= 12 and len(set(table["batch"])) > 1:
            seconds[i] = decode_table_time_s(rec.gpu.name, key, batch[i][:, None], kv_tokens[i])
            has_table[i] = True
        rec.sources[i]["decode_attention"].add("table" if has_table[i] else "model")
    kv_bytes = np.asarray([K.attention_precision(kv, rec.gpu)[1] for kv in sh.kv_dtype])
    return DecodeAttention(sh.heads, sh.kv_heads, kv_bytes, batch, kv_tokens, has_table, seconds)


def _encoder(rec: _Recorder, model: ModelSpec, sh: _Shapes) -> Encoder | None:
    if not model.is_encoder_decoder:
        return None
    heads, inter, m_enc = _encoder_shapes(model, sh.cells)
    return Encoder(
        m_enc=m_enc,
        inter=inter,
        enc_dp=sh.cells.enc_dp,
        attention=_prefill_site(rec, model, heads, heads, ["bf16"] * len(heads)),
    )


def plan_sites(
    plans: np.ndarray,
    model: ModelSpec,
    gpu: GpuSpec,
    *,
    network_transfers: np.ndarray,
    clock_mhz: np.ndarray,
    gpus_per_node: int,
) -> tuple[PlanSites, SiteKinds, list[dict[str, str]]]:
    """The call sites of ``U`` plans, their static kinds, and where each plan's operator
    times come from (``"table"``, ``"model"`` or ``"model+table"``, by operator).

    Args:
        plans: int32 ``[U, F]`` plan tensor.
        model: the served model.
        gpu: the GPU type.
        network_transfers: ``[U]`` stage transfers that cross nodes (see
            :func:`~apex_jax.cost.parallel.cross_node_transfers`).
        clock_mhz: ``[U]`` SM clock of each plan, MHz.
        gpus_per_node: GPUs a node joins by NVLink; collective groups beyond one node are
            hierarchical (see :mod:`apex_jax.cost.parallel`).
    """
    plans = np.asarray(plans)
    sh = _shapes(model, plans)
    # The router GEMM of an MoE layer computes in bf16 whatever the plan's weights.
    rec = _Recorder(gpu, len(plans), set(sh.weight_dtype) | ({"bf16"} if model.is_moe else set()))
    gemms = {name: _gemm_site(rec, *shape) for name, shape in _gemm_shapes(model, sh).items()}
    collectives, collective_kinds = _collective_sites(rec, model, plans, gpus_per_node)
    pp = plans[:, COL["pp"]].astype(np.float64)
    network_transfers = np.asarray(network_transfers, np.float64)
    transfers = np.stack([pp - 1.0 - network_transfers, network_transfers], axis=1)
    rec.model_only("p2p", transfers.sum(axis=1) > 0)
    rec.model_only("elementwise", np.ones(len(plans), bool))
    sites = PlanSites(
        log_clock_scale=np.log(np.asarray(clock_mhz, np.float64) / gpu.max_clock_mhz),
        tp=sh.tp,
        attn_dp=sh.attn_dp,
        heads=sh.heads,
        kv_heads=sh.kv_heads,
        inter=sh.inter,
        m_attn=sh.m_attn,
        m_ffn=sh.m_ffn,
        m_res=sh.m_res,
        transfers=transfers,
        gemms=gemms,
        moe=_moe_site(rec, model, sh) if model.is_moe else None,
        collectives=collectives,
        prefill=_prefill_site(rec, model, sh.heads, sh.kv_heads, sh.kv_dtype),
        decode=_decode_site(rec, model, sh),
        encoder=_encoder(rec, model, sh),
    )
    kinds = SiteKinds(rec.compute_dtypes, collective_kinds)
    sources = [{op: "+".join(sorted(s)) for op, s in sorted(d.items())} for d in rec.sources]
    return sites, kinds, sources
