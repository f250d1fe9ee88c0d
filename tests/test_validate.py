"""Replaying the bundled vLLM measurements."""

from __future__ import annotations

import math

import numpy as np
import pytest

from apex_jax.deployment import make_case
from apex_jax.engine_config import VERSION_COSTS
from apex_jax.evaluate import case_coeffs
from apex_jax.hardware import default_hardware_params
from apex_jax.validate import COMPARED, format_validation, load_measurements, run_validation

# `apex-jax validate`'s mean absolute percentage errors on the dev file, as the README shows
# them (each run with its recorded launch arguments). A change that makes one worse by more
# than a tenth fails here; one that improves them should lower these figures.
RECORDED_MAPE_PCT = {"ttft_mean_s": 8.52, "tpot_mean_s": 2.93, "latency_sum_s": 5.81}
MARGIN = 1.10


@pytest.fixture(scope="module")
def report():
    return run_validation(load_measurements())


def test_every_measured_instance_is_replayed(report):
    rows = load_measurements()
    assert len(report["rows"]) == len(rows) == 26
    for row in report["rows"]:
        assert row["status"] == "OK"
        for key in COMPARED:
            assert math.isfinite(row[f"{key}_predicted"]) and row[f"{key}_predicted"] > 0


def test_report_prints_units_and_mape(report):
    text = format_validation(report)
    assert "(ms)" in text and "MAPE" in text
    assert set(report["mape_pct"]) == set(COMPARED)
    assert all(math.isfinite(v) for v in report["mape_pct"].values())


def test_validation_error_does_not_grow(report):
    for metric, recorded in RECORDED_MAPE_PCT.items():
        assert report["mape_pct"][metric] <= MARGIN * recorded, (metric, report["mape_pct"])


def test_an_overhead_chosen_on_the_dev_file_is_labelled_in_sample(report):
    (overhead,) = report["overheads"]
    assert (overhead["engine"], overhead["version"]) == ("vllm", "0.6.0")
    assert overhead["is_in_sample"] and overhead["seconds"] == 3e-3
    assert "IN-SAMPLE" in format_validation(report)
    # The V1 engine's figure comes from runs that are not the dev file.
    assert not VERSION_COSTS[("vllm", "0.11.0")].iteration_overhead.is_in_sample
    # So were vLLM 0.6's host costs and TTFT delay, and the report says so.
    assert overhead["host_costs"]["is_in_sample"]
    assert overhead["frontend_delay"]["source"].startswith("IN-SAMPLE")
    text = format_validation(report)
    assert "host costs of vllm 0.6.0" in text and "frontend delay of vllm 0.6.0: 11 ms" in text


def test_each_host_mechanism_of_vllm_0_6_lowers_the_dev_error():
    """Without the per-sequence host cost, the eager launch or the TTFT delay the dev file's
    errors grow: TPOT and the latency sum by the per-sequence cost, TTFT by each of them."""
    rows = load_measurements()
    full = run_validation(rows)["mape_pct"]
    for knob, grown in (
        ("host_s_per_seq", ("tpot_mean_s", "latency_sum_s")),
        ("eager_s_per_layer", ("ttft_mean_s",)),
        ("frontend_delay_s", ("ttft_mean_s",)),
    ):
        without = run_validation(rows, engine_overrides={knob: 0.0})["mape_pct"]
        for metric in grown:
            assert without[metric] > full[metric] + 0.3, (knob, metric, without, full)


def test_each_engine_version_pays_its_own_iteration_overhead():
    def case(engine):
        plan = {"dp": 1, "tp": 8, "pp": 1}
        workload = {"kind": "static_batch", "batch_size": 8, "isl": 512, "osl": 64}
        return make_case("meta-llama/Llama-3.1-70B", "h100", 8, plan, workload, engine)

    user = {"name": "vllm", "version": "0.6.0", "iteration_overhead_s": 7e-3}
    cases = [case({"name": "vllm", "version": v}) for v in ("0.6.0", "0.11.0")] + [case(user)]
    fixed_s = np.asarray(case_coeffs(cases, default_hardware_params()).fixed_s)
    # Same plan, same kernels: the constants differ by the engines' overheads alone.
    v060, v011 = (VERSION_COSTS[("vllm", v)].iteration_overhead for v in ("0.6.0", "0.11.0"))
    np.testing.assert_allclose(fixed_s[0] - fixed_s[1], v060.seconds - v011.seconds, rtol=1e-9)
    np.testing.assert_allclose(fixed_s[2] - fixed_s[0], 7e-3 - v060.seconds, rtol=1e-9)
    source = cases[2].deployment.engine.overhead_source()
    assert source.source == "set by the user" and not source.is_in_sample


def test_missing_column_is_named(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("model,gpu\nx,y\n")
    with pytest.raises(ValueError, match="lacks columns"):
        load_measurements(bad)
