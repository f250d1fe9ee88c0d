"""Data-parallel routing: round-robin by default, least-loaded on request."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import apex_jax
from apex_jax.deployment import make_case
from apex_jax.evaluate import case_coeffs, least_loaded_assignment
from apex_jax.hardware import default_hardware_params
from apex_jax.workload import Workload


def _alternating() -> Workload:
    # Even requests are long, odd ones short: round-robin puts every long one on replica 0.
    n = 40
    output = np.where(np.arange(n) % 2 == 0, 400, 4).astype(np.int32)
    return Workload(
        name="alternating",
        arrival_s=np.arange(n) * 0.25,
        prompt_tokens=np.full(n, 64, np.int32),
        output_tokens=output,
    )


def _run(router: str):
    return apex_jax.simulate(
        "meta-llama/Llama-3.1-8B",
        "H100-SXM-80GB",
        2,
        {"dp": 2, "tp": 1},
        _alternating(),
        {"router": router},
    )


def test_least_loaded_spreads_long_requests():
    workload = _alternating()
    case = make_case(
        "meta-llama/Llama-3.1-8B",
        "H100-SXM-80GB",
        2,
        {"dp": 2, "tp": 1},
        workload,
        {"router": "least_loaded"},
    )
    coeffs = jax.tree_util.tree_map(
        lambda x: np.asarray(x)[0], case_coeffs([case], default_hardware_params())
    )
    replica = least_loaded_assignment(workload, 2, coeffs)
    is_long = workload.output_tokens > 100
    # Round-robin would send every long request to replica 0; least-loaded splits them.
    long_on_0 = int(np.sum(replica[is_long] == 0))
    assert 0.3 * is_long.sum() <= long_on_0 <= 0.7 * is_long.sum()
    rr, ll = _run("round_robin"), _run("least_loaded")
    assert rr["status"] == ll["status"] == "OK"
    assert ll["e2e_mean_s"] <= rr["e2e_mean_s"]


def test_unknown_router_is_named():
    with pytest.raises(ValueError, match="router"):
        _run("random")
