"""Scaling figure of the plan search: search time against model size and against GPUs.

    python scripts/scaling.py                                   # docs/scaling.png, .csv
    python scripts/scaling.py --models Llama-2-7b meta-llama/Llama-3.1-405B --gpus 8 16

Each point is one :func:`apex_jax.search.run_search` in a fresh process (so each pays its own
cost building and engine compile, as ``apex-jax search`` does), timed around the search alone
(imports excluded): wall time and the process's CPU time over every thread. The plan space is
``parallel_only`` (DP x TP x PP, engine defaults) and the workload the first ``--requests``
requests of the lmsys trace, so the whole figure takes a few minutes on 2 cores.

- Model axis: each of ``--models`` (default: 7B, 70B, 405B and the catalog's largest model)
  on ``--model-gpus`` GPUs.
- GPU axis: ``--gpu-model`` on each of ``--gpus`` (default: every ``conf/cluster`` size from
  8 GPUs up), nodes of up to 8 GPUs.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from apex_jax.cli import use_every_core
from apex_jax.deployment import make_deployment, resolve_model
from apex_jax.io import write_atomic
from apex_jax.model_spec import MODEL_CATALOG
from apex_jax.paths import config_option, config_options
from apex_jax.plan_space import load_plan_space
from apex_jax.search import run_search
from apex_jax.status import OK, STATUS_NAMES
from apex_jax.workload import load_trace

__all__ = ["main"]

TRACE = "llama/lmsys_05.csv"
PLAN_SPACE = "parallel_only"
HARDWARE = "H100-SXM-80GB"
MIN_GPUS = 8
FIELDS = (
    "axis",
    "model",
    "num_params_b",
    "num_gpus",
    "gpus_per_node",
    "num_plans",
    "num_plans_ok",
    "wall_s",
    "cpu_s",
    "cost_s",
    "compile_s",
    "run_s",
)


def _default_models() -> list[str]:
    """7B, 70B and 405B Llama, and the catalog's largest model when it is larger."""
    models = ["meta-llama/Llama-2-7b-hf", "meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-405B"]
    largest = max(MODEL_CATALOG, key=lambda name: MODEL_CATALOG[name].num_params)
    return models if largest in models else [*models, largest]


def _cluster_gpus() -> list[tuple[int, int]]:
    """``(num_gpus, gpus_per_node)`` of every ``conf/cluster`` option with >= 8 GPUs, sorted."""
    sizes = set()
    for name in config_options("cluster"):
        c = config_option("cluster", name) or {}
        num_gpus = int(c["num_nodes"]) * int(c["gpus_per_node"])
        if num_gpus >= MIN_GPUS:
            sizes.add((num_gpus, int(c["gpus_per_node"])))
    return sorted(sizes)


def _one_point(model: str, num_gpus: int, gpus_per_node: int, num_requests: int) -> dict:
    """One timed search in this process (call in a fresh one)."""
    use_every_core()  # before JAX starts its backend
    deployment = make_deployment(model, HARDWARE, num_gpus, gpus_per_node=gpus_per_node)
    workload = load_trace(TRACE).head(num_requests)
    space = load_plan_space(PLAN_SPACE, deployment.engine.plan_knobs())
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    result = run_search(deployment, workload, space)
    wall_s, cpu_s = time.perf_counter() - wall_start, time.process_time() - cpu_start
    stats = result["stats"]
    return {
        "num_params_b": round(deployment.model.num_params / 1e9, 1),
        "num_plans": result["num_plans"],
        "num_plans_ok": sum(1 for r in result["ranked"] if r["status"] == STATUS_NAMES[OK]),
        "wall_s": round(wall_s, 2),
        "cpu_s": round(cpu_s, 2),
        "cost_s": round(stats.cost_s, 2),
        "compile_s": round(stats.compile_s, 2),
        "run_s": round(stats.run_s, 2),
    }


