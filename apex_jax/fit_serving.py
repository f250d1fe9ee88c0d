"""Fit engine-level constants to measured serving runs, by gradient through the simulator.

The prediction of a measured instance's mean TTFT and token-weighted TPOT is a JAX function
of the :class:`~apex_jax.hardware.HardwareParams`: cost coefficients, then the batching
recurrence, then the per-replica means. Scheduling decisions (who is admitted, how long a
decode run lasts) are piecewise constant in the constants, so within a step they are held
fixed and the derivative flows through the times, as is usual for such fits. Reverse mode
does not pass through ``while_loop``, so the gradient is taken in forward mode
(``jax.jacfwd``): one tangent per fitted constant, cheap for the few fitted here. optax's
Adam then steps in log space, where every constant is a dimensionless log multiplier.

The loss is the mean squared log error of TTFT and TPOT over the training instances.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from apex_jax.deployment import Case
from apex_jax.evaluate import (
    LaneBatch,
    build_lane_batch,
    case_coeffs,
    run_batch,
    set_case_constants,
    simulate_batch,
    slot_capacity,
    split_lanes,
)
from apex_jax.hardware import HardwareParams, default_hardware_params, save_hardware_params
from apex_jax.io import write_json
from apex_jax.plans import COL
from apex_jax.simulator import LaneResult
from apex_jax.status import LIVE, OK
from apex_jax.validate import load_measurements, measurement_cases

__all__ = [
    "DEFAULT_FIT_FIELDS",
    "ServingProblem",
    "build_problem",
    "calibrate_serving_from_config",
    "cross_validate",
    "fit_serving",
    "predict_serving_metrics",
]

# The per-iteration overhead and the efficiency multipliers (issue 4).
DEFAULT_FIT_FIELDS: tuple[str, ...] = (
    "log_iteration_overhead_scale",
    "log_compute_eff",
    "log_attn_compute_eff",
    "log_memory_eff",
)


@dataclasses.dataclass(frozen=True)
class ServingProblem:
    """Measured instances prepared for repeated, differentiable simulation."""

    cases: list[Case]
    batch: LaneBatch  # [L, ...] every lane of the cases, cost constants left as zeros
    segment: np.ndarray  # [L, N] int, measured instance of each request slot; R = padding
    measured: np.ndarray  # [R, 2] float64, measured (TTFT mean, TPOT mean) in seconds
    labels: list[str]  # [R] "trace DPxTPy replica r"
    num_slots: int


# Slot cap of a fit: the measured runs never hold more requests at once, and a larger state
# makes every gradient step slower.
_MAX_FIT_SLOTS = 64


def build_problem(rows: Sequence[Mapping[str, str]], **case_kwargs) -> ServingProblem:
    """Prepare the measured instances of ``rows`` (see :mod:`apex_jax.validate`)."""
    cases, groups = measurement_cases(rows, **case_kwargs)
    lanes = split_lanes(cases).lanes
    bad = [lane for lane in lanes if lane.status not in (LIVE, OK)]
    if bad:
        raise ValueError(f"{len(bad)} measured instances cannot be simulated (OOM/INFEASIBLE)")
    batch = build_lane_batch(cases, lanes)
    measured, labels = [], []
    index_of: dict[tuple[int, int], int] = {}
    for c, members in enumerate(groups):
        for row in members:
            index_of[(c, int(row["replica"]))] = len(measured)
            measured.append([float(row["ttft_mean_s"]), float(row["tpot_mean_s"])])
            labels.append(
                f"{row.get('trace', row['served_trace'])} "
                f"DP{row['dp']}xTP{row['tp']} replica {row['replica']}"
            )
    num_rows = len(measured)
    segment = np.full(batch.inputs.arrival_s.shape, num_rows, np.int32)
    for i, lane in enumerate(lanes):
        dp = int(cases[lane.case].plan[COL["dp"]])
        segment[i, : len(lane.request_ids)] = index_of.get((lane.case, lane.replica % dp), num_rows)
    num_slots = min(slot_capacity(lanes), _MAX_FIT_SLOTS)
    return ServingProblem(cases, batch, segment, np.asarray(measured), labels, num_slots)


def predict_serving_metrics(problem: ServingProblem, hw: HardwareParams) -> jax.Array:
    """Predicted ``[R, 2]`` (TTFT mean, token-weighted TPOT mean) in seconds; JAX in ``hw``."""
    out = run_batch(problem.batch, case_coeffs(problem.cases, hw), num_slots=problem.num_slots)
    return _instance_means(problem, out)


def _instance_means(problem: ServingProblem, out: LaneResult) -> jax.Array:
    """Mean TTFT and token-weighted TPOT of every measured instance from its lanes' results
    (``[R, 2]``); NaN everywhere if a lane did not finish."""
    num_rows = problem.measured.shape[0]
    seg = jnp.asarray(problem.segment)
    valid = seg < num_rows
    first = jnp.where(valid, out.first_token_s, 0.0)
    finish = jnp.where(valid, out.finish_s, 0.0)
    arrival = jnp.where(valid, jnp.asarray(problem.batch.inputs.arrival_s), 0.0)
    output = jnp.asarray(problem.batch.inputs.output)
    decoding = valid & (output > 1)

    def per_row(x):
        return jax.ops.segment_sum(x.ravel(), seg.ravel(), num_segments=num_rows + 1)[:-1]

    ttft = per_row(first - arrival) / per_row(valid.astype(jnp.float64))
    tpot = per_row(jnp.where(decoding, finish - first, 0.0)) / per_row(
        jnp.where(decoding, output - 1, 0).astype(jnp.float64)
    )
    # A lane that did not finish cannot be fitted: make that loud rather than silent.
    finished = jnp.all(out.status == OK)
    return jnp.where(finished, jnp.stack([ttft, tpot], axis=1), jnp.nan)


def _with_fields(base: HardwareParams, fields: Sequence[str], theta) -> HardwareParams:
    return base._replace(**{name: theta[i] for i, name in enumerate(fields)})


def fit_serving(
    problem: ServingProblem,
    *,
    base: HardwareParams | None = None,
    fields: Sequence[str] = DEFAULT_FIT_FIELDS,
    steps: int = 40,
    learning_rate: float = 0.05,
    prior_weight: float = 1.0,
) -> tuple[HardwareParams, list[float]]:
    """Fit ``fields`` of ``base`` to the problem's measurements with optax Adam.

    ``prior_weight`` pulls the constants towards ``base`` (a Gaussian prior in log space):
    a few serving runs cannot tell overhead from efficiency apart, and without the pull a fit
    to one trace wanders to values that hurt another.

    Returns:
        The fitted parameters and the loss after every step.
    """
    base = default_hardware_params() if base is None else base
    log_measured = jnp.log(jnp.asarray(problem.measured))

    theta0 = jnp.asarray([float(getattr(base, f)) for f in fields])

    def loss(theta):
        pred = predict_serving_metrics(problem, _with_fields(base, fields, theta))
        misfit = jnp.mean((jnp.log(pred) - log_measured) ** 2)
        return misfit + prior_weight * jnp.mean((theta - theta0) ** 2)

    value_and_grad = jax.jit(lambda t: (loss(t), jax.jacfwd(loss)(t)))
    theta = theta0
    optimizer = optax.adam(learning_rate)
    state = optimizer.init(theta)
    history = []
    best = (math.inf, theta)
    # A bar with an ETA over the steps (on a terminal only): a step simulates every run.
    for _ in tqdm(range(steps), desc="serving fit", unit="step", file=sys.stderr, disable=None):
        value, grad = value_and_grad(theta)
        value = float(value)
        if not math.isfinite(value):
            raise FloatingPointError("serving fit diverged: a simulated lane did not finish")
        history.append(value)
        if value < best[0]:
            best = (value, theta)
        updates, state = optimizer.update(grad, state)
        theta = optax.apply_updates(theta, updates)
    return _with_fields(base, fields, best[1]), history


def _mape(problem: ServingProblem, hw: HardwareParams) -> dict[str, float]:
    """Mean absolute percentage error of the predictions with ``hw``, per metric."""
    batch = set_case_constants(problem.batch, case_coeffs(problem.cases, hw))
    pred = np.asarray(_instance_means(problem, simulate_batch(batch, num_slots=problem.num_slots)))
    err = np.abs(pred / problem.measured - 1.0) * 100.0
    return {"ttft_mean_s": float(np.mean(err[:, 0])), "tpot_mean_s": float(np.mean(err[:, 1]))}


def cross_validate(
    rows: Sequence[Mapping[str, str]],
    *,
    split_column: str = "trace",
    folds: Sequence[tuple[str, str]] | None = None,
    **fit_kwargs,
) -> dict[str, Any]:
    """Fit on one group of measurements and report the error on another, for each fold.

    Args:
        rows: measurement rows.
        split_column: the column whose values define the groups (default ``trace``).
        folds: ``(train_value, test_value)`` pairs; default every ordered pair of groups.

    Returns:
        Per fold the train/test groups, MAPE before and after the fit on the held-out group,
        and the mean held-out MAPE over folds.
    """
    values = sorted({row[split_column] for row in rows})
    folds = folds or [(a, b) for a in values for b in values if a != b]
    report = []
    for train, test in folds:
        train_p = build_problem([r for r in rows if r[split_column] == train])
        test_p = build_problem([r for r in rows if r[split_column] == test])
        hw, history = fit_serving(train_p, **fit_kwargs)
        report.append(
            {
                "train": train,
                "test": test,
                "heldout_mape_pct_before": _mape(test_p, default_hardware_params()),
                "heldout_mape_pct_after": _mape(test_p, hw),
                "train_loss_first_last": [history[0], history[-1]],
                "fitted": {k: float(getattr(hw, k)) for k in hw._fields},
            }
        )
    mean = {
        key: float(np.mean([f["heldout_mape_pct_after"][key] for f in report]))
        for key in ("ttft_mean_s", "tpot_mean_s")
    }
    return {"folds": report, "heldout_mape_pct_mean": mean}


def calibrate_serving_from_config(config: Mapping[str, Any], out_dir: str | Path) -> dict:
    """``apex-jax calibrate target=serving``: cross-validate, fit on everything, write files.

    Config keys: ``measurements`` (bundled name or path), ``folds`` (list of
    ``[train_trace, test_trace]``), ``fields``, ``steps``, ``learning_rate``, ``name`` (the
    name later runs load the constants by, e.g. ``calibration=<name>``).
    """
    rows = load_measurements(config.get("measurements"))
    fit_kwargs = {
        "fields": tuple(config.get("fields") or DEFAULT_FIT_FIELDS),
        "steps": int(config.get("steps", 40)),
        "learning_rate": float(config.get("learning_rate", 0.05)),
        "prior_weight": float(config.get("prior_weight", 1.0)),
    }
    folds = [tuple(f) for f in config.get("folds") or []] or None
    report = cross_validate(rows, folds=folds, **fit_kwargs)
    print("held-out error after fitting on the other trace (MAPE, %):")
    print(
        f"{'train':<22} {'test':<22} {'TTFT before':>11} {'TTFT after':>10} "
        f"{'TPOT before':>11} {'TPOT after':>10}"
    )
    for fold in report["folds"]:
        b, a = fold["heldout_mape_pct_before"], fold["heldout_mape_pct_after"]
        print(
            f"{fold['train']:<22} {fold['test']:<22} {b['ttft_mean_s']:>11.1f} "
            f"{a['ttft_mean_s']:>10.1f} {b['tpot_mean_s']:>11.1f} {a['tpot_mean_s']:>10.1f}"
        )
    mean = report["heldout_mape_pct_mean"]
    print(f"mean held-out MAPE: TTFT {mean['ttft_mean_s']:.1f} %, TPOT {mean['tpot_mean_s']:.1f} %")

    hw, history = fit_serving(build_problem(rows), **fit_kwargs)
    name = str(config.get("name") or "serving")
    out_dir = Path(out_dir)
    save_hardware_params(
        hw,
        out_dir / f"{name}.json",
        note=f"fitted by apex-jax calibrate target=serving to {len(rows)} instances",
    )
    report["final_loss_first_last"] = [history[0], history[-1]]
    write_json(out_dir / "serving_calibration.json", report)
    print(
        f"wrote {out_dir / (name + '.json')} (load with calibration={out_dir / (name + '.json')})"
        f" and {out_dir / 'serving_calibration.json'}"
    )
    return report
