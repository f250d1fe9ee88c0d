"""Sweeps that resume, and the merged view of a finished sweep.

A search job writes its outputs atomically, then, last, a completion marker ``done.json``
holding a fingerprint of its whole config and its summary. A job that starts in a directory
whose marker has the same fingerprint returns the stored summary instead of running again,
so an interrupted ``apex-jax search -m ...`` rerun with the same command (its job
directories are named by their overrides, see ``conf/search.yaml``) skips the jobs that
finished and reruns the one that was cut off. A marker with another fingerprint (the config
changed) is ignored and overwritten.

``apex-jax sweep-summary DIR`` (:func:`sweep_summary`) merges the jobs under ``DIR`` into
``sweep_summary.csv`` (one row per job: its best plan, the heuristic, the speedup) and
``sweep_pareto.png`` (every job's Pareto front of latency against throughput or goodput).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from apex_jax.io import write_atomic
from apex_jax.objectives import GOODPUT, get_objective
from apex_jax.report import plot_sweep_pareto
from apex_jax.search import (
    PLAN_SEP,
    TABLE_WIDTH,
    factor_parts,
    format_cell,
    plan_room,
    table_lines,
    wrap_parts,
)

__all__ = [
    "MARKER",
    "config_fingerprint",
    "find_jobs",
    "format_sweep_table",
    "read_marker",
    "read_plans",
    "sweep_summary",
    "write_marker",
]

MARKER = "done.json"
# (column, header with unit, format) of the terminal table; the CSV has every column. The
# objective's two columns get its label, with its unit, when every job ranks by the same one.
_TABLE = (
    ("job", "job", "{}"),
    ("plan", "best plan", "{}"),
    ("best_value", "best", "{:.4g}"),
    ("heuristic_value", "heuristic", "{:.4g}"),
    ("speedup_vs_heuristic", "speedup (x)", "{:.2f}"),
    ("best_goodput_req_s", "goodput (req/s)", "{:.2f}"),
    ("num_ok", "OK plans", "{:d}"),
    ("wall_s", "wall (s)", "{:.1f}"),
)
# Hydra names a multirun job's directory by its overrides, joined by this.
_OVERRIDE_SEP = ","


def _version() -> str:
    try:
        return metadata.version("apex_jax")
    except metadata.PackageNotFoundError:
        return "unknown"


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """SHA-256 of the config as canonical JSON, with the package version."""
    text = json.dumps({"config": config, "version": _version()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def read_marker(out_dir: str | Path, fingerprint: str) -> dict[str, Any] | None:
    """The stored summary of a finished job with this fingerprint, or None.

    A marker whose listed output files are missing counts as absent.
    """
    path = Path(out_dir) / MARKER
    try:
        marker = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if marker.get("fingerprint") != fingerprint:
        return None
    if not all((Path(out_dir) / name).exists() for name in marker.get("files", [])):
        return None
    return marker["summary"]


def write_marker(
    out_dir: str | Path, fingerprint: str, summary: Mapping[str, Any], files: Sequence[str]
) -> None:
    """Mark a job finished; call after every output in ``files`` is written."""
    marker = {"fingerprint": fingerprint, "files": list(files), "summary": summary}
    write_atomic(Path(out_dir) / MARKER, json.dumps(marker, indent=2, ensure_ascii=False))


def find_jobs(root: str | Path) -> list[Path]:
    """Directories under ``root`` (itself included) holding a completion marker, sorted."""
    return sorted(p.parent for p in Path(root).rglob(MARKER))


def _number(text: str) -> Any:
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if text.lstrip("-").isdigit() else value


def read_plans(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``plans.csv``, numbers parsed (ints stay ints)."""
    with Path(path).open(newline="") as stream:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(stream)]


