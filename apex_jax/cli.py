"""Command line: ``apex-jax <command> [hydra overrides]``.

Each command is a Hydra app whose config is ``conf/<command>.yaml``. The Hydra function only
converts its config to a plain dict and calls a ``*_from_config`` function, which is what the
tests call directly: a ``DictConfig`` never reaches numeric code.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from tqdm import tqdm

from apex_jax import fit_kernels
from apex_jax.api import make_slo, simulate
from apex_jax.deployment import make_deployment
from apex_jax.fit_serving import calibrate_serving_from_config
from apex_jax.hardware import load_hardware_params
from apex_jax.io import json_text, jsonable, write_atomic, write_json
from apex_jax.model_spec import ModelSpec, load_model
from apex_jax.objectives import GOODPUT, GoodputSettings, get_objective
from apex_jax.paths import config_dir
from apex_jax.plan_space import build_plan_set, space_from_dict
from apex_jax.report import write_report
from apex_jax.search import format_table, results_csv, run_search, summary_dict
from apex_jax.sweep import (
    config_fingerprint,
    format_sweep_table,
    read_marker,
    read_plans,
    sweep_summary,
    write_marker,
)
from apex_jax.validate import format_validation, load_measurements, run_validation
from apex_jax.workload import workload_from_dict

__all__ = [
    "calibrate_from_config",
    "main",
    "plan_space_from_config",
    "search_from_config",
    "simulate_from_config",
    "sweep_summary_main",
    "use_every_core",
    "validate_from_config",
]

_log = logging.getLogger(__name__)


def _deployment_args(config: Mapping[str, Any]) -> dict[str, Any]:
    cluster = config["cluster"]
    num_nodes, per_node = int(cluster["num_nodes"]), int(cluster["gpus_per_node"])
    if num_nodes < 1 or per_node < 1:
        raise ValueError(
            f"cluster needs num_nodes >= 1 and gpus_per_node >= 1 (got {num_nodes} x {per_node})"
        )
    engine = {k: v for k, v in dict(config["engine"]).items() if v is not None}
    return {
        "model": _model_from_config(config["model"]),
        "hardware": dict(config["hardware"]),
        "num_gpus": num_nodes * per_node,
        "gpus_per_node": per_node,
        "engine": engine,
    }


def _model_from_config(model: Mapping[str, Any]):
    """The model's name, or its spec with the config's overrides (``moe_routing_skew``, ...)."""
    overrides = {k: v for k, v in model.items() if k != "name" and v is not None}
    if not overrides:
        return str(model["name"])
    fields = {f.name for f in dataclasses.fields(ModelSpec)} - {"name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown model keys {unknown}: the model group takes 'name' and ModelSpec fields "
            f"({', '.join(sorted(fields))})"
        )
    return dataclasses.replace(load_model(str(model["name"])), **overrides)


def plan_space_from_config(space: Mapping[str, Any], engine_knobs: Mapping[str, Any]):
    """Build a :class:`~apex_jax.plans.PlanSpace` (see :func:`apex_jax.plan_space.space_from_dict`):
    null parallel and cell axes mean every valid value, null engine axes the engine's value."""
    return space_from_dict(space, engine_knobs)


def _hardware_params(config: Mapping[str, Any]):
    """Calibrated constants named by ``calibration`` (a bundled name or a JSON path), or the
    datasheet defaults when it is null."""
    name = config.get("calibration")
    if not name:
        return None
    return load_hardware_params(str(name))


class _Progress:
    """A progress bar with ETA over simulated replicas, on stderr (tqdm)."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            # disable=None: a bar on a terminal, silence in logs and CI.
            self.bar = tqdm(
                total=total, unit="replica", desc="simulating", file=sys.stderr, disable=None
            )
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# Top-level keys of the search config: anything else is a typo (``+objectve=...``) or an
# experiment meant for another command, and is refused rather than silently ignored.
_SEARCH_KEYS = frozenset(
    {
        "model",
        "hardware",
        "cluster",
        "workload",
        "engine",
        "plan_space",
        "slo",
        "prices",
        "objective",
        "top_k",
        "target_rate_req_s",
        "goodput",
        "report",
        "calibration",
        "plan_space_summary",
    }
)


def _search_settings(config: Mapping[str, Any], gpu_name: str) -> dict[str, Any]:
    """The keyword arguments of :func:`~apex_jax.search.run_search` that come from the
    config's objective, SLO, target rate, goodput and price settings."""

    unknown = sorted(set(config) - _SEARCH_KEYS)
    if unknown:
        raise ValueError(
            f"unknown search config keys {unknown}: use {', '.join(sorted(_SEARCH_KEYS))}"
        )
    objective = str(config["objective"])
    goodput = dict(config.get("goodput") or {})
    enabled = bool(goodput.pop("enabled", False)) or objective == GOODPUT
    prices = (config.get("prices") or {}).get("usd_per_gpu_hour") or {}
    target = config.get("target_rate_req_s")
    return {
        "objective": objective,
        "slo": make_slo(config.get("slo")),
        "target_rate_req_s": float(target) if target else None,
        "goodput": GoodputSettings(**goodput) if enabled else None,
        "gpu_price_usd_per_hour": (
            float(prices[gpu_name]) if prices.get(gpu_name) is not None else None
        ),
    }


