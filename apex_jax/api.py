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

import math
from collections.abc import Mapping, Sequence
from typing import Any

from apex_jax.deployment import Case, make_case, make_deployment
from apex_jax.evaluate import evaluate_cases, oom_message
from apex_jax.fit_serving import DEFAULT_FIT_FIELDS, ServingFit, fit_runs, resolve_calibration
from apex_jax.hardware import GpuSpec, HardwareParams
from apex_jax.metrics import METRIC_KEYS, SLO
from apex_jax.model_spec import ModelSpec
from apex_jax.plan_space import PlanSet, build_plan_set, load_plan_space, space_from_dict
from apex_jax.plans import PlanSpace
from apex_jax.workload import Workload

__all__ = [
    "INVALID",
    "PlanDoesNotFitError",
    "ServingFit",
    "fit_serving",
    "make_slo",
    "plan_space",
    "simulate",
    "simulate_many",
]

# The status of a simulate_many case whose inputs were rejected (errors="status").
INVALID = "INVALID"


class PlanDoesNotFitError(ValueError):
    """An explicit plan whose weights and activations leave no room for the KV cache."""


def simulate(
    model: str | Mapping[str, Any] | ModelSpec,
    hardware: str | Mapping[str, Any] | GpuSpec,
    num_gpus: int,
    plan: Mapping[str, Any],
    workload: str | Mapping[str, Any] | Workload,
    engine: str | Mapping[str, Any] | None = None,
    *,
    gpus_per_node: int | None = None,
    hw: HardwareParams | None = None,
    slo: Mapping[str, float] | None = None,
    calibration: ServingFit | HardwareParams | str | None = None,
) -> dict[str, Any]:
    """Simulate one explicit plan and return its metrics.

    Args:
        model: A catalog name or alias (``"meta-llama/Llama-3.1-70B"``), a ``conf/model``
            option (``"llama3_1_70b"``), a path to a HuggingFace ``config.json``, a model
            config dict or a ModelSpec.
        hardware: A GPU name (``"h100"``), a custom GPU dict or a GpuSpec.
        num_gpus: GPUs in the cluster.
        plan: Plan columns, e.g. ``{"dp": 2, "tp": 4}``.
        workload: A workload dict, a ``conf/workload`` option (``"lmsys"``) or a Workload.
        engine: An engine dict, a ``conf/engine`` option (``"vllm_0_11_0"``), or None for the
            command line's default preset (vLLM 0.6.0).
        gpus_per_node: GPUs per node (default: up to 8).
        hw: Calibrated hardware constants (default: the datasheet defaults).
        slo: ``{"ttft_s": 0.5, "tpot_s": 0.05}`` adds the SLO attainment keys
            (:data:`apex_jax.metrics.SLO_KEYS`); ``attainment`` sets the target fraction.
        calibration: Fitted constants instead of ``hw``: a :func:`fit_serving` result, a
            bundled calibration name or the path of a JSON written by ``fit.save`` or
            ``apex-jax calibrate``.

    Returns:
        The metrics; a non-OK ``status`` comes with its ``status_reason``.

    Raises:
        TypeError, ValueError: For a bad argument, in one line naming it; an impossible plan;
            or (:class:`PlanDoesNotFitError`) a plan whose weights leave no room for KV cache.
    """
    case = make_case(model, hardware, num_gpus, plan, workload, engine, gpus_per_node)
    message = oom_message(case)
    if message:
        raise PlanDoesNotFitError(message)
    results, _ = evaluate_cases([case], _constants(hw, calibration), slo=make_slo(slo))
    return results[0]


def _constants(hw: HardwareParams | None, calibration) -> HardwareParams | None:
    if hw is not None and calibration is not None:
        raise ValueError("give either hw= or calibration=, not both")
    return hw if calibration is None else resolve_calibration(calibration)


def make_slo(slo: Mapping[str, float] | None) -> SLO | None:
    """An :class:`~apex_jax.metrics.SLO` from ``{"ttft_s": ..., "tpot_s": ..., "attainment":
    ...}``, or None when there are no latency targets (null values mean no target)."""
    if slo is None:
        return None
    if not isinstance(slo, Mapping):
        raise TypeError(
            f"slo must be a dict such as {{'ttft_s': 0.5, 'tpot_s': 0.05}} (got {slo!r})"
        )
    unknown = set(slo) - {"ttft_s", "tpot_s", "attainment"}
    if unknown:
        raise ValueError(
            f"unknown SLO keys {sorted(unknown)}: use ttft_s and tpot_s (seconds) and "
            "attainment (fraction)"
        )
    values = {}
    for key, value in slo.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"slo {key} must be a number > 0 (got {value!r})")
        values[key] = float(value)
    if "ttft_s" not in values and "tpot_s" not in values:
        return None
    return SLO(**values)


