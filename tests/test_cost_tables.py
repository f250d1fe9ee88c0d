"""Measured tables: units, grids, and interpolation exact at grid points and monotone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apex_jax.cost import tables as ct
from apex_jax.cost.sites import plan_sites
from apex_jax.hardware import get_gpu
from apex_jax.model_spec import load_model
from apex_jax.plans import plan_row


def test_units_are_seconds_and_bytes():
    gemm = ct.load_gemm("H100-SXM-80GB")
    # 4096^3 bf16 GEMM: ~0.17 ms measured (the file stores milliseconds).
    pick = (
        (gemm["dtype"] == "bf16") & (gemm["m"] == 4096) & (gemm["n"] == 4096) & (gemm["k"] == 4096)
    )
    assert 1e-4 < gemm["time_s"][pick][0] < 3e-4
    nccl = ct.load_collectives("H100-SXM-80GB")
    aic = nccl["source"] == "aiconfigurator"
    # AIConfigurator counts elements: its smallest half message, 256 elements, is 512 bytes
    # (and its smallest int8 message, 512 elements, too); its largest, 2**29 int8 elements.
    assert nccl["bytes"][aic].min() == 512.0
    assert nccl["bytes"][aic].max() == 2.0**29
    v100 = ct.load_gemm("V100-PCIE-16GB")  # APEX+: microseconds
    assert v100["time_s"].min() > 1e-6 and v100["time_s"].max() < 10.0
    p2p = ct.load_p2p("H100-SXM-80GB")
    assert set(np.unique(p2p["inter_node"])) == {0.0, 1.0}


def test_every_catalog_source_loads():
    for gpu in ("H100-SXM-80GB", "H200-SXM-141GB", "A100-SXM-80GB"):
        for name in ("gemm", "context_attention", "generation_attention", "moe", "collectives"):
            assert name in ct.available_tables(gpu)
        assert len(ct.load_generation_attention(gpu)["time_s"]) > 1000
    assert ct.available_tables("A40-PCIE-48GB") == ["vidur_mlp"]
    with pytest.raises(FileNotFoundError):
        ct.load_context_attention("V100-PCIE-16GB")


def _small_grid():
    rng = np.random.default_rng(0)
    xs, ys = np.array([1.0, 4.0, 16.0, 64.0]), np.array([8.0, 32.0, 128.0])
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    t = 1e-6 * gx * (1 + gy) * rng.uniform(0.8, 1.2, gx.shape)
    return ct.build_grid([gx.ravel(), gy.ravel()], t.ravel()), gx, gy, t


def test_interpolation_is_exact_at_grid_points():
    grid, gx, gy, t = _small_grid()
    got = np.asarray(ct.interp_grid(grid, gx, gy))
    np.testing.assert_allclose(got, t, rtol=1e-12)
    gemm = ct.gemm_grid("H100-SXM-80GB", "bf16")
    table = ct.load_gemm("H100-SXM-80GB")
    rows = np.flatnonzero(table["dtype"] == "bf16")[:500]
    got = np.asarray(ct.interp_grid(gemm, table["m"][rows], table["n"][rows], table["k"][rows]))
    np.testing.assert_allclose(got, table["time_s"][rows], rtol=1e-9)


def test_interpolation_is_monotone_between_grid_points():
    grid, _, _, _ = _small_grid()
    for j, y in enumerate(np.exp(grid.axes[1])):
        for i in range(len(grid.axes[0]) - 1):
            lo, hi = np.exp(grid.axes[0][i]), np.exp(grid.axes[0][i + 1])
            x = np.linspace(lo, hi, 33)
            v = np.asarray(ct.interp_grid(grid, x, np.full_like(x, y)))
            d = np.diff(v)
            assert (d >= -1e-18).all() or (d <= 1e-18).all()
            ends = np.exp(grid.log_time[[i, i + 1], j])
            assert v.min() >= ends.min() * (1 - 1e-12) and v.max() <= ends.max() * (1 + 1e-12)


def test_interpolation_runs_under_jit_and_grad():
    grid, _, _, _ = _small_grid()
    f = jax.jit(lambda x, y: ct.interp_grid(grid, x, y))
    assert np.isfinite(np.asarray(f(jnp.array([2.0, 50.0]), jnp.array([10.0, 100.0])))).all()
    g = jax.grad(lambda x: ct.interp_grid(grid, x, 20.0))(3.0)
    assert np.isfinite(g) and g > 0


def test_coverage_needs_measured_corners():
    grid, _, _, _ = _small_grid()
    assert ct.grid_covers(grid, np.array([1.0, 10.0, 64.0]), np.array([8.0, 50.0, 128.0])).all()
    assert not ct.grid_covers(grid, np.array([100.0]), np.array([8.0])).any()
    partial = ct.build_grid([np.array([1.0, 2.0, 1.0]), np.array([1.0, 1.0, 2.0])], np.ones(3))
    assert not partial.measured.all()
    assert not ct.grid_covers(partial, np.array([1.5]), np.array([1.5])).any()
    assert ct.grid_covers(partial, np.array([1.5]), np.array([1.0])).all()


def test_power_law_moe_rows_time_the_busiest_rank():
    """The power-law rows time the busiest EP rank, whose load grows with the ranks it is the
    busiest of; without EP it is at most the mean (a token takes an expert once, so a hot
    expert's rows are capped)."""
    loads = [ct.power_law_rank_load(4096, 8, 128, ep, 1.01) for ep in (1, 2, 8, 32)]
    assert loads[0] <= 1.0 < loads[1] < loads[2] < loads[3]
    # Fewer rows than experts: a few experts take them all.
    assert ct.power_law_rank_load(2, 8, 128, 8, 1.2) > 2.0


def test_block_fp8_weights_read_their_own_tables():
    """Qwen3-235B-A22B's block-scaled fp8 experts and attention GEMMs are timed by
    AIConfigurator's fp8_block rows (vLLM's block-fp8 kernels), not by the per-tensor fp8
    rows, whose experts measure 3-6x slower at decode sizes."""
    model, gpu = load_model("Qwen/Qwen3-235B-A22B"), get_gpu("H200-SXM-141GB")
    plans = np.stack([plan_row({"tp": 4, "weight_dtype": w}) for w in ("fp8", "fp8_block")])
    sites, _, _ = plan_sites(
        plans, model, gpu, network_transfers=np.zeros(2), clock_mhz=np.full(2, 1980.0),
        gpus_per_node=8,
    )
    grids = ct.moe_grids(gpu.name)
    covered = sites.moe.measured.covered
    np.testing.assert_array_equal(covered[0], covered[1])
    tokens = sites.moe.tokens[1][covered[1]]
    assert tokens.max() >= 8192  # every knot up to the tables' largest batch
    seconds = sites.moe.measured.seconds[:, covered[1]]
    for row, dtype in enumerate(("fp8", "fp8_block")):
        grid = grids[(dtype, 4096, 1536, 8, 128, 4, 1)]
        np.testing.assert_allclose(seconds[row], ct.interp_grid(grid, tokens, xp=np), rtol=1e-12)
    decode = tokens <= 64
    assert (seconds[1][decode] < 0.5 * seconds[0][decode]).all()
    qkv = sites.gemms["qkv"]
    for row, dtype in enumerate(("fp8", "fp8_block")):
        on = qkv.measured.covered[row]
        assert on.any()
        points = [qkv.m[row][on], np.full(on.sum(), qkv.n[row]), np.full(on.sum(), qkv.k[row])]
        expected = ct.interp_grid(ct.gemm_grid(gpu.name, dtype), *points, xp=np)
        np.testing.assert_allclose(qkv.measured.seconds[row][on], expected, rtol=1e-12)
