"""Copy the subsets of the measured profiles that apex_jax needs into the package.

Reads ``../shared/data/profiles`` (or ``--src``) and writes ``apex_jax/data/profiles``: gzipped
CSVs with only the columns the cost tables use, the units unchanged (the loader in
``apex_jax/cost/tables.py`` converts them to seconds and bytes). Rerun it when the shared data
changes; ``apex_jax/data/profiles/SOURCES.md`` carries the attribution.

Kept:

* AIConfigurator (H100, H200, A100): GEMM (bf16, per-tensor and block-scaled fp8), prefill
  and decode attention without a sliding window, fused MoE (bf16, per-tensor and
  block-scaled fp8, int4 weight-only; balanced and power-law routing), NCCL collectives,
  vLLM's custom all-reduce.
* APEX+: collectives and send/recv (H100, H200, V100), V100 GEMMs.
* Vidur: one layer's non-attention operators (medians) for A100, A40 and H100; send/recv and
  all-reduce over the network setups.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SRC = ROOT.parent / "shared" / "data" / "profiles"
DEST = ROOT / "apex_jax" / "data" / "profiles"

AIC_GPUS = ("h100_sxm", "h200_sxm", "a100_sxm")
VIDUR_OPS = (
    "emb",
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)
VIDUR_SHAPE = ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size", "use_gated_mlp")


def _read(path: Path) -> list[dict[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as stream:
        return list(csv.DictReader(stream))


def _fmt(value: str) -> str:
    """Six significant digits for measured times; integers and names unchanged."""
    try:
        number = float(value)
    except ValueError:
        return value
    if number.is_integer() and "." not in value and "e" not in value.lower():
        return value
    return f"{number:.6g}"


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    seen: set[tuple[str, ...]] = set()
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        row = [_fmt(v) for v in row]
        key = tuple(row)
        if key not in seen:
            seen.add(key)
            writer.writerow(row)
    # mtime=0: the same input gives byte-identical files.
    with gzip.GzipFile(path, "wb", mtime=0) as stream:
        stream.write(text.getvalue().encode())
    print(f"{path.relative_to(ROOT)}: {len(seen)} rows, {path.stat().st_size / 1024:.0f} KiB")


def _one(src: Path, pattern: str) -> Path:
    found = sorted(src.glob(pattern))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one file for {pattern} under {src}, found {found}")
    return found[0]


def package_aiconfigurator(src: Path) -> None:
    for gpu in AIC_GPUS:
        base = src / "aiconfigurator" / gpu
        out = DEST / "aiconfigurator" / gpu
        rows = _read(_one(base, "gemm/*/*/gemm_perf.csv.gz"))
        _write(
            out / "gemm.csv.gz",
            ["gemm_dtype", "m", "n", "k", "latency_ms"],
            [
                [r["gemm_dtype"], r["m"], r["n"], r["k"], r["latency"]]
                for r in rows
                if r["gemm_dtype"] in ("bfloat16", "fp8", "fp8_block")
            ],
        )
        for kind, length in (("context", "isl"), ("generation", "step")):
            rows = _read(_one(base, f"attention/*/*/{kind}_attention_perf.csv.gz"))
            _write(
                out / f"{kind}_attention.csv.gz",
                [
                    "batch_size",
                    length,
                    "num_heads",
                    "num_kv_heads",
                    "head_dim",
                    "kv_dtype",
                    "latency_ms",
                ],
                [
                    [
                        r["batch_size"],
                        r[length],
                        r["num_heads"],
                        r["num_key_value_heads"],
                        r["head_dim"],
                        r["kv_cache_dtype"],
                        r["latency"],
                    ]
                    for r in rows
                    if r.get("window_size", "0") == "0" and r["attn_dtype"] == "bfloat16"
                ],
            )
        rows = _read(_one(base, "moe/*/*/moe_perf.csv.gz"))
        _write(
            out / "moe.csv.gz",
            [
                "moe_dtype",
                "num_tokens",
                "hidden_size",
                "inter_size",
                "topk",
                "num_experts",
                "moe_tp_size",
                "moe_ep_size",
                "distribution",
                "latency_ms",
            ],
            [
                [
                    r["moe_dtype"],
                    r["num_tokens"],
                    r["hidden_size"],
                    r["inter_size"],
                    r["topk"],
                    r["num_experts"],
                    r["moe_tp_size"],
                    r["moe_ep_size"],
                    r["distribution"],
                    r["latency"],
                ]
                for r in rows
                if r["moe_dtype"] in ("bfloat16", "fp8", "fp8_block", "int4_wo")
            ],
        )
        rows = _read(_one(base, "comm/nccl/*/nccl_perf.csv.gz"))
        _write(
            out / "nccl.csv.gz",
            ["op_name", "nccl_dtype", "num_gpus", "message_elements", "latency_ms"],
            [
                [r["op_name"], r["nccl_dtype"], r["num_gpus"], r["message_size"], r["latency"]]
                for r in rows
            ],
        )
        rows = _read(_one(base, "comm/vllm/*/custom_allreduce_perf.csv.gz"))
        _write(
            out / "custom_allreduce.csv.gz",
            ["backend", "num_gpus", "message_elements", "latency_ms"],
            [[r["backend"], r["num_gpus"], r["message_size"], r["latency"]] for r in rows],
        )


def package_apex_plus(src: Path) -> None:
    for path in sorted((src / "apex_plus" / "comm").glob("*/*.csv")):
        rows = _read(path)
        _write(
            DEST / "apex_plus" / "comm" / path.parent.name / f"{path.stem}.csv.gz",
            ["num_nodes", "num_gpus_per_node", "dtype", "size_kib", "time_us"],
            [
                [r["num_nodes"], r["num_gpus_per_node"], r["dtype"], r["size(kb)"], r["time(us)"]]
                for r in rows
            ],
        )
    rows = _read(src / "apex_plus" / "comp" / "V100-PCIE-16GB" / "gemm_0.csv")
    _write(
        DEST / "apex_plus" / "comp" / "V100-PCIE-16GB" / "gemm.csv.gz",
        ["dtype", "m", "n", "k", "time_us"],
        [[r["dtype"], r["m"], r["n"], r["k"], r["time(us)"]] for r in rows],
    )


def package_vidur(src: Path) -> None:
    for path in sorted((src / "vidur" / "compute").glob("*/*/*/mlp.csv")):
        gpu, org, model = path.parts[-4:-1]
        rows = _read(path)
        header = ["num_tokens", "num_tensor_parallel_workers", *VIDUR_SHAPE]
        header += [f"{op}_median_ms" for op in VIDUR_OPS]
        _write(
            DEST / "vidur" / "compute" / gpu / f"{org}__{model}.csv.gz",
            header,
            [
                [r["num_tokens"], r["num_tensor_parallel_workers"]]
                + [r[c] for c in VIDUR_SHAPE]
                # phi-2 runs attention and MLP in parallel: no post-attention norm (empty).
                + [r.get(f"time_stats.{op}.median", "") for op in VIDUR_OPS]
                for r in rows
            ],
        )
    for path in sorted((src / "vidur" / "network").glob("*/*.csv")):
        rows = _read(path)
        op = path.stem
        _write(
            DEST / "vidur" / "network" / path.parent.name / f"{op}.csv.gz",
            ["num_workers", "devices_per_node", "size_bytes", "median_ms"],
            [
                [r["num_workers"], r["devices_per_node"], r["size"], r[f"time_stats.{op}.median"]]
                for r in rows
            ],
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC)
    args = parser.parse_args()
    package_aiconfigurator(args.src)
    package_apex_plus(args.src)
    package_vidur(args.src)


if __name__ == "__main__":
    main()
