"""Fit engine-level constants to measured serving runs, by gradient through the simulator.

The prediction of a measured instance's mean TTFT and token-weighted TPOT is a JAX function
of the :class:`~apex_jax.hardware.HardwareParams`: cost coefficients, then the batching
recurrence, then the per-replica means. Scheduling decisions (who is admitted, how long a
decode run lasts) are piecewise constant in the constants, so within a step they are held
fixed and the derivative flows through the times, as is usual for such fits. Reverse mode
does not pass through ``while_loop``, so the gradient is taken in forward mode: one tangent
per fitted constant, cheap for the few fitted here. The cost coefficients' tangents are taken
first, and the engine pushes them through in one jitted program whose arguments are the
lanes; a cross-validation's folds fit subsets of one problem's rows, so every fold, every step
and the final fit share one compile. optax's Adam then steps in
log space, where every constant is a dimensionless log multiplier.

The loss is the mean squared log error of TTFT and TPOT over the training instances.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from apex_jax.cost.iteration import PRICING_COMPILER_OPTIONS, CostCoeffs
from apex_jax.deployment import Case
from apex_jax.evaluate import (
    Lane,
    LaneBatch,
    build_lane_batch,
    case_coeffs,
    replica_groups,
    run_batch,
    slot_capacity,
    split_lanes,
)
from apex_jax.hardware import (
    HardwareParams,
    default_hardware_params,
    load_hardware_params,
    save_hardware_params,
)
from apex_jax.io import write_json
from apex_jax.measured_runs import MEASURED_COLUMNS, load_measured_runs
from apex_jax.simulator import LaneResult
from apex_jax.status import LIVE, OK
from apex_jax.validate import load_measurements, measurement_cases

__all__ = [
    "DEFAULT_FIT_FIELDS",
    "ServingFit",
    "ServingProblem",
    "build_problem",
    "calibrate_runs_from_config",
    "calibrate_serving_from_config",
    "cross_validate",
    "cross_validate_runs",
    "fit_runs",
    "fit_serving",
    "problem_from_cases",
    "resolve_calibration",
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


def _assemble(
    cases: list[Case],
    measured: Sequence[Sequence[float]],
    labels: list[str],
    row_of: Callable[[Lane], int],
) -> ServingProblem:
    """Lanes of ``cases`` stacked for repeated simulation; ``row_of(lane)`` is the measured
    row (index into ``measured``) a lane's requests count in, ``len(measured)`` for none."""
    lanes = split_lanes(cases).lanes
    bad = [lane for lane in lanes if lane.status not in (LIVE, OK)]
    if bad:
        raise ValueError(
            f"{len(bad)} measured instances cannot be simulated: {bad[0].reason or 'OOM'}"
        )
    batch = build_lane_batch(cases, lanes)
    segment = np.full(batch.inputs.arrival_s.shape, len(measured), np.int32)
    for r, group in enumerate(replica_groups(lanes)):
        for v, k in enumerate(group):
            segment[r, v, : len(lanes[k].request_ids)] = row_of(lanes[k])
    num_slots = min(slot_capacity(lanes), _MAX_FIT_SLOTS)
    return ServingProblem(
        cases, batch, segment, np.asarray(measured, np.float64), labels, num_slots
    )


def build_problem(rows: Sequence[Mapping[str, str]], **case_kwargs) -> ServingProblem:
    """Prepare the per-replica measured instances of ``rows`` (see :mod:`apex_jax.validate`)."""
    return _problem_and_rows(rows, **case_kwargs)[0]


def _problem_and_rows(
    rows: Sequence[Mapping[str, str]], **case_kwargs
) -> tuple[ServingProblem, list[Mapping[str, str]]]:
    """:func:`build_problem` and the row of ``rows`` each measured instance comes from."""
    cases, groups = measurement_cases(rows, **case_kwargs)
    measured, labels, sources = [], [], []
    index_of: dict[tuple[int, int], int] = {}
    for c, members in enumerate(groups):
        for row in members:
            index_of[(c, int(row["replica"]))] = len(measured)
            measured.append([float(row["ttft_mean_s"]), float(row["tpot_mean_s"])])
            labels.append(
                f"{row.get('trace', row['served_trace'])} "
                f"DP{row['dp']}xTP{row['tp']} replica {row['replica']}"
            )
            sources.append(row)

    def row_of(lane: Lane) -> int:
        return index_of.get((lane.case, lane.replica), len(measured))

    return _assemble(cases, measured, labels, row_of), sources


