"""The harness's own arithmetic and checks: a benchmark that misreads h2load reports nonsense."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import harness  # noqa: E402

# Printed by h2load 1.52 against tokengate (trimmed to the lines the harness reads).
H2LOAD_OUT = """\
finished in 5.00s, 11146.00 req/s, 11.29MB/s
requests: 55730 total, 55858 started, 55730 done, 55730 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 55730 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 56.47MB (59213762) total, 163.77KB (167698) headers (space savings 95.76%), 54.82MB (57484008) data
"""


def test_h2load_summary_is_read():
    load = harness.parse_h2load(H2LOAD_OUT)
    assert (load.done, load.succeeded, load.failed, load.errored) == (55730, 55730, 0, 0)
    assert load.rps == 11146.0
    assert load.data_bytes == 57484008


def test_h2load_summary_in_milliseconds_is_read():
    load = harness.parse_h2load(H2LOAD_OUT.replace("finished in 5.00s", "finished in 999.12ms"))
    assert load.rps == 11146.0


def test_a_summary_without_counts_is_an_error():
    with pytest.raises(harness.BenchError):
        harness.parse_h2load("finished in 5.00s, 1.00 req/s\n")


def test_failed_calls_refuse_the_run():
    load = harness.parse_h2load(H2LOAD_OUT.replace("55730 succeeded, 0 failed",
                                                   "55729 succeeded, 1 failed"))
    with pytest.raises(harness.BenchError):
        harness.verify(load, "http://x", 1000)


def test_trailers_only_answers_refuse_the_run():
    # 55,730 answers of at least 1,100 bytes would be 61 MB; 57 MB means some were errors.
    load = harness.parse_h2load(H2LOAD_OUT)
    harness.verify(load, "http://x", 1000)
    with pytest.raises(harness.BenchError):
        harness.verify(load, "http://x", 1100)


def test_log_latencies_and_failed_streams(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("1764144000000000\t200\t120\n1764144000000200\t200\t80\n")
    assert harness.parse_log(log) == [120, 80]
    log.write_text("1764144000000000\t200\t120\n1764144000000200\t-1\t80\n")
    with pytest.raises(harness.BenchError):
        harness.parse_log(log)


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert harness.percentile(values, 50) == 50
    assert harness.percentile(values, 99) == 99
    assert harness.percentile(values, 100) == 100
    assert harness.percentile([7], 99) == 7
    with pytest.raises(harness.BenchError):
        harness.percentile([], 50)


def results(cpu_ratio: float, added_p50: float, idle_kib: int) -> dict:
    latency = {"p50": 100.0, "p99": 200.0}
    saturation = {"rps": 10000.0, "calls": 1, "cpu_us_per_call": 20.0}
    round_ = {"latency": {n: latency for n in ("tokengate", "echo", "direct")},
              "saturation": {"tokengate": saturation, "echo": saturation},
              "added": {"p50": added_p50, "p99": 100.0}, "cpu_ratio": cpu_ratio}
    return {
        "rounds": [round_, round_, round_],
        "half": {n: {"rps": 5000.0, "p50": 100.0, "p99": 300.0} for n in ("tokengate", "echo")},
        "rss": {"tokengate_idle_kib": idle_kib, "tokengate_idle_anon_kib": 1500, "echo_idle_kib": 4000,
                "tokengate_after_load_kib": 9000, "tokengate_threads": 3},
        "inflight": {"max_in_flight_upstream": 100, "rss_peak_kib": 30000},
        "inflight_uncapped": {"max_in_flight_upstream": 1000, "rss_peak_kib": 50000},
        "startup": {"tokengate": [5.0, 6.0], "echo": [1.0, 2.0]},
        "environment": {"commit": "abc", "date": "d", "cpu": "c", "nproc": 2, "kernel": "k",
                        "governor": "g", "h2load": "h"},
        "settings": harness.Settings().__dict__,
    }


def test_table_marks_each_target():
    met = harness.table(results(cpu_ratio=0.7, added_p50=50, idle_kib=7000))
    assert "**missed**" not in met
    missed = harness.table(results(cpu_ratio=0.5, added_p50=61, idle_kib=9000))
    rows = [line for line in missed.splitlines() if "**missed**" in line]
    assert len(rows) == 3
    assert any(r.startswith("| Throughput per core") for r in rows)
    assert any(r.startswith("| Added latency p50") for r in rows)
    assert any(r.startswith("| RSS idle") for r in rows)
