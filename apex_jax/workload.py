"""Request workloads: bundled traces, trace files and synthetic generators.

A `Workload` is what the simulator serves: one row per request, with its arrival time in
seconds and its prompt and output lengths in tokens. It lives on the host as NumPy arrays
(time in float64, token counts in int32) sorted by arrival time; the simulator pads and moves
it to the device.

Sources of workloads:

* `load_trace` reads a trace file in one of the formats below, or a trace bundled with the
  package (`"llama/lmsys_05.csv"`, `"validation/served/llama_lmsys_05_1DP2TP.csv"`):

  | format | columns | arrival time unit |
  | --- | --- | --- |
  | APEX+ reduced CSV | `request_id,arrival_s,prompt_tokens,output_tokens` (`request_id` optional) | s |
  | Vidur / Splitwise CSV | `arrived_at,num_prefill_tokens,num_decode_tokens` | s |
  | APEX JSONL | one object per line: `StartTimeOffset`, `ContextTokens`, `GeneratedTokens` | ns |

  `time_unit=` (`"s"`, `"ms"`, `"us"` or `"ns"`) overrides a format's unit. Arrival times are
  offsets from the start of the trace: a value more than a year after time 0 (an absolute
  timestamp, or a unit mix-up) is rejected, and so is a trace whose requests, read in the
  declared unit, arrive more than a million per second on average (a whole one-hour trace
  in seconds read as nanoseconds spans 3.6 microseconds).

  Length-only files (Vidur's `num_prefill_tokens,num_decode_tokens`, or a CSV with
  `prompt_tokens,output_tokens` and no arrival column) carry no arrival times: use them as a
  length distribution of `poisson` (`{"dist": "file", "path": ...}`).
* `poisson`, `static_batch` and `closed_loop` generate synthetic workloads.
* `workload_from_dict` builds any of them from a plain dict (a workload config).

Data-parallel serving replays a round-robin share of the trace on every replica
(`Workload.split_round_robin`), as the APEX+ measurements in `data/validation` did.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import numbers
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from apex_jax.checks import as_count
from apex_jax.paths import DATA_DIR

__all__ = [
    "MAX_ARRIVAL_S",
    "TIME_UNITS",
    "Workload",
    "closed_loop",
    "load_trace",
    "poisson",
    "static_batch",
    "workload_from_dict",
]

_TRACES_DIR = DATA_DIR / "traces" / "apex_plus"
_VALIDATION_DIR = DATA_DIR / "validation"
_DEFAULT_FAMILY = "llama"
_MAX_TOKENS = int(np.iinfo(np.int32).max)
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")

_LOG = logging.getLogger(__name__)

# Seconds per unit of the arrival times a trace may be written in.
TIME_UNITS: dict[str, float] = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
# Arrival offsets end within a year of the trace start. Further out, a value is an absolute
# timestamp or a unit mix-up (epoch nanoseconds read as seconds are 1.7e18 s, where float64
# cannot resolve even minutes, so every latency came out 0), not a trace to replay.
MAX_ARRIVAL_S = 365.0 * 86400.0
# No LLM serving trace averages a million requests per second: a trace that dense was read
# in too small a unit.
_MIN_MEAN_GAP_S = 1e-6


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Workload:
    """A set of requests to serve, sorted by arrival time.

    The arrays are read-only float64 / int32 copies of what was passed in. The constructor
    checks every invariant, so a `Workload` is always valid.

    Attributes:
        name: A label for reports, e.g. `"llama/lmsys_05"`.
        arrival_s: Arrival time of each request in seconds, `[N]` float64, finite, >= 0 and
            non-decreasing.
        prompt_tokens: Prompt length of each request, `[N]` int32, >= 1.
        output_tokens: Number of tokens to generate for each request, `[N]` int32, >= 1.
        concurrency: Closed loop with this many clients when > 0: request `i` is released as
            soon as `i < concurrency + (requests finished so far)`, like
            `vllm bench serve --max-concurrency`. 0 means open loop: requests arrive at
            `arrival_s`.
        lockstep: Closed loop only: every released request is sent at once, so clients whose
            requests finish together stay together; False (the default) spreads the clients'
            second requests over one round, as a measured benchmark's clients drift apart
            (see `think_fractions`).
        prompt_ids: Which prompt each request sends, `[N]` int64 >= 0: requests with equal
            ids send the same prompt, so a later one may find it in the engine's prefix
            cache (see `cached_prompt_tokens`). None (the default) makes every prompt
            distinct (`0 .. N - 1`).
        warmup_prompt_ids: Closed loop only: the prompts a warm-up sent before request 0,
            `[W]` int64 >= 0, warm-up request `w` by client `w mod concurrency`. The warm-up
            is not simulated: benchmark tools wait for it to finish before the measured
            requests (see `closed_loop`), so it leaves the engine empty but for its prefix
            cache, which holds these prompts. None (the default): no warm-up.
    """

    name: str
    arrival_s: np.ndarray  # float64 [N]
    prompt_tokens: np.ndarray  # int32 [N]
    output_tokens: np.ndarray  # int32 [N]
    concurrency: int = 0
    lockstep: bool = False
    prompt_ids: np.ndarray | None = None  # int64 [N]
    warmup_prompt_ids: np.ndarray | None = None  # int64 [W]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"Workload name must be a string (got {self.name!r})")
        arrival_s = _arrival_array(self.arrival_s)
        prompt_tokens = _token_array(self.prompt_tokens, "prompt_tokens")
        output_tokens = _token_array(self.output_tokens, "output_tokens")
        lengths = {arrival_s.shape[0], prompt_tokens.shape[0], output_tokens.shape[0]}
        if len(lengths) != 1:
            raise ValueError(
                "Workload arrays must have the same length (got arrival_s "
                f"{arrival_s.shape[0]}, prompt_tokens {prompt_tokens.shape[0]}, "
                f"output_tokens {output_tokens.shape[0]})"
            )
        concurrency = as_count(self.concurrency, "concurrency", minimum=0)
        if not isinstance(self.lockstep, (bool, np.bool_)):
            raise TypeError(f"Workload lockstep must be true or false (got {self.lockstep!r})")
        object.__setattr__(self, "arrival_s", arrival_s)
        object.__setattr__(self, "prompt_tokens", prompt_tokens)
        object.__setattr__(self, "output_tokens", output_tokens)
        object.__setattr__(self, "concurrency", concurrency)
        object.__setattr__(self, "lockstep", bool(self.lockstep))
        prompt_ids = _prompt_id_array(self.prompt_ids, len(prompt_tokens))
        object.__setattr__(self, "prompt_ids", prompt_ids)
        warmup = self.warmup_prompt_ids
        warmup = _id_array(np.zeros(0) if warmup is None else warmup, "warmup_prompt_ids")
        if len(warmup) and not concurrency:
            raise ValueError("Workload warmup_prompt_ids need a closed loop (concurrency > 0)")
        object.__setattr__(self, "warmup_prompt_ids", warmup)
        # Whether any prompt can hit the prefix cache; without, cached_prompt_tokens is zero
        # for every engine (it runs once per lane and digest, thousands per search).
        is_cacheable = len(warmup) > 0 or len(np.unique(prompt_ids)) < len(prompt_ids)
        object.__setattr__(self, "_is_cacheable", is_cacheable)

    def __repr__(self) -> str:
        lockstep = ", lockstep=True" if self.lockstep else ""
        return (
            f"Workload(name={self.name!r}, num_requests={self.num_requests}, "
            f"concurrency={self.concurrency}{lockstep})"
        )

    def think_fractions(self, num_requests: int, concurrency: int) -> np.ndarray:
        """How long each of a closed loop's requests waits to be sent once released, as a
        fraction of the release time (`[num_requests]` float64; the engine sends a request
        released at `t` at `t (1 + f)`, :func:`apex_jax.simulator.make_lane_inputs`).

        A simulated closed loop of equal requests stays in lockstep: requests prefilled in
        one iteration finish in one iteration and are sent again together, so every round
        prefills the whole round as one burst. Measured clients do not stay together
        (issue 11): per-request frontend and client delays vary, prefill chunks finish
        requests of one round in different iterations, and once apart nothing brings
        clients back together, since a request sent during an iteration joins the next one.
        A benchmark's figures average over its rounds (ten in NVIDIA's silicon runs,
        SOURCES.md), most of which run in that desynchronised steady state. This models
        it directly: the first round is sent at once (as load generators do), and the
        `k`-th of the first `C` finishes (`k = 0 .. C - 1`) waits `k / C` of the time since
        the start, so the second round is spread evenly over one round and later rounds
        keep that spread. The wait is the client's own, so it is not part of any TTFT.
        With `lockstep`, or for open loop, nothing waits.

        Args:
            num_requests: Requests of one closed loop (a lane's share of the workload).
            concurrency: Its clients `C`.
        """
        fractions = np.zeros(num_requests)
        if self.lockstep or concurrency <= 0:
            return fractions
        num_second = max(0, min(2 * concurrency, num_requests) - concurrency)
        phases = np.sort(np.random.default_rng(0).uniform(size=concurrency))
        fractions[concurrency : concurrency + num_second] = phases[:num_second]
        return fractions

    def cached_prompt_tokens(
        self, request_ids: np.ndarray, concurrency: int, capacity_tokens: int | None = None
    ) -> np.ndarray:
        """The prompt tokens of each of one engine's requests whose KV its prefix cache holds
        when the request arrives (`[n]` int64, for `request_ids`, the engine's requests in
        the order it gets them; :func:`apex_jax.simulator.cached_prefix_tokens` keeps the
        whole blocks the engine reuses).

        The rules are vLLM V1's prefix cache (`vllm/v1/core`, on by default,
        `enable_prefix_caching`), which keys every full block of KV by the hash of its tokens
        and everything before them:

        - A request finds its prompt cached when an earlier request of the same engine sent
          the same prompt (equal `prompt_ids`), in a closed loop's first round too. V1 caches
          a block as soon as the scheduler gives it a slot (`KVCacheManager.allocate_slots`
          caches up to the tokens scheduled in that step), and the scheduler serves its
          running requests before it admits a waiting one, so a repeat that waits behind its
          prompt's first request is admitted only once that request's whole prompt has been
          scheduled, and reuses all of it.
        - A prompt that the warm-up sent to the same engine (`warmup_prompt_ids` of the
          engine's clients, request `i` being client `i mod concurrency`'s as
          :func:`apex_jax.evaluate.split_lanes` binds them) was sent before request 0; the
          warm-up's requests are taken to be as long as the engine's first request.
        - With `capacity_tokens` (the engine's KV pages, in tokens), blocks are evicted least
          recently used first: V1 puts a finished request's blocks at the tail of its free
          queue, its last block first so that a prompt's tail goes before its head
          (`SingleTypeKVCacheManager.free`), and takes new blocks from the queue's head.
          Taking the send order as the order of use, a repeated prompt keeps the first
          `capacity_tokens - D` of its tokens (none when negative), where `D` is the tokens
          used since its previous send: the distinct other prompts and the outputs of the
          requests sent in between. A pool that fits the cache hits in full; a cyclic pass
          over a larger one misses every time, as LRU does. None: nothing is evicted.

        With every prompt distinct (the default) nothing is cached.

        Args:
            request_ids: `[n]` indices of the engine's requests into this workload.
            concurrency: The engine's closed-loop clients; 0 for open loop.
            capacity_tokens: Tokens the engine's KV cache holds; None for no eviction.
        """
        request_ids = np.asarray(request_ids, np.int64)
        if not self._is_cacheable:
            return np.zeros(len(request_ids), np.int64)
        prompt = self.prompt_tokens[request_ids].astype(np.int64)
        output = self.output_tokens[request_ids].astype(np.int64)
        ids = self.prompt_ids[request_ids]
        warmup = np.zeros(0, np.int64)
        if len(self.warmup_prompt_ids) and len(request_ids):
            clients = np.arange(len(self.warmup_prompt_ids)) % self.concurrency
            warmup = self.warmup_prompt_ids[np.isin(clients, request_ids % self.concurrency)]
        # The warm-up's requests, then the engine's, in the order they are sent.
        all_ids = np.concatenate([warmup, ids])
        all_prompt = np.concatenate([np.full(len(warmup), prompt[:1].sum()), prompt])
        all_output = np.concatenate([np.full(len(warmup), output[:1].sum()), output])
        cached = np.zeros(len(all_ids), np.int64)
        if len(np.unique(all_ids)) == len(all_ids):
            return cached[len(warmup) :]
        last_sent: dict[int, int] = {}
        for j, prompt_id in enumerate(all_ids.tolist()):
            i = last_sent.get(prompt_id)
            last_sent[prompt_id] = j
            if i is None:
                continue
            if capacity_tokens is None:
                cached[j] = all_prompt[j]
                continue
            _, first = np.unique(all_ids[i + 1 : j], return_index=True)
            used = all_output[i + 1 : j].sum() + all_prompt[i + 1 + first].sum()
            cached[j] = np.clip(capacity_tokens - used, 0, all_prompt[j])
        return cached[len(warmup) :]

    @property
    def num_requests(self) -> int:
        """Number of requests `N`."""
        return int(self.arrival_s.shape[0])

    def split_round_robin(self, num_replicas: int) -> list[Workload]:
        """Splits the requests over data-parallel replicas, round robin.

        Request `i` goes to replica `i % num_replicas` and keeps its arrival time. A closed
        loop's clients are shared as evenly as possible: the first
        `concurrency % num_replicas` replicas get one client more.

        Args:
            num_replicas: Number of replicas `dp`, >= 1.

        Returns:
            `dp` workloads; replica `k` holds requests `k, k + dp, k + 2 dp, ...` and is named
            `f"{name}[{k}::{dp}]"`.

        Raises:
            ValueError: If `num_replicas < 1`, or if a closed loop has fewer clients than
                replicas (a replica without clients would never release a request).
        """
        dp = as_count(num_replicas, "num_replicas", minimum=1)
        if 0 < self.concurrency < dp:
            raise ValueError(
                f"cannot split a closed loop of concurrency {self.concurrency} over {dp} "
                "replicas: every replica needs at least one client; use concurrency >= "
                f"{dp} or fewer replicas"
            )
        base, extra = divmod(self.concurrency, dp)
        return [
            Workload(
                name=f"{self.name}[{k}::{dp}]",
                arrival_s=self.arrival_s[k::dp],
                prompt_tokens=self.prompt_tokens[k::dp],
                output_tokens=self.output_tokens[k::dp],
                concurrency=base + (1 if k < extra else 0),
                lockstep=self.lockstep,
                prompt_ids=self.prompt_ids[k::dp],
                warmup_prompt_ids=self.warmup_prompt_ids[k::dp],
            )
            for k in range(dp)
        ]

    def head(self, n: int) -> Workload:
        """Returns the first `n` requests (all of them if `n >= num_requests`).

        Args:
            n: Number of requests to keep, >= 0.

        Returns:
            A workload named `f"{name}[:{n}]"` with the same concurrency and warm-up.
        """
        n = as_count(n, "n", minimum=0)
        return Workload(
            name=f"{self.name}[:{n}]",
            arrival_s=self.arrival_s[:n],
            prompt_tokens=self.prompt_tokens[:n],
            output_tokens=self.output_tokens[:n],
            concurrency=self.concurrency,
            lockstep=self.lockstep,
            prompt_ids=self.prompt_ids[:n],
            warmup_prompt_ids=self.warmup_prompt_ids,
        )


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _prompt_id_array(values: Any, num_requests: int) -> np.ndarray:
    """Checked read-only int64 prompt ids; `0 .. N - 1` (every prompt distinct) for None."""
    if values is None:
        return _read_only(np.arange(num_requests, dtype=np.int64))
    ids = _id_array(values, "prompt_ids")
    if ids.shape[0] != num_requests:
        raise ValueError(
            f"Workload prompt_ids must have one id per request (got {ids.shape[0]} for "
            f"{num_requests} requests)"
        )
    return ids


def _id_array(values: Any, what: str) -> np.ndarray:
    """Checked read-only int64 prompt ids, `[n]` whole numbers >= 0."""
    ids = _numeric_1d(values, what)
    if not np.all(np.isfinite(ids)) or np.any(ids < 0) or np.any(ids != np.round(ids)):
        raise ValueError(f"Workload {what} must be whole numbers >= 0")
    return _read_only(ids.astype(np.int64))


def _numeric_1d(values: Any, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{what} must be 1-D (got shape {array.shape})")
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise ValueError(f"{what} must hold numbers (got dtype {array.dtype})")
    return array


def _arrival_array(values: Any) -> np.ndarray:
    array = _numeric_1d(values, "arrival_s").astype(np.float64)
    if not np.all(np.isfinite(array)):
        i = int(np.flatnonzero(~np.isfinite(array))[0])
        raise ValueError(f"arrival_s must be finite (request {i} has {array[i]})")
    if array.size and array.min() < 0.0:
        i = int(np.argmin(array))
        raise ValueError(f"arrival_s must be >= 0 (request {i} has {array[i]})")
    if array.size and array.max() > MAX_ARRIVAL_S:
        i = int(np.argmax(array))
        raise ValueError(
            f"arrival_s must be an offset of at most {MAX_ARRIVAL_S:.0f} s (one year) from the "
            f"trace start (request {i} has {array[i]:.6g} s); subtract the first arrival"
        )
    if np.any(np.diff(array) < 0.0):
        i = int(np.flatnonzero(np.diff(array) < 0.0)[0]) + 1
        raise ValueError(
            f"arrival_s must be non-decreasing (request {i} arrives at {array[i]} s, before "
            f"request {i - 1} at {array[i - 1]} s); sort the requests by arrival time"
        )
    return _read_only(array)


def _token_array(values: Any, what: str) -> np.ndarray:
    array = _numeric_1d(values, what)
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array) | (array != np.round(array))
        if np.any(bad):
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{what} must be whole numbers (request {i} has {array[i]})")
    if array.size and array.min() < 1:
        i = int(np.argmin(array))
        raise ValueError(f"{what} must be >= 1 (request {i} has {array[i]})")
    if array.size and array.max() > _MAX_TOKENS:
        i = int(np.argmax(array))
        raise ValueError(f"{what} must be <= {_MAX_TOKENS} (request {i} has {array[i]})")
    return _read_only(array.astype(np.int32))


# --------------------------------------------------------------------------------------------
# Bundled files
# --------------------------------------------------------------------------------------------


def _bundled_name(path: Path) -> str | None:
    """Names a bundled file by its path under the traces or validation folder, or None."""
    for root in (_TRACES_DIR, _VALIDATION_DIR, DATA_DIR):
        try:
            return path.resolve().relative_to(root.resolve()).with_suffix("").as_posix()
        except ValueError:
            continue
    return None


def _bundled_candidates(text: str) -> Iterator[Path]:
    """Yields where a bundled name may live, in order of preference."""
    relative = PurePosixPath(text)
    variants = [relative]
    if not relative.suffix:
        variants.append(relative.with_suffix(".csv"))
    for variant in variants:
        parts = variant.parts
        if parts[0] in ("validation", "traces"):
            yield DATA_DIR / variant
        elif parts[0] == "served":
            yield _VALIDATION_DIR / variant
        elif parts[0] == "apex_plus":
            yield DATA_DIR / "traces" / variant
        elif len(parts) == 1:
            yield _TRACES_DIR / _DEFAULT_FAMILY / variant
        else:
            yield _TRACES_DIR / variant


def _bundled_listing() -> str:
    names = [p.relative_to(_TRACES_DIR).as_posix() for p in sorted(_TRACES_DIR.glob("*/*.csv"))]
    names += [
        p.relative_to(DATA_DIR).as_posix()
        for p in sorted((_VALIDATION_DIR / "served").glob("*.csv"))
    ]
    return ", ".join(names)


def _resolve(path: str | Path) -> tuple[Path, str]:
    """Finds a trace file on disk or among the bundled ones; returns it and a default name."""
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return candidate, _bundled_name(candidate) or candidate.stem
    text = str(path).strip()
    if text and not candidate.is_absolute():
        for bundled in _bundled_candidates(Path(text).as_posix()):
            if bundled.is_file():
                return bundled, _bundled_name(bundled) or bundled.stem
    raise FileNotFoundError(
        f"trace {str(path)!r} is neither a file on disk nor a bundled trace. Bundled traces "
        f"(a bare name means the {_DEFAULT_FAMILY} family): {_bundled_listing()}"
    )


# --------------------------------------------------------------------------------------------
# Trace files
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Format:
    """Column names of one trace format. `arrival` is None for length-only files."""

    label: str
    arrival: str | None
    prompt: str
    output: str
    time_unit: str = "s"


_APEX_JSONL = _Format("APEX JSONL", "StartTimeOffset", "ContextTokens", "GeneratedTokens", "ns")
_CSV_FAMILIES = (
    ("APEX+ CSV", "arrival_s", "prompt_tokens", "output_tokens"),
    ("Vidur/Splitwise CSV", "arrived_at", "num_prefill_tokens", "num_decode_tokens"),
)
_FORMATS_HELP = (
    "accepted formats: APEX+ CSV 'request_id,arrival_s,prompt_tokens,output_tokens'; "
    "Vidur/Splitwise CSV 'arrived_at,num_prefill_tokens,num_decode_tokens'; "
    "APEX JSONL with keys StartTimeOffset (ns unless time_unit= says otherwise), "
    "ContextTokens, GeneratedTokens"
)


def _csv_format(path: Path, header_line: int, header: list[str]) -> _Format:
    columns = set(header)
    for label, arrival, prompt, output in _CSV_FAMILIES:
        if not columns & {arrival, prompt, output}:
            continue
        for needed in (prompt, output):
            if needed not in columns:
                raise ValueError(
                    f"{path}, line {header_line}: missing column '{needed}' (header has "
                    f"{', '.join(header)}). Fix: a {label} needs columns {arrival}, {prompt}, "
                    f"{output}"
                )
        if arrival in columns:
            return _Format(label, arrival, prompt, output)
        return _Format(f"length-only {label}", None, prompt, output)
    raise ValueError(
        f"{path}, line {header_line}: unrecognised header {','.join(header)!r}. Fix: use one "
        f"of the {_FORMATS_HELP}"
    )


def _csv_rows(path: Path) -> tuple[_Format, list[tuple[int, dict[str, Any]]]]:
    with path.open(newline="", encoding="utf-8-sig") as stream:
        reader = csv.reader(stream)
        header: list[str] | None = None
        header_line = 0
        fmt: _Format | None = None
        rows: list[tuple[int, dict[str, Any]]] = []
        for fields in reader:
            if not any(field.strip() for field in fields):
                continue
            line = reader.line_num
            if header is None:
                header = [field.strip() for field in fields]
                header_line = line
                fmt = _csv_format(path, line, header)
                continue
            extra = [field for field in fields[len(header) :] if field.strip()]
            if extra:
                raise ValueError(
                    f"{path}, line {line}: {len(fields)} fields but the header (line "
                    f"{header_line}) has {len(header)}. Fix: remove the extra fields or quote "
                    "values that contain commas"
                )
            rows.append((line, dict(zip(header, fields, strict=False))))
    if fmt is None:
        raise ValueError(f"{path}: the file is empty. Fix: use one of the {_FORMATS_HELP}")
    return fmt, rows


def _jsonl_rows(path: Path) -> tuple[_Format, list[tuple[int, dict[str, Any]]]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    with path.open(encoding="utf-8-sig") as stream:
        for line, text in enumerate(stream, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}, line {line}: not valid JSON ({error.msg}). Fix: write one JSON "
                    "object per line"
                ) from None
            if type(record) is not dict:  # json.loads returns exactly a dict for an object
                raise ValueError(
                    f"{path}, line {line}: expected a JSON object, got "
                    f"{type(record).__name__}. Fix: write one JSON object per line with keys "
                    "StartTimeOffset, ContextTokens, GeneratedTokens"
                )
            rows.append((line, record))
    return _APEX_JSONL, rows


def _is_jsonl(path: Path) -> bool:
    if path.suffix.lower() in _JSONL_SUFFIXES:
        return True
    with path.open(encoding="utf-8-sig") as stream:
        for text in stream:
            if text.strip():
                return text.lstrip().startswith("{")
    return False


def _read_rows(path: Path) -> tuple[_Format, list[tuple[int, dict[str, Any]]]]:
    return _jsonl_rows(path) if _is_jsonl(path) else _csv_rows(path)


def _number(path: Path, line: int, column: str, record: dict[str, Any]) -> float:
    """Reads one numeric cell; NaN is returned and left to the caller to reject."""
    where = f"{path}, line {line}, column '{column}'"
    if column not in record or record[column] is None:
        raise ValueError(
            f"{where}: value is missing. Fix: give every request a value for '{column}'"
        )
    raw = record[column]
    if isinstance(raw, str):
        text = raw.strip()
        try:
            return float(text)
        except ValueError:
            raise ValueError(
                f"{where}: non-numeric value {text!r}. Fix: write a plain number"
            ) from None
    if isinstance(raw, numbers.Real) and not isinstance(raw, bool):
        return float(raw)
    raise ValueError(f"{where}: non-numeric value {raw!r}. Fix: write a plain number")


def _arrival_value(path: Path, line: int, column: str, record: dict[str, Any], unit: str) -> float:
    """Reads one arrival time, in `unit`, and returns it in seconds."""
    where = f"{path}, line {line}, column '{column}'"
    value = _number(path, line, column, record)
    if math.isnan(value):
        raise ValueError(f"{where}: arrival time is NaN. Fix: give the arrival time")
    if math.isinf(value):
        raise ValueError(f"{where}: arrival time is {value}. Fix: give a finite arrival time")
    if value < 0:
        raise ValueError(
            f"{where}: arrival time must be >= 0 (got {value}). Fix: shift the trace so that "
            "it starts at time 0 or later"
        )
    seconds = value * TIME_UNITS[unit]
    if seconds > MAX_ARRIVAL_S:
        raise ValueError(
            f"{where}: arrival {value:.6g} {unit} is {seconds / 86400 / 365:.3g} years after "
            "time 0; arrival times are offsets from the trace start, at most one year. Fix: "
            "subtract the first arrival if these are absolute timestamps, or pass time_unit= "
            f"({', '.join(TIME_UNITS)}) if they are not in {unit}"
        )
    return seconds


def _check_density(path: Path, column: str, unit: str, arrival_s: np.ndarray) -> None:
    """Rejects a trace whose arrivals, read in `unit`, are implausibly dense."""
    span_s = float(arrival_s.max() - arrival_s.min())
    if arrival_s.shape[0] < 2 or span_s <= 0.0:
        return
    mean_gap_s = span_s / (arrival_s.shape[0] - 1)
    if mean_gap_s < _MIN_MEAN_GAP_S:
        others = ", ".join(u for u in TIME_UNITS if u != unit)
        raise ValueError(
            f"{path}: column '{column}' read in {unit} puts all {arrival_s.shape[0]} requests "
            f"within {span_s:.3g} s (over a million requests per second). Fix: if the "
            f"offsets are not in {unit}, pass time_unit= with their unit ({others})"
        )


def _sorted_order(path: Path, rows: list[tuple[int, dict[str, Any]]], arrival_s: np.ndarray):
    """The stable arrival-time order of the rows; warns, naming a line, if it is not the
    file's order."""
    order = np.argsort(arrival_s, kind="stable")
    late = np.flatnonzero(np.diff(arrival_s) < 0.0)
    if late.size:
        i = int(late[0]) + 1
        moved = int(np.count_nonzero(order != np.arange(order.shape[0])))
        _LOG.warning(
            "%s: arrivals are not sorted (line %d arrives at %.6g s, before line %d at "
            "%.6g s); %d requests were reordered by arrival time",
            path,
            rows[i][0],
            arrival_s[i],
            rows[i - 1][0],
            arrival_s[i - 1],
            moved,
        )
    return order


def _token_value(path: Path, line: int, column: str, record: dict[str, Any], what: str) -> int:
    where = f"{path}, line {line}, column '{column}'"
    value = _number(path, line, column, record)
    if math.isnan(value):
        raise ValueError(f"{where}: {what} is NaN. Fix: give the token count")
    if math.isinf(value) or not value.is_integer():
        raise ValueError(f"{where}: {what} must be a whole number (got {value}). Fix: round it")
    if value < 1:
        raise ValueError(
            f"{where}: {what} must be >= 1 (got {int(value)}). Fix: drop the request or give "
            "it at least one token"
        )
    if value > _MAX_TOKENS:
        raise ValueError(f"{where}: {what} must be <= {_MAX_TOKENS} (got {int(value)})")
    return int(value)


def _lengths(
    path: Path, fmt: _Format, rows: list[tuple[int, dict[str, Any]]]
) -> tuple[np.ndarray, np.ndarray]:
    prompt = [_token_value(path, n, fmt.prompt, r, "prompt_tokens") for n, r in rows]
    output = [_token_value(path, n, fmt.output, r, "output_tokens") for n, r in rows]
    return np.asarray(prompt, dtype=np.int32), np.asarray(output, dtype=np.int32)


def _check_not_empty(path: Path, rows: list[tuple[int, dict[str, Any]]]) -> None:
    if not rows:
        raise ValueError(f"{path}: the trace has no requests. Fix: add at least one request")


def load_trace(
    path: str | Path, name: str | None = None, *, time_unit: str | None = None
) -> Workload:
    """Loads a request trace from a file or from the traces bundled with the package.

    The format is detected from the file: JSONL (`.jsonl` or a first line starting with `{`)
    is read as an APEX trace, a CSV by its header (see the module docstring). Requests are
    sorted by arrival time, keeping the file's order on ties; a file that was not sorted
    logs a warning naming the first line out of order.

    Args:
        path: A file on disk, or a bundled name. Bundled names: `"lmsys_05.csv"` (a bare name
            means the llama family), `"mistral/lmsys_05.csv"`,
            `"apex_plus/llama/lmsys_05.csv"`, `"validation/served/<file>.csv"` (also
            `"served/<file>.csv"`, as in the `served_trace` column of the validation table).
            `.csv` may be left out. A relative path that exists on disk wins.
        name: The workload's name. Defaults to the bundled name (`"llama/lmsys_05"`,
            `"served/llama_lmsys_05_1DP2TP"`) or the file's stem.
        time_unit: Unit of the arrival column, one of `TIME_UNITS`; None means the
            format's own (seconds for the CSV formats, nanoseconds for APEX JSONL).

    Returns:
        The trace as an open-loop workload.

    Raises:
        FileNotFoundError: If `path` is neither a file nor a bundled trace.
        ValueError: If the file is malformed; the message names the file, the 1-based line,
            the column and the fix. Also for an empty trace, for a length-only file
            (no arrival times), which should be replayed with `poisson`, for an unknown
            `time_unit`, and for arrival times implausible in the unit read (see the module
            docstring).
    """
    if time_unit is not None and time_unit not in TIME_UNITS:
        raise ValueError(f"time_unit must be one of {', '.join(TIME_UNITS)} (got {time_unit!r})")
    resolved, default_name = _resolve(path)
    fmt, rows = _read_rows(resolved)
    if fmt.arrival is None:
        arrival_column = "arrival_s" if fmt.prompt == "prompt_tokens" else "arrived_at"
        raise ValueError(
            f"{resolved}: a {fmt.label} with columns {fmt.prompt}, {fmt.output} has no "
            f"arrival times (no column '{arrival_column}'). Fix: generate arrivals and sample "
            "the lengths from this file, e.g. poisson(num_requests, rate_per_s, "
            f"prompt_tokens={{'dist': 'file', 'path': {str(path)!r}}}, "
            f"output_tokens={{'dist': 'file', 'path': {str(path)!r}}}), or in a config "
            "{'kind': 'poisson', ...} with the same length specs"
        )
    _check_not_empty(resolved, rows)
    unit = fmt.time_unit if time_unit is None else time_unit
    arrival_s = np.asarray(
        [_arrival_value(resolved, n, fmt.arrival, r, unit) for n, r in rows], dtype=np.float64
    )
    _check_density(resolved, fmt.arrival, unit, arrival_s)
    prompt_tokens, output_tokens = _lengths(resolved, fmt, rows)
    order = _sorted_order(resolved, rows, arrival_s)
    return Workload(
        name=default_name if name is None else name,
        arrival_s=arrival_s[order],
        prompt_tokens=prompt_tokens[order],
        output_tokens=output_tokens[order],
    )


def _load_lengths(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads the prompt and output lengths of any trace or length-only file, in file order."""
    resolved, _ = _resolve(path)
    fmt, rows = _read_rows(resolved)
    _check_not_empty(resolved, rows)
    return _lengths(resolved, fmt, rows)


# --------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------

_LENGTH_KEYS = {
    "uniform": ("low", "high"),
    "lognormal": ("mean", "sigma"),
    "file": ("path",),
}


def _check_keys(spec: Mapping[str, Any], what: str, required: set[str], optional: set[str]) -> None:
    accepted = ", ".join(sorted(required | optional))
    for key in spec:
        if key not in required and key not in optional:
            raise ValueError(f"{what}: unknown key {key!r}; accepted keys: {accepted}")
    for key in sorted(required):
        if key not in spec:
            raise ValueError(f"{what}: missing key {key!r}; accepted keys: {accepted}")


def _finite_real(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number (got {value!r})")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{what} must be finite (got {result})")
    return result


def _sample_lengths(rng: np.random.Generator, n: int, spec: Any, what: str) -> np.ndarray:
    """Draws `n` lengths from a length spec (an int or a `{"dist": ...}` dict), `[n]` int32."""
    if not isinstance(spec, Mapping):
        if isinstance(spec, bool) or not isinstance(spec, numbers.Real):
            raise TypeError(
                f"{what} must be an int >= 1 or a dict with 'dist' in "
                f"{sorted(_LENGTH_KEYS)} (got {spec!r})"
            )
        return np.full(n, as_count(spec, what, minimum=1), dtype=np.int32)
    dist = spec.get("dist")
    if dist not in _LENGTH_KEYS:
        raise ValueError(f"{what}: key 'dist' must be one of {sorted(_LENGTH_KEYS)} (got {dist!r})")
    _check_keys(spec, f"{what} ({dist})", {"dist", *_LENGTH_KEYS[dist]}, set())
    if dist == "uniform":
        low = as_count(spec["low"], f"{what}.low", minimum=1)
        high = as_count(spec["high"], f"{what}.high", minimum=low)
        return rng.integers(low, high, size=n, endpoint=True).astype(np.int32)
    if dist == "lognormal":
        mean = _finite_real(spec["mean"], f"{what}.mean")
        sigma = _finite_real(spec["sigma"], f"{what}.sigma")
        if mean < 1:
            raise ValueError(f"{what}.mean must be >= 1 (got {mean})")
        if sigma < 0:
            raise ValueError(f"{what}.sigma must be >= 0 (got {sigma})")
        mu = math.log(mean) - 0.5 * sigma**2
        lengths = np.rint(rng.lognormal(mu, sigma, size=n))
        return np.clip(lengths, 1, _MAX_TOKENS).astype(np.int32)
    prompt, output = _load_lengths(spec["path"])
    column = prompt if what == "prompt_tokens" else output
    return column[rng.integers(0, column.shape[0], size=n)]


def _same_file(prompt_spec: Any, output_spec: Any) -> bool:
    return (
        isinstance(prompt_spec, Mapping)
        and isinstance(output_spec, Mapping)
        and prompt_spec.get("dist") == "file"
        and output_spec.get("dist") == "file"
        and set(prompt_spec) == {"dist", "path"}
        and set(output_spec) == {"dist", "path"}
        and _resolve(prompt_spec["path"])[0].resolve() == _resolve(output_spec["path"])[0].resolve()
    )


def _positive_rate(rate_per_s: Any) -> float:
    if isinstance(rate_per_s, bool) or not isinstance(rate_per_s, numbers.Real):
        raise TypeError(f"rate_per_s must be a number > 0 (got {rate_per_s!r})")
    rate = float(rate_per_s)
    if math.isnan(rate) or math.isinf(rate):
        raise ValueError(f"rate_per_s must be finite (got {rate})")
    if rate <= 0:
        raise ValueError(f"rate_per_s must be > 0 (got {rate})")
    return rate


def poisson(
    num_requests: int,
    rate_per_s: float,
    prompt_tokens: int | Mapping[str, Any],
    output_tokens: int | Mapping[str, Any],
    seed: int = 0,
    name: str | None = None,
) -> Workload:
    """Generates an open-loop workload with Poisson arrivals.

    Inter-arrival gaps are exponential with mean `1 / rate_per_s`; the first request arrives
    after the first gap, not at 0. Draws come from `numpy.random.default_rng(seed)` in this
    order: the gaps, then the prompt lengths, then the output lengths (one joint draw when
    both come from the same file).

    Length specs (for `prompt_tokens` and `output_tokens`):

    * an int: every request has this length;
    * `{"dist": "uniform", "low": a, "high": b}`: integers in `[a, b]`, both included;
    * `{"dist": "lognormal", "mean": m, "sigma": s}`: log-normal lengths whose arithmetic
      mean is `m` tokens (the underlying normal has mean `log(m) - s**2 / 2` and standard
      deviation `s`), rounded to integers and clipped to >= 1;
    * `{"dist": "file", "path": p}`: lengths sampled with replacement from a trace or a
      length-only file such as Vidur's `arxiv_summarization_stats` (`p` may be a bundled
      name). When both specs name the same file, (prompt, output) pairs are sampled
      together, keeping their correlation.

    Args:
        num_requests: Number of requests `N`, >= 1.
        rate_per_s: Mean arrival rate in requests per second, > 0 and finite.
        prompt_tokens: Length spec of the prompts.
        output_tokens: Length spec of the outputs.
        seed: Seed of the random generator.
        name: The workload's name; defaults to `f"poisson_{rate}rps_n{N}_seed{seed}"`.

    Returns:
        An open-loop workload of `N` requests.

    Raises:
        ValueError: For an invalid count, rate or length spec.
    """
    n = as_count(num_requests, "num_requests", minimum=1)
    rate = _positive_rate(rate_per_s)
    seed = as_count(seed, "seed", minimum=0)
    rng = np.random.default_rng(seed)
    arrival_s = np.cumsum(rng.exponential(1.0 / rate, size=n))
    if _same_file(prompt_tokens, output_tokens):
        prompt_pool, output_pool = _load_lengths(prompt_tokens["path"])
        index = rng.integers(0, prompt_pool.shape[0], size=n)
        prompt, output = prompt_pool[index], output_pool[index]
    else:
        prompt = _sample_lengths(rng, n, prompt_tokens, "prompt_tokens")
        output = _sample_lengths(rng, n, output_tokens, "output_tokens")
    return Workload(
        name=f"poisson_{rate:g}rps_n{n}_seed{seed}" if name is None else name,
        arrival_s=arrival_s,
        prompt_tokens=prompt,
        output_tokens=output,
    )


def static_batch(batch_size: int, isl: int, osl: int) -> Workload:
    """Generates one batch of identical requests, all arriving at time 0.

    Args:
        batch_size: Number of requests, >= 1.
        isl: Input (prompt) length in tokens, >= 1.
        osl: Output length in tokens, >= 1.

    Returns:
        An open-loop workload named `f"static_batch_b{batch_size}_isl{isl}_osl{osl}"`.
    """
    n = as_count(batch_size, "batch_size", minimum=1)
    isl = as_count(isl, "isl", minimum=1)
    osl = as_count(osl, "osl", minimum=1)
    return Workload(
        name=f"static_batch_b{n}_isl{isl}_osl{osl}",
        arrival_s=np.zeros(n),
        prompt_tokens=np.full(n, isl),
        output_tokens=np.full(n, osl),
    )


def closed_loop(
    concurrency: int,
    isl: int,
    osl: int,
    num_requests: int,
    lockstep: bool = False,
    num_prompts: int = 0,
    num_warmup_requests: int = 0,
    range_ratio: float = 1.0,
    seed: int = 0,
) -> Workload:
    """Generates a closed-loop benchmark: `concurrency` clients, each sending a new request
    as soon as its previous one finishes.

    All arrival times are 0; the engine releases request `i` once
    `i < concurrency + (requests finished so far)`, like
    `vllm bench serve --max-concurrency`.

    A warm-up (`num_warmup_requests`, genai-perf's and aiperf's `--warmup-request-count`)
    runs before the measured requests and is in none of their figures. Both tools wait for
    every warm-up request to finish before they send the first measured one: perf_analyzer,
    genai-perf's load generator, joins its warm-up workers and builds new ones
    (`ConcurrencyManager::PerformWarmup`, `LoadManager::WaitForWarmupAndCleanup`), and
    aiperf starts its profiling phase on the warm-up phase's completion. The measured phase
    therefore starts as this workload does, with `concurrency` requests at once on an idle
    engine; what the warm-up leaves behind is its prompts in the prefix cache
    (`Workload.warmup_prompt_ids`), so it is not simulated. perf_analyzer's new workers also
    start the dataset again (worker `t` sends entries `t, t + C, t + 2C, ...`, its
    `InferContext` step counter), so with a pool the measured requests resend the warm-up's
    prompts first. Every figure, throughput included, is then over the measured requests, as
    genai-perf's are (its benchmark duration runs from the first measured request's send to
    the last measured response).

    Args:
        concurrency: Number of clients `C`, >= 1.
        isl: Input (prompt) length in tokens, >= 1.
        osl: Output length in tokens, >= 1.
        num_requests: Total number of requests, >= 1.
        lockstep: Keep the clients in lockstep instead of the desynchronised steady state
            of a measured benchmark (see `Workload.think_fractions`).
        num_prompts: Distinct prompts the requests draw from, in turn (request `i` sends
            prompt `i mod num_prompts`), as a benchmark tool reuses a pool of synthetic
            prompts (aiperf and genai-perf: `--num-dataset-entries`, 100 by default), so
            that repeated prompts may hit the prefix cache (`Workload.cached_prompt_tokens`,
            which also evicts the least recently used prompts once the pool outgrows the
            engine's KV cache; aiperf's default order for synthetic prompts shuffles each
            pass over the pool, which moves when a prompt returns). 0 (the default): every
            request's prompt is distinct, the warm-up's too.
        num_warmup_requests: Requests `W` >= 0 of a warm-up before the measured ones,
            `min(C, W)` clients in a closed loop. With a pool, warm-up request `w` sends
            prompt `w mod num_prompts` and the measured requests start the pool again.
        range_ratio: `r` in `[0, 1]`: each request's prompt and output lengths are drawn
            uniformly from the integers `[int(r * isl), isl]` and `[int(r * osl), osl]`
            (raised to 1 where that bound is 0), as the random dataset of InferenceX's load
            generator draws them (SemiAnalysisAI/InferenceX
            `utils/bench_serving/benchmark_serving.py`, `sample_random_requests`, a copy of
            vLLM's `benchmarks/benchmark_serving.py` before its datasets moved to
            `vllm/benchmarks/datasets.py`; `--random-range-ratio`, which InferenceX's
            `benchmarks/benchmark_lib.sh` always passes). 1 (the default): every request
            is `isl` + `osl` tokens. Uneven outputs make clients finish unevenly, and the
            mean prompt is shorter than `isl`. Note that `vllm bench serve` from vLLM's
            datasets module on reads the same flag differently, as `[floor((1 - r) L),
            ceil((1 + r) L)]` with `r < 1` (its `RandomDataset.sample`), so its 0 is fixed
            lengths and its 0.8 a range of 0.2 L to 1.8 L.
        seed: Seed of `numpy.random.default_rng`, which draws the prompt lengths, then the
            output lengths (only with `range_ratio < 1`).

    Returns:
        A workload of the `num_requests` measured requests with `concurrency == C`, named
        `f"closed_loop_c{C}_isl{isl}_osl{osl}_n{num_requests}"` (with `_p{num_prompts}`,
        `_w{W}` where they are not 0, and `_r{range_ratio}_s{seed}` where the ratio is
        below 1).

    Raises:
        ValueError: For an invalid count, or a `range_ratio` outside `[0, 1]`.
    """
    c = as_count(concurrency, "concurrency", minimum=1)
    isl = as_count(isl, "isl", minimum=1)
    osl = as_count(osl, "osl", minimum=1)
    n = as_count(num_requests, "num_requests", minimum=1)
    pool = as_count(num_prompts, "num_prompts", minimum=0)
    warmup = as_count(num_warmup_requests, "num_warmup_requests", minimum=0)
    ratio = _finite_real(range_ratio, "range_ratio")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"range_ratio must be in [0, 1] (1: fixed lengths); got {ratio:g}")
    seed = as_count(seed, "seed", minimum=0)
    rng = np.random.default_rng(seed)
    prompt, output = (
        rng.integers(max(1, int(ratio * length)), length, size=n, endpoint=True)
        for length in (isl, osl)
    )
    return Workload(
        name=f"closed_loop_c{c}_isl{isl}_osl{osl}_n{n}"
        + (f"_p{pool}" if pool else "")
        + (f"_w{warmup}" if warmup else "")
        + (f"_r{ratio:g}_s{seed}" if ratio < 1.0 else ""),
        arrival_s=np.zeros(n),
        prompt_tokens=prompt,
        output_tokens=output,
        concurrency=c,
        lockstep=lockstep,
        prompt_ids=np.arange(n) % pool if pool else None,
        # Without a pool the warm-up's prompts are distinct from the measured ones.
        warmup_prompt_ids=np.arange(warmup) % pool if pool else np.arange(n, n + warmup),
    )


# --------------------------------------------------------------------------------------------
# From a config dict
# --------------------------------------------------------------------------------------------

# kind -> (required keys, optional keys)
_SPEC_KEYS: dict[str, tuple[set[str], set[str]]] = {
    "trace": ({"path"}, {"name", "time_unit"}),
    "poisson": (
        {"num_requests", "rate_per_s", "prompt_tokens", "output_tokens"},
        {"seed", "name"},
    ),
    "static_batch": ({"batch_size", "isl", "osl"}, {"name"}),
    "closed_loop": (
        {"concurrency", "isl", "osl", "num_requests"},
        {"name", "lockstep", "num_prompts", "num_warmup_requests", "range_ratio", "seed"},
    ),
}


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


def workload_from_dict(spec: Mapping[str, Any]) -> Workload:
    """Builds a workload from a plain dict, such as a workload config.

    Accepted specs (`name` is optional in every kind):

    * `{"kind": "trace", "path": ..., "time_unit" (optional)}` -> `load_trace`;
    * `{"kind": "poisson", "num_requests", "rate_per_s" (alias "rate"), "prompt_tokens",
      "output_tokens", "seed" (optional)}` -> `poisson`;
    * `{"kind": "static_batch", "batch_size", "isl", "osl"}` -> `static_batch`;
    * `{"kind": "closed_loop", "concurrency", "isl", "osl", "num_requests", "lockstep"
      (optional), "num_prompts" (optional), "num_warmup_requests" (optional), "range_ratio"
      (optional), "seed" (optional)}` -> `closed_loop`.

    Args:
        spec: The spec, a mapping with string keys.

    Returns:
        The workload.

    Raises:
        ValueError: For an unknown kind, a missing or unknown key (the message names the key
            and the accepted keys), or invalid values.
    """
    if not isinstance(spec, Mapping):
        raise TypeError(f"a workload spec must be a dict (got {type(spec).__name__})")
    kinds = ", ".join(sorted(_SPEC_KEYS))
    if "kind" not in spec:
        raise ValueError(f"workload spec: missing key 'kind'; accepted kinds: {kinds}")
    kind = spec["kind"]
    if kind not in _SPEC_KEYS:
        raise ValueError(f"workload spec: unknown kind {kind!r}; accepted kinds: {kinds}")
    args = {key: _plain(value) for key, value in spec.items() if key != "kind"}
    if kind == "poisson" and "rate" in args:
        if "rate_per_s" in args:
            raise ValueError(
                "workload spec (poisson): give either 'rate_per_s' or its alias 'rate', not both"
            )
        args["rate_per_s"] = args.pop("rate")
    required, optional = _SPEC_KEYS[kind]
    _check_keys(args, f"workload spec ({kind})", required, optional)
    name = args.pop("name", None)
    if kind == "trace":
        return load_trace(args["path"], name=name, time_unit=args.get("time_unit"))
    if kind == "poisson":
        return poisson(**args, name=name)
    workload = static_batch(**args) if kind == "static_batch" else closed_loop(**args)
    return workload if name is None else dataclasses.replace(workload, name=name)
