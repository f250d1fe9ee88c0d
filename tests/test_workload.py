"""Tests for workloads: bundled traces, trace formats, generators and config dicts."""

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from apex_jax import workload as wl
from apex_jax.paths import bundled_path

# Request counts per family and dataset, from data/traces/SOURCES.md.
TRACE_COUNTS = {
    ("llama", "lmsys"): 1024,
    ("llama", "creation"): 512,
    ("llama", "summarization"): 1302,
    ("mistral", "lmsys"): 1024,
    ("mistral", "creation"): 725,
    ("mistral", "summarization"): 1039,
}
RATES = ("05", "025")
VALIDATION_TABLE = bundled_path("validation/vllm_h100_dev.csv")
SERVED_FILES = sorted(bundled_path("validation/served").glob("*.csv"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _assert_valid(workload: wl.Workload) -> None:
    n = workload.num_requests
    assert workload.arrival_s.dtype == np.float64
    assert workload.prompt_tokens.dtype == np.int32
    assert workload.output_tokens.dtype == np.int32
    assert workload.arrival_s.shape == workload.prompt_tokens.shape == (n,)
    assert workload.output_tokens.shape == (n,)
    assert np.all(np.diff(workload.arrival_s) >= 0)
    assert np.all(workload.arrival_s >= 0)
    assert np.all(workload.prompt_tokens >= 1)
    assert np.all(workload.output_tokens >= 1)


# --------------------------------------------------------------------------------------------
# Bundled traces
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize(("family", "dataset"), sorted(TRACE_COUNTS))
def test_every_bundled_trace_loads_with_its_documented_count(family, dataset, rate):
    workload = wl.load_trace(f"{family}/{dataset}_{rate}.csv")
    assert workload.num_requests == TRACE_COUNTS[(family, dataset)]
    assert workload.name == f"{family}/{dataset}_{rate}"
    assert workload.concurrency == 0
    _assert_valid(workload)


def test_bundled_trace_folder_holds_exactly_the_documented_files():
    root = bundled_path("traces/apex_plus")
    found = {p.relative_to(root).as_posix() for p in root.glob("*/*.csv")}
    expected = {f"{f}/{d}_{r}.csv" for (f, d) in TRACE_COUNTS for r in RATES}
    assert found == expected
    assert bundled_path("traces/SOURCES.md").is_file()
    assert bundled_path("validation/SOURCES.md").is_file()


def test_both_rates_hold_the_same_requests_at_different_times():
    fast = wl.load_trace("llama/lmsys_05.csv")
    slow = wl.load_trace("llama/lmsys_025.csv")
    np.testing.assert_array_equal(fast.prompt_tokens, slow.prompt_tokens)
    np.testing.assert_array_equal(fast.output_tokens, slow.output_tokens)
    assert slow.arrival_s[-1] > 1.5 * fast.arrival_s[-1]


def test_bundled_trace_means_match_sources_md():
    lmsys = wl.load_trace("llama/lmsys_05.csv")
    summarization = wl.load_trace("llama/summarization_05.csv")
    assert lmsys.prompt_tokens.mean() == pytest.approx(61.7, abs=0.1)
    assert lmsys.output_tokens.mean() == pytest.approx(162.1, abs=0.1)
    assert summarization.prompt_tokens.mean() == pytest.approx(2753.1, abs=0.1)
    # The first request of lmsys_05, read independently with the csv module.
    with bundled_path("traces/apex_plus/llama/lmsys_05.csv").open() as stream:
        first = next(csv.DictReader(stream))
    assert lmsys.arrival_s[0] == float(first["arrival_s"])
    assert lmsys.prompt_tokens[0] == int(first["prompt_tokens"])


@pytest.mark.parametrize(
    "spelling",
    [
        "lmsys_05.csv",
        "lmsys_05",
        "llama/lmsys_05.csv",
        "apex_plus/llama/lmsys_05.csv",
        "traces/apex_plus/llama/lmsys_05.csv",
        str(bundled_path("traces/apex_plus/llama/lmsys_05.csv")),
    ],
)
def test_bundled_name_spellings_resolve_to_the_same_trace(spelling):
    workload = wl.load_trace(spelling)
    reference = wl.load_trace("llama/lmsys_05.csv")
    assert workload.name == "llama/lmsys_05"
    np.testing.assert_array_equal(workload.arrival_s, reference.arrival_s)


def test_bare_names_default_to_llama_and_families_differ():
    assert wl.load_trace("creation_05.csv").num_requests == 512
    assert wl.load_trace("mistral/creation_05.csv").num_requests == 725


def test_a_relative_path_on_disk_wins_over_a_bundled_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "lmsys_05.csv", "request_id,arrival_s,prompt_tokens,output_tokens\na,1,2,3\n")
    workload = wl.load_trace("lmsys_05.csv")
    assert workload.num_requests == 1
    assert workload.name == "lmsys_05"


def test_an_unknown_name_lists_the_bundled_traces():
    with pytest.raises(FileNotFoundError, match="llama/lmsys_05.csv"):
        wl.load_trace("no_such_trace.csv")


def test_name_argument_overrides_the_default():
    assert wl.load_trace("lmsys_05.csv", name="chat").name == "chat"


# --------------------------------------------------------------------------------------------
# Validation files
# --------------------------------------------------------------------------------------------


def test_served_files_have_the_trace_columns():
    assert len(SERVED_FILES) == 14
    for path in SERVED_FILES:
        with path.open() as stream:
            header = next(csv.reader(stream))
        assert header == ["request_id", "arrival_s", "prompt_tokens", "output_tokens"]


@pytest.mark.parametrize("path", SERVED_FILES, ids=lambda p: p.stem)
def test_every_served_validation_csv_loads(path):
    workload = wl.load_trace(f"validation/served/{path.name}")
    assert workload.name == f"served/{path.stem}"
    _assert_valid(workload)
    dataset = path.stem.split("_")[1]
    dp_creation = dataset == "creation" and not path.stem.endswith(("1DP4TP", "1DP8TP"))
    expected = 803 if dp_creation else TRACE_COUNTS[("llama", dataset)]
    assert workload.num_requests == expected


def test_every_validation_row_names_a_served_file_that_loads():
    with VALIDATION_TABLE.open() as stream:
        rows = list(csv.DictReader(stream))
    assert rows
    replicas: dict[str, set[int]] = {}
    for row in rows:
        served = wl.load_trace(row["served_trace"])
        assert served.name == row["served_trace"].removesuffix(".csv")
        dp = int(row["dp"])
        parts = served.split_round_robin(dp)
        assert sum(p.num_requests for p in parts) == served.num_requests
        replicas.setdefault(row["served_trace"], set()).add(int(row["replica"]))
        assert int(row["replica"]) < dp
    # One row per data-parallel instance.
    for served_trace, seen in replicas.items():
        dp = int(served_trace.removesuffix(".csv").split("_")[-1].split("DP")[0])
        assert seen == set(range(dp))


def test_served_lmsys_keeps_the_trace_arrivals_but_serves_fewer_tokens():
    trace = wl.load_trace("llama/lmsys_05.csv")
    served = wl.load_trace("validation/served/llama_lmsys_05_1DP2TP.csv")
    np.testing.assert_array_equal(served.arrival_s, trace.arrival_s)
    assert served.output_tokens.sum() < 0.5 * trace.output_tokens.sum()


# --------------------------------------------------------------------------------------------
# Other formats
# --------------------------------------------------------------------------------------------


def test_vidur_splitwise_csv_loads(tmp_path):
    path = _write(
        tmp_path / "splitwise.csv",
        "arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,374,44\n4.3,396,109\n4.5,10,1\n",
    )
    workload = wl.load_trace(path)
    assert workload.name == "splitwise"
    np.testing.assert_array_equal(workload.arrival_s, [0.0, 4.3, 4.5])
    np.testing.assert_array_equal(workload.prompt_tokens, [374, 396, 10])
    np.testing.assert_array_equal(workload.output_tokens, [44, 109, 1])
    _assert_valid(workload)


def test_unsorted_arrivals_are_sorted_stably_with_a_warning(tmp_path, caplog):
    path = _write(
        tmp_path / "unsorted.csv",
        "arrived_at,num_prefill_tokens,num_decode_tokens\n2.0,1,1\n1.0,2,2\n2.0,3,3\n1.0,4,4\n",
    )
    with caplog.at_level("WARNING", logger="apex_jax.workload"):
        workload = wl.load_trace(path)
    np.testing.assert_array_equal(workload.arrival_s, [1.0, 1.0, 2.0, 2.0])
    np.testing.assert_array_equal(workload.prompt_tokens, [2, 4, 1, 3])
    (record,) = caplog.records
    assert "not sorted (line 3 arrives at 1 s, before line 2 at 2 s)" in record.getMessage()
    assert "4 requests were reordered" in record.getMessage()


def test_sorted_trace_loads_without_a_warning(caplog):
    with caplog.at_level("WARNING", logger="apex_jax.workload"):
        wl.load_trace("lmsys_05")
    assert not caplog.records


def _jsonl(path: Path, offsets: list[float]) -> Path:
    records = [{"StartTimeOffset": t, "ContextTokens": 5, "GeneratedTokens": 2} for t in offsets]
    return _write(path, "".join(json.dumps(r) + "\n" for r in records))


def test_jsonl_offsets_in_seconds_are_rejected_naming_the_unit(tmp_path):
    # An hour of requests, written in seconds: read as the format's nanoseconds, the whole
    # trace would last 3.6 microseconds.
    path = _jsonl(tmp_path / "seconds.jsonl", list(np.linspace(0.0, 3600.0, 50)))
    with pytest.raises(ValueError) as error:
        wl.load_trace(path)
    message = str(error.value)
    assert "'StartTimeOffset' read in ns" in message
    assert "time_unit=" in message and "\n" not in message
    workload = wl.load_trace(path, time_unit="s")
    assert workload.arrival_s[-1] == pytest.approx(3600.0)


@pytest.mark.parametrize(("unit", "scale"), [("s", 1.0), ("ms", 1e-3), ("us", 1e-6)])
def test_time_unit_scales_csv_arrivals(tmp_path, unit, scale):
    path = _write(tmp_path / "t.csv", HEADER + "a,0,3,4\nb,1500,3,4\n")
    workload = wl.load_trace(path, time_unit=unit)
    assert workload.arrival_s[1] == pytest.approx(1500 * scale)


def test_time_unit_in_a_workload_dict(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [0.0, 2.0])
    spec = {"kind": "trace", "path": str(path), "time_unit": "s"}
    assert wl.workload_from_dict(spec).arrival_s[-1] == 2.0


def test_unknown_time_unit_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="time_unit must be one of s, ms, us, ns"):
        wl.load_trace("lmsys_05", time_unit="minutes")


