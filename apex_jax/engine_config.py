"""Serving-engine presets and knobs.

A preset names an engine and the version whose defaults it copies. Knobs a user passes override
the preset. The resolved :class:`EngineConfig` fills the engine columns of plan rows.

Presets and where their defaults come from:

- ``vllm 0.6.0`` (vllm/config.py and vllm/engine/arg_utils.py of v0.6.0): ``max_num_seqs=256``,
  ``block_size=16``, ``gpu_memory_utilization=0.9``, preemption by recompute, a 1% free-page
  watermark for admitting prefills. Chunked prefill is switched on automatically when the
  model's ``max_model_len`` exceeds 32K tokens (the engine logs "Chunked prefill is enabled
  by default for models with max_model_len > 32K"); with it on, ``max_num_batched_tokens``
  defaults to 512, with it off to ``max(max_model_len, 2048)`` so that any admissible prompt
  fits one iteration. Llama-3.1 (128K context) therefore runs with chunked prefill and a
  512-token budget unless told otherwise; with ``--max-model-len`` of 32K or less, without
  chunked prefill and a budget of ``max(max_model_len, 2048)``. vLLM's custom all-reduce is on
  (``disable_custom_all_reduce=False``; only ROCm turns it off in ``ParallelConfig``).
- ``vllm 0.11.0``, ``0.12.0``, ``0.16.0`` and ``0.18.0`` (the V1 engine,
  vllm/engine/arg_utils.py, whose serving defaults these versions share; those of 0.16 and
  0.18 are taken from 0.12, unchecked): chunked prefill always on; for
  the OpenAI server on GPUs with at least 70 GiB that are not A100s, ``max_num_seqs=1024`` and
  ``max_num_batched_tokens=8192``, otherwise 256 and 2048. No admission watermark. The V1
  engine allocates KV pages chunk by chunk; this simulator allocates a prompt's pages when it
  is admitted, as the 0.6 engine does.

Each preset also carries what its version costs beyond the GPU's kernels, every figure with
its source (:data:`VERSION_COSTS`): the per-iteration overhead (scheduling, input
preparation, sampling and output processing that the GPU waits for), and the per-request
frontend delay: the time between a client sending a request and the engine scheduling it, plus the first token's way back (HTTP,
chat template and tokenisation, detokenisation and streaming), which a benchmark client's
TTFT includes. Every request reaches the engine that long after it
is sent (:func:`apex_jax.simulator.engine_arrivals`), so it counts in TTFT and E2E latency.

And the time its sampler spends sorting logits: the V1 versions give
requests without sampling parameters the model's own defaults (``generation_config="auto"``
in vLLM's ``ModelConfig``), which for Qwen3 (top-k 20, top-p 0.95) and Llama-3.1 Instruct
(top-p 0.9) filter by top-k / top-p; their sampler does that in PyTorch by sorting each
sampled sequence's whole vocabulary of logits on every GPU (``topk_topp_sampler.py``:
FlashInfer's sampling kernel is opt-in, ``VLLM_USE_FLASHINFER_SAMPLER=1``), which the LM head
and sampling of :mod:`apex_jax.cost.iteration` pay per sampled sequence and vocabulary entry.
The figure assumes the served model's generation config sets top-k or top-p, as those of the
validation runs do.

And the host costs that grow with the batch or replace a CUDA graph:

- vLLM 0.6 does its scheduling, input preparation, sampler bookkeeping and output processing
  (detokenisation, stop checks, request outputs) in Python for every sequence of every
  iteration, and multi-step scheduling, which would amortise it, is off by default; so each
  sequence that yields a token adds host time to the iteration (``host_s_per_seq``).
- vLLM 0.6 replays a captured CUDA graph only for a decode-only batch of at most 256
  sequences (``_BATCH_SIZES_TO_CAPTURE``, 1, 2, 4, then multiples of 8); a batch with any
  prefill token (chunked or not) or a larger decode batch runs eagerly, so the host launches
  every layer's kernels itself and the iteration takes at least that long
  (``eager_s_per_layer`` times the layers; ``max_graph_batch``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = [
    "DEFAULT_ENGINE",
    "ENGINE_PRESETS",
    "ROUTERS",
    "VERSION_COSTS",
    "EngineConfig",
    "Figure",
    "HostCosts",
    "VersionCosts",
    "resolve_engine",
]


class Figure(NamedTuple):
    """A preset's constant, in seconds (per iteration, per request or per logit), and where
    the figure comes from."""

    seconds: float
    source: str
    # True when the figure was chosen on validation/vllm_h100_dev.csv, so that predictions
    # of that file are in-sample.
    is_in_sample: bool = False


class HostCosts(NamedTuple):
    """An engine version's host costs beyond the fixed per-iteration overhead, and where the
    figures come from (see the module docstring)."""

    s_per_seq: float  # host seconds per iteration and sequence that yields a token
    eager_s_per_layer: float  # launching one layer's kernels without a CUDA graph
    max_graph_batch: int  # largest decode-only batch replayed from a CUDA graph
    source: str
    # True when the figures were chosen on validation/vllm_h100_dev.csv.
    is_in_sample: bool


class VersionCosts(NamedTuple):
    """What one engine version adds to the GPU's kernels, each figure with its source."""

    iteration_overhead: Figure  # seconds every iteration pays outside the kernels
    frontend_delay: Figure  # seconds from a request's send to the engine, counted in TTFT
    sampler_sort: Figure  # seconds per sampled sequence and vocabulary entry
    host: HostCosts


