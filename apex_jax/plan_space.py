"""The plan set of a deployment: the enumerated space, its memory feasibility and a summary.

``apex_jax.plan_space(model=..., hardware=..., num_gpus=...)`` (:mod:`apex_jax.api`) returns a
:class:`PlanSet`:
``len()`` is the number of plans and ``.describe()`` their one-line descriptions in order.
``.summary()`` says how many plans each axis value contributed, how many candidate plans the
validity rules left out and why, how many plans the memory model marks OOM and why, and how
many vLLM would refuse to start (their KV cache holds fewer tokens than ``max_model_len``:
status INFEASIBLE with vLLM's message, see :func:`apex_jax.memory.startup_refusals`); with a
workload it also counts plans whose KV cache, token budget or model length cannot hold some
request (the engine rejects those requests and serves the rest).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from apex_jax.deployment import Deployment
from apex_jax.memory import (
    ENGINE_RESERVE_BYTES,
    MemoryPlan,
    StartupChecks,
    memory_plan,
    startup_checks,
)
from apex_jax.paths import config_option, config_options
from apex_jax.plans import (
    AUTO,
    COL,
    MAX_CLOCK,
    Enumeration,
    PlanSpace,
    describe_plan,
    enumerate_space,
    plan_kind,
    plan_to_dict,
)
from apex_jax.workload import Workload

__all__ = [
    "PlanSet",
    "build_plan_set",
    "load_plan_space",
    "space_from_dict",
]

_LIST_AXES = ("dp", "tp", "pp", "attn_dp", "mlp_dp", "ep", "enc_dp")
_ENGINE_AXES = (
    "max_num_seqs",
    "max_num_batched_tokens",
    "block_size",
    "chunked_prefill",
    "gpu_mem_util",
)
_FLAGS = ("use_all_gpus", "uneven_pp", "cross_node_stages")

OOM_WEIGHTS = "weights alone exceed the usable memory"
OOM_ACTIVATIONS = "weights and profiling activations leave no KV page"
INFEASIBLE_KV = "a request's KV cache exceeds a replica's pages"
INFEASIBLE_BUDGET = "a prompt exceeds the token budget without chunked prefill"
INFEASIBLE_LENGTH = "a request exceeds max_model_len"
REFUSED_KV = "KV cache holds fewer tokens than max_model_len"
REFUSED_BUDGET = "token budget below max_model_len without chunked prefill"


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def space_from_dict(space: Mapping[str, Any], engine_knobs: Mapping[str, Any]) -> PlanSpace:
    """Build a :class:`~apex_jax.plans.PlanSpace` from a ``plan_space`` config dict.

    Null parallel and cell axes mean every valid value; null engine axes take the engine's
    value (``engine_knobs``, see :meth:`~apex_jax.engine_config.EngineConfig.plan_knobs`); a budget of
    ``auto`` is the engine's default for each plan's chunked-prefill setting; a clock of
    ``max`` is the GPU's boost clock; missing keys keep the :class:`PlanSpace` defaults.
    Unknown keys raise ``ValueError``.
    """
    fields: dict[str, Any] = {}
    for key in _LIST_AXES:
        if key in space:
            value = space[key]
            fields[key] = None if value is None else [int(v) for v in _as_list(value)]
    if space.get("gpu_clock_mhz") is not None:
        fields["gpu_clock_mhz"] = [
            None if str(v).lower() == MAX_CLOCK else int(v)
            for v in _as_list(space["gpu_clock_mhz"])
        ]
    for key in ("weight_dtype", "kv_dtype", "act_dtype"):
        if key in space:
            default = [AUTO] if key == "act_dtype" else ["bf16"]
            fields[key] = [str(v) for v in _as_list(space[key] or default)]
    for key in _ENGINE_AXES:
        value = space.get(key)
        values = _as_list(value) if value is not None else [engine_knobs[key]]
        if key == "max_num_batched_tokens":
            fields[key] = [None if v is None or str(v).lower() == AUTO else int(v) for v in values]
        else:
            fields[key] = [float(v) if key == "gpu_mem_util" else int(v) for v in values]
    for key in _FLAGS:
        if key in space:
            fields[key] = bool(space[key])
    fields["disable_custom_all_reduce"] = int(engine_knobs.get("disable_custom_all_reduce", 0))
    accepted = set(_LIST_AXES) | set(_ENGINE_AXES) | set(_FLAGS)
    accepted |= {"weight_dtype", "kv_dtype", "act_dtype", "gpu_clock_mhz"}
    unknown = set(space) - accepted
    if unknown:
        raise ValueError(
            f"unknown plan_space keys {sorted(unknown)}: accepted keys are {sorted(accepted)}"
        )
    return PlanSpace(**fields)


def load_plan_space(name: str, engine_knobs: Mapping[str, Any]) -> PlanSpace:
    """The :class:`PlanSpace` of a bundled ``conf/plan_space/<name>.yaml`` file."""
    values = config_option("plan_space", name)
    if values is None:
        known = ", ".join(config_options("plan_space"))
        raise ValueError(f"unknown plan_space {name!r}: bundled spaces are {known}")
    return space_from_dict(values, engine_knobs)


@dataclasses.dataclass(frozen=True)
class PlanSet:
    """The valid plans of a deployment, with their memory, in enumeration order.

    Attributes:
        deployment: the model, GPUs and engine the plans are for.
        space: the axes they were enumerated from.
        enumeration: the plan tensor and the candidates left out (with reasons).
        memory: per-GPU memory of every plan (``memory.is_oom`` marks plans that do not fit).
    """

    deployment: Deployment
    space: PlanSpace
    enumeration: Enumeration
    memory: MemoryPlan

    @property
    def plans(self) -> np.ndarray:
        """int32 ``[P, F]`` plan tensor (columns :data:`apex_jax.plans.COLUMNS`)."""
        return self.enumeration.plans

    @property
    def fits(self) -> np.ndarray:
        """``[P]`` bool: the plan's weights and activations leave room for KV pages."""
        return ~self.memory.is_oom

    @property
    def startup(self) -> StartupChecks:
        """vLLM's start-up checks of every plan (:func:`~apex_jax.memory.startup_checks`)."""
        return startup_checks(self.plans, self.memory, self.deployment.engine.max_model_len)

    def __len__(self) -> int:
        return int(self.plans.shape[0])

    def describe(self) -> list[str]:
        """One-line description of every plan, in order (see :func:`describe_plan`)."""
        model = self.deployment.model
        return [describe_plan(row, model) for row in self.plans]

    def kinds(self) -> list[str]:
        """The distinct parallel layouts (:func:`~apex_jax.plans.plan_kind`), in order."""
        model = self.deployment.model
        return list(dict.fromkeys(plan_kind(row, model) for row in self.plans))

    def summary(self, workload: Workload | None = None) -> dict[str, Any]:
        """Counts of the space: plans per axis value, left-out candidates, OOM and, with a
        workload, plans that cannot hold some request (see the module docstring)."""
        plans = self.plans
        axes = {name: _value_counts(values) for name, values in _axis_values(plans, self)}
        oom = _oom_reasons(plans, self.memory, self.deployment)
        startup = self.startup
        is_refused = startup.is_refused
        out: dict[str, Any] = {
            "num_plans": len(self),
            "num_candidates": len(self) + sum(self.enumeration.dropped.values()),
            "num_layouts": self.enumeration.num_layouts,
            "num_knob_settings": self.enumeration.num_knob_settings,
            "axes": axes,
            "left_out": dict(self.enumeration.dropped),
            "oom": oom,
            "refused": {
                REFUSED_BUDGET: int(startup.is_budget_short.sum()),
                REFUSED_KV: int(startup.is_kv_short.sum()),
            },
            "fit": int((self.fits & ~is_refused).sum()),
        }
        if workload is not None:
            out["rejecting"] = _rejecting_reasons(
                plans, self.memory, self.deployment, workload, self.fits & ~is_refused
            )
        return out

    def format_summary(self, workload: Workload | None = None) -> str:
        """:meth:`summary` as readable text."""
        s = self.summary(workload)
        dep = self.deployment
        head = (
            f"Plan space of {dep.model.name} on {dep.num_gpus} x {dep.gpu.name} "
            f"({dep.gpus_per_node} per node): {s['num_plans']} plans = {s['num_layouts']} "
            f"parallel layouts x {s['num_knob_settings']} dtype/engine settings, out of "
            f"{s['num_candidates']} candidates"
        )
        lines = [
            head,
            "",
            "Plans per axis value:",
        ]
        width = max(len(name) for name in s["axes"])
        for name, counts in s["axes"].items():
            values = " · ".join(f"{value}: {count}" for value, count in counts.items())
            lines.append(f"  {name:<{width}}  {values}")
        lines += ["", "Candidates left out by the validity rules:"]
        lines += _count_lines(s["left_out"]) or ["  none"]
        lines += ["", f"Plans that do not fit in memory (OOM), of {s['num_plans']}:"]
        lines += _count_lines(s["oom"]) or ["  none"]
        lines += ["", "Plans that fit but vLLM refuses to start (INFEASIBLE):"]
        lines += _count_lines(s["refused"]) or ["  none"]
        lines.append(f"  {s['fit']:>7}  fit and start")
        if "rejecting" in s:
            lines += ["", "Plans that fit but reject some request of the workload:"]
            lines += _count_lines(s["rejecting"]) or ["  none"]
        return "\n".join(lines)


