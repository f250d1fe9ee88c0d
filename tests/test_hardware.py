"""Tests for the GPU catalog and the HardwareParams pytree."""

import jax

jax.config.update("jax_enable_x64", True)

import math

import jax.numpy as jnp
import numpy as np
import pytest

from apex_jax import hardware
from apex_jax.deployment import make_deployment
from apex_jax.dtypes import DTYPES, dtype_code

ALIASES = {
    "h100": "H100-SXM-80GB",
    "h100-sxm": "H100-SXM-80GB",
    "H100_SXM": "H100-SXM-80GB",
    "NVIDIA H100 80GB HBM3": "H100-SXM-80GB",
    "h200": "H200-SXM-141GB",
    "h200_sxm": "H200-SXM-141GB",
    "NVIDIA H200": "H200-SXM-141GB",
    "a100": "A100-SXM-80GB",
    "a100-80gb": "A100-SXM-80GB",
    "a100_sxm": "A100-SXM-80GB",
    "NVIDIA A100-SXM4-80GB": "A100-SXM-80GB",
    "NVIDIA A100-SXM4-40GB": "A100-SXM-40GB",
    "a40": "A40-PCIE-48GB",
    "NVIDIA A40": "A40-PCIE-48GB",
    "v100": "V100-PCIE-16GB",
    "Tesla V100-PCIE-16GB": "V100-PCIE-16GB",
    "b200": "B200-SXM-180GB",
    "NVIDIA B200": "B200-SXM-180GB",
    "l40s": "L40S-PCIE-48GB",
    "NVIDIA L40S": "L40S-PCIE-48GB",
    "mi300x": "MI300X-OAM-192GB",
    "AMD Instinct MI300X": "MI300X-OAM-192GB",
    "AMD Instinct MI300X VF": "MI300X-OAM-192GB",
    "Tesla V100-SXM2-32GB": "V100-SXM2-32GB",
}


def test_catalog_has_the_apex_gpus():
    for name in [
        "H100-SXM-80GB",
        "H200-SXM-141GB",
        "A100-SXM-80GB",
        "A40-PCIE-48GB",
        "V100-PCIE-16GB",
    ]:
        assert name in hardware.list_gpus()
    assert hardware.list_gpus() == list(hardware.GPU_CATALOG)


@pytest.mark.parametrize("name", list(hardware.GPU_CATALOG))
def test_every_gpu_resolves_by_canonical_name_in_any_case(name):
    spec = hardware.GPU_CATALOG[name]
    assert spec.name == name
    assert hardware.get_gpu(name) is spec
    assert hardware.get_gpu(name.lower()) is spec
    assert hardware.get_gpu(f"  {name.upper()} ") is spec


@pytest.mark.parametrize("alias,name", sorted(ALIASES.items()))
def test_aliases_resolve(alias, name):
    assert hardware.get_gpu(alias) is hardware.GPU_CATALOG[name]


def test_every_catalog_gpu_has_an_alias():
    resolved = {hardware.get_gpu(alias).name for alias in hardware._ALIASES}
    assert resolved == set(hardware.GPU_CATALOG)


@pytest.mark.parametrize("spec", list(hardware.GPU_CATALOG.values()), ids=lambda s: s.name)
def test_specs_are_complete_and_positive(spec):
    assert set(spec.peak_flops) == set(DTYPES)
    for value in [
        *spec.peak_flops.values(),
        spec.hbm_bandwidth_bytes_per_s,
        spec.hbm_capacity_bytes,
        spec.nvlink_bandwidth_bytes_per_s,
        spec.network_bandwidth_bytes_per_s,
        spec.tdp_w,
        spec.idle_w,
        spec.max_clock_mhz,
    ]:
        assert isinstance(value, float | int)
        assert math.isfinite(value) and value > 0
    assert spec.idle_w < spec.tdp_w
    assert spec.source
    # Lower precision is never slower than higher precision on the same GPU.
    assert spec.peak_flops["fp16"] >= spec.peak_flops["fp32"]
    assert spec.peak_flops["fp8"] >= spec.peak_flops["fp16"]
    assert spec.peak_flops["int8"] >= spec.peak_flops["fp16"]
    assert spec.peak_flops["int4"] >= spec.peak_flops["fp16"]


def test_h100_matches_datasheet():
    spec = hardware.get_gpu("H100-SXM-80GB")
    assert spec.peak_flops == {
        "fp32": 494.5e12,
        "bf16": 989e12,
        "fp16": 989e12,
        "fp8": 1979e12,
        "int8": 1979e12,
        "int4": 989e12,
        "fp8_block": 1979e12,  # block-scaled fp8 runs on the fp8 tensor cores
    }
    assert spec.hbm_bandwidth_bytes_per_s == 3.35e12
    assert spec.hbm_capacity_bytes == 81559 * 2**20
    assert spec.nvlink_bandwidth_bytes_per_s == 450e9
    assert spec.network_bandwidth_bytes_per_s == 50e9
    assert spec.tdp_w == 700.0
    assert spec.max_clock_mhz == 1980.0
    assert 0.05 * spec.tdp_w <= spec.idle_w <= 0.2 * spec.tdp_w


