"""Numeric formats that weights, activations and the KV cache can be stored in.

Every plan column that names a dtype stores the integer code of this module, so the
traced cost model can look up bytes per element without strings.
"""

from __future__ import annotations

__all__ = ["DTYPES", "DTYPE_BYTES", "dtype_bytes", "dtype_code", "dtype_name"]

# Order fixes the integer codes used in plan tensors: append, never reorder.
# fp8_block: fp8 weights with one scale per 128 x 128 block and activations quantised per
# group of 128 (DeepSeek-style checkpoints such as Qwen3-235B-A22B-FP8), which vLLM runs with
# kernels of its own, unlike per-tensor fp8.
DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16", "fp8", "int8", "int4", "fp8_block")

DTYPE_BYTES: dict[str, float] = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5,
    "fp8_block": 1.0,  # the scales add 1 / 16,384 of a byte per weight
}

_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float8": "fp8",
    "fp8_e4m3": "fp8",
    "e4m3": "fp8",
    "auto": "bf16",
}


def _canonical(name: str) -> str:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return key


def dtype_code(name: str) -> int:
    """Integer code of a dtype name, as stored in plan tensors."""
    return DTYPES.index(_canonical(name))


def dtype_name(code_or_name: int | str) -> str:
    """Canonical dtype name from a code or any accepted spelling."""
    if isinstance(code_or_name, str):
        return _canonical(code_or_name)
    return DTYPES[int(code_or_name)]


def dtype_bytes(code_or_name: int | str) -> float:
    """Bytes per element of a dtype (0.5 for int4)."""
    return DTYPE_BYTES[dtype_name(code_or_name)]
