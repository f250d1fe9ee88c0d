"""The Python API: ``simulate`` one plan, ``simulate_many`` cases in one engine call.

These names and result keys are a contract that validation and benchmark scripts build on::

    r = apex_jax.simulate(model="meta-llama/Llama-3.1-70B", hardware="H100-SXM-80GB",
                          num_gpus=8, plan={"dp": 2, "tp": 4, "pp": 1},
                          workload={"kind": "trace", "path": "lmsys_05.csv"},
                          engine={"name": "vllm", "version": "0.6.0"})
    r["ttft_mean_s"], r["tpot_mean_s"], r["e2e_sum_s"], r["status"]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from apex_jax.engine import resolve_engine
from apex_jax.evaluate import Case, Deployment, evaluate_cases
from apex_jax.hardware import HardwareParams, get_gpu
from apex_jax.memory import memory_plan
from apex_jax.metrics import SLO
from apex_jax.model_spec import ModelSpec, load_model
from apex_jax.plans import BOOST_CLOCK, COL, check_plan, plan_row
from apex_jax.workload import Workload, workload_from_dict

__all__ = ["PlanDoesNotFitError", "make_case", "make_deployment", "simulate", "simulate_many"]


class PlanDoesNotFitError(ValueError):
    """An explicit plan whose weights and activations leave no room for the KV cache."""


def make_deployment(
    model: str | ModelSpec,
    hardware: str,
    num_gpus: int,
    engine: Mapping[str, Any] | None = None,
    gpus_per_node: int | None = None,
) -> Deployment:
    """Resolve names into a :class:`~apex_jax.evaluate.Deployment` (errors name the input)."""
    spec = model if isinstance(model, ModelSpec) else load_model(str(model))
    gpu = get_gpu(str(hardware))
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
    hardware: str,
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


def _oom_message(case: Case) -> str | None:
    mem = memory_plan(case.plan[None, :], case.deployment.model, case.deployment.gpu)
    if not mem.is_oom[0]:
        return None
    dep = case.deployment
    util = case.plan[COL["gpu_mem_util_permille"]] / 1000.0
    return (
        f"plan does not fit: {mem.weight_bytes[0] / 1e9:.1f} GB of weights and "
        f"{mem.activation_bytes[0] / 1e9:.1f} GB of activations per GPU leave no KV cache in "
        f"{util:.2f} x {dep.gpu.hbm_capacity_bytes / 1e9:.1f} GB of {dep.gpu.name}: raise tp or "
        "pp, use lower-precision weights, or lower max_num_batched_tokens"
    )


def simulate(
    model: str | ModelSpec,
    hardware: str,
    num_gpus: int,
    plan: Mapping[str, Any],
    workload: Mapping[str, Any] | Workload,
    engine: Mapping[str, Any] | None = None,
    *,
    gpus_per_node: int | None = None,
    hw: HardwareParams | None = None,
    slo: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Simulate one explicit plan and return its metrics.

    ``slo`` (``{"ttft_s": 0.5, "tpot_s": 0.05}``) adds ``slo_attainment`` and ``goodput_req_s``.

    Raises:
        ValueError: on an unknown model or GPU, a malformed workload, an impossible plan, or
            (:class:`PlanDoesNotFitError`) a plan whose weights leave no room for KV cache.
    """
    case = make_case(model, hardware, num_gpus, plan, workload, engine, gpus_per_node)
    message = _oom_message(case)
    if message:
        raise PlanDoesNotFitError(message)
    results, _ = evaluate_cases([case], hw, slo=make_slo(slo))
    return results[0]


def make_slo(slo: Mapping[str, float] | None) -> SLO | None:
    """An :class:`~apex_jax.metrics.SLO` from ``{"ttft_s": ..., "tpot_s": ...}`` (or None)."""
    if not slo:
        return None
    unknown = set(slo) - {"ttft_s", "tpot_s"}
    if unknown:
        raise ValueError(f"unknown SLO keys {sorted(unknown)}: use ttft_s and tpot_s (seconds)")
    return SLO(**{k: float(v) for k, v in slo.items() if v is not None})


def simulate_many(
    cases: Sequence[Mapping[str, Any]], *, hw: HardwareParams | None = None
) -> list[dict[str, Any]]:
    """Simulate many ``simulate`` keyword dicts in one batched engine run.

    A case whose plan does not fit returns ``status == "OOM"`` and a ``message`` instead of
    raising, so one bad case does not sink a sweep. Malformed inputs still raise.
    """
    resolved = [make_case(**dict(kwargs)) for kwargs in cases]
    results, _ = evaluate_cases(resolved, hw)
    for case, result in zip(resolved, results):
        message = _oom_message(case)
        if message:
            result["message"] = message
    return results
