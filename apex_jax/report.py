"""Figures and the Markdown report of a search, and the merged view of a sweep.

Every figure is a PNG drawn with matplotlib's object API (no global pyplot state) and written
atomically. ``apex-jax search`` calls :func:`write_report`; ``apex-jax sweep-summary DIR``
calls :func:`plot_sweep_pareto`.

Figures of a search:

- ``pareto_latency_throughput.png``: mean E2E latency against goodput (when computed) or
  output throughput; every OK plan, the Pareto front, the best plan and the heuristic.
- ``energy_vs_latency.png``: energy per output token against mean E2E latency, one colour
  and one Pareto front per GPU clock.
- ``latency_cdf.png``: CDFs of TTFT and TPOT of the best plan and of the heuristic, with the
  SLO targets.

``apex-jax validate`` calls :func:`plot_validation` (``validation.png``: predicted against
measured, per metric).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from apex_jax.io import write_atomic
from apex_jax.objectives import GOODPUT, OBJECTIVES, get_objective, pareto_mask
from apex_jax.search import format_cell

__all__ = [
    "FIGURES",
    "VALIDATION_FIGURE",
    "format_markdown_table",
    "plot_energy_latency",
    "plot_latency_cdfs",
    "plot_pareto_latency_throughput",
    "plot_sweep_pareto",
    "plot_validation",
    "request_latencies",
    "write_report",
]

FIGURES = ("pareto_latency_throughput.png", "energy_vs_latency.png", "latency_cdf.png")
VALIDATION_FIGURE = "validation.png"
_DPI = 120
_BEST_STYLE = {"marker": "*", "s": 220, "color": "tab:red", "edgecolor": "black", "zorder": 5}
_HEURISTIC_STYLE = {
    "marker": "D",
    "s": 80,
    "color": "tab:orange",
    "edgecolor": "black",
    "zorder": 5,
}


def _save(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    write_atomic(path, buffer.getvalue())


def _column(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.array([float(r.get(key, math.nan)) for r in rows], np.float64)


def _is_ok(r: Mapping[str, Any] | None) -> bool:
    return r is not None and r.get("status") == "OK"


def _use_log(values: np.ndarray) -> bool:
    finite = values[np.isfinite(values) & (values > 0)]
    return finite.size > 1 and finite.max() / finite.min() > 20


def _front_line(ax, x: np.ndarray, y: np.ndarray, mask: np.ndarray, **style) -> None:
    order = np.argsort(x[mask])
    ax.plot(x[mask][order], y[mask][order], "-o", markersize=4, **style)


def _mark_plans(ax, best, heuristic, xkey: str, ykey: str) -> None:
    if _is_ok(best):
        ax.scatter([best[xkey]], [best[ykey]], label="best plan (rank 1)", **_BEST_STYLE)
    if _is_ok(heuristic):
        ax.scatter([heuristic[xkey]], [heuristic[ykey]], label="heuristic plan", **_HEURISTIC_STYLE)


def plot_pareto_latency_throughput(
    ranked: Sequence[Mapping[str, Any]],
    heuristic: Mapping[str, Any] | None,
    path: str | Path,
    title: str,
) -> None:
    """Mean E2E latency against goodput (if the results have it) or output throughput."""
    ok = [r for r in ranked if _is_ok(r)]
    has_goodput = any(math.isfinite(float(r.get(GOODPUT, math.nan))) for r in ok)
    xkey = GOODPUT if has_goodput else "throughput_out_tok_s"
    ykey = "e2e_mean_s"
    x, y = _column(ok, xkey), _column(ok, ykey)
    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(x, y, s=12, color="0.65", label=f"plans ({len(ok)} OK)")
    front = pareto_mask(x, y, OBJECTIVES[xkey].sign, OBJECTIVES[ykey].sign)
    if front.any():
        _front_line(ax, x, y, front, color="tab:blue", label=f"Pareto front ({front.sum()} plans)")
    _mark_plans(ax, ok[0] if ok else None, heuristic, xkey, ykey)
    if _use_log(y):
        ax.set_yscale("log")
    ax.set_xlabel(OBJECTIVES[xkey].label)
    ax.set_ylabel(OBJECTIVES[ykey].label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    _save(fig, Path(path))


def plot_energy_latency(
    ranked: Sequence[Mapping[str, Any]],
    heuristic: Mapping[str, Any] | None,
    path: str | Path,
    title: str,
) -> None:
    """Energy per output token against mean E2E latency, one series per GPU clock."""
    ok = [r for r in ranked if _is_ok(r)]
    xkey, ykey = "e2e_mean_s", "energy_per_output_token_j"
    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    ax = fig.add_subplot()
    clocks = sorted({int(r["gpu_clock_mhz"]) for r in ok}, reverse=True)
    colors = ["tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:cyan"]
    for i, clock in enumerate(clocks):
        rows = [r for r in ok if int(r["gpu_clock_mhz"]) == clock]
        x, y = _column(rows, xkey), _column(rows, ykey)
        color = colors[i % len(colors)]
        ax.scatter(x, y, s=12, color=color, alpha=0.35, label=f"{clock} MHz ({len(rows)} plans)")
        front = pareto_mask(x, y, 1, 1)
        if front.any():
            _front_line(ax, x, y, front, color=color, label=f"{clock} MHz Pareto front")
    _mark_plans(ax, ok[0] if ok else None, heuristic, xkey, ykey)
    if _use_log(_column(ok, xkey)):
        ax.set_xscale("log")
    ax.set_xlabel(OBJECTIVES[xkey].label)
    ax.set_ylabel(OBJECTIVES[ykey].label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    _save(fig, Path(path))


def request_latencies(requests: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """TTFT ``[N]`` and TPOT ``[M]`` (requests with more than one output token), seconds,
    from request times (``arrival_s``, ``first_token_s``, ``finish_s``, ``output_tokens``)."""
    first = np.asarray(requests["first_token_s"])
    ttft = first - np.asarray(requests["arrival_s"])
    out = np.asarray(requests["output_tokens"])
    multi = out > 1
    tpot = (np.asarray(requests["finish_s"])[multi] - first[multi]) / (out[multi] - 1)
    return ttft, tpot


def plot_latency_cdfs(
    series: Mapping[str, Mapping[str, np.ndarray]],
    path: str | Path,
    title: str,
    slo: Mapping[str, float] | None = None,
) -> None:
    """CDFs of TTFT and TPOT, one line per named set of request times (e.g. best plan,
    heuristic; see :func:`request_latencies`)."""
    fig = Figure(figsize=(10.0, 4.2), layout="constrained")
    ax_ttft, ax_tpot = fig.subplots(1, 2)
    styles = [{"color": "tab:red"}, {"color": "tab:orange", "linestyle": "--"}]
    for (name, requests), style in zip(series.items(), styles):
        ttft, tpot = request_latencies(requests)
        for ax, values, scale in ((ax_ttft, ttft, 1.0), (ax_tpot, tpot, 1e3)):
            v = np.sort(values[np.isfinite(values)]) * scale
            ax.plot(v, np.arange(1, v.size + 1) / max(v.size, 1), label=name, **style)
    for ax, key, scale, label in (
        (ax_ttft, "ttft_s", 1.0, "TTFT (s)"),
        (ax_tpot, "tpot_s", 1e3, "TPOT (ms)"),
    ):
        target = (slo or {}).get(key)
        if target is not None and math.isfinite(target):
            ax.axvline(target * scale, color="black", linestyle=":", label="SLO target")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=9)
    if any(_use_log(request_latencies(r)[0]) for r in series.values()):
        ax_ttft.set_xscale("log")
    fig.suptitle(title)
    _save(fig, Path(path))


def plot_sweep_pareto(
    jobs: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
    path: str | Path,
    xkey: str,
    ykey: str,
    title: str,
) -> None:
    """The Pareto front of every job of a sweep on one axis pair, one line per job."""
    fig = Figure(figsize=(8.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    cmap = [f"C{i}" for i in range(10)]
    all_y = []
    for i, (label, rows) in enumerate(jobs):
        ok = [r for r in rows if _is_ok(r)]
        x, y = _column(ok, xkey), _column(ok, ykey)
        front = pareto_mask(x, y, OBJECTIVES[xkey].sign, OBJECTIVES[ykey].sign)
        if front.any():
            _front_line(ax, x, y, front, color=cmap[i % 10], label=label)
            all_y.append(y[front])
    if all_y and _use_log(np.concatenate(all_y)):
        ax.set_yscale("log")
    ax.set_xlabel(OBJECTIVES[xkey].label)
    ax.set_ylabel(OBJECTIVES[ykey].label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    # Many jobs: the legend goes below the axes instead of over the data.
    if len(jobs) > 6:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize=8, ncol=2)
    else:
        ax.legend(loc="best", fontsize=9)
    _save(fig, Path(path))


# Names of validated metrics on the plot (the values are in seconds, as in the reports).
_METRIC_NAMES = {
    "ttft_mean_s": "TTFT mean",
    "tpot_mean_s": "TPOT mean",
    "latency_sum_s": "latency sum",
}
# The band drawn around parity: predictions within it are off by at most this fraction.
_BAND = 0.2


def _validation_group(row: Mapping[str, Any]) -> str:
    """A validation row's model (with its precision when given) or trace."""
    if "model" in row:
        return " ".join(str(row[k]) for k in ("model", "precision") if k in row)
    return str(row.get("trace", "?"))


