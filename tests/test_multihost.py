"""A search spread over two processes with jax.distributed equals the single-process search."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from apex_jax import multihost
from apex_jax.cli import search_from_config
from tests.test_cli import _compose

# Four plans of two GPUs each, some with two lanes (DP2, PP2), so both processes get lanes.
ARGS = [
    "model=llama3_1_8b",
    "cluster=1x2",
    "workload=poisson",
    "workload.num_requests=24",
    "plan_space=parallel_only",
    "report=false",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_keeps_everything():
    assert multihost.process_count() == 1 and multihost.process_index() == 0
    assert multihost.my_share([3, 1, 2]) == [3, 1, 2]
    assert multihost.allgather_objects({"a": 1}) == [{"a": 1}]


@pytest.mark.parametrize(
    ("address", "num_processes", "process_id", "message"),
    [
        ("127.0.0.1:1", 2, 2, r"process_id must be in \[0, 2\) \(got 2\)"),
        ("localhost", 2, 0, "coordinator_address must be host:port"),
    ],
)
def test_bad_settings_are_named(address, num_processes, process_id, message):
    with pytest.raises(ValueError, match=message):
        multihost.initialize(address, num_processes, process_id)


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(tmp_path: Path):
    port = _free_port()
    console = str(Path(sys.executable).parent / "apex-jax")
    procs = [
        subprocess.Popen(
            [
                console,
                "search",
                *ARGS,
                "distributed.num_processes=2",
                f"distributed.process_id={i}",
                f"distributed.coordinator_address=127.0.0.1:{port}",
                f"hydra.run.dir={tmp_path / f'p{i}'}",
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (1, 0)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    worker, coordinator = outs
    assert all(p.returncode == 0 for p in procs), outs
    assert worker[0] == "" and "process 1 of 2" in worker[1]
    assert not (tmp_path / "p1" / "plans.csv").exists()
    single = tmp_path / "single"
    search_from_config(_compose("search", ARGS), single)
    assert (tmp_path / "p0" / "plans.csv").read_text() == (single / "plans.csv").read_text()
    assert "rank" in coordinator[0]
