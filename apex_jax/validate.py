"""Replay measured serving runs and compare the predictions with the measurements.

A measurement file has one row per engine instance (a data-parallel run has one row per
replica), with the columns of ``apex_jax/data/validation/vllm_h100_dev.csv``: the model, GPU,
GPU count, ``dp``/``tp``/``pp``, dtypes, engine and version, the served trace, and the
measured ``ttft_mean_s``, ``tpot_mean_s`` and ``latency_sum_s`` of that instance.

Each run is replayed with its own launch arguments where the file records them
(:data:`LAUNCH_COLUMNS`: ``gpu_memory_utilization``, ``max_model_len``, blank for the model's
own, and ``custom_all_reduce``, 1 or 0); the engine derives the rest from them as vLLM does
(chunked prefill and the token budget follow from ``max_model_len``, see
:mod:`apex_jax.engine_config`). A run whose arguments vLLM would refuse to start with gets
vLLM's reason instead of predictions and stays out of the error figures.

Measured TPOT is the mean of vLLM's per-token decode-time histogram, so it is compared with
the token-weighted ``tpot_token_mean_s``; TTFT is the mean over the instance's requests,
queueing included; the latency sum is the sum of end-to-end latencies.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apex_jax.deployment import Case, make_case
from apex_jax.evaluate import evaluate_cases
from apex_jax.hardware import HardwareParams
from apex_jax.paths import bundled_path
from apex_jax.workload import load_trace

__all__ = [
    "COMPARED",
    "DEFAULT_MEASUREMENTS",
    "LAUNCH_COLUMNS",
    "format_validation",
    "load_measurements",
    "measurement_cases",
    "run_validation",
]

DEFAULT_MEASUREMENTS = "validation/vllm_h100_dev.csv"

# measured column -> predicted key
COMPARED: dict[str, str] = {
    "ttft_mean_s": "ttft_mean_s",
    "tpot_mean_s": "tpot_token_mean_s",
    "latency_sum_s": "e2e_sum_s",
}

# Optional columns: the engine's launch arguments of each run (blank: the engine's default).
LAUNCH_COLUMNS: dict[str, str] = {
    "gpu_memory_utilization": "gpu_memory_utilization",
    "max_model_len": "max_model_len",
    "custom_all_reduce": "custom_all_reduce",
}

_REQUIRED = (
    "model",
    "engine",
    "engine_version",
    "gpu",
    "gpus",
    "dp",
    "tp",
    "pp",
    "weight_dtype",
    "kv_dtype",
    "served_trace",
    "replica",
)


def load_measurements(path: str | Path | None = None) -> list[dict[str, str]]:
    """Rows of a measurement CSV (a bundled name or a path); checks the required columns."""
    path = (
        Path(path)
        if path and Path(path).exists()
        else bundled_path(str(path or DEFAULT_MEASUREMENTS))
    )
    if not path.exists():
        raise FileNotFoundError(f"measurement file {path} not found")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"measurement file {path} has no rows")
    missing = [c for c in _REQUIRED + tuple(COMPARED) if c not in rows[0]]
    if missing:
        raise ValueError(f"measurement file {path} lacks columns {missing}")
    for row in rows:
        row["_dir"] = str(path.parent)
    return rows


def _trace_path(row: Mapping[str, str]) -> str:
    local = Path(row["_dir"]) / row["served_trace"]
    return str(local) if local.exists() else "validation/" + row["served_trace"]


def _launch_arguments(row: Mapping[str, str], gpu_memory_utilization: float) -> dict[str, Any]:
    """The engine knobs a run's launch arguments set (see :data:`LAUNCH_COLUMNS`);
    ``gpu_memory_utilization`` is used where the file does not record one."""
    recorded = {k: str(row.get(c) or "").strip() for c, k in LAUNCH_COLUMNS.items()}
    knobs: dict[str, Any] = {"gpu_memory_utilization": gpu_memory_utilization}
    try:
        if recorded["gpu_memory_utilization"]:
            knobs["gpu_memory_utilization"] = float(recorded["gpu_memory_utilization"])
        if recorded["max_model_len"]:
            knobs["max_model_len"] = int(recorded["max_model_len"])
        if recorded["custom_all_reduce"]:
            flag = int(recorded["custom_all_reduce"])
            if flag not in (0, 1):
                raise ValueError
            knobs["custom_all_reduce"] = bool(flag)
    except ValueError:
        raise ValueError(
            f"measurement row {dict(row)}: launch arguments {recorded} are not a fraction, "
            "an integer length and 1/0"
        ) from None
    return knobs


def measurement_cases(
    rows: Sequence[Mapping[str, str]],
    *,
    engine_overrides: Mapping[str, Any] | None = None,
    gpus_per_node: int = 8,
    gpu_memory_utilization: float = 0.97,
) -> tuple[list[Case], list[list[Mapping[str, str]]]]:
    """One simulation case per measured deployment, and its measurement rows (replicas).

    The engine of a case is the row's engine preset with the row's launch arguments
    (``gpu_memory_utilization`` where the row records none), then ``engine_overrides``.
    """
    groups: dict[tuple, list[Mapping[str, str]]] = {}
    for row in rows:
        key = tuple(row[c] for c in _REQUIRED if c != "replica")
        key += tuple(row.get(c, "") for c in LAUNCH_COLUMNS)
        groups.setdefault(key, []).append(row)
    cases = []
    for members in groups.values():
        row = members[0]
        engine = {"name": row["engine"], "version": row["engine_version"]}
        engine.update(_launch_arguments(row, gpu_memory_utilization))
        engine.update(engine_overrides or {})
        plan = {
            k: (int(row[k]) if k in ("dp", "tp", "pp") else row[k])
            for k in ("dp", "tp", "pp", "weight_dtype", "kv_dtype")
        }
        cases.append(
            make_case(
                row["model"],
                row["gpu"],
                int(row["gpus"]),
                plan,
                load_trace(_trace_path(row)),
                engine,
                gpus_per_node=min(gpus_per_node, int(row["gpus"])),
            )
        )
    return cases, list(groups.values())


def run_validation(
    rows: Sequence[Mapping[str, str]],
    *,
    hw: HardwareParams | None = None,
    engine_overrides: Mapping[str, Any] | None = None,
    gpus_per_node: int = 8,
    gpu_memory_utilization: float = 0.97,
) -> dict[str, Any]:
    """Simulate every measured instance in one batched run and compare.

    Returns:
        ``{"rows": [...], "mape_pct": {metric: value}, "overheads": [...]}``; each row holds
        the case, its ``status`` and ``status_reason``, the measured and predicted value and
        the error in percent for every compared metric (NaN predictions for a run vLLM would
        not start, left out of ``mape_pct``); ``overheads`` names, per engine version, the per-iteration overhead
        used, its source and ``is_in_sample`` (the figure was chosen on the dev file, so
        predictions of that file are in-sample), and likewise its ``host_costs``
        (:class:`~apex_jax.engine_config.HostCosts`) and ``frontend_delay``.
    """
    cases, groups = measurement_cases(
        rows,
        engine_overrides=engine_overrides,
        gpus_per_node=gpus_per_node,
        gpu_memory_utilization=gpu_memory_utilization,
    )
    results, _ = evaluate_cases(cases, hw, per_replica=True)
    out_rows = []
    errors: dict[str, list[float]] = {m: [] for m in COMPARED}
    for members, result in zip(groups, results):
        for row in members:
            predicted = result["replicas"][int(row["replica"])]
            entry = {
                "trace": row.get("trace", row["served_trace"]),
                "dp": int(row["dp"]),
                "tp": int(row["tp"]),
                "pp": int(row["pp"]),
                "replica": int(row["replica"]),
                "status": predicted["status"],
                "status_reason": result["status_reason"],
            }
            for measured_key, predicted_key in COMPARED.items():
                measured = float(row[measured_key])
                value = float(predicted[predicted_key]) if entry["status"] == "OK" else math.nan
                err = 100.0 * (value - measured) / measured
                entry[f"{measured_key}_measured"] = measured
                entry[f"{measured_key}_predicted"] = value
                entry[f"{measured_key}_err_pct"] = err
                if math.isfinite(err):
                    errors[measured_key].append(abs(err))
            out_rows.append(entry)
    mape = {k: float(np.mean(v)) if v else float("nan") for k, v in errors.items()}
    overheads = {
        (c.deployment.engine.name, c.deployment.engine.version): c.deployment.engine for c in cases
    }
    return {
        "rows": out_rows,
        "mape_pct": mape,
        "overheads": [
            {
                "engine": name,
                "version": version,
                **engine.overhead_source()._asdict(),
                "host_costs": engine.host_costs()._asdict(),
                "frontend_delay": engine.frontend_source()._asdict(),
            }
            for (name, version), engine in overheads.items()
        ],
    }


def format_validation(report: Mapping[str, Any]) -> str:
    """A table of predicted vs measured per instance, then the MAPE per metric."""
    header = (
        f"{'trace':<22} {'plan':<12} {'rep':>3}  {'TTFT meas/pred (ms)':>21} {'err%':>6}"
        f"  {'TPOT meas/pred (ms)':>21} {'err%':>6}  {'E2E sum meas/pred (s)':>23}"
        f" {'err%':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in report["rows"]:
        plan = f"DP{r['dp']}·TP{r['tp']}·PP{r['pp']}"
        if r["status"] != "OK":
            lines.append(f"{r['trace']:<22} {plan:<12} {r['replica']:>3}  {r['status']}: ")
            lines[-1] += r["status_reason"]
            continue
        lines.append(
            f"{r['trace']:<22} {plan:<12} {r['replica']:>3}  "
            f"{r['ttft_mean_s_measured'] * 1e3:>10.1f}/{r['ttft_mean_s_predicted'] * 1e3:<10.1f}"
            f" {r['ttft_mean_s_err_pct']:>6.1f}  "
            f"{r['tpot_mean_s_measured'] * 1e3:>10.2f}/{r['tpot_mean_s_predicted'] * 1e3:<10.2f}"
            f" {r['tpot_mean_s_err_pct']:>6.1f}  "
            f"{r['latency_sum_s_measured']:>11.1f}/{r['latency_sum_s_predicted']:<11.1f}"
            f" {r['latency_sum_s_err_pct']:>6.1f}"
        )
    mape = report["mape_pct"]
    lines.append("")
    lines.append(
        "MAPE (mean absolute percentage error, %): "
        + ", ".join(f"{k} {v:.1f}" for k, v in mape.items())
    )
    for o in report["overheads"]:
        label = "IN-SAMPLE" if o["is_in_sample"] else "source"
        lines.append(
            f"per-iteration overhead of {o['engine']} {o['version']}: {o['seconds'] * 1e3:g} ms "
            f"({label}: {o['source']})"
        )
        host = o["host_costs"]
        lines.append(
            f"host costs of {o['engine']} {o['version']}: {host['s_per_seq'] * 1e3:g} ms per "
            f"sequence, eager launch {host['eager_s_per_layer'] * 1e3:g} ms per layer above "
            f"{host['max_graph_batch']} decoding sequences or with a prefill ({host['source']})"
        )
        delay = o["frontend_delay"]
        lines.append(
            f"frontend delay of {o['engine']} {o['version']}: {delay['seconds'] * 1e3:g} ms "
            f"({delay['source']})"
        )
    return "\n".join(lines)