def plot_validation(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str) -> None:
    """Predicted against measured for every metric the rows hold (``<metric>_measured`` and
    ``<metric>_predicted``), log-log, one colour per model and precision (or trace), with parity and a
    ±20% band; rows without a finite prediction are left out."""
    metrics = [k[: -len("_measured")] for k in rows[0] if k.endswith("_measured")] if rows else []
    fig = Figure(figsize=(4.6 * max(len(metrics), 1), 4.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(len(metrics), 1)))
    groups = sorted({_validation_group(r) for r in rows})
    for ax, metric in zip(axes, metrics):
        values = []
        for i, group in enumerate(groups):
            members = [r for r in rows if _validation_group(r) == group]
            x = _column(members, f"{metric}_measured")
            y = _column(members, f"{metric}_predicted")
            shown = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
            ax.scatter(x[shown], y[shown], s=14, color=f"C{i % 10}", label=group, alpha=0.8)
            values += [x[shown], y[shown]]
        joined = np.concatenate(values) if values else np.zeros(0)
        if joined.size:
            line = np.geomspace(joined.min() / 1.2, joined.max() * 1.2, 50)
            ax.plot(line, line, color="black", linewidth=1, label="parity")
            ax.fill_between(
                line,
                line * (1 - _BAND),
                line * (1 + _BAND),
                color="grey",
                alpha=0.2,
                label=f"±{_BAND:.0%}",
            )
            ax.set_xscale("log")
            ax.set_yscale("log")
            # Labels at 1, 2 and 5 per decade: a narrow range still gets some, and minor
            # labels (which matplotlib adds to a narrow range) no longer print over them.
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
                axis.set_minor_formatter(NullFormatter())
        name = _METRIC_NAMES.get(metric, metric)
        ax.set_xlabel(f"measured {name} (s)")
        ax.set_ylabel(f"predicted {name} (s)")
        ax.grid(True, alpha=0.3, which="both")
    if rows:
        axes[0].legend(loc="upper left", fontsize=7)
    fig.suptitle(title)
    _save(fig, Path(path))


