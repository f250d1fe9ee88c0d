"""The Python API: ``simulate`` one plan, ``simulate_many`` cases in one engine call, and
``plan_space`` to see the plans of a deployment without simulating them.

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

from apex_jax.deployment import Case, make_case, make_deployment
from apex_jax.evaluate import evaluate_cases
from apex_jax.hardware import GpuSpec, HardwareParams
from apex_jax.memory import memory_plan
from apex_jax.metrics import SLO
from apex_jax.model_spec import ModelSpec
from apex_jax.plan_space import PlanSet, build_plan_set, load_plan_space, space_from_dict
from apex_jax.plans import COL, PlanSpace
from apex_jax.workload import Workload

__all__ = ["PlanDoesNotFitError", "make_slo", "plan_space", "simulate", "simulate_many"]


class PlanDoesNotFitError(ValueError):
    """An explicit plan whose weights and activations leave no room for the KV cache."""


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
    hardware: str | Mapping[str, Any] | GpuSpec,
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

    ``slo`` (``{"ttft_s": 0.5, "tpot_s": 0.05}``) adds the SLO attainment keys
    (:data:`apex_jax.metrics.SLO_KEYS`).

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
    """An :class:`~apex_jax.metrics.SLO` from ``{"ttft_s": ..., "tpot_s": ..., "attainment":
    ...}`` (or None when there are no latency targets)."""
    if not slo or all(slo.get(k) is None for k in ("ttft_s", "tpot_s")):
        return None
    unknown = set(slo) - {"ttft_s", "tpot_s", "attainment"}
    if unknown:
        raise ValueError(
            f"unknown SLO keys {sorted(unknown)}: use ttft_s and tpot_s (seconds) and "
            "attainment (fraction)"
        )
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


def plan_space(
    model: Any,
    hardware: str | Mapping[str, Any] | GpuSpec,
    num_gpus: int,
    *,
    space: str | PlanSpace | Mapping[str, Any] = "default",
    gpus_per_node: int | None = None,
    engine: Mapping[str, Any] | None = None,
) -> PlanSet:
    """The plan set of serving ``model`` on ``num_gpus`` GPUs of type ``hardware``.

    Args:
        model: a catalog name or alias, a path to a HuggingFace ``config.json``, or a
            :class:`~apex_jax.model_spec.ModelSpec`.
        hardware: a GPU name (``"H100-SXM-80GB"``, ``"h100"``, ...), a custom GPU dict
            (:func:`~apex_jax.hardware.gpu_from_dict`) or a ``GpuSpec``.
        num_gpus: GPUs in the cluster.
        space: a bundled ``conf/plan_space`` name, a config dict of the same keys, or a
            :class:`~apex_jax.plans.PlanSpace`.
        gpus_per_node: GPUs per node (default: up to 8 per node).
        engine: engine preset and knobs, as for :func:`apex_jax.simulate`.

    Returns:
        A :class:`PlanSet`; ``len(s)`` plans, ``s.describe()`` their descriptions.
    """
    deployment = make_deployment(model, hardware, num_gpus, engine, gpus_per_node)
    knobs = deployment.engine.plan_knobs()
    if isinstance(space, str):
        space = load_plan_space(space, knobs)
    elif not isinstance(space, PlanSpace):
        space = space_from_dict(space, knobs)
    return build_plan_set(deployment, space)