@pytest.mark.parametrize(
    ("arrival", "fragment"),
    [
        ("1700000000000000000", "years after time 0"),  # epoch nanoseconds in arrival_s
        ("1e308", "years after time 0"),
    ],
)
def test_arrivals_beyond_a_year_are_rejected(tmp_path, arrival, fragment):
    path = _write(tmp_path / "epoch.csv", HEADER + f"a,{arrival},3,4\n")
    with pytest.raises(ValueError) as error:
        wl.load_trace(path)
    message = str(error.value)
    assert "line 2, column 'arrival_s'" in message
    assert fragment in message and "subtract the first arrival" in message


def test_workload_arrays_beyond_a_year_are_rejected():
    with pytest.raises(ValueError, match="at most 31536000 s"):
        wl.Workload("w", [0.0, 1e308], [1, 1], [1, 1])


def test_apex_jsonl_loads_and_converts_nanoseconds(tmp_path):
    records = [
        {"StartTimeOffset": 0, "ContextTokens": 12, "GeneratedTokens": 3},
        {"StartTimeOffset": 2_500_000_000, "ContextTokens": 7, "GeneratedTokens": 9},
        {"StartTimeOffset": 1_250_000_000, "ContextTokens": 5, "GeneratedTokens": 1},
    ]
    path = _write(tmp_path / "trace.jsonl", "\n".join(json.dumps(r) for r in records) + "\n")
    workload = wl.load_trace(path)
    np.testing.assert_allclose(workload.arrival_s, [0.0, 1.25, 2.5])
    np.testing.assert_array_equal(workload.prompt_tokens, [12, 5, 7])
    np.testing.assert_array_equal(workload.output_tokens, [3, 1, 9])
    _assert_valid(workload)


