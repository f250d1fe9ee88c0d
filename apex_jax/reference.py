"""The slow reference simulator: one iteration at a time, in plain Python.

It defines the engine semantics that :mod:`apex_jax.simulator` must reproduce request by
request. The rules follow vLLM 0.6's scheduler:

1. Requests are served first-come first-served. The waiting queue is the preempted requests
   in arrival order, then the arrived requests never admitted. In closed-loop mode only
   ``concurrency + finished`` requests have been sent.
2. Admission walks the waiting queue and stops at the first request that breaks a limit:
   running sequences ``<= max_num_seqs``, KV pages for the whole prompt ``<= free - watermark``,
   and the token budget. A recomputed request prefills its prompt plus the tokens it generated
   before preemption. A prefill that completes yields a token.
3. Chunked prefill off: an iteration that can admit runs only those prefills, whole; a
   prompt must fit the budget (the first in the queue may exceed it alone, which only a
   recomputed sequence can). Otherwise every running sequence decodes one token.
4. Chunked prefill on: running sequences are scheduled first, in request order: a decode
   takes one token of the budget, an unfinished prefill the next chunk that fits; scheduling
   stops at the first sequence that gets no token. Waiting requests are then admitted with the
   budget left, the last one possibly with a partial chunk. No request is admitted in an
   iteration that preempted.
5. A decoding sequence whose next token opens a new KV page takes one; when pages run out, the
   running sequence that arrived last is preempted (its pages freed, its prefill to be
   recomputed), repeatedly, until the rest fit.
6. Sequences finish at the end of the iteration that yields their last token, and free their
   pages then. With nothing running or waiting, the clock jumps to the next arrival.

A request whose prompt plus output can never fit (KV capacity, the model length, or with
chunked prefill off the token budget) makes the plan INFEASIBLE before simulation.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from apex_jax.cost.energy import EnergyCoeffs, iteration_energy_j
from apex_jax.cost.iteration import CostCoeffs, iteration_time_s
from apex_jax.status import INFEASIBLE, MAX_ITERS, OK

__all__ = ["EngineLimits", "num_rejected", "simulate_reference"]


class EngineLimits(dict):
    """Engine limits of one replica: ``max_num_seqs``, ``max_num_batched_tokens``,
    ``block_size``, ``num_kv_blocks``, ``watermark_blocks``, ``max_model_len`` and
    ``chunked_prefill`` (0 or 1)."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def num_rejected(prompt, output, limits) -> int:
    """Requests that no schedule could ever serve under ``limits`` (count)."""
    prompt = np.asarray(prompt, np.int64)
    output = np.asarray(output, np.int64)
    bs = int(limits["block_size"])
    longest_blocks = -(-(prompt + output - 1) // bs)
    over_budget = prompt > limits["max_num_batched_tokens"]
    if limits.get("chunked_prefill", 0):
        over_budget = np.zeros_like(over_budget)
    bad = (
        over_budget
        | (longest_blocks > limits["num_kv_blocks"] - limits["watermark_blocks"])
        | (prompt + output > limits["max_model_len"])
    )
    return int(bad.sum())


class _Seq:
    """A request in the system."""

    __slots__ = ("gen", "held", "is_running", "pending", "req")

    def __init__(self, req: int):
        self.req = req
        self.gen = 0  # tokens generated
        self.is_running = False
        self.held = 0  # KV pages
        self.pending = 0  # prefill tokens still to compute


def _on_host(coeffs):
    """The same constants with each scalar a Python float and each vector a NumPy array."""
    fields = {}
    for name, value in coeffs._asdict().items():
        value = np.asarray(value, np.float64)
        fields[name] = float(value) if value.ndim == 0 else value
    return type(coeffs)(**fields)


def simulate_reference(
    arrival_s: np.ndarray,
    prompt_tokens: np.ndarray,
    output_tokens: np.ndarray,
    limits: dict[str, int],
    coeffs: CostCoeffs,
    *,
    concurrency: int = 0,
    max_iters: int = 10_000_000,
    record: bool = False,
    energy: EnergyCoeffs | None = None,
) -> dict[str, Any]:
    """Simulate one replica iteration by iteration.

    Args:
        arrival_s: ``[N]`` non-decreasing arrival times in seconds (all zero in closed loop).
        prompt_tokens: ``[N]`` prompt lengths.
        output_tokens: ``[N]`` output lengths (>= 1).
        limits: see :class:`EngineLimits`.
        coeffs: cost coefficients of the plan (batch shape ``()``).
        concurrency: closed-loop clients; 0 means open loop.
        max_iters: iteration cap.
        energy: power-model constants; the result's ``dynamic_energy_j`` is the above-idle
            energy of the replica's GPUs over its iterations (see :mod:`apex_jax.cost.energy`).
        record: also return ``iterations``, one dict per iteration with its end time
            ``time_s``, ``num_tokens``, ``num_running`` (after it), ``num_in_system``,
            ``num_arrived`` and ``free_blocks`` -- for invariant tests.

    Returns:
        dict with ``status``, ``num_iters``, ``num_preemptions``, ``first_token_s [N]``,
        ``finish_s [N]`` (NaN for unfinished requests).
    """
    coeffs = _on_host(coeffs)
    arrival = [float(x) for x in arrival_s]
    prompt = [int(x) for x in prompt_tokens]
    output = [int(x) for x in output_tokens]
    n = len(arrival)
    first_token = [math.nan] * n
    finish = [math.nan] * n
    result: dict[str, Any] = {
        "status": OK,
        "num_iters": 0,
        "num_preemptions": 0,
        "dynamic_energy_j": 0.0,
    }
    energy = _on_host(EnergyCoeffs.zeros() if energy is None else energy)
    iterations: list[dict[str, float]] = []
    if record:
        result["iterations"] = iterations
    if num_rejected(prompt, output, limits):
        result["status"] = INFEASIBLE
        return _with_times(result, first_token, finish)

    bs = int(limits["block_size"])
    max_seqs = int(limits["max_num_seqs"])
    budget = int(limits["max_num_batched_tokens"])
    watermark = int(limits["watermark_blocks"])
    chunked = bool(limits.get("chunked_prefill", 0))
    free = int(limits["num_kv_blocks"])
    gate = concurrency if concurrency > 0 else n

    now = 0.0
    next_req = 0
    finished = 0
    iters = 0
    system: list[_Seq] = []  # in request order

    def num_arrived() -> int:
        by_time = 0
        while by_time < n and arrival[by_time] <= now:
            by_time += 1
        return min(by_time, gate + finished)

    def seq_len(s: _Seq) -> int:
        return prompt[s.req] + s.gen

    while finished < n:
        if iters >= max_iters:
            result["status"] = MAX_ITERS
            break
        arrived = num_arrived()
        if not system and next_req >= arrived:
            now = max(now, arrival[next_req])
            arrived = num_arrived()

        running = [s for s in system if s.is_running]
        num_running = len(running)
        queue = [s for s in system if not s.is_running]
        queue += [_Seq(r) for r in range(next_req, arrived)]

        # Running sequences first (with chunked prefill off nothing is mid-prefill and every
        # decode fits the budget, which is at least max_num_seqs).
        scheduled: list[tuple[_Seq, int]] = []
        left = budget
        for s in running:
            take = min(1 if s.pending == 0 else s.pending, left)
            if take == 0:
                break
            scheduled.append((s, take))
            left -= take
        needs = {s.req: _ceil_div(seq_len(s), bs) - s.held for s, _ in scheduled if s.pending == 0}
        deficit = sum(needs.values()) - free
        victims = []
        while deficit > 0:
            victim = running.pop()
            deficit -= needs.pop(victim.req, 0) + victim.held
            victims.append(victim)
        scheduled = [(s, take) for s, take in scheduled if s not in victims]

        # Admission from the waiting queue.
        if chunked:
            token_room = left
            block_room = free + sum(v.held for v in victims) - sum(needs.values()) - watermark
            may_admit = not victims
        else:
            head = seq_len(queue[0]) if queue else 0
            token_room = max(budget, head)
            block_room = free - watermark
            may_admit = True
        admitted: list[tuple[_Seq, int, int]] = []
        tokens = blocks = 0
        for s in queue if may_admit else []:
            length = seq_len(s)
            chunk = min(length, token_room - tokens) if chunked else length
            need = _ceil_div(length, bs)
            if (
                chunk <= 0
                or tokens + chunk > token_room
                or len(admitted) + 1 > max_seqs - num_running
                or blocks + need > block_room
            ):
                break
            admitted.append((s, chunk, need))
            tokens += chunk
            blocks += need
        if admitted and not chunked:
            scheduled, victims, needs = [], [], {}

        for v in victims:
            free += v.held
            v.held = 0
            v.pending = 0
            v.is_running = False
            result["num_preemptions"] += 1
        if not scheduled and not admitted:
            continue

        num_tokens = sum(take for _, take in scheduled) + tokens
        num_sampled = 0
        pairs = 0.0
        kv_tokens = 0
        for s, take in scheduled:
            if s.pending == 0:
                num_sampled += 1
                kv_tokens += seq_len(s)
            else:
                done = seq_len(s) - s.pending
                pairs += take * done + take * (take + 1) / 2
                num_sampled += take == s.pending
        for s, chunk, _ in admitted:
            pairs += chunk * (chunk + 1) / 2
            num_sampled += chunk == seq_len(s)
        duration = float(
            iteration_time_s(
                coeffs, float(num_tokens), float(num_sampled), float(pairs), float(kv_tokens), xp=np
            )
        )
        total = iteration_energy_j(
            energy,
            duration,
            float(num_tokens),
            float(num_sampled),
            float(pairs),
            float(kv_tokens),
            xp=np,
        )
        result["dynamic_energy_j"] += float(total) - energy.num_gpus * energy.idle_w * duration
        now += duration
        iters += 1

        progressed = []
        for s, take in scheduled:
            if s.pending == 0:
                need = needs[s.req]
                free -= need
                s.held += need
                progressed.append(s)
            else:
                s.pending -= take
                if s.pending == 0:
                    progressed.append(s)
        for s, chunk, need in admitted:
            if s.req >= next_req:
                system.append(s)
            s.is_running = True
            s.held = need
            free -= need
            s.pending = seq_len(s) - chunk
            if s.pending == 0:
                progressed.append(s)
        for s in progressed:
            s.gen += 1
            if s.gen == 1:
                first_token[s.req] = now
        next_req = max([next_req] + [s.req + 1 for s, _, _ in admitted])
        system.sort(key=lambda s: s.req)

        for s in list(system):
            if s.is_running and s.pending == 0 and s.gen >= output[s.req]:
                finish[s.req] = now
                free += s.held
                finished += 1
                system.remove(s)
        if record:
            iterations.append(
                {
                    "time_s": now,
                    "num_tokens": num_tokens,
                    "num_running": sum(s.is_running for s in system),
                    "num_in_system": len(system),
                    "num_arrived": num_arrived(),
                    "num_finished": finished,
                    "free_blocks": free,
                    "held_blocks": sum(s.held for s in system),
                }
            )

    result["num_iters"] = iters
    return _with_times(result, first_token, finish)


def _with_times(result: dict[str, Any], first_token: list, finish: list) -> dict[str, Any]:
    result["first_token_s"] = np.asarray(first_token, np.float64)
    result["finish_s"] = np.asarray(finish, np.float64)
    return result
