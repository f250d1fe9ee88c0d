"""Gradient-based calibration of engine-level constants through the simulator."""

from __future__ import annotations

import csv

import jax.numpy as jnp
import numpy as np
import pytest

from apex_jax.fit_serving import (
    DEFAULT_FIT_FIELDS,
    _Fitter,
    build_problem,
    cross_validate,
    fit_serving,
)
from apex_jax.hardware import (
    default_hardware_params,
    load_hardware_params,
    save_hardware_params,
)
from apex_jax.validate import load_measurements
from apex_jax.workload import load_trace


@pytest.fixture(scope="module")
def small_rows(tmp_path_factory):
    """Two measured instances with short served traces, so each simulation is quick."""
    folder = tmp_path_factory.mktemp("measured")
    rows = [
        r
        for r in load_measurements()
        if r["trace"] == "llama/lmsys_05" and r["dp"] == "1" and r["tp"] in ("4", "8")
    ]
    out = []
    for row in rows:
        trace = load_trace("validation/" + row["served_trace"]).head(120)
        name = f"short_{row['tp']}.csv"
        with open(folder / name, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["request_id", "arrival_s", "prompt_tokens", "output_tokens"])
            for i in range(trace.num_requests):
                writer.writerow(
                    [i, trace.arrival_s[i], trace.prompt_tokens[i], trace.output_tokens[i]]
                )
        out.append(dict(row, served_trace=name, _dir=str(folder)))
    return out


def test_gradient_of_every_fitted_constant_is_finite_and_nonzero(small_rows):
    fitter = _Fitter(build_problem(small_rows), None, DEFAULT_FIT_FIELDS)
    pred, tangents = fitter.predict(fitter.theta0)
    assert np.all(np.isfinite(pred)) and np.all(np.asarray(pred) > 0)
    # Every constant moves some prediction: [K, R, 2] tangents, one K per fitted constant.
    by_constant = np.abs(np.asarray(tangents)).reshape(len(DEFAULT_FIT_FIELDS), -1).max(axis=1)
    assert np.all(np.isfinite(tangents))
    assert np.all(by_constant > 1e-6), dict(zip(DEFAULT_FIT_FIELDS, by_constant))


@pytest.mark.slow
def test_fit_recovers_known_constants_from_synthetic_measurements(small_rows):
    problem = build_problem(small_rows)
    fields = ("log_iteration_overhead_scale",)
    truth = default_hardware_params()._replace(log_iteration_overhead_scale=jnp.log(2.0))
    truth_fitter = _Fitter(problem, truth, fields)
    synthetic = np.asarray(truth_fitter.predict(truth_fitter.theta0)[0])
    problem = problem.__class__(**{**problem.__dict__, "measured": synthetic})
    fitted, history = fit_serving(
        problem, fields=fields, steps=40, learning_rate=0.05, prior_weight=0.0
    )
    assert min(history) < 0.05 * history[0]
    assert abs(float(fitted.log_iteration_overhead_scale) - np.log(2.0)) < 0.05, fitted


def test_cross_validation_leaves_each_trace_out_once(small_rows):
    rows = [dict(row, trace=f"trace_{i}") for i, row in enumerate(small_rows)]
    report = cross_validate(rows, steps=1)
    assert [(f["train"], f["test"]) for f in report["folds"]] == [
        (["trace_1"], "trace_0"),
        (["trace_0"], "trace_1"),
    ]
    for when in ("before", "after"):
        mean = report["heldout_mape_pct_mean"][when]["tpot_mean_s"]
        folds = [f[f"heldout_mape_pct_{when}"]["tpot_mean_s"] for f in report["folds"]]
        assert mean == pytest.approx(np.mean(folds))
    # Each fold fits its own rows only: its first loss is the misfit of the other trace's
    # instance alone at the base constants (the prior term is zero there).
    fitter = _Fitter(build_problem(rows), None, DEFAULT_FIT_FIELDS)
    log_misfit = np.log(np.asarray(fitter.predict(fitter.theta0)[0]) / fitter.problem.measured)
    row_of_trace = [int(label.split()[0][-1]) for label in fitter.problem.labels]
    for fold, train_row in zip(report["folds"], (1, 0)):
        own = log_misfit[row_of_trace.index(train_row)]
        assert fold["train_loss_first_last"][0] == pytest.approx(np.mean(own**2), rel=1e-9)
    with pytest.raises(ValueError, match="two trace values"):
        cross_validate(rows[:1], steps=1)


def test_params_round_trip(tmp_path):
    hw = default_hardware_params()._replace(log_memory_eff=jnp.log(0.5))
    save_hardware_params(hw, tmp_path / "x.json", note="test")
    back = load_hardware_params(str(tmp_path / "x.json"))
    assert float(back.log_memory_eff) == pytest.approx(np.log(0.5))
    with pytest.raises(ValueError, match="no calibrated constants"):
        load_hardware_params("no-such-name")
