"""Shared test setup: float64 everywhere, strict dtype promotion, small engine helpers."""

from __future__ import annotations

import os
import tempfile

import jax
import numpy as np
import pytest
from hypothesis import strategies as st

jax.config.update("jax_enable_x64", True)
# Commands run by the tests keep their compiled engines in one directory of this session
# (shared with their subprocesses), not in the user's cache.
os.environ.setdefault("APEX_JAX_CACHE_DIR", tempfile.mkdtemp(prefix="apex_jax_test_xla_"))

from apex_jax.cost.energy import EnergyCoeffs
from apex_jax.cost.iteration import CostCoeffs
from apex_jax.cost.sites import DECODE_BATCH_KNOTS, DECODE_KV_POINTS
from apex_jax.reference import rejected_requests, simulate_reference, simulate_replica_reference
from apex_jax.simulator import make_lane_inputs, run_lanes, stack_replicas
from apex_jax.status import SLOT_OVERFLOW

NUM_REQUESTS = 32
NUM_SLOTS = 16

_run = jax.jit(run_lanes, static_argnames=("num_slots", "max_iters"))


def served(prompt, output, limits) -> np.ndarray:
    """``[N]`` bool: the requests a lane serves (the rest are rejected, as evaluate does)."""
    return rejected_requests(prompt, output, limits) == 0


def engine_case(
    arrival,
    prompt,
    output,
    limits,
    coeffs,
    concurrency=0,
    delay_s=0.0,
    think_frac=0.0,
    *,
    cached_tokens=0,
):
    """One lane's inputs: the requests it serves, in order."""
    is_served = served(prompt, output, limits)

    def mine(x):
        return np.broadcast_to(np.asarray(x), np.shape(arrival))[is_served]

    return make_lane_inputs(
        mine(arrival),
        mine(prompt),
        mine(output),
        limits,
        roofline_coeffs(coeffs),
        energy=plausible_energy(coeffs),
        num_requests=NUM_REQUESTS,
        concurrency=concurrency,
        delay_s=mine(delay_s),
        think_frac=mine(think_frac),
        cached_tokens=mine(cached_tokens),
    )


def run_engine(lanes, *, max_iters=1_000_000, num_slots=NUM_SLOTS):
    """Run lanes, each a replica of one virtual engine, through the jitted engine; returns
    host arrays with a leading lane axis."""
    out = _run(stack_replicas([[lane] for lane in lanes]), num_slots=num_slots, max_iters=max_iters)
    return jax.tree_util.tree_map(lambda x: x[:, 0], jax.device_get(out))


def run_engine_growing(lanes, *, max_iters=1_000_000):
    """:func:`run_engine` that reruns with twice the slots while a lane overflows them, as a
    search does (a preempted request can keep the engine above max_num_seqs requests)."""
    num_slots = NUM_SLOTS
    while True:
        out = run_engine(lanes, max_iters=max_iters, num_slots=num_slots)
        if not (np.asarray(out.status) == SLOT_OVERFLOW).any():
            return out
        num_slots *= 2


def pipeline_coeffs(vector, host_fraction, transfer_fraction) -> CostCoeffs:
    """:func:`roofline_coeffs` with a share of the fixed time on the host and of the
    communication in stage transfers (the parts a pipeline runs on no stage)."""
    c = roofline_coeffs(vector)
    return c._replace(
        host_s=host_fraction * c.fixed_s,
        transfer_fixed_s=transfer_fraction * c.comm_fixed_s,
        transfer_s_per_token=transfer_fraction * c.comm_s_per_token,
    )


def replica_engines(arrival, prompt, output, concurrency, delay_s, think_frac, pp):
    """A replica's requests over its ``pp`` virtual engines as evaluate splits them: each
    engine's ``(arrival, prompt, output, clients, delay_s, think_frac)``, as
    :func:`apex_jax.reference.simulate_replica_reference` takes them."""
    n = len(arrival)
    if concurrency > 0:
        engine_of = np.arange(n) % concurrency % pp
        clients = np.bincount(np.arange(concurrency) % pp, minlength=pp)
    else:
        engine_of = np.arange(n) % pp
        clients = np.zeros(pp, np.int64)
    def mine(x, v):
        return np.broadcast_to(np.asarray(x), (n,))[engine_of == v]

    return [
        (mine(arrival, v), mine(prompt, v), mine(output, v), int(clients[v]))
        + (mine(delay_s, v), mine(think_frac, v))
        for v in range(pp)
    ]