# --------------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------------

# (key, header with unit, format) as search.format_cell takes them.
_REPORT_COLUMNS = (
    ("rank", "rank", "{:d}"),
    ("plan", "plan", "{}"),
    ("num_gpus", "GPUs", "{:d}"),
    ("ttft_p99_s", "TTFT p99 (ms)", "ms"),
    ("tpot_mean_s", "TPOT mean (ms)", "ms"),
    ("e2e_mean_s", "E2E mean (s)", "{:.2f}"),
    ("throughput_out_tok_s", "out tok/s", "{:.1f}"),
    ("energy_per_output_token_j", "J/tok", "{:.2f}"),
    ("slo_attainment", "SLO met (%)", "pct"),
    (GOODPUT, "goodput (req/s)", "{:.2f}"),
    ("cost_per_mtok_usd", "USD/Mtok", "{:.2f}"),
    ("mfu", "MFU (%)", "pct"),
    ("mbu", "MBU (%)", "pct"),
)


def format_markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]] = _REPORT_COLUMNS
) -> str:
    """A Markdown table of ``rows``; columns no row has a value for are left out."""
    shown = [c for c in columns if any(format_cell(r.get(c[0]), c[2]) != "-" for r in rows)]
    lines = [
        "| " + " | ".join(h for _, h, _ in shown) + " |",
        "|" + "|".join(" --- " for _ in shown) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(format_cell(r.get(k), f, r, k) for k, _, f in shown) + " |")
    return "\n".join(lines)


