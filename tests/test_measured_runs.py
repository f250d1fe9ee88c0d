"""Bring your own measurements: the measured-runs CSV schema, apex_jax.fit_serving and
``apex-jax calibrate target=serving measurements=<csv>``."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

import apex_jax
from test_cli import _run
from apex_jax.config_schema import check_config
from apex_jax.hardware import default_hardware_params
from apex_jax.measured_runs import REQUIRED_COLUMNS, load_measured_runs
from apex_jax.plans import COL

MODEL = "meta-llama/Llama-3.1-8B"
GPU = "H100-SXM-80GB"
ENGINE = {"name": "vllm", "version": "0.6.0"}


def _case(concurrency: int, isl: int, osl: int, num_requests: int) -> dict:
    return {
        "model": MODEL,
        "hardware": GPU,
        "num_gpus": 1,
        "plan": {"dp": 1, "tp": 1, "pp": 1},
        "workload": {
            "kind": "closed_loop",
            "concurrency": concurrency,
            "isl": isl,
            "osl": osl,
            "num_requests": num_requests,
        },
        "engine": ENGINE,
    }


def _truth():
    """A stack unlike the defaults: slower engine loop, lower GEMM and memory efficiency."""
    base = default_hardware_params()
    return base._replace(
        log_iteration_overhead_scale=base.log_iteration_overhead_scale + math.log(2.0),
        log_compute_eff=base.log_compute_eff + math.log(0.7),
        log_memory_eff=base.log_memory_eff + math.log(0.8),
    )


def _measure(cases, hw) -> list[dict[str, float]]:
    results = apex_jax.simulate_many(cases, calibration=hw)
    return [
        {"ttft_mean_s": r["ttft_mean_s"], "tpot_mean_s": r["tpot_token_mean_s"]} for r in results
    ]


def _mape(cases, measured, calibration) -> np.ndarray:
    pred = _measure(cases, calibration)
    return np.array(
        [
            [abs(p[k] / m[k] - 1.0) * 100.0 for k in ("ttft_mean_s", "tpot_mean_s")]
            for p, m in zip(pred, measured)
        ]
    ).mean(axis=0)


@pytest.mark.slow
def test_fit_on_single_request_runs_predicts_unseen_batched_runs(tmp_path):
    """An unfamiliar stack (hidden constants) measured on single-request runs only; the fit must
    carry over to batched runs at concurrency 8 and 32 it never saw."""
    truth = _truth()
    single = [_case(1, isl, osl, 2) for isl, osl in ((128, 32), (1024, 32), (2048, 16))]
    batched = [_case(c, 512, 32, 2 * c) for c in (8, 32)]
    fit = apex_jax.fit_serving(single, _measure(single, truth), steps=60, prior_weight=0.0)
    batched_measured = _measure(batched, truth)
    before = _mape(batched, batched_measured, None)
    after = _mape(batched, batched_measured, fit)
    assert before.max() > 10.0, before  # the defaults are wrong for this stack
    assert after.max() < 5.0, (before, after)

    fit.save(tmp_path / "fit.json")
    loaded = apex_jax.ServingFit.load(tmp_path / "fit.json")
    assert loaded.fields == fit.fields and loaded.num_measurements == 3
    for name in fit.params._fields:
        expected = float(getattr(fit.params, name))
        assert float(getattr(loaded.params, name)) == pytest.approx(expected)
    # The saved file is also a calibration path.
    by_path = apex_jax.simulate(**batched[0], calibration=str(tmp_path / "fit.json"))
    by_fit = apex_jax.simulate(**batched[0], calibration=fit)
    assert by_path["ttft_mean_s"] == pytest.approx(by_fit["ttft_mean_s"])


def test_hw_and_calibration_are_exclusive():
    with pytest.raises(ValueError, match="either hw= or calibration="):
        apex_jax.simulate(**_case(1, 64, 8, 1), hw=default_hardware_params(), calibration="x")


def _row(**overrides) -> dict[str, str]:
    row = {
        "model": MODEL,
        "gpu": GPU,
        "num_gpus": "1",
        "dp": "1",
        "tp": "1",
        "pp": "1",
        "weight_dtype": "bf16",
        "kv_dtype": "bf16",
        "engine": "vllm",
        "engine_version": "0.6.0",
        "workload": "closed_loop",
        "concurrency": "1",
        "isl": "128",
        "osl": "16",
        "num_requests": "2",
        "ttft_mean_s": "0.02",
        "tpot_mean_s": "0.008",
    }
    row.update(overrides)
    return row


def _write(path, rows) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_good_file_reads(tmp_path):
    _write(tmp_path / "runs.csv", [_row(), _row(concurrency="4", num_requests="8")])
    runs = load_measured_runs(tmp_path / "runs.csv")
    assert len(runs.cases) == 2 and runs.cases[1].workload.concurrency == 4
    assert runs.measured[0] == {"ttft_mean_s": 0.02, "tpot_mean_s": 0.008}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [{k: v for k, v in _row().items() if k != "tpot_mean_s"}],
            r"missing column\(s\) tpot_mean_s",
        ),
        ([_row(engine_version="9.9.9")], r"line 2: no preset for vllm 9\.9\.9: known versions"),
        ([_row(), _row(engine="tgi")], r"line 3: unknown engine 'tgi'"),
        (
            [_row(model="meta-llama/Llama-3.1-405B", num_gpus="1")],
            r"line 2: plan does not fit: .* GB of weights",
        ),
        ([_row(workload="open_loop")], r"line 2: unknown workload 'open_loop'"),
        ([_row(concurrency="")], r"line 2: workload closed_loop needs column\(s\) concurrency"),
        ([_row(ttft_mean_s="fast")], r"line 2: column ttft_mean_s is not a number"),
        ([_row(tpot_mean_s="-1")], r"line 2: column tpot_mean_s must be a positive number"),
        ([_row(dp="1.5")], r"line 2: column dp must be a whole number"),
        ([_row(ep="two")], r"line 2: column ep is not a number"),
        ([_row(num_gpus="2", tp="2", attn_tp="3")], r"line 2: .*attn_tp"),
    ],
)
def test_bad_files_fail_in_one_line(tmp_path, rows, message):
    _write(tmp_path / "runs.csv", rows)
    with pytest.raises(ValueError, match=message) as info:
        load_measured_runs(tmp_path / "runs.csv")
    assert "\n" not in str(info.value)


def test_optional_layout_and_limit_columns(tmp_path):
    """Blank optional columns keep the classic plan and the preset's limits; given ones set
    the cell layout and the stage's limits."""
    blank = {"attn_tp": "", "mlp_tp": "", "max_num_seqs": "", "max_num_batched_tokens": ""}
    split = {"attn_tp": "1", "mlp_tp": "2", "max_num_seqs": "64", "max_num_batched_tokens": "4096"}
    rows = [_row(num_gpus="2", tp="2", **values) for values in (blank, split)]
    _write(tmp_path / "runs.csv", rows)
    classic, cell = (case.plan for case in load_measured_runs(tmp_path / "runs.csv").cases)
    assert (classic[COL["attn_tp"]], classic[COL["mlp_tp"]]) == (2, 2)
    assert (cell[COL["attn_tp"]], cell[COL["mlp_tp"]]) == (1, 2)
    assert (cell[COL["max_num_seqs"]], cell[COL["max_num_batched_tokens"]]) == (64, 4096)
    assert classic[COL["max_num_seqs"]] != 64