def run_pipeline(case, stage_layers, coeffs: CostCoeffs, *, max_iters=1_000_000):
    """One replica of ``len(stage_layers)`` virtual engines on the engine and on the
    reference: ``(engine LaneResult [V, ...], reference results, served masks)``."""
    arrival, prompt, output, limits, vector, concurrency, delay_s, think_frac = case
    pp = len(stage_layers)
    engines = replica_engines(arrival, prompt, output, concurrency, delay_s, think_frac, pp)
    energy = plausible_energy(vector)
    lanes, masks = [], []
    for a, p, o, clients, d, f in engines:
        is_served = served(p, o, limits)
        masks.append(is_served)
        lanes.append(
            make_lane_inputs(
                a[is_served],
                p[is_served],
                o[is_served],
                limits,
                coeffs,
                energy=energy,
                num_requests=NUM_REQUESTS,
                concurrency=clients,
                delay_s=d[is_served],
                think_frac=f[is_served],
                stage_layers=stage_layers,
            )
        )
    out = _run(stack_replicas([lanes]), num_slots=NUM_SLOTS, max_iters=max_iters)
    ref = simulate_replica_reference(
        engines, limits, coeffs, stage_layers=stage_layers, max_iters=max_iters, energy=energy
    )
    return jax.tree_util.tree_map(lambda x: x[0], jax.device_get(out)), ref, masks


def run_reference(
    arrival, prompt, output, limits, coeffs, concurrency=0, delay_s=0.0, think_frac=0.0, **kwargs
):
    """The plain-Python reference on the same case tuple as :func:`engine_case`."""
    kwargs.setdefault("max_iters", 1_000_000)
    kwargs.setdefault("energy", plausible_energy(coeffs))
    return simulate_reference(
        arrival,
        prompt,
        output,
        limits,
        roofline_coeffs(coeffs),
        concurrency=concurrency,
        delay_s=delay_s,
        think_frac=think_frac,
        **kwargs,
    )


def plausible_energy(coeffs):
    """Power-model constants in the range of two H100s; busy times scale with the cost
    coefficients so that utilisation crosses one on some random cases."""
    c = roofline_coeffs(coeffs)
    return EnergyCoeffs(
        num_gpus=2.0,
        idle_w=70.0,
        dynamic_w=630.0,
        compute_s_per_token=0.8 * c.gemm_compute_s_per_token,
        compute_s_per_pair=0.8 * c.prefill_attn_s_per_pair,
        memory_s_fixed=0.6 * c.gemm_weight_s,
        memory_s_per_kv_token=0.9 * c.decode_attn_s_per_kv_token,
    )


# The cost fields a test case sets, in the order of its coefficient vector (the rest are 0).
ROOFLINE_FIELDS = (
    "fixed_s",
    "gemm_compute_s_per_token",
    "gemm_weight_s",
    "gemm_act_s_per_token",
    "lm_head_compute_s_per_token",
    "lm_head_weight_s",
    "prefill_attn_s_per_pair",
    "decode_attn_s_per_kv_token",
    "comm_fixed_s",
    "comm_s_per_token",
)


def synthetic_decode_grid(scale: float) -> np.ndarray:
    """A decode-attention grid ``[K_db, K_dkv]`` that grows with the batch and is convex in
    the KV entries, so every piece has its own slope: a decode run priced on the wrong piece,
    or not cut where its piece ends, gets wrong times."""
    batch = np.asarray(DECODE_BATCH_KNOTS)[:, None]
    kv_tokens = DECODE_KV_POINTS[None, :]
    return scale * (1.0 + 0.1 * batch) * (1.0 + (kv_tokens / 512.0) ** 1.5)


# Optional entries of a test's vector after the decode grid's scale: the engine's host costs.
HOST_FIELDS = ("host_s_per_seq", "eager_floor_s", "max_graph_batch")


def roofline_coeffs(vector) -> CostCoeffs:
    """One plan's :class:`CostCoeffs` from a test's vector: ``[10]`` over ROOFLINE_FIELDS,
    then optionally the scale of a :func:`synthetic_decode_grid`, then optionally ``[3]``
    over HOST_FIELDS."""
    values = np.asarray(vector, np.float64)
    coeffs = CostCoeffs.zeros()._replace(**dict(zip(ROOFLINE_FIELDS, values[:10], strict=True)))
    if len(values) > 10:
        coeffs = coeffs._replace(decode_attn_grid_s=synthetic_decode_grid(values[10]))
    if len(values) > 11:
        coeffs = coeffs._replace(**dict(zip(HOST_FIELDS, values[11:14], strict=True)))
    return coeffs


