"""Command line: ``apex-jax <command> [hydra overrides]``.

Each command is a Hydra app whose config is ``conf/<command>.yaml``, composed onto the
command's schema (:mod:`apex_jax.config_schema`). The Hydra function only converts its config
to a plain dict and calls a ``*_from_config`` function, which is what the tests call directly:
a ``DictConfig`` never reaches numeric code.

What a user sees: stdout holds only the result (the ranked table of ``search``, the JSON of
``simulate``, the tables of ``validate`` and ``calibrate``); progress bars, the timing line,
the files written and log messages go to stderr, logs at WARNING unless ``verbose=true``
(the run's ``cli.log`` keeps INFO). A bad input fails before anything runs, in one line on
stderr, with exit code 2; a search in which no plan is OK exits 1 with a summary of why;
Ctrl-C stops with one line saying what was finished and where it was written (exit 130).
"""

from __future__ import annotations

import collections
import csv
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
import jax
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from apex_jax import __version__, enable_compile_cache, fit_kernels
from apex_jax.api import make_slo, simulate
from apex_jax.benchmark_runs import (
    SILICON_DEV,
    format_benchmark_validation,
    load_benchmark_runs,
    run_benchmark_validation,
)
from apex_jax.config_schema import check_config, one_line_config_error
from apex_jax.deployment import Deployment, make_case, make_deployment
from apex_jax.fit_serving import calibrate_runs_from_config, calibrate_serving_from_config
from apex_jax.hardware import load_hardware_params, resolve_gpu
from apex_jax.io import json_text, jsonable, write_atomic, write_json
from apex_jax.measured_runs import load_measured_runs
from apex_jax.multihost import allgather_objects, initialize, process_count, process_index
from apex_jax.objectives import GOODPUT, GoodputSettings, get_objective
from apex_jax.paths import bundled_path, config_dir
from apex_jax.plan_space import build_plan_set, space_from_dict
from apex_jax.plans import PlanSpace
from apex_jax.report import VALIDATION_FIGURE, plot_validation, write_report
from apex_jax.search import (
    check_objective,
    format_table,
    results_csv,
    run_search,
    summary_dict,
    wrap_parts,
)
from apex_jax.sweep import (
    config_fingerprint,
    format_sweep_table,
    read_marker,
    read_plans,
    sweep_summary,
    write_marker,
)
from apex_jax.validate import (
    DEFAULT_MEASUREMENTS,
    format_validation,
    load_measurements,
    run_validation,
)
from apex_jax.workload import Workload, workload_from_dict

__all__ = [
    "calibrate_from_config",
    "main",
    "plan_space_from_config",
    "precheck",
    "search_from_config",
    "simulate_from_config",
    "sweep_summary_main",
    "use_every_core",
    "validate_from_config",
]

_LOG = logging.getLogger(__name__)


def _deployment_args(config: Mapping[str, Any]) -> dict[str, Any]:
    cluster = config["cluster"]
    num_nodes, per_node = int(cluster["num_nodes"]), int(cluster["gpus_per_node"])
    if num_nodes < 1 or per_node < 1:
        raise ValueError(
            f"cluster needs num_nodes >= 1 and gpus_per_node >= 1 (got {num_nodes} x {per_node})"
        )
    engine = {k: v for k, v in dict(config["engine"]).items() if v is not None}
    return {
        "model": dict(config["model"]),
        "hardware": dict(config["hardware"]),
        "num_gpus": num_nodes * per_node,
        "gpus_per_node": per_node,
        "engine": engine,
    }


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


class _RunState:
    """What the running command has done so far, for the line printed on Ctrl-C and for the
    timing line (whose wall time starts when the process did)."""

    def __init__(self) -> None:
        # Set by the SIGINT handler. Python drops an exception raised inside a callback
        # (XLA's garbage-collection hooks, __del__), so a Ctrl-C that lands there is raised
        # again at the next phase and, failing that, when the command returns.
        self.is_interrupted = False
        self.command = ""
        self.phase = "starting"
        self.written: list[Path] = []
        self.jobs_done = 0
        self.started = time.monotonic()

    def begin(self, command: str) -> None:
        first = not self.command
        self.__init__()
        self.command = command
        age_s = _process_age_s()
        # The first command of a process started with it; a later one (main called again
        # from Python) starts now.
        if first and age_s is not None:
            self.started -= age_s

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, text: str) -> None:
        self._phase = text
        if self.is_interrupted:
            raise KeyboardInterrupt

    def on_sigint(self, signum, frame) -> None:
        self.is_interrupted = True
        raise KeyboardInterrupt

    def wrote(self, *paths: Path) -> None:
        self.written += paths

    def interrupted(self) -> str:
        done = (
            "wrote " + ", ".join(str(p) for p in self.written)
            if self.written
            else "nothing was written"
        )
        jobs = f"; {self.jobs_done} multirun job(s) finished" if self.jobs_done else ""
        return f"apex-jax {self.command}: interrupted while {self.phase}{jobs}; {done}"