def test_required_columns_documented():
    doc = apex_jax.measured_runs.__doc__
    for column in REQUIRED_COLUMNS:
        assert column in doc


@pytest.mark.slow
def test_cli_calibrate_measured_runs(tmp_path):
    """``apex-jax calibrate target=serving measurements=<csv>``: cross-validated report on
    stdout, constants file written and loadable; a bad file stops it in one line (exit 2)."""
    rows = [
        _row(isl=str(isl), ttft_mean_s=str(ttft), tpot_mean_s=str(tpot))
        for isl, ttft, tpot in ((128, 0.03, 0.009), (1024, 0.08, 0.01))
    ]
    _write(tmp_path / "runs.csv", rows)
    _write(tmp_path / "bad.csv", [_row(engine_version="9.9.9")])
    run = f"hydra.run.dir={tmp_path / 'out'}"
    args = ["calibrate", "target=serving", "folds=2", "serving.steps=2", run]
    bad = _run([*args, f"measurements={tmp_path / 'bad.csv'}"], tmp_path)
    assert bad.returncode == 2 and "line 2: no preset for vllm 9.9.9" in bad.stderr
    good = _run([*args, f"measurements={tmp_path / 'runs.csv'}"], tmp_path)
    assert good.returncode == 0, good.stderr[-2000:]
    out = good.stdout
    assert "2-fold cross-validation" in out and "tpot_mean_s" in out
    report = json.loads((tmp_path / "out" / "serving_calibration.json").read_text())
    assert set(report["heldout_mape_pct"]) == {"ttft_mean_s", "tpot_mean_s"}
    assert all(math.isfinite(v) for v in report["heldout_mape_pct"].values())
    saved = json.loads((tmp_path / "out" / "serving.json").read_text())
    assert saved["fit"]["num_measurements"] == 2
    assert apex_jax.ServingFit.load(tmp_path / "out" / "serving.json").num_measurements == 2


def test_measurements_key_needs_target_serving():
    with pytest.raises(ValueError, match="use it with target=serving"):
        check_config("calibrate", {"target": "kernels", "measurements": "runs.csv"})
