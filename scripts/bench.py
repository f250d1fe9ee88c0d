"""Speed benchmark of the plan search: prints one JSON line.

    python scripts/bench.py                      # the issue's default case, 2,000 plans
    python scripts/bench.py --plan-space default --no-scaling

Figures (all measured in this run):
- ``wall_s``: the full evaluation of every plan, compile included; of it, ``cost_s`` building
  the plans' cost and energy coefficients and ``compile_s`` compiling the engine;
  ``plans_per_s``; ``ms_per_plan``; ``peak_rss_mb`` of the process.
- ``speedup_vs_reference``: per plan, the plain-Python reference simulator's time over the
  JAX engine's, on a subset of plans whose results are also checked to agree.
- ``scaling``: run time (compile excluded) at 1x, 2x, 4x the requests and the plans of a
  smaller base case, and each as a ratio to the 1x time.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import jax
import numpy as np

import apex_jax  # noqa: F401
from apex_jax.cli import use_every_core
from apex_jax.deployment import Case, make_deployment
from apex_jax.evaluate import evaluate_cases
from apex_jax.plan_space import build_plan_set, load_plan_space
from apex_jax.workload import Workload, load_trace


def _plans(deployment, space_name: str) -> np.ndarray:
    space = load_plan_space(space_name, deployment.engine.plan_knobs())
    return build_plan_set(deployment, space).plans


def _tiled(workload: Workload, factor: int) -> Workload:
    """The trace repeated ``factor`` times back to back in time (same load, more requests)."""
    span = float(workload.arrival_s[-1]) + 1.0
    return Workload(
        name=f"{workload.name}x{factor}",
        arrival_s=np.concatenate([workload.arrival_s + i * span for i in range(factor)]),
        prompt_tokens=np.tile(workload.prompt_tokens, factor),
        output_tokens=np.tile(workload.output_tokens, factor),
    )


def _run(deployment, workload, plans, **kwargs):
    cases = [Case(deployment, row, workload) for row in plans]
    start = time.perf_counter()
    results, stats = evaluate_cases(cases, **kwargs)
    return results, stats, time.perf_counter() - start


def main() -> None:
    use_every_core()  # before JAX starts its backend
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="meta-llama/Llama-3.1-70B")
    parser.add_argument("--hardware", default="H100-SXM-80GB")
    parser.add_argument("--num-gpus", type=int, default=8)
    parser.add_argument("--trace", default="llama/lmsys_05.csv")
    parser.add_argument("--plan-space", default="wide")
    parser.add_argument("--reference-plans", type=int, default=3)
    parser.add_argument("--scaling-plans", type=int, default=200)
    parser.add_argument("--scaling-requests", type=int, default=256)
    parser.add_argument("--no-scaling", action="store_true")
    args = parser.parse_args()

    deployment = make_deployment(args.model, args.hardware, args.num_gpus)
    workload = load_trace(args.trace)
    plans = _plans(deployment, args.plan_space)

    results, stats, wall = _run(deployment, workload, plans)
    ok = [i for i, r in enumerate(results) if r["status"] == "OK"]
    jax_per_plan = stats.run_s / len(plans)

    # The reference on a few OK plans with one replica each (its cost grows with replicas).
    rng = np.random.default_rng(0)
    pick = sorted(rng.choice(ok, size=min(args.reference_plans, len(ok)), replace=False))
    subset = plans[pick]
    ref_results, ref_stats, _ = _run(deployment, workload, subset, use_reference=True)
    for i, ref in zip(pick, ref_results):
        fast = results[i]
        assert abs(fast["e2e_sum_s"] - ref["e2e_sum_s"]) <= 1e-9 * ref["e2e_sum_s"], (fast, ref)
    ref_lanes_per_plan = ref_stats.num_lanes / len(subset)
    ref_per_plan = ref_stats.run_s / len(subset)

    out = {
        "case": f"{deployment.model.name} on {deployment.num_gpus} x {deployment.gpu.name}, "
        f"{workload.name}",
        "devices": jax.local_device_count(),
        "plans": len(plans),
        "plans_ok": len(ok),
        "lanes": stats.num_lanes,
        "requests": int(workload.num_requests),
        "wall_s": round(wall, 2),
        "cost_s": round(stats.cost_s, 2),
        "compile_s": round(stats.compile_s, 2),
        "run_s": round(stats.run_s, 2),
        "plans_per_s": round(len(plans) / wall, 1),
        "ms_per_plan": round(1e3 * wall / len(plans), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "reference_plans": len(subset),
        "reference_s_per_plan": round(ref_per_plan, 3),
        "reference_lanes_per_plan": ref_lanes_per_plan,
        "jax_s_per_plan": round(jax_per_plan, 5),
        "speedup_vs_reference": round(ref_per_plan / jax_per_plan, 1),
    }

    if not args.no_scaling:
        base_plans = plans[
            rng.choice(len(plans), size=min(args.scaling_plans, len(plans)), replace=False)
        ]
        base = load_trace(args.trace).head(args.scaling_requests)
        scaling = {}
        for label, wl, ps in (
            ("requests_1x", base, base_plans),
            ("requests_2x", _tiled(base, 2), base_plans),
            ("requests_4x", _tiled(base, 4), base_plans),
            ("plans_2x", base, np.concatenate([base_plans] * 2)),
            ("plans_4x", base, np.concatenate([base_plans] * 4)),
        ):
            _, st, _ = _run(deployment, wl, ps)
            scaling[label] = round(st.run_s, 2)
        one = scaling["requests_1x"]
        out["scaling_run_s"] = scaling
        out["scaling_ratio_to_1x"] = {k: round(v / one, 2) for k, v in scaling.items()}
        out["scaling_base"] = {"plans": len(base_plans), "requests": int(base.num_requests)}
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