_RUN = _RunState()


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux), so that the timing line covers the
    interpreter's start and the imports too; None where /proc is missing."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            # Field 22 is the start time in clock ticks after boot; the name (field 2) may
            # hold spaces, so count from its closing parenthesis.
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            up_s = float(uptime.read().split()[0])
        return max(0.0, up_s - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _elapsed_s(since: float) -> float:
    """Wall time of the command: from the process start under ``main``, else from
    ``since`` (a ``*_from_config`` function called from Python)."""
    return time.monotonic() - (_RUN.started if _RUN.command else since)


class _Progress:
    """A progress bar with ETA over simulated replicas, on stderr (tqdm)."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        _RUN.phase = f"simulating ({done} of {total} replicas done)"
        if self.bar is None:
            # disable=None: a bar on a terminal, silence in logs and CI.
            self.bar = tqdm(
                total=total, unit="replica", desc="simulating", file=sys.stderr, disable=None
            )
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _search_settings(config: Mapping[str, Any], gpu_name: str) -> dict[str, Any]:
    """The keyword arguments of :func:`~apex_jax.search.run_search` that come from the
    config's objective, SLO, target rate, goodput and price settings (its keys are checked
    by the schema, :mod:`apex_jax.config_schema`)."""
    objective = str(config["objective"])
    goodput = dict(config.get("goodput") or {})
    enabled = bool(goodput.pop("enabled", False)) or objective == GOODPUT
    # Checked whether or not goodput is on: a bad setting is a typo either way.
    goodput_settings = GoodputSettings(**goodput)
    prices = (config.get("prices") or {}).get("usd_per_gpu_hour") or {}
    target = config.get("target_rate_req_s")
    settings = {
        "objective": objective,
        "slo": make_slo(config.get("slo")),
        "target_rate_req_s": float(target) if target else None,
        "goodput": goodput_settings if enabled else None,
        "gpu_price_usd_per_hour": (
            float(prices[gpu_name]) if prices.get(gpu_name) is not None else None
        ),
        "prune": bool(config.get("prune", True)),
    }
    check_objective(objective, settings["slo"], gpu_name, settings["gpu_price_usd_per_hour"])
    return settings


def _search_inputs(
    config: Mapping[str, Any],
) -> tuple[Deployment, Workload, PlanSpace, dict[str, Any]]:
    """The deployment, workload, plan space and :func:`_search_settings` of a search config;
    the calibration is checked too."""
    deployment = make_deployment(**_deployment_args(config))
    settings = _search_settings(config, deployment.gpu.name)
    workload = workload_from_dict(dict(config["workload"]))
    space = plan_space_from_config(config["plan_space"], deployment.engine.plan_knobs())
    _hardware_params(config)
    return deployment, workload, space, settings


def _simulate_args(config: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`apex_jax.simulate` for a simulate config."""
    return {
        **_deployment_args(config),
        "plan": {k: v for k, v in dict(config["plan"]).items() if v is not None},
        "workload": dict(config["workload"]),
        "slo": {k: v for k, v in dict(config.get("slo") or {}).items() if v is not None},
    }


def _simulate_inputs(config: Mapping[str, Any]) -> None:
    args = _simulate_args(config)
    make_case(**{k: v for k, v in args.items() if k != "slo"})
    make_slo(args["slo"])
    _hardware_params(config)


def _validate_inputs(config: Mapping[str, Any]) -> None:
    is_benchmark, path = validation_file(config)
    if is_benchmark:
        load_benchmark_runs(path)
    else:
        load_measurements(path)


# A column only benchmark files (apex_jax.benchmark_runs) have.
_BENCHMARK_COLUMN = "silicon_ttft_ms"
# The bundled file of each validate dataset.
_DATASET_FILES = {"vllm_h100_dev": DEFAULT_MEASUREMENTS, "silicon_dev": SILICON_DEV}


