"""Splitting lanes across devices changes nothing but speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import apex_jax

CASES = [
    {
        "model": "meta-llama/Llama-3.1-8B",
        "hardware": "H100-SXM-80GB",
        "num_gpus": 2,
        "plan": {"dp": 2, "tp": 1},
        "workload": {
            "kind": "poisson",
            "num_requests": 40,
            "rate_per_s": 8.0,
            "prompt_tokens": 300,
            "output_tokens": 40,
            "seed": 3,
        },
    },
    {
        "model": "meta-llama/Llama-3.1-8B",
        "hardware": "A100-SXM-80GB",
        "num_gpus": 1,
        "plan": {"tp": 1},
        "workload": {
            "kind": "closed_loop",
            "concurrency": 4,
            "isl": 128,
            "osl": 16,
            "num_requests": 20,
        },
    },
]

SCRIPT = """
import json, sys
import jax
import apex_jax
assert jax.local_device_count() == 2, jax.devices()
cases = json.loads(sys.argv[1])
print(json.dumps([{k: r[k] for k in ("ttft_mean_s", "tpot_p99_s", "makespan_s")}
                  for r in apex_jax.simulate_many(cases)]))
"""


def test_two_devices_give_the_same_results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(CASES)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    sharded = json.loads(out.stdout.strip().splitlines()[-1])
    single = apex_jax.simulate_many(CASES)
    for a, b in zip(sharded, single):
        for key, value in a.items():
            assert value == b[key]
