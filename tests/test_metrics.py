"""Metric definitions, checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from apex_jax.metrics import SLO, summarize_requests
from apex_jax.status import OK, OOM

ARRIVAL = np.array([0.0, 1.0, 2.0])
FIRST = np.array([0.1, 1.5, 2.2])
FINISH = np.array([1.1, 1.5, 4.2])
OUTPUT = np.array([11, 1, 5])


def test_definitions():
    m = summarize_requests(ARRIVAL, FIRST, FINISH, OUTPUT, OK)
    assert m["ttft_mean_s"] == pytest.approx(np.mean([0.1, 0.5, 0.2]))
    # TPOT over requests with more than one output token: 1.0/10 and 2.0/4.
    assert m["tpot_mean_s"] == pytest.approx(np.mean([0.1, 0.5]))
    assert m["tpot_token_mean_s"] == pytest.approx(3.0 / 14)
    assert m["e2e_sum_s"] == pytest.approx(1.1 + 0.5 + 2.2)
    assert m["makespan_s"] == pytest.approx(4.2)
    assert m["throughput_out_tok_s"] == pytest.approx(17 / 4.2)
    assert "slo_attainment" not in m


def test_slo_attainment_per_target_and_both():
    m = summarize_requests(ARRIVAL, FIRST, FINISH, OUTPUT, OK, SLO(ttft_s=0.3, tpot_s=0.2))
    # Request 0 meets both, 1 misses TTFT (and has no TPOT), 2 meets TTFT but misses TPOT.
    assert m["slo_ttft_attainment"] == pytest.approx(2 / 3)
    assert m["slo_tpot_attainment"] == pytest.approx(2 / 3)
    assert m["slo_attainment"] == pytest.approx(1 / 3)
    # At the trace's own rate; goodput (a rate search) is tested in test_objectives.py.
    assert m["slo_throughput_req_s"] == pytest.approx(1 / 4.2)
    assert "goodput_req_s" not in m


def test_e2e_percentiles():
    m = summarize_requests(ARRIVAL, FIRST, FINISH, OUTPUT, OK)
    assert m["e2e_p50_s"] == pytest.approx(1.1)
    assert m["e2e_p99_s"] == pytest.approx(np.percentile([1.1, 0.5, 2.2], 99))


def test_failed_plan_has_no_metrics():
    m = summarize_requests(ARRIVAL, FIRST, FINISH, OUTPUT, OOM)
    assert m["status"] == "OOM" and math.isnan(m["ttft_mean_s"])


def test_bad_slo_is_named():
    with pytest.raises(ValueError, match="ttft_s"):
        SLO(ttft_s=-1.0)
    with pytest.raises(ValueError, match="attainment"):
        SLO(ttft_s=1.0, attainment=1.5)