def _per_clock_optima(ok: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for clock in sorted({int(r["gpu_clock_mhz"]) for r in ok}, reverse=True):
        at_clock = [r for r in ok if int(r["gpu_clock_mhz"]) == clock]
        for what, key in (
            ("latency-optimal", "e2e_mean_s"),
            ("energy-optimal", "energy_per_output_token_j"),
        ):
            best = min(at_clock, key=lambda r: float(r[key]))
            rows.append({"which": f"{clock} MHz, {what}", **best})
    return rows


def write_report(
    out_dir: str | Path,
    summary: Mapping[str, Any],
    ranked: Sequence[Mapping[str, Any]],
    heuristic: Mapping[str, Any] | None,
    latency_cdf: Mapping[str, Any] | None = None,
    *,
    top_k: int = 10,
    command: str = "apex-jax search",
) -> list[str]:
    """Draw the search's figures and write ``report.md`` into ``out_dir``.

    ``latency_cdf`` is :class:`~apex_jax.search.SearchResult`'s: request times of the best
    plan and the heuristic (no CDF figure without it).

    Returns:
        The file names written, figures first.
    """
    out_dir = Path(out_dir)
    config = summary.get("config") or {}
    objective = summary["objective"]
    obj = get_objective(objective)
    ok = [r for r in ranked if _is_ok(r)]
    best = ok[0] if ok else None
    model = (config.get("model") or {}).get("name", "?")
    gpu = (config.get("hardware") or {}).get("name", "?")
    cluster = config.get("cluster") or {}
    num_gpus = int(cluster.get("num_nodes", 1)) * int(cluster.get("gpus_per_node", 1))
    workload = summary.get("workload") or {}
    setup = f"{model} on {num_gpus} x {gpu}, {workload.get('name', '?')}"
    slo = summary.get("slo")
    written = []
    if ok:
        plot_pareto_latency_throughput(ranked, heuristic, out_dir / FIGURES[0], setup)
        plot_energy_latency(ranked, heuristic, out_dir / FIGURES[1], setup)
        written += list(FIGURES[:2])
        if latency_cdf:
            rate = latency_cdf["rate_req_s"]
            at = f" at {rate:.3g} req/s" if rate else ""
            plot_latency_cdfs(latency_cdf["series"], out_dir / FIGURES[2], setup + at, slo)
            written.append(FIGURES[2])

    lines = [f"# Plan search: {setup}", ""]
    lines.append(f"Produced by `{command}`; every plan and metric is in `plans.csv`.")
    lines.append("")
    lines.append(
        f"- Objective: `{objective}` ({obj.label}, {'lower' if obj.sign > 0 else 'higher'} is better)"
    )
    if slo:
        lines.append(
            f"- SLO: TTFT <= {slo['ttft_s']:g} s and TPOT <= {slo['tpot_s'] * 1e3:g} ms for at "
            f"least {slo['attainment'] * 100:g}% of requests"
        )
    goodput = summary.get("goodput")
    if goodput:
        lines.append(
            f"- Goodput: highest arrival rate meeting the SLO attainment target, by bisection "
            f"over the trace's rate ({goodput['trace_rate_req_s']:.3g} req/s) to within "
            f"{goodput['rel_tol'] * 100:g}%: {goodput['num_rounds']} batched rounds, "
            f"{goodput['num_evaluations']} plan evaluations"
        )
        lines.append(
            "- In the tables below every column but goodput (latencies, SLO met, throughput, "
            f"energy, cost) is the plan's at the trace's own rate "
            f"({goodput['trace_rate_req_s']:.3g} req/s), not at its goodput"
        )
        if goodput["num_lower_bounds"]:
            lines.append(
                f"- {goodput['num_lower_bounds']} plans met the SLOs at every rate this trace "
                f"({workload.get('num_requests')} requests) can test, so their goodput, shown "
                "as `>=`, is a lower bound: past it more than "
                f"{goodput['max_in_flight_fraction'] * 100:g}% of the trace would be in flight "
                "at once (Little's law) and the replay would be one burst, not a steady rate. "
                "A longer trace (e.g. `workload=lmsys_long`) tests higher rates."
            )
    counts = summary.get("status_counts", {})
    lines.append(f"- Plans: {summary.get('num_plans')} ({counts.get('OK', 0)} OK; {counts})")
    timing = summary.get("timing_s", {})
    lines.append(f"- Wall time: {timing.get('wall_s', math.nan):.1f} s")
    lines.append("")
    lines.append("## Best plan vs the heuristic")
    lines.append("")
    if best is None:
        lines.append("No plan ran to completion.")
    else:
        lines.append(f"Best plan: **{best['plan']}**.")
        if heuristic is None:
            lines.append("")
            lines.append(
                "The heuristic plan (TP within a node, PP across nodes) is not valid here."
            )
        elif not _is_ok(heuristic):
            lines.append("")
            lines.append(
                f"The heuristic plan ({heuristic['plan']}) fails here with status "
                f"{heuristic['status']}."
            )
        else:
            speedup = summary.get("speedup_vs_heuristic")
            lines.append(
                f"Heuristic plan (TP within a node, PP across nodes): {heuristic['plan']}."
            )
            if speedup is not None:
                lines.append("")
                lines.append(
                    f"The best plan is **{speedup:.2f}x** better than the heuristic on "
                    f"{obj.label} ({format_cell(best.get(obj.column), '{:.4g}', best, obj.column)} vs "
                    f"{format_cell(heuristic.get(obj.column), '{:.4g}', heuristic, obj.column)})."
                )
        lines.append("")
        lines.append(format_markdown_table([best] + ([heuristic] if heuristic else [])))
    lines.append("")
    lines.append(f"## Top {min(top_k, len(ranked))} plans")
    lines.append("")
    lines.append(format_markdown_table(ranked[:top_k]))
    if len({int(r["gpu_clock_mhz"]) for r in ok}) > 1:
        lines.append("")
        lines.append("## Latency-optimal vs energy-optimal plan per GPU clock")
        lines.append("")
        columns = (("which", "clock, plan", "{}"),) + _REPORT_COLUMNS[1:]
        lines.append(format_markdown_table(_per_clock_optima(ok), columns))
    if written:
        lines.append("")
        lines.append("## Figures")
        for name in written:
            lines.append("")
            lines.append(f"![{name}]({name})")
    write_atomic(out_dir / "report.md", "\n".join(lines) + "\n")
    return written + ["report.md"]