def test_h200_differs_from_h100_only_in_memory():
    h100, h200 = hardware.get_gpu("h100"), hardware.get_gpu("h200")
    assert h200.peak_flops == h100.peak_flops
    assert h200.hbm_bandwidth_bytes_per_s == 4.8e12
    assert h200.hbm_capacity_bytes > 140 * 2**30
    assert h200.nvlink_bandwidth_bytes_per_s == 450e9
    assert h200.tdp_w == 700.0


def test_gpus_without_fp8_run_it_at_the_16_bit_rate():
    for name in ["A100-SXM-80GB", "A100-SXM-40GB", "A40-PCIE-48GB"]:
        spec = hardware.get_gpu(name)
        assert spec.peak_flops["fp8"] == spec.peak_flops["bf16"]
    a100 = hardware.get_gpu("a100")
    assert a100.peak_flops["bf16"] == 312e12
    assert a100.peak_flops["int8"] == 624e12
    assert a100.nvlink_bandwidth_bytes_per_s == 300e9


def test_v100_has_no_bf16_tensor_cores():
    v100 = hardware.get_gpu("v100")
    assert v100.peak_flops["fp16"] == 112e12
    assert v100.peak_flops["bf16"] == v100.peak_flops["fp32"] == 14e12
    assert v100.nvlink_bandwidth_bytes_per_s == 16e9


def test_capacity_is_driver_reported_not_marketed():
    # The driver reports a little under the marketed size (81559 MiB for "80GB"); the A40 loses
    # most, because ECC on GDDR6 takes 1/16 of the memory.
    for name, marketed_gb in [
        ("H100-SXM-80GB", 80),
        ("H200-SXM-141GB", 141),
        ("A100-SXM-80GB", 80),
        ("A40-PCIE-48GB", 48),
        ("V100-PCIE-16GB", 16),
        ("B200-SXM-180GB", 180),
        ("L40S-PCIE-48GB", 48),
        ("MI300X-OAM-192GB", 192),
    ]:
        capacity = hardware.get_gpu(name).hbm_capacity_bytes
        assert 0.93 * marketed_gb * 2**30 <= capacity <= marketed_gb * 2**30


def test_unknown_gpu_suggests_close_match():
    with pytest.raises(ValueError, match="did you mean 'H100-SXM-80GB'") as info:
        hardware.get_gpu("H1000")
    message = str(info.value)
    assert "'H1000'" in message
    for name in hardware.list_gpus():
        assert name in message


def test_unknown_gpu_without_close_match_lists_known_gpus():
    with pytest.raises(ValueError, match="Known GPUs: H100-SXM-80GB") as info:
        hardware.get_gpu("TPU-v5e")
    assert "did you mean" not in str(info.value)


def test_spec_is_frozen_and_hashable():
    spec = hardware.get_gpu("h100")
    with pytest.raises(AttributeError):
        spec.tdp_w = 1.0
    assert hash(spec) == hash(hardware.get_gpu("H100-SXM-80GB"))
    assert len({spec, hardware.get_gpu("h200"), hardware.get_gpu("h100-sxm")}) == 2


def test_spec_validation_rejects_missing_dtype():
    spec = hardware.get_gpu("h100")
    flops = {d: v for d, v in spec.peak_flops.items() if d != "int4"}
    with pytest.raises(ValueError, match="int4"):
        hardware.GpuSpec(**{**vars(spec), "peak_flops": flops})
    with pytest.raises(ValueError, match="tdp_w"):
        hardware.GpuSpec(**{**vars(spec), "tdp_w": 0.0})


def test_peak_flops_vector_follows_dtype_codes():
    spec = hardware.get_gpu("h100")
    vector = hardware.peak_flops_vector(spec)
    assert vector.dtype == np.float64 and vector.shape == (len(DTYPES),)
    for name in DTYPES:
        assert vector[dtype_code(name)] == spec.peak_flops[name]


def test_default_hardware_params_values():
    params = hardware.default_hardware_params()
    expected = {
        "log_compute_eff": 0.7,
        "log_attn_compute_eff": 0.5,
        "log_memory_eff": 0.8,
        "log_link_eff": 0.7,
        "log_collective_latency_s": 10e-6,
        "log_kernel_latency_s": 25e-6,
        "log_iteration_overhead_scale": 1.0,
    }
    assert set(params._fields) == set(expected)
    for field, value in expected.items():
        leaf = getattr(params, field)
        assert leaf.dtype == jnp.float64 and leaf.shape == ()
        assert np.isfinite(leaf)
        np.testing.assert_allclose(np.exp(np.asarray(leaf)), value, rtol=1e-12)