def test_jsonl_is_detected_by_content(tmp_path):
    path = _write(
        tmp_path / "trace.txt",
        '{"StartTimeOffset": 1000000000, "ContextTokens": 4, "GeneratedTokens": 2}\n',
    )
    assert wl.load_trace(path).arrival_s[0] == pytest.approx(1.0)


def test_vidur_length_only_csv_points_to_poisson(tmp_path):
    path = _write(tmp_path / "lengths.csv", "num_prefill_tokens,num_decode_tokens\n10,2\n")
    with pytest.raises(ValueError, match="poisson") as error:
        wl.load_trace(path)
    assert "'dist': 'file'" in str(error.value)


# --------------------------------------------------------------------------------------------
# Malformed files
# --------------------------------------------------------------------------------------------

HEADER = "request_id,arrival_s,prompt_tokens,output_tokens\n"


def test_non_numeric_prompt_on_line_3(tmp_path):
    path = _write(tmp_path / "bad.csv", HEADER + "a,0.5,10,5\nb,1.0,ten,5\n")
    with pytest.raises(ValueError, match="line 3") as error:
        wl.load_trace(path)
    message = str(error.value)
    assert "bad.csv" in message
    assert "'prompt_tokens'" in message
    assert "'ten'" in message
    assert "Fix" in message


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ("a,-1.0,10,5\n", ["line 2", "'arrival_s'", ">= 0"]),
        ("a,0.5,0,5\n", ["line 2", "'prompt_tokens'", "prompt_tokens must be >= 1"]),
        ("a,0.5,3,0\n", ["line 2", "'output_tokens'", "output_tokens must be >= 1"]),
        ("a,0.5,3,4\nb,nan,3,4\n", ["line 3", "'arrival_s'", "NaN"]),
        ("a,0.5,nan,4\n", ["line 2", "'prompt_tokens'", "NaN"]),
        ("a,0.5,2.5,4\n", ["line 2", "'prompt_tokens'", "whole number"]),
        ("a,0.5,3\n", ["line 2", "'output_tokens'", "missing"]),
        ("a,0.5,3,4,extra\n", ["line 2", "fields"]),
    ],
)
def test_malformed_values_name_file_line_and_column(tmp_path, body, fragments):
    path = _write(tmp_path / "bad.csv", HEADER + body)
    with pytest.raises(ValueError) as error:
        wl.load_trace(path)
    message = str(error.value)
    assert "bad.csv" in message
    for fragment in fragments:
        assert fragment in message


