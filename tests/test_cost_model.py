"""Structure of the iteration-time model: monotone, affine in decode KV, one formula on two
array namespaces.

The constants are being calibrated, so these tests assert shapes of the model (growth,
affinity, zeros, equality between code paths), never particular times.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from apex_jax.cost_model import (
    CostCoeffs,
    cost_coeffs,
    decode_time_parts_s,
    iteration_time_s,
)
from apex_jax.hardware import default_hardware_params, get_gpu
from apex_jax.model_spec import load_model
from apex_jax.plans import COL, PlanSpace, enumerate_plans


def _plans(model, num_gpus=8, gpus_per_node=8):
    space = PlanSpace(weight_dtype=("bf16", "fp8"), kv_dtype=("bf16", "fp8"), use_all_gpus=False)
    return enumerate_plans(
        space,
        num_gpus=num_gpus,
        gpus_per_node=gpus_per_node,
        num_layers=model.num_layers,
        num_heads=model.num_heads,
        num_kv_heads=model.num_kv_heads,
    )


@pytest.fixture(scope="module", params=["meta-llama/Llama-3.1-70B", "mistralai/Mixtral-8x7B-v0.1"])
def setup(request):
    """``(plans, coeffs as NumPy)`` for every plan of a model on 2 x 4 H100s."""
    model = load_model(request.param)
    plans = _plans(model, num_gpus=8, gpus_per_node=4)
    c = cost_coeffs(
        plans, model, get_gpu("H100-SXM-80GB"), default_hardware_params(), gpus_per_node=4
    )
    return plans, CostCoeffs(*(np.asarray(x, np.float64) for x in c))


def _time(c, num_tokens=0.0, num_sampled=0.0, prefill_pairs=0.0, decode_kv_tokens=0.0):
    """Iteration time of every plan ``[P]``, or ``[P, K]`` when a feature is ``[K]``."""
    c = CostCoeffs(*(x[:, None] for x in c))
    return iteration_time_s(c, num_tokens, num_sampled, prefill_pairs, decode_kv_tokens, xp=np)


def test_coefficients_are_finite_float64_and_positive(setup):
    plans, c = setup
    for name, x in zip(c._fields, c):
        assert x.dtype == np.float64, name
        assert x.shape == (len(plans),), name
        assert np.isfinite(x).all() and (x >= 0).all(), name


def test_decode_time_is_exactly_affine_in_kv_tokens(setup):
    _, c = setup
    kv = np.array([0.0, 1.0, 17.0, 4096.0, 1.0e5, 3.3e6])
    for num_tokens, sampled, pairs in [(1, 1, 0), (64, 64, 0), (256, 200, 0), (300, 4, 4.5e4)]:
        t = _time(c, num_tokens, sampled, pairs, kv)
        base, slope = decode_time_parts_s(c, num_tokens, sampled, pairs, xp=np)
        expected = base[:, None] + slope[:, None] * kv
        np.testing.assert_array_equal(t, expected)
        assert (slope > 0).all()
        # Affine: equal steps of KV add equal time.
        np.testing.assert_allclose(
            t[:, 3] - t[:, 0], 4096.0 * (t[:, 1] - t[:, 0]), rtol=1e-9, atol=0
        )


def test_time_grows_with_decode_kv_tokens(setup):
    _, c = setup
    t = _time(c, 32, 32, 0.0, np.linspace(0, 2e6, 50))
    assert (np.diff(t, axis=1) > 0).all()


def test_time_grows_with_prefill_pairs(setup):
    _, c = setup
    lengths = np.array([1, 16, 128, 1024, 4096, 32768], np.float64)
    pairs = lengths * (lengths + 1) / 2
    t = _time(c, lengths, 1.0, pairs)
    assert (np.diff(t, axis=1) > 0).all()
    # Pairs alone, at a fixed token count.
    t = _time(c, 4096.0, 1.0, pairs)
    assert (np.diff(t, axis=1) > 0).all()


def test_time_grows_with_num_tokens(setup):
    _, c = setup
    t = _time(c, np.arange(1, 20000, 97, dtype=np.float64), 1.0)
    assert (np.diff(t, axis=1) >= 0).all()
    assert (t[:, -1] > t[:, 0]).all()


def test_time_does_not_shrink_with_sampled_tokens(setup):
    _, c = setup
    t = _time(c, 512.0, np.arange(0, 513, 8, dtype=np.float64))
    assert (np.diff(t, axis=1) >= 0).all()


def test_an_iteration_costs_something(setup):
    _, c = setup
    assert (_time(c, 1.0, 1.0) > 0).all()


def test_no_collective_cost_without_tp_or_pp(setup):
    plans, c = setup
    tp, pp = plans[:, COL["tp"]], plans[:, COL["pp"]]
    alone = (tp == 1) & (pp == 1)
    assert alone.any() and (tp > 1).any()
    assert (c.comm_fixed_s[alone] == 0).all()
    assert (c.comm_s_per_token[alone] == 0).all()
    assert (c.comm_fixed_s[tp > 1] > 0).all()
    assert (c.comm_s_per_token[tp > 1] > 0).all()


def test_link_constants_only_matter_with_tp_or_pp():
    model = load_model("meta-llama/Llama-3.1-70B")
    gpu = get_gpu("H100-SXM-80GB")
    plans = _plans(model)
    tp, pp = plans[:, COL["tp"]], plans[:, COL["pp"]]
    hw = default_hardware_params()
    slower = hw._replace(
        log_link_eff=hw.log_link_eff - 1.0,
        log_collective_latency_s=hw.log_collective_latency_s + 1.0,
    )
    times = []
    for params in (hw, slower):
        c = cost_coeffs(plans, model, gpu, params, gpus_per_node=8)
        times.append(_time(CostCoeffs(*(np.asarray(x) for x in c)), 256.0, 256.0, 0.0, 1e5))
    alone = (tp == 1) & (pp == 1)
    np.testing.assert_array_equal(times[1][alone], times[0][alone])
    assert (times[1][~alone] > times[0][~alone]).all()


def test_numpy_and_jax_give_the_same_times(setup):
    _, c = setup
    rng = np.random.default_rng(0)
    n = 64
    tokens = rng.integers(1, 8192, n).astype(np.float64)
    sampled = np.minimum(tokens, rng.integers(0, 256, n)).astype(np.float64)
    pairs = rng.uniform(0, 1e7, n)
    kv = rng.uniform(0, 1e6, n)
    c_np = CostCoeffs(*(x[:, None] for x in c))
    c_jnp = CostCoeffs(*(jnp.asarray(x)[:, None] for x in c))
    t_np = iteration_time_s(c_np, tokens, sampled, pairs, kv, xp=np)
    t_jnp = iteration_time_s(
        c_jnp, jnp.asarray(tokens), jnp.asarray(sampled), jnp.asarray(pairs), jnp.asarray(kv)
    )
    assert isinstance(t_np, np.ndarray) and t_np.dtype == np.float64
    assert t_jnp.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(t_jnp), t_np, rtol=1e-12, atol=0)
    b_np, s_np = decode_time_parts_s(c_np, tokens, sampled, pairs, xp=np)
    b_jnp, s_jnp = decode_time_parts_s(
        c_jnp, jnp.asarray(tokens), jnp.asarray(sampled), jnp.asarray(pairs)
    )
    np.testing.assert_allclose(np.asarray(b_jnp), b_np, rtol=1e-12, atol=0)
    np.testing.assert_allclose(np.asarray(s_jnp), s_np, rtol=1e-12, atol=0)


def test_vectorised_coefficients_equal_per_plan():
    model = load_model("meta-llama/Llama-3.1-70B")
    gpu = get_gpu("H100-SXM-80GB")
    hw = default_hardware_params()
    plans = _plans(model, num_gpus=16, gpus_per_node=8)
    whole = cost_coeffs(plans, model, gpu, hw, gpus_per_node=8)
    for i, row in enumerate(plans):
        one = cost_coeffs(row[None, :], model, gpu, hw, gpus_per_node=8)
        for name, a, b in zip(whole._fields, whole, one):
            np.testing.assert_allclose(np.asarray(b)[0], np.asarray(a)[i], rtol=1e-13, err_msg=name)
