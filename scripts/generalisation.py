"""How well the compute model generalises to models it was not fitted on (Vidur profiles).

For A100 and H100: fit the GEMM and elementwise constants (:mod:`apex_jax.cost.kernels`) to
Vidur's measured per-layer operators (``mlp.csv``: QKV, output, up and down projections, norms,
rotary, activation, residual add, embedding) of some models, then report the absolute
percentage error on every operator of the other models. Prints one table per GPU.

    python scripts/generalisation.py [--steps 1500]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import apex_jax  # noqa: F401  (switches JAX to float64)
from apex_jax import fit_kernels as C
from apex_jax.cost import tables as ct
from apex_jax.hardware import get_gpu

# Models fitted on; every other profiled model is held out.
FIT_MODELS = {
    "A100-SXM-80GB": ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-70b-hf", "Qwen/Qwen-72B"),
    "H100-SXM-80GB": ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-70b-hf", "Qwen/Qwen-72B"),
}
GEMMS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")


def gemm_rows(gpu_name: str, model: str) -> dict[str, np.ndarray]:
    """Vidur's four projection GEMMs of one model as a GEMM dataset (bf16)."""
    t = ct.load_vidur_mlp(gpu_name, model)
    head_dim = t["hidden"] / t["heads"]
    kv_heads = np.maximum(t["kv_heads"] / t["tp"], 1.0)
    heads = t["heads"] / t["tp"]
    inter = t["inter"] / t["tp"]
    shapes = {
        "attn_pre_proj": ((heads + 2 * kv_heads) * head_dim, t["hidden"]),
        "attn_post_proj": (t["hidden"], heads * head_dim),
        "mlp_up_proj": ((1.0 + t["gated"]) * inter, t["hidden"]),
        "mlp_down_proj": (t["hidden"], inter),
    }
    parts = []
    for op in GEMMS:
        n, k = shapes[op]
        time_s = t[f"{op}_s"]
        ok = np.isfinite(time_s) & (time_s > 0)
        parts.append(
            {
                "m": t["tokens"][ok],
                "n": n[ok],
                "k": k[ok],
                "fp8": np.zeros(int(ok.sum())),
                "time_s": time_s[ok],
                "kind": np.full(int(ok.sum()), GEMMS.index(op), float),
            }
        )
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _concat(parts):
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def run(gpu_name: str, steps: int) -> list[tuple[str, str, float, float, int]]:
    gpu = get_gpu(gpu_name)
    models = ct.vidur_models(gpu.name)
    fit = [m for m in models if m in FIT_MODELS[gpu.name]]
    held = [m for m in models if m not in FIT_MODELS[gpu.name]]
    train = {
        "gemm": _concat([gemm_rows(gpu.name, m) for m in fit]),
        "elementwise": C._elementwise_dataset(gpu.name, fit),
    }
    train["gemm"].pop("kind")
    params, _ = C.fit_params(train, gpu, steps=steps)
    rows = []
    for model in held:
        g = gemm_rows(gpu.name, model)
        e = C._elementwise_dataset(gpu.name, [model])
        pg = np.asarray(C.predict_operator_s("gemm", params, gpu, g))
        pe = np.asarray(C.predict_operator_s("elementwise", params, gpu, e))
        for i, op in enumerate(GEMMS):
            sel = g["kind"] == i
            ape = 100 * np.abs(pg[sel] / g["time_s"][sel] - 1)
            rows.append(
                (model, op, float(np.median(ape)), float(np.percentile(ape, 90)), int(sel.sum()))
            )
        ape = 100 * np.abs(pe / e["time_s"] - 1)
        rows.append(
            (model, "elementwise", float(np.median(ape)), float(np.percentile(ape, 90)), len(ape))
        )
        ape = 100 * np.abs(np.concatenate([pg / g["time_s"], pe / e["time_s"]]) - 1)
        rows.append(
            (model, "all operators", float(np.median(ape)), float(np.percentile(ape, 90)), len(ape))
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args()
    for gpu_name, fitted_on in FIT_MODELS.items():
        start = time.perf_counter()
        rows = run(gpu_name, args.steps)
        print(f"\n{gpu_name}: fitted on {', '.join(fitted_on)}; held-out models below")
        print(f"{'model':<38} {'operator':<16} {'median APE %':>12} {'p90 APE %':>10} {'n':>6}")
        for model, op, med, p90, n in rows:
            print(f"{model:<38} {op:<16} {med:>12.1f} {p90:>10.1f} {n:>6d}")
        print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