def test_missing_column_is_named(tmp_path):
    path = _write(tmp_path / "bad.csv", "request_id,arrival_s,prompt_tokens\na,0.5,3\n")
    with pytest.raises(ValueError, match="missing column 'output_tokens'") as error:
        wl.load_trace(path)
    assert "line 1" in str(error.value)


def test_unknown_header_lists_the_formats(tmp_path):
    path = _write(tmp_path / "bad.csv", "a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="arrived_at"):
        wl.load_trace(path)


@pytest.mark.parametrize("text", ["", "\n\n", HEADER])
def test_empty_trace_is_an_error(tmp_path, text):
    path = _write(tmp_path / "trace.csv", text)
    with pytest.raises(ValueError, match="(the file is empty|has no requests)"):
        wl.load_trace(path)


def test_bad_jsonl_line_is_reported(tmp_path):
    good = json.dumps({"StartTimeOffset": 0, "ContextTokens": 1, "GeneratedTokens": 1})
    path = _write(tmp_path / "bad.jsonl", f"{good}\n{{not json\n")
    with pytest.raises(ValueError, match="line 2"):
        wl.load_trace(path)
    path = _write(tmp_path / "missing.jsonl", f"{good}\n" + '{"ContextTokens": 1}\n')
    with pytest.raises(ValueError, match="line 2, column 'StartTimeOffset'"):
        wl.load_trace(path)


# --------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [-1.0, 0.0, float("inf"), float("nan")])
def test_poisson_rejects_bad_rates(rate):
    with pytest.raises(ValueError, match="rate_per_s"):
        wl.poisson(10, rate, 10, 10)


def test_poisson_negative_rate_message():
    with pytest.raises(ValueError, match=r"rate_per_s must be > 0 \(got -1.0\)"):
        wl.poisson(10, -1.0, 10, 10)


def test_poisson_is_reproducible_by_seed():
    lengths = {"dist": "uniform", "low": 1, "high": 100}
    a = wl.poisson(100, 2.0, lengths, lengths, seed=3)
    b = wl.poisson(100, 2.0, lengths, lengths, seed=3)
    c = wl.poisson(100, 2.0, lengths, lengths, seed=4)
    np.testing.assert_array_equal(a.arrival_s, b.arrival_s)
    np.testing.assert_array_equal(a.prompt_tokens, b.prompt_tokens)
    np.testing.assert_array_equal(a.output_tokens, b.output_tokens)
    assert not np.array_equal(a.arrival_s, c.arrival_s)


def test_poisson_arrivals_follow_the_rate():
    rate_per_s = 4.0
    workload = wl.poisson(20_000, rate_per_s, 16, 8, seed=0)
    _assert_valid(workload)
    gaps_s = np.diff(np.concatenate([[0.0], workload.arrival_s]))
    # The standard error of the mean gap is (1 / rate) / sqrt(20000), about 0.7 %.
    assert gaps_s.mean() == pytest.approx(1.0 / rate_per_s, rel=0.03)
    assert gaps_s.std() == pytest.approx(1.0 / rate_per_s, rel=0.05)
    # The first arrival is the first exponential gap, drawn first from the seeded generator.
    first_gap_s = np.random.default_rng(0).exponential(1.0 / rate_per_s)
    assert workload.arrival_s[0] == pytest.approx(first_gap_s)
    assert workload.arrival_s[0] > 0
    assert np.all(workload.prompt_tokens == 16)
    assert np.all(workload.output_tokens == 8)


def test_poisson_uniform_lengths_include_both_ends():
    workload = wl.poisson(5000, 1.0, {"dist": "uniform", "low": 3, "high": 5}, 1)
    assert set(np.unique(workload.prompt_tokens)) == {3, 4, 5}


def test_poisson_lognormal_mean_is_the_token_mean():
    spec = {"dist": "lognormal", "mean": 200.0, "sigma": 0.5}
    workload = wl.poisson(20_000, 1.0, spec, spec, seed=1)
    assert workload.prompt_tokens.mean() == pytest.approx(200.0, rel=0.03)
    assert workload.output_tokens.min() >= 1


def test_poisson_file_lengths_sample_pairs(tmp_path):
    path = _write(
        tmp_path / "lengths.csv",
        "num_prefill_tokens,num_decode_tokens,num_total_tokens\n100,1,101\n200,2,202\n300,3,303\n",
    )
    spec = {"dist": "file", "path": str(path)}
    workload = wl.poisson(300, 1.0, spec, spec, seed=2)
    # Pairs are kept together: output = prompt / 100 in this file.
    np.testing.assert_array_equal(workload.output_tokens * 100, workload.prompt_tokens)
    assert set(np.unique(workload.prompt_tokens)) == {100, 200, 300}


def test_poisson_file_lengths_accept_a_bundled_name():
    spec = {"dist": "file", "path": "llama/summarization_05.csv"}
    trace = wl.load_trace("llama/summarization_05.csv")
    workload = wl.poisson(50, 1.0, spec, 7)
    assert set(workload.prompt_tokens) <= set(trace.prompt_tokens)
    assert np.all(workload.output_tokens == 7)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"dist": "gamma"}, "'dist'"),
        ({"dist": "uniform", "low": 1}, "missing key 'high'"),
        ({"dist": "uniform", "low": 1, "high": 2, "mode": 1}, "unknown key 'mode'"),
        ({"dist": "uniform", "low": 5, "high": 2}, "high"),
        (0, "prompt_tokens must be >= 1"),
    ],
)
def test_poisson_rejects_bad_length_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        wl.poisson(10, 1.0, spec, 1)