def problem_from_cases(
    cases: Sequence[Case], measured: Sequence[Mapping[str, float]]
) -> ServingProblem:
    """Prepare whole measured runs: ``measured[i]`` (``ttft_mean_s``, ``tpot_mean_s``) is the
    mean over every request of ``cases[i]``, all its lanes together."""
    if len(cases) != len(measured):
        raise ValueError(f"{len(cases)} cases but {len(measured)} measurements")
    if not cases:
        raise ValueError("no measured runs to fit")
    values = []
    for i, m in enumerate(measured):
        missing = [k for k in MEASURED_COLUMNS if k not in m]
        if missing:
            raise ValueError(f"measurement {i} lacks {', '.join(missing)}")
        row = [float(m[k]) for k in MEASURED_COLUMNS]
        if not all(math.isfinite(v) and v > 0 for v in row):
            raise ValueError(f"measurement {i}: ttft_mean_s and tpot_mean_s must be positive")
        values.append(row)
    labels = [f"{c.workload.name} {c.deployment.model.name} case {i}" for i, c in enumerate(cases)]
    return _assemble(list(cases), values, labels, lambda lane: lane.case)


def _instance_means(segment, output, num_rows: int, out: LaneResult) -> jax.Array:
    """Mean TTFT and token-weighted TPOT of every measured instance from its lanes' results
    (``[R, 2]``, ``R = num_rows``; ``segment`` names each request slot's instance, ``R`` for
    padding); NaN everywhere if a lane did not finish."""
    seg = jnp.asarray(segment)
    valid = seg < num_rows
    first = jnp.where(valid, out.first_token_s, 0.0)
    finish = jnp.where(valid, out.finish_s, 0.0)
    arrival = jnp.where(valid, out.sent_s, 0.0)
    output = jnp.asarray(output)
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


class _Fitter:
    """Every fit of one problem: each fold of a cross-validation fits a subset of its rows
    (the others weighted zero, still simulated) and the final fit all of them, so all of
    them, and the errors read off them, run one compiled pricing and one compiled engine.
    Fitting each fold's rows as a problem of their own would compile both again per fold,
    which costs more than simulating the held-out rows along at every step.
    """

    def __init__(self, problem: ServingProblem, base: HardwareParams | None, fields):
        self.problem = problem
        self.base = default_hardware_params() if base is None else base
        self.fields = tuple(fields)
        self.theta0 = jnp.asarray([float(getattr(self.base, f)) for f in self.fields])

        def coeffs_of(theta) -> CostCoeffs:
            return case_coeffs(problem.cases, self.params(theta))

        # The cases' pricing, with its tangents along each constant: compiled once per fitter,
        # fast rather than optimised, as a search's pricing is (it runs once per step).
        self._coeffs_and_tangents = jax.jit(
            lambda t: (coeffs_of(t), jax.jacfwd(coeffs_of)(t)),
            compiler_options=PRICING_COMPILER_OPTIONS,
        )

    def params(self, theta) -> HardwareParams:
        return _with_fields(self.base, self.fields, theta)

    def predict(self, theta) -> tuple[jax.Array, jax.Array]:
        """Predicted ``[R, 2]`` means and their ``[K, R, 2]`` derivatives along ``theta``."""
        coeffs, tangents = self._coeffs_and_tangents(theta)
        return _means_and_tangents(
            self.problem.batch,
            jnp.asarray(self.problem.segment),
            coeffs,
            tangents,
            num_rows=len(self.problem.labels),
            num_slots=self.problem.num_slots,
        )

    def errors_pct(self, theta) -> np.ndarray:
        """``[R, 2]`` absolute percentage errors of TTFT and TPOT at ``theta``."""
        pred = np.asarray(self.predict(theta)[0])
        return np.abs(pred / self.problem.measured - 1.0) * 100.0

    def fit(
        self, is_fitted: np.ndarray, *, steps: int, learning_rate: float, prior_weight: float
    ) -> tuple[jax.Array, list[float]]:
        """Adam on the rows of ``is_fitted`` (``[R]`` bool); the best ``theta`` and the loss
        after every step."""
        log_measured = jnp.log(jnp.asarray(self.problem.measured))
        weight = jnp.asarray(is_fitted, jnp.float64)[:, None]
        theta0 = self.theta0

        def loss(pred, theta):
            misfit = jnp.sum(weight * (jnp.log(pred) - log_measured) ** 2) / (2.0 * jnp.sum(weight))
            return misfit + prior_weight * jnp.mean((theta - theta0) ** 2)

        def value_and_grad(theta):
            pred, pred_tangents = self.predict(theta)
            value, (by_pred, by_theta) = jax.value_and_grad(loss, argnums=(0, 1))(pred, theta)
            return value, jnp.tensordot(pred_tangents, by_pred, axes=2) + by_theta

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
        return best[1], history


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
    fitter = _Fitter(problem, base, fields)
    theta, history = fitter.fit(
        np.ones(len(problem.labels), bool),
        steps=steps,
        learning_rate=learning_rate,
        prior_weight=prior_weight,
    )
    return fitter.params(theta), history


