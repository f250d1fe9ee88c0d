"""Closed-loop benchmark runs in NVIDIA AIConfigurator's silicon format: which rows apex_jax
can simulate, the case of each, and predicted against measured TTFT and TPOT.

``validation/silicon_dev.csv`` (see the data folder's ``SOURCES.md``) has one row per
benchmark run: ``backend`` and ``backend_version``, ``model_path``, ``system`` (``h100_sxm``,
``h200_sxm``), ``precision`` (blank for bf16), ``isl``, ``osl``, ``concurrency``, the layout
(``tp_size``, ``pp_size``, ``attention_dp_size``, ``moe_tp_size``, ``moe_ep_size``) and the
measured ``silicon_ttft_ms`` and ``silicon_tpot_ms``. Each run is ``concurrency`` clients in
a closed loop sending ``concurrency x 10`` measured requests (NVIDIA's recipe), so a row
becomes a row of the measured-runs schema (:mod:`apex_jax.measured_runs`) and is checked and
simulated as one. A dense model's row runs TP ``tp_size``; an MoE model's row becomes a cell layout
(:func:`_layout`).

Assumptions, each a fact the file does not record: fp8 runs quantise the weights and GEMM
activations to fp8 (W8A8), per tensor except for checkpoints published with 128 x 128 block
scales (:data:`_BLOCK_FP8_CHECKPOINTS`: ``Qwen/Qwen3-235B-A22B-FP8``, ``MiniMaxAI/MiniMax-M2.5``),
which vLLM serves with its block-fp8 kernels; ``nvidia/Llama-3.1-8B-Instruct-FP8`` has the shapes of Llama-3.1-8B
(an instruction-tuned, quantised copy); every run is one engine (with attention DP, one
engine per DP rank, see :func:`_layout`) on the GPUs of one node. The KV cache
(:data:`_KV_DTYPES`): a ModelOpt fp8 checkpoint (``nvidia/Llama-3.1-8B-Instruct-FP8``)
quantises only the linear layers (its model card) and vLLM's ``kv_cache_dtype=auto`` keeps
the KV cache in bf16, as it does for the two block-fp8 MoE checkpoints, whose quantisation
configs cover the weights only; the fp8 runs of the bf16 checkpoint ``Qwen/Qwen3-32B``, quantised
at load, store it in fp8: with a bf16 cache their measured TPOT would be shorter than
reading the weights and the KV cache once at peak HBM bandwidth (one H100, concurrency 24,
4,000 + 1,000 tokens: 32.8 GB of fp8 weights and 24 x 4,500 tokens x 262 KB of bf16 KV take
18.2 ms at 3.35 TB/s; 16.9 ms was measured).

The benchmark harness, which the file does not record either (its provenance column was
dropped). ASSUMPTION, every row but those below: NVIDIA's own runner, AIConfigurator's
``src/aiconfigurator/eval/benchmarks/genai_perf_runner.py`` (genai-perf, streaming chat,
fixed ISL and OSL, ``--concurrency C --request-count 10C --warmup-request-count 2C
--num-dataset-entries 12C``), with no prompt reused across its phases. Its warm-up of
:data:`WARMUP_REQUESTS_PER_CLIENT` ``x C`` requests is in no figure, and perf_analyzer waits
for it to finish before the measured phase, which starts with ``C`` requests at once on an
idle engine (:func:`apex_jax.workload.closed_loop`): the first measured round is a burst,
as simulated. perf_analyzer's measured phase resends the warm-up's dataset entries first,
so with vLLM V1's prefix cache on, its first two measured rounds would be cache hits; the
rows say the prompts were not reused (AIConfigurator's ``docs/dynamo_deployment_guide.md``
disables cache reuse for random data; the Qwen3-32B bf16 runs need at most 50% of the bf16
peak to prefill every prompt, ``scripts/prefill_bound.py``), and with those hits their TTFT
MAPE is 61.4% instead of 19.7% (README). So the warm-up's prompts are distinct here and it
changes no figure.

Prompt pools (:data:`_PROMPT_POOLS`), ASSUMPTION: the fp8 runs of the two dense models were
made with a benchmark tool's defaults, not NVIDIA's runner: no warm-up, and a pool of 100
(aiperf's and genai-perf's default ``--num-dataset-entries``; aiperf's ``InputDefaults``), so
that every request after its prompt's first send finds the prompt in vLLM V1's prefix cache
(on by default) and prefills only its last block, unless the cache evicted it: a pool whose
prompts and outputs outgrow the KV cache misses in a cyclic pass (least recently used first;
:meth:`apex_jax.workload.Workload.cached_prompt_tokens`). The two runs on one GPU with such a
pool, Qwen3-32B fp8 (4,000 + 1,000 tokens in 312,000 tokens of cache) and Llama-3.1-8B-FP8
(8,000 + 2,000 in 953,000), therefore hit nothing, and the Qwen3-32B one's measured TTFT
(295 ms, where one cold 4,000-token prefill takes 0.26 s at the H100's whole fp8 peak) then
says that run did not send 100 distinct prompts of that length (README). Why these rows:
with every prompt prefilled in full, 10 of their 24 runs would need more than the GPU's
whole dense fp8 peak in the time their measured TPOT leaves after reading the weights and
the decoding KV cache once (``scripts/prefill_bound.py``), which no kernel reaches; the bf16
runs need at most 50% of the bf16 peak and over-predict nothing a cache would explain, so
they are taken to send distinct prompts. The file records neither the tool nor its options:
this is the one assumption that makes the fp8 rows physically possible, and the pool size is
the tools' default, not fitted.
NVIDIA's runner on these rows (12 x C distinct entries, the first two measured rounds
resending the warm-up's) prefills eight rounds in ten in full and breaks the same bound
(Llama-3.1-8B-FP8 TPOT MAPE 111%); the tools' pool of 100 with NVIDIA's warm-up, which no
documented harness combines, would cache every measured prompt of most runs and put their TTFT
at 23-170 ms where 70-460 ms was measured (README).

Rows apex_jax cannot simulate yet are kept with every reason that applies: engines without
a preset (SGLang, TensorRT-LLM), engine versions without a preset or not recorded, the MoE
models whose features the cost model lacks (:data:`_UNMODELLED_MODELS`), weight formats
without a kernel model (fp4).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from apex_jax.cost.tables import moe_grids
from apex_jax.deployment import make_deployment
from apex_jax.engine_config import ENGINE_PRESETS, resolve_engine
from apex_jax.evaluate import evaluate_cases
from apex_jax.hardware import HardwareParams
from apex_jax.measured_runs import MEASURED_COLUMNS, run_cases
from apex_jax.model_spec import load_model
from apex_jax.paths import bundled_path

__all__ = [
    "REQUESTS_PER_CLIENT",
    "SILICON_DEV",
    "WARMUP_REQUESTS_PER_CLIENT",
    "BenchmarkRuns",
    "format_benchmark_validation",
    "load_benchmark_runs",
    "run_benchmark_validation",
]

SILICON_DEV = "validation/silicon_dev.csv"
# NVIDIA's recipe sends concurrency x 10 requests "to reduce the impact of the first batch"
# (AIConfigurator's docs/dynamo_deployment_guide.md).
REQUESTS_PER_CLIENT = 10
# ... after a warm-up of concurrency x 2 requests in no figure (its genai_perf_runner.py).
WARMUP_REQUESTS_PER_CLIENT = 2

# model_path -> catalog model with the same shapes.
_DENSE_MODELS = {
    "Qwen/Qwen3-32B": "Qwen/Qwen3-32B",
    "meta-llama/Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B",
    "nvidia/Llama-3.1-8B-Instruct-FP8": "meta-llama/Llama-3.1-8B",
}
_MOE_MODELS = {
    "Qwen/Qwen3-235B-A22B-FP8": "Qwen/Qwen3-235B-A22B",
    "MiniMaxAI/MiniMax-M2.5": "MiniMaxAI/MiniMax-M2",
}
# vLLM rows' mixture-of-experts models that the catalog does not hold, with what of each
# the cost model lacks (their published configs).
_UNMODELLED_MODELS = {
    "openai/gpt-oss-120b": (
        "attention sinks and every other layer's 128-token sliding window (KV cache and "
        "attention capped at the window) are not modelled"
    ),
    "moonshotai/Kimi-K2.5": (
        "attention: MLA not modelled (the Kimi-K2 entry approximates it); nor its shared "
        "expert and first, dense layer"
    ),
}
_GPUS = {"h100_sxm": "H100-SXM-80GB", "h200_sxm": "H200-SXM-141GB"}
# precision -> weight dtype (int4 is weight-only, W4A16, as the file's int4_wo says); fp4
# (MXFP4 / NVFP4) has no dtype in apex_jax.
_WEIGHT_DTYPES = {"": "bf16", "fp8": "fp8", "int4": "int4"}
# (model_path, precision) -> KV-cache dtype where it is not bf16 (see the module docstring).
_KV_DTYPES = {("Qwen/Qwen3-32B", "fp8"): "fp8"}
# Checkpoints whose fp8 weights carry one scale per 128 x 128 block (their config.json's
# quantization_config: "weight_block_size": [128, 128]), which vLLM runs with block-fp8
# kernels.
_BLOCK_FP8_CHECKPOINTS = frozenset({"Qwen/Qwen3-235B-A22B-FP8", "MiniMaxAI/MiniMax-M2.5"})
# (model_path, precision) -> distinct prompts the benchmark drew from, where the runs cannot
# have prefilled every prompt, with a tool's defaults (no warm-up; see the module docstring);
# other rows run NVIDIA's harness with distinct prompts.
_PROMPT_POOLS = {
    ("Qwen/Qwen3-32B", "fp8"): 100,
    ("nvidia/Llama-3.1-8B-Instruct-FP8", "fp8"): 100,
}


class BenchmarkRuns(NamedTuple):
    """A benchmark file split into the rows apex_jax simulates and those it skips."""

    rows: list[dict[str, str]]  # [R] simulated rows, as read
    measured_runs: list[dict[str, str]]  # [R] the same rows in the measured-runs schema
    skipped: list[tuple[dict[str, str], str]]  # rows not simulated, each with the reason


def _skip_reason(row: dict[str, str]) -> str:
    """Why apex_jax cannot simulate ``row`` yet, every reason that applies; empty when it
    can."""
    engine, version, model = row["backend"], row["backend_version"], row["model_path"]
    if not any(name == engine for name, _ in ENGINE_PRESETS):
        return f"engine {engine}: no preset (apex_jax models vLLM)"
    reasons = []
    if not version:
        reasons.append("engine version not recorded")
    else:
        try:
            resolve_engine({"name": engine, "version": version})
        except ValueError:
            reasons.append(f"{engine} {version}: no preset for this version")
    if model in _UNMODELLED_MODELS:
        reasons.append(f"{model}: {_UNMODELLED_MODELS[model]}")
    elif model not in _DENSE_MODELS and model not in _MOE_MODELS:
        reasons.append(f"model {model} is not in the catalog")
    if row["precision"] not in _WEIGHT_DTYPES:
        reasons.append(f"weight format {row['precision']}: no kernel model")
    if row["system"] not in _GPUS:
        reasons.append(f"system {row['system']}: not in the GPU catalog")
    elif model in _BLOCK_FP8_CHECKPOINTS and not _block_fp8_experts_measured(row):
        reasons.append(
            f"{model}: block-fp8 experts at expert TP {row['moe_tp_size']}, EP "
            f"{row['moe_ep_size']} have no measured row, and block fp8 has no constants of "
            "its own off the tables (per-tensor fp8's are 3-6x slower)"
        )
    return "; ".join(reasons)


def _block_fp8_experts_measured(row: dict[str, str]) -> bool:
    """Whether AIConfigurator's block-fp8 fused-MoE table holds ``row``'s expert layout."""
    spec = load_model(_MOE_MODELS[row["model_path"]])
    shape = (spec.hidden_size, spec.intermediate_size, spec.num_experts_per_tok)
    layout = (spec.num_experts, int(row["moe_tp_size"]), int(row["moe_ep_size"]))
    return ("fp8_block", *shape, *layout) in moe_grids(_GPUS[row["system"]])


def _layout(row: dict[str, str]) -> dict[str, str]:
    """The GPUs and the cell layout of ``row`` as apex_jax plan columns.

    A dense row runs TP ``tp_size``. An MoE row runs on ``moe_tp_size x moe_ep_size`` GPUs,
    as vLLM 0.12 does with ``--data-parallel-size D``: ``tp_size``-way TP attention,
    replicated ``D`` times (attention DP), and the experts over all ``tp_size x D`` GPUs,
    ``moe_ep_size`` ranks with ``--enable-expert-parallel`` (then EP is ``tp_size x D``),
    expert TP otherwise. In apex_jax that is one stage of every GPU with ``attn_tp =
    tp_size``, ``mlp_tp`` all of them and ``ep = moe_ep_size``. vLLM's ``D`` engines each
    schedule their own requests with the preset's limits, so the stage's limits are ``D``
    times them.
    """
    tp = int(row["tp_size"])
    if row["model_path"] not in _MOE_MODELS:
        return {"num_gpus": str(tp), "tp": str(tp)}
    num_gpus = int(row["moe_tp_size"]) * int(row["moe_ep_size"])
    attn_dp = num_gpus // tp
    if attn_dp * tp != num_gpus or attn_dp != int(row["attention_dp_size"] or attn_dp):
        raise ValueError(
            f"{row['model_path']} row: moe_tp_size x moe_ep_size ({num_gpus}) is not tp_size "
            f"({tp}) x attention_dp_size ({row['attention_dp_size'] or 'blank'})"
        )
    layout = {"num_gpus": str(num_gpus), "tp": str(num_gpus), "attn_tp": str(tp)}
    layout |= {"mlp_tp": str(num_gpus), "ep": row["moe_ep_size"]}
    if attn_dp > 1:
        engine = make_deployment(
            _MOE_MODELS[row["model_path"]],
            _GPUS[row["system"]],
            num_gpus,
            {"name": row["backend"], "version": row["backend_version"]},
        ).engine
        layout["max_num_seqs"] = str(attn_dp * engine.max_num_seqs)
        layout["max_num_batched_tokens"] = str(attn_dp * engine.max_num_batched_tokens)
    return layout


def _measured_run(row: dict[str, str]) -> dict[str, str]:
    """``row`` in the measured-runs schema (:mod:`apex_jax.measured_runs`)."""
    concurrency = int(row["concurrency"])
    pool = _PROMPT_POOLS.get((row["model_path"], row["precision"]), 0)
    return {
        "model": (_DENSE_MODELS | _MOE_MODELS)[row["model_path"]],
        "gpu": _GPUS[row["system"]],
        "dp": "1",
        "pp": row["pp_size"] or "1",
        **_layout(row),
        "weight_dtype": "fp8_block"
        if row["model_path"] in _BLOCK_FP8_CHECKPOINTS
        else _WEIGHT_DTYPES[row["precision"]],
        "kv_dtype": _KV_DTYPES.get((row["model_path"], row["precision"]), "bf16"),
        "engine": row["backend"],
        "engine_version": row["backend_version"],
        "workload": "closed_loop",
        "concurrency": str(concurrency),
        "isl": row["isl"],
        "osl": row["osl"],
        "num_requests": str(REQUESTS_PER_CLIENT * concurrency),
        "num_prompts": str(pool),
        "num_warmup_requests": str(0 if pool else WARMUP_REQUESTS_PER_CLIENT * concurrency),
        "ttft_mean_s": str(float(row["silicon_ttft_ms"]) / 1e3),
        "tpot_mean_s": str(float(row["silicon_tpot_ms"]) / 1e3),
    }


def load_benchmark_runs(path: str | Path | None = None) -> BenchmarkRuns:
    """Read a benchmark file (a bundled name or a path; default :data:`SILICON_DEV`)."""
    path = Path(path) if path and Path(path).exists() else bundled_path(str(path or SILICON_DEV))
    if not path.exists():
        raise FileNotFoundError(f"benchmark file {path} not found")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    kept, skipped = [], []
    for row in rows:
        reason = _skip_reason(row)
        if reason:
            skipped.append((row, reason))
        else:
            kept.append(row)
    return BenchmarkRuns(kept, [_measured_run(r) for r in kept], skipped)


def run_benchmark_validation(
    path: str | Path | None = None, hw: HardwareParams | None = None
) -> dict[str, Any]:
    """Simulate every row apex_jax can of a benchmark file and compare with the measurements.

    Returns:
        ``rows``: per simulated row its labels, measured and predicted ``ttft_mean_s`` and
        ``tpot_mean_s`` and the errors in %; ``mape_pct``: per (model, precision, engine
        version), ``"all dense"`` and ``"all MoE"`` (each where it has rows) the MAPE of each
        metric; ``overheads``: per engine version
        the per-iteration overhead used and its source; ``skipped``: per reason the rows'
        (model, engine, version) groups and counts.
    """
    runs = load_benchmark_runs(path)
    cases, measured = run_cases(runs.measured_runs, source=str(path or SILICON_DEV))
    results, _ = evaluate_cases(cases, hw)
    table = []
    for row, run, m, r in zip(runs.rows, runs.measured_runs, measured, results):
        entry = {
            "model": row["model_path"],
            "precision": row["precision"] or "bf16",
            "version": f"{row['backend']} {row['backend_version']}",
            "gpu": row["system"],
            "is_moe": row["model_path"] in _MOE_MODELS,
            "layout": _layout_label(run),
            "isl": int(row["isl"]),
            "osl": int(row["osl"]),
            "concurrency": int(row["concurrency"]),
            "status": r["status"],
        }
        for metric in MEASURED_COLUMNS:
            entry[f"{metric}_measured"] = m[metric]
            entry[f"{metric}_predicted"] = r[metric]
            entry[f"{metric}_err_pct"] = (r[metric] / m[metric] - 1.0) * 100.0
        table.append(entry)
    # The dense rows are issue 11's target; the MoE rows are reported on their own.
    groups: dict[str, list[dict]] = {
        "all dense": [e for e in table if not e["is_moe"]],
        "all MoE": [e for e in table if e["is_moe"]],
    }
    groups = {key: members for key, members in groups.items() if members}
    for entry in table:
        key = f"{entry['model']} {entry['precision']} {entry['version']}"
        groups.setdefault(key, []).append(entry)
    mape = {
        key: {
            metric: float(np.mean([abs(e[f"{metric}_err_pct"]) for e in members]))
            for metric in MEASURED_COLUMNS
        }
        | {"num_rows": len(members)}
        for key, members in groups.items()
    }
    skipped: dict[str, dict[str, int]] = {}
    for row, reason in runs.skipped:
        what = f"{row['model_path']} on {row['backend']} {row['backend_version'] or '?'}"
        counts = skipped.setdefault(reason, {})
        counts[what] = counts.get(what, 0) + 1
    engines = {(c.deployment.engine.name, c.deployment.engine.version): c for c in cases}
    overheads = [
        {"engine": name, "version": version, **case.deployment.engine.overhead_source()._asdict()}
        for (name, version), case in sorted(engines.items())
    ]
    return {"rows": table, "mape_pct": mape, "overheads": overheads, "skipped": skipped}


def _layout_label(run: dict[str, str]) -> str:
    """A row's layout: ``TP4`` for a dense run; for an MoE run its attention (``TP1·DP2``)
    and its experts (``EP2``, or ``TP2`` for expert TP)."""
    tp, attn_tp = int(run["tp"]), int(run.get("attn_tp") or run["tp"])
    if "ep" not in run:
        return f"TP{tp}"
    attention = f"TP{attn_tp}" + (f"·DP{tp // attn_tp}" if attn_tp < tp else "")
    ep = int(run["ep"])
    experts = f"EP{ep}" if ep > 1 else f"TP{tp}"
    return f"{attention} {experts}"


def format_benchmark_validation(report: dict[str, Any]) -> str:
    """The per-row table, the MAPE per model, precision and engine version, and the skipped
    rows with their reasons."""
    lines = [
        f"{'model':<34} {'prec':<5} {'gpu':<9} {'layout':<11} {'ISL':>5} {'OSL':>5} {'conc':>4}"
        f"   {'TTFT meas/pred (ms)':>20} {'err%':>6}   {'TPOT meas/pred (ms)':>20} {'err%':>6}"
    ]
    lines.append("-" * len(lines[0]))
    for e in report["rows"]:
        ttft = f"{e['ttft_mean_s_measured'] * 1e3:.1f}/{e['ttft_mean_s_predicted'] * 1e3:.1f}"
        tpot = f"{e['tpot_mean_s_measured'] * 1e3:.2f}/{e['tpot_mean_s_predicted'] * 1e3:.2f}"
        lines.append(
            f"{e['model']:<34} {e['precision']:<5} {e['gpu']:<9} {e['layout']:<11} {e['isl']:>5} "
            f"{e['osl']:>5} {e['concurrency']:>4}   {ttft:>20} {e['ttft_mean_s_err_pct']:>6.1f}"
            f"   {tpot:>20} {e['tpot_mean_s_err_pct']:>6.1f}"
        )
    lines.append("")
    lines.append(
        "MAPE (%) per model, precision and engine version; dense and MoE models apart:"
    )
    for key, m in report["mape_pct"].items():
        lines.append(
            f"  {key:<52} rows {m['num_rows']:>4}   ttft_mean_s {m['ttft_mean_s']:>6.1f}"
            f"   tpot_mean_s {m['tpot_mean_s']:>6.1f}"
        )
    for o in report["overheads"]:
        lines.append(
            f"per-iteration overhead of {o['engine']} {o['version']}: {o['seconds'] * 1e3:g} ms "
            f"(source: {o['source']})"
        )
    num_skipped = sum(sum(c.values()) for c in report["skipped"].values())
    lines.append("")
    lines.append(f"skipped {num_skipped} rows apex_jax cannot simulate yet:")
    for reason, counts in report["skipped"].items():
        lines.append(f"  {reason}:")
        for what, count in sorted(counts.items()):
            lines.append(f"    {what} ({count} rows)")
    return "\n".join(lines)
