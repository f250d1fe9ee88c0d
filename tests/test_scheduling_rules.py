"""vLLM 0.6.0's scheduling rules on small cases worked out by hand.

Each case follows vllm/core/scheduler.py (``_schedule_default``, ``_schedule_chunked_prefill``,
``_schedule_running``, ``_schedule_prefills``) and ``BlockSpaceManagerV1.can_append_slots``
step by step; the expected iterations below were derived from those rules, not from this code.
Every iteration costs exactly 1 s, so times count iterations. Requests are named A, B, C by
id; a row is one iteration: (admitted with their prefill tokens, decoded, preempted, running
queue after, waiting queue after). The reference is checked row by row, the JAX engine on the
per-request times it gives.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import engine_case, roofline_coeffs, run_engine

from apex_jax import reference as ref
from apex_jax.status import OK

NAMES = "ABC"
LIMITS = {"max_num_batched_tokens": 64, "watermark_blocks": 0, "max_model_len": 10_000}
ONE_SECOND = np.array([1.0] + [0.0] * 9)  # fixed_s only: every iteration takes 1 s

CASES = {
    # Rule: a running sequence is kept only if a page is free when it is considered, whether or
    # not it needs one (can_append_slots). Prompts of 3 tokens fill one 4-token page each.
    # It 1: chunked prefill off, A and B are admitted and prefill (2 pages, none left free).
    # It 2: A is considered with 0 pages free: the tail B is preempted (1 page freed), although
    #   neither A (length 4) nor B needs a new page. A decodes.
    # It 3: admission runs first: B recomputes its 4 tokens in the free page; its prefill
    #   yields its 2nd and last token. A does not run (prefills only).
    # It 4: A (length 5) takes the freed page and yields its 3rd and last token.
    "keep_only_with_a_free_page": (
        [0.0, 0.0],
        [3, 3],
        [3, 2],
        {"max_num_seqs": 8, "block_size": 4, "num_kv_blocks": 2, "chunked_prefill": 0},
        [
            ({"A": 3, "B": 3}, [], [], "AB", ""),
            ({}, ["A"], ["B"], "A", "B"),
            ({"B": 4}, [], [], "A", ""),
            ({}, ["A"], [], "", ""),
        ],
        {"first": [1, 1], "finish": [4, 3], "preemptions": 1},
    ),
    # Rule: with chunked prefill, the waiting queue is still admitted in an iteration that
    # preempted (_schedule_chunked_prefill calls _schedule_prefills after _schedule_running).
    # It 1: A and B are admitted (max_num_seqs 2), one page each; C waits; 1 page free.
    # It 2: A (length 5) keeps the free page for its 5th token; B finds none and nobody is
    #   behind it, so it preempts itself (its page is freed). C is admitted into that page
    #   (B joins the waiting queue only after admission) and yields its only token.
    # It 3: A (length 6, no new page) yields its 3rd and last token; B needs 2 pages, 1 free.
    # It 4: B recomputes 5 tokens (2 pages) and yields its 2nd token; it 5: its 3rd and last.
    "admit_after_preempting": (
        [0.0, 0.0, 0.0],
        [4, 4, 4],
        [3, 3, 1],
        {"max_num_seqs": 2, "block_size": 4, "num_kv_blocks": 3, "chunked_prefill": 1},
        [
            ({"A": 4, "B": 4}, [], [], "AB", "C"),
            ({"C": 4}, ["A"], ["B"], "A", "B"),
            ({}, ["A"], [], "", "B"),
            ({"B": 5}, [], [], "B", ""),
            ({}, ["B"], [], "", ""),
        ],
        {"first": [1, 1, 2], "finish": [3, 5, 2], "preemptions": 1},
    ),
    # Rule: the victim is the tail of the running queue, where admitted and re-admitted
    # requests join, and goes to the front of the waiting queue. One token per page, so every
    # decode takes a page; 5 pages. C arrives at 0.5 s.
    # It 1: A and B prefill 2 tokens each (4 pages; 1 free); C arrives meanwhile.
    # It 2: A takes the free page; B finds none and preempts itself (2 pages back); C is
    #   admitted into 1 of them. Running queue A, C.
    # It 3: A takes the last page; C finds none and preempts itself; it goes to the front of
    #   the waiting queue, ahead of B. B (3 tokens) does not fit the 1 free page.
    # It 4: A yields its 4th and last token and frees 5 pages.
    # It 5: C (2 tokens) then B (3 tokens) are re-admitted in waiting order: queue C, B.
    # It 6: C finds no free page: the tail B is preempted (not C, the latest arrival). C decodes.
    # It 7: C yields its 4th and last token; B (4 tokens) does not fit the 1 free page yet.
    # It 8: B recomputes 4 tokens and yields its 3rd and last token.
    "victim_is_the_queue_tail": (
        [0.0, 0.0, 0.5],
        [2, 2, 1],
        [4, 3, 4],
        {"max_num_seqs": 3, "block_size": 1, "num_kv_blocks": 5, "chunked_prefill": 1},
        [
            ({"A": 2, "B": 2}, [], [], "AB", "C"),
            ({"C": 1}, ["A"], ["B"], "AC", "B"),
            ({}, ["A"], ["C"], "A", "CB"),
            ({}, ["A"], [], "", "CB"),
            ({"C": 2, "B": 3}, [], [], "CB", ""),
            ({}, ["C"], ["B"], "C", "B"),
            ({}, ["C"], [], "", "B"),
            ({"B": 4}, [], [], "", ""),
        ],
        {"first": [1, 1, 2], "finish": [4, 8, 7], "preemptions": 3},
    ),
}


def _case(name):
    arrival, prompt, output, limits, rows, expected = CASES[name]
    case = (np.array(arrival), np.array(prompt), np.array(output), {**LIMITS, **limits}, ONE_SECOND)
    return case, rows, expected


def _letters(seqs) -> str:
    return "".join(NAMES[s.req] for s in seqs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_iterations_follow_the_rule(name):
    (arrival, prompt, output, limits, coeffs), rows, _ = _case(name)
    lane = ref._make_lane(arrival, prompt, output, limits, roofline_coeffs(coeffs), 0, None)
    st = ref._initial_state(lane)
    for i, (admitted, decoded, preempted, running, waiting) in enumerate(rows, start=1):
        q = ref._queues(lane, st, ref._idle_until_s(lane, st))
        sch = ref._schedule_running(lane, st, q)
        adm = ref._admit(lane, st, q, sch)
        b = ref._batch_features(lane, sch, adm)
        run = ref._run_cost(lane, b, ref._round_time_s([lane], [b], [1.0]))
        ref._apply(lane, st, q, adm, b, run, q.now_s + run.duration_s)
        ref._compact(st, q, adm, b, ref._retire(lane, st))
        got = (
            {NAMES[s.req]: chunk for s, chunk, *_ in adm.admitted},
            [NAMES[s.req] for s, _ in b.scheduled if s.req in b.needs],
            [NAMES[v.req] for v in b.victims],
            _letters(s for s in st.system if s.is_running),
            _letters(s for s in st.system if not s.is_running)
            + "".join(NAMES[r] for r in range(st.next_req, ref._num_arrived(st, st.now_s))),
        )
        assert got == (admitted, decoded, preempted, running, waiting), f"iteration {i}"
    assert st.num_finished == len(arrival)


@pytest.mark.parametrize("name", sorted(CASES))
def test_engine_and_reference_give_the_hand_derived_times(name):
    case, _, expected = _case(name)
    engine = run_engine([engine_case(*case)])
    result = ref.simulate_reference(*case[:4], roofline_coeffs(case[4]))
    n = len(case[0])
    for first, finish, preemptions, status in (
        (
            engine.first_token_s[0, :n],
            engine.finish_s[0, :n],
            engine.num_preemptions[0],
            engine.status[0],
        ),
        (result.first_token_s, result.finish_s, result.num_preemptions, result.status),
    ):
        assert int(status) == OK
        np.testing.assert_array_equal(first, expected["first"])
        np.testing.assert_array_equal(finish, expected["finish"])
        assert int(preemptions) == expected["preemptions"]
