"""Serving-engine presets and knobs.

A preset names an engine and the version whose defaults it copies. Knobs a user passes override
the preset. The resolved :class:`EngineConfig` fills the engine columns of plan rows.

vLLM 0.6.0 defaults (vllm/config.py and vllm/engine/arg_utils.py of v0.6.0):
``max_num_seqs=256``, ``block_size=16``, ``gpu_memory_utilization=0.9``, preemption by
recompute, a 1% free-page watermark for admitting prefills, and with chunked prefill off,
``max_num_batched_tokens = max(max_model_len, 2048)`` so that any admissible prompt fits one
iteration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["DEFAULT_ENGINE", "ENGINE_PRESETS", "EngineConfig", "resolve_engine"]


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Resolved engine settings for one deployment.

    ``max_num_batched_tokens`` and ``max_model_len`` of ``None`` are resolved against the
    model by :meth:`for_model`.
    """

    name: str = "vllm"
    version: str = "0.6.0"
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    chunked_prefill: bool = False
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    max_model_len: int | None = None
    watermark: float = 0.01

    def for_model(self, max_position_embeddings: int) -> EngineConfig:
        """Fill the model-dependent defaults the way the engine does at start-up."""
        max_model_len = self.max_model_len or int(max_position_embeddings)
        budget = self.max_num_batched_tokens
        if budget is None:
            budget = max(max_model_len, 2048)
        return dataclasses.replace(
            self, max_model_len=max_model_len, max_num_batched_tokens=int(budget)
        )

    def plan_knobs(self) -> dict[str, Any]:
        """The engine columns of a plan row."""
        return {
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "block_size": self.block_size,
            "chunked_prefill": int(self.chunked_prefill),
            "gpu_mem_util": self.gpu_memory_utilization,
        }


ENGINE_PRESETS: dict[tuple[str, str], EngineConfig] = {
    ("vllm", "0.6.0"): EngineConfig(),
}
DEFAULT_ENGINE = ("vllm", "0.6.0")

_KNOBS = {f.name for f in dataclasses.fields(EngineConfig)} | {"gpu_mem_util"}


def resolve_engine(spec: Mapping[str, Any] | None = None) -> EngineConfig:
    """Resolve an engine dict (``{"name": "vllm", "version": "0.6.0", "max_num_seqs": 128}``).

    A missing version means the newest preset of that engine. Unknown keys, engines or
    versions raise ``ValueError`` naming what is accepted.
    """
    spec = dict(spec or {})
    for key in spec:
        if key not in _KNOBS:
            raise ValueError(
                f"unknown engine key {key!r}: accepted keys are {', '.join(sorted(_KNOBS))}"
            )
    name = str(spec.pop("name", DEFAULT_ENGINE[0])).lower()
    versions = sorted(v for n, v in ENGINE_PRESETS if n == name)
    if not versions:
        known = sorted({n for n, _ in ENGINE_PRESETS})
        raise ValueError(f"unknown engine {name!r}: known engines are {', '.join(known)}")
    version = str(spec.pop("version", None) or versions[-1])
    if (name, version) not in ENGINE_PRESETS:
        raise ValueError(
            f"no preset for {name} {version}: known versions are {', '.join(versions)}"
        )
    if "gpu_mem_util" in spec:
        spec["gpu_memory_utilization"] = spec.pop("gpu_mem_util")
    config = dataclasses.replace(ENGINE_PRESETS[(name, version)], **spec)
    if config.chunked_prefill:
        raise ValueError(
            "chunked_prefill=True is not simulated yet: set chunked_prefill to false "
            "(vLLM 0.6.0 runs prefill-only iterations when it is off)"
        )
    if not 0.0 < config.gpu_memory_utilization <= 1.0:
        raise ValueError(
            f"gpu_memory_utilization must be in (0, 1] (got {config.gpu_memory_utilization})"
        )
    for key in ("max_num_seqs", "block_size"):
        if int(getattr(config, key)) < 1:
            raise ValueError(f"engine {key} must be >= 1 (got {getattr(config, key)})")
    return config