def search_from_config(config: Mapping[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Run a plan search from a plain config dict; write ``plans.csv``, ``summary.json``,
    the figures and ``report.md`` (``report: true``), then the completion marker.

    A directory whose completion marker matches the config (:mod:`apex_jax.sweep`) is a job
    that finished before: its stored summary is returned without simulating again.

    Returns:
        The summary dict (also written to ``summary.json``).
    """
    out_dir = Path(out_dir)
    fingerprint = config_fingerprint(jsonable(config))
    stored = read_marker(out_dir, fingerprint)
    if stored is not None:
        _log.info("%s finished earlier with this config: not rerun (delete done.json)", out_dir)
        top_k = int(config.get("top_k", 20))
        print(format_table(read_plans(out_dir / "plans.csv"), top_k, stored["objective"]))
        return stored
    deployment = make_deployment(**_deployment_args(config))
    settings = _search_settings(config, deployment.gpu.name)
    workload = workload_from_dict(dict(config["workload"]))
    space = plan_space_from_config(config["plan_space"], deployment.engine.plan_knobs())
    plan_set = build_plan_set(deployment, space)
    if config.get("plan_space_summary"):
        print(plan_set.format_summary(workload), end="\n\n", flush=True)
    progress = _Progress()
    try:
        result = run_search(
            deployment,
            workload,
            space,
            progress=progress,
            hw=_hardware_params(config),
            plan_set=plan_set,
            **settings,
        )
    finally:
        progress.close()
    ranked = result["ranked"]
    write_atomic(out_dir / "plans.csv", results_csv(ranked))
    summary = summary_dict(result, jsonable(config))
    write_json(out_dir / "summary.json", summary)
    files = ["plans.csv", "summary.json"]
    if config.get("report", True):
        files += write_report(
            out_dir,
            summary,
            ranked,
            result["heuristic"],
            result["latency_cdf"],
            top_k=min(int(config.get("top_k", 20)), 20),
            command=_command_line(),
        )
    num_ok = summary["status_counts"].get("OK", 0)
    workload = result["workload"]
    print(
        f"{deployment.model.name} on {deployment.num_gpus} x {deployment.gpu.name}, "
        f"workload {workload.name} ({workload.num_requests} requests); "
        f"ranked by {result['objective']}"
    )
    print(format_table(ranked, int(config.get("top_k", 20)), result["objective"]))
    timing = summary["timing_s"]
    print(
        f"plans: {result['num_plans']} ({num_ok} OK; status counts {summary['status_counts']}); "
        f"wall time {timing['wall_s']:.1f} s (compile {timing['compile_s']:.1f} s, "
        f"simulate {timing['run_s']:.1f} s)"
    )
    if summary["speedup_vs_heuristic"] is not None:
        heuristic = summary["heuristic"]["plan"]
        label = get_objective(result["objective"]).label
        print(
            f"best plan vs the heuristic ({heuristic}): {summary['speedup_vs_heuristic']:.2f}x "
            f"better on {label}"
        )
    write_marker(out_dir, fingerprint, jsonable(summary), files)
    _log.info("wrote %s in %s", ", ".join(files), out_dir)
    return summary


def _command_line() -> str:
    """The command as typed, for report.md; ``main`` sets ``sys.argv[0]`` to
    ``apex-jax <command>``. Called from Python, the plain command name."""
    if sys.argv and sys.argv[0].startswith("apex-jax "):
        return " ".join(sys.argv)
    return "apex-jax search"


def simulate_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Simulate the one plan in ``config["plan"]``; print and return its metrics."""
    args = _deployment_args(config)
    result = simulate(
        plan={k: v for k, v in dict(config["plan"]).items() if v is not None},
        workload=dict(config["workload"]),
        hw=_hardware_params(config),
        **args,
    )
    print(json_text(result))
    return result


def validate_from_config(config: Mapping[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Replay a measurement file; print the comparison and write ``validation.json``."""
    rows = load_measurements(config.get("measurements"))
    report = run_validation(
        rows,
        hw=_hardware_params(config),
        engine_overrides=dict(config.get("engine_overrides") or {}),
        gpu_memory_utilization=float(config.get("gpu_memory_utilization", 0.97)),
    )
    print(format_validation(report))
    out = Path(out_dir) / "validation.json"
    write_json(out, report)
    print(f"wrote {out}")
    return report


def _hydra_search(cfg) -> None:
    config = OmegaConf.to_container(cfg, resolve=True)
    search_from_config(config, HydraConfig.get().runtime.output_dir)


def _hydra_validate(cfg) -> None:
    config = OmegaConf.to_container(cfg, resolve=True)
    validate_from_config(config, HydraConfig.get().runtime.output_dir)


def calibrate_from_config(config: Mapping[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """``target=kernels``: fit kernel constants to one GPU's measured tables (see
    :mod:`apex_jax.fit_kernels`); ``target=serving``: fit engine constants to measured serving
    runs through the simulator (see :mod:`apex_jax.fit_serving`)."""
    if str(config.get("target", "kernels")) == "serving":
        return calibrate_serving_from_config(config.get("serving") or {}, out_dir)
    return fit_kernels.calibrate_from_config(config, out_dir)


def _hydra_calibrate(cfg) -> None:
    config = OmegaConf.to_container(cfg, resolve=True)
    calibrate_from_config(config, HydraConfig.get().runtime.output_dir)


def _hydra_simulate(cfg) -> None:
    simulate_from_config(OmegaConf.to_container(cfg, resolve=True))


COMMANDS: dict[str, tuple[Callable[[Any], None], str]] = {
    "search": (_hydra_search, "rank parallel plans (default: Llama-3.1-70B, 8 x H100, lmsys)"),
    "simulate": (_hydra_simulate, "metrics of one explicit plan, as JSON"),
    "validate": (_hydra_validate, "replay measured vLLM runs; predicted vs measured TTFT/TPOT"),
    "calibrate": (
        _hydra_calibrate,
        "fit kernel constants to a GPU's measured tables; error report",
    ),
}


def sweep_summary_main(args: list[str]) -> int:
    """``apex-jax sweep-summary DIR [OUT_DIR]``: merge a sweep's finished jobs into
    ``sweep_summary.csv`` and ``sweep_pareto.png`` (in ``OUT_DIR``, default ``DIR``) and
    print one line per job."""
    if len(args) not in (1, 2) or args[0].startswith("-"):
        print("usage: apex-jax sweep-summary DIR [OUT_DIR]", file=sys.stderr)
        return 2
    out_dir = args[1] if len(args) == 2 else args[0]
    try:
        rows = sweep_summary(args[0], out_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"apex-jax sweep-summary: error: {err}", file=sys.stderr)
        return 2
    print(format_sweep_table(rows))
    print(
        f"wrote {Path(out_dir) / 'sweep_summary.csv'} and {Path(out_dir) / 'sweep_pareto.png'}",
        file=sys.stderr,
    )
    return 0


def _usage() -> str:
    lines = [
        "usage: apex-jax <command> [hydra overrides, e.g. model=mixtral_8x7b]",
        "",
        "commands:",
    ]
    lines += [f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += [f"  {'sweep-summary':<13} merge a multirun DIR into one table and a Pareto plot"]
    lines += ["", "Add --help after a command for its config groups and values."]
    return "\n".join(lines)


def use_every_core() -> None:
    """Expose every usable CPU core as a JAX device, so that the engine splits its lanes
    across them. Must run before JAX starts its backend; an explicit XLA_FLAGS setting wins."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cores}".strip()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``apex-jax`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, overrides = argv[0], argv[1:]
    if command == "sweep-summary":
        return sweep_summary_main(overrides)
    if command not in COMMANDS:
        print(f"apex-jax: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    use_every_core()
    # Hydra logs at INFO; JAX's note that it found no TPU is noise to a CPU user.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    function = COMMANDS[command][0]
    failures: list[str] = []
    app = hydra.main(version_base="1.3", config_path=config_dir(), config_name=command)(
        _guarded(function, command, failures)
    )
    sys.argv = [f"apex-jax {command}"] + overrides
    app()
    return 2 if failures else 0


def _guarded(
    function: Callable[[Any], None], command: str, failures: list[str]
) -> Callable[[Any], None]:
    """Report a bad input as one line on stderr instead of a traceback.

    The error must not propagate: Hydra catches exceptions from the task function itself and
    prints them with a traceback. The wrapper records the failure so that ``main`` exits
    non-zero, and a multirun goes on with its other jobs.
    """

    def wrapper(cfg) -> None:
        try:
            function(cfg)
        except (ValueError, TypeError, FileNotFoundError, KeyError) as err:
            message = f"apex-jax {command}: error: {err}"
            print(message, file=sys.stderr, flush=True)
            failures.append(message)

    wrapper.__name__ = function.__name__
    return wrapper


if __name__ == "__main__":
    sys.exit(main())