def test_static_batch_shape():
    workload = wl.static_batch(8, isl=128, osl=32)
    _assert_valid(workload)
    assert workload.num_requests == 8
    assert workload.concurrency == 0
    np.testing.assert_array_equal(workload.arrival_s, np.zeros(8))
    np.testing.assert_array_equal(workload.prompt_tokens, np.full(8, 128))
    np.testing.assert_array_equal(workload.output_tokens, np.full(8, 32))


def test_closed_loop_shape():
    workload = wl.closed_loop(concurrency=4, isl=64, osl=16, num_requests=10)
    _assert_valid(workload)
    assert workload.num_requests == 10
    assert workload.concurrency == 4
    np.testing.assert_array_equal(workload.arrival_s, np.zeros(10))
    assert np.all(workload.prompt_tokens == 64)
    assert np.all(workload.output_tokens == 16)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: wl.closed_loop(0, 1, 1, 10), "concurrency"),
        (lambda: wl.closed_loop(2, 1, 1, 0), "num_requests"),
        (lambda: wl.static_batch(0, 1, 1), "batch_size"),
        (lambda: wl.static_batch(1, 0, 1), "isl"),
        (lambda: wl.static_batch(1, 1, 2.5), "osl"),
    ],
)
def test_generators_validate_their_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------------------------
# The Workload object
# --------------------------------------------------------------------------------------------


@given(
    num_requests=st.integers(min_value=0, max_value=60),
    num_replicas=st.integers(min_value=1, max_value=9),
)
def test_split_round_robin_conserves_requests(num_requests, num_replicas):
    arrival_s = np.sort(np.random.default_rng(num_requests).uniform(0, 10, num_requests))
    workload = wl.Workload(
        "w", arrival_s, np.arange(1, num_requests + 1), np.arange(1, num_requests + 1) * 2
    )
    parts = workload.split_round_robin(num_replicas)
    assert len(parts) == num_replicas
    assert sum(p.num_requests for p in parts) == num_requests
    for i in range(num_requests):
        replica = parts[i % num_replicas]
        j = i // num_replicas
        # prompt_tokens[i] == i + 1 identifies request i.
        assert replica.prompt_tokens[j] == i + 1
        assert replica.output_tokens[j] == 2 * (i + 1)
        assert replica.arrival_s[j] == arrival_s[i]
    for part in parts:
        _assert_valid(part)
        assert part.concurrency == 0


@pytest.mark.parametrize(
    ("concurrency", "dp", "expected"), [(10, 4, [3, 3, 2, 2]), (4, 4, [1] * 4)]
)
def test_split_round_robin_shares_closed_loop_clients(concurrency, dp, expected):
    workload = wl.closed_loop(concurrency, 8, 8, 40)
    parts = workload.split_round_robin(dp)
    assert [p.concurrency for p in parts] == expected
    assert sum(p.concurrency for p in parts) == concurrency


def test_split_round_robin_rejects_replicas_without_clients():
    with pytest.raises(ValueError, match="concurrency"):
        wl.closed_loop(2, 8, 8, 40).split_round_robin(4)
    with pytest.raises(ValueError, match="num_replicas"):
        wl.static_batch(4, 1, 1).split_round_robin(0)