_V06_COSTS = VersionCosts(
    iteration_overhead=Figure(
        3e-3,
        "no independent source yet: chosen with validation/vllm_h100_dev.csv in view (mean TPOT "
        "error there 12.5% at 0.5 ms, 5.1% at 2.5 ms, 3.8% at 3 ms, 10.5% at 6 ms). For scale: "
        "vLLM's multi-step scheduling RFC (vllm-project/vllm#6854, July 2024, before 0.6.0's "
        "asynchronous output processing) saw 4-13 ms of GPU idle time per decode step",
        True,
    ),
    frontend_delay=Figure(
        11e-3,
        "IN-SAMPLE: chosen on validation/vllm_h100_dev.csv by scripts/host_costs.py (11 ms with "
        "each trace held out as well). vLLM 0.6's own TTFT metric, which those runs report, runs "
        "from the engine receiving the request to the first token's output processing, which its "
        "asynchronous output processor does during the next iteration, after that iteration's "
        "scheduling and launch; no measurement splits the figure further",
        True,
    ),
    sampler_sort=Figure(
        0.0,
        "none: vLLM 0.6.0 does not apply the model's generation config by default "
        "(generation_config=None, vllm-project/vllm#11164), so requests without sampling "
        "parameters sample the whole vocabulary without top-k / top-p and nothing is sorted",
    ),
    host=HostCosts(
        0.35e-3,
        0.24e-3,
        256,
        "IN-SAMPLE: chosen on validation/vllm_h100_dev.csv by scripts/host_costs.py, the per-"
        "sequence cost from TPOT at 1-10 requests in flight, the eager launch from TTFT at low "
        "load across TP 2, 4 and 8 (each trace held out, the other two choose 0.35-0.45 ms per "
        "sequence and 0.20-0.24 ms per layer); 256 is 0.6.0's largest captured batch "
        "(vllm/worker/model_runner.py, _BATCH_SIZES_TO_CAPTURE)",
        True,
    ),
)
# The V1 engine's figures (vLLM 0.11 and 0.12 share them).
_V1_COSTS = VersionCosts(
    iteration_overhead=Figure(
        1.22e-3,
        "median over 54 closed-loop runs of vLLM 0.12.0 serving Qwen3-32B (bf16) on 2, 4 and 8 "
        "H100s at concurrency 8-32 of (measured TPOT - TPOT predicted with no overhead) / (TPOT "
        "added per ms of overhead), the clients desynchronised, the frontend delay and the "
        "sampler's sort applied as in the measured runs (NVIDIA AIConfigurator's "
        "silicon_sample.csv, bundled in validation/silicon_dev.csv; "
        "scripts/iteration_overhead.py); interquartile range 1.05 to 1.51 ms (1.52 ms, "
        "interquartile 1.36 to 2.01 ms, without the sort; 0.4 ms, interquartile -0.1 to 0.8 ms, "
        "with the clients in lockstep)",
    ),
    frontend_delay=Figure(
        10e-3,
        "a benchmark client's TTFT above vLLM's own time_to_first_token metric, 8.4 to 12.2 ms "
        "over three API backends at concurrency 8 with 512-token prompts (vLLM V1, vllm-"
        "project/vllm#54628; about 10 ms)",
    ),
    sampler_sort=Figure(
        1.41e-10,
        "vLLM's PyTorch top-k / top-p path sorts a [sequences, vocabulary] tensor of logits: "
        "2.35-2.40 ms for 128 sequences of a 131,072-entry vocabulary with top-k and top-p (vllm-"
        "project/vllm#40376, PyTorch column; 1.06-1.07 ms for 64 sequences), 1.41e-10 s per entry",
    ),
    host=HostCosts(
        0.0,
        0.0,
        512,
        "not modelled for the V1 engine (its scheduler and output processing run in a separate "
        "process, overlapped with the GPU; mixed batches replay piecewise CUDA graphs)",
        False,
    ),
)
# From vLLM 0.14 the V1 engine schedules asynchronously by default (release notes of v0.14.0,
# vllm-project/vllm#27614): the engine core prepares the next step while the GPU runs this
# one, which hides host work the GPU would otherwise wait for. No measurement of a dense
# model here separates that, so the 0.12 figure is kept and says so: expect TPOT a little
# long where the GPU step is short.
_V1_ASYNC_COSTS = _V1_COSTS._replace(
    iteration_overhead=_V1_COSTS.iteration_overhead._replace(
        source=_V1_COSTS.iteration_overhead.source
        + "; taken unchanged for versions 0.14 and later, whose asynchronous scheduling "
        "(on by default since 0.14.0) hides part of it: an upper bound there"
    )
)
VERSION_COSTS: dict[tuple[str, str], VersionCosts] = {
    ("vllm", "0.6.0"): _V06_COSTS,
    ("vllm", "0.11.0"): _V1_COSTS,
    ("vllm", "0.12.0"): _V1_COSTS,
    ("vllm", "0.16.0"): _V1_ASYNC_COSTS,
    ("vllm", "0.18.0"): _V1_ASYNC_COSTS,
}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Resolved engine settings for one deployment.

    ``max_num_batched_tokens`` and ``max_model_len`` of ``None`` are resolved against the
    model by :meth:`for_model`.
    """

    name: str = "vllm"
    version: str = "0.6.0"
    max_num_seqs: int | None = 256
    max_num_batched_tokens: int | None = None
    chunked_prefill: bool | None = None  # None: the engine's own rule (see the presets)
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    max_model_len: int | None = None
    watermark: float = 0.01
    # Seconds every iteration pays outside the GPU's kernels (see VERSION_COSTS).
    iteration_overhead_s: float = _V06_COSTS.iteration_overhead.seconds
    # vLLM's own all-reduce kernel for tensor parallelism (False: --disable-custom-all-reduce,
    # so every all-reduce goes through NCCL); see apex_jax.cost.sites for where it applies.
    custom_all_reduce: bool = True
    # Seconds from a request's send to the engine, the first token's way back included
    # (see VERSION_COSTS); it counts in TTFT.
    frontend_delay_s: float = _V06_COSTS.frontend_delay.seconds
    # Seconds the sampler spends sorting per sampled sequence and vocabulary entry (see
    # VERSION_COSTS); 0 when requests are not filtered by top-k / top-p.
    sampler_sort_s_per_logit: float = _V06_COSTS.sampler_sort.seconds
    # Host costs that grow with the batch or replace a CUDA graph (see VERSION_COSTS).
    host_s_per_seq: float = _V06_COSTS.host.s_per_seq
    eager_s_per_layer: float = _V06_COSTS.host.eager_s_per_layer
    max_graph_batch: int = _V06_COSTS.host.max_graph_batch
    # How a data-parallel deployment spreads requests over its replicas: "round_robin"
    # (request i to replica i mod dp, as separate instances behind a plain balancer) or
    # "least_loaded" (join the replica with the fewest requests in flight).
    router: str = "round_robin"

    def for_model(
        self, max_position_embeddings: int, hbm_bytes: float = 80e9, gpu_name: str = ""
    ) -> EngineConfig:
        """Fill the model- and GPU-dependent defaults the way the engine does at start-up.

        Settings vLLM refuses to start with (a budget below ``max_model_len`` without chunked
        prefill, a KV cache shorter than ``max_model_len``) resolve; the plans that carry them
        get the refusal as their status (:func:`apex_jax.memory.startup_refusals`).
        """
        max_model_len = self.max_model_len or int(max_position_embeddings)
        chunked = self.chunked_prefill
        if chunked is None:
            chunked = self.version != "0.6.0" or max_model_len > 32 * 1024
        budget = self.max_num_batched_tokens
        seqs = self.max_num_seqs
        if self.version == "0.6.0":
            if budget is None:
                budget = 512 if chunked else max(max_model_len, 2048)
        else:
            is_big = hbm_bytes >= 70 * 2**30 and "A100" not in gpu_name.upper()
            budget = budget or (8192 if is_big else 2048)
            seqs = seqs or (1024 if is_big else 256)
        config = dataclasses.replace(
            self,
            max_model_len=max_model_len,
            chunked_prefill=bool(chunked),
            max_num_batched_tokens=int(budget),
            max_num_seqs=int(seqs),
        )
        if config.max_num_batched_tokens < config.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens={config.max_num_batched_tokens} is below "
                f"max_num_seqs={config.max_num_seqs}, which vLLM rejects: raise the budget"
            )
        return config

    def default_budget(self, chunked: bool) -> int:
        """The token budget the engine picks by default with chunked prefill on or off.

        For a config resolved by :meth:`for_model`. vLLM 0.6 uses 512 with chunked prefill and
        ``max(max_model_len, 2048)`` without; the V1 presets do not depend on chunking.
        """
        if self.max_model_len is None or self.max_num_batched_tokens is None:
            raise ValueError("default_budget needs a config resolved by EngineConfig.for_model")
        if self.version == "0.6.0":
            return 512 if chunked else max(int(self.max_model_len), 2048)
        return int(self.max_num_batched_tokens)

    def _preset_costs(self) -> VersionCosts | None:
        return VERSION_COSTS.get((self.name, self.version))

    def overhead_source(self) -> Figure:
        """This config's per-iteration overhead with its source: the preset's, or the
        user's knob."""
        preset = self._preset_costs()
        if preset is not None and self.iteration_overhead_s == preset.iteration_overhead.seconds:
            return preset.iteration_overhead
        return Figure(self.iteration_overhead_s, "set by the user")

    def frontend_source(self) -> Figure:
        """This config's frontend delay with its source: the preset's, or the user's knob."""
        preset = self._preset_costs()
        if preset is not None and self.frontend_delay_s == preset.frontend_delay.seconds:
            return preset.frontend_delay
        return Figure(self.frontend_delay_s, "set by the user")

    def host_costs(self) -> HostCosts:
        """This config's host costs with their source: the preset's, or the user's knobs."""
        preset = self._preset_costs()
        figures = (self.host_s_per_seq, self.eager_s_per_layer, self.max_graph_batch)
        if preset is not None and figures == preset.host[:3]:
            return preset.host
        return HostCosts(*figures, "set by the user", False)

    def plan_knobs(self) -> dict[str, Any]:
        """The engine columns of a plan row."""
        return {
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "block_size": self.block_size,
            "chunked_prefill": int(self.chunked_prefill),
            "gpu_mem_util": self.gpu_memory_utilization,
            "disable_custom_all_reduce": int(not self.custom_all_reduce),
        }


