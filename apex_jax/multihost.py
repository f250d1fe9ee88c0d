"""Searches that span several processes (hosts) through ``jax.distributed``.

Every process runs the same search: the host-side work before and after the engine (plans,
costs, lanes, metrics) is cheap and deterministic, so each process does all of it; only the
engine's lanes are split. Process ``i`` of ``n`` simulates the live lanes ``i, i + n, ...``
(lanes are independent, so a lane's result does not depend on which process runs it), and
the per-lane results are exchanged with one all-gather, after which every process holds
every result. Inside a process the lanes are further split over its local devices
(:func:`apex_jax.evaluate.simulate_batch`).

On CPUs the all-gather runs over Gloo (TCP), so the processes need only reach the
coordinator's address: several processes on one machine work as well as one per host.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

__all__ = ["allgather_objects", "initialize", "my_share", "process_count", "process_index"]

T = TypeVar("T")

# Whether this process joined a run; asking JAX instead would start its backend, after
# which joining is no longer possible.
_JOINED = {"yes": False}


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Join a ``num_processes``-process run as ``process_id`` (0 is the coordinator, which
    listens on ``coordinator_address``, ``host:port``).

    Raises:
        ValueError: a process id outside ``[0, num_processes)`` or an address without a port.
    """
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"distributed.process_id must be in [0, {num_processes}) (got {process_id})"
        )
    host, _, port = str(coordinator_address).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(
            f"distributed.coordinator_address must be host:port (got {coordinator_address!r})"
        )
    # Gloo carries CPU collectives between processes; set before the backend starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    _JOINED["yes"] = True


def process_count() -> int:
    """Processes in the run (1 without :func:`initialize`)."""
    return jax.process_count() if _JOINED["yes"] else 1


def process_index() -> int:
    """This process's index in the run (0 without :func:`initialize`)."""
    return jax.process_index() if _JOINED["yes"] else 0


def my_share(items: Sequence[T]) -> list[T]:
    """This process's items: every ``process_count()``-th, starting at its index."""
    return list(items[process_index() :: process_count()])


@contextlib.contextmanager
def _native_stdout_to_stderr() -> Iterator[None]:
    """Send what native code writes to stdout to stderr instead: Gloo announces its
    connections on stdout, which carries only the result."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in process order (a list of one without other processes).

    Objects travel pickled, as bytes padded to the longest, so floats arrive bit for bit.
    """
    if process_count() == 1:
        return [obj]
    payload = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    with _native_stdout_to_stderr():
        sizes = multihost_utils.process_allgather(np.int64(payload.size))
        sizes = np.asarray(sizes).reshape(-1)
        padded = np.zeros(int(sizes.max()), np.uint8)
        padded[: payload.size] = payload
        gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [pickle.loads(gathered[i, : sizes[i]].tobytes()) for i in range(len(sizes))]