def test_head_keeps_the_first_requests():
    trace = wl.load_trace("llama/lmsys_05.csv")
    head = trace.head(10)
    assert head.num_requests == 10
    np.testing.assert_array_equal(head.arrival_s, trace.arrival_s[:10])
    np.testing.assert_array_equal(head.prompt_tokens, trace.prompt_tokens[:10])
    assert trace.head(5000).num_requests == trace.num_requests
    assert wl.closed_loop(3, 1, 1, 10).head(4).concurrency == 3


def test_workload_is_frozen_and_its_arrays_read_only():
    workload = wl.static_batch(2, 3, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        workload.name = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="read-only"):
        workload.prompt_tokens[0] = 9


def test_workload_coerces_dtypes_and_checks_invariants():
    workload = wl.Workload("w", [0, 1], [1.0, 2.0], np.array([3, 4], dtype=np.int64))
    _assert_valid(workload)
    with pytest.raises(ValueError, match="non-decreasing"):
        wl.Workload("w", [1.0, 0.5], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="same length"):
        wl.Workload("w", [0.0, 1.0], [1], [1, 1])
    with pytest.raises(ValueError, match="output_tokens must be >= 1"):
        wl.Workload("w", [0.0], [1], [0])


# --------------------------------------------------------------------------------------------
# workload_from_dict
# --------------------------------------------------------------------------------------------


def test_workload_from_dict_builds_every_kind():
    trace = wl.workload_from_dict({"kind": "trace", "path": "llama/creation_05.csv"})
    assert trace.num_requests == 512
    spec = {
        "kind": "poisson",
        "num_requests": 50,
        "rate": 2.0,
        "prompt_tokens": {"dist": "uniform", "low": 1, "high": 10},
        "output_tokens": 5,
        "seed": 7,
    }
    generated = wl.workload_from_dict(spec)
    direct = wl.poisson(50, 2.0, {"dist": "uniform", "low": 1, "high": 10}, 5, seed=7)
    np.testing.assert_array_equal(generated.arrival_s, direct.arrival_s)
    np.testing.assert_array_equal(generated.prompt_tokens, direct.prompt_tokens)
    batch = wl.workload_from_dict({"kind": "static_batch", "batch_size": 3, "isl": 2, "osl": 1})
    assert batch.num_requests == 3
    loop = wl.workload_from_dict(
        {
            "kind": "closed_loop",
            "concurrency": 2,
            "isl": 2,
            "osl": 1,
            "num_requests": 6,
            "name": "bench",
        }
    )
    assert (loop.concurrency, loop.num_requests, loop.name) == (2, 6, "bench")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"path": "x"}, "missing key 'kind'"),
        ({"kind": "replay"}, "unknown kind 'replay'"),
        ({"kind": "static_batch", "batch_size": 1, "isl": 1}, "missing key 'osl'.*batch_size"),
        ({"kind": "trace", "path": "lmsys_05.csv", "rate": 1}, "unknown key 'rate'.*path"),
        (
            {
                "kind": "poisson",
                "num_requests": 1,
                "rate": 1,
                "rate_per_s": 1,
                "prompt_tokens": 1,
                "output_tokens": 1,
            },
            "not both",
        ),
        (
            {
                "kind": "poisson",
                "num_requests": 1,
                "rate_per_s": -2,
                "prompt_tokens": 1,
                "output_tokens": 1,
            },
            r"rate_per_s must be > 0 \(got -2.0\)",
        ),
    ],
)
def test_workload_from_dict_rejects_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        wl.workload_from_dict(spec)


def test_bundled_path_points_into_the_package():
    path = bundled_path("traces/apex_plus/llama/lmsys_05.csv")
    assert path.is_file()
    assert path.parent.parent.parent.parent == Path(wl.__file__).parent / "data"


def test_closed_loop_lockstep_is_a_checked_option():
    assert not wl.closed_loop(4, 8, 8, 16).lockstep
    spec = {"kind": "closed_loop", "concurrency": 4, "isl": 8, "osl": 8, "num_requests": 16}
    workload = wl.workload_from_dict({**spec, "lockstep": True})
    assert workload.lockstep and workload.split_round_robin(2)[1].lockstep
    assert workload.head(5).lockstep
    with pytest.raises(TypeError, match="lockstep must be true or false"):
        wl.workload_from_dict({**spec, "lockstep": "yes"})


