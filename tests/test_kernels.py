"""Per-operator models: units, structure, precision rules and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apex_jax import fit_kernels as C
from apex_jax.cost import kernels as K
from apex_jax.cost.energy import energy_coeffs, iteration_energy_j
from apex_jax.hardware import get_gpu
from apex_jax.model_spec import load_model
from apex_jax.plans import COL

H100 = get_gpu("H100-SXM-80GB")
A100 = get_gpu("A100-SXM-80GB")


@pytest.fixture(scope="module")
def params():
    return K.load_calibrated("H100-SXM-80GB")


def test_a_big_gemm_runs_near_peak(params):
    t = float(K.gemm_time_s(params, H100, 8192, 8192, 8192))
    achieved = 2 * 8192**3 / t
    assert 0.5 * H100.peak_flops["bf16"] < achieved < H100.peak_flops["bf16"]


def test_a_gemv_streams_its_weights(params):
    t = float(K.gemm_time_s(params, H100, 1, 8192, 8192))
    floor = 8192 * 8192 * 2 / H100.hbm_bandwidth_bytes_per_s
    assert floor < t < 3 * floor + 20e-6


def test_decode_attention_is_affine_in_kv_tokens(params):
    kv = np.array([0.0, 100.0, 1e4, 1e6])
    t = np.asarray(K.decode_attention_time_s(params, H100, 32, kv, 8, 1, 128))
    np.testing.assert_allclose(np.diff(t) / np.diff(kv), (t[1] - t[0]) / 100.0, rtol=1e-9)
    fp8 = np.asarray(K.decode_attention_time_s(params, H100, 32, kv, 8, 1, 128, kv_bytes=1.0))
    assert fp8[-1] < t[-1]


def test_times_grow_with_work(params):
    assert K.prefill_attention_time_s(
        params, H100, 1, 4096, 8, 1, 128
    ) > K.prefill_attention_time_s(params, H100, 1, 1024, 8, 1, 128)
    sizes = np.array([1e3, 1e5, 1e7, 1e9])
    for op in K.COLLECTIVE_OPS:
        t = np.asarray(K.collective_time_s(params, H100, op, sizes, 8))
        assert (np.diff(t) > 0).all()
    inter = K.collective_time_s(params, H100, "all_reduce", 1e8, 16, num_nodes=2)
    assert inter > K.collective_time_s(params, H100, "all_reduce", 1e8, 8)
    assert K.p2p_time_s(params, H100, 1e6, inter_node=True) > K.p2p_time_s(params, H100, 1e6)
    m = np.array([1.0, 64.0, 4096.0])
    for f in (K.norm_time_s, K.add_time_s, K.embedding_time_s):
        assert (np.diff(np.asarray(f(params, H100, m, 8192))) > 0).all()
    moe = K.moe_time_s(params, H100, m, 4096, 14336, 2, 8)
    assert (np.diff(np.asarray(moe)) > 0).all()
    lm = K.lm_head_sampling_time_s(params, H100, m, 8192, 128256, tp=8)
    assert (np.diff(np.asarray(lm)) > 0).all()


def test_precision_rules():
    assert K.gemm_precision("fp8", H100) == ("fp8", 1.0, 1.0)
    assert K.gemm_precision("fp8", A100) == ("bf16", 1.0, 2.0)  # weight-only on Ampere
    assert K.gemm_precision("int4", H100) == ("bf16", 0.5, 2.0)
    assert K.gemm_precision("int8", H100) == ("bf16", 1.0, 2.0)
    assert K.gemm_precision("bf16", H100) == ("bf16", 2.0, 2.0)
    assert K.attention_precision("fp8", H100) == ("bf16", 1.0)
    assert K.attention_precision("bf16", get_gpu("V100-PCIE-16GB"))[0] == "fp16"


def _total_time(p, gpu, datasets):
    return sum(jnp.sum(C.predict_operator_s(op, p, gpu, d)) for op, d in datasets.items())


def test_gradient_of_every_constant_is_finite_and_non_zero():
    gpu = H100
    datasets = C.operator_datasets(gpu.name)
    small = {}
    for op, d in datasets.items():
        pick = np.random.default_rng(0).permutation(len(d["time_s"]))[:400]
        small[op] = {k: v[pick] for k, v in d.items()}
    # Make sure both GEMM formats, every collective and fp8 KV rows are present.
    assert set(np.unique(small["gemm"]["fp8"])) == {0.0, 1.0}
    assert set(np.unique(small["collectives"]["op"])) == {0.0, 1.0, 2.0, 3.0}
    params = K.default_kernel_params()
    # Per-operator losses so that a constant's gradient is not drowned by bigger operators.
    grads = [
        jax.grad(lambda p, op=op, d=d: jnp.sum(jnp.log(C.predict_operator_s(op, p, gpu, d))))(
            params
        )
        for op, d in small.items()
    ]
    for name in params._fields:
        g = sum(np.abs(np.asarray(getattr(gr, name))) for gr in grads)
        assert np.all(np.isfinite(g)), name
        assert np.all(g > 0), name


def test_energy_follows_utilisation_and_clock():
    model = load_model("meta-llama/Llama-3.1-8B")
    plan = np.zeros((1, max(COL.values()) + 1), np.int32)
    plan[0, COL["tp"]] = plan[0, COL["pp"]] = plan[0, COL["dp"]] = 1
    plan[0, COL["weight_dtype"]] = 1  # bf16
    plan[0, COL["kv_dtype"]] = 1
    fast = energy_coeffs(plan, model, H100)
    slow = energy_coeffs(plan, model, H100, clock_mhz=810.0)
    idle = float(iteration_energy_j(fast, 0.01, 0.0, 0.0, 0.0, 0.0)[0])
    busy = float(iteration_energy_j(fast, 0.01, 4096.0, 1.0, 0.0, 0.0)[0])
    assert idle >= H100.idle_w * 0.01 and busy > idle
    assert busy <= H100.tdp_w * 0.01 * (1 + 1e-9)
    # A lower clock: more compute time per token, less dynamic power.
    assert float(slow.compute_s_per_token[0]) > float(fast.compute_s_per_token[0])
    assert float(slow.dynamic_w[0]) < float(fast.dynamic_w[0])
