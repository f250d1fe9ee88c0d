"""Fit :class:`~apex_jax.cost.kernels.KernelParams` to one GPU's measured kernel tables with optax.

``apex-jax calibrate hardware=h100`` (or :func:`calibrate_from_config`):

1. loads every bundled table of the GPU (:mod:`apex_jax.cost.tables`) as one dataset per
   operator: GEMM, prefill attention, decode attention, fused MoE, collectives, p2p and the
   elementwise operators of Vidur's layer profiles;
2. holds out a random fraction of each dataset (``heldout_fraction``, seeded);
3. minimises a pseudo-Huber loss of ``log(predicted / measured)`` (close to its mean absolute
   value) per operator, summed over operators, with Adam over the log-space constants (full batch, one jit-compiled loop);
4. reports the absolute percentage error on the held-out points per operator (median, p90,
   count), writes the fitted constants as JSON, ``calibration_report.json`` and, when
   matplotlib is installed, one predicted-vs-measured plot per operator.

The fitted constants load by GPU name with :func:`apex_jax.cost.kernels.load_calibrated`, which
the cost model uses; this module is only needed to fit them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from apex_jax.cost import kernels as K
from apex_jax.cost import tables as ct
from apex_jax.hardware import GpuSpec, get_gpu

__all__ = [
    "OPERATORS",
    "calibrate",
    "calibrate_from_config",
    "fit_params",
    "format_report",
    "operator_datasets",
    "predict_operator_s",
    "split_heldout",
]

OPERATORS: tuple[str, ...] = (
    "gemm",
    "prefill_attention",
    "decode_attention",
    "moe",
    "collectives",
    "p2p",
    "elementwise",
)
# Vidur's elementwise operators, in the order of the ``kind`` code of the elementwise dataset.
_ELEMENTWISE = ("input_layernorm", "post_attention_layernorm", "attn_rope", "mlp_act", "add", "emb")

Dataset = dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


def _gemm_dataset(gpu_name: str) -> Dataset:
    t = ct.load_gemm(gpu_name)
    return {
        "m": t["m"],
        "n": t["n"],
        "k": t["k"],
        "fp8": (t["dtype"] == "fp8").astype(np.float64),
        "time_s": t["time_s"],
    }


def _prefill_dataset(gpu_name: str) -> Dataset:
    t = ct.load_context_attention(gpu_name)
    return {
        "batch": t["batch"],
        "seq_len": t["isl"],
        "heads": t["heads"],
        "kv_heads": t["kv_heads"],
        "head_dim": t["head_dim"],
        "kv_bytes": np.where(t["kv_dtype"] == "fp8", 1.0, 2.0),
        "time_s": t["time_s"],
    }


def _decode_dataset(gpu_name: str) -> Dataset:
    t = ct.load_generation_attention(gpu_name)
    return {
        "batch": t["batch"],
        "kv_tokens": t["batch"] * t["kv_len"],
        "heads": t["heads"],
        "kv_heads": t["kv_heads"],
        "head_dim": t["head_dim"],
        "kv_bytes": np.where(t["kv_dtype"] == "fp8", 1.0, 2.0),
        "time_s": t["time_s"],
    }


def _moe_dataset(gpu_name: str) -> Dataset:
    t = ct.load_moe(gpu_name)
    keep = np.isin(t["dtype"], ["bf16", "fp8"])
    return {
        "tokens": t["tokens"][keep],
        "hidden": t["hidden"][keep],
        "inter": t["inter"][keep],
        "topk": t["topk"][keep],
        "experts": t["experts"][keep],
        "tp": t["tp"][keep],
        "ep": t["ep"][keep],
        "fp8": (t["dtype"][keep] == "fp8").astype(np.float64),
        "time_s": t["time_s"][keep],
    }


def _collective_dataset(gpu_name: str) -> Dataset:
    t = ct.load_collectives(gpu_name)
    op = np.array([K.COLLECTIVE_OPS.index(o) for o in t["op"]], np.float64)
    return {
        "op": op,
        "bytes": t["bytes"],
        "num_gpus": t["num_gpus"],
        "num_nodes": t["num_nodes"],
        "time_s": t["time_s"],
    }


def _p2p_dataset(gpu_name: str) -> Dataset:
    t = ct.load_p2p(gpu_name)
    return {"bytes": t["bytes"], "inter_node": t["inter_node"], "time_s": t["time_s"]}


def _elementwise_dataset(gpu_name: str, models: Sequence[str] | None = None) -> Dataset:
    parts = []
    for model in models if models is not None else ct.vidur_models(gpu_name):
        t = ct.load_vidur_mlp(gpu_name, model)
        head_dim = t["hidden"] / t["heads"]
        for code, op in enumerate(_ELEMENTWISE):
            time_s = t[f"{op}_s"]
            ok = np.isfinite(time_s) & (time_s > 0)
            parts.append(
                {
                    "kind": np.full(int(ok.sum()), float(code)),
                    "tokens": t["tokens"][ok],
                    "hidden": t["hidden"][ok],
                    "heads": (t["heads"] / t["tp"])[ok],
                    "kv_heads": np.maximum(t["kv_heads"] / t["tp"], 1.0)[ok],
                    "head_dim": head_dim[ok],
                    "inter": (t["inter"] / t["tp"])[ok],
                    "gated": t["gated"][ok],
                    "time_s": time_s[ok],
                }
            )
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


_LOADERS: dict[str, Callable[[str], Dataset]] = {
    "gemm": _gemm_dataset,
    "prefill_attention": _prefill_dataset,
    "decode_attention": _decode_dataset,
    "moe": _moe_dataset,
    "collectives": _collective_dataset,
    "p2p": _p2p_dataset,
    "elementwise": _elementwise_dataset,
}
_TABLE_OF = {
    "gemm": "gemm",
    "prefill_attention": "context_attention",
    "decode_attention": "generation_attention",
    "moe": "moe",
    "collectives": "collectives",
    "p2p": "p2p",
    "elementwise": "vidur_mlp",
}


def operator_datasets(gpu_name: str, operators: Sequence[str] | None = None) -> dict[str, Dataset]:
    """Every measured dataset of a GPU, by operator (times in seconds, sizes in bytes)."""
    available = set(ct.available_tables(gpu_name))
    chosen = OPERATORS if operators is None else tuple(operators)
    unknown = sorted(set(chosen) - set(OPERATORS))
    if unknown:
        raise ValueError(f"unknown operators {unknown}: choose from {', '.join(OPERATORS)}")
    out = {}
    for op in chosen:
        if _TABLE_OF[op] in available:
            data = _LOADERS[op](gpu_name)
            keep = np.isfinite(data["time_s"]) & (data["time_s"] > 0)
            out[op] = {k: v[keep] for k, v in data.items()}
    if not out:
        raise ValueError(f"no measured kernel tables for {gpu_name}")
    return out


def split_heldout(
    data: Dataset, fraction: float, seed: int, max_train: int | None = None
) -> tuple[Dataset, Dataset]:
    """Random ``(train, heldout)`` split of a dataset; ``max_train`` subsamples the training
    part (to bound fit time)."""
    n = len(data["time_s"])
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    num_held = round(n * fraction) if n > 1 else 0
    held, train = order[:num_held], order[num_held:]
    if max_train is not None and len(train) > max_train:
        train = train[:max_train]
    return {k: v[train] for k, v in data.items()}, {k: v[held] for k, v in data.items()}


# --------------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------------


def _gemm_dtypes(gpu: GpuSpec) -> tuple[str, str]:
    """(16-bit, fp8) compute formats of the GEMM table rows of a GPU."""
    sixteen = "bf16" if gpu.peak_flops["bf16"] >= gpu.peak_flops["fp16"] else "fp16"
    fp8 = "fp8" if gpu.peak_flops["fp8"] > gpu.peak_flops[sixteen] else sixteen
    return sixteen, fp8


def predict_operator_s(op: str, p: K.KernelParams, gpu: GpuSpec, d: Mapping[str, Any]):
    """Predicted seconds of every row of an operator dataset (see :func:`operator_datasets`)."""
    if op == "gemm":
        sixteen, fp8 = _gemm_dtypes(gpu)
        a = K.gemm_time_s(p, gpu, d["m"], d["n"], d["k"], compute_dtype=sixteen)
        b = K.gemm_time_s(p, gpu, d["m"], d["n"], d["k"], compute_dtype=fp8, weight_bytes=1.0)
        return jnp.where(d["fp8"] > 0, b, a)
    if op == "prefill_attention":
        return K.prefill_attention_time_s(
            p,
            gpu,
            d["batch"],
            d["seq_len"],
            d["heads"],
            d["kv_heads"],
            d["head_dim"],
            kv_bytes=d["kv_bytes"],
        )
    if op == "decode_attention":
        return K.decode_attention_time_s(
            p,
            gpu,
            d["batch"],
            d["kv_tokens"],
            d["heads"],
            d["kv_heads"],
            d["head_dim"],
            kv_bytes=d["kv_bytes"],
        )
    if op == "moe":
        sixteen, fp8 = _gemm_dtypes(gpu)
        args = (p, gpu, d["tokens"], d["hidden"], d["inter"], d["topk"], d["experts"])
        a = K.moe_time_s(*args, tp=d["tp"], ep=d["ep"], compute_dtype=sixteen)
        b = K.moe_time_s(*args, tp=d["tp"], ep=d["ep"], compute_dtype=fp8, weight_bytes=1.0)
        return jnp.where(d["fp8"] > 0, b, a)
    if op == "collectives":
        out = jnp.zeros(jnp.shape(d["bytes"]))
        for i, name in enumerate(K.COLLECTIVE_OPS):
            t = K.collective_time_s(
                p, gpu, name, d["bytes"], d["num_gpus"], num_nodes=d["num_nodes"]
            )
            out = jnp.where(d["op"] == i, t, out)
        return out
    if op == "p2p":
        return K.p2p_time_s(p, gpu, d["bytes"], inter_node=d["inter_node"] > 0)
    if op == "elementwise":
        tok = d["tokens"]
        options = (
            K.norm_time_s(p, gpu, tok, d["hidden"]),
            K.norm_time_s(p, gpu, tok, d["hidden"]),
            K.rope_time_s(p, gpu, tok, d["heads"], d["kv_heads"], d["head_dim"]),
            K.activation_time_s(p, gpu, tok, d["inter"], gated=d["gated"] > 0),
            K.add_time_s(p, gpu, tok, d["hidden"]),
            K.embedding_time_s(p, gpu, tok, d["hidden"]),
        )
        out = options[0]
        for code, t in enumerate(options):
            out = jnp.where(d["kind"] == code, t, out)
        return out
    raise ValueError(f"unknown operator {op!r}")


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


# Scale of the pseudo-Huber loss on log errors: quadratic below ~2%, absolute above, so
# that the fit targets the median error and a few pathological kernels do not dominate.
_LOSS_SCALE = 0.02


def _loss(p: K.KernelParams, gpu: GpuSpec, train: Mapping[str, Dataset]):
    total = 0.0
    for op, d in train.items():
        r = jnp.log(predict_operator_s(op, p, gpu, d)) - jnp.log(d["time_s"])
        total = total + jnp.mean(jnp.sqrt(r**2 + _LOSS_SCALE**2) - _LOSS_SCALE)
    return total


def fit_params(
    train: Mapping[str, Dataset],
    gpu: GpuSpec,
    init: K.KernelParams | None = None,
    *,
    steps: int = 1500,
    learning_rate: float = 0.05,
) -> tuple[K.KernelParams, np.ndarray]:
    """Fit the kernel constants to training data; returns ``(params, loss per step)``.

    Adam with a cosine-decayed step size over all constants, full batch, in one jit-compiled
    ``lax.scan``. Constants of operators absent from ``train`` keep their initial values.
    """
    params = K.default_kernel_params() if init is None else init
    data = {op: {k: jnp.asarray(v) for k, v in d.items()} for op, d in train.items()}
    schedule = optax.cosine_decay_schedule(learning_rate, steps, alpha=0.02)
    optimiser = optax.adam(schedule)

    @jax.jit
    def run(params, data):
        loss_and_grad = jax.value_and_grad(lambda q: _loss(q, gpu, data))

        def step(carry, _):
            q, state = carry
            value, grad = loss_and_grad(q)
            updates, state = optimiser.update(grad, state, q)
            return (optax.apply_updates(q, updates), state), value

        (params, _), losses = jax.lax.scan(step, (params, optimiser.init(params)), None, steps)
        return params, losses

    fitted, losses = run(params, data)
    return fitted, np.asarray(losses)


def _ape_pct(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    return 100.0 * np.abs(predicted - measured) / measured


def calibrate(
    gpu_name: str,
    *,
    operators: Sequence[str] | None = None,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    steps: int = 1500,
    learning_rate: float = 0.05,
    max_train_per_op: int | None = 20000,
    max_rows_per_op: int | None = None,
) -> dict[str, Any]:
    """Fit one GPU's kernel constants and measure the held-out error.

    Args:
        gpu_name: catalog GPU name or alias.
        operators: subset of :data:`OPERATORS` (default: every one with a table).
        heldout_fraction: fraction of each dataset kept out of the fit.
        seed: seed of the split.
        steps: Adam steps.
        learning_rate: peak Adam step size.
        max_train_per_op: at most this many training rows per operator (random subsample).
        max_rows_per_op: subsample each dataset to at most this many rows first (for tests).

    Returns:
        A dict with ``gpu``, ``params`` (:class:`~apex_jax.cost.kernels.KernelParams`),
        ``operators`` (per operator ``median_ape_pct``, ``p90_ape_pct``, ``n_heldout``,
        ``n_train``), ``heldout`` (per operator measured / predicted arrays), ``losses`` and
        ``fit_s``.
    """
    gpu = get_gpu(gpu_name)
    datasets = operator_datasets(gpu.name, operators)
    train, held = {}, {}
    for i, (op, data) in enumerate(datasets.items()):
        if max_rows_per_op is not None and len(data["time_s"]) > max_rows_per_op:
            pick = np.random.default_rng(seed + 100 + i).permutation(len(data["time_s"]))
            data = {k: v[pick[:max_rows_per_op]] for k, v in data.items()}
        train[op], held[op] = split_heldout(data, heldout_fraction, seed + i, max_train_per_op)
    start = time.perf_counter()
    params, losses = fit_params(train, gpu, steps=steps, learning_rate=learning_rate)
    fit_s = time.perf_counter() - start
    report_ops, heldout = {}, {}
    for op, d in held.items():
        measured = d["time_s"]
        predicted = (
            np.asarray(predict_operator_s(op, params, gpu, d)) if len(measured) else measured
        )
        ape = _ape_pct(predicted, measured)
        report_ops[op] = {
            "median_ape_pct": float(np.median(ape)) if len(ape) else math.nan,
            "p90_ape_pct": float(np.percentile(ape, 90)) if len(ape) else math.nan,
            "n_heldout": len(ape),
            "n_train": len(train[op]["time_s"]),
        }
        heldout[op] = {"measured_s": measured, "predicted_s": predicted}
    return {
        "gpu": gpu.name,
        "params": params,
        "operators": report_ops,
        "heldout": heldout,
        "losses": losses,
        "fit_s": fit_s,
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

# Targets of the issue for the H100 (median APE on held-out points, %).
TARGETS_PCT: dict[str, float] = {
    "gemm": 10.0,
    "prefill_attention": 10.0,
    "decode_attention": 10.0,
    "collectives": 15.0,
}


def format_report(result: Mapping[str, Any]) -> str:
    """The per-operator held-out error table."""
    lines = [
        f"kernel calibration for {result['gpu']}: absolute percentage error on held-out points",
        f"{'operator':<20} {'median %':>9} {'p90 %':>8} {'n held':>7} {'n fit':>7}  target",
    ]
    for op, r in result["operators"].items():
        target = TARGETS_PCT.get(op)
        verdict = ""
        if target is not None:
            verdict = f"<= {target:g}% {'met' if r['median_ape_pct'] <= target else 'MISSED'}"
        lines.append(
            f"{op:<20} {r['median_ape_pct']:>9.2f} {r['p90_ape_pct']:>8.2f} "
            f"{r['n_heldout']:>7d} {r['n_train']:>7d}  {verdict}"
        )
    lines.append(f"fit time {result['fit_s']:.1f} s, final loss {float(result['losses'][-1]):.4f}")
    return "\n".join(lines)


def _plot(result: Mapping[str, Any], out_dir: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the predicted-vs-measured plots")
        return []
    written = []
    for op, d in result["heldout"].items():
        measured, predicted = np.asarray(d["measured_s"]), np.asarray(d["predicted_s"])
        if not len(measured):
            continue
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.loglog(measured * 1e3, predicted * 1e3, ".", ms=2, alpha=0.4)
        lo = min(measured.min(), predicted.min()) * 1e3
        hi = max(measured.max(), predicted.max()) * 1e3
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        r = result["operators"][op]
        ax.set_title(
            f"{result['gpu']} {op}\nheld out: median {r['median_ape_pct']:.1f}%, "
            f"p90 {r['p90_ape_pct']:.1f}%",
            fontsize=9,
        )
        ax.set_xlabel("measured (ms)")
        ax.set_ylabel("predicted (ms)")
        fig.tight_layout()
        path = out_dir / f"{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    return written


def write_outputs(
    result: Mapping[str, Any], out_dir: str | Path, *, plots: bool = True
) -> dict[str, Any]:
    """Write ``calibration_report.json``, ``<GPU>.json`` (the fitted constants) and plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params_json = {
        "gpu": result["gpu"],
        "params": K.params_to_json(result["params"]),
        "heldout": result["operators"],
    }
    params_path = out_dir / f"{result['gpu']}.json"
    params_path.write_text(json.dumps(params_json, indent=2) + "\n")
    report = {
        "gpu": result["gpu"],
        "operators": result["operators"],
        "fit_s": result["fit_s"],
        "final_loss": float(result["losses"][-1]),
        "params_file": params_path.name,
        "plots": _plot(result, out_dir) if plots else [],
    }
    (out_dir / "calibration_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def calibrate_from_config(config: Mapping[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Run ``apex-jax calibrate`` from a plain config dict; print the table, write outputs.

    Config keys: ``hardware.name``, ``target`` (only ``kernels``), ``operators`` (list or
    null), ``heldout_fraction``, ``seed``, ``steps``, ``learning_rate``, ``max_train_per_op``,
    ``max_rows_per_op``, ``plots``, ``install`` (also copy the fitted constants into the
    package's ``data/calibrated/kernels/`` so later runs use them).
    """
    target = str(config.get("target", "kernels"))
    if target != "kernels":
        raise ValueError(f"calibrate target {target!r} is not supported: use target=kernels")
    operators = config.get("operators")
    result = calibrate(
        str(config["hardware"]["name"]),
        operators=None if operators is None else [str(o) for o in operators],
        heldout_fraction=float(config.get("heldout_fraction", 0.2)),
        seed=int(config.get("seed", 0)),
        steps=int(config.get("steps", 1500)),
        learning_rate=float(config.get("learning_rate", 0.05)),
        max_train_per_op=_optional_int(config.get("max_train_per_op", 20000)),
        max_rows_per_op=_optional_int(config.get("max_rows_per_op")),
    )
    print(format_report(result))
    report = write_outputs(result, out_dir, plots=bool(config.get("plots", True)))
    if bool(config.get("install", False)):
        K.calibrated_dir().mkdir(parents=True, exist_ok=True)
        src = Path(out_dir) / report["params_file"]
        (K.calibrated_dir() / report["params_file"]).write_text(src.read_text())
        print(f"installed {K.calibrated_dir() / report['params_file']}")
    print(f"wrote {Path(out_dir) / 'calibration_report.json'} and {report['params_file']}")
    return report


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)
