"""Every bad input of issue #12, at the command line and at the Python API: each fails
before anything is simulated, with one line that names the input and what is accepted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import apex_jax
from apex_jax import api, cli
from apex_jax.deployment import make_case, make_deployment

SMALL = {
    "model": "llama3.1-8b",
    "hardware": "h100",
    "num_gpus": 1,
    "plan": {"tp": 1},
    "workload": {"kind": "static_batch", "batch_size": 2, "isl": 16, "osl": 4},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Malformed inputs on disk: traces in the wrong unit, and a model config."""
    root = tmp_path_factory.mktemp("bad_inputs")
    header = "request_id,arrival_s,prompt_tokens,output_tokens\n"
    records = [
        {"StartTimeOffset": 36.0 * i, "ContextTokens": 5, "GeneratedTokens": 2} for i in range(100)
    ]
    paths = {
        "jsonl_in_seconds": root / "seconds.jsonl",
        "epoch_ns_csv": root / "epoch.csv",
        "huge_arrival_csv": root / "huge.csv",
        "zero_heads_config": root / "config.json",
    }
    paths["jsonl_in_seconds"].write_text("".join(json.dumps(r) + "\n" for r in records))
    paths["epoch_ns_csv"].write_text(
        header + "a,1732860000000000000,8,4\nb,1732860000500000000,8,4\n"
    )
    paths["huge_arrival_csv"].write_text(header + "a,0,8,4\nb,1e308,8,4\n")
    config = {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "hidden_size": 256,
        "num_attention_heads": 0,
        "intermediate_size": 512,
        "vocab_size": 1000,
    }
    paths["zero_heads_config"].write_text(json.dumps(config))
    return paths


