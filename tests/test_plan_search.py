"""Searching the full plan space: the JAX engine against the reference on every new plan
kind, encoder-decoder searches end to end, and the plan-space summary of the CLI."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from apex_jax.cli import search_from_config
from apex_jax.deployment import make_case
from apex_jax.evaluate import case_coeffs, evaluate_cases
from apex_jax.hardware import default_hardware_params
from apex_jax.model_spec import load_model
from apex_jax.paths import config_dir

WORKLOAD = {
    "kind": "poisson",
    "num_requests": 48,
    "rate_per_s": 6.0,
    "prompt_tokens": {"dist": "uniform", "low": 32, "high": 600},
    "output_tokens": {"dist": "uniform", "low": 4, "high": 120},
    "seed": 3,
}
ASR = {"kind": "poisson", "num_requests": 40, "rate_per_s": 8.0, "prompt_tokens": 1500,
       "output_tokens": {"dist": "uniform", "low": 10, "high": 100}, "seed": 5}  # fmt: skip

LLAMA_8B = "meta-llama/Llama-3.1-8B"
MIXTRAL = "mistralai/Mixtral-8x7B-v0.1"
WHISPER = "openai/whisper-large-v3"

# (model, num_gpus, plan, the classic plan it is a variant of), one per new plan kind.
KINDS = {
    "attention-dp": (LLAMA_8B, 8, {"tp": 8, "attn_tp": 2}, {"tp": 8}),
    "ffn-dp": (LLAMA_8B, 8, {"dp": 2, "tp": 4, "mlp_tp": 1}, {"dp": 2, "tp": 4}),
    "moe-ep": (MIXTRAL, 8, {"tp": 8, "mlp_tp": 8, "ep": 8}, {"tp": 8}),
    "moe-ep-x-tp": (MIXTRAL, 8, {"tp": 8, "attn_tp": 4, "ep": 2}, {"tp": 8}),
    "uneven-pp": (LLAMA_8B, 6, {"tp": 2, "pp": 3}, {"tp": 2, "pp": 2}),
    "pp-cells": (LLAMA_8B, 8, {"tp": 4, "pp": 2, "attn_tp": 1}, {"tp": 4, "pp": 2}),
    "clock": (LLAMA_8B, 2, {"tp": 2, "gpu_clock_mhz": 810}, {"tp": 2}),
    "encoder-decoder": (WHISPER, 4, {"tp": 4, "enc_tp": 1, "attn_tp": 2}, {"tp": 4}),
}


def _case(model, num_gpus, plan, workload=None):
    if model == WHISPER:
        workload = workload or ASR
    return make_case(
        model,
        "H100-SXM-80GB",
        num_gpus,
        plan,
        workload or WORKLOAD,
        engine={"name": "vllm", "version": "0.6.0"},
    )


@pytest.fixture(scope="module")
def kind_cases():
    return {name: _case(m, g, plan) for name, (m, g, plan, _) in KINDS.items()}


def test_jax_engine_matches_the_reference_on_every_plan_kind(kind_cases):
    skewed = dataclasses.replace(load_model(MIXTRAL), moe_routing_skew=0.4)
    cases = list(kind_cases.values()) + [_case(skewed, 8, {"tp": 8, "mlp_tp": 8, "ep": 4})]
    fast, _ = evaluate_cases(cases)
    slow, _ = evaluate_cases(cases, use_reference=True)
    for name, a, b in zip([*kind_cases, "moe-skew"], fast, slow):
        assert a["status"] == b["status"] == "OK", name
        for key in ("ttft_mean_s", "tpot_p99_s", "e2e_sum_s", "num_iters_max_replica"):
            assert abs(a[key] - b[key]) <= 1e-9 * abs(b[key]), (name, key)


def _rows(coeffs):
    """``[C, F]``: every case's constants, slope vectors flattened."""
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(coeffs)]
    return np.concatenate([x.reshape(len(x), -1) for x in leaves], axis=1)


def test_new_plan_kinds_cost_differently_from_their_classic_plan(kind_cases):
    """Each kind changes the iteration cost (or the differential test would not cover it)."""
    classic = [_case(m, g, base) for m, g, _, base in KINDS.values()]
    hw = default_hardware_params()
    new = _rows(case_coeffs(list(kind_cases.values()), hw))
    old = _rows(case_coeffs(classic, hw))
    for name, a, b in zip(KINDS, new, old):
        assert not np.allclose(a, b, rtol=1e-6), name


def _compose(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="search", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=flan_t5_xxl", "workload=static_batch"],
        ["model=whisper_large_v3", "workload=asr", "workload.num_requests=48"],
    ],
    ids=["flan-t5-xxl", "whisper-large-v3"],
)
def test_encoder_decoder_search_runs_end_to_end(overrides, tmp_path, capsys):
    space = ["plan_space=parallel_only", "plan_space.enc_dp=null", "cluster=1x4"]
    config = _compose([*overrides, *space, "plan_space_summary=true"])
    summary = search_from_config(config, tmp_path)
    out = capsys.readouterr().out
    assert "Plans per axis value" in out and "encoder" in out
    assert summary["status_counts"].get("OK", 0) >= 2
    assert " enc " in f" {summary['best']['plan']}"
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["plan_space"]["num_plans"] == summary["num_plans"]
