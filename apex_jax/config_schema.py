"""Structured-config schemas of the commands, registered in Hydra's ConfigStore.

Each command's YAML (``conf/<command>.yaml``) starts its defaults list with the schema
``<command>_schema``, so Hydra composes the config onto a dataclass: a key the dataclass does
not have (``+foo=1``, ``+plan.tp=2`` on ``search``) or a value of the wrong type
(``top_k=many``) fails at composition, before anything runs. The dataclasses hold the one set
of defaults of every top-level key (the YAML files only pick config-group options); where a
Python function has the same parameter, the default is read from its signature, so the
command line and the Python API cannot drift apart.

Config groups (``model``, ``hardware``, ``workload``, ``engine``, ``plan``, ``plan_space``,
``slo``) are open dicts here: each is checked, with its accepted keys in the message, by the
function that builds it (``load_model``, ``resolve_gpu``, ``workload_from_dict``,
``resolve_engine``, ``plan_row``, ``space_from_dict``, ``make_slo``), the same code the Python
API runs. :func:`check_config` adds what composition cannot check: keys added with ``+``
and ranges (no negative counts).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import math
import typing
from collections.abc import Callable, Mapping
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException, MissingConfigException
from omegaconf import MISSING
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from apex_jax.fit_kernels import calibrate as _calibrate_kernels
from apex_jax.fit_serving import fit_serving as _fit_serving
from apex_jax.objectives import GoodputSettings
from apex_jax.validate import DEFAULT_MEASUREMENTS
from apex_jax.validate import run_validation as _run_validation

__all__ = [
    "SCHEMAS",
    "CalibrateConfig",
    "ClusterConfig",
    "DistributedConfig",
    "GoodputConfig",
    "PricesConfig",
    "SearchConfig",
    "ServingFitConfig",
    "SimulateConfig",
    "ValidateConfig",
    "check_config",
    "one_line_config_error",
    "register_schemas",
]


def _default(function: Callable[..., Any], name: str) -> Any:
    """The default of ``function``'s parameter ``name``: one default for the config and the
    Python API."""
    return inspect.signature(function).parameters[name].default


def _range(low: float | None = None, high: float | None = None) -> dict[str, Any]:
    """Field metadata: the value must lie in ``[low, high]`` (checked by check_config)."""
    return {"low": low, "high": high}


def _copy_of(default: Any) -> Callable[[], Any]:
    return lambda: copy.deepcopy(default)


@dataclasses.dataclass
class ClusterConfig:
    """``cluster``: nodes x GPUs per node."""

    num_nodes: int = dataclasses.field(default=MISSING, metadata=_range(1))
    gpus_per_node: int = dataclasses.field(default=MISSING, metadata=_range(1))


@dataclasses.dataclass
class PricesConfig:
    """``prices``: rental price of one GPU, USD per hour, by catalog name (cost objectives)."""

    usd_per_gpu_hour: dict[str, float] = dataclasses.field(default_factory=dict)


# ``goodput``: ``enabled`` and the bisection settings, whose defaults are GoodputSettings'.
GoodputConfig = dataclasses.make_dataclass(
    "GoodputConfig",
    [("enabled", bool, dataclasses.field(default=False))]
    + [
        (
            f.name,
            typing.get_type_hints(GoodputSettings)[f.name],
            dataclasses.field(default=f.default),
        )
        for f in dataclasses.fields(GoodputSettings)
    ],
)


@dataclasses.dataclass
class DistributedConfig:
    """``distributed``: run one search over several processes (hosts) with
    ``jax.distributed`` (:mod:`apex_jax.multihost`); 1 process needs nothing else."""

    num_processes: int = dataclasses.field(default=1, metadata=_range(1))
    process_id: int = dataclasses.field(default=0, metadata=_range(0))
    # host:port where process 0 listens; every process gives the same.
    coordinator_address: str = "127.0.0.1:12355"


@dataclasses.dataclass
class SearchConfig:
    """``apex-jax search``: rank parallel plans for a model, cluster and workload."""

    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    hardware: dict[str, Any] = dataclasses.field(default_factory=dict)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
    workload: dict[str, Any] = dataclasses.field(default_factory=dict)
    engine: dict[str, Any] = dataclasses.field(default_factory=dict)
    plan_space: dict[str, Any] = dataclasses.field(default_factory=dict)
    slo: dict[str, Any] = dataclasses.field(default_factory=dict)
    prices: PricesConfig = dataclasses.field(default_factory=PricesConfig)
    # What to rank by (apex_jax.objectives.OBJECTIVES): any metric (throughputs, attainments,
    # goodput_req_s, mfu and mbu are maximised, the rest minimised), or fewest_gpus (the
    # fewest GPUs meeting the SLO attainment target; use plan_space.use_all_gpus=false).
    objective: str = "e2e_mean_s"
    # Rows of the printed table and of report.md (plans.csv has every plan).
    top_k: int = dataclasses.field(default=20, metadata=_range(1))
    # Replay the workload at this mean arrival rate (requests/s) instead of its own, by
    # scaling its arrival times; null keeps the trace's rate.
    target_rate_req_s: float | None = dataclasses.field(default=None, metadata=_range(0.0))
    # Goodput (DistServe): the highest arrival rate at which slo.attainment of the requests
    # meet both SLOs, by bisection over the trace's rate scale, every plan at once. On when
    # the objective is goodput_req_s, or with goodput.enabled=true (needs an SLO).
    goodput: GoodputConfig = dataclasses.field(default_factory=GoodputConfig)
    # Figures (PNG) and report.md next to plans.csv.
    report: bool = True
    # Skip plans another plan dominates (the same lanes and engine knobs, at least as many KV
    # pages, every cost and power constant at most as large) and, for E2E and TPOT
    # objectives, plans whose lower bound exceeds the best plan found (apex_jax/prune.py).
    prune: bool = True
    # Fitted constants: a bundled name (apex_jax/data/calibrated/<name>.json) or a path to a
    # JSON written by apex-jax calibrate; null uses the datasheet defaults.
    calibration: str | None = None
    # Print the plan space before simulating: plans per axis value, candidates left out and
    # why, plans that do not fit in memory or cannot hold some request, and why.
    plan_space_summary: bool = False
    # Log INFO messages on the terminal (the run's log file always has them).
    verbose: bool = False
    # Compiled engines kept on disk for later runs (apex_jax.enable_compile_cache): "auto"
    # ($APEX_JAX_CACHE_DIR, else ~/.cache/apex_jax/xla), a directory, or "off".
    compile_cache: str = "auto"
    # Several processes share the engine's lanes; process 0 prints and writes the results.
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)


@dataclasses.dataclass
class SimulateConfig:
    """``apex-jax simulate``: one explicit plan, metrics as JSON."""

    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    hardware: dict[str, Any] = dataclasses.field(default_factory=dict)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
    workload: dict[str, Any] = dataclasses.field(default_factory=dict)
    engine: dict[str, Any] = dataclasses.field(default_factory=dict)
    slo: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The plan's columns (apex_jax.plans.COLUMNS); null means the classic plan's value, and
    # cells over the stage's tp GPUs. E.g. plan.attn_tp=4 runs two attention replicas of TP4
    # on tp=8.
    plan: dict[str, Any] = dataclasses.field(
        default_factory=_copy_of(
            {"dp": 1, "tp": 8, "pp": 1, "weight_dtype": "bf16", "kv_dtype": "bf16"}
        )
    )
    calibration: str | None = None
    verbose: bool = False
    compile_cache: str = "auto"


@dataclasses.dataclass
class ValidateConfig:
    """``apex-jax validate``: replay measured serving runs, predicted vs measured."""

    # The bundled file replayed when `measurements` is not given: vllm_h100_dev, per-instance
    # replays of traces (apex_jax.validate); silicon_dev, NVIDIA's closed-loop benchmark runs
    # (apex_jax.benchmark_runs), with the rows apex_jax cannot simulate listed with the reason.
    dataset: str = "vllm_h100_dev"
    # A bundled name (validation/...) or a path to a CSV in either dataset's columns: a file
    # with silicon_dev's (silicon_ttft_ms, ...) is replayed as closed-loop benchmark runs.
    measurements: str | None = None
    # For rows that do not record their own (column gpu_memory_utilization); the dev runs used
    # --gpu-memory-utilization 0.97.
    gpu_memory_utilization: float = dataclasses.field(
        default=_default(_run_validation, "gpu_memory_utilization"), metadata=_range(0.0, 1.0)
    )
    # Engine knobs applied to every case on top of the measured engine's preset.
    engine_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    calibration: str | None = None
    verbose: bool = False
    compile_cache: str = "auto"


@dataclasses.dataclass
class ServingFitConfig:
    """``calibrate target=serving``: measured runs, the fitted constants
    (``apex_jax.fit_serving.DEFAULT_FIT_FIELDS`` when null), Adam steps and step size, the pull
    towards the kernel-calibrated constants, and the name later runs load the result by
    (``calibration=<name>``).

    The cross-validation leaves one trace out at a time (lmsys, creation, summarization): fit
    on the others, error on it. Steps, step size and prior weight were fixed before the
    leave-one-trace-out figures of the README were first computed and are not tuned to them:
    change them only for a reason that does not come from those figures."""

    measurements: str = DEFAULT_MEASUREMENTS
    fields: list[str] | None = None
    steps: int = dataclasses.field(default=_default(_fit_serving, "steps"), metadata=_range(1))
    learning_rate: float = dataclasses.field(
        default=_default(_fit_serving, "learning_rate"), metadata=_range(0.0)
    )
    prior_weight: float = dataclasses.field(
        default=_default(_fit_serving, "prior_weight"), metadata=_range(0.0)
    )
    name: str = "vllm-0.6.0-h100"


@dataclasses.dataclass
class CalibrateConfig:
    """``apex-jax calibrate``: fit kernel constants to a GPU's tables, or engine constants to
    serving runs."""

    hardware: dict[str, Any] = dataclasses.field(default_factory=dict)
    # "kernels" (KernelParams, to the GPU's measured tables) or "serving" (see serving).
    target: str = "kernels"
    # target=serving on your own measured runs: a CSV in the schema of
    # apex_jax.measured_runs (model, GPU, plan, engine and version, workload, measured
    # ttft_mean_s and tpot_mean_s). Cross-validated over `folds` folds, then fitted on every
    # run; writes serving.json (use it as calibration=<path>). null: the dev file of serving.
    measurements: str | None = None
    # The measurements' column whose runs are held out together (e.g. model); null: each run.
    cv_by: str | None = None
    # Operators to fit (null: every one the GPU has a table for; apex_jax.fit_kernels.OPERATORS).
    operators: list[str] | None = None
    # Cross-validation folds over whole shapes (see apex_jax.fit_kernels): the report's
    # errors are on shapes each fit never saw; the constants are then fitted on every row.
    # With measurements=, folds over its runs (or cv_by groups).
    folds: int = dataclasses.field(
        default=_default(_calibrate_kernels, "folds"), metadata=_range(2)
    )
    seed: int = dataclasses.field(default=_default(_calibrate_kernels, "seed"), metadata=_range(0))
    # Adam steps (full batch) and peak step size.
    steps: int = dataclasses.field(
        default=_default(_calibrate_kernels, "steps"), metadata=_range(1)
    )
    learning_rate: float = dataclasses.field(
        default=_default(_calibrate_kernels, "learning_rate"), metadata=_range(0.0)
    )
    # Training rows per operator at most (random subsample); null for all.
    max_train_per_op: int | None = dataclasses.field(
        default=_default(_calibrate_kernels, "max_train_per_op"), metadata=_range(1)
    )
    # Subsample each table to this many rows first (null: all rows); for quick checks.
    max_rows_per_op: int | None = dataclasses.field(
        default=_default(_calibrate_kernels, "max_rows_per_op"), metadata=_range(1)
    )
    # Predicted-vs-measured plots per operator (needs matplotlib).
    plots: bool = True
    # Also install the fitted constants into the package, so later runs use them.
    install: bool = False
    serving: ServingFitConfig = dataclasses.field(default_factory=ServingFitConfig)
    verbose: bool = False
    compile_cache: str = "auto"


SCHEMAS: dict[str, type] = {
    "search": SearchConfig,
    "simulate": SimulateConfig,
    "validate": ValidateConfig,
    "calibrate": CalibrateConfig,
}
_TARGETS = ("kernels", "serving")
_DATASETS = ("vllm_h100_dev", "silicon_dev")


def register_schemas() -> None:
    """Store every command's schema in Hydra's ConfigStore as ``<command>_schema``."""
    store = ConfigStore.instance()
    for command, schema in SCHEMAS.items():
        store.store(name=f"{command}_schema", node=schema)


def _nested_schema(schema: type, name: str) -> type | None:
    """The dataclass of field ``name`` of ``schema``, or None for a plain or open field."""
    for field in dataclasses.fields(schema):
        if field.name == name and dataclasses.is_dataclass(field.default_factory):
            return field.default_factory
    return None


def _unknown_key(command: str, key: str) -> str:
    """The message for ``key`` (dotted), which the command's schema does not have."""
    schema, parts = SCHEMAS[command], key.split(".")
    for depth, part in enumerate(parts[:-1]):
        inner = _nested_schema(schema, part)
        if inner is None:  # an open group: its builder names the accepted keys
            return f"{key}: not a key of this {'.'.join(parts[: depth + 1])} option"
        schema = inner
    accepted = sorted(f.name for f in dataclasses.fields(schema))
    close = difflib.get_close_matches(parts[-1], accepted, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    elsewhere = [c for c, other in SCHEMAS.items() if c != command and _has_key(other, parts)]
    if elsewhere and not close:
        hint = f" (a key of apex-jax {elsewhere[0]}, not {command})"
    where = f"{'.'.join(parts[:-1])} " if len(parts) > 1 else ""
    return f"unknown key {key!r}{hint}; {where}accepted keys: {', '.join(accepted)}"


def _schema_field(schema: type, parts: list[str]) -> dataclasses.Field | None:
    """The field at the dotted path ``parts`` of ``schema``, or None."""
    for depth, part in enumerate(parts):
        field = next((f for f in dataclasses.fields(schema) if f.name == part), None)
        if field is None or depth == len(parts) - 1:
            return field
        schema = _nested_schema(schema, part)
        if schema is None:
            return None
    return None


def _has_key(schema: type, parts: list[str]) -> bool:
    return _schema_field(schema, parts) is not None


def _field_type(command: str, key: str) -> str:
    """The base type name (``int``, ``float``, ...) of a schema field, or ``""``."""
    field = _schema_field(SCHEMAS[command], key.split("."))
    return "" if field is None else str(field.type).split("|")[0].strip()


def _check_keys(command: str, schema: type, values: Mapping[str, Any], prefix: str = "") -> None:
    """Keys added with ``+key=value`` bypass Hydra's struct check; catch them here."""
    names = {f.name for f in dataclasses.fields(schema)}
    for key, value in values.items():
        if key not in names:
            raise ValueError(_unknown_key(command, f"{prefix}{key}"))
        inner = _nested_schema(schema, key)
        if inner is not None and isinstance(value, Mapping):
            _check_keys(command, inner, value, f"{prefix}{key}.")


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def one_line_config_error(command: str, error: BaseException) -> str:
    """One line for an error Hydra or OmegaConf raised while composing a config.

    Args:
        command: The command whose config was composed.
        error: The exception (its cause is used when it has one).

    Returns:
        A message naming the key and what it accepts, without Hydra's hints on extra lines.
    """
    cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        return _unknown_key(command, key)
    if isinstance(cause, ValidationError) and key:
        want = _TYPE_WORDS.get(_field_type(command, key))
        if want:
            return f"{key} must be {want} (got {getattr(cause, 'value', None)!r})"
        return f"{key}: {str(cause).splitlines()[0]}"
    if isinstance(cause, MissingMandatoryValue) and key:
        return f"{key} is required (the config gives ???): set {key}=<value>"
    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, _, option = str(error.missing_cfg_file).rpartition("/")
        options = sorted(error.options or [])
        listing = f"available: {', '.join(options)}" if options else f"no {group} options exist"
        return f"unknown config option {group}={option}; {listing}"
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if isinstance(error, HydraException) or isinstance(cause, OmegaConfBaseException):
        return " ".join(first.split())
    return first


def _check_ranges(schema: type, values: Mapping[str, Any], prefix: str = "") -> None:
    for field in dataclasses.fields(schema):
        value = values.get(field.name)
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(field.default_factory):
            _check_ranges(field.default_factory, value or {}, f"{key}.")
            continue
        low, high = field.metadata.get("low"), field.metadata.get("high")
        if value is None or (low is None and high is None):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{key} must be a number (got {value!r})")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = (
                f">= {low}"
                if high is None
                else f"<= {high}"
                if low is None
                else f"in [{low}, {high}]"
            )
            raise ValueError(f"{key} must be {bounds} (got {value!r})")


def check_config(command: str, config: Mapping[str, Any]) -> None:
    """Check what composition cannot: keys added with ``+``, value ranges, the calibration
    target. (The objective and what it needs are checked with the other search inputs, by
    :func:`apex_jax.search.check_objective`.)

    Args:
        command: ``search``, ``simulate``, ``validate`` or ``calibrate``.
        config: The composed config as a plain dict.

    Raises:
        ValueError: On the first problem, in one line naming the key and what is accepted.
    """
    _check_keys(command, SCHEMAS[command], config)
    _check_ranges(SCHEMAS[command], config)
    if command == "calibrate" and config["target"] not in _TARGETS:
        raise ValueError(f"target must be one of {', '.join(_TARGETS)} (got {config['target']!r})")
    if command == "validate" and config["dataset"] not in _DATASETS:
        raise ValueError(
            f"dataset must be one of {', '.join(_DATASETS)} (got {config['dataset']!r})"
        )
    if command == "calibrate" and config.get("measurements") and config["target"] != "serving":
        raise ValueError(
            "measurements= holds serving runs: use it with target=serving (got target="
            f"{config['target']})"
        )


register_schemas()
