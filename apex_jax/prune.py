"""Plan-space pruning: plans that cannot beat another plan are not simulated.

Four rules shrink what the engine runs. Two are exact and live where lanes are run
(:func:`apex_jax.evaluate.evaluate_cases`): a lane whose inputs equal an earlier lane's takes
its result, which collapses *identical DP replicas* (a workload the router splits into equal
shares: a static batch, a closed loop of equal requests) and *symmetric plans* (plans whose
lanes all equal another plan's; node and GPU permutations are already one plan, since the
placement is canonical, see :mod:`apex_jax.cost.parallel`). The third is here:

**Dominated plans.** Plan ``B`` dominates plan ``A`` when both split the requests the same
way (the same ``dp``, ``pp`` and GPU count) under the same engine knobs (``max_num_seqs``,
token budget, chunked prefill, block size), ``B`` has at least as many KV pages, and every
constant of ``B``'s iteration-time and power models is at most ``A``'s, one of them (or the
pages) strictly. Every iteration time is a sum of non-negative features times these
constants, maxima and piecewise-linear curves with non-negative widths, so ``B``'s engine is
at least as fast as ``A``'s on every batch, and holds at least as much; ``A`` is skipped.
With pipeline stages the parts of an iteration on no stage (host, stage transfers) and its
layer work compare apart, and the same ``pp`` splits the layers the same way, so every term
of ``B``'s round time is at most ``A``'s as well.
Only objectives that ask *when* requests are served (latencies, throughputs, SLO
attainment, goodput, cost per token, MFU, fewest GPUs) prune: energy, power and MBU count
iterations, and a faster engine may run more, smaller iterations that each stream the
weights again (a test found an energy-optimal plan dominated this way). Even for timing
objectives this is not a proof (scheduling can in principle turn a faster engine into a
later finish for some request), so ``tests/test_prune.py`` checks that the best plan is the
same with pruning on and off.

**Bounded plans.** For the E2E and TPOT objectives every plan has a lower bound, its
requests each served alone (:func:`solo_lower_bounds`; a proof, from the monotone cost
model; a pipeline round lasts at least each of its batches' own iteration time). The search
simulates the plans with the lowest bounds first, then only those whose bound does not
exceed the best plan found, which is exact.
"""

from __future__ import annotations

import numpy as np

from apex_jax.cost.energy import EnergyCoeffs
from apex_jax.cost.iteration import SAMPLED_KNOTS, TOKEN_KNOTS, CostCoeffs, iteration_time_s
from apex_jax.plans import COL

__all__ = [
    "BOUNDED_COLUMNS",
    "dominated_plans",
    "objective_lower_bound",
    "prunes_for",
    "solo_lower_bounds",
]

# Objective columns (apex_jax.objectives) that pruning keeps the optimum of: their value
# depends on when requests are served only (num_gpus: fewest GPUs meeting the SLO).
_TIMING_PREFIXES = ("ttft_", "tpot_", "e2e_", "makespan", "throughput_", "slo_", "goodput")
_TIMING_COLUMNS = ("cost_per_mtok_usd", "mfu", "num_gpus")


def prunes_for(objective_column: str) -> bool:
    """Whether pruning keeps the optimum of an objective column (see the module docstring)."""
    return objective_column.startswith(_TIMING_PREFIXES) or objective_column in _TIMING_COLUMNS


# Plans compare only inside a group equal in these columns: the same lanes and engine limits
# but for the KV pages.
_GROUP_COLUMNS = (
    "dp",
    "pp",
    "tp",
    "max_num_seqs",
    "max_num_batched_tokens",
    "chunked_prefill",
    "block_size",
)
# Plans compared at once against a group (bounds the [chunk, group, features] comparison).
_CHUNK = 256


def _curve_points(base, slopes, knots, linear) -> list[np.ndarray]:
    """``base + curve + linear * x`` at ``x = 0`` and at every knot, then its slope past
    the last knot: a piecewise-linear function with these breakpoints is below another
    everywhere on ``x >= 0`` exactly when all of these are (``[P]`` each)."""
    base, slopes = np.asarray(base, np.float64), np.asarray(slopes, np.float64)
    linear = np.asarray(linear, np.float64)
    widths = np.diff(np.asarray(knots))
    at_knots = base[:, None] + np.concatenate(
        [np.zeros((len(base), 1)), np.cumsum(slopes[:, :-1] * widths, axis=1)], axis=1
    )
    points = [base] + [at_knots[:, i] + linear * k for i, k in enumerate(knots)]
    return points + [slopes[:, -1] + linear]


