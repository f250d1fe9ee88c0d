"""Closed-loop benchmark runs in NVIDIA AIConfigurator's silicon format: which rows apex_jax
can simulate, the case of each, and predicted against measured TTFT and TPOT.

``validation/silicon_dev.csv`` (see the data folder's ``SOURCES.md``) has one row per
benchmark run: ``backend`` and ``backend_version``, ``model_path``, ``system`` (``h100_sxm``,
``h200_sxm``), ``precision`` (blank for bf16), ``isl``, ``osl``, ``concurrency``, ``tp_size``,
``pp_size`` and the measured ``silicon_ttft_ms`` and ``silicon_tpot_ms``. Each run is
``concurrency`` clients in a closed loop sending ``concurrency x 10`` requests (NVIDIA's
recipe), so a row becomes a row of the measured-runs schema (:mod:`apex_jax.measured_runs`)
and is checked and simulated as one.

Assumptions, each a fact the file does not record: fp8 runs quantise the weights and GEMM
activations to fp8 (W8A8, per tensor); ``nvidia/Llama-3.1-8B-Instruct-FP8`` has the shapes of
Llama-3.1-8B (an instruction-tuned, quantised copy); every run is one engine on ``tp_size``
GPUs of one node. The KV cache (:data:`_KV_DTYPES`): a ModelOpt fp8 checkpoint
(``nvidia/Llama-3.1-8B-Instruct-FP8``) quantises only the linear layers (its model card) and
vLLM's ``kv_cache_dtype=auto`` keeps the KV cache in bf16; the fp8 runs of the bf16 checkpoint
``Qwen/Qwen3-32B``, quantised at load, store it in fp8: with a bf16 cache their measured TPOT
would be shorter than reading the weights and the KV cache once at peak HBM bandwidth (one
H100, concurrency 24, 4,000 + 1,000 tokens: 32.8 GB of fp8 weights and 24 x 4,500 tokens x
262 KB of bf16 KV take 18.2 ms at 3.35 TB/s; 16.9 ms was measured).

Rows apex_jax cannot simulate yet are kept with the reason: engines without a preset
(SGLang, TensorRT-LLM), MoE models (their expert kernels are not yet accurate enough,
issue 11), engine versions without a preset or not recorded, weight formats without a kernel
model (fp4, int4).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from apex_jax.engine_config import ENGINE_PRESETS, resolve_engine
from apex_jax.evaluate import evaluate_cases
from apex_jax.hardware import HardwareParams
from apex_jax.measured_runs import MEASURED_COLUMNS, run_cases
from apex_jax.paths import bundled_path

__all__ = [
    "REQUESTS_PER_CLIENT",
    "SILICON_DEV",
    "BenchmarkRuns",
    "format_benchmark_validation",
    "load_benchmark_runs",
    "run_benchmark_validation",
]

SILICON_DEV = "validation/silicon_dev.csv"
# NVIDIA's recipe sends concurrency x 10 requests "to reduce the impact of the first batch"
# (AIConfigurator's docs/dynamo_deployment_guide.md).
REQUESTS_PER_CLIENT = 10

# model_path -> catalog model with the same shapes.
_DENSE_MODELS = {
    "Qwen/Qwen3-32B": "Qwen/Qwen3-32B",
    "meta-llama/Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B",
    "nvidia/Llama-3.1-8B-Instruct-FP8": "meta-llama/Llama-3.1-8B",
}
# Mixture-of-experts models of the file (num_experts in their published configs).
_MOE_MODELS = (
    "MiniMaxAI/MiniMax-M2.5",
    "Qwen/Qwen3-235B-A22B-FP8",
    "Qwen/Qwen3.5-397B-A17B",
    "deepseek-ai/DeepSeek-R1",
    "deepseek-ai/DeepSeek-V3",
    "moonshotai/Kimi-K2.5",
    "openai/gpt-oss-120b",
    "zhipuai/GLM-5",
)
_GPUS = {"h100_sxm": "H100-SXM-80GB", "h200_sxm": "H200-SXM-141GB"}
# precision -> weight dtype
_WEIGHT_DTYPES = {"": "bf16", "fp8": "fp8"}
# (model_path, precision) -> KV-cache dtype where it is not bf16 (see the module docstring).
_KV_DTYPES = {("Qwen/Qwen3-32B", "fp8"): "fp8"}


class BenchmarkRuns(NamedTuple):
    """A benchmark file split into the rows apex_jax simulates and those it skips."""

    rows: list[dict[str, str]]  # [R] simulated rows, as read
    measured_runs: list[dict[str, str]]  # [R] the same rows in the measured-runs schema
    skipped: list[tuple[dict[str, str], str]]  # rows not simulated, each with the reason


def _skip_reason(row: dict[str, str]) -> str:
    """Why apex_jax cannot simulate ``row`` yet; empty when it can."""
    engine, version, model = row["backend"], row["backend_version"], row["model_path"]
    if not any(name == engine for name, _ in ENGINE_PRESETS):
        return f"engine {engine}: no preset (apex_jax models vLLM)"
    if model in _MOE_MODELS:
        return "MoE model: expert kernels not yet modelled to the dense GEMMs' accuracy"
    if not version:
        return "engine version not recorded"
    try:
        resolve_engine({"name": engine, "version": version})
    except ValueError:
        return f"{engine} {version}: no preset for this version"
    if model not in _DENSE_MODELS:
        return f"model {model} is not in the catalog"
    if row["precision"] not in _WEIGHT_DTYPES:
        return f"weight format {row['precision']}: no kernel model"
    if row["system"] not in _GPUS:
        return f"system {row['system']}: not in the GPU catalog"
    return ""


def _measured_run(row: dict[str, str]) -> dict[str, str]:
    """``row`` in the measured-runs schema (:mod:`apex_jax.measured_runs`)."""
    concurrency = int(row["concurrency"])
    return {
        "model": _DENSE_MODELS[row["model_path"]],
        "gpu": _GPUS[row["system"]],
        "num_gpus": row["tp_size"],
        "dp": "1",
        "tp": row["tp_size"],
        "pp": row["pp_size"] or "1",
        "weight_dtype": _WEIGHT_DTYPES[row["precision"]],
        "kv_dtype": _KV_DTYPES.get((row["model_path"], row["precision"]), "bf16"),
        "engine": row["backend"],
        "engine_version": row["backend_version"],
        "workload": "closed_loop",
        "concurrency": str(concurrency),
        "isl": row["isl"],
        "osl": row["osl"],
        "num_requests": str(REQUESTS_PER_CLIENT * concurrency),
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
        version) and ``"all"`` the MAPE of each metric; ``overheads``: per engine version
        the per-iteration overhead used and its source; ``skipped``: per reason the rows'
        (model, engine, version) groups and counts.
    """
    runs = load_benchmark_runs(path)
    cases, measured = run_cases(runs.measured_runs, source=str(path or SILICON_DEV))
    results, _ = evaluate_cases(cases, hw)
    table = []
    for row, m, r in zip(runs.rows, measured, results):
        entry = {
            "model": row["model_path"],
            "precision": row["precision"] or "bf16",
            "version": f"{row['backend']} {row['backend_version']}",
            "gpu": row["system"],
            "tp": int(row["tp_size"]),
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
    groups: dict[str, list[dict]] = {"all": table}
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


def format_benchmark_validation(report: dict[str, Any]) -> str:
    """The per-row table, the MAPE per model, precision and engine version, and the skipped
    rows with their reasons."""
    lines = [
        f"{'model':<34} {'prec':<5} {'gpu':<9} {'TP':>2} {'ISL':>5} {'OSL':>5} {'conc':>4}"
        f"   {'TTFT meas/pred (ms)':>20} {'err%':>6}   {'TPOT meas/pred (ms)':>20} {'err%':>6}"
    ]
    lines.append("-" * len(lines[0]))
    for e in report["rows"]:
        ttft = f"{e['ttft_mean_s_measured'] * 1e3:.1f}/{e['ttft_mean_s_predicted'] * 1e3:.1f}"
        tpot = f"{e['tpot_mean_s_measured'] * 1e3:.2f}/{e['tpot_mean_s_predicted'] * 1e3:.2f}"
        lines.append(
            f"{e['model']:<34} {e['precision']:<5} {e['gpu']:<9} {e['tp']:>2} {e['isl']:>5} "
            f"{e['osl']:>5} {e['concurrency']:>4}   {ttft:>20} {e['ttft_mean_s_err_pct']:>6.1f}"
            f"   {tpot:>20} {e['tpot_mean_s_err_pct']:>6.1f}"
        )
    lines.append("")
    lines.append("MAPE (%) per model, precision and engine version:")
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
