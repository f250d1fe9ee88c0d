"""Every ``apex-jax`` command of the README runs, and its stdout is only the result: the
ranked table, the JSON of one plan, the validation or calibration table, never a log line.

The commands run one after another in one child process (one JAX start-up, shared
compilations; pytest's own output capture stays out of Hydra's logging), each shrunk where
it would take minutes: a bundled trace becomes an 8-request static batch (a 24-request Poisson
stream in an experiment, which may need an arrival rate), generated workloads get 24
requests, goodput searches take 3 rounds, the plan space is the classic DP x TP x PP one, and the fits take a few
steps on a few rows. The command's own arguments are kept and win over the shrinking ones.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from apex_jax import cli

README = Path(__file__).resolve().parents[1] / "README.md"
# A log record as Hydra's job logging formats it, or a traceback: neither belongs on stdout.
_NOT_RESULT = re.compile(r"^\[\d{4}-\d\d-\d\d|^Traceback|\]\[(INFO|WARNING|ERROR)\]")


def readme_commands() -> list[list[str]]:
    """The arguments of every ``apex-jax`` command in the README's bash blocks."""
    commands, in_bash = [], False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_bash = line.strip() == "```bash"
            continue
        if in_bash and "apex-jax " in line:
            text = line.split("apex-jax ", 1)[1].split("  #", 1)[0]
            if shlex.split(text) not in commands:
                commands.append(shlex.split(text))
    return commands


def _has(args: list[str], key: str) -> bool:
    return any(a.split("=", 1)[0].lstrip("+") == key for a in args)


def shrunk(args: list[str], serving_runs: Path) -> list[str]:
    """The command with the shrinking overrides it does not set itself; ``serving_runs`` is a
    small measurement file for the serving fit."""
    command, rest = args[0], args[1:]
    extra: list[str] = []
    if any(a.startswith("+experiment=") for a in rest):
        # A Poisson stream has the arrival rate that goodput and target rates scale.
        extra += ["workload=poisson", "workload.num_requests=24", "goodput.max_rounds=3"]
    elif command in ("search", "simulate"):
        workload = next((a.split("=", 1)[1] for a in rest if a.startswith("workload=")), None)
        if workload is None:
            extra.append("workload=static_batch")
        elif workload in ("poisson", "asr", "closed_loop"):
            extra.append("workload.num_requests=24")
    if command == "search" and not _has(rest, "plan_space"):
        extra.append("plan_space=parallel_only")
    if command == "calibrate" and not _has(rest, "target"):
        extra += ["operators=[gemm]", "max_rows_per_op=200", "folds=2", "steps=5", "plots=false"]
    if command == "calibrate" and "target=serving" in rest:
        extra += [
            f"serving.measurements={serving_runs}",
            "serving.steps=1",
        ]
    return [command, *rest, *extra]


def test_the_readme_has_commands_of_every_kind():
    kinds = {args[0] for args in readme_commands()}
    assert {"search", "simulate", "validate", "calibrate"} <= kinds


def _assert_clean_stdout(command: str, out: str) -> None:
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, "nothing on stdout"
    assert not [line for line in lines if _NOT_RESULT.search(line)], out
    if command == "simulate":
        assert json.loads(out)["status"] == "OK"
    elif command == "search":
        assert any(line.startswith("rank  n  plan") for line in lines), out
    elif command == "validate":
        assert lines[0].startswith("trace") and any(line.startswith("MAPE") for line in lines), out
    elif command == "calibrate":
        assert "MAPE" in out or "median" in out, out


# Runs each command of argv[1] (JSON) through the console script's main, with stdout and
# stderr captured per command; writes the exit codes and outputs to argv[2].
_RUNNER = """
import contextlib, io, json, sys, time
from apex_jax import cli
commands, out_path = json.loads(sys.argv[1]), sys.argv[2]
results = []
for args in commands:
    out, err, start = io.StringIO(), io.StringIO(), time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(args)
    seconds = time.monotonic() - start
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue(), "s": seconds})
with open(out_path, "w") as stream:
    json.dump(results, stream)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Exit code, stdout and stderr of every README command, by its text."""
    work = tmp_path_factory.mktemp("readme")
    # One measured run per trace of the fold: enough to take a step of the serving fit.
    dev = (Path(cli.__file__).parent / "data/validation/vllm_h100_dev.csv").read_text()
    header, *rows = dev.splitlines()
    picked = [
        next(r for r in rows if f",{trace}," in r)
        for trace in ("llama/lmsys_05", "llama/creation_05")
    ]
    serving_runs = work / "serving_runs.csv"
    serving_runs.write_text("\n".join([header, *picked]) + "\n")
    commands = readme_commands()
    shrunk_commands = json.dumps([shrunk(a, serving_runs) for a in commands])
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, shrunk_commands, str(work / "out.json")],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((work / "out.json").read_text())
    return {" ".join(a): r for a, r in zip(commands, results)}


@pytest.mark.slow
@pytest.mark.parametrize("args", readme_commands(), ids=lambda a: " ".join(a))
def test_readme_command_prints_only_its_result(args, runs):
    run = runs[" ".join(args)]
    assert run["code"] == 0, run["err"]
    _assert_clean_stdout(args[0], run["out"])
    assert "Traceback" not in run["err"]
