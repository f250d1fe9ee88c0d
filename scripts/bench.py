"""Speed benchmark of the plan search: prints one JSON line.

    python scripts/bench.py                      # the issue's default case, 2,000 plans
    python scripts/bench.py --plan-space default --no-scaling

Figures (all measured in this run; ``*_cpu_s`` is the process's CPU time over every thread,
steadier than wall time on a shared machine):
- ``wall_s`` / ``cpu_s``: the full evaluation of every plan, compile included, and
  ``split_s``, where its wall time went: ``cost`` (the plans' cost and energy coefficients),
  ``memory_and_lanes``, ``compile`` (waiting for the engine's compile), ``simulate`` (the
  engine's runs) and ``metrics`` (lane batches and per-plan results around the engine).
  ``compile_s`` is the engine's whole compile, of which ``compile_background_s`` ran while
  the lanes were compared and batched.
- ``lanes_sharing_a_probe_run``: live lanes that took the run of a probe under looser
  engine limits instead of running themselves (``RunStats.num_unbound_lanes``).
- ``ms_per_plan`` over every enumerated plan, as a search pays it, with and without compile
  (without: the wall time less the compile waited for);
  ``ms_per_simulated_plan`` the same over the plans that reached the engine (the others are
  rejected by memory or start-up checks before it).
- ``speedup_vs_reference``: on the same sample of plans the engine simulated to completion,
  the plain-Python reference simulator's time over the JAX engine's, ``with_compile`` (the
  sample run alone through the engine, paying its own compile) and ``without_compile`` (the
  engine's run time only); the two sides' results are checked to agree. Cost building is
  shared by both sides and left out.
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
from apex_jax.evaluate import DEFAULT_MAX_ITERS, evaluate_cases
from apex_jax.plan_space import build_plan_set, load_plan_space
from apex_jax.status import OK, STATUS_NAMES
from apex_jax.workload import Workload, load_trace

OK_NAME = STATUS_NAMES[OK]

__all__ = ["main"]


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
    """``(results, stats, wall_s, cpu_s)`` of one :func:`evaluate_cases` over ``plans``."""
    cases = [Case(deployment, row, workload) for row in plans]
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    results, stats = evaluate_cases(cases, **kwargs)
    return results, stats, time.perf_counter() - wall_start, time.process_time() - cpu_start


def _speedup(deployment, workload, plans, results, num_sample: int, rng) -> dict:
    """The reference against the engine on the same sample of completed plans."""
    ok = [i for i, r in enumerate(results) if r["status"] == OK_NAME]
    if not ok:
        raise SystemExit("no plan completed, so there is nothing to compare with the reference")
    pick = sorted(rng.choice(ok, size=min(num_sample, len(ok)), replace=False))
    sample = plans[pick]
    # The engine's compiled code is cached by shape and iteration cap; a cap one above the
    # default keys a fresh compile, so the sample pays its own as a search of only these plans
    # would. Both sides run with the same cap.
    max_iters = DEFAULT_MAX_ITERS + 1
    fast, fast_stats, _, _ = _run(deployment, workload, sample, max_iters=max_iters)
    slow, slow_stats, _, slow_cpu_s = _run(
        deployment, workload, sample, max_iters=max_iters, use_reference=True
    )
    for a, b in zip(fast, slow):
        assert a["status"] == b["status"] == OK_NAME, (a["status"], b["status"])
        assert abs(a["e2e_sum_s"] - b["e2e_sum_s"]) <= 1e-9 * b["e2e_sum_s"], (a, b)
    n = len(sample)
    with_compile_s = fast_stats.compile_s + fast_stats.run_s
    return {
        "sample_plans": n,
        "sample_lanes": fast_stats.num_lanes,
        "reference_s_per_plan": round(slow_stats.run_s / n, 3),
        "reference_cpu_s_per_plan": round(slow_cpu_s / n, 3),
        "jax_s_per_plan_with_compile": round(with_compile_s / n, 4),
        "jax_s_per_plan_without_compile": round(fast_stats.run_s / n, 4),
        "with_compile": round(slow_stats.run_s / with_compile_s, 1),
        "without_compile": round(slow_stats.run_s / fast_stats.run_s, 1),
    }


def _scaling(deployment, trace: str, plans, num_plans: int, num_requests: int, rng) -> dict:
    base_plans = plans[rng.choice(len(plans), size=min(num_plans, len(plans)), replace=False)]
    base = load_trace(trace).head(num_requests)
    run_s = {}
    for label, wl, ps in (
        ("requests_1x", base, base_plans),
        ("requests_2x", _tiled(base, 2), base_plans),
        ("requests_4x", _tiled(base, 4), base_plans),
        ("plans_2x", base, np.concatenate([base_plans] * 2)),
        ("plans_4x", base, np.concatenate([base_plans] * 4)),
    ):
        run_s[label] = round(_run(deployment, wl, ps)[1].run_s, 2)
    one = run_s["requests_1x"]
    return {
        "scaling_run_s": run_s,
        "scaling_ratio_to_1x": {k: round(v / one, 2) for k, v in run_s.items()},
        "scaling_base": {"plans": len(base_plans), "requests": int(base.num_requests)},
    }


def main(argv: list[str] | None = None) -> None:
    use_every_core()  # before JAX starts its backend
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="meta-llama/Llama-3.1-70B")
    parser.add_argument("--hardware", default="H100-SXM-80GB")
    parser.add_argument("--num-gpus", type=int, default=8)
    parser.add_argument("--trace", default="llama/lmsys_05.csv")
    parser.add_argument("--requests", type=int, default=None, help="first N requests only")
    parser.add_argument("--plan-space", default="wide")
    parser.add_argument("--reference-plans", type=int, default=4)
    parser.add_argument("--scaling-plans", type=int, default=200)
    parser.add_argument("--scaling-requests", type=int, default=256)
    parser.add_argument("--no-scaling", action="store_true")
    args = parser.parse_args(argv)

    deployment = make_deployment(args.model, args.hardware, args.num_gpus)
    workload = load_trace(args.trace)
    if args.requests is not None:
        workload = workload.head(args.requests)
    plans = _plans(deployment, args.plan_space)

    results, stats, wall_s, cpu_s = _run(deployment, workload, plans)
    num_simulated = sum(1 for r in results if r["num_iters_total"] > 0)
    num_ok = sum(1 for r in results if r["status"] == OK_NAME)
    waited_s = stats.compile_s - stats.compile_hidden_s
    no_compile_s = wall_s - waited_s
    rng = np.random.default_rng(0)
    out = {
        "case": f"{deployment.model.name} on {deployment.num_gpus} x {deployment.gpu.name}, "
        f"{workload.name}",
        "devices": jax.local_device_count(),
        "plans": len(plans),
        "plans_simulated": num_simulated,
        "plans_ok": num_ok,
        "lanes": stats.num_lanes,
        "lanes_sharing_a_probe_run": stats.num_unbound_lanes,
        "requests": int(workload.num_requests),
        "wall_s": round(wall_s, 2),
        "cpu_s": round(cpu_s, 2),
        "split_s": {
            "cost": round(stats.cost_s, 2),
            "memory_and_lanes": round(stats.prepare_s - stats.cost_s, 2),
            "compile": round(waited_s, 2),
            "simulate": round(stats.run_s, 2),
            "metrics": round(wall_s - stats.prepare_s - waited_s - stats.run_s, 2),
        },
        "compile_s": round(stats.compile_s, 2),
        "compile_background_s": round(stats.compile_hidden_s, 2),
        "ms_per_plan": {
            "with_compile": round(1e3 * wall_s / len(plans), 2),
            "without_compile": round(1e3 * no_compile_s / len(plans), 2),
        },
        "ms_per_simulated_plan": {
            "with_compile": round(1e3 * wall_s / max(num_simulated, 1), 2),
            "without_compile": round(1e3 * no_compile_s / max(num_simulated, 1), 2),
        },
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "speedup_vs_reference": _speedup(
            deployment, workload, plans, results, args.reference_plans, rng
        ),
    }
    if not args.no_scaling:
        out.update(
            _scaling(deployment, args.trace, plans, args.scaling_plans, args.scaling_requests, rng)
        )
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
