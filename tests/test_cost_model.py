"""Structure of the iteration-time model: monotone in every feature, one formula on two array
namespaces.

The constants are being calibrated, so these tests assert shapes of the model (growth,
affinity, zeros, equality between code paths), never particular times.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apex_jax.cost.energy import EnergyCoeffs
from apex_jax.cost.iteration import (
    DECODE_KV_KNOTS,
    SAMPLED_KNOTS,
    TOKEN_KNOTS,
    CostCoeffs,
    _priced,
    cost_coeffs,
    decode_time_parts_s,
    iteration_time_s,
    pipeline_parts_s,
)
from apex_jax.hardware import default_hardware_params, get_gpu
from apex_jax.model_spec import load_model
from apex_jax.plans import COL, PlanSpace, enumerate_plans, plan_row


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
    """``(plans, coeffs as NumPy)`` for every plan of a model on 2 x 4 H100s, without the
    engine's host costs per sequence and eager launch (tested on their own below), so that
    every feature's own cost shows."""
    model = load_model(request.param)
    plans = _plans(model, num_gpus=8, gpus_per_node=4)
    c = cost_coeffs(
        plans,
        model,
        get_gpu("H100-SXM-80GB"),
        default_hardware_params(),
        gpus_per_node=4,
        host_s_per_seq=0.0,
        eager_s_per_layer=0.0,
    )
    return plans, jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), c)


def _time(c, num_tokens=0.0, num_sampled=0.0, prefill_pairs=0.0, decoding=0.0, kv_tokens=0.0):
    """Iteration time of every plan ``[P]``, or ``[P, K]`` when a feature is ``[K]``."""
    c = jax.tree_util.tree_map(lambda x: x[:, None], c)
    return iteration_time_s(c, num_tokens, num_sampled, prefill_pairs, decoding, kv_tokens, xp=np)


def test_coefficients_are_finite_float64_and_positive(setup):
    plans, c = setup
    shapes = CostCoeffs.zeros((len(plans),))
    for name, x in c._asdict().items():
        assert x.dtype == np.float64, name
        assert x.shape == getattr(shapes, name).shape, name
        assert np.isfinite(x).all() and (x >= 0).all(), name


def test_decode_time_is_affine_up_to_the_end_of_its_piece(setup):
    """For a fixed batch the time is affine in the KV entries up to ``kv_tokens_end``, the
    next breakpoint, continuous there, and takes another slope after it for measured plans
    (a table's segments past its longest measurement continue its last one)."""
    _, c = setup
    for batch in (1.0, 8.0, 48.0, 200.0):
        for kv in (batch * 3.0, 1000.0 * batch, 3e5, 1.5e6):
            parts = decode_time_parts_s(c, batch, batch, 0.0, batch, kv, xp=np)
            end = min(k for k in DECODE_KV_KNOTS if k > kv)
            np.testing.assert_array_equal(parts.kv_tokens_end, end)
            inside = np.linspace(kv, end, 7)
            t = _time(c, batch, batch, 0.0, batch, inside)
            affine = parts.base_s[:, None] + parts.slope_s_per_kv_token[:, None] * inside
            np.testing.assert_allclose(t, affine, rtol=1e-12)
            after = decode_time_parts_s(c, batch, batch, 0.0, batch, end, xp=np)
            np.testing.assert_allclose(
                after.base_s + after.slope_s_per_kv_token * end, affine[:, -1], rtol=1e-12
            )
            if end <= 32768:  # where every table's batch has measurements on both sides
                same = np.isclose(
                    after.slope_s_per_kv_token, parts.slope_s_per_kv_token, rtol=1e-6, atol=0.0
                )
                assert not same.all()
    # Past the last breakpoint the last piece goes on.
    last = decode_time_parts_s(c, 8.0, 8.0, 0.0, 8.0, 4.0 * DECODE_KV_KNOTS[-1], xp=np)
    assert np.isinf(last.kv_tokens_end).all()


def test_decode_attention_is_zero_without_decoding_sequences(setup):
    _, c = setup
    no_decode = _time(c, 512.0, 1.0, 512.0 * 513.0 / 2.0)
    no_attention = jax.tree_util.tree_map(np.copy, c)._replace(
        decode_attn_grid_s=np.zeros_like(c.decode_attn_grid_s)
    )
    np.testing.assert_array_equal(no_decode, _time(no_attention, 512.0, 1.0, 512.0 * 513.0 / 2.0))
    assert (
        _time(c, 8.0, 8.0, 0.0, 8.0, 800.0) > _time(no_attention, 8.0, 8.0, 0.0, 8.0, 800.0)
    ).all()


