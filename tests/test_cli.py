"""The Hydra commands: every config composes, the plain ``*_from_config`` functions, and the
real console script (a tiny multirun, usage, a one-line error)."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import apex_jax
from apex_jax.cli import (
    _deployment_args,
    _quiet_terminal,
    main,
    plan_space_from_config,
    precheck,
    search_from_config,
    simulate_from_config,
)
from apex_jax.deployment import make_deployment
from apex_jax.engine_config import DEFAULT_ENGINE, resolve_engine
from apex_jax.metrics import METRIC_KEYS
from apex_jax.paths import config_dir
from apex_jax.plan_space import build_plan_set
from apex_jax.workload import workload_from_dict

GROUPS = ("model", "hardware", "cluster", "workload", "engine", "plan_space")
COMMAND_GROUPS = {"search": GROUPS, "simulate": GROUPS[:-1]}
SUMMARY_KEYS = {
    "config",
    "objective",
    "objective_column",
    "slo",
    "workload",
    "goodput",
    "heuristic",
    "speedup_vs_heuristic",
    "num_plans",
    "plan_space",
    "status_counts",
    "timing_s",
    "num_lanes",
    "num_engine_calls",
    "pruned",
    "best",
    "status_reasons",
}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


def _compose(command: str, overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name=command, overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


COMPOSE_CASES = [
    pytest.param(command, group, option, id=f"{command}-{group}={option}")
    for command, groups in COMMAND_GROUPS.items()
    for group in groups
    for option in _options(group)
]


def test_every_group_has_options():
    for group in GROUPS:
        assert _options(group), f"conf/{group}/ is empty"


# The figures `hardware=custom` requires (an H100-like GPU under a name of its own).
CUSTOM_GPU = [
    "hardware.name=MyGPU-96GB",
    "hardware.peak_flops.fp32=5e14",
    "hardware.peak_flops.bf16=1e15",
    "hardware.hbm_bandwidth_bytes_per_s=4e12",
    "hardware.hbm_capacity_bytes=96e9",
    "hardware.nvlink_bandwidth_bytes_per_s=450e9",
    "hardware.network_bandwidth_bytes_per_s=50e9",
    "hardware.tdp_w=700",
    "hardware.idle_w=80",
    "hardware.max_clock_mhz=1900",
]


@pytest.mark.parametrize("command, group, option", COMPOSE_CASES)
def test_every_config_composes_and_resolves(command, group, option):
    extra = CUSTOM_GPU if (group, option) == ("hardware", "custom") else []
    config = _compose(command, [f"{group}={option}", *extra])
    assert set(COMMAND_GROUPS[command]) <= set(config)
    # The values must also mean something: resolve them as the command would.
    deployment = make_deployment(**_deployment_args(config))
    if group == "workload":
        assert workload_from_dict(config["workload"]).num_requests >= 1
    if command == "search":
        space = plan_space_from_config(config["plan_space"], deployment.engine.plan_knobs())
        assert len(build_plan_set(deployment, space)) >= 1
    else:
        assert {"dp", "tp", "pp"} <= set(config["plan"])


def test_defaults_compose_to_the_readme_default():
    config = _compose("search", [])
    assert config["model"]["name"] == "meta-llama/Llama-3.1-70B"
    assert config["hardware"]["name"] == "H100-SXM-80GB"
    assert (config["cluster"]["num_nodes"], config["cluster"]["gpus_per_node"]) == (1, 8)
    assert config["workload"]["kind"] == "trace"


# --------------------------------------------------------------------------------------------
# The plain functions behind the commands.
# --------------------------------------------------------------------------------------------

TINY_SEARCH = ["workload=static_batch", "plan_space=parallel_only"]


def _read_plans(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def tiny_search(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    config = _compose("search", TINY_SEARCH)
    summary = search_from_config(config, out)
    return config, summary, out


def test_search_writes_plans_csv_and_summary(tiny_search):
    config, summary, out = tiny_search
    assert set(summary) == SUMMARY_KEYS
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["config"] == config
    assert set(on_disk["timing_s"]) == {"wall_s", "compile_s", "run_s", "prepare_s"}
    assert on_disk["objective"] == "e2e_mean_s"
    rows = _read_plans(out / "plans.csv")
    assert len(rows) == on_disk["num_plans"] == sum(on_disk["status_counts"].values())
    assert list(rows[0])[:3] == ["rank", "status", "plan"]
    assert set(METRIC_KEYS) <= set(rows[0])
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    assert on_disk["best"]["plan"] == rows[0]["plan"]


def test_search_ranks_ok_plans_first_by_the_objective(tiny_search):
    _, summary, out = tiny_search
    rows = _read_plans(out / "plans.csv")
    statuses = [r["status"] for r in rows]
    # Llama-3.1-70B on 8 x H100: some plans fit, DP8 x TP1 cannot.
    assert "OK" in statuses and set(statuses) != {"OK"}
    num_ok = statuses.count("OK")
    assert statuses[:num_ok] == ["OK"] * num_ok
    values = [float(r["e2e_mean_s"]) for r in rows[:num_ok]]
    assert values == sorted(values)
    assert summary["best"]["status"] == "OK"


def test_search_maximises_throughput(tmp_path, capsys):
    config = _compose("search", [*TINY_SEARCH, "objective=throughput_out_tok_s"])
    search_from_config(config, tmp_path)
    assert "ranked by throughput_out_tok_s" in capsys.readouterr().out
    rows = [r for r in _read_plans(tmp_path / "plans.csv") if r["status"] == "OK"]
    values = [float(r["throughput_out_tok_s"]) for r in rows]
    assert len(values) >= 2 and values == sorted(values, reverse=True)


def test_simulate_prints_json_and_writes_result_json(capsys, tmp_path):
    config = _compose(
        "simulate", ["model=llama3_1_8b", "cluster=1x1", "workload=static_batch", "plan.tp=1"]
    )
    result = simulate_from_config(config, tmp_path)
    out, err = capsys.readouterr()
    printed = json.loads(out)
    assert printed["status"] == "OK" == result["status"]
    assert set(METRIC_KEYS) <= set(printed)
    for key in METRIC_KEYS:
        assert math.isclose(printed[key], result[key], rel_tol=1e-15)
    assert json.loads((tmp_path / "result.json").read_text()) == printed
    assert (tmp_path / "result.json").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert err.strip() == f"wrote {tmp_path / 'result.json'}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_cli_and_the_api_default_to_the_same_engine():
    engine = _compose("search", [])["engine"]
    assert (engine["name"], engine["version"]) == DEFAULT_ENGINE
    assert resolve_engine(None) == resolve_engine(
        {"name": engine["name"], "version": engine["version"]}
    )


def test_verbose_brings_info_back_to_the_terminal_only():
    root = logging.getLogger()
    terminal, log_file = logging.StreamHandler(), logging.FileHandler(os.devnull)
    root.addHandler(terminal)
    root.addHandler(log_file)
    try:
        _quiet_terminal(verbose=False)
        assert (terminal.level, log_file.level) == (logging.WARNING, logging.NOTSET)
        _quiet_terminal(verbose=True)
        assert terminal.level == logging.INFO
    finally:
        root.removeHandler(terminal)
        root.removeHandler(log_file)
        log_file.close()


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"apex-jax {apex_jax.__version__}"


# --------------------------------------------------------------------------------------------
# The console script, in a subprocess.
# --------------------------------------------------------------------------------------------


def _console_script() -> str:
    script = Path(sys.executable).parent / "apex-jax"
    found = str(script) if script.exists() else shutil.which("apex-jax")
    assert found, "the apex-jax console script is not installed (pip install -e .)"
    return found


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [_console_script(), *args],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_tiny_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _run(
        ["search", "-m", "hardware=h100,h200", *TINY_SEARCH, f"hydra.sweep.dir={sweep}"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    # Logs go to stderr; stdout holds the results tables only.
    assert "Launching 2 jobs" in proc.stderr and "[HYDRA]" not in proc.stdout
    # Job directories are named by their overrides, so a rerun finds them again.
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == [
        f"hardware={gpu},plan_space=parallel_only,workload=static_batch" for gpu in ("h100", "h200")
    ]
    gpus = []
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        assert set(summary) == SUMMARY_KEYS
        assert (job / "plans.csv").is_file() and (job / "done.json").is_file()
        gpus.append(summary["config"]["hardware"]["name"])
    assert gpus == ["H100-SXM-80GB", "H200-SXM-141GB"]


def test_no_arguments_prints_usage(tmp_path):
    proc = _run([], tmp_path)
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: apex-jax")
    assert "search" in proc.stdout and "simulate" in proc.stdout


def test_unknown_command_is_an_error_with_usage(tmp_path):
    proc = _run(["serach"], tmp_path)
    assert proc.returncode != 0
    assert "unknown command 'serach'" in proc.stderr and "usage:" in proc.stderr


def test_unknown_gpu_is_a_one_line_error(tmp_path):
    proc = _run(["simulate", "hardware.name=H1000", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "H1000" in lines[0] and "H100-SXM-80GB" in lines[0]


def test_a_ctrl_c_dropped_by_a_callback_still_stops_the_command(tmp_path):
    """Python drops an exception raised in a callback (XLA's garbage-collection hooks): the
    interrupt is raised again at the next phase, not lost. The process drops one on purpose
    during the precheck."""
    script = (
        "import signal, sys\n"
        "from apex_jax import cli\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "def dropped(*args):\n"
        "    try:\n"
        "        cli._RUN.on_sigint(signal.SIGINT, None)\n"
        "    except KeyboardInterrupt:\n"
        "        pass\n"
        "cli.precheck = dropped\n"
        "code = cli.main(sys.argv[1:])\n"
        "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, "search", *TINY_SEARCH],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 130, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("apex-jax search: interrupted while preparing the search"), last


def test_a_process_started_with_sigint_ignored_keeps_ignoring_it(tmp_path):
    script = (
        "import signal, sys\n"
        "from apex_jax import cli\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "def check(*args):\n"
        "    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN\n"
        "    raise ValueError('checked')\n"
        "cli.precheck = check\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, "search"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "apex-jax search: error: checked"


def _sigint_at_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_with_one_line_saying_what_was_done(tmp_path):
    proc = subprocess.Popen(
        # The default search: a tiny one can finish before a loaded machine delivers the signal.
        [_console_script(), "search", "verbose=true"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        # A test runner started in the background inherits SIGINT ignored; a user's shell
        # delivers Ctrl-C to a command whose SIGINT is at its default.
        preexec_fn=_sigint_at_default,
    )
    # The first log line means the command is running (past Python's start-up).
    assert proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("apex-jax search: interrupted while ")
    assert last.endswith("nothing was written")
    assert out == ""


def test_equivalent_plans_share_a_row_and_plans_csv_lists_each(tmp_path, capsys):
    # Eight requests never fill 128 sequences: max_num_seqs 128 and 256 behave the same.
    overrides = [*TINY_SEARCH, "+plan_space.max_num_seqs=[128,256]", "report=false"]
    search_from_config(_compose("search", overrides), tmp_path)
    out = capsys.readouterr().out
    rows = _read_plans(tmp_path / "plans.csv")
    ok = [r for r in rows if r["status"] == "OK"]
    # Of the 10 layouts, DP8 does not fit and the two with 2-GPU replicas (70.6 GB of weights
    # per GPU) leave a KV cache too short for 131,072 tokens, which vLLM refuses to start.
    assert len(ok) == 14
    leads = {r["equivalent_to_rank"] for r in ok}
    assert len(leads) == 7
    for lead in leads:
        pair = [r for r in ok if r["equivalent_to_rank"] == lead]
        assert {r["max_num_seqs"] for r in pair} == {"128", "256"}
        assert len({r["e2e_mean_s"] for r in pair}) == 1
    table = out.splitlines()
    ok_lines = [line for line in table if line.split()[:1] and line.split()[0].isdigit()]
    assert sum(" OK " in line for line in ok_lines) == 7
    assert all(line.split()[1] == "2" for line in ok_lines if " OK " in line)
    assert max(len(line) for line in table) <= 120


def test_the_table_fits_120_columns_with_every_optional_column():
    from apex_jax.search import TABLE_WIDTH, format_table

    plan = (
        "DP2 · PP2 · attn DP2×TP2 · moe EP2×TP2 · enc DP2×TP2 · W fp8 / KV fp8 / A bf16 · "
        "seqs 256 · budget 131072 · block 32 · mem 0.95 · {} MHz"
    )
    ranked = [
        {
            "rank": i + 1,
            "plan": plan.format(810 + i),
            "status": "OK" if i < 15 else "INFEASIBLE",
            "ttft_mean_s": 12.3456,
            "ttft_p99_s": 45.678,
            "tpot_mean_s": 0.1234,
            "e2e_mean_s": 1234.56,
            "throughput_out_tok_s": 12345.6,
            "energy_per_output_token_j": 123.45,
            "kv_gb_per_gpu": 123.4,
            "num_gpus": 16,
            "slo_attainment": 0.9876,
            "goodput_req_s": 123.45,
            "cost_per_mtok_usd": 1234.5,
            "ttft_p90_s": 1.0,
        }
        for i in range(20)
    ]
    table = format_table(ranked, 20, "ttft_p90_s")
    assert max(len(line) for line in table.splitlines()) <= TABLE_WIDTH
    assert "every plan below: DP2 · PP2" in table and "plan" in table


def test_a_key_of_a_swept_group_needs_plus_plus_and_says_so():
    sweep = ["-m", "workload=poisson,closed_loop", "model=llama3_1_8b", "cluster=1x2"]
    with pytest.raises(ValueError, match=r"workload.num_requests.*\+\+KEY=VALUE") as err:
        precheck("search", [*sweep, "workload.num_requests=16"])
    assert "\n" not in str(err.value)
    config = precheck("search", [*sweep, "++workload.num_requests=16"])
    assert config["workload"]["num_requests"] == 16