def _job_row(root: Path, job: Path, summary: Mapping[str, Any]) -> dict[str, Any]:
    config = summary.get("config") or {}
    cluster = config.get("cluster") or {}
    best = summary.get("best") or {}
    heuristic = summary.get("heuristic") or {}
    column = summary.get("objective_column", summary["objective"])
    label = job.relative_to(root).as_posix()
    return {
        "job": label if label != "." else job.name,
        "model": (config.get("model") or {}).get("name"),
        "hardware": (config.get("hardware") or {}).get("name"),
        "num_gpus": int(cluster.get("num_nodes", 1)) * int(cluster.get("gpus_per_node", 1)),
        "workload": (summary.get("workload") or {}).get("name"),
        "objective": summary["objective"],
        "best_plan": best.get("plan"),
        "best_value": best.get(column),
        "heuristic_plan": heuristic.get("plan"),
        "heuristic_value": heuristic.get(column),
        "speedup_vs_heuristic": summary.get("speedup_vs_heuristic"),
        "best_goodput_req_s": best.get(GOODPUT),
        "num_plans": summary.get("num_plans"),
        "num_ok": (summary.get("status_counts") or {}).get("OK", 0),
        "wall_s": (summary.get("timing_s") or {}).get("wall_s"),
    }


def format_sweep_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Fixed-width table of a sweep, one line per job, at most ``TABLE_WIDTH`` wide.

    The overrides every job shares and the plan parts every best plan shares are printed
    once above the table, so each row shows only what sets its job apart; a column no job
    has a value for is left out.
    """
    header = []
    jobs = [str(r["job"]) for r in rows]
    plans = [str(r["best_plan"]) for r in rows]
    # A single job's texts are all shared: they go above the table, whole.
    shared_overrides, jobs = (
        factor_parts(jobs, _OVERRIDE_SEP) if len(rows) > 1 else (jobs[0], ["-"])
    )
    shared_plan, plans = factor_parts(plans, PLAN_SEP) if len(rows) > 1 else (plans[0], ["-"])
    if shared_overrides:
        header += wrap_parts("every job: ", shared_overrides.split(_OVERRIDE_SEP), _OVERRIDE_SEP)
    if shared_plan:
        header += wrap_parts("every best plan: ", shared_plan.split(PLAN_SEP))
    table_rows = [{**r, "job": j, "plan": p} for r, j, p in zip(rows, jobs, plans)]
    columns = list(_TABLE)
    objectives = {str(r.get("objective")) for r in rows}
    if len(objectives) == 1:
        label = get_objective(objectives.pop()).label
        header.append(f"best, heuristic: {label} of the best plan and of the heuristic plan")
    else:
        columns.insert(2, ("objective", "objective", "{}"))
    columns = [
        c
        for c in columns
        if c[0] in ("job", "plan") or any(format_cell(r.get(c[0]), c[2]) != "-" for r in rows)
    ]
    lines = table_lines(table_rows, columns)
    if max(len(line) for line in lines) > TABLE_WIDTH:
        lines = table_lines(table_rows, columns, plan_width=plan_room(table_rows, columns))
    return "\n".join(header + lines)


def sweep_summary(root: str | Path, out_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Merge the finished jobs under ``root`` into one table and one Pareto plot.

    Writes ``sweep_summary.csv`` and ``sweep_pareto.png`` into ``out_dir`` (default
    ``root``).

    Returns:
        One row per finished job (see ``sweep_summary.csv``).

    Raises:
        FileNotFoundError: if ``root`` holds no finished job.
    """
    root = Path(root)
    jobs = find_jobs(root)
    if not jobs:
        raise FileNotFoundError(
            f"no finished search jobs under {root} (no {MARKER} files): pass the sweep's "
            "directory, e.g. multirun/search"
        )
    out_dir = Path(out_dir) if out_dir is not None else root
    rows, fronts = [], []
    for job in jobs:
        summary = json.loads((job / MARKER).read_text())["summary"]
        row = _job_row(root, job, summary)
        rows.append(row)
        if (job / "plans.csv").exists():
            fronts.append((row["job"], read_plans(job / "plans.csv")))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out_dir / "sweep_summary.csv", buffer.getvalue())
    has_goodput = any(
        isinstance(r.get(GOODPUT), float) and math.isfinite(r[GOODPUT])
        for _, plans in fronts
        for r in plans
    )
    xkey = GOODPUT if has_goodput else "throughput_out_tok_s"
    plot_sweep_pareto(
        fronts,
        out_dir / "sweep_pareto.png",
        xkey,
        "e2e_mean_s",
        f"Pareto fronts of {len(jobs)} jobs",
    )
    return rows