def _count_lines(counts: Mapping[str, int]) -> list[str]:
    return [f"  {count:>7}  {reason}" for reason, count in counts.items() if count]


def _value_counts(values: Sequence[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        out[str(value)] = out.get(str(value), 0) + 1
    return out


def _cell_text(gpus: int, stage: int, text: str) -> str:
    replicas = stage // gpus
    return text if replicas == 1 else f"DP{replicas}×{text}"


def _axis_values(plans: np.ndarray, plan_set: PlanSet) -> list[tuple[str, list[Any]]]:
    model = plan_set.deployment.model
    dicts = [plan_to_dict(row) for row in plans]
    out: list[tuple[str, list[Any]]] = [
        ("dp", [d["dp"] for d in dicts]),
        ("pp", [d["pp"] for d in dicts]),
        ("stage GPUs (tp)", [d["tp"] for d in dicts]),
    ]
    if model.is_encoder_decoder:
        out.append(
            (
                "encoder",
                [_cell_text(d["enc_tp"], d["tp"], f"TP{d['enc_tp']}") for d in dicts],
            )
        )
    out.append(
        ("attention", [_cell_text(d["attn_tp"], d["tp"], f"TP{d['attn_tp']}") for d in dicts])
    )
    ffn = []
    for d in dicts:
        mlp_tp, ep = int(d["mlp_tp"]), int(d["ep"])
        if ep == 1:
            inner = f"TP{mlp_tp}"
        else:
            inner = f"EP{ep}" if mlp_tp == ep else f"EP{ep}×TP{mlp_tp // ep}"
        ffn.append(_cell_text(mlp_tp, d["tp"], inner))
    out += [
        ("moe" if model.is_moe else "mlp", ffn),
        ("weight dtype", [d["weight_dtype"] for d in dicts]),
        ("kv dtype", [d["kv_dtype"] for d in dicts]),
        ("act dtype", [d["act_dtype"] for d in dicts]),
        ("max_num_seqs", [d["max_num_seqs"] for d in dicts]),
        (
            "token budget",
            [
                f"{'chunk' if d['chunked_prefill'] else 'budget'} {d['max_num_batched_tokens']}"
                for d in dicts
            ],
        ),
        ("block size", [d["block_size"] for d in dicts]),
        ("gpu_mem_util", [d["gpu_mem_util"] for d in dicts]),
        (
            "gpu clock",
            [f"{d['gpu_clock_mhz']} MHz" if d["gpu_clock_mhz"] else "boost" for d in dicts],
        ),
    ]
    return out


def _oom_reasons(plans: np.ndarray, mem: MemoryPlan, dep: Deployment) -> dict[str, int]:
    util = plans[:, COL["gpu_mem_util_permille"]] / 1000.0
    usable = util * dep.gpu.hbm_capacity_bytes - ENGINE_RESERVE_BYTES
    weights = mem.is_oom & (mem.weight_bytes >= usable)
    return {
        OOM_WEIGHTS: int(weights.sum()),
        OOM_ACTIVATIONS: int((mem.is_oom & ~weights).sum()),
    }


def _rejecting_reasons(
    plans: np.ndarray, mem: MemoryPlan, dep: Deployment, workload: Workload, live: np.ndarray
) -> dict[str, int]:
    """Plans that start (``live``, ``[P]`` bool) but where some request can never be served,
    by the first reason (the same tests as :func:`apex_jax.reference.rejected_requests`, on
    one replica lane)."""
    prompt = np.asarray(workload.prompt_tokens, np.int64)
    total = prompt + np.asarray(workload.output_tokens, np.int64)
    pp = plans[:, COL["pp"]].astype(np.int64)
    blocks_per_lane = mem.num_kv_blocks // pp
    usable = blocks_per_lane - (dep.engine.watermark * blocks_per_lane).astype(np.int64)
    block = plans[:, COL["block_size"]].astype(np.int64)
    longest = -(-(int(total.max()) - 1) // block)
    over_budget = (plans[:, COL["chunked_prefill"]] == 0) & (
        int(prompt.max()) > plans[:, COL["max_num_batched_tokens"]]
    )
    kv = longest > usable
    length = live & (int(total.max()) > int(dep.engine.max_model_len))
    budget = live & ~length & over_budget
    return {
        INFEASIBLE_LENGTH: int(length.sum()),
        INFEASIBLE_BUDGET: int(budget.sum()),
        INFEASIBLE_KV: int((live & ~length & ~budget & kv).sum()),
    }


def build_plan_set(deployment: Deployment, space: PlanSpace) -> PlanSet:
    """Enumerate ``space`` for ``deployment`` and size every plan's memory, vectorised."""
    engine = deployment.engine
    enumeration = enumerate_space(
        space,
        num_gpus=deployment.num_gpus,
        gpus_per_node=deployment.gpus_per_node,
        model=deployment.model,
        max_clock_mhz=deployment.gpu.max_clock_mhz,
        max_model_len=engine.max_model_len,
        auto_budget={0: engine.default_budget(False), 1: engine.default_budget(True)},
    )
    memory = memory_plan(enumeration.plans, deployment.model, deployment.gpu)
    return PlanSet(deployment, space, enumeration, memory)