def _measure(model: str, num_gpus: int, gpus_per_node: int, num_requests: int) -> dict:
    point = [model, str(num_gpus), str(gpus_per_node), str(num_requests)]
    out = subprocess.run(
        [sys.executable, __file__, "--point", *point], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"scaling point {point} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _plot(rows: list[dict], num_requests: int, path: Path) -> None:
    fig = Figure(figsize=(11, 4.4))
    axes = fig.subplots(1, 2)
    panels = (
        ("model", "num_params_b", "model size (billion parameters)", axes[0]),
        ("gpus", "num_gpus", "GPUs (H100, nodes of 8)", axes[1]),
    )
    for axis, x_key, x_label, ax in panels:
        mine = [r for r in rows if r["axis"] == axis]
        if not mine:
            continue
        x = np.array([r[x_key] for r in mine], float)
        for key, label, marker in (("wall_s", "wall time", "o"), ("cpu_s", "CPU time", "s")):
            ax.plot(x, [r[key] for r in mine], marker=marker, label=label)
        # Points of nearly the same size (a 1T dense and a 1T MoE model) would print their
        # labels and ticks on top of each other: the second of a close pair is labelled
        # below its point, and only ticks at least 15% apart are kept.
        is_close = np.r_[False, x[1:] < 1.15 * x[:-1]]
        for r, xi, close in zip(mine, x, is_close):
            name = r["model"].split("/")[-1] if axis == "model" else ""
            ax.annotate(
                f"{name} {r['num_plans']} plans".strip(),
                (xi, r["wall_s"]),
                textcoords="offset points",
                xytext=(0, -14 if close else 6),
                ha="center",
                fontsize=7,
            )
        ax.set_xscale("log", base=2 if axis == "gpus" else 10)
        ticks = x[~is_close]
        ax.set_xticks(ticks, [f"{v:g}" for v in ticks], minor=False)
        ax.minorticks_off()
        ax.set_xlabel(x_label)
        ax.set_ylabel("search time (s)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    gpus = sorted({r["num_gpus"] for r in rows if r["axis"] == "model"})
    models = sorted({r["model"] for r in rows if r["axis"] == "gpus"})
    axes[0].set_title(f"on {', '.join(map(str, gpus))} GPUs", fontsize=9)
    axes[1].set_title(", ".join(models), fontsize=9)
    fig.suptitle(
        f"apex_jax search time (compile included), plan_space={PLAN_SPACE}, "
        f"first {num_requests} lmsys requests, 2-core shared CPU",
        fontsize=10,
    )
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_atomic(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--model-gpus", type=int, default=32)
    parser.add_argument("--gpu-model", default="meta-llama/Llama-3.1-70B")
    parser.add_argument("--gpus", nargs="*", type=int, default=None, help="none: no GPU axis")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("docs/scaling.png"))
    parser.add_argument("--point", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point:
        model, num_gpus, per_node, num_requests = args.point
        print(json.dumps(_one_point(model, int(num_gpus), int(per_node), int(num_requests))))
        return

    models = args.models or _default_models()
    for model in models:
        resolve_model(model)  # a one-line error for an unknown name before any point runs
    gpus = _cluster_gpus() if args.gpus is None else [(n, min(n, 8)) for n in args.gpus]
    points = [("model", m, args.model_gpus, min(args.model_gpus, 8)) for m in models]
    points += [("gpus", args.gpu_model, n, per_node) for n, per_node in gpus]
    rows = []
    for axis, model, num_gpus, per_node in points:
        row = {"axis": axis, "model": model, "num_gpus": num_gpus, "gpus_per_node": per_node}
        row.update(_measure(model, num_gpus, per_node, args.requests))
        print(json.dumps(row), flush=True)
        rows.append(row)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(args.out.with_suffix(".csv"), text.getvalue())
    _plot(rows, args.requests, args.out)


if __name__ == "__main__":
    sys.exit(main())
