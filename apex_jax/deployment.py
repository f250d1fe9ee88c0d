"""What is simulated: a :class:`Deployment` (model, GPUs, engine) and a :class:`Case` (one plan
of a deployment under one workload), resolved from names and checked before anything runs.

The command line and the Python API both resolve their inputs here, so they accept the same
names and fail with the same one-line messages: a model, engine or workload may be given by
its config-group option name (``"llama3_1_70b"``, ``"vllm_0_6_0"``, ``"lmsys"``, the files of
``conf/<group>/``) as well as by the names and dicts the domain modules take.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from apex_jax.checks import as_count
from apex_jax.engine_config import EngineConfig, resolve_engine
from apex_jax.hardware import GpuSpec, resolve_gpu
from apex_jax.model_spec import ModelSpec, load_model
from apex_jax.paths import config_option, config_options
from apex_jax.plans import BOOST_CLOCK, COL, check_plan, plan_row
from apex_jax.workload import Workload, workload_from_dict

__all__ = [
    "Case",
    "Deployment",
    "make_case",
    "make_deployment",
    "model_from_config",
    "resolve_model",
    "resolve_workload",
]


@dataclasses.dataclass(frozen=True)
class Deployment:
    """What is served on what: static Python values, never traced."""

    model: ModelSpec
    gpu: GpuSpec
    num_gpus: int
    gpus_per_node: int
    engine: EngineConfig  # resolved for the model (see EngineConfig.for_model)


class Case(NamedTuple):
    """One plan of one deployment under one workload."""

    deployment: Deployment
    plan: np.ndarray  # [F] int32 plan row
    workload: Workload


def model_from_config(model: Mapping[str, Any]) -> ModelSpec:
    """A model config dict (``{"name": ..., "moe_routing_skew": 0.3}``): the named model with
    the dict's other keys, ModelSpec fields, replaced."""
    if "name" not in model:
        raise ValueError(f"a model config needs 'name' (got keys {sorted(model)})")
    overrides = {k: v for k, v in model.items() if k != "name" and v is not None}
    fields = {f.name for f in dataclasses.fields(ModelSpec)} - {"name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown model keys {unknown}: the model group takes 'name' and ModelSpec fields "
            f"({', '.join(sorted(fields))})"
        )
    spec = load_model(str(model["name"]))
    return dataclasses.replace(spec, **overrides) if overrides else spec