_ERROR_MODES = ("raise", "status")


def simulate_many(
    cases: Sequence[Mapping[str, Any]],
    *,
    hw: HardwareParams | None = None,
    calibration: ServingFit | HardwareParams | str | None = None,
    errors: str = "raise",
) -> list[dict[str, Any]]:
    """Simulate many ``simulate`` keyword dicts in one batched engine run.

    A case whose plan does not fit returns ``status == "OOM"`` with its ``status_reason``
    instead of raising, so one plan too big does not sink a sweep; every non-OK status has
    its ``status_reason``.

    Args:
        cases: The cases, each a dict of :func:`simulate`'s arguments (``slo`` excepted).
        hw: Calibrated hardware constants (default: the datasheet defaults).
        calibration: Fitted constants instead of ``hw``, as for :func:`simulate`.
        errors: What a malformed case does: ``"raise"`` raises its error, prefixed by
            ``case <index>:``; ``"status"`` gives it a result with ``status == "INVALID"``,
            the message as ``status_reason`` and every metric NaN, and simulates the others.

    Returns:
        One result per case, in order.

    Raises:
        TypeError, ValueError: For an empty list, an unknown ``errors`` mode, or (with
            ``errors="raise"``) the first malformed case, naming its index.
    """
    if errors not in _ERROR_MODES:
        raise ValueError(f"errors must be one of {', '.join(_ERROR_MODES)} (got {errors!r})")
    if isinstance(cases, (str, bytes, Mapping)) or not isinstance(cases, Sequence):
        raise TypeError(f"cases must be a list of simulate() keyword dicts (got {cases!r})")
    if not cases:
        raise ValueError("simulate_many needs at least one case (got an empty list)")
    resolved: dict[int, Case] = {}
    invalid: dict[int, str] = {}
    for i, kwargs in enumerate(cases):
        try:
            if not isinstance(kwargs, Mapping):
                raise TypeError(f"a case must be a dict of simulate() arguments (got {kwargs!r})")
            resolved[i] = make_case(**dict(kwargs))
        except (TypeError, ValueError, FileNotFoundError) as err:
            if errors == "raise":
                raise type(err)(f"case {i}: {err}") from err
            invalid[i] = f"case {i}: {err}"
    constants = _constants(hw, calibration)
    results = evaluate_cases(list(resolved.values()), constants)[0] if resolved else []
    by_index = dict(zip(resolved, results))
    for i, message in invalid.items():
        by_index[i] = {
            "status": INVALID,
            "status_reason": message,
            **dict.fromkeys(METRIC_KEYS, math.nan),
        }
    return [by_index[i] for i in range(len(cases))]


def fit_serving(
    cases: Sequence[Mapping[str, Any]],
    measured: Sequence[Mapping[str, float]],
    *,
    fields: Sequence[str] = DEFAULT_FIT_FIELDS,
    steps: int = 40,
    learning_rate: float = 0.05,
    prior_weight: float = 1.0,
) -> ServingFit:
    """Fit the engine-level constants to your measured serving runs.

    Args:
        cases: :func:`simulate` keyword dicts, one per measured run (``model, hardware,
            num_gpus, plan, workload, engine``).
        measured: Per case a dict with ``ttft_mean_s`` and ``tpot_mean_s`` in seconds (TPOT
            is compared with the token-weighted mean, ``tpot_token_mean_s``).
        fields: The ``HardwareParams`` fields to fit (log multipliers).
        steps: Adam steps; each simulates every case.
        learning_rate: Adam's step size in log space.
        prior_weight: Pull towards the default constants (see
            :func:`apex_jax.fit_serving.fit_serving`); 0 for none.

    Returns:
        A :class:`ServingFit`: pass it as ``calibration=`` to :func:`simulate` or
        :func:`simulate_many`; ``fit.save(path)`` and ``ServingFit.load(path)``.

    Raises:
        TypeError, ValueError: For a malformed case or measurement, naming its index, or
            (:class:`PlanDoesNotFitError`) a plan whose weights leave no room for KV cache.
    """
    resolved = []
    for i, kwargs in enumerate(cases):
        try:
            resolved.append(make_case(**dict(kwargs)))
        except (TypeError, ValueError, FileNotFoundError) as err:
            raise type(err)(f"case {i}: {err}") from err
        message = oom_message(resolved[-1])
        if message:
            raise PlanDoesNotFitError(f"case {i}: {message}")
    return fit_runs(
        resolved,
        measured,
        fields=tuple(fields),
        steps=steps,
        learning_rate=learning_rate,
        prior_weight=prior_weight,
    )


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
