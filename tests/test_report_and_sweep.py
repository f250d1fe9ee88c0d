"""Reports (figures, report.md), completion markers that make sweeps resumable, the merged
sweep summary, and an interrupted multirun that completes on rerun with identical results."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from apex_jax import cli
from apex_jax.benchmark_runs import SILICON_DEV
from apex_jax.cli import validation_file
from apex_jax.paths import bundled_path, config_dir
from apex_jax.report import FIGURES, VALIDATION_FIGURE, plot_validation, write_report
from apex_jax.search import TABLE_WIDTH
from apex_jax.sweep import (
    MARKER,
    config_fingerprint,
    format_sweep_table,
    read_marker,
    sweep_summary,
)
from apex_jax.validate import DEFAULT_MEASUREMENTS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["model=llama3_1_8b", "cluster=1x2", "plan_space=parallel_only"]


def _compose(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="search", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory):
    """Two finished jobs of a sweep, run in this process."""
    root = tmp_path_factory.mktemp("sweep")
    for workload in (["workload=static_batch"], ["workload=poisson", "workload.num_requests=64"]):
        cli.search_from_config(_compose([*SMALL, *workload]), root / workload[0])
    return root


def test_search_writes_figures_and_report(sweep_root):
    job = sweep_root / "workload=poisson"
    for name in FIGURES:
        assert (job / name).read_bytes()[:8] == PNG_MAGIC, name
    report = (job / "report.md").read_text()
    assert "## Best plan vs the heuristic" in report
    summary = json.loads((job / "summary.json").read_text())
    assert summary["heuristic"]["plan"].startswith("DP1 · PP1 · attn TP2")
    assert f"**{summary['speedup_vs_heuristic']:.2f}x**" in report
    for name in FIGURES:
        assert f"]({name})" in report


def test_finished_job_is_not_rerun(sweep_root, monkeypatch, capsys):
    config = _compose([*SMALL, "workload=static_batch"])
    job = sweep_root / "workload=static_batch"
    stored = json.loads((job / MARKER).read_text())
    assert stored["fingerprint"] == config_fingerprint(json.loads(json.dumps(config)))

    def no_search(*args, **kwargs):
        raise AssertionError("a finished job ran again")

    monkeypatch.setattr(cli, "run_search", no_search)
    summary = cli.search_from_config(config, job)
    assert summary == stored["summary"]
    assert "DP1" in capsys.readouterr().out
    # Another config in the same directory does not match the marker.
    changed = _compose([*SMALL, "workload=static_batch", "objective=ttft_mean_s"])
    assert read_marker(job, config_fingerprint(json.loads(json.dumps(changed)))) is None
    with pytest.raises(AssertionError, match="ran again"):
        cli.search_from_config(changed, job)


def test_marker_without_its_files_does_not_count(tmp_path):
    (tmp_path / MARKER).write_text(
        json.dumps({"fingerprint": "f", "files": ["plans.csv"], "summary": {}})
    )
    assert read_marker(tmp_path, "f") is None
    (tmp_path / "plans.csv").write_text("rank\n")
    assert read_marker(tmp_path, "f") == {}


def test_sweep_summary_merges_jobs(sweep_root, tmp_path):
    rows = sweep_summary(sweep_root, tmp_path)
    assert [r["job"] for r in rows] == ["workload=poisson", "workload=static_batch"]
    with (tmp_path / "sweep_summary.csv").open() as stream:
        on_disk = list(csv.DictReader(stream))
    assert [r["best_plan"] for r in on_disk] == [r["best_plan"] for r in rows]
    assert (tmp_path / "sweep_pareto.png").read_bytes()[:8] == PNG_MAGIC


def test_sweep_summary_command(sweep_root, tmp_path, capsys):
    assert cli.main(["sweep-summary", str(sweep_root), str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "workload=poisson" in out and "speedup (x)" in out
    assert max(len(line) for line in out.splitlines()) <= TABLE_WIDTH
    assert cli.main(["sweep-summary", str(tmp_path / "empty")]) == 2
    assert "no finished search jobs" in capsys.readouterr().err


def _job(job: str, plan: str, objective: str = "e2e_mean_s") -> dict:
    return {
        "job": job,
        "best_plan": plan,
        "objective": objective,
        "best_value": 1.5,
        "heuristic_value": 3.0,
        "speedup_vs_heuristic": 2.0,
        "best_goodput_req_s": None,
        "num_ok": 10,
        "wall_s": 12.0,
    }


def test_sweep_table_prints_what_jobs_share_once_and_stays_narrow():
    shared = "+experiment=apex_speedup,goodput.max_rounds=3,plan_space=parallel_only"
    plan = "PP1 · attn TP8 · mlp TP8 · W bf16 / KV bf16 · seqs 256 · chunk 512 · 1980 MHz"
    rows = [_job(f"{shared},workload={w}", f"DP{d} · {plan}") for w, d in (("a", 1), ("b", 2))]
    lines = format_sweep_table(rows).splitlines()
    assert lines[0].startswith("every job: ") and "workload" not in lines[0]
    assert any(line.startswith("every best plan: PP1 · attn TP8") for line in lines)
    assert any(line.startswith("best, heuristic: E2E latency mean (s)") for line in lines)
    body = lines[-2:]
    assert body[0].split()[:2] == ["workload=a", "DP1"]
    assert body[1].split()[:2] == ["workload=b", "DP2"]
    # No job has a goodput: the column is left out.
    assert "goodput (req/s)" not in format_sweep_table(rows)
    assert max(len(line) for line in lines) <= TABLE_WIDTH
    # A single job's overrides and plan are all shared; jobs ranked differently name theirs.
    single = format_sweep_table(rows[:1]).splitlines()
    assert single[0] == f"every job: {shared},workload=a"[: len(single[0])]
    mixed = format_sweep_table([rows[0], _job("workload=c", "DP4", "ttft_mean_s")])
    head = next(line for line in mixed.splitlines() if line.startswith("job"))
    assert "objective" in head and "ttft_mean_s" in mixed and "best, heuristic" not in mixed


# --------------------------------------------------------------------------------------------
# An interrupted multirun, in a subprocess
# --------------------------------------------------------------------------------------------

# 2 models x 2 workload kinds: an open-loop Poisson trace and a closed loop of 16 clients.
# "++": Hydra applies the other overrides to the config before it sweeps the workload group,
# when the workload is still the default trace, which has no num_requests to override.
SWEEP_ARGS = [
    "search",
    "-m",
    "model=llama3_1_8b,mistral_7b",
    "workload=poisson,closed_loop",
    "++workload.num_requests=32",
    "cluster=1x2",
    "plan_space=parallel_only",
    "report=false",
]


def _console_script() -> str:
    return str(Path(sys.executable).parent / "apex-jax")


def _markers(root: Path) -> list[Path]:
    return sorted(root.rglob(MARKER))


@pytest.mark.slow
def test_interrupted_multirun_completes_on_rerun_with_identical_results(tmp_path):
    sweep = tmp_path / "sweep"
    command = [_console_script(), *SWEEP_ARGS, f"hydra.sweep.dir={sweep}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=log, stderr=log, start_new_session=True
    )
    deadline = time.monotonic() + 900
    while len(_markers(sweep)) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, "the sweep ended before it could be interrupted"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in _markers(sweep)}
    assert 2 <= len(finished) < 4
    rerun = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert rerun.returncode == 0, rerun.stderr
    jobs = _markers(sweep)
    assert len(jobs) == 4
    # The jobs that had finished were skipped, not redone.
    assert rerun.stderr.count("finished earlier") == len(finished)
    for marker in jobs:
        if marker.parent.name in finished:
            assert marker.stat().st_mtime_ns == finished[marker.parent.name]
    configs = {
        m.parent: json.loads((m.parent / "summary.json").read_text())["config"] for m in jobs
    }
    crossed = {(c["model"]["name"], c["workload"]["kind"]) for c in configs.values()}
    assert crossed == {
        (model, kind)
        for model in ("meta-llama/Llama-3.1-8B", "mistralai/Mistral-7B-v0.1")
        for kind in ("poisson", "closed_loop")
    }
    # Every job's plans equal those of a fresh run of its config.
    for job, config in configs.items():
        fresh = tmp_path / "fresh" / job.name
        cli.search_from_config(config, fresh)
        assert (job / "plans.csv").read_text() == (fresh / "plans.csv").read_text(), job.name


@pytest.mark.slow
def test_a_sweep_runs_through_the_joblib_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    command = [
        _console_script(),
        "search",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "model=llama3_1_8b,mistral_7b",
        "workload=poisson",
        "workload.num_requests=8",
        "cluster=1x1",
        "plan_space=parallel_only",
        "report=false",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "Joblib.Parallel" in proc.stderr
    assert len(_markers(sweep)) == 2
    assert proc.stdout.count("ranked by e2e_mean_s") == 2


def test_a_goodput_report_says_at_which_rate_its_tables_are(tmp_path):
    goodput = {
        "trace_rate_req_s": 2.5,
        "rel_tol": 0.05,
        "num_rounds": 4,
        "num_evaluations": 40,
        "num_lower_bounds": 0,
        "max_in_flight_fraction": 0.5,
    }
    summary = {"objective": "goodput_req_s", "goodput": goodput, "status_counts": {}}
    write_report(tmp_path, summary, [], None)
    report = (tmp_path / "report.md").read_text()
    assert "is the plan's at the trace's own rate (2.5 req/s), not at its goodput" in report
    write_report(tmp_path, {"objective": "e2e_mean_s", "status_counts": {}}, [], None)
    assert "trace's own rate" not in (tmp_path / "report.md").read_text()


def test_validate_writes_its_predicted_vs_measured_figure(tmp_path, monkeypatch):
    def row(group: dict, measured: float, predicted: float) -> dict:
        return {**group, "ttft_mean_s_measured": measured, "ttft_mean_s_predicted": predicted}

    trace_rows = [row({"trace": "a"}, 0.1, 0.12), row({"trace": "b"}, 0.2, math.nan)]
    model_rows = [row({"model": "m", "precision": "fp8"}, 0.1, 0.3)]
    for rows in (trace_rows, model_rows, []):
        plot_validation(rows, tmp_path / VALIDATION_FIGURE, "title")
        assert (tmp_path / VALIDATION_FIGURE).read_bytes()[:8] == PNG_MAGIC
        (tmp_path / VALIDATION_FIGURE).unlink()
    # The command writes the figure beside validation.json.
    monkeypatch.setattr(cli, "run_benchmark_validation", lambda path, hw: {"rows": model_rows})
    monkeypatch.setattr(cli, "format_benchmark_validation", lambda report: "table")
    cli.validate_from_config(_compose_validate(["dataset=silicon_dev"]), tmp_path)
    assert (tmp_path / VALIDATION_FIGURE).read_bytes()[:8] == PNG_MAGIC
    assert json.loads((tmp_path / "validation.json").read_text())["rows"][0]["model"] == "m"


def _compose_validate(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="validate", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def test_validate_replays_a_file_of_either_kind_by_its_columns(tmp_path, monkeypatch):
    default = _compose_validate([])
    assert validation_file(default) == (False, bundled_path(DEFAULT_MEASUREMENTS))
    silicon = _compose_validate(["dataset=silicon_dev"])
    assert validation_file(silicon) == (True, bundled_path(SILICON_DEV))
    # A user's own benchmark runs in silicon_dev's columns, named without dataset=.
    lines = bundled_path(SILICON_DEV).read_text().splitlines()
    own = tmp_path / "my_runs.csv"
    own.write_text("\n".join(lines[:3]) + "\n")
    config = _compose_validate([f"measurements={own}"])
    assert validation_file(config) == (True, own)
    seen = []
    monkeypatch.setattr(
        cli, "run_benchmark_validation", lambda path, hw: seen.append(path) or {"rows": []}
    )
    monkeypatch.setattr(cli, "format_benchmark_validation", lambda report: "table")
    cli.validate_from_config(config, tmp_path)
    assert seen == [own]
    with pytest.raises(FileNotFoundError, match="no_such.csv not found"):
        validation_file(_compose_validate(["measurements=no_such.csv"]))