def test_time_grows_with_decode_kv_tokens(setup):
    _, c = setup
    t = _time(c, 32, 32, 0.0, 32, np.linspace(32, 2e6, 50))
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
        times.append(_time(jax.tree_util.tree_map(np.asarray, c), 256.0, 256.0, 0.0, 256.0, 1e5))
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
    decoding = np.minimum(sampled, rng.integers(0, 256, n)).astype(np.float64)
    kv = decoding * rng.uniform(1, 4e4, n)
    features = (tokens, sampled, pairs, decoding, kv)
    c_np = jax.tree_util.tree_map(lambda x: x[:, None], c)
    c_jnp = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[:, None], c)
    t_np = iteration_time_s(c_np, *features, xp=np)
    t_jnp = iteration_time_s(c_jnp, *map(jnp.asarray, features))
    assert isinstance(t_np, np.ndarray) and t_np.dtype == np.float64
    assert t_jnp.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(t_jnp), t_np, rtol=1e-12, atol=0)
    parts_np = decode_time_parts_s(c_np, *features, xp=np)
    parts_jnp = decode_time_parts_s(c_jnp, *map(jnp.asarray, features))
    for a, b in zip(parts_jnp, parts_np):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-12, atol=0)


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


def test_zeros_has_one_value_per_plan_and_one_slope_per_knot():
    for batch in [(), (3,), (2, 5)]:
        z = CostCoeffs.zeros(batch)
        for name, x in z._asdict().items():
            assert x.dtype == np.float64 and not x.any(), name
            assert x.shape[: len(batch)] == batch, name
        assert z.fixed_s.shape == batch
        assert z.token_curve_slopes_s_per_token.shape == (*batch, len(TOKEN_KNOTS))
        assert z.sampled_curve_slopes_s_per_seq.shape == (*batch, len(SAMPLED_KNOTS))
        assert z.enc_curve_slopes_s_per_token.shape == (*batch, len(TOKEN_KNOTS))
        e = EnergyCoeffs.zeros(batch)
        assert all(x.shape == batch and not x.any() for x in e)
    # Zero constants cost nothing, whatever the batch.
    assert iteration_time_s(CostCoeffs.zeros(), 512.0, 8.0, 1e4, 8.0, 1e5, xp=np) == 0.0


def test_stacking_per_plan_coefficients_gives_the_batched_ones():
    """The constants are a pytree: per-plan ones stack with tree_map into the batched ones,
    and indexing the batch gives each plan's back."""
    model = load_model("mistralai/Mixtral-8x7B-v0.1")
    gpu = get_gpu("H100-SXM-80GB")
    hw = default_hardware_params()
    plans = _plans(model, num_gpus=8, gpus_per_node=8)[::3]
    whole = cost_coeffs(plans, model, gpu, hw, gpus_per_node=8)
    singles = [cost_coeffs(row[None, :], model, gpu, hw, gpus_per_node=8) for row in plans]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *singles)
    assert jax.tree_util.tree_structure(stacked) == jax.tree_util.tree_structure(whole)
    for name, a, b in zip(CostCoeffs._fields, whole, stacked):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-13, err_msg=name)
    i = len(plans) // 2
    one = jax.tree_util.tree_map(lambda x: x[i], whole)
    assert one.fixed_s.shape == () and one.token_curve_slopes_s_per_token.shape == (
        len(TOKEN_KNOTS),
    )
    kv = np.array([64.0, 4096.0])
    np.testing.assert_array_equal(
        iteration_time_s(one, 64.0, 64.0, 0.0, 64.0, kv, xp=np),
        _time(jax.tree_util.tree_map(np.asarray, whole), 64.0, 64.0, 0.0, 64.0, kv)[i],
    )


def test_pricing_compiles_once_for_new_plans_and_constants():
    """The distinct plans are priced by one jitted function: other plans (in the same size
    bucket) and other HardwareParams reuse its executable."""
    model = load_model("meta-llama/Llama-3.1-70B")
    gpu = get_gpu("H100-SXM-80GB")
    hw = default_hardware_params()
    plans = _plans(model)
    first = cost_coeffs(plans, model, gpu, hw, gpus_per_node=8)
    compiled = _priced._cache_size()
    slower = hw._replace(log_compute_eff=hw.log_compute_eff - 0.5)
    again = cost_coeffs(plans[::-1], model, gpu, slower, gpus_per_node=8)
    assert _priced._cache_size() == compiled
    assert (np.asarray(again.token_curve_base_s)[::-1] > np.asarray(first.token_curve_base_s)).all()


