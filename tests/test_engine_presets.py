"""Mechanisms the engine presets carry beyond their defaults (the V1 sampler's sort), the
sources of their figures, and which preset a version string resolves to."""

from __future__ import annotations

import numpy as np
import pytest

from apex_jax.cost.iteration import iteration_time_s
from apex_jax.deployment import make_case
from apex_jax.engine_config import VERSION_COSTS, resolve_engine
from apex_jax.evaluate import case_coeffs
from apex_jax.hardware import default_hardware_params

MODEL, GPU = "Qwen/Qwen3-32B", "H100-SXM-80GB"
WORKLOAD = {"kind": "static_batch", "batch_size": 1, "isl": 16, "osl": 2}


def _iteration_s(engine, num_decoding):
    """One decode iteration of ``num_decoding`` sequences of 1,000 KV entries each."""
    case = make_case(MODEL, GPU, 2, {"tp": 2}, WORKLOAD, engine=engine)
    c = case_coeffs([case], default_hardware_params())
    n = float(num_decoding)
    return float(iteration_time_s(c, n, n, 0.0, n, 1000.0 * n, xp=np)[0])


def test_presets_sort_as_their_sampler_does():
    """The V1 presets sort each sampled sequence's logits (the model's top-k / top-p by
    default); vLLM 0.6.0 samples without them."""
    assert resolve_engine({"name": "vllm", "version": "0.6.0"}).sampler_sort_s_per_logit == 0.0
    for version in ("0.11.0", "0.12.0", "0.16.0", "0.18.0"):
        engine = resolve_engine({"name": "vllm", "version": version})
        sort_s = VERSION_COSTS[("vllm", version)].sampler_sort.seconds
        assert engine.sampler_sort_s_per_logit == sort_s > 0.0


@pytest.mark.parametrize("num_decoding", [1, 8, 128, 600])
def test_v1_sort_costs_every_sampled_sequences_vocabulary(num_decoding):
    """The sort adds its figure per sampled sequence and vocabulary entry to an iteration,
    at every batch size (the sampled curve's base and each slope), and nothing else."""
    v1 = {"name": "vllm", "version": "0.12.0"}
    sorted_s = _iteration_s(v1, num_decoding)
    unsorted_s = _iteration_s(v1 | {"sampler_sort_s_per_logit": 0.0}, num_decoding)
    rate = VERSION_COSTS[("vllm", "0.12.0")].sampler_sort.seconds
    vocab = 151936  # Qwen3-32B
    assert sorted_s - unsorted_s == pytest.approx(rate * vocab * num_decoding, rel=1e-9)


def test_each_preset_carries_its_versions_figures_with_their_sources():
    for (name, version), costs in VERSION_COSTS.items():
        engine = resolve_engine({"name": name, "version": version})
        assert engine.overhead_source() == costs.iteration_overhead
        assert engine.frontend_source() == costs.frontend_delay
        assert engine.host_costs() == costs.host
        # The 0.6 figures were chosen on the dev file; the V1 ones come from elsewhere.
        in_sample = version == "0.6.0"
        assert costs.iteration_overhead.is_in_sample == costs.host.is_in_sample == in_sample
    # A figure the user sets is theirs.
    own = resolve_engine({"name": "vllm", "version": "0.12.0", "frontend_delay_s": 0.5})
    assert own.frontend_source().source == "set by the user"
    # From 0.14 asynchronous scheduling hides part of the V1 overhead: the source says so.
    later = VERSION_COSTS[("vllm", "0.18.0")].iteration_overhead
    assert later.seconds == VERSION_COSTS[("vllm", "0.12.0")].iteration_overhead.seconds
    assert "asynchronous scheduling" in later.source


def test_a_patch_release_uses_its_minor_versions_preset():
    assert resolve_engine({"name": "vllm", "version": "0.11.2"}) == resolve_engine(
        {"name": "vllm", "version": "0.11.0"}
    )
    with pytest.raises(
        ValueError, match=r"no preset for vllm 0\.13\.1: known versions are .*0\.18\.0"
    ):
        resolve_engine({"name": "vllm", "version": "0.13.1"})