def test_desynchronised_clients_wait_only_in_the_second_round():
    workload = wl.closed_loop(4, 8, 8, 20)
    fractions = workload.think_fractions(20, 4)
    assert np.all(fractions[:4] == 0) and np.all(fractions[8:] == 0)
    # Phases of the second round: sorted, in [0, 1), so sends keep their order.
    assert np.all(np.diff(fractions[4:8]) >= 0)
    assert np.all((fractions[4:8] >= 0) & (fractions[4:8] < 1)) and fractions[4:8].any()
    assert not wl.closed_loop(4, 8, 8, 20, lockstep=True).think_fractions(20, 4).any()


def test_a_repeated_prompt_is_cached_once_an_earlier_request_sent_it():
    # Two prompts drawn in turn by three clients. In the first round (requests 0-2, sent at
    # once) request 2 repeats request 0's prompt: vLLM V1 caches request 0's blocks as it
    # schedules them, before it admits request 2 from behind it, so request 2 hits too.
    w = wl.closed_loop(3, 100, 8, 7, num_prompts=2)
    assert w.prompt_ids.tolist() == [0, 1, 0, 1, 0, 1, 0]
    assert w.cached_prompt_tokens(np.arange(7), 3).tolist() == [0, 0, 100, 100, 100, 100, 100]
    # One engine of a DP2 split sees requests 0, 2, 4, 6 (all prompt 0) with 2 clients.
    assert w.cached_prompt_tokens(np.arange(0, 7, 2), 2).tolist() == [0, 100, 100, 100]
    # Open loop: the same rule.
    assert w.cached_prompt_tokens(np.arange(7), 0).tolist() == [0, 0, 100, 100, 100, 100, 100]
    # Every prompt distinct (the default): nothing is ever cached, whatever the capacity.
    assert not wl.closed_loop(3, 100, 8, 7).cached_prompt_tokens(np.arange(7), 0).any()
    assert not wl.closed_loop(3, 100, 8, 7).cached_prompt_tokens(np.arange(7), 0, 10**9).any()


def test_a_full_prefix_cache_evicts_the_least_recently_used_tail_first():
    # One client, prompts 0, 1, 0, 1 of 100 tokens, 10 output tokens each. When request 2
    # resends prompt 0, request 1 has used 110 tokens since (its prompt and its output), so a
    # cache of C tokens keeps the first C - 110 of prompt 0 (its tail is evicted first).
    w = wl.closed_loop(1, 100, 10, 4, num_prompts=2)
    ids = np.arange(4)
    assert w.cached_prompt_tokens(ids, 1, 1000).tolist() == [0, 0, 100, 100]
    assert w.cached_prompt_tokens(ids, 1, 150).tolist() == [0, 0, 40, 40]
    assert w.cached_prompt_tokens(ids, 1, 110).tolist() == [0, 0, 0, 0]
    assert w.cached_prompt_tokens(ids, 1).tolist() == [0, 0, 100, 100]
    # A cyclic pass over 3 prompts in a cache that the other two and their outputs (202
    # tokens) fill misses every time, as LRU does; a prompt repeated at once is cached.
    cyclic = wl.closed_loop(1, 100, 1, 9, num_prompts=3)
    assert not cyclic.cached_prompt_tokens(np.arange(9), 1, 202).any()
    assert cyclic.cached_prompt_tokens(np.arange(9), 1, 252).tolist() == [0] * 3 + [50] * 6
    twice = wl.Workload("w", np.zeros(3), [100] * 3, [1] * 3, concurrency=1, prompt_ids=[0, 0, 1])
    assert twice.cached_prompt_tokens(np.arange(3), 1, 200).tolist() == [0, 100, 0]
    # The warm-up's requests count as sent before request 0, with request 0's lengths.
    warm = wl.closed_loop(1, 100, 10, 2, num_prompts=2, num_warmup_requests=2)
    assert warm.cached_prompt_tokens(np.arange(2), 1, 150).tolist() == [40, 40]


def test_prompt_ids_follow_split_and_head_and_are_checked():
    w = wl.closed_loop(4, 64, 8, 10, num_prompts=3)
    assert [part.prompt_ids.tolist() for part in w.split_round_robin(2)] == [
        [0, 2, 1, 0, 2],
        [1, 0, 2, 1, 0],
    ]
    assert w.head(4).prompt_ids.tolist() == [0, 1, 2, 0]
    assert w.name.endswith("_p3")
    with pytest.raises(ValueError, match="one id per request"):
        wl.Workload("w", [0.0, 0.0], [5, 5], [1, 1], prompt_ids=[0])
    with pytest.raises(ValueError, match="whole numbers >= 0"):
        wl.Workload("w", [0.0, 0.0], [5, 5], [1, 1], prompt_ids=[0, -1])
    with pytest.raises(ValueError, match="num_prompts"):
        wl.closed_loop(4, 64, 8, 10, num_prompts=-1)
    spec = {"kind": "closed_loop", "concurrency": 2, "isl": 8, "osl": 2, "num_requests": 4}
    assert wl.workload_from_dict(spec | {"num_prompts": 1}).prompt_ids.tolist() == [0] * 4


