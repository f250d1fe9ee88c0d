"""Your own measured serving runs: the CSV schema, its checks, and the cases it describes.

One row per measured benchmark run (every replica of a data-parallel plan together). Columns:

======================  ========  ===========================================================
column                  required  meaning
======================  ========  ===========================================================
model                   yes       catalog name or alias, or a path to a HF ``config.json``
gpu                     yes       GPU name (``H100-SXM-80GB``, ``h100``, ...)
num_gpus                yes       GPUs of the run (``dp * tp * pp`` of them are used)
dp, tp, pp              yes       the plan's data, tensor and pipeline parallel degrees
weight_dtype, kv_dtype  no        ``bf16`` (default), ``fp8``, ...
attn_tp, mlp_tp, ep     no        cell layout inside a stage of ``tp`` GPUs
                                  (:mod:`apex_jax.plans`): GPUs per attention replica and
                                  per FFN replica (default ``tp``), expert-parallel ranks
                                  (default 1)
max_num_seqs,           no        the engine's limits for the whole stage (default: the
max_num_batched_tokens            preset's)
engine, engine_version  yes       a preset of :mod:`apex_jax.engine_config` (``vllm``,
                                  ``0.6.0``)
workload                yes       ``closed_loop``, ``poisson`` or ``trace``
concurrency             closed    clients of a closed-loop benchmark
isl, osl                closed,   prompt and output tokens per request
                        poisson
num_requests            closed,   requests of the run
                        poisson
num_prompts             no        closed loop: distinct prompts the requests draw from in
                                  turn, so repeats may hit the prefix cache (a benchmark
                                  tool's prompt pool, e.g. aiperf's ``--num-dataset-entries``);
                                  blank or 0: every prompt distinct
num_warmup_requests     no        closed loop: requests of a warm-up before the measured ones,
                                  in none of the figures (genai-perf's and aiperf's
                                  ``--warmup-request-count``); blank or 0: none
range_ratio             no        closed loop: lengths drawn from ``[int(r isl), isl]`` and
                                  ``[int(r osl), osl]`` as InferenceX's load generator's
                                  ``--random-range-ratio`` (:func:`apex_jax.workload.closed_loop`;
                                  not ``vllm bench serve``'s rule); blank or 1: fixed lengths
rate_per_s, seed        poisson   arrival rate (req/s); seed (default 0; closed loop: of the
                                  drawn lengths)
trace_path, time_unit   trace     a request trace (relative to the CSV's folder, or bundled);
                                  its time unit (optional, see :func:`apex_jax.workload.load_trace`)
ttft_mean_s             yes       measured mean time to first token, seconds
tpot_mean_s             yes       measured mean time per output token after the first, seconds
======================  ========  ===========================================================

Every problem is reported as one line naming the file, the line and the column: a missing
column, an unknown engine version, a value that is not a number, or a plan that leaves no room
for the KV cache.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from apex_jax.deployment import Case, make_case
from apex_jax.evaluate import oom_message

__all__ = [
    "MEASURED_COLUMNS",
    "REQUIRED_COLUMNS",
    "MeasuredRuns",
    "load_measured_runs",
    "run_cases",
]

REQUIRED_COLUMNS: tuple[str, ...] = (
    "model",
    "gpu",
    "num_gpus",
    "dp",
    "tp",
    "pp",
    "engine",
    "engine_version",
    "workload",
    "ttft_mean_s",
    "tpot_mean_s",
)
MEASURED_COLUMNS: tuple[str, ...] = ("ttft_mean_s", "tpot_mean_s")

# workload kind -> (required columns, optional columns) besides the common ones
_WORKLOAD_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "closed_loop": (
        ("concurrency", "isl", "osl", "num_requests"),
        ("num_prompts", "num_warmup_requests", "range_ratio", "seed"),
    ),
    "poisson": (("rate_per_s", "isl", "osl", "num_requests"), ("seed",)),
    "trace": (("trace_path",), ("time_unit",)),
}


class MeasuredRuns(NamedTuple):
    """A checked measured-runs file."""

    cases: list[Case]  # [R] one simulation case per row
    measured: list[dict[str, float]]  # [R] ttft_mean_s, tpot_mean_s of each row
    rows: list[dict[str, str]]  # [R] the rows as read


_INT_COLUMNS = (
    "num_gpus",
    "dp",
    "tp",
    "pp",
    "concurrency",
    "isl",
    "osl",
    "num_requests",
    "num_prompts",
    "num_warmup_requests",
    "seed",
)
# Optional integer plan columns; a blank one keeps the classic plan's or the preset's value.
_OPTIONAL_PLAN_COLUMNS = ("attn_tp", "mlp_tp", "ep", "max_num_seqs", "max_num_batched_tokens")


def _blank(value: Any) -> bool:
    return value is None or str(value).strip() == ""


def _workload_spec(row: Mapping[str, Any], where: str, folder: Path) -> dict[str, Any]:
    kind = str(row["workload"]).strip()
    if kind not in _WORKLOAD_COLUMNS:
        raise ValueError(
            f"{where}: unknown workload {kind!r}; use one of {', '.join(_WORKLOAD_COLUMNS)}"
        )
    required, optional = _WORKLOAD_COLUMNS[kind]
    missing = [c for c in required if _blank(row.get(c))]
    if missing:
        raise ValueError(f"{where}: workload {kind} needs column(s) {', '.join(missing)}")
    spec: dict[str, Any] = {"kind": kind}
    for column in required + optional:
        if _blank(row.get(column)):
            continue
        value = row[column]
        if column == "trace_path":
            local = folder / str(value)
            spec["path"] = str(local) if local.exists() else str(value)
        elif column in _INT_COLUMNS:
            spec[column] = _number(row, column, where, integer=True)
        elif column == "rate_per_s":
            spec[column] = _number(row, column, where)
        elif column == "range_ratio":
            # 0 is a valid ratio; closed_loop checks the range.
            spec[column] = _number(row, column, where, positive=False)
        else:
            spec[column] = str(value)
    return spec


def _number(
    row: Mapping[str, Any], column: str, where: str, *, integer: bool = False, positive: bool = True
):
    text = str(row[column]).strip()
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: column {column} is not a number ({text!r})") from None
    if integer:
        if not value.is_integer():
            raise ValueError(f"{where}: column {column} must be a whole number ({text!r})")
        return int(value)
    if positive and (not math.isfinite(value) or value <= 0):
        raise ValueError(f"{where}: column {column} must be a positive number ({text!r})")
    return value


def run_cases(
    rows: Sequence[Mapping[str, Any]],
    *,
    source: str = "measurements",
    folder: str | Path = ".",
    gpus_per_node: int = 8,
) -> tuple[list[Case], list[dict[str, float]]]:
    """The simulation case and the measured metrics of every row (see the module docstring).

    Args:
        rows: one mapping per measured run, with the schema's columns.
        source: what the rows came from, for error messages (a file name).
        folder: where relative ``trace_path`` values are looked up first.
        gpus_per_node: GPUs per node of the measured cluster (capped at ``num_gpus``).

    Returns:
        ``(cases, measured)``; ``measured[i]`` holds ``ttft_mean_s`` and ``tpot_mean_s``.

    Raises:
        ValueError: one line naming the row and the problem.
    """
    if not rows:
        raise ValueError(f"{source}: no measured runs")
    missing = [c for c in REQUIRED_COLUMNS if c not in rows[0]]
    if missing:
        raise ValueError(
            f"{source}: missing column(s) {', '.join(missing)}; required: "
            f"{', '.join(REQUIRED_COLUMNS)} (see apex_jax.measured_runs)"
        )
    cases, measured = [], []
    for i, row in enumerate(rows):
        # Line 1 of a CSV is its header, so row i is on line i + 2.
        where = f"{source} line {i + 2}"
        blank = [c for c in REQUIRED_COLUMNS if _blank(row.get(c))]
        if blank:
            raise ValueError(f"{where}: empty column(s) {', '.join(blank)}")
        num_gpus = _number(row, "num_gpus", where, integer=True)
        plan: dict[str, Any] = {
            c: _number(row, c, where, integer=True)
            for c in ("dp", "tp", "pp", *_OPTIONAL_PLAN_COLUMNS)
            if c in REQUIRED_COLUMNS or not _blank(row.get(c))
        }
        for column in ("weight_dtype", "kv_dtype"):
            if not _blank(row.get(column)):
                plan[column] = str(row[column]).strip()
        engine = {"name": str(row["engine"]).strip(), "version": str(row["engine_version"]).strip()}
        try:
            case = make_case(
                str(row["model"]).strip(),
                str(row["gpu"]).strip(),
                num_gpus,
                plan,
                _workload_spec(row, where, Path(folder)),
                engine,
                gpus_per_node=max(1, min(gpus_per_node, num_gpus)),
            )
        except (ValueError, FileNotFoundError) as err:
            message = str(err)
            raise ValueError(
                message if message.startswith(where) else f"{where}: {message}"
            ) from None
        problem = oom_message(case)
        if problem:
            raise ValueError(f"{where}: {problem}")
        cases.append(case)
        measured.append({c: _number(row, c, where) for c in MEASURED_COLUMNS})
    return cases, measured


def load_measured_runs(path: str | Path, **kwargs) -> MeasuredRuns:
    """Read and check a measured-runs CSV (``kwargs`` as for :func:`run_cases`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"measured-runs file {path} not found")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    cases, measured = run_cases(rows, source=str(path), folder=path.parent, **kwargs)
    return MeasuredRuns(cases, measured, rows)
