"""apex_jax: vectorised, trace-driven search for LLM serving plans.

Importing the package switches JAX to 64-bit: simulated clocks are float64 because a
float32 clock over a one-hour trace drifts by about 1% of a token gap.
"""

from __future__ import annotations

import jax

__all__ = [
    "ServingFit",
    "__version__",
    "enable_x64",
    "fit_serving",
    "plan_space",
    "simulate",
    "simulate_many",
]

__version__ = "0.1.0"


def enable_x64() -> None:
    """Turn on float64 in JAX (idempotent)."""
    jax.config.update("jax_enable_x64", True)


enable_x64()

from apex_jax.api import ServingFit, fit_serving, plan_space, simulate, simulate_many