def _preset(name: str, version: str, costs: VersionCosts) -> EngineConfig:
    """A version's preset: its serving defaults (see the module docstring) and its costs."""
    defaults = (
        {}
        if version == "0.6.0"
        else {"max_num_seqs": None, "chunked_prefill": True, "watermark": 0.0}
    )
    return EngineConfig(
        name=name,
        version=version,
        iteration_overhead_s=costs.iteration_overhead.seconds,
        frontend_delay_s=costs.frontend_delay.seconds,
        sampler_sort_s_per_logit=costs.sampler_sort.seconds,
        host_s_per_seq=costs.host.s_per_seq,
        eager_s_per_layer=costs.host.eager_s_per_layer,
        max_graph_batch=costs.host.max_graph_batch,
        **defaults,
    )


ENGINE_PRESETS: dict[tuple[str, str], EngineConfig] = {
    key: _preset(*key, costs) for key, costs in VERSION_COSTS.items()
}
DEFAULT_ENGINE = ("vllm", "0.6.0")
_log = logging.getLogger(__name__)
ROUTERS = ("round_robin", "least_loaded")

_KNOBS = {f.name for f in dataclasses.fields(EngineConfig)} | {"gpu_mem_util"}


def resolve_engine(spec: Mapping[str, Any] | None = None) -> EngineConfig:
    """Resolve an engine dict (``{"name": "vllm", "version": "0.6.0", "max_num_seqs": 128}``).

    No name means the default preset, :data:`DEFAULT_ENGINE` (the command line's
    ``engine=vllm_0_6_0``); a name without a version means that engine's newest preset.
    Unknown keys, engines or versions raise ``ValueError`` naming what is accepted.
    """
    spec = dict(spec or {})
    for key in spec:
        if key not in _KNOBS:
            raise ValueError(
                f"unknown engine key {key!r}: accepted keys are {', '.join(sorted(_KNOBS))}"
            )
    if "name" not in spec:
        spec["name"], spec["version"] = DEFAULT_ENGINE[0], spec.get("version") or DEFAULT_ENGINE[1]
    name = str(spec.pop("name")).lower()
    versions = sorted(
        (v for n, v in ENGINE_PRESETS if n == name),
        key=lambda v: tuple(int(x) for x in v.split(".")),
    )
    if not versions:
        known = sorted({n for n, _ in ENGINE_PRESETS})
        raise ValueError(f"unknown engine {name!r}: known engines are {', '.join(known)}")
    version = str(spec.pop("version", None) or versions[-1])
    if (name, version) not in ENGINE_PRESETS:
        # A patch release keeps its minor version's defaults and mechanisms.
        same_minor = [v for v in versions if v.split(".")[:2] == version.split(".")[:2]]
        if not same_minor:
            raise ValueError(
                f"no preset for {name} {version}: known versions are {', '.join(versions)} "
                "(a patch release of one of them uses its preset)"
            )
        _log.info("%s %s: using the %s preset (same minor version)", name, version, same_minor[-1])
        version = same_minor[-1]
    if "gpu_mem_util" in spec:
        spec["gpu_memory_utilization"] = spec.pop("gpu_mem_util")
    config = dataclasses.replace(ENGINE_PRESETS[(name, version)], **spec)
    if config.router not in ROUTERS:
        raise ValueError(f"unknown router {config.router!r}: use one of {', '.join(ROUTERS)}")
    if not 0.0 < config.gpu_memory_utilization <= 1.0:
        raise ValueError(
            f"gpu_memory_utilization must be in (0, 1] (got {config.gpu_memory_utilization})"
        )
    for key in ("max_num_seqs", "block_size", "max_num_batched_tokens", "max_model_len"):
        value = getattr(config, key)
        if value is not None and int(value) < 1:
            raise ValueError(f"engine {key} must be >= 1 (got {getattr(config, key)})")
    if not 0.0 <= config.frontend_delay_s < 10.0:
        raise ValueError(
            f"engine frontend_delay_s must be in [0, 10) seconds (got {config.frontend_delay_s})"
        )
    if not 0.0 <= config.sampler_sort_s_per_logit < 1e-6:
        raise ValueError(
            f"engine sampler_sort_s_per_logit must be in [0, 1e-6) seconds (got "
            f"{config.sampler_sort_s_per_logit})"
        )
    for key in ("host_s_per_seq", "eager_s_per_layer"):
        if not 0.0 <= getattr(config, key) < 0.1:
            raise ValueError(
                f"engine {key} must be in [0, 0.1) seconds (got {getattr(config, key)})"
            )
    if int(config.max_graph_batch) < 0:
        raise ValueError(f"engine max_graph_batch must be >= 0 (got {config.max_graph_batch})")
    if not 0.0 <= config.iteration_overhead_s < 1.0:
        raise ValueError(
            f"engine iteration_overhead_s must be in [0, 1) seconds (got "
            f"{config.iteration_overhead_s})"
        )
    return config
