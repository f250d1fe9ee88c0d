"""Per-plan status codes returned by traced code instead of exceptions."""

from __future__ import annotations

__all__ = [
    "INFEASIBLE",
    "LIVE",
    "MAX_ITERS",
    "OK",
    "OOM",
    "SLOT_OVERFLOW",
    "STATUS_NAMES",
    "status_name",
]

OK = 0  # every request finished
OOM = 1  # weights, activations and reserve leave no room for a single KV page
INFEASIBLE = 2  # no request can be served, or the engine could neither run nor preempt
MAX_ITERS = 3  # the simulation hit its iteration cap before every request finished
LIVE = -1  # internal: the lane is still simulating
SLOT_OVERFLOW = -2  # internal: more requests in the system than slots; rerun with more slots

STATUS_NAMES = {
    OK: "OK",
    OOM: "OOM",
    INFEASIBLE: "INFEASIBLE",
    SLOT_OVERFLOW: "SLOT_OVERFLOW",
    MAX_ITERS: "MAX_ITERS",
    LIVE: "LIVE",
}


def status_name(code: int) -> str:
    """Name of a status code."""
    return STATUS_NAMES[int(code)]