def plausible_coeffs(scale=1.0):
    """Coefficients (``[11]``: ROOFLINE_FIELDS, then the decode grid's scale) of a plausible
    GPU (seconds): 5 ms fixed, ~20 ms weights, decode attention of 0.1-1 ms at a few thousand
    KV entries."""
    return np.array([5e-3, 2e-5, 2e-2, 1e-7, 1e-6, 1e-3, 3e-9, 4e-7, 1e-4, 1e-7, 2e-5]) * scale


@st.composite
def scenarios(draw):
    """One random lane: open or closed loop (in lockstep or with clients that wait before
    sending, as :meth:`apex_jax.workload.Workload.think_fractions` makes them), per-request
    delays to the engine, idle gaps, chunked prefill on or off, KV pressure that preempts,
    costs over three orders of magnitude.

    Nine cases in ten can serve every request (the KV cache holds the longest, the model length
    and, without chunked prefill, the token budget admit every prompt); the tenth draws its
    limits freely, so that some requests are often rejected and the rest served.
    """
    n = draw(st.integers(1, NUM_REQUESTS))
    closed = draw(st.booleans()) and draw(st.booleans())
    think_frac = np.zeros(n)
    if closed:
        arrival = np.zeros(n)
        concurrency = draw(st.integers(1, 6))
        # Some later requests wait a fraction of their release time, not always in order.
        think_frac = np.asarray(
            draw(st.lists(st.sampled_from([0.0, 0.0, 0.25, 0.5, 1.0]), min_size=n, max_size=n))
        )
    else:
        # XLA on CPU flushes subnormal floats to zero; no clock is that fine-grained anyway.
        gaps = draw(st.lists(st.floats(0.0, 2.0, allow_subnormal=False), min_size=n, max_size=n))
        # Some gaps are exactly zero (simultaneous arrivals), some long (idle periods).
        arrival = np.cumsum(np.asarray(gaps) * draw(st.sampled_from([0.0, 0.01, 0.3, 5.0])))
        concurrency = 0
    prompt = np.asarray(draw(st.lists(st.integers(1, 300), min_size=n, max_size=n)), np.int32)
    output = np.asarray(draw(st.lists(st.integers(1, 120), min_size=n, max_size=n)), np.int32)
    block_size = draw(st.sampled_from([1, 4, 16]))
    watermark = draw(st.integers(0, 3))
    chunked = draw(st.sampled_from([0, 1]))
    if draw(st.integers(0, 9)) > 0:
        # Just enough pages for the longest request, or more: the tight end preempts.
        longest = -(-(int(np.max(prompt + output)) - 1) // block_size)
        num_kv_blocks = draw(st.integers(longest + watermark, longest + watermark + 600))
        budget = draw(st.integers(64 if chunked else max(64, int(prompt.max())), 2048))
        max_model_len = 10_000
    else:
        num_kv_blocks = draw(st.integers(8, 600))
        budget = draw(st.integers(64, 2048))
        max_model_len = draw(st.sampled_from([10_000, 400]))
    limits = {
        "max_num_seqs": draw(st.integers(1, NUM_SLOTS)),
        "max_num_batched_tokens": budget,
        "block_size": block_size,
        "num_kv_blocks": num_kv_blocks,
        "watermark_blocks": watermark,
        "max_model_len": max_model_len,
        "chunked_prefill": chunked,
    }
    scale = draw(st.sampled_from([0.01, 1.0, 10.0]))
    coeffs = plausible_coeffs(scale) * np.asarray(
        draw(st.lists(st.floats(0.0, 2.0, allow_subnormal=False), min_size=11, max_size=11))
    )
    coeffs[0] = max(coeffs[0], 1e-5)  # a real iteration always costs something
    delay_s = np.asarray(
        draw(st.lists(st.sampled_from([0.0, 0.0, 1e-3, 0.05, 0.4]), min_size=n, max_size=n))
    )
    return arrival, prompt, output, limits, coeffs, concurrency, delay_s, think_frac


@pytest.fixture
def coeffs():
    return plausible_coeffs()
