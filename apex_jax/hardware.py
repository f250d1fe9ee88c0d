"""GPU catalog (static datasheet figures) and the calibratable hardware constants.

Two kinds of data live here and are kept apart on purpose:

* `GpuSpec` is a static, hashable description of one GPU model. Its numbers are public
  datasheet facts (cited in `GpuSpec.source`) and plain Python floats, so they can be closed
  over or passed as static arguments without ever being traced.
* `HardwareParams` is a pytree of dimensionless multipliers and latencies, stored as logs, that
  calibration fits to measurements. It is passed explicitly to the cost model so that it can be
  vmapped over plans and differentiated.

Conventions used by every catalog entry:

* `peak_flops` are dense tensor-core rates (half of NVIDIA's "with sparsity" figures), because
  serving engines do not use 2:4 structured sparsity. `"fp32"` means the rate an fp32 GEMM
  actually runs at: TF32 tensor cores on Ampere and Hopper (what cuBLAS uses for fp32 matmuls
  when TF32 is allowed, as in vLLM and PyTorch serving), plain FP32 CUDA cores on Volta.
  A dtype the GPU cannot compute in natively maps to the rate of the format it is upcast to,
  so every name in `dtypes.DTYPES` always has an entry. `"fp8_block"` (fp8 with 128 x 128
  block scales) runs on the fp8 tensor cores: the `"fp8"` rate.
* `hbm_capacity_bytes` is the device memory total that the driver reports (`nvidia-smi
  --query-gpu=memory.total`, in MiB, times 2**20), not the marketed decimal GB. The CUDA
  runtime (`cudaMemGetInfo`, which vLLM multiplies by `gpu_memory_utilization`) reports about
  0.5 GiB less again (79.11 GiB on an H100 80GB), so memory budgets should subtract a reserve.
* `nvlink_bandwidth_bytes_per_s` and `network_bandwidth_bytes_per_s` are per GPU and per
  direction: collectives move data both ways at once, and NVIDIA quotes NVLink as the sum of
  both directions.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from apex_jax.dtypes import DTYPES
from apex_jax.io import write_json
from apex_jax.paths import DATA_DIR

__all__ = [
    "GPU_CATALOG",
    "GpuSpec",
    "HardwareParams",
    "default_hardware_params",
    "get_gpu",
    "gpu_from_dict",
    "list_gpus",
    "load_hardware_params",
    "peak_flops_vector",
    "resolve_gpu",
    "save_hardware_params",
]

_MIB = 2**20
# Fitted HardwareParams shipped with the package, by name (apex-jax ... calibration=<name>).
_CALIBRATED_DIR = DATA_DIR / "calibrated"


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """Static datasheet description of one GPU model.

    Instances are hashable (the `peak_flops` dict is left out of the hash), so a spec can be a
    static argument of a jitted function. Treat `peak_flops` as read-only: catalog entries are
    shared.

    Attributes:
        name: Canonical name in APEX+ spelling, e.g. `"H100-SXM-80GB"`.
        peak_flops: Dense peak FLOP/s (or OP/s for integer formats) for every name in
            `dtypes.DTYPES`. Formats without native support hold the rate of the format they
            are upcast to.
        hbm_bandwidth_bytes_per_s: Peak device-memory bandwidth.
        hbm_capacity_bytes: Device memory as reported by the driver (MiB * 2**20).
        nvlink_bandwidth_bytes_per_s: Intra-node GPU-to-GPU bandwidth per GPU per direction;
            the PCIe bandwidth for cards that talk to each other over PCIe.
        network_bandwidth_bytes_per_s: Inter-node bandwidth per GPU per direction.
        tdp_w: Board power limit (TDP).
        idle_w: Typical power of an idle GPU with a live CUDA context (an assumption; see the
            comment on each entry).
        max_clock_mhz: Maximum boost clock of the streaming multiprocessors.
        source: Where the figures come from.
    """

    name: str
    peak_flops: dict[str, float] = dataclasses.field(hash=False)
    hbm_bandwidth_bytes_per_s: float
    hbm_capacity_bytes: float
    nvlink_bandwidth_bytes_per_s: float
    network_bandwidth_bytes_per_s: float
    tdp_w: float
    idle_w: float
    max_clock_mhz: float
    source: str

    def __post_init__(self) -> None:
        missing = [d for d in DTYPES if d not in self.peak_flops]
        unknown = [d for d in self.peak_flops if d not in DTYPES]
        if missing or unknown:
            raise ValueError(
                f"GpuSpec {self.name!r}: peak_flops must have exactly the dtypes {DTYPES}; "
                f"missing {missing}, unknown {unknown}"
            )
        numbers = {
            **{f"peak_flops[{d!r}]": v for d, v in self.peak_flops.items()},
            "hbm_bandwidth_bytes_per_s": self.hbm_bandwidth_bytes_per_s,
            "hbm_capacity_bytes": self.hbm_capacity_bytes,
            "nvlink_bandwidth_bytes_per_s": self.nvlink_bandwidth_bytes_per_s,
            "network_bandwidth_bytes_per_s": self.network_bandwidth_bytes_per_s,
            "tdp_w": self.tdp_w,
            "idle_w": self.idle_w,
            "max_clock_mhz": self.max_clock_mhz,
        }
        for field_name, value in numbers.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"GpuSpec {self.name!r}: {field_name} must be > 0, got {value}")
        if self.idle_w >= self.tdp_w:
            raise ValueError(f"GpuSpec {self.name!r}: idle_w must be below tdp_w")


# Inter-node bandwidth assumptions, per GPU per direction.
# DGX H100 / H200 / B200: eight ConnectX-7 NDR InfiniBand ports at 400 Gb/s, one per GPU.
# Also assumed for MI300X servers, which pair each GPU with one 400 Gb/s NIC.
_NDR_400G_BYTES_PER_S = 400e9 / 8
# DGX A100: eight ConnectX-6 HDR InfiniBand ports at 200 Gb/s, one per GPU. Also assumed for
# A40 and L40S servers, which have no reference design.
_HDR_200G_BYTES_PER_S = 200e9 / 8
# Volta-era clusters: one 100 Gb/s EDR InfiniBand port per GPU assumed for the PCIe card; the
# DGX-1 shares four EDR ports among eight V100 SXM2 GPUs, i.e. half a port per GPU.
_EDR_100G_BYTES_PER_S = 100e9 / 8

# PCIe x16 per direction (after 128b/130b encoding, rounded as NVIDIA's datasheets do).
_PCIE_GEN3_BYTES_PER_S = 16e9
_PCIE_GEN4_BYTES_PER_S = 32e9

_H100_SXM_FLOPS: dict[str, float] = {
    # TF32 tensor cores: the rate an fp32 GEMM runs at when TF32 is allowed.
    "fp32": 494.5e12,
    "bf16": 989e12,
    "fp16": 989e12,
    "fp8": 1979e12,
    "fp8_block": 1979e12,
    "int8": 1979e12,
    # Hopper has no int4 tensor-core mode; int4 weight-only kernels (AWQ, GPTQ) dequantise
    # to 16 bits inside the GEMM, so the math runs at the bf16 rate.
    "int4": 989e12,
}

_A100_SXM_FLOPS: dict[str, float] = {
    "fp32": 156e12,  # TF32 tensor cores.
    "bf16": 312e12,
    "fp16": 312e12,
    # Ampere has no fp8: fp8 weights are upcast to bf16 and the GEMM runs at the bf16 rate.
    "fp8": 312e12,
    "fp8_block": 312e12,
    "int8": 624e12,
    # The A100 does have int4 tensor cores (1248 TOPS dense), but int4 weight-only serving
    # kernels keep 16-bit activations and dequantise weights, so they run at the bf16 rate.
    "int4": 312e12,
}

_A40_FLOPS: dict[str, float] = {
    "fp32": 74.8e12,  # TF32 tensor cores (plain FP32 CUDA cores: 37.4e12).
    "bf16": 149.7e12,
    "fp16": 149.7e12,
    "fp8": 149.7e12,  # No fp8 on Ampere: upcast to bf16, bf16 rate.
    "fp8_block": 149.7e12,
    "int8": 299.3e12,
    "int4": 149.7e12,  # Weight-only int4 dequantises to 16 bits (int4 tensor cores unused).
}


# NVIDIA Blackwell datasheet, HGX B200 column, per GPU (its figures are with sparsity; dense
# is half): TF32 2.2 PF, FP16/BF16 4.5 PF, FP8 9 PF, INT8 9 POPS.
_B200_FLOPS: dict[str, float] = {
    "fp32": 1.1e15,  # TF32 tensor cores.
    "bf16": 2.25e15,
    "fp16": 2.25e15,
    "fp8": 4.5e15,
    "fp8_block": 4.5e15,
    "int8": 4.5e15,
    # Weight-only int4 (AWQ, GPTQ) dequantises to 16 bits inside the GEMM; Blackwell's FP4
    # tensor cores need FP4 activations, which no int4 weight format gives them.
    "int4": 2.25e15,
}

# NVIDIA L40S datasheet (dense column): TF32 183, BF16/FP16 362.05, FP8 733 TFLOPS, INT8 733
# TOPS.
_L40S_FLOPS: dict[str, float] = {
    "fp32": 183e12,  # TF32 tensor cores (plain FP32 CUDA cores: 91.6e12).
    "bf16": 362.05e12,
    "fp16": 362.05e12,
    "fp8": 733e12,
    "fp8_block": 733e12,
    "int8": 733e12,
    "int4": 362.05e12,  # Weight-only int4 dequantises to 16 bits (int4 tensor cores unused).
}

# AMD Instinct MI300X datasheet (dense, without sparsity): FP16/BF16 1307.4, FP8 2614.9,
# FP32 matrix 163.4 TFLOPS, INT8 2614.9 TOPS.
_MI300X_FLOPS: dict[str, float] = {
    # FP32 matrix cores: PyTorch on ROCm does not route fp32 GEMMs to TF32 (653.7 TFLOPS)
    # unless asked to.
    "fp32": 163.4e12,
    "bf16": 1307.4e12,
    "fp16": 1307.4e12,
    "fp8": 2614.9e12,
    "fp8_block": 2614.9e12,
    "int8": 2614.9e12,
    "int4": 1307.4e12,  # No int4 matrix cores: int4 weights dequantise to 16 bits.
}


def _volta_flops(fp16_tensor: float, fp32: float) -> dict[str, float]:
    """Rates for a Volta GPU, whose tensor cores only take fp16 inputs."""
    return {
        "fp32": fp32,  # No TF32 on Volta: fp32 GEMMs run on the FP32 CUDA cores.
        # No bf16 on Volta: bf16 has no tensor-core path, and emulating it runs at the FP32
        # CUDA-core rate. (Engines normally serve bf16 checkpoints in fp16 on Volta instead.)
        "bf16": fp32,
        "fp16": fp16_tensor,
        # No fp8, and no int8 tensor cores (only DP4A on CUDA cores): quantised weights are
        # upcast to fp16 and the GEMM runs on the fp16 tensor cores.
        "fp8": fp16_tensor,
        "fp8_block": fp16_tensor,
        "int8": fp16_tensor,
        "int4": fp16_tensor,
    }


# Idle power is an assumption, not a datasheet figure: it is the power nvidia-smi reports in
# public logs for a GPU in performance state P0 with no kernels running, which is the state of a
# serving engine's GPUs between requests (the engine keeps a CUDA context open, so the GPU
# does not drop to P8). Readings vary with temperature, clocks and driver; each is about 10-15%
# of TDP.
GPU_CATALOG: dict[str, GpuSpec] = {
    spec.name: spec
    for spec in (
        GpuSpec(
            name="H100-SXM-80GB",
            peak_flops=_H100_SXM_FLOPS,
            hbm_bandwidth_bytes_per_s=3.35e12,
            hbm_capacity_bytes=81559 * _MIB,
            nvlink_bandwidth_bytes_per_s=450e9,  # NVLink 4: 900 GB/s total.
            network_bandwidth_bytes_per_s=_NDR_400G_BYTES_PER_S,
            tdp_w=700.0,
            idle_w=70.0,  # nvidia-smi idle readings of 67-72 W.
            max_clock_mhz=1980.0,
            source=(
                "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100), "
                "H100 SXM5 column; boost clock from the NVIDIA H100 Tensor Core GPU "
                "Architecture whitepaper; network from the NVIDIA DGX H100 datasheet"
            ),
        ),
        GpuSpec(
            name="H200-SXM-141GB",
            # Same GH100 compute as the H100 SXM; only the memory differs.
            peak_flops=_H100_SXM_FLOPS,
            hbm_bandwidth_bytes_per_s=4.8e12,
            hbm_capacity_bytes=143771 * _MIB,
            nvlink_bandwidth_bytes_per_s=450e9,  # NVLink 4: 900 GB/s total.
            network_bandwidth_bytes_per_s=_NDR_400G_BYTES_PER_S,
            tdp_w=700.0,
            idle_w=75.0,  # nvidia-smi idle readings of 73-76 W.
            max_clock_mhz=1980.0,
            source=(
                "NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200), "
                "H200 SXM column; network from the NVIDIA DGX H200 datasheet"
            ),
        ),
        GpuSpec(
            name="B200-SXM-180GB",
            peak_flops=_B200_FLOPS,
            hbm_bandwidth_bytes_per_s=7.7e12,
            # nvidia-smi reports 183359 MiB on every public B200 log we found.
            hbm_capacity_bytes=183359 * _MIB,
            nvlink_bandwidth_bytes_per_s=900e9,  # NVLink 5: 1.8 TB/s total.
            network_bandwidth_bytes_per_s=_NDR_400G_BYTES_PER_S,
            tdp_w=1000.0,
            idle_w=140.0,  # nvidia-smi idle readings of 136-145 W in P0.
            max_clock_mhz=1965.0,  # Maximum SM clock nvidia-smi reports.
            source=(
                "NVIDIA Blackwell datasheet (GB200 NVL72 / HGX B200), HGX B200 column: "
                "tensor-core rates (halved for dense), 180 GB HBM3E at 7.7 TB/s, NVLink 5 "
                "1.8 TB/s, up to 1000 W; network from the NVIDIA DGX B200 datasheet"
            ),
        ),
        GpuSpec(
            name="A100-SXM-80GB",
            peak_flops=_A100_SXM_FLOPS,
            hbm_bandwidth_bytes_per_s=2.039e12,
            hbm_capacity_bytes=81920 * _MIB,
            nvlink_bandwidth_bytes_per_s=300e9,  # NVLink 3: 600 GB/s total.
            network_bandwidth_bytes_per_s=_HDR_200G_BYTES_PER_S,
            tdp_w=400.0,
            idle_w=60.0,  # nvidia-smi idle readings of 50-65 W.
            max_clock_mhz=1410.0,
            source=(
                "NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100), "
                "A100 80GB SXM column; network from the NVIDIA DGX A100 datasheet"
            ),
        ),
        GpuSpec(
            name="A100-SXM-40GB",
            peak_flops=_A100_SXM_FLOPS,
            hbm_bandwidth_bytes_per_s=1.555e12,
            hbm_capacity_bytes=40960 * _MIB,
            nvlink_bandwidth_bytes_per_s=300e9,  # NVLink 3: 600 GB/s total.
            network_bandwidth_bytes_per_s=_HDR_200G_BYTES_PER_S,
            tdp_w=400.0,
            idle_w=50.0,  # nvidia-smi idle readings of 42-57 W.
            max_clock_mhz=1410.0,
            source=(
                "NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100), "
                "A100 40GB SXM column; network from the NVIDIA DGX A100 datasheet"
            ),
        ),
        GpuSpec(
            name="A40-PCIE-48GB",
            peak_flops=_A40_FLOPS,
            hbm_bandwidth_bytes_per_s=696e9,  # GDDR6, not HBM; the field name is generic.
            # 48 GiB of GDDR6, of which ECC (on by default) takes 1/16.
            hbm_capacity_bytes=46068 * _MIB,
            # An NVLink bridge joins only pairs of A40s (112.5 GB/s total, 56.25e9 per
            # direction); any group larger than two talks over PCIe Gen4, so PCIe is the
            # bandwidth that holds for every tensor-parallel degree.
            nvlink_bandwidth_bytes_per_s=_PCIE_GEN4_BYTES_PER_S,
            network_bandwidth_bytes_per_s=_HDR_200G_BYTES_PER_S,
            tdp_w=300.0,
            # 15% of TDP: between the 31 W reported in P8 and the ~70 W reported in P0.
            idle_w=45.0,
            max_clock_mhz=1740.0,
            source=(
                "NVIDIA A40 datasheet (nvidia.com/en-us/data-center/a40); boost clock from "
                "the NVIDIA Ampere GA102 GPU Architecture whitepaper"
            ),
        ),
        GpuSpec(
            name="L40S-PCIE-48GB",
            peak_flops=_L40S_FLOPS,
            hbm_bandwidth_bytes_per_s=864e9,  # GDDR6, not HBM; the field name is generic.
            # 48 GB of GDDR6 with ECC on: nvidia-smi reports 46068 MiB, as for the A40.
            hbm_capacity_bytes=46068 * _MIB,
            # No NVLink: peers talk over PCIe Gen4 x16 (64 GB/s both ways together).
            nvlink_bandwidth_bytes_per_s=_PCIE_GEN4_BYTES_PER_S,
            network_bandwidth_bytes_per_s=_HDR_200G_BYTES_PER_S,
            tdp_w=350.0,
            # nvidia-smi reads 83 W in P0 with a model loaded and no kernel running (31-36 W
            # in P8).
            idle_w=80.0,
            max_clock_mhz=2520.0,
            source=(
                "NVIDIA L40S datasheet (nvidia.com/en-us/data-center/l40s): dense tensor-core "
                "rates, 48 GB GDDR6 at 864 GB/s, PCIe Gen4 x16, 350 W; boost clock 2520 MHz "
                "from the card's published specifications"
            ),
        ),
        GpuSpec(
            name="MI300X-OAM-192GB",
            peak_flops=_MI300X_FLOPS,
            hbm_bandwidth_bytes_per_s=5.3e12,
            # rocm-smi "VRAM Total Memory (B)": 205822885888 bytes (196288 MiB).
            hbm_capacity_bytes=196288 * _MIB,
            # Seven Infinity Fabric links of 128 GB/s (64 GB/s each way) join every GPU to
            # the other seven of a node. An 8-GPU collective uses all seven (448 GB/s each
            # way), the case this single figure describes; a 2-GPU group has one link only.
            nvlink_bandwidth_bytes_per_s=7 * 64e9,
            network_bandwidth_bytes_per_s=_NDR_400G_BYTES_PER_S,
            tdp_w=750.0,
            idle_w=140.0,  # rocm-smi idle readings of 130-152 W.
            max_clock_mhz=2100.0,  # Peak engine clock.
            source=(
                "AMD Instinct MI300X datasheet (amd.com/en/products/accelerators/instinct/"
                "mi300/mi300x.html): dense peak rates, 192 GB HBM3 at 5.3 TB/s, Infinity "
                "Fabric 7 x 128 GB/s, 750 W, 2100 MHz peak engine clock"
            ),
        ),
        GpuSpec(
            name="V100-PCIE-16GB",
            peak_flops=_volta_flops(fp16_tensor=112e12, fp32=14e12),
            hbm_bandwidth_bytes_per_s=900e9,
            hbm_capacity_bytes=16160 * _MIB,
            # No NVLink on the PCIe card: peers talk over PCIe Gen3 x16.
            nvlink_bandwidth_bytes_per_s=_PCIE_GEN3_BYTES_PER_S,
            network_bandwidth_bytes_per_s=_EDR_100G_BYTES_PER_S,
            tdp_w=250.0,
            idle_w=30.0,  # nvidia-smi idle readings of 23-41 W.
            max_clock_mhz=1380.0,
            source=(
                "NVIDIA Tesla V100 GPU datasheet (nvidia.com/en-us/data-center/v100), V100 "
                "PCIe column; boost clock from the NVIDIA Tesla V100 GPU Architecture whitepaper"
            ),
        ),
        GpuSpec(
            name="V100-SXM2-32GB",
            peak_flops=_volta_flops(fp16_tensor=125e12, fp32=15.7e12),
            hbm_bandwidth_bytes_per_s=900e9,
            hbm_capacity_bytes=32510 * _MIB,
            nvlink_bandwidth_bytes_per_s=150e9,  # NVLink 2: 300 GB/s total.
            network_bandwidth_bytes_per_s=_EDR_100G_BYTES_PER_S / 2,
            tdp_w=300.0,
            idle_w=40.0,  # nvidia-smi idle readings of 24-43 W.
            max_clock_mhz=1530.0,
            source=(
                "NVIDIA Tesla V100 GPU datasheet (nvidia.com/en-us/data-center/v100), V100 "
                "SXM2 column; boost clock from the NVIDIA Tesla V100 GPU Architecture "
                "whitepaper; network from the NVIDIA DGX-1 datasheet"
            ),
        ),
    )
}

# Other spellings, written in the form `_normalise` produces. Short family names pick the
# variant the measured profiles use (APEX+, Vidur and AIConfigurator all profile the 80GB A100
# and the 16GB PCIe V100).
_ALIASES: dict[str, str] = {
    "h100": "H100-SXM-80GB",
    "h100-sxm": "H100-SXM-80GB",
    "h100-sxm5": "H100-SXM-80GB",
    "h100-80gb": "H100-SXM-80GB",
    "h100-sxm5-80gb": "H100-SXM-80GB",
    "h100-80gb-hbm3": "H100-SXM-80GB",
    "h200": "H200-SXM-141GB",
    "h200-sxm": "H200-SXM-141GB",
    "h200-141gb": "H200-SXM-141GB",
    "b200": "B200-SXM-180GB",
    "b200-sxm": "B200-SXM-180GB",
    "b200-180gb": "B200-SXM-180GB",
    "l40s": "L40S-PCIE-48GB",
    "l40s-48gb": "L40S-PCIE-48GB",
    "mi300x": "MI300X-OAM-192GB",
    "mi300x-oam": "MI300X-OAM-192GB",
    "mi300x-vf": "MI300X-OAM-192GB",
    "mi300x-192gb": "MI300X-OAM-192GB",
    "a100": "A100-SXM-80GB",
    "a100-sxm": "A100-SXM-80GB",
    "a100-80gb": "A100-SXM-80GB",
    "a100-sxm4-80gb": "A100-SXM-80GB",
    "a100-40gb": "A100-SXM-40GB",
    "a100-sxm4-40gb": "A100-SXM-40GB",
    "a40": "A40-PCIE-48GB",
    "a40-48gb": "A40-PCIE-48GB",
    "v100": "V100-PCIE-16GB",
    "v100-pcie": "V100-PCIE-16GB",
    "v100-16gb": "V100-PCIE-16GB",
    "v100-sxm2": "V100-SXM2-32GB",
    "v100-32gb": "V100-SXM2-32GB",
}

_LOOKUP: dict[str, str] = {
    **{name.lower(): name for name in GPU_CATALOG},
    **_ALIASES,
}


def _normalise(name: str) -> str:
    """Lower-case, join words with '-', and drop vendor prefixes ("NVIDIA", "Tesla", "AMD
    Instinct")."""
    key = re.sub(r"[\s_]+", "-", str(name).strip().lower())
    return re.sub(r"^(nvidia-|amd-)?(tesla-|instinct-)?", "", key)


def list_gpus() -> list[str]:
    """Canonical names of every GPU in the catalog, in catalog order."""
    return list(GPU_CATALOG)


def get_gpu(name: str) -> GpuSpec:
    """Looks up a GPU by canonical name or alias, ignoring case.

    Accepts APEX+ names (`"H100-SXM-80GB"`), short names (`"h100"`, `"a100-80gb"`), profile
    directory names (`"h100_sxm"`) and the names the driver reports
    (`"NVIDIA H100 80GB HBM3"`, `"Tesla V100-PCIE-16GB"`).

    Args:
        name: GPU name in any accepted spelling.

    Returns:
        The catalog entry.

    Raises:
        ValueError: If the name is unknown; the message suggests close matches and lists the
            known GPUs.
    """
    key = _normalise(name)
    if key in _LOOKUP:
        return GPU_CATALOG[_LOOKUP[key]]
    close = difflib.get_close_matches(key, list(_LOOKUP), n=6, cutoff=0.6)
    suggestions = list(dict.fromkeys(_LOOKUP[k] for k in close))
    hint = ""
    if suggestions:
        hint = " did you mean " + " or ".join(repr(s) for s in suggestions[:3]) + "?"
    raise ValueError(f"unknown GPU {name!r}:{hint} Known GPUs: {', '.join(list_gpus())}")


# Figures a custom GPU must give; "peak_flops" needs "fp32" and "bf16" (see gpu_from_dict).
_CUSTOM_REQUIRED = (
    "name",
    "peak_flops",
    "hbm_bandwidth_bytes_per_s",
    "hbm_capacity_bytes",
    "nvlink_bandwidth_bytes_per_s",
    "network_bandwidth_bytes_per_s",
    "tdp_w",
    "idle_w",
    "max_clock_mhz",
)
_CUSTOM_OPTIONAL = ("source",)


def _positive(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number > 0 (got {value!r})")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a finite number > 0 (got {value!r})")
    return float(value)


def gpu_from_dict(spec: Mapping[str, Any]) -> GpuSpec:
    """Builds a GPU outside the catalog from its figures (the `hardware=custom` config).

    Every figure follows the catalog's conventions (module docstring): dense FLOP/s per
    dtype, driver-reported memory, bandwidths per GPU and per direction. `peak_flops` needs
    `fp32` (the rate an fp32 GEMM runs at) and `bf16`; `fp16` left out or null runs at the
    `bf16` rate, and `fp8`, `int8` and `int4` left out or null are upcast and run at the
    16-bit rate, as on catalog GPUs without native support.

    Args:
        spec: `name`, `peak_flops` (a dict by dtype), `hbm_bandwidth_bytes_per_s`,
            `hbm_capacity_bytes`, `nvlink_bandwidth_bytes_per_s`,
            `network_bandwidth_bytes_per_s`, `tdp_w`, `idle_w`, `max_clock_mhz`, and
            optionally `source`.

    Returns:
        The GPU. Without measured tables or a calibration of its own, the cost model prices
        it with the uncalibrated per-operator model.

    Raises:
        ValueError: For a missing or unknown key (the message lists the accepted keys), a
            figure that is not a finite number > 0 (naming it), or a name that is already a
            catalog GPU or alias.
    """
    accepted = ", ".join(_CUSTOM_REQUIRED + _CUSTOM_OPTIONAL)
    unknown = [k for k in spec if k not in _CUSTOM_REQUIRED + _CUSTOM_OPTIONAL]
    if unknown:
        raise ValueError(f"custom GPU: unknown key {unknown[0]!r}; accepted keys: {accepted}")
    missing = [k for k in _CUSTOM_REQUIRED if spec.get(k) is None]
    if missing:
        raise ValueError(f"custom GPU: missing hardware.{missing[0]}; required: {accepted}")
    name = str(spec["name"]).strip()
    if _normalise(name) in _LOOKUP:
        raise ValueError(
            f"custom GPU: name {name!r} is the catalog GPU {_LOOKUP[_normalise(name)]}; give "
            "the custom GPU a name of its own, or use the catalog entry (hardware.name only)"
        )
    flops_in = spec["peak_flops"]
    if not isinstance(flops_in, Mapping):
        raise TypeError(f"hardware.peak_flops must be a dict by dtype (got {flops_in!r})")
    bad = [d for d in flops_in if d not in DTYPES]
    if bad:
        raise ValueError(f"hardware.peak_flops: unknown dtype {bad[0]!r}; dtypes: {DTYPES}")
    for dtype in ("fp32", "bf16"):
        if flops_in.get(dtype) is None:
            raise ValueError(f"custom GPU: missing hardware.peak_flops.{dtype}")
    flops = {
        d: _positive(v, f"hardware.peak_flops.{d}") for d, v in flops_in.items() if v is not None
    }
    flops.setdefault("fp16", flops["bf16"])
    for dtype in ("fp8", "int8", "int4"):
        flops.setdefault(dtype, flops["fp16"])
    flops.setdefault("fp8_block", flops["fp8"])
    figures = {
        key: _positive(spec[key], f"hardware.{key}")
        for key in _CUSTOM_REQUIRED
        if key not in ("name", "peak_flops")
    }
    if figures["idle_w"] >= figures["tdp_w"]:
        raise ValueError(
            f"hardware.idle_w ({figures['idle_w']:g}) must be below hardware.tdp_w "
            f"({figures['tdp_w']:g})"
        )
    return GpuSpec(
        name=name,
        peak_flops={d: flops[d] for d in DTYPES},
        source=str(spec.get("source") or "custom GPU from the config"),
        **figures,
    )


def resolve_gpu(hardware: str | Mapping[str, Any] | GpuSpec) -> GpuSpec:
    """The GPU named by a string, a hardware config dict or a `GpuSpec`.

    A dict with only `name` (the catalog configs, `hardware=h100`) looks the name up in the
    catalog; a dict with more figures describes a custom GPU (`gpu_from_dict`).

    Args:
        hardware: A catalog name or alias, a hardware config dict, or a `GpuSpec`.

    Returns:
        The GPU.

    Raises:
        TypeError: For another type.
        ValueError: For an unknown name or an invalid custom GPU.
    """
    if isinstance(hardware, GpuSpec):
        return hardware
    if isinstance(hardware, str):
        return get_gpu(hardware)
    if isinstance(hardware, Mapping):
        figures = {k: v for k, v in hardware.items() if v is not None}
        if set(figures) == {"name"}:
            return get_gpu(str(figures["name"]))
        return gpu_from_dict(hardware)
    raise TypeError(
        f"hardware must be a GPU name, a dict of GPU figures or a GpuSpec (got {hardware!r})"
    )


def peak_flops_vector(spec: GpuSpec) -> np.ndarray:
    """Peak FLOP/s of a GPU indexed by dtype code, for lookups inside traced code.

    Args:
        spec: The GPU.

    Returns:
        float64 array of shape `[len(DTYPES)]`; entry `i` is the rate for `DTYPES[i]`.
    """
    return np.array([spec.peak_flops[d] for d in DTYPES], dtype=np.float64)


class HardwareParams(NamedTuple):
    """Calibratable constants of the cost model, stored as natural logs.

    Each field holds `log(value)`, so that calibration optimises well-scaled numbers and the
    values stay positive. Efficiencies are dimensionless multipliers of the `GpuSpec` peaks;
    latencies are in seconds. Every field is a float64 scalar `[]`, or `[P]` when a leading
    plan axis is vmapped over.

    Attributes:
        log_compute_eff: Achieved / peak FLOP/s of GEMMs. Default log(0.7).
        log_attn_compute_eff: Achieved / peak FLOP/s of attention. Default log(0.5): attention
            kernels reach a lower fraction of peak than large GEMMs.
        log_memory_eff: Achieved / peak device-memory bandwidth. Default log(0.8).
        log_link_eff: Achieved / peak NVLink and network bandwidth. Default log(0.7).
        log_collective_latency_s: Fixed latency of one collective call. Default log(10 us).
        log_kernel_latency_s: Fixed launch latency of one layer's kernels. Default log(25 us).
        log_iteration_overhead_scale: Multiplier of the engine's host costs: the
            per-iteration overhead (scheduling, input preparation and output processing
            outside the GPU kernels; ``EngineConfig.iteration_overhead_s``), the host work
            per sequence and the eager launch (``host_s_per_seq``, ``eager_s_per_layer``),
            one set of figures per engine version. Default log(1): the engine's own figures.
    """

    log_compute_eff: jax.Array  # [] or [P]
    log_attn_compute_eff: jax.Array  # [] or [P]
    log_memory_eff: jax.Array  # [] or [P]
    log_link_eff: jax.Array  # [] or [P]
    log_collective_latency_s: jax.Array  # [] or [P]
    log_kernel_latency_s: jax.Array  # [] or [P]
    log_iteration_overhead_scale: jax.Array  # [] or [P]


def default_hardware_params() -> HardwareParams:
    """Uncalibrated starting values of `HardwareParams`, as float64 scalars.

    Needs `jax_enable_x64`; without it JAX warns and the fields come back as float32.

    Returns:
        `HardwareParams` whose fields are float64 arrays of shape `[]`.
    """
    values = HardwareParams(
        log_compute_eff=math.log(0.7),
        log_attn_compute_eff=math.log(0.5),
        log_memory_eff=math.log(0.8),
        log_link_eff=math.log(0.7),
        log_collective_latency_s=math.log(10e-6),
        log_kernel_latency_s=math.log(25e-6),
        log_iteration_overhead_scale=0.0,
    )
    return HardwareParams(*(jnp.asarray(v, dtype=jnp.float64) for v in values))


def save_hardware_params(
    hw: HardwareParams, path: str | Path, note: str = "", extra: Mapping[str, Any] | None = None
) -> None:
    """Write fitted constants as JSON (field -> log value), with a note on their origin and
    ``extra`` sections (such as how they were fitted)."""
    params = {k: float(getattr(hw, k)) for k in hw._fields}
    write_json(path, {"note": note, "params": params, **dict(extra or {})})


def load_hardware_params(name_or_path: str) -> HardwareParams:
    """Load fitted constants by bundled name (``apex_jax/data/calibrated/<name>.json``) or
    path (a file written by :func:`save_hardware_params`); fields the file lacks keep their
    defaults."""
    path = Path(name_or_path)
    if not path.exists():
        path = _CALIBRATED_DIR / f"{name_or_path}.json"
    if not path.exists():
        known = sorted(p.stem for p in _CALIBRATED_DIR.glob("*.json"))
        raise ValueError(
            f"no calibrated constants named {name_or_path!r}: known names are {known} "
            "(or pass a path to a JSON written by apex-jax calibrate)"
        )
    params = json.loads(path.read_text())["params"]
    base = default_hardware_params()
    unknown = set(params) - set(base._fields)
    if unknown:
        raise ValueError(f"{path} has unknown constants {sorted(unknown)}")
    return base._replace(**{k: jnp.asarray(v, jnp.float64) for k, v in params.items()})
