"""The speed scripts run end to end on a tiny case, so they cannot rot (their figures are
measured by running them, not asserted here)."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _run(script: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_bench_splits_time_and_compares_the_same_plans_with_the_reference():
    line = _run(
        "bench.py",
        *("--model", "meta-llama/Llama-3.1-8B", "--num-gpus", "2", "--requests", "24"),
        *("--plan-space", "parallel_only", "--reference-plans", "2", "--no-scaling"),
    )
    out = json.loads(line.strip().splitlines()[-1])
    assert out["plans_ok"] >= 2
    assert set(out["split_s"]) == {"cost", "memory_and_lanes", "compile", "simulate", "metrics"}
    assert sum(out["split_s"].values()) == pytest.approx(out["wall_s"], abs=0.05)
    per_plan = out["ms_per_plan"]
    assert 0 < per_plan["without_compile"] < per_plan["with_compile"]
    speedup = out["speedup_vs_reference"]
    assert speedup["sample_plans"] == 2
    assert 0 < speedup["with_compile"] < speedup["without_compile"]


@pytest.mark.slow
def test_scaling_writes_its_figure_and_csv(tmp_path):
    png = tmp_path / "scaling.png"
    _run(
        "scaling.py",
        *("--models", "meta-llama/Llama-3.1-8B", "--model-gpus", "2", "--gpus"),
        *("--requests", "8", "--out", str(png)),
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((tmp_path / "scaling.csv").open()))
    assert [(r["axis"], r["num_gpus"]) for r in rows] == [("model", "2")]
    assert float(rows[0]["wall_s"]) > 0 and int(rows[0]["num_plans"]) > 0


def test_prefill_bound_prints_every_vllm_dense_run_and_a_summary_per_model():
    lines = _run("prefill_bound.py").strip().splitlines()
    summaries = [line for line in lines if " runs, median " in line]
    runs = [line for line in lines[1:] if line not in summaries]
    assert len(runs) == 114
    assert {s.split(":")[0] for s in summaries} == {
        "Qwen/Qwen3-32B bf16",
        "Qwen/Qwen3-32B fp8",
        "nvidia/Llama-3.1-8B-Instruct-FP8 fp8",
    }
    shares = [[float(x) for x in line.split()[-2:]] for line in runs]
    assert all(0.0 < without <= share < 10.0 for share, without in shares)


def _prefill_bound():
    spec = importlib.util.spec_from_file_location("prefill_bound", SCRIPTS / "prefill_bound.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prefill_bound_takes_the_decoding_sequences_kv_read_out_of_the_step():
    # Llama-3.1-8B on two H200s, bf16 KV: 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes
    # = 131,072 bytes per token, half of it per GPU. 1 s per request of which 0.99 s decode
    # (TTFT 10 ms, 99 steps of 10 ms), so 8 x 0.99 clients decode at 1,000 + 50 tokens each.
    run = {
        "model": "meta-llama/Llama-3.1-8B",
        "gpu": "H200-SXM-141GB",
        "tp": "2",
        "weight_dtype": "fp8",
        "kv_dtype": "bf16",
        "concurrency": "8",
        "isl": "1000",
        "osl": "100",
        "ttft_mean_s": "0.01",
        "tpot_mean_s": "0.01",
    }
    bound = _prefill_bound()
    share, without = bound.peak_share(run), bound.peak_share(run, with_kv_read=False)
    kv_read_s = 8 * 0.99 * 1050 * 131_072 / 2 / 4.8e12
    weights_s = _weights_s(bound, run)
    # The same prefill FLOPs in less time: the shares scale inversely with the time left.
    assert share / without == pytest.approx((0.01 - weights_s) / (0.01 - weights_s - kv_read_s))
    # With one output token nothing decodes, so there is no KV read to take out.
    single = run | {"osl": "1"}
    assert bound.peak_share(single) == bound.peak_share(single, with_kv_read=False)


def _weights_s(bound, run) -> float:
    """One read of the run's fp8 layer weights at the GPU's peak HBM bandwidth."""
    model, gpu = bound.resolve_model(run["model"]), bound.resolve_gpu(run["gpu"])
    layer_bytes = model.num_layers * model.params_per_layer / int(run["tp"])
    return layer_bytes / gpu.hbm_bandwidth_bytes_per_s


@pytest.mark.slow
def test_iteration_overhead_reads_one_models_runs_as_validate_replays_them():
    # The one Llama-3.1-8B-FP8 run of at most 16 clients (TP1, ISL 8,000), with its pool.
    lines = _run(
        "iteration_overhead.py",
        *("--model", "nvidia/Llama-3.1-8B-Instruct-FP8", "--precision", "fp8"),
        *("--max-concurrency", "16"),
    ).splitlines()
    assert lines[-1].startswith("1 runs: median overhead ")
    assert lines[1].split()[:4] == ["1", "8000", "100", "16"]


def test_harness_variants_changes_only_the_pool_warm_up_and_length_columns():
    spec = importlib.util.spec_from_file_location("harness", SCRIPTS / "harness_variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = {"concurrency": "8", "num_requests": "80", "num_prompts": "0"}
    run |= {"num_warmup_requests": "16"}
    assert module._harness(run, "default") == (run, 0)
    nvidia, skip = module._harness(run, "nvidia_cache_on")
    assert (nvidia["num_prompts"], nvidia["num_warmup_requests"], skip) == ("96", "16", 0)
    assert module._harness(run, "pool_with_warmup") == (run, 0)
    pooled = run | {"num_prompts": "100", "num_warmup_requests": "0"}
    assert module._harness(pooled, "pool_with_warmup")[0]["num_warmup_requests"] == "16"
    undrained, skip = module._harness(run, "undrained")
    assert (undrained["num_requests"], undrained["num_warmup_requests"], skip) == ("96", "0", 16)
    inferencex, skip = module._harness(pooled, "inferencex_random")
    assert inferencex == run | {"num_warmup_requests": "0", "range_ratio": "0.8"} and skip == 0
    # The first row (Qwen3-32B bf16, TP2, 1,024 + 128 tokens, 8 clients): without its cold
    # measured burst the predicted TTFT falls further under the measured one.
    default = module.group_mape("default", max_rows=1)["all dense"]
    without_burst = module.group_mape("undrained", max_rows=1)["all dense"]
    assert default["num_rows"] == without_burst["num_rows"] == 1
    assert without_burst["ttft_mean_s"] > default["ttft_mean_s"]