@functools.partial(jax.jit, static_argnames=("num_rows", "num_slots"))
def _means_and_tangents(
    batch: LaneBatch,
    segment: jax.Array,
    coeffs: CostCoeffs,
    coeff_tangents: CostCoeffs,
    *,
    num_rows: int,
    num_slots: int,
) -> tuple[jax.Array, jax.Array]:
    """Predicted ``[R, 2]`` means and their ``[K, R, 2]`` derivatives along the ``K`` fitted
    constants, from the cost coefficients and their tangents (fields ``[C, ..., K]``).

    The lanes are arguments, not constants of the program, so every fit of the same shapes
    (each fold of a cross-validation, every step) runs one compiled engine.
    """

    def means(c: CostCoeffs) -> jax.Array:
        out = run_batch(batch, c, num_slots=num_slots)
        return _instance_means(segment, batch.inputs.output, num_rows, out)

    def along(tangent: CostCoeffs) -> tuple[jax.Array, jax.Array]:
        return jax.jvp(means, (coeffs,), (tangent,))

    preds, tangents = jax.vmap(along, in_axes=-1)(coeff_tangents)
    return preds[0], tangents


def _mean_pct(errors_pct: np.ndarray) -> dict[str, float]:
    """MAPE per metric of ``[R, 2]`` absolute percentage errors."""
    return dict(zip(MEASURED_COLUMNS, map(float, errors_pct.mean(axis=0))))