def test_hardware_params_is_a_pytree_that_vmaps():
    params = hardware.default_hardware_params()
    leaves = jax.tree_util.tree_leaves(params)
    assert len(leaves) == 7
    assert all(leaf.dtype == jnp.float64 for leaf in leaves)

    # A leading plan axis, with different values per plan, maps through vmap unchanged.
    batched = jax.tree_util.tree_map(lambda x: x + jnp.arange(3.0), params)
    out = jax.vmap(lambda p: jnp.exp(p.log_compute_eff) * 2.0)(batched)
    np.testing.assert_allclose(out, 2.0 * 0.7 * np.exp(np.arange(3.0)), rtol=1e-12)

    grads = jax.grad(lambda p: jnp.exp(p.log_memory_eff))(params)
    assert isinstance(grads, hardware.HardwareParams)
    np.testing.assert_allclose(grads.log_memory_eff, 0.8, rtol=1e-12)
    assert grads.log_compute_eff == 0.0


def test_new_catalog_gpus_match_their_datasheets():
    b200, l40s, mi300x = (hardware.get_gpu(n) for n in ("b200", "l40s", "mi300x"))
    # Dense rates: half of each datasheet's with-sparsity figure where it gives that one.
    assert (b200.peak_flops["bf16"], b200.peak_flops["fp8"]) == (2.25e15, 4.5e15)
    assert (b200.hbm_bandwidth_bytes_per_s, b200.tdp_w) == (7.7e12, 1000.0)
    assert b200.nvlink_bandwidth_bytes_per_s == 900e9
    assert (l40s.peak_flops["bf16"], l40s.peak_flops["fp8"]) == (362.05e12, 733e12)
    assert (l40s.hbm_bandwidth_bytes_per_s, l40s.tdp_w) == (864e9, 350.0)
    assert (mi300x.peak_flops["bf16"], mi300x.peak_flops["fp8"]) == (1307.4e12, 2614.9e12)
    assert (mi300x.hbm_bandwidth_bytes_per_s, mi300x.tdp_w) == (5.3e12, 750.0)
    for spec in (b200, l40s, mi300x):
        assert "datasheet" in spec.source


CUSTOM = {
    "name": "MyGPU-96GB",
    "peak_flops": {"fp32": 5e14, "bf16": 1e15, "fp8": 2e15},
    "hbm_bandwidth_bytes_per_s": 4e12,
    "hbm_capacity_bytes": 96e9,
    "nvlink_bandwidth_bytes_per_s": 450e9,
    "network_bandwidth_bytes_per_s": 50e9,
    "tdp_w": 700,
    "idle_w": 80,
    "max_clock_mhz": 1900,
}


def test_custom_gpu_from_config_fills_dtypes_by_upcast():
    spec = hardware.resolve_gpu(CUSTOM)
    assert spec.name == "MyGPU-96GB"
    assert spec.peak_flops == {
        "fp32": 5e14,
        "bf16": 1e15,
        "fp16": 1e15,
        "fp8": 2e15,
        "int8": 1e15,
        "int4": 1e15,
        "fp8_block": 2e15,  # left out: the fp8 rate
    }
    assert spec.hbm_capacity_bytes == 96e9 and spec.idle_w == 80.0
    assert make_deployment("llama3.1-8b", CUSTOM, 2).gpu == spec
    assert hardware.resolve_gpu({"name": "h100"}) is hardware.get_gpu("h100")
    assert hardware.resolve_gpu("h100") is hardware.resolve_gpu(hardware.get_gpu("h100"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tdp_w": None}, "missing hardware.tdp_w"),
        ({"tdp_w": -5}, "hardware.tdp_w must be a finite number > 0 (got -5)"),
        ({"tdp_w": "lots"}, "hardware.tdp_w must be a number > 0 (got 'lots')"),
        ({"idle_w": 900}, "hardware.idle_w (900) must be below hardware.tdp_w (700)"),
        ({"peak_flops": {"fp32": 1e14}}, "missing hardware.peak_flops.bf16"),
        ({"peak_flops": {"fp32": 1, "bf16": 1, "fp6": 1}}, "unknown dtype 'fp6'"),
        ({"colour": "green"}, "unknown key 'colour'; accepted keys: name, peak_flops"),
        ({"name": "H100"}, "is the catalog GPU H100-SXM-80GB"),
    ],
)
def test_custom_gpu_errors_name_the_field(change, message):
    with pytest.raises((ValueError, TypeError)) as error:
        hardware.resolve_gpu({**CUSTOM, **change})
    assert message in str(error.value) and "\n" not in str(error.value)