def validation_file(config: Mapping[str, Any]) -> tuple[bool, Path]:
    """The file ``apex-jax validate`` replays (``measurements``, else the dataset's bundled
    one), and whether it holds closed-loop benchmark runs in silicon_dev's columns rather
    than per-instance trace replays; its header decides, so a file of either kind works."""
    name = str(config.get("measurements") or _DATASET_FILES[config["dataset"]])
    path = Path(name) if Path(name).exists() else bundled_path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"measurements: {name} not found (a path, or a bundled name such as {SILICON_DEV})"
        )
    with open(path, newline="") as stream:
        header = next(csv.reader(stream), [])
    return _BENCHMARK_COLUMN in header, path


def _calibrate_inputs(config: Mapping[str, Any]) -> None:
    if config["target"] == "serving" and config.get("measurements"):
        load_measured_runs(config["measurements"])
    elif config["target"] == "serving":
        load_measurements(config["serving"]["measurements"])
    else:
        resolve_gpu(config["hardware"])


# Per command: build (and so check) every input that is cheap to build, before anything runs.
_INPUTS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "search": _search_inputs,
    "simulate": _simulate_inputs,
    "validate": _validate_inputs,
    "calibrate": _calibrate_inputs,
}


def search_from_config(config: Mapping[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Run a plan search from a plain config dict; write ``plans.csv``, ``summary.json``,
    the figures and ``report.md`` (``report: true``), then the completion marker.

    A directory whose completion marker matches the config (:mod:`apex_jax.sweep`) is a job
    that finished before: its stored summary is returned without simulating again.

    Returns:
        The summary dict (also written to ``summary.json``).
    """
    start = time.monotonic()
    check_config("search", config)
    out_dir = Path(out_dir)
    fingerprint = config_fingerprint(jsonable(config))
    is_worker = _join_processes(config.get("distributed") or {})
    stored = read_marker(out_dir, fingerprint)
    if process_count() > 1:
        # Every process must take the same branch: the coordinator's marker decides.
        stored = allgather_objects(stored)[0]
    if stored is not None:
        _note(f"{out_dir} finished earlier with this config: not rerun (delete done.json)")
        print(format_table(read_plans(out_dir / "plans.csv"), config["top_k"], stored["objective"]))
        return stored
    _RUN.phase = "preparing the search"
    deployment, workload, space, settings = _search_inputs(config)
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
    if is_worker:
        result["wall_s"] = _elapsed_s(start)
        _note(
            f"process {process_index()} of {process_count()}: simulated its share of the lanes; "
            "process 0 prints and writes the results"
        )
        return summary_dict(result, jsonable(config))
    _RUN.phase = "writing the results"
    write_atomic(out_dir / "plans.csv", results_csv(ranked))
    _RUN.wrote(out_dir / "plans.csv")
    result["wall_s"] = _elapsed_s(start)
    summary = summary_dict(result, jsonable(config))
    summary["status_reasons"] = _status_reasons(result["ranked"])
    write_json(out_dir / "summary.json", summary)
    _RUN.wrote(out_dir / "summary.json")
    files = ["plans.csv", "summary.json"]
    if config["report"]:
        _RUN.phase = "writing the report"
        files += write_report(
            out_dir,
            summary,
            ranked,
            result["heuristic"],
            result["latency_cdf"],
            top_k=min(int(config["top_k"]), 20),
            command=_command_line(),
        )
        _RUN.wrote(*(out_dir / f for f in files[2:]))
    workload = result["workload"]
    print(
        f"{deployment.model.name} on {deployment.num_gpus} x {deployment.gpu.name}, "
        f"workload {workload.name} ({workload.num_requests} requests); "
        f"ranked by {result['objective']}"
    )
    print(format_table(ranked, int(config["top_k"]), result["objective"]), flush=True)
    if summary["best"] is not None:
        best = summary["best"]
        print(f"best plan: {best['plan']}")
        where = f"placed on {deployment.gpus_per_node}-GPU nodes: "
        print("\n".join(wrap_parts(where, best["placement"].split(" · "))), flush=True)
    if summary["speedup_vs_heuristic"] is not None:
        heuristic = summary["heuristic"]["plan"]
        label = get_objective(result["objective"]).label
        # Two lines: a plan description alone can take most of the table's 120 columns.
        print(f"heuristic plan: {heuristic}")
        print(
            f"best plan vs the heuristic: {summary['speedup_vs_heuristic']:.2f}x better on {label}",
            flush=True,
        )
    write_marker(out_dir, fingerprint, jsonable(summary), files)
    timing = summary["timing_s"]
    counts = ", ".join(f"{n} {status}" for status, n in summary["status_counts"].items())
    _note(
        f"{result['num_plans']} plans ({counts}; pruned: {_pruned_text(summary['pruned'])}); "
        f"wall time {timing['wall_s']:.1f} s "
        f"(costs and lanes {timing['prepare_s']:.1f} s, compile {timing['compile_s']:.1f} s, "
        f"simulate {timing['run_s']:.1f} s); wrote {', '.join(files)} to {out_dir}"
    )
    return summary


def _join_processes(distributed: Mapping[str, Any]) -> bool:
    """Join the multi-process run ``distributed`` describes (once per process); True for a
    process other than the coordinator, which writes nothing."""
    num_processes = int(distributed.get("num_processes", 1))
    if num_processes > 1 and process_count() == 1:
        initialize(
            distributed["coordinator_address"], num_processes, int(distributed["process_id"])
        )
    return process_index() > 0


def _pruned_text(pruned: Mapping[str, int]) -> str:
    """How many plans each pruning rule removed, for the closing line."""
    return (
        f"{pruned['dominated']} dominated, {pruned['bounded']} bounded, "
        f"{pruned['symmetric']} symmetric, "
        f"{pruned['identical_replicas']} identical replicas simulated once"
    )


def _command_line() -> str:
    """The command as typed, for report.md; ``main`` sets ``sys.argv[0]`` to
    ``apex-jax <command>``. Called from Python, the plain command name."""
    if sys.argv and sys.argv[0].startswith("apex-jax "):
        return " ".join(sys.argv)
    return "apex-jax search"


def _note(text: str) -> None:
    """A line for the user that is not the result: on stderr, whatever the log level."""
    print(text, file=sys.stderr, flush=True)


def _status_reasons(ranked: list[dict[str, Any]]) -> dict[str, str]:
    """Per failed status, the reason of its best-ranked plan, as an example."""
    reasons: dict[str, str] = {}
    for r in ranked:
        if r["status"] != "OK" and r["status"] not in reasons:
            reasons[r["status"]] = f"e.g. {r['plan']}: {r.get('status_reason', '')}"
    return reasons


def _no_ok_plan(summary: Mapping[str, Any]) -> str | None:
    """Why a search found no OK plan (one line), or None when some plan is OK."""
    if summary["status_counts"].get("OK", 0):
        return None
    counts = ", ".join(f"{n} {status}" for status, n in summary["status_counts"].items())
    why = "; ".join(f"{status} {reason}" for status, reason in summary["status_reasons"].items())
    return f"no plan is OK ({counts}); {why}"


def simulate_from_config(
    config: Mapping[str, Any], out_dir: str | Path | None = None
) -> dict[str, Any]:
    """Simulate the one plan in ``config["plan"]``; print its metrics as JSON (stdout holds
    nothing else) and write them to ``result.json`` in ``out_dir`` when given."""
    check_config("simulate", config)
    _RUN.phase = "simulating"
    result = simulate(hw=_hardware_params(config), **_simulate_args(config))
    print(json_text(result), flush=True)
    if out_dir is not None:
        write_json(Path(out_dir) / "result.json", result)
        _RUN.wrote(Path(out_dir) / "result.json")
        _note(f"wrote {Path(out_dir) / 'result.json'}")
    return result


def validate_from_config(config: Mapping[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Replay a measurement file; print the comparison and write ``validation.json``."""
    check_config("validate", config)
    _RUN.phase = "replaying the measured runs"
    is_benchmark, path = validation_file(config)
    if is_benchmark:
        report = run_benchmark_validation(path, hw=_hardware_params(config))
        print(format_benchmark_validation(report), flush=True)
        return _write_validation(report, out_dir, path.stem)
    rows = load_measurements(path)
    report = run_validation(
        rows,
        hw=_hardware_params(config),
        engine_overrides=dict(config["engine_overrides"] or {}),
        gpu_memory_utilization=float(config["gpu_memory_utilization"]),
    )
    print(format_validation(report), flush=True)
    return _write_validation(report, out_dir, path.stem)


def _write_validation(report: dict[str, Any], out_dir: str | Path, title: str) -> dict[str, Any]:
    out = Path(out_dir) / "validation.json"
    write_json(out, report)
    _RUN.wrote(out)
    figure = Path(out_dir) / VALIDATION_FIGURE
    plot_validation(report["rows"], figure, f"{title}: predicted vs measured")
    _RUN.wrote(figure)
    _note(f"wrote {out} and {figure}")
    return report


def _hydra_search(cfg) -> None:
    config = OmegaConf.to_container(cfg, resolve=True)
    summary = search_from_config(config, HydraConfig.get().runtime.output_dir)
    why = _no_ok_plan(summary)
    if why:
        raise _NoOkPlan(why)


class _NoOkPlan(Exception):
    """A search that ran but found no OK plan (exit code 1)."""


def _hydra_validate(cfg) -> None:
    config = OmegaConf.to_container(cfg, resolve=True)
    validate_from_config(config, HydraConfig.get().runtime.output_dir)


def calibrate_from_config(config: Mapping[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """``target=kernels``: fit kernel constants to one GPU's measured tables (see
    :mod:`apex_jax.fit_kernels`); ``target=serving``: fit engine constants to measured serving
    runs through the simulator (see :mod:`apex_jax.fit_serving`)."""
    _RUN.phase = "calibrating"
    if str(config.get("target", "kernels")) == "serving":
        if config.get("measurements"):
            return calibrate_runs_from_config(config, out_dir)
        return calibrate_serving_from_config(config.get("serving") or {}, out_dir)
    return fit_kernels.calibrate_from_config(config, out_dir)


def _hydra_calibrate(cfg) -> None:
    config = OmegaConf.to_container(cfg, resolve=True)
    calibrate_from_config(config, HydraConfig.get().runtime.output_dir)


def _hydra_simulate(cfg) -> None:
    config = OmegaConf.to_container(cfg, resolve=True)
    simulate_from_config(config, HydraConfig.get().runtime.output_dir)


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
    lines += [
        "",
        "Add --help after a command for its config groups and values, --cfg job to print",
        "its composed config; apex-jax --version prints the version.",
    ]
    return "\n".join(lines)


def use_every_core() -> None:
    """Expose every usable CPU core as a JAX device, so that the engine splits its lanes
    across them. Must run before JAX starts its backend; an explicit XLA_FLAGS setting wins."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cores}".strip()


# Hydra flags after which no job runs (help, printed config, shell completion), or that
# change where the config comes from: the pre-check leaves those to Hydra.
_HYDRA_ONLY_FLAGS = frozenset(
    {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc"}
    | {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"}
    | {"--experimental-rerun"}
)


def precheck(command: str, args: list[str]) -> dict[str, Any] | None:
    """Compose the command's config from its overrides and check it, before Hydra runs.

    A multirun sweep (``a=1,2``) is checked at its first value; ``hydra.*`` overrides are
    left to Hydra.

    Args:
        command: A key of ``COMMANDS``.
        args: The command's arguments (overrides and Hydra flags).

    Returns:
        The composed config as a dict, or None when a flag hands the whole call to Hydra.

    Raises:
        ValueError, TypeError, FileNotFoundError: In one line, for an unknown key or config
            option, a wrong type, a value out of range, an objective that does not exist or
            needs an SLO, or an input its builder rejects (model, GPU, trace, plan, ...).
    """
    if any(arg.split("=", 1)[0] in _HYDRA_ONLY_FLAGS for arg in args):
        return None
    overrides = [arg for arg in args if not arg.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        job = []
        for override in parsed:
            if override.key_or_group.startswith("hydra"):
                continue
            if override.is_sweep_override():
                first = next(iter(override.sweep_string_iterator()))
                job.append(f"{override.get_key_element()}={first}")
            else:
                job.append(override.input_line)
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            composed = compose(config_name=command, overrides=job)
        config = OmegaConf.to_container(composed, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise ValueError(one_line_config_error(command, err)) from None
    swept = [o for o in parsed if o.is_sweep_override() and not o.key_or_group.startswith("hydra")]
    if swept:
        # Hydra's sweeper first composes the plain overrides on the default config, and only
        # then sweeps the groups: a key that exists only in a swept group's options fails there.
        plain = [
            o.input_line
            for o in parsed
            if o not in swept and not o.key_or_group.startswith("hydra")
        ]
        try:
            with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
                compose(config_name=command, overrides=plain)
        except (HydraException, OmegaConfBaseException) as err:
            raise ValueError(
                f"{one_line_config_error(command, err)} (in a sweep, Hydra applies plain "
                "overrides to the default config before it sweeps the groups: write a key of a "
                f"swept group ({', '.join(o.key_or_group for o in swept)}) as ++KEY=VALUE)"
            ) from None
    check_config(command, config)
    _INPUTS[command](config)
    return config


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``apex-jax`` console script.

    Returns:
        The exit code: 0 on success, 1 for a search with no OK plan, 2 for bad input, 130
        after Ctrl-C.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"apex-jax {__version__}")
        return 0
    command, overrides = argv[0], argv[1:]
    if command == "sweep-summary":
        return sweep_summary_main(overrides)
    if command not in COMMANDS:
        print(f"apex-jax: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    _RUN.begin(command)
    # Python lets only the main thread install a signal handler; a process started with
    # SIGINT ignored (a background job of a script, nohup) keeps ignoring it, as Python does.
    is_handling = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    )
    sigint_before = signal.signal(signal.SIGINT, _RUN.on_sigint) if is_handling else None
    try:
        return _run_command(command, overrides)
    finally:
        if is_handling:
            signal.signal(signal.SIGINT, sigint_before)


def _run_command(command: str, overrides: list[str]) -> int:
    use_every_core()
    try:
        precheck(command, overrides)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"apex-jax {command}: error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(_RUN.interrupted(), file=sys.stderr, flush=True)
        return 130
    function = COMMANDS[command][0]
    outcomes: collections.Counter[str] = collections.Counter()
    app = hydra.main(version_base="1.3", config_path=config_dir(), config_name=command)(
        _guarded(function, command, outcomes)
    )
    argv_before, sys.argv = sys.argv, [f"apex-jax {command}"] + overrides
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        app()
    except KeyboardInterrupt:
        print(_RUN.interrupted(), file=sys.stderr, flush=True)
        return 130
    finally:
        # Hydra leaves its handlers on the root logger; called from Python (a notebook, a
        # test), the caller's logging and sys.argv must come back as they were.
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        sys.argv = argv_before
    if _RUN.is_interrupted:
        print(_RUN.interrupted(), file=sys.stderr, flush=True)
        return 130
    if outcomes["error"]:
        return 2
    return 1 if outcomes["no_ok_plan"] else 0


def _quiet_terminal(verbose: bool) -> None:
    """Terminal log handlers at WARNING (INFO with ``verbose``); file handlers keep INFO.
    JAX's note that it found no TPU is noise to a CPU user even with ``verbose``."""
    level = logging.INFO if verbose else logging.WARNING
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            handler.setLevel(level)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def _use_compile_cache(setting: str) -> None:
    """``compile_cache=``: "auto" (the default directory), "off", or a directory."""
    if setting == "off":
        jax.config.update("jax_enable_compilation_cache", False)
        return
    jax.config.update("jax_enable_compilation_cache", True)
    directory = enable_compile_cache(None if setting == "auto" else setting)
    _LOG.info("compiled engines cached in %s", directory)


def _guarded(
    function: Callable[[Any], None], command: str, outcomes: collections.Counter[str]
) -> Callable[[Any], None]:
    """Report a bad input as one line on stderr instead of a traceback.

    The error must not propagate: Hydra catches exceptions from the task function itself and
    prints them with a traceback. The wrapper counts the outcome so that ``main`` picks the
    exit code, and a multirun goes on with its other jobs.
    """

    def wrapper(cfg) -> None:
        _quiet_terminal(bool(cfg.get("verbose", False)))
        if outcomes.total():
            # A later multirun job: its wall time starts now, not with the process.
            _RUN.started = time.monotonic()
        try:
            _use_compile_cache(str(cfg.get("compile_cache", "auto")))
            function(cfg)
        except _NoOkPlan as why:
            print(f"apex-jax {command}: {why}", file=sys.stderr, flush=True)
            outcomes["no_ok_plan"] += 1
        except (ValueError, TypeError, FileNotFoundError, KeyError) as err:
            print(f"apex-jax {command}: error: {err}", file=sys.stderr, flush=True)
            outcomes["error"] += 1
        except OmegaConfBaseException as err:
            message = one_line_config_error(command, err)
            print(f"apex-jax {command}: error: {message}", file=sys.stderr, flush=True)
            outcomes["error"] += 1
        else:
            outcomes["ok"] += 1
        _RUN.jobs_done += 1

    wrapper.__name__ = function.__name__
    return wrapper


if __name__ == "__main__":
    sys.exit(main())