def _split_fit_kwargs(fit_kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`fit_serving`'s keywords, split into what a problem's fits share (``base``,
    ``fields``) and the settings of one fit, defaults filled in."""
    defaults = inspect.signature(fit_serving).parameters
    unknown = set(fit_kwargs) - (set(defaults) - {"problem"})
    if unknown:
        raise TypeError(f"fit_serving has no setting {', '.join(sorted(unknown))}")

    def setting(key: str) -> Any:
        return fit_kwargs.get(key, defaults[key].default)

    shared = {key: setting(key) for key in ("base", "fields")}
    return shared, {key: setting(key) for key in ("steps", "learning_rate", "prior_weight")}


def cross_validate(
    rows: Sequence[Mapping[str, str]], *, split_column: str = "trace", **fit_kwargs
) -> dict[str, Any]:
    """Leave one group out: for each group of measurements, fit on all the others and report
    the error on it, before (the base constants) and after the fit.

    Args:
        rows: measurement rows (at least two groups).
        split_column: the column whose values define the groups (default ``trace``).
        fit_kwargs: settings of :func:`fit_serving`, the same for every fold.

    Returns:
        Per fold the train groups, the test group, MAPE before and after the fit on the test
        group; and the mean held-out MAPE over folds, before and after.
    """
    fitter, group, values, settings = _group_folds(rows, split_column, fit_kwargs)
    return _cross_validate_groups(fitter, group, values, settings)


def _group_folds(
    rows: Sequence[Mapping[str, str]], split_column: str, fit_kwargs: Mapping[str, Any]
) -> tuple[_Fitter, np.ndarray, list[str], dict[str, Any]]:
    """The fitter of every row, each instance's group (``[R]`` index into the sorted
    ``split_column`` values), those values and one fit's settings."""
    values = sorted({row[split_column] for row in rows})
    if len(values) < 2:
        raise ValueError(f"cross-validation needs two {split_column} values, got {values}")
    problem, sources = _problem_and_rows(rows)
    group = np.asarray([values.index(row[split_column]) for row in sources])
    problem_kwargs, settings = _split_fit_kwargs(fit_kwargs)
    return _Fitter(problem, **problem_kwargs), group, values, settings


def _cross_validate_groups(
    fitter: _Fitter, group: np.ndarray, values: list[str], settings: Mapping[str, Any]
) -> dict[str, Any]:
    """:func:`cross_validate` on a prepared fitter (see :func:`_group_folds`)."""
    before = fitter.errors_pct(fitter.theta0)
    report = []
    for g, test in enumerate(values):
        theta, history = fitter.fit(group != g, **settings)
        hw = fitter.params(theta)
        report.append(
            {
                "train": [v for v in values if v != test],
                "test": test,
                "heldout_mape_pct_before": _mean_pct(before[group == g]),
                "heldout_mape_pct_after": _mean_pct(fitter.errors_pct(theta)[group == g]),
                "train_loss_first_last": [history[0], history[-1]],
                "fitted": {k: float(getattr(hw, k)) for k in hw._fields},
            }
        )
    mean = {
        when: {
            key: float(np.mean([f[f"heldout_mape_pct_{when}"][key] for f in report]))
            for key in ("ttft_mean_s", "tpot_mean_s")
        }
        for when in ("before", "after")
    }
    return {"folds": report, "heldout_mape_pct_mean": mean}


