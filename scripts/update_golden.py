"""Regenerate the golden end-to-end outputs in ``tests/golden/``.

Run this after an intentional change to the cost model, the memory model or the engine, then
review the diff of the JSON files before committing them::

    python scripts/update_golden.py

Each file holds the ``apex_jax.simulate`` keyword arguments of one case and the result they
produced, so ``tests/test_golden.py`` can replay it without importing this script.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import apex_jax

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "tests" / "golden"

CASES: dict[str, dict[str, Any]] = {
    "static_batch_llama3_1_8b_1xh100_tp1": {
        "model": "meta-llama/Llama-3.1-8B",
        "hardware": "H100-SXM-80GB",
        "num_gpus": 1,
        "plan": {"dp": 1, "tp": 1, "pp": 1, "weight_dtype": "bf16", "kv_dtype": "bf16"},
        "workload": {"kind": "static_batch", "batch_size": 8, "isl": 512, "osl": 128},
        "engine": {"name": "vllm", "version": "0.6.0"},
    },
    "poisson40_llama3_1_70b_8xh100_dp2_tp4": {
        "model": "meta-llama/Llama-3.1-70B",
        "hardware": "H100-SXM-80GB",
        "num_gpus": 8,
        "plan": {"dp": 2, "tp": 4, "pp": 1, "weight_dtype": "bf16", "kv_dtype": "bf16"},
        "workload": {
            "kind": "poisson",
            "num_requests": 40,
            "rate_per_s": 2.0,
            "prompt_tokens": {"dist": "uniform", "low": 64, "high": 2048},
            "output_tokens": {"dist": "uniform", "low": 16, "high": 512},
            "seed": 0,
        },
        "engine": {"name": "vllm", "version": "0.6.0"},
    },
    "closed_loop_mixtral_8x7b_2xh100_tp2_fp8kv": {
        "model": "mistralai/Mixtral-8x7B-v0.1",
        "hardware": "H100-SXM-80GB",
        "num_gpus": 2,
        "plan": {"dp": 1, "tp": 2, "pp": 1, "weight_dtype": "bf16", "kv_dtype": "fp8"},
        "workload": {
            "kind": "closed_loop",
            "concurrency": 8,
            "isl": 1024,
            "osl": 256,
            "num_requests": 32,
            # The engine's lockstep closed loop, which this file has pinned since before
            # desynchronised clients became the default.
            "lockstep": True,
        },
        "engine": {"name": "vllm", "version": "0.6.0"},
    },
}


def golden_result(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-safe part of a result: numbers and strings, NaN as None."""
    out: dict[str, Any] = {}
    for key, value in sorted(result.items()):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


def run_cases(cases: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Simulate every case in one batched call; results by case name."""
    results = apex_jax.simulate_many(list(cases.values()))
    return {name: golden_result(r) for name, r in zip(cases, results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=GOLDEN_DIR, help="folder of the JSON files")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in args.out.glob("*.json"):
        if stale.stem not in CASES:
            stale.unlink()
    for name, result in run_cases(CASES).items():
        path = args.out / f"{name}.json"
        text = json.dumps({"case": CASES[name], "result": result}, indent=2, sort_keys=True)
        path.write_text(text + "\n")
        print(f"wrote {path} ({result['status']})")


if __name__ == "__main__":
    main()
