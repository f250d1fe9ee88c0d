"""Replaying the bundled vLLM measurements."""

from __future__ import annotations

import math

import pytest

from apex_jax.validate import COMPARED, format_validation, load_measurements, run_validation


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


def test_missing_column_is_named(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("model,gpu\nx,y\n")
    with pytest.raises(ValueError, match="lacks columns"):
        load_measurements(bad)