def _fit_kwargs(serving: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`fit_serving`'s settings from a ``serving`` config (its defaults where unset)."""
    defaults = inspect.signature(fit_serving).parameters
    settings = {
        key: type(defaults[key].default)(
            defaults[key].default if serving.get(key) is None else serving[key]
        )
        for key in ("steps", "learning_rate", "prior_weight")
    }
    return {"fields": tuple(serving.get("fields") or DEFAULT_FIT_FIELDS), **settings}


def calibrate_serving_from_config(config: Mapping[str, Any], out_dir: str | Path) -> dict:
    """``apex-jax calibrate target=serving``: cross-validate, fit on everything, write files.

    Config keys (defaults in ``config_schema.ServingFitConfig``): ``measurements`` (bundled
    name or path), ``fields``, ``steps``, ``learning_rate``, ``prior_weight``, ``name`` (the
    name later runs load the constants by, e.g. ``calibration=<name>``). The folds leave one
    trace out each: fit on the other traces, error on it.
    """
    rows = load_measurements(config.get("measurements"))
    fit_kwargs = _fit_kwargs(config)
    # The folds and the final fit share one fitter: one compile of the pricing and the engine.
    fitter, group, values, settings = _group_folds(rows, "trace", fit_kwargs)
    report = _cross_validate_groups(fitter, group, values, settings)
    print("error on the held-out trace before / after fitting on the other traces (MAPE, %):")
    print(
        f"{'held-out trace':<24} {'TTFT before':>11} {'TTFT after':>10} "
        f"{'TPOT before':>11} {'TPOT after':>10}"
    )
    mean = report["heldout_mape_pct_mean"]
    folds = [
        (f["test"], f["heldout_mape_pct_before"], f["heldout_mape_pct_after"])
        for f in report["folds"]
    ]
    for label, before, after in [*folds, ("mean", mean["before"], mean["after"])]:
        print(
            f"{label:<24} {before['ttft_mean_s']:>11.1f} {after['ttft_mean_s']:>10.1f} "
            f"{before['tpot_mean_s']:>11.1f} {after['tpot_mean_s']:>10.1f}"
        )

    theta, history = fitter.fit(np.ones(len(group), bool), **settings)
    hw = fitter.params(theta)
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


@dataclasses.dataclass(frozen=True)
class ServingFit:
    """Engine-level constants fitted to measured runs; pass it as ``calibration=``.

    Attributes:
        params: the fitted constants (fields not fitted keep their base values).
        fields: the fitted ``HardwareParams`` fields.
        num_measurements: measured runs the constants were fitted on.
        heldout_mape_pct: cross-validated held-out MAPE per metric, when it was measured.
    """

    params: HardwareParams
    fields: tuple[str, ...]
    num_measurements: int
    heldout_mape_pct: dict[str, float] | None = None

    def save(self, path: str | Path) -> None:
        """Write a JSON that :meth:`load` and ``calibration=<path>`` (CLI and API) read."""
        save_hardware_params(
            self.params,
            path,
            note=f"fitted by apex_jax.fit_serving to {self.num_measurements} measured runs",
            extra={
                "fit": {
                    "fields": list(self.fields),
                    "num_measurements": self.num_measurements,
                    "heldout_mape_pct": self.heldout_mape_pct,
                }
            },
        )

    @classmethod
    def load(cls, path: str | Path) -> ServingFit:
        """Read a file written by :meth:`save`."""
        meta = json.loads(Path(path).read_text()).get("fit")
        if meta is None:
            raise ValueError(f"{path} was not written by ServingFit.save (no 'fit' section)")
        return cls(
            load_hardware_params(str(path)),
            tuple(meta["fields"]),
            int(meta["num_measurements"]),
            meta.get("heldout_mape_pct"),
        )


def resolve_calibration(
    calibration: ServingFit | HardwareParams | str | Path | None,
) -> HardwareParams | None:
    """The constants a ``calibration=`` argument names: a :class:`ServingFit`, a
    ``HardwareParams``, a bundled name or a JSON path; None keeps the defaults."""
    if calibration is None:
        return None
    if isinstance(calibration, ServingFit):
        return calibration.params
    if isinstance(calibration, HardwareParams):
        return calibration
    if isinstance(calibration, (str, Path)):
        return load_hardware_params(str(calibration))
    raise TypeError(
        "calibration must be a ServingFit, HardwareParams, a calibrated name or a JSON path "
        f"(got {type(calibration).__name__})"
    )


def fit_runs(
    cases: Sequence[Case],
    measured: Sequence[Mapping[str, float]],
    *,
    heldout_mape_pct: dict[str, float] | None = None,
    **fit_kwargs,
) -> ServingFit:
    """Fit the engine constants to whole measured runs (``fit_kwargs`` as :func:`fit_serving`)."""
    fields = tuple(fit_kwargs.get("fields", DEFAULT_FIT_FIELDS))
    hw, _ = fit_serving(problem_from_cases(cases, measured), **fit_kwargs)
    return ServingFit(hw, fields, len(cases), heldout_mape_pct)


def cross_validate_runs(
    cases: Sequence[Case],
    measured: Sequence[Mapping[str, float]],
    *,
    groups: Sequence[str] | None = None,
    num_folds: int = 5,
    **fit_kwargs,
) -> dict[str, Any]:
    """K-fold cross-validation over whole groups of measured runs.

    Args:
        cases, measured: as for :func:`fit_runs`.
        groups: a label per run; runs of one group are always held out together (e.g. the
            model, to check a fit on other models). Default: every run is its own group.
        num_folds: folds (capped at the number of groups, at least 2 groups needed).

    Returns:
        ``{"folds": [...], "heldout_mape_pct": {metric: value}, "default_mape_pct": {...}}``:
        the MAPE of every run when its fold was held out, and with the default constants.
    """
    problem_kwargs, settings = _split_fit_kwargs(fit_kwargs)
    fitter = _Fitter(problem_from_cases(cases, measured), **problem_kwargs)
    return _cross_validate_runs_on(fitter, groups, num_folds, settings)


def _cross_validate_runs_on(
    fitter: _Fitter, groups: Sequence[str] | None, num_folds: int, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """:func:`cross_validate_runs` on a prepared fitter of every run."""
    num_runs = len(fitter.problem.labels)
    groups = [str(i) for i in range(num_runs)] if groups is None else [str(g) for g in groups]
    names = sorted(set(groups))
    if len(names) < 2:
        raise ValueError("cross-validation needs at least 2 groups of measured runs")
    k = max(2, min(int(num_folds), len(names)))
    fold_of = {name: i % k for i, name in enumerate(names)}
    fold = np.asarray([fold_of[g] for g in groups])
    heldout = np.zeros((num_runs, len(MEASURED_COLUMNS)))
    folds = []
    for f in range(k):
        theta, _ = fitter.fit(fold != f, **settings)
        err = fitter.errors_pct(theta)[fold == f]
        heldout[fold == f] = err
        folds.append(
            {
                "heldout_groups": sorted({g for g, i in zip(groups, fold) if i == f}),
                "heldout_mape_pct": _mean_pct(err),
            }
        )
    default = fitter.errors_pct(fitter.theta0)
    return {
        "folds": folds,
        "heldout_mape_pct": _mean_pct(heldout),
        "default_mape_pct": _mean_pct(default),
    }


def calibrate_runs_from_config(config: Mapping[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """``apex-jax calibrate target=serving measurements=<csv>``: your own measured runs.

    Cross-validates (``folds`` folds over groups of the ``cv_by`` column; null: every run
    alone), prints the MAPE per metric with the default constants and held out, fits on every
    run and writes ``serving.json`` (load it with ``calibration=<path>``) and
    ``serving_calibration.json`` (the cross-validation report) to ``out_dir``.

    Config keys: ``measurements`` (CSV path, schema in :mod:`apex_jax.measured_runs`),
    ``folds``, ``cv_by``, and under ``serving``: ``fields``, ``steps``, ``learning_rate``,
    ``prior_weight``.

    Returns:
        The cross-validation report and ``constants_path``.
    """
    runs = load_measured_runs(config["measurements"])
    fit_kwargs = _fit_kwargs(config.get("serving") or {})
    cv_by = config.get("cv_by")
    if cv_by and cv_by not in runs.rows[0]:
        raise ValueError(f"cv_by={cv_by!r} is not a column of {config['measurements']}")
    problem_kwargs, settings = _split_fit_kwargs(fit_kwargs)
    # The folds and the final fit share one fitter: one compile of the pricing and the engine.
    fitter = _Fitter(problem_from_cases(runs.cases, runs.measured), **problem_kwargs)
    report = _cross_validate_runs_on(
        fitter,
        [row[cv_by] for row in runs.rows] if cv_by else None,
        int(config.get("folds") or 5),
        settings,
    )
    held, default = report["heldout_mape_pct"], report["default_mape_pct"]
    print(f"{len(runs.cases)} measured runs, {len(report['folds'])}-fold cross-validation")
    print(f"{'metric':<12} {'default MAPE %':>15} {'held-out MAPE % after fit':>26}")
    for metric in MEASURED_COLUMNS:
        print(f"{metric:<12} {default[metric]:>15.1f} {held[metric]:>26.1f}")
    theta, _ = fitter.fit(np.ones(len(runs.cases), bool), **settings)
    fit = ServingFit(fitter.params(theta), fitter.fields, len(runs.cases), held)
    path = Path(out_dir) / "serving.json"
    fit.save(path)
    write_json(Path(out_dir) / "serving_calibration.json", report)
    print(f"wrote {path} (use calibration={path})", file=sys.stderr)
    return {**report, "constants_path": str(path)}