def resolve_model(model: str | Mapping[str, Any] | ModelSpec) -> ModelSpec:
    """A model from a ModelSpec, a config dict, a ``conf/model`` option name, a catalog name
    or alias, or a path to a HuggingFace ``config.json``."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, Mapping):
        return model_from_config(model)
    if not isinstance(model, str):
        raise TypeError(
            "model must be a model name, a path to a config.json, a model config dict or a "
            f"ModelSpec (got {model!r})"
        )
    option = config_option("model", model)
    return load_model(model) if option is None else model_from_config(option)


def _engine_spec(engine: str | Mapping[str, Any] | None) -> dict[str, Any]:
    if engine is None:
        return {}
    if isinstance(engine, str):
        option = config_option("engine", engine)
        if option is None:
            raise ValueError(
                f"unknown engine {engine!r}: give a conf/engine option "
                f"({', '.join(config_options('engine'))}) or a dict such as "
                "{'name': 'vllm', 'version': '0.6.0'}"
            )
        engine = option
    if not isinstance(engine, Mapping):
        raise TypeError(
            f"engine must be a dict, a conf/engine option name or None (got {engine!r})"
        )
    return {k: v for k, v in engine.items() if v is not None}


def resolve_workload(workload: str | Mapping[str, Any] | Workload) -> Workload:
    """A workload from a Workload, a workload dict or a ``conf/workload`` option name."""
    if isinstance(workload, Workload):
        return workload
    if isinstance(workload, str):
        option = config_option("workload", workload)
        if option is None:
            raise ValueError(
                f"unknown workload {workload!r}: give a conf/workload option "
                f"({', '.join(config_options('workload'))}), a workload dict such as "
                "{'kind': 'trace', 'path': ...} or a Workload"
            )
        workload = option
    if not isinstance(workload, Mapping):
        raise TypeError(
            "workload must be a workload dict ({'kind': 'trace', 'path': ...}), a "
            f"conf/workload option name or a Workload (got {workload!r})"
        )
    return workload_from_dict(dict(workload))


def make_deployment(
    model: str | Mapping[str, Any] | ModelSpec,
    hardware: str | Mapping[str, Any] | GpuSpec,
    num_gpus: int,
    engine: str | Mapping[str, Any] | None = None,
    gpus_per_node: int | None = None,
) -> Deployment:
    """Resolve names into a :class:`Deployment`; every error names the argument.

    Args:
        model: See :func:`resolve_model`.
        hardware: A GPU name, a custom GPU dict or a GpuSpec (see
            :func:`~apex_jax.hardware.resolve_gpu`).
        num_gpus: GPUs in the cluster, >= 1.
        engine: An engine dict, a ``conf/engine`` option name, or None for the default
            preset (:data:`~apex_jax.engine_config.DEFAULT_ENGINE`, as on the command line).
        gpus_per_node: GPUs per node, dividing ``num_gpus`` (default: up to 8).
    """
    spec = resolve_model(model)
    gpu = resolve_gpu(hardware)
    num_gpus = as_count(num_gpus, "num_gpus")
    per_node = (
        min(num_gpus, 8) if gpus_per_node is None else as_count(gpus_per_node, "gpus_per_node")
    )
    if num_gpus % per_node != 0:
        raise ValueError(
            f"gpus_per_node={per_node} must divide num_gpus={num_gpus}: a cluster is "
            "nodes x GPUs per node"
        )
    config = resolve_engine(_engine_spec(engine)).for_model(
        spec.max_position_embeddings, gpu.hbm_capacity_bytes, gpu.name
    )
    return Deployment(spec, gpu, num_gpus, per_node, config)


def _check_plan(row: np.ndarray, dep: Deployment) -> None:
    dp, tp, pp, attn_tp = (int(row[COL[k]]) for k in ("dp", "tp", "pp", "attn_tp"))
    m = dep.model
    if dp * tp * pp > dep.num_gpus:
        raise ValueError(
            f"plan dp={dp} x tp={tp} x pp={pp} needs {dp * tp * pp} GPUs but num_gpus="
            f"{dep.num_gpus}: lower a degree or raise num_gpus"
        )
    if m.num_heads % attn_tp != 0 or (
        m.num_kv_heads % attn_tp != 0 and attn_tp % m.num_kv_heads != 0
    ):
        name = "tp" if attn_tp == tp else "attn_tp"
        raise ValueError(
            f"{name}={attn_tp} does not split {m.name}'s {m.num_heads} attention heads / "
            f"{m.num_kv_heads} KV heads evenly: pick a {name} that divides both"
        )
    if dep.gpus_per_node % tp != 0 and tp % dep.gpus_per_node != 0:
        raise ValueError(
            f"tp={tp} neither divides the {dep.gpus_per_node} GPUs of a node nor fills whole "
            "nodes: a stage sits inside a node or spans whole nodes"
        )
    if pp > m.num_layers:
        raise ValueError(f"pp={pp} exceeds the model's {m.num_layers} layers")
    problem = check_plan(
        row,
        m,
        num_gpus=dep.num_gpus,
        gpus_per_node=dep.gpus_per_node,
        max_clock_mhz=dep.gpu.max_clock_mhz,
    )
    # Start-up checks that vLLM applies to its arguments (a budget below max_model_len
    # without chunked prefill) are the plan's status, not an input error:
    # apex_jax.memory.startup_refusals.
    if problem:
        raise ValueError(problem)


def make_case(
    model: str | Mapping[str, Any] | ModelSpec,
    hardware: str | Mapping[str, Any] | GpuSpec,
    num_gpus: int,
    plan: Mapping[str, Any],
    workload: str | Mapping[str, Any] | Workload,
    engine: str | Mapping[str, Any] | None = None,
    gpus_per_node: int | None = None,
) -> Case:
    """Resolve and validate one simulation case without running it (arguments as for
    :func:`make_deployment`; ``plan`` is a dict of plan columns, ``workload`` as for
    :func:`resolve_workload`)."""
    if not isinstance(plan, Mapping):
        raise TypeError(f"plan must be a dict of plan columns such as {{'tp': 8}} (got {plan!r})")
    dep = make_deployment(model, hardware, num_gpus, engine, gpus_per_node)
    row = plan_row(plan, defaults=dep.engine.plan_knobs())
    # Explicit rows: the boost clock by its value, and the encoder over the whole stage.
    if row[COL["gpu_clock_mhz"]] == BOOST_CLOCK:
        row[COL["gpu_clock_mhz"]] = round(dep.gpu.max_clock_mhz)
    if dep.model.is_encoder_decoder and row[COL["enc_tp"]] == 0:
        row[COL["enc_tp"]] = row[COL["tp"]]
    _check_plan(row, dep)
    return Case(dep, row, resolve_workload(workload))
