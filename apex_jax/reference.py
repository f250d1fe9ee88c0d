"""The slow reference simulator: one iteration at a time, in plain Python.

It defines the engine semantics that :mod:`apex_jax.simulator` must reproduce request by
request. The rules (vLLM 0.6 scheduler, chunked prefill off):

1. Requests are served first-come first-served. The waiting queue is the preempted requests
   in arrival order, then the arrived requests never admitted. In closed-loop mode only
   ``concurrency + finished`` requests have been sent.
2. An iteration that can admit prefills runs only prefills. Admission walks the queue and stops
   at the first request that would break a limit: running sequences ``<= max_num_seqs``,
   prompt tokens ``<= max_num_batched_tokens`` (the first request may exceed it alone, which
   only a recomputed sequence can), and KV pages ``<= free - watermark``. A recomputed request
   prefills its prompt plus the tokens it generated before preemption.
3. Otherwise every running sequence decodes one token. A sequence whose next token opens a new
   KV page takes one; when pages run out, the running sequence that arrived last is preempted
   (its pages freed, to be recomputed later), repeatedly, until the rest fit.
4. A prefill yields a token. Sequences finish at the end of the iteration that yields their
   last token, and free their pages then.
5. With nothing running or waiting, the clock jumps to the next arrival.

A request whose prompt plus output can never fit (KV capacity, token budget, model length)
makes the plan INFEASIBLE before simulation.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from apex_jax.cost_model import CostCoeffs, iteration_time_s
from apex_jax.status import INFEASIBLE, MAX_ITERS, OK

__all__ = ["EngineLimits", "num_rejected", "simulate_reference"]


class EngineLimits(dict):
    """Engine limits of one replica: ``max_num_seqs``, ``max_num_batched_tokens``,
    ``block_size``, ``num_kv_blocks``, ``watermark_blocks``, ``max_model_len``."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def num_rejected(prompt, output, limits) -> int:
    """Requests that no schedule could ever serve under ``limits`` (count)."""
    prompt = np.asarray(prompt, np.int64)
    output = np.asarray(output, np.int64)
    bs = int(limits["block_size"])
    longest_blocks = -(-(prompt + output - 1) // bs)
    bad = (
        (prompt > limits["max_num_batched_tokens"])
        | (longest_blocks > limits["num_kv_blocks"] - limits["watermark_blocks"])
        | (prompt + output > limits["max_model_len"])
    )
    return int(bad.sum())


def simulate_reference(
    arrival_s: np.ndarray,
    prompt_tokens: np.ndarray,
    output_tokens: np.ndarray,
    limits: dict[str, int],
    coeffs: CostCoeffs,
    *,
    concurrency: int = 0,
    max_iters: int = 10_000_000,
) -> dict[str, Any]:
    """Simulate one replica iteration by iteration.

    Args:
        arrival_s: ``[N]`` non-decreasing arrival times in seconds (ignored gating aside in
            closed loop, where they are all zero).
        prompt_tokens: ``[N]`` prompt lengths.
        output_tokens: ``[N]`` output lengths (>= 1).
        limits: see :class:`EngineLimits`.
        coeffs: scalar cost coefficients of the plan.
        concurrency: closed-loop clients; 0 means open loop.
        max_iters: iteration cap.

    Returns:
        dict with ``status``, ``num_iters``, ``num_preemptions``, ``first_token_s [N]``,
        ``finish_s [N]`` (NaN for unfinished requests).
    """
    coeffs = CostCoeffs(*(float(np.asarray(x)) for x in coeffs))
    arrival = [float(x) for x in arrival_s]
    prompt = [int(x) for x in prompt_tokens]
    output = [int(x) for x in output_tokens]
    n = len(arrival)
    first_token = [math.nan] * n
    finish = [math.nan] * n
    result = {
        "status": OK,
        "num_iters": 0,
        "num_preemptions": 0,
        "first_token_s": first_token,
        "finish_s": finish,
    }
    if num_rejected(prompt, output, limits):
        result["status"] = INFEASIBLE
        return _as_arrays(result)

    bs = int(limits["block_size"])
    max_seqs = int(limits["max_num_seqs"])
    budget = int(limits["max_num_batched_tokens"])
    watermark = int(limits["watermark_blocks"])
    free = int(limits["num_kv_blocks"])
    gate = concurrency if concurrency > 0 else n

    now = 0.0
    next_req = 0
    finished = 0
    iters = 0
    # In-system requests in request order: [req, generated, is_running, held_blocks].
    system: list[list] = []

    def num_arrived() -> int:
        by_time = 0
        while by_time < n and arrival[by_time] <= now:
            by_time += 1
        return min(by_time, gate + finished)

    while finished < n:
        if iters >= max_iters:
            result["status"] = MAX_ITERS
            break
        arrived = num_arrived()
        if not system and next_req >= arrived:
            now = max(now, arrival[next_req])
            arrived = num_arrived()

        running = [e for e in system if e[2]]
        queue = [e for e in system if not e[2]]
        queue_len = [prompt[e[0]] + e[1] for e in queue]
        queue += [[r, 0, False, 0] for r in range(next_req, arrived)]
        queue_len += [prompt[r] for r in range(next_req, arrived)]

        token_room = max(budget, queue_len[0]) if queue else budget
        seq_room = max_seqs - len(running)
        block_room = free - watermark
        admitted = []
        tokens = blocks = 0
        for entry, length in zip(queue, queue_len):
            need = _ceil_div(length, bs)
            if (
                len(admitted) + 1 > seq_room
                or tokens + length > token_room
                or blocks + need > block_room
            ):
                break
            admitted.append((entry, length, need))
            tokens += length
            blocks += need

        if admitted:
            pairs = sum(length * (length + 1) / 2 for _, length, _ in admitted)
            now += float(
                iteration_time_s(
                    coeffs, float(tokens), float(len(admitted)), float(pairs), 0.0, xp=np
                )
            )
            iters += 1
            for entry, _, need in admitted:
                if entry[0] >= next_req:
                    system.append(entry)
                    first_token[entry[0]] = now
                entry[1] += 1
                entry[2] = True
                entry[3] = need
                free -= need
            next_req = max([next_req] + [e[0] + 1 for e, _, _ in admitted])
            system.sort(key=lambda e: e[0])
        else:
            needs = {e[0]: _ceil_div(prompt[e[0]] + e[1], bs) - e[3] for e in running}
            deficit = sum(needs.values()) - free
            while deficit > 0:
                victim = running.pop()
                deficit -= needs.pop(victim[0]) + victim[3]
                free += victim[3]
                victim[2] = False
                victim[3] = 0
                result["num_preemptions"] += 1
            if not running:
                continue
            kv_tokens = sum(prompt[e[0]] + e[1] for e in running)
            now += float(
                iteration_time_s(
                    coeffs, float(len(running)), float(len(running)), 0.0, float(kv_tokens), xp=np
                )
            )
            iters += 1
            for e in running:
                free -= needs[e[0]]
                e[3] += needs[e[0]]
                e[1] += 1

        for e in list(system):
            if e[2] and e[1] == output[e[0]]:
                finish[e[0]] = now
                free += e[3]
                finished += 1
                system.remove(e)

    result["num_iters"] = iters
    return _as_arrays(result)


def _as_arrays(result: dict[str, Any]) -> dict[str, Any]:
    result["first_token_s"] = np.asarray(result["first_token_s"], np.float64)
    result["finish_s"] = np.asarray(result["finish_s"], np.float64)
    return result
