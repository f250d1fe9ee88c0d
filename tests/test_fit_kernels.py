"""Calibration: a fit on synthetic data recovers known constants; the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from apex_jax import fit_kernels as C
from apex_jax.cost import kernels as K
from apex_jax.hardware import get_gpu


def test_fit_on_synthetic_data_recovers_known_constants():
    gpu = get_gpu("H100-SXM-80GB")
    truth = K.default_kernel_params()._replace(
        log_p2p_latency_s=np.log(11e-6),
        log_p2p_eff=np.log(0.55),
        log_network_eff=np.log(0.9),
        log_inter_node_latency_s=np.log(20e-6),
    )
    truth = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), truth)
    rng = np.random.default_rng(0)
    sizes = np.exp(rng.uniform(np.log(1e3), np.log(1e9), 600))
    inter = (rng.uniform(size=600) < 0.5).astype(np.float64)
    data = {"bytes": sizes, "inter_node": inter}
    clean = np.asarray(C.predict_operator_s("p2p", truth, gpu, data))
    data["time_s"] = clean * np.exp(rng.normal(0, 0.01, 600))
    fitted, losses = C.fit_params({"p2p": data}, gpu, steps=1500, learning_rate=0.05)
    assert losses[-1] < losses[0]
    for name in ("log_p2p_latency_s", "log_p2p_eff", "log_network_eff", "log_inter_node_latency_s"):
        np.testing.assert_allclose(
            np.exp(getattr(fitted, name)), np.exp(getattr(truth, name)), rtol=0.05, err_msg=name
        )


def test_shipped_fits_load_by_name():
    for name in ("h100", "H200-SXM-141GB", "a100"):
        p = K.load_calibrated(name)
        assert isinstance(p, K.KernelParams)
        assert np.isfinite(np.asarray(p.log_gemm_eff)).all()
    # No shipped fit: defaults.
    d = K.load_calibrated("a40")
    np.testing.assert_array_equal(
        np.asarray(d.log_gemm_eff), np.asarray(K.default_kernel_params().log_gemm_eff)
    )


def test_params_round_trip_through_json():
    p = K.load_calibrated("h100")
    back = K.params_from_json(json.loads(json.dumps(K.params_to_json(p))))
    for a, b in zip(p, back):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_folds_hold_out_whole_shapes():
    gpu = get_gpu("H100-SXM-80GB")
    datasets = C.operator_datasets(gpu.name)
    assert set(datasets) == set(C.OPERATORS)
    for op, data in datasets.items():
        folds = C.shape_folds(op, data, 5, seed=0)
        shapes = np.stack(C._shape_columns(op, data), axis=1)
        for fold in np.unique(folds):
            held = {tuple(r) for r in shapes[folds == fold]}
            seen = {tuple(r) for r in shapes[folds != fold]}
            assert held and not held & seen, (op, fold)
    # The elementwise shapes are the profiled models: a fold holds out whole models.
    models = datasets["elementwise"]["model"]
    folds = C.shape_folds("elementwise", datasets["elementwise"], 5, seed=0)
    for model in np.unique(models):
        assert len(np.unique(folds[models == model])) == 1


def test_decode_segments_reproduce_the_table_better_than_the_plane():
    """The engine's decode attention, piecewise linear in the KV entries, against every point
    of the H100 table, and the single plane it replaced (the README quotes both)."""
    error = C.decode_segments_error("h100")
    segments, plane = error["segments"], error["plane"]
    assert segments["n"] == plane["n"] > 30000
    assert segments["median_ape_pct"] < 2.0 and plane["median_ape_pct"] > 5.0
    assert segments["p90_ape_pct"] < 7.0 and plane["p90_ape_pct"] > 15.0
    assert segments["max_ape_pct"] < 30.0 < plane["max_ape_pct"]
    assert C.decode_segments_error("a40") is None  # no measured decode table


def test_calibrate_command_runs_end_to_end(tmp_path, capsys):
    from apex_jax.cli import calibrate_from_config

    config = {
        "hardware": {"name": "H100-SXM-80GB"},
        "target": "kernels",
        "operators": ["gemm", "decode_attention", "collectives"],
        "folds": 3,
        "max_rows_per_op": 600,
        "steps": 150,
        "plots": False,
    }
    report = calibrate_from_config(config, tmp_path)
    text = capsys.readouterr().out
    assert "median %" in text and "gemm" in text
    written = json.loads((tmp_path / "calibration_report.json").read_text())
    for op in ("gemm", "decode_attention", "collectives"):
        r = written["operators"][op]
        # Every row is predicted by the fold that held its shape out.
        assert r["n_heldout"] == 600 and r["n_shapes"] > 1
        assert np.isfinite(r["median_ape_pct"]) and r["p90_ape_pct"] >= r["median_ape_pct"]
    for name in K.COLLECTIVE_OPS:
        assert written["breakdown"][f"collectives/{name}"]["n_heldout"] > 0
        assert name in text
    # The quantised paths are reported on their own: fp8 GEMMs, attention over an fp8 KV cache.
    breakdown = written["breakdown"]
    assert breakdown["gemm/16-bit"]["n_heldout"] + breakdown["gemm/fp8"]["n_heldout"] == 600
    assert breakdown["gemm/fp8"]["n_heldout"] > 0 and "fp8" in text
    assert breakdown["decode_attention/fp8 KV"]["n_heldout"] > 0
    assert set(written["decode_segments"]) == {"plane", "segments"}
    assert "KV segments (now)" in text
    params = json.loads((tmp_path / report["params_file"]).read_text())
    assert set(params["params"]) == set(K.KernelParams._fields)


@pytest.mark.slow
def test_moe_heldout_error_stays_at_the_recorded_figure():
    """The fused-MoE model on whole MoE configurations held out of the fit (H100): the
    median error stays within a tenth of the figure the shipped fit and the README record,
    and under the issue's 10% target."""
    result = C.calibrate("h100", operators=["moe"])
    median = result["operators"]["moe"]["median_ape_pct"]
    shipped = json.loads((K.calibrated_dir() / "H100-SXM-80GB.json").read_text())
    recorded = shipped["heldout"]["moe"]["median_ape_pct"]
    assert median <= min(1.1 * recorded, 10.0), (median, recorded)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"| fused MoE | {recorded:.1f}% |" in readme
    # Skewed routing with expert parallelism: the busiest rank's load predicts it better
    # than even routing would.
    skewed = [result["breakdown"][f"moe/EP, power law: {load} load"] for load in ("rank", "even")]
    assert skewed[0]["n_heldout"] > 5000
    assert skewed[0]["median_ape_pct"] < skewed[1]["median_ape_pct"]
    # Constants of the operators not fitted are the shipped ones.
    shipped_params = K.load_calibrated("h100")
    np.testing.assert_array_equal(
        np.asarray(result["params"].log_gemm_eff), np.asarray(shipped_params.log_gemm_eff)
    )
