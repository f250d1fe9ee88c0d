"""Shared test setup: float64 everywhere, strict dtype promotion, small engine helpers."""

from __future__ import annotations

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)

from apex_jax.cost_model import CostCoeffs
from apex_jax.energy import EnergyCoeffs
from apex_jax.reference import num_rejected, simulate_reference
from apex_jax.simulator import make_lane_inputs, run_lanes, stack_lanes
from apex_jax.status import INFEASIBLE, LIVE

NUM_REQUESTS = 32
NUM_SLOTS = 16

_run = jax.jit(run_lanes, static_argnames=("num_slots", "max_iters"))


def engine_case(arrival, prompt, output, limits, coeffs, concurrency=0):
    """One lane's inputs, pre-checked for rejection as evaluate does."""
    status = INFEASIBLE if num_rejected(prompt, output, limits) else LIVE
    kwargs = {"energy": plausible_energy(coeffs)}
    return make_lane_inputs(
        arrival,
        prompt,
        output,
        limits,
        CostCoeffs(*coeffs),
        num_requests=NUM_REQUESTS,
        concurrency=concurrency,
        initial_status=status,
        **kwargs,
    )


def run_engine(lanes, *, max_iters=1_000_000, num_slots=NUM_SLOTS):
    """Run stacked lanes through the jitted engine; returns host arrays."""
    return jax.device_get(_run(stack_lanes(lanes), num_slots=num_slots, max_iters=max_iters))


def run_reference(arrival, prompt, output, limits, coeffs, concurrency=0, **kwargs):
    """The plain-Python reference on the same case tuple as :func:`engine_case`."""
    kwargs.setdefault("max_iters", 1_000_000)
    kwargs.setdefault("energy", plausible_energy(coeffs))
    return simulate_reference(
        arrival, prompt, output, limits, CostCoeffs(*coeffs), concurrency=concurrency, **kwargs
    )


def plausible_energy(coeffs):
    """Power-model constants in the range of two H100s; busy times scale with the cost
    coefficients so that utilisation crosses one on some random cases."""
    c = np.asarray(coeffs, np.float64)
    return EnergyCoeffs(2.0, 70.0, 630.0, 0.8 * c[1], 0.8 * c[6], 0.6 * c[2], 0.9 * c[7])


def plausible_coeffs(scale=1.0):
    """Cost coefficients of a plausible GPU (seconds): 5 ms fixed, ~20 ms weights."""
    return np.array([5e-3, 2e-5, 2e-2, 1e-7, 1e-6, 1e-3, 3e-9, 4e-7, 1e-4, 1e-7]) * scale


@pytest.fixture
def coeffs():
    return plausible_coeffs()