def test_a_warm_up_caches_its_prompts_for_the_engines_of_its_clients():
    # Pool of 4, 3 clients, a warm-up of 2 (prompts 0, 1 by clients 0, 1): the measured
    # requests start the pool again, so requests 0 and 1 hit in the first round; request 2
    # (prompt 2) does not; from the second round on, every repeat hits as before.
    w = wl.closed_loop(3, 100, 8, 7, num_prompts=4, num_warmup_requests=2)
    assert w.name.endswith("_p4_w2")
    assert w.warmup_prompt_ids.tolist() == [0, 1]
    assert w.cached_prompt_tokens(np.arange(7), 3).tolist() == [100, 100, 0, 0, 100, 100, 100]
    # An engine serving client 2 alone (requests 2 and 5) saw none of the warm-up.
    assert w.cached_prompt_tokens(np.array([2, 5]), 1).tolist() == [0, 0]
    # Without a pool the warm-up's prompts are distinct: nothing is cached, as with none.
    fresh = wl.closed_loop(3, 100, 8, 7, num_warmup_requests=6)
    assert not fresh.cached_prompt_tokens(np.arange(7), 3).any()
    assert w.head(3).warmup_prompt_ids.tolist() == [0, 1]
    assert [p.warmup_prompt_ids.tolist() for p in w.split_round_robin(2)] == [[0], [1]]


def test_warm_up_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="num_warmup_requests"):
        wl.closed_loop(4, 64, 8, 10, num_warmup_requests=-1)
    with pytest.raises(ValueError, match="num_warmup_requests"):
        wl.closed_loop(4, 64, 8, 10, num_warmup_requests=2.5)
    with pytest.raises(ValueError, match="need a closed loop"):
        wl.Workload("w", [0.0], [5], [1], warmup_prompt_ids=[0])
    with pytest.raises(ValueError, match="warmup_prompt_ids must be whole numbers >= 0"):
        wl.Workload("w", [0.0], [5], [1], concurrency=1, warmup_prompt_ids=[-1])
    spec = {"kind": "closed_loop", "concurrency": 2, "isl": 8, "osl": 2, "num_requests": 4}
    pooled = wl.workload_from_dict(spec | {"num_prompts": 1, "num_warmup_requests": 3})
    assert pooled.warmup_prompt_ids.tolist() == [0, 0, 0]


def test_drawn_lengths_stay_in_the_load_generators_range():
    """InferenceX's `--random-range-ratio r`: lengths uniform on `[int(r L), L]`; 1 is
    fixed lengths, 0 reaches down to 1 token; the draws repeat with the seed."""
    w = wl.closed_loop(8, 1000, 100, 4000, range_ratio=0.8, seed=3)
    assert (w.prompt_tokens.min(), w.prompt_tokens.max()) == (800, 1000)
    assert (w.output_tokens.min(), w.output_tokens.max()) == (80, 100)
    assert w.prompt_tokens.mean() == pytest.approx(900, rel=0.01)
    assert w.name.endswith("_r0.8_s3")
    same = wl.workload_from_dict(
        {"kind": "closed_loop", "concurrency": 8, "isl": 1000, "osl": 100}
        | {"num_requests": 4000, "range_ratio": 0.8, "seed": 3}
    )
    np.testing.assert_array_equal(same.output_tokens, w.output_tokens)
    other = wl.closed_loop(8, 1000, 100, 4000, range_ratio=0.8, seed=4)
    assert not np.array_equal(other.prompt_tokens, w.prompt_tokens)
    fixed = wl.closed_loop(8, 1000, 100, 40)
    assert set(fixed.prompt_tokens.tolist()) == {1000} and set(fixed.output_tokens.tolist()) == {100}
    assert fixed.name == "closed_loop_c8_isl1000_osl100_n40"
    wide = wl.closed_loop(4, 3, 2, 400, range_ratio=0.0)
    assert set(wide.prompt_tokens.tolist()) == {1, 2, 3} and set(wide.output_tokens.tolist()) == {1, 2}


@pytest.mark.parametrize("ratio", [1.5, -0.1, float("nan")])
def test_a_range_ratio_outside_zero_to_one_is_one_line_naming_the_key(ratio):
    spec = {"kind": "closed_loop", "concurrency": 2, "isl": 8, "osl": 2, "num_requests": 4}
    with pytest.raises(ValueError, match="range_ratio") as err:
        wl.workload_from_dict(spec | {"range_ratio": ratio})
    assert "\n" not in str(err.value)
    with pytest.raises(TypeError, match="range_ratio"):
        wl.closed_loop(2, 8, 2, 4, range_ratio="0.8")