def _features(c: CostCoeffs, e: EnergyCoeffs, num_kv_blocks: np.ndarray) -> np.ndarray:
    """``[P, D]`` float64, lower is better in every column: the plans' iteration-time model
    term by term (see :func:`apex_jax.cost.iteration.decode_time_parts_s`; terms on the same
    batch feature are summed, curves compared pointwise), their power constants, and minus
    their KV pages."""
    c = CostCoeffs(*(np.asarray(x, np.float64) for x in c))
    # A pipeline round takes the largest of the batches' own times and the stages' layer
    # work (apex_jax.simulator): the parts on no stage (host, stage transfers) and the layer
    # parts compare apart, so that lower parts make every term of the round lower.
    off_fixed_s = c.host_s + c.transfer_fixed_s
    columns = [
        off_fixed_s,
        c.host_s_per_seq,
        # An eager iteration's floor rises with eager_floor_s, and more iterations are eager
        # the smaller max_graph_batch.
        c.eager_floor_s,
        -c.max_graph_batch,
        c.fixed_s + c.comm_fixed_s - off_fixed_s,
        c.transfer_s_per_token,
        *_curve_points(
            c.token_curve_base_s,
            c.token_curve_slopes_s_per_token,
            TOKEN_KNOTS,
            c.comm_s_per_token - c.transfer_s_per_token,
        ),
        *_curve_points(
            c.sampled_curve_base_s,
            c.sampled_curve_slopes_s_per_seq,
            SAMPLED_KNOTS,
            0.0 * c.sampled_curve_base_s,
        ),
        # Decode attention interpolates its grid with non-negative weights: lower at every
        # grid point is lower everywhere.
        *np.reshape(c.decode_attn_grid_s, (len(num_kv_blocks), -1)).T,
        *_curve_points(
            c.enc_curve_base_s, c.enc_curve_slopes_s_per_token, TOKEN_KNOTS, 0.0 * c.enc_fixed_s
        ),
        # Roofline terms enter through maxima that rise with each of them.
        c.gemm_compute_s_per_token,
        c.gemm_weight_s,
        c.gemm_act_s_per_token,
        c.lm_head_compute_s_per_token,
        c.lm_head_weight_s,
        c.prefill_attn_s_per_pair,
        c.prefill_attn_fixed_s,
        c.decode_attn_s_per_kv_token,
        c.enc_fixed_s,
        c.enc_attn_s_per_pair,
        # Equal for every plan of a model; differing, neither is better.
        c.is_encoder_decoder,
        -c.is_encoder_decoder,
        *(np.asarray(x, np.float64) for x in e),
        -np.asarray(num_kv_blocks, np.float64),
    ]
    return np.stack([np.broadcast_to(x, num_kv_blocks.shape) for x in columns], axis=1)


def dominated_plans(
    plans: np.ndarray,
    coeffs: CostCoeffs,
    energy: EnergyCoeffs,
    num_kv_blocks: np.ndarray,
    is_oom: np.ndarray,
) -> np.ndarray:
    """The plans another plan dominates (see the module docstring).

    Args:
        plans: int32 ``[P, F]`` plan tensor.
        coeffs: the plans' :class:`~apex_jax.cost.iteration.CostCoeffs`, batch ``[P]``.
        energy: the plans' :class:`~apex_jax.cost.energy.EnergyCoeffs`, batch ``[P]``.
        num_kv_blocks: ``[P]`` KV pages of a replica.
        is_oom: ``[P]`` bool; plans that do not fit neither dominate nor are dominated.

    Returns:
        ``[P]`` int64: for a dominated plan the index of the first plan that dominates it,
        else -1. Domination is transitive and strict, so every dominated plan also has an
        undominated dominator: skipping them all keeps the best of each group.
    """
    plans = np.asarray(plans)
    features = _features(coeffs, energy, np.asarray(num_kv_blocks))
    out = np.full(len(plans), -1, np.int64)
    fits = ~np.asarray(is_oom, bool)
    keys = plans[:, [COL[c] for c in _GROUP_COLUMNS]]
    group_of = np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1)
    for g in np.unique(group_of[fits]):
        members = np.flatnonzero(fits & (group_of == g))
        f = features[members]
        for begin in range(0, len(members), _CHUNK):
            a = f[begin : begin + _CHUNK, None, :]  # [chunk, 1, D] the plans judged
            b = f[None, :, :]  # [1, G, D] the plans that may dominate them
            dominates = np.all(b <= a, axis=2) & np.any(b < a, axis=2)  # [chunk, G]
            judged = members[begin : begin + _CHUNK]
            has = dominates.any(axis=1)
            out[judged[has]] = members[dominates[has].argmax(axis=1)]
    return out


