"""vLLM 0.6's host costs and TTFT delay, chosen on the dev file and held out trace by trace.

The ``vllm 0.6.0`` preset carries three figures that no measurement independent of
``apex_jax/data/validation/vllm_h100_dev.csv`` gives (its host costs and frontend delay in
``VERSION_COSTS``, ``apex_jax/engine_config.py``): the host seconds per sequence and iteration, the host
seconds to launch one layer's kernels eagerly, and the per-request delay of its TTFT metric.
Each is identified by a different part of the file: the per-sequence cost by TPOT at 1 to 10
requests in flight (creation at DP1 against DP2), the eager launch by TTFT at low load across
TP 2, 4 and 8 (a lmsys prefill is launch-bound on TP8, not on TP2), the delay by TTFT at
every load.

Every run of the file is replayed (with its launch arguments, as ``apex-jax validate`` does)
at every point of a grid of the first two; the delay moves each run's TTFT by its value and
its latency sum by its value per request (open-loop arrivals shifted alike keep their gaps),
so it is searched on the results. The score of a point is the mean of the TTFT, TPOT and
latency-sum MAPE. The script prints, with each trace held out in turn, the point the other two
traces choose and the held-out trace's errors there, then the point all three choose, which
the preset carries. The fixed per-iteration overhead stays at its preset figure.

    python scripts/host_costs.py
"""

from __future__ import annotations

import itertools

import numpy as np

import apex_jax
from apex_jax.evaluate import evaluate_cases
from apex_jax.validate import COMPARED, load_measurements, measurement_cases

PER_SEQ_S = (0.3e-3, 0.35e-3, 0.4e-3, 0.45e-3, 0.5e-3)
EAGER_S_PER_LAYER = (0.0, 0.2e-3, 0.24e-3, 0.28e-3, 0.32e-3)
DELAY_S = tuple(np.arange(0.0, 20.5e-3, 1e-3))
METRICS = tuple(COMPARED)


def replay(rows, points) -> np.ndarray:
    """Predicted ``[point, run, metric]`` (TTFT, TPOT, latency sum, requests) at each grid
    point, without a frontend delay."""
    cases, groups = [], None
    for per_seq_s, eager_s in points:
        knobs = {"host_s_per_seq": per_seq_s, "eager_s_per_layer": eager_s}
        these, groups = measurement_cases(rows, engine_overrides={**knobs, "frontend_delay_s": 0.0})
        cases += these
    results, _ = evaluate_cases(cases, per_replica=True)
    out = []
    for k in range(len(points)):
        mine = results[k * len(groups) : (k + 1) * len(groups)]
        runs = []
        for members, result in zip(groups, mine):
            for row in members:
                r = result["replicas"][int(row["replica"])]
                runs.append([r[COMPARED[m]] for m in METRICS] + [r["e2e_sum_s"] / r["e2e_mean_s"]])
        out.append(runs)
    return np.array(out)


def mape(predicted: np.ndarray, measured: np.ndarray, delay_s: float) -> np.ndarray:
    """MAPE (%) per metric ``[3]`` of runs ``[n, 4]`` with the delay added."""
    shifted = predicted[:, :3] + np.array([1.0, 0.0, 0.0]) * delay_s
    shifted[:, 2] += delay_s * predicted[:, 3]
    return np.mean(np.abs(shifted - measured) / measured, axis=0) * 100.0


def best(predicted: np.ndarray, measured: np.ndarray, points, sel: np.ndarray):
    """The grid point and delay with the lowest mean MAPE over runs ``sel``."""
    scores = [
        (float(np.mean(mape(predicted[k][sel], measured[sel], d))), k, d)
        for k in range(len(points))
        for d in DELAY_S
    ]
    _, k, d = min(scores)
    return k, d


def main() -> None:
    apex_jax.enable_compile_cache()
    rows = load_measurements()
    points = list(itertools.product(PER_SEQ_S, EAGER_S_PER_LAYER))
    predicted = replay(rows, points)
    measured = np.array([[float(r[m]) for m in METRICS] for r in _in_group_order(rows)])
    traces = np.array([r["served_trace"].split("_")[1] for r in _in_group_order(rows)])
    header = f"{'held out':<14} {'ms/seq':>7} {'ms/layer':>9} {'delay ms':>9}  " + "  ".join(
        f"{m + ' %':>16}" for m in METRICS
    )
    print(header)
    held = []
    for trace in sorted(set(traces)):
        k, d = best(predicted, measured, points, traces != trace)
        errors = mape(predicted[k][traces == trace], measured[traces == trace], d)
        held.append(errors * np.sum(traces == trace))
        print(_line(trace, points[k], d, errors))
    print(_line("(mean, held)", (np.nan, np.nan), np.nan, np.sum(held, axis=0) / len(traces)))
    k, d = best(predicted, measured, points, np.ones(len(traces), bool))
    print(_line("none (preset)", points[k], d, mape(predicted[k], measured, d)))


def _in_group_order(rows):
    """The rows in the order :func:`replay` returns their runs."""
    _, groups = measurement_cases(rows)
    return [row for members in groups for row in members]


def _line(label, point, delay_s, errors) -> str:
    per_seq_s, eager_s = point
    return (
        f"{label:<14} {per_seq_s * 1e3:>7.2f} {eager_s * 1e3:>9.2f} {delay_s * 1e3:>9.0f}  "
        + "  ".join(f"{e:>16.1f}" for e in errors)
    )


if __name__ == "__main__":
    main()