def _at(c, num_tokens=0.0, num_sampled=0.0, prefill_pairs=0.0, decoding=0.0, kv_tokens=0.0):
    """Iteration time of every plan ``[P]``."""
    return iteration_time_s(c, num_tokens, num_sampled, prefill_pairs, decoding, kv_tokens, xp=np)


def _llama_70b_tp8(**host):
    """Constants of Llama-3.1-70B (80 layers) on TP8 with the given host costs."""
    model = load_model("meta-llama/Llama-3.1-70B")
    plans = plan_row({"tp": 8})[None, :]
    c = cost_coeffs(
        plans, model, get_gpu("H100-SXM-80GB"), default_hardware_params(), gpus_per_node=8, **host
    )
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), c)


def test_host_time_grows_by_its_figure_per_sampled_sequence():
    """vLLM 0.6's Python work per sequence: each sampled sequence adds ``host_s_per_seq``
    to the iteration, and a pipeline counts it off the stages."""
    per_seq = dict(host_s_per_seq=1e-3, eager_s_per_layer=0.0)
    c, c0 = _llama_70b_tp8(**per_seq), _llama_70b_tp8(host_s_per_seq=0.0, eager_s_per_layer=0.0)
    for batch in (1.0, 16.0, 200.0):
        extra = _at(c, batch, batch, 0.0, batch, 500.0 * batch) - _at(
            c0, batch, batch, 0.0, batch, 500.0 * batch
        )
        np.testing.assert_allclose(extra, batch * 1e-3, rtol=1e-9)
        off, _ = pipeline_parts_s(c, batch, batch, 0.0, xp=np)
        off0, _ = pipeline_parts_s(c0, batch, batch, 0.0, xp=np)
        np.testing.assert_allclose(off - off0, batch * 1e-3, rtol=1e-9)


def test_eager_iterations_take_at_least_the_layers_launch_time():
    """Without a CUDA graph (a prefill, or a decode batch above ``max_graph_batch``) the
    device part of an iteration lasts at least 80 layers' launch; a graph-sized decode batch
    and a long prefill, whose kernels outlast the launch, are unchanged."""
    c = _llama_70b_tp8(host_s_per_seq=0.0, eager_s_per_layer=0.5e-3, max_graph_batch=256)
    c0 = _llama_70b_tp8(host_s_per_seq=0.0, eager_s_per_layer=0.0, max_graph_batch=256)
    floor_s, host_s = 80 * 0.5e-3, c.host_s
    np.testing.assert_allclose(c.eager_floor_s, floor_s)
    short_prefill = (16.0, 1.0, 16.0 * 17.0 / 2.0)
    assert (_at(c0, *short_prefill) - host_s < floor_s).all()
    np.testing.assert_allclose(_at(c, *short_prefill), host_s + floor_s, rtol=1e-12)
    long_prefill = (8192.0, 1.0, 8192.0 * 8193.0 / 2.0)
    np.testing.assert_array_equal(_at(c, *long_prefill), _at(c0, *long_prefill))
    graph = (256.0, 256.0, 0.0, 256.0, 256.0 * 300.0)
    np.testing.assert_array_equal(_at(c, *graph), _at(c0, *graph))
    eager = (257.0, 257.0, 0.0, 257.0, 257.0 * 300.0)
    np.testing.assert_allclose(_at(c, *eager), host_s + floor_s, rtol=1e-12)


def test_a_floored_decode_piece_ends_where_the_kernels_outlast_the_launch():
    """An eager decode batch's time is flat in its KV entries while the floor binds, and its
    affine piece ends where the device part reaches the floor, so a run of decode
    iterations stays exact across that point."""
    c0 = _llama_70b_tp8(host_s_per_seq=0.0, eager_s_per_layer=0.0, max_graph_batch=0)
    batch, kv = 8.0, 3000.0
    device_s = np.array([_at(c0, batch, batch, 0.0, batch, k)[0] for k in (kv, 4000.0)])
    device_s = device_s - c0.host_s[0]
    # A floor between the device times at 3,000 and 4,000 KV entries (one affine piece).
    floor_s = float(device_s.mean())
    c = _llama_70b_tp8(host_s_per_seq=0.0, eager_s_per_layer=floor_s / 80, max_graph_batch=0)
    parts = decode_time_parts_s(c, batch, batch, 0.0, batch, kv, xp=np)
    assert parts.slope_s_per_kv_token[0] == 0.0
    crossing = float(parts.kv_tokens_end[0])
    assert kv < crossing < 4000.0
    np.testing.assert_allclose(
        [_at(c, batch, batch, 0.0, batch, k)[0] for k in (kv, crossing, 4000.0)],
        [c.host_s[0] + floor_s, c.host_s[0] + floor_s, c0.host_s[0] + device_s[1]],
        rtol=1e-9,
    )