# ------------------------------------------------------------------------------------------
# Bounds: plans whose best case is worse than a simulated plan
# ------------------------------------------------------------------------------------------

# Objective columns with a lower bound from requests served alone (see solo_lower_bounds).
BOUNDED_COLUMNS = (
    "e2e_mean_s",
    "e2e_p50_s",
    "e2e_p90_s",
    "e2e_p99_s",
    "e2e_sum_s",
    "tpot_mean_s",
    "tpot_p50_s",
    "tpot_p90_s",
    "tpot_p99_s",
)


def solo_lower_bounds(
    coeffs: CostCoeffs, prompt_tokens: np.ndarray, output_tokens: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Lower bounds on every request's E2E latency and TPOT on every plan, ``[P, N]`` each
    (TPOT NaN for one-token requests).

    Whatever else an iteration holds, one that carries request ``i`` has at least one token
    and one sampled sequence of it, and a decode iteration reads at least its own KV, ``p +
    j - 1`` entries at its ``j``-th decode step; iteration time never falls as a feature
    grows (the curves' slopes are non-negative). Request ``i`` needs at least one iteration
    for its prompt and first token and ``o - 1`` decode iterations, each reading at least
    its prompt's ``p`` KV entries, and queueing only adds, so ``e2e >= t_1 + (o - 1) t_d(p)``
    and ``tpot >= t_d(p)``, with ``t_1`` a one-token iteration without decoding and
    ``t_d(p)`` a one-sequence decode iteration over ``p`` entries
    (:func:`~apex_jax.cost.iteration.iteration_time_s`). Decoder-only models only (an
    encoder-decoder prefill iteration is priced differently).
    """
    first = np.asarray(iteration_time_s(coeffs, 1.0, 1.0, 0.0, 0.0, 0.0, xp=np))[:, None]
    p = np.asarray(prompt_tokens, np.float64)
    o = np.asarray(output_tokens, np.float64)[None, :]
    # The cheapest decode iteration of request i reads its prompt's KV, p_i entries.
    lengths, which = np.unique(p, return_inverse=True)
    cheapest = np.stack(
        [np.asarray(iteration_time_s(coeffs, 1.0, 1.0, 0.0, 1.0, k, xp=np)) for k in lengths],
        axis=1,
    )
    step = cheapest[:, which]
    e2e = first + (o - 1.0) * step
    tpot = np.where(o > 1.0, step, np.nan)
    return e2e, tpot


def objective_lower_bound(column: str, e2e: np.ndarray, tpot: np.ndarray) -> np.ndarray:
    """``[P]``: the lower bound of objective ``column`` (one of :data:`BOUNDED_COLUMNS`)
    from per-request bounds ``[P, N]``, computed as the metric is (a mean, a sum or a
    percentile of the requests, each non-decreasing in every request's value)."""
    values = e2e if column.startswith("e2e") else tpot[:, np.all(np.isfinite(tpot), axis=0)]
    if values.shape[1] == 0:
        return np.full(values.shape[0], -np.inf)
    stat = column.split("_")[1]
    if stat == "sum":
        return values.sum(axis=1)
    if stat == "mean":
        return values.mean(axis=1)
    return np.percentile(values, float(stat[1:]), axis=1)
