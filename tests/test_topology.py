"""Multi-node clusters: stages that fill whole nodes, hierarchical collectives across nodes,
the printed placement, the trillion-parameter models and (slow) a scaled-down trillion
search end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from apex_jax.cli import search_from_config
from apex_jax.cost import kernels as K
from apex_jax.cost.iteration import cost_coeffs, cost_sources, iteration_time_s
from apex_jax.cost.parallel import group_nodes, placement
from apex_jax.hardware import default_hardware_params, get_gpu
from apex_jax.model_spec import load_model
from apex_jax.paths import config_dir
from apex_jax.plans import COL, PlanSpace, enumerate_plans, plan_row

H100 = get_gpu("H100-SXM-80GB")
MIXTRAL = load_model("mistralai/Mixtral-8x7B-v0.1")


def test_a_group_spans_the_nodes_its_contiguous_block_covers():
    assert group_nodes([1, 4, 8, 16, 64], 8).tolist() == [1, 1, 1, 2, 8]
    # Blocks of 4 GPUs on 6-GPU nodes: the second block straddles two nodes.
    assert group_nodes([4], 6).tolist() == [2]


def test_collectives_across_nodes_are_hierarchical():
    p = K.load_calibrated(H100.name)
    big = 1e9  # latencies are negligible next to the bandwidth terms
    # An all-to-all over 2 nodes of 8 sends 8 of 15 peers' shares over the network; over 16
    # nodes of one GPU all 15: the network part sets the time.
    two_nodes = float(K.collective_time_s(p, H100, "alltoall", big, 16, num_nodes=2))
    flat = float(K.collective_time_s(p, H100, "alltoall", big, 16, num_nodes=16))
    assert two_nodes / flat == pytest.approx(8 / 15, rel=0.01)
    # All-reduce: NVLink inside each node, 1/8 of the message per NIC between nodes.
    inside = float(K.collective_time_s(p, H100, "all_reduce", big, 8))
    across = [float(K.collective_time_s(p, H100, "all_reduce", big, 8 * n, num_nodes=n))
              for n in (2, 4, 16)]  # fmt: skip
    assert inside < across[0] < across[1] < across[2]
    assert across[0] < float(K.collective_time_s(p, H100, "all_reduce", big, 16, num_nodes=16))


def test_stages_fill_whole_nodes_only_when_allowed():
    shape = {"model": MIXTRAL, "num_gpus": 16, "gpus_per_node": 8}
    inside = enumerate_plans(PlanSpace(), **shape)
    spanning = enumerate_plans(PlanSpace(cross_node_stages=True), **shape)
    assert inside[:, COL["tp"]].max() == 8
    assert 16 in spanning[:, COL["tp"]].tolist()


def test_a_stage_across_nodes_pays_the_network_and_is_priced_by_the_model():
    plans = np.stack([plan_row({"tp": 16}), plan_row({"tp": 16, "mlp_tp": 16, "ep": 8})])
    hw = default_hardware_params()
    two_nodes = cost_coeffs(plans, MIXTRAL, H100, hw, gpus_per_node=8)
    one_node = cost_coeffs(plans, MIXTRAL, H100, hw, gpus_per_node=16)
    for tokens in (1.0, 64.0, 4096.0):
        args = (tokens, tokens, 0.0, tokens, 1000.0 * tokens)
        slower = iteration_time_s(two_nodes, *args, xp=np) > iteration_time_s(
            one_node, *args, xp=np
        )
        assert slower.all()
    sources = cost_sources(plans, MIXTRAL, H100, gpus_per_node=8)
    assert sources[0]["all_reduce"] == "model"
    assert sources[1]["alltoall"] == "model"


def test_placement_names_groups_inside_and_across_nodes():
    pipeline = placement(plan_row({"tp": 8, "pp": 2}), 8, MIXTRAL)
    assert "PP2: 1 of 1 stage transfers cross nodes" in pipeline
    assert "stage TP8 inside a node" in pipeline
    wide = placement(plan_row({"dp": 2, "tp": 16, "mlp_tp": 16, "ep": 8}), 8, MIXTRAL)
    assert "DP2: a replica spans 2 nodes" in wide
    assert "attn TP16 spans 2 nodes" in wide and "moe EP8 spans 2 nodes" in wide
    small = placement(plan_row({"dp": 4, "tp": 2}), 8, MIXTRAL)
    assert small.startswith("DP4: 4 replicas a node")


@pytest.mark.parametrize(
    ("name", "params_t", "experts"),
    [("llama3-1t", 1.02, 1), ("kimi-k2", 1.04, 384), ("llama3.1-405b", 0.406, 1)],
)
def test_trillion_class_models_are_built_in(name, params_t, experts):
    model = load_model(name)
    assert model.num_params / 1e12 == pytest.approx(params_t, abs=0.01)
    assert model.num_experts == experts


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["trillion_moe", "trillion_dense"])
def test_trillion_experiment_scaled_down_runs_end_to_end(experiment, tmp_path, capsys):
    overrides = [
        f"+experiment={experiment}",
        "cluster=4x8",
        "workload.num_requests=40",
        "plan_space.weight_dtype=[fp8]",
        "plan_space.kv_dtype=[fp8]",
        "report=false",
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        config = OmegaConf.to_container(
            compose(config_name="search", overrides=overrides), resolve=True
        )
    summary = search_from_config(config, tmp_path)
    out = capsys.readouterr().out
    assert summary["status_counts"].get("OK", 0) >= 1
    assert "placed on 8-GPU nodes: " in out
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["best"]["placement"] == summary["best"]["placement"]
    assert set(written["pruned"]) == {"dominated", "bounded", "symmetric", "identical_replicas"}