@pytest.fixture
def no_simulation(monkeypatch):
    """Any simulation fails the test: a bad input must be caught before one starts."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a simulation started")

    monkeypatch.setattr(cli, "run_search", forbidden)
    monkeypatch.setattr(api, "evaluate_cases", forbidden)


# (command-line arguments, a fragment of the one-line message). "{name}" is a file of the
# `files` fixture.
CLI_CASES = [
    (["search", "+foo=1"], "unknown key 'foo'; accepted keys: calibration, cluster"),
    (["search", "+prices.foo=1"], "unknown key 'prices.foo'"),
    (["search", "goodput.growth=0.5"], "goodput.growth must be > 1 (got 0.5)"),
    (["search", "objective=cost_per_mtok_usd", "hardware=b200"], "needs a price for B200"),
    (["search", "+plan.tp=2"], "unknown key 'plan' (a key of apex-jax simulate, not search)"),
    (["search", "+experiment=does_not_exist"], "experiment"),
    (["search", "top_k=-5"], "top_k must be >= 1 (got -5)"),
    (["search", "top_k=many"], "top_k must be an integer (got 'many')"),
    (
        ["search", "objective=e2e_meen_s"],
        "unknown objective 'e2e_meen_s': did you mean 'e2e_mean_s'?",
    ),
    (["search", "objective=slo_attainment"], "objective slo_attainment needs latency targets"),
    (["search", "objectve=e2e_mean_s"], "unknown key 'objectve' (did you mean 'objective'?)"),
    (["search", "cluster.num_nodes=0"], "cluster.num_nodes must be >= 1 (got 0)"),
    (["search", "+cluster.racks=2"], "unknown key 'cluster.racks'; cluster accepted keys"),
    (["search", "verbose=maybe"], "verbose must be true or false (got 'maybe')"),
    (["search", "model=llama9"], "unknown config option model=llama9; available: flan_t5_xxl"),
    (["search", "model.name=llama9"], "unknown model 'llama9'"),
    (["search", "+workload.rate=3"], "workload spec (trace): unknown key 'rate'"),
    (["search", "engine.max_num_seqs=-3"], "engine max_num_seqs must be >= 1 (got -3)"),
    (["search", "+plan_space.tpp=[2]"], "unknown plan_space keys ['tpp']"),
    (["search", "slo.ttft_s=-1"], "SLO ttft_s must be > 0 seconds (got -1.0)"),
    (["search", "calibration=no_such_fit"], "no_such_fit"),
    (["simulate", "hardware.name=H1000"], "unknown GPU 'H1000'"),
    (["simulate", "hardware=custom"], "hardware.name is required"),
    (["simulate", "plan.tp=3"], "tp=3 does not split"),
    (["simulate", "+plan.foo=1"], "unknown plan key 'foo'"),
    (["simulate", "workload.path={jsonl_in_seconds}"], "read in ns"),
    (["simulate", "workload.path={epoch_ns_csv}"], "years after time 0"),
    (["simulate", "workload.path={huge_arrival_csv}"], "years after time 0"),
    (["simulate", "model.name={zero_heads_config}"], "'num_attention_heads' must be >= 1, got 0"),
    (["validate", "gpu_memory_utilization=2"], "gpu_memory_utilization must be in [0.0, 1.0]"),
    (["validate", "measurements=no_such_file.csv"], "no_such_file.csv not found"),
    (["calibrate", "steps=-1"], "steps must be >= 1 (got -1)"),
    (["calibrate", "target=everything"], "target must be one of kernels, serving"),
    (["calibrate", "hardware.name=X9"], "unknown GPU 'X9'"),
]


@pytest.mark.parametrize(("args", "fragment"), CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_cli_bad_input_is_one_line_before_simulating(
    args, fragment, files, no_simulation, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    args = [a.format(**files) for a in args]
    assert cli.main(args) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert out == ""
    assert len(lines) == 1, err
    assert lines[0].startswith(f"apex-jax {args[0]}: error: ")
    assert fragment in lines[0]
    # Nothing ran: not even Hydra's run directory was made.
    assert not (tmp_path / "outputs").exists()


def test_the_unsorted_trace_warning_names_the_line(files, tmp_path, caplog):
    trace = tmp_path / "unsorted.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n2.0,8,4\n1.0,8,4\n")
    with caplog.at_level("WARNING"):
        make_case(**{**SMALL, "workload": {"kind": "trace", "path": str(trace)}})
    assert "line 3 arrives at 1 s, before line 2 at 2 s" in caplog.text


# (keyword overrides of SMALL, exception type, a fragment of its message).
API_CASES = [
    ({"num_gpus": "eight"}, TypeError, "num_gpus must be an integer >= 1 (got 'eight')"),
    ({"num_gpus": 0}, ValueError, "num_gpus must be >= 1 (got 0)"),
    ({"num_gpus": 2.5}, ValueError, "num_gpus must be an integer >= 1 (got 2.5)"),
    ({"gpus_per_node": 3, "num_gpus": 8}, ValueError, "gpus_per_node=3 must divide num_gpus=8"),
    ({"workload": None}, TypeError, "workload must be a workload dict"),
    ({"workload": "lmsis"}, ValueError, "unknown workload 'lmsis': give a conf/workload option"),
    ({"workload": {"kind": "trace"}}, ValueError, "missing key 'path'"),
    ({"model": 70}, TypeError, "model must be a model name"),
    ({"model": "llama9"}, ValueError, "unknown model 'llama9'"),
    ({"hardware": 100}, TypeError, "hardware must be a GPU name"),
    ({"hardware": "h1000"}, ValueError, "unknown GPU 'h1000'"),
    ({"plan": None}, TypeError, "plan must be a dict of plan columns"),
    ({"plan": {"tp": 1, "tq": 2}}, ValueError, "unknown plan key 'tq'"),
    ({"engine": "vllm_9"}, ValueError, "unknown engine 'vllm_9': give a conf/engine option"),
    ({"engine": {"name": "sglang"}}, ValueError, "unknown engine 'sglang'"),
    ({"slo": {"ttft_s": "fast"}}, TypeError, "slo ttft_s must be a number > 0 (got 'fast')"),
    ({"slo": {"ttft": 1.0}}, ValueError, "unknown SLO keys ['ttft']"),
]


@pytest.mark.parametrize(
    ("change", "error", "fragment"), API_CASES, ids=[str(c) for c, _, _ in API_CASES]
)
def test_api_bad_input_names_the_argument(change, error, fragment, no_simulation):
    with pytest.raises(error) as info:
        apex_jax.simulate(**{**SMALL, **change})
    message = str(info.value)
    assert fragment in message and "\n" not in message


@pytest.mark.parametrize(
    ("argument", "name", "fragment"),
    [
        ("workload", "jsonl_in_seconds", "read in ns"),
        ("workload", "epoch_ns_csv", "years after time 0"),
        ("workload", "huge_arrival_csv", "years after time 0"),
        ("model", "zero_heads_config", "'num_attention_heads' must be >= 1, got 0"),
    ],
)
def test_api_bad_files_name_the_field(argument, name, fragment, files, no_simulation):
    value = str(files[name])
    if argument == "workload":
        value = {"kind": "trace", "path": value}
    with pytest.raises(ValueError) as info:
        apex_jax.simulate(**{**SMALL, argument: value})
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_api_takes_the_command_lines_names_and_default_engine():
    by_option = make_deployment("llama3_1_70b", "h100", 8, "vllm_0_6_0")
    by_name = make_deployment("meta-llama/Llama-3.1-70B", "H100-SXM-80GB", 8)
    assert by_option == by_name
    assert by_name.engine.version == "0.6.0"
    case = make_case(**{**SMALL, "workload": "static_batch"})
    assert case.workload.name == "static_batch_b8_isl512_osl128"


def test_simulate_many_rejects_an_empty_list_and_unknown_modes():
    with pytest.raises(ValueError, match="at least one case"):
        apex_jax.simulate_many([])
    with pytest.raises(ValueError, match="errors must be one of raise, status"):
        apex_jax.simulate_many([SMALL], errors="ignore")


def test_simulate_many_names_the_bad_case(no_simulation):
    with pytest.raises(TypeError, match=r"^case 1: num_gpus must be an integer"):
        apex_jax.simulate_many([SMALL, {**SMALL, "num_gpus": "eight"}])


def test_simulate_many_can_keep_going_past_a_bad_case():
    results = apex_jax.simulate_many(
        [SMALL, {**SMALL, "workload": None}, {**SMALL, "plan": {"tp": 1, "dp": 2}}],
        errors="status",
    )
    assert [r["status"] for r in results] == ["OK", "INVALID", "INVALID"]
    assert results[1]["status_reason"].startswith("case 1: workload must be a workload dict")
    assert "needs 2 GPUs but num_gpus=1" in results[2]["status_reason"]
    assert math.isnan(results[1]["ttft_mean_s"])
    assert results[0]["ttft_mean_s"] > 0
