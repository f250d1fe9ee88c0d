"""What is simulated: a :class:`Deployment` (model, GPUs, engine) and a :class:`Case` (one plan
of a deployment under one workload), resolved from names and checked before anything runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from apex_jax.engine_config import EngineConfig, resolve_engine
from apex_jax.hardware import GpuSpec, resolve_gpu
from apex_jax.model_spec import ModelSpec, load_model
from apex_jax.plans import BOOST_CLOCK, COL, check_plan, plan_row
from apex_jax.workload import Workload, workload_from_dict

__all__ = ["Case", "Deployment", "make_case", "make_deployment"]


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


def make_deployment(
    model: str | ModelSpec,
    hardware: str | Mapping[str, Any] | GpuSpec,
    num_gpus: int,
    engine: Mapping[str, Any] | None = None,
    gpus_per_node: int | None = None,
) -> Deployment:
    """Resolve names into a :class:`Deployment` (errors name the input)."""
    spec = model if isinstance(model, ModelSpec) else load_model(str(model))
    gpu = resolve_gpu(hardware)
    if int(num_gpus) < 1:
        raise ValueError(f"num_gpus must be >= 1 (got {num_gpus})")
    per_node = int(gpus_per_node) if gpus_per_node else min(int(num_gpus), 8)
    if per_node < 1 or int(num_gpus) % per_node != 0:
        raise ValueError(
            f"gpus_per_node={per_node} must divide num_gpus={num_gpus}: a cluster is "
            "nodes x GPUs per node"
        )
    config = resolve_engine(engine).for_model(
        spec.max_position_embeddings, gpu.hbm_capacity_bytes, gpu.name
    )
    return Deployment(spec, gpu, int(num_gpus), per_node, config)


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
    if dep.gpus_per_node % tp != 0:
        raise ValueError(
            f"tp={tp} does not divide the {dep.gpus_per_node} GPUs of a node: a stage's "
            "GPUs stay inside a node; use pp or dp across nodes"
        )
    if pp > m.num_layers:
        raise ValueError(f"pp={pp} exceeds the model's {m.num_layers} layers")
    problem = check_plan(
        row,
        m,
        num_gpus=dep.num_gpus,
        gpus_per_node=dep.gpus_per_node,
        max_clock_mhz=dep.gpu.max_clock_mhz,
        max_model_len=dep.engine.max_model_len,
    )
    if problem:
        raise ValueError(problem)


def make_case(
    model: str | ModelSpec,
    hardware: str | Mapping[str, Any] | GpuSpec,
    num_gpus: int,
    plan: Mapping[str, Any],
    workload: Mapping[str, Any] | Workload,
    engine: Mapping[str, Any] | None = None,
    gpus_per_node: int | None = None,
) -> Case:
    """Resolve and validate one simulation case without running it."""
    dep = make_deployment(model, hardware, num_gpus, engine, gpus_per_node)
    row = plan_row(plan, defaults=dep.engine.plan_knobs())
    # Explicit rows: the boost clock by its value, and the encoder over the whole stage.
    if row[COL["gpu_clock_mhz"]] == BOOST_CLOCK:
        row[COL["gpu_clock_mhz"]] = round(dep.gpu.max_clock_mhz)
    if dep.model.is_encoder_decoder and row[COL["enc_tp"]] == 0:
        row[COL["enc_tp"]] = row[COL["tp"]]
    _check_plan(row, dep)
    wl = workload if isinstance(workload, Workload) else workload_from_dict(dict(workload))
    return Case(dep, row, wl)
