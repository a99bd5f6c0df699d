"""The harness's own arithmetic and checks: a benchmark that misreads h2load reports nonsense."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import broker  # noqa: E402
import harness  # noqa: E402
import procs  # noqa: E402

# Printed by h2load 1.52 against tokengate (trimmed to the lines the harness reads).
H2LOAD_OUT = """\
finished in 5.00s, 11146.00 req/s, 11.29MB/s
requests: 55730 total, 55858 started, 55730 done, 55730 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 55730 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 56.47MB (59213762) total, 163.77KB (167698) headers (space savings 95.76%), \
54.82MB (57484008) data
"""


def test_h2load_summary_is_read():
    load = harness.parse_h2load(H2LOAD_OUT)
    assert (load.done, load.succeeded, load.failed, load.errored) == (55730, 55730, 0, 0)
    assert load.started == 55858
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


def test_a_forwarding_run_makes_exactly_one_post_per_call():
    load = harness.parse_h2load(H2LOAD_OUT)  # 55,730 done, 55,858 started
    harness.verify_posts("tokengate", "one", 55730, load)
    # Calls cut off at h2load's deadline may have reached the upstream too.
    harness.verify_posts("tokengate", "one", 55858, load)
    with pytest.raises(harness.BenchError):  # a call answered without going upstream
        harness.verify_posts("tokengate", "one", 55729, load)
    with pytest.raises(harness.BenchError):  # more POSTs than calls: retries, or a leak
        harness.verify_posts("tokengate", "one", 55859, load)


def test_a_cache_hit_run_makes_no_post_at_all():
    load = harness.parse_h2load(H2LOAD_OUT)
    harness.verify_posts("hit", "none", 0, load)
    with pytest.raises(harness.BenchError):
        harness.verify_posts("hit", "none", 1, load)


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


def test_redis_commandstats_count_work_not_health_checks():
    info = ("# Commandstats\r\n"
            "cmdstat_ping:calls=40,usec=12,usec_per_call=0.30,rejected_calls=0,failed_calls=0\r\n"
            "cmdstat_info:calls=2,usec=80,usec_per_call=40.00,rejected_calls=0,failed_calls=0\r\n"
            "cmdstat_get:calls=3,usec=9,usec_per_call=3.00,rejected_calls=0,failed_calls=0\r\n"
            "cmdstat_evalsha:calls=1,usec=30,usec_per_call=30.00,rejected_calls=0,"
            "failed_calls=0\r\n")
    stats = procs.parse_commandstats(info)
    assert stats == {"ping": 40, "info": 2, "get": 3, "evalsha": 1}
    assert procs.working_commands(stats) == 4


def test_the_pass_through_client_is_never_cached(tmp_path):
    class Upstream:
        addr = "127.0.0.1:9"

    text = procs.write_config(tmp_path / "a.toml", Upstream()).read_text()
    assert "[cache]" not in text
    pass_through = text.split('client_id = "bench-pass"')[1]
    assert "cache = false" in pass_through
    assert "cache = false" not in text.split('client_id = "bench-pass"')[0]
    text = procs.write_config(tmp_path / "b.toml", Upstream(),
                              cache={"backend": "redis", "key_file": "/k",
                                     "redis_url": "redis://127.0.0.1:1/0",
                                     "refresh_ahead": "5s"}).read_text()
    assert '[cache]\nbackend = "redis"\nkey_file = "/k"\nrefresh_ahead = "5s"\n' in text
    assert '[cache.redis]\nurl = "redis://127.0.0.1:1/0"\n' in text
    # tokengate from before the broker refuses unknown keys: no cache key at all.
    text = procs.write_config(tmp_path / "c.toml", Upstream(), broker=False).read_text()
    assert "cache" not in text


def test_server_counts_watched_lines_across_reads():
    script = ("echo listening 127.0.0.1:1; printf 'connected to re'; sleep 0.2; "
              "echo 'dis; x'; echo 'connected to redis'; sleep 5")
    server = procs.Server("sh", ["sh", "-c", script], None, watch=("connected to redis",))
    try:
        assert server.addr == "127.0.0.1:1"
        server.wait_for("connected to redis", times=2, timeout=5)
        assert server.count("connected to redis") == 2
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# Ratios and verdicts

SUBJECTS = ("echo", "translator", "tokengate", "hit", "hit_redis")


def round_(cpu: dict, p50: dict) -> dict:
    result = {"latency": {n: {"p50": p50.get(n, 100.0), "p99": 200.0}
                          for n in (*SUBJECTS, "direct")},
              "saturation": {n: {"rps": 10000.0, "calls": 1000,
                                 "cpu_us_per_call": cpu.get(n, 20.0)} for n in SUBJECTS},
              "redis_commands": {"hit_redis_saturation": [0, 100000],
                                 "hit_redis_latency": [0, 20000]}}
    harness.derive(result)
    return result


def test_a_round_derives_each_ratio():
    r = round_(cpu={"echo": 14.0, "translator": 36.0, "tokengate": 40.0, "hit": 17.5,
                    "hit_redis": 20.0},
               p50={"echo": 50.0, "translator": 120.0, "tokengate": 136.0, "hit": 60.0,
                    "hit_redis": 61.0, "direct": 40.0})
    assert r["vs_translator"] == {"cpu_ratio": 0.9, "p50_delta": 16.0}
    assert r["hit_vs_echo"]["hit"] == {"cpu_ratio": 0.8, "p50_delta": 10.0}
    assert r["hit_vs_echo"]["hit_redis"]["cpu_ratio"] == 0.7
    assert r["cpu_ratio"] == 0.35
    assert r["added"]["p50"] == 136.0 - 50.0 - 40.0
    assert "vs_before" not in r


def results(cpu: dict, p50: dict, idle_kib: int = 7000, redis_commands: int = 0) -> dict:
    r = round_(cpu, p50)
    r["redis_commands"]["hit_redis_saturation"][0] = redis_commands
    return {
        "rounds": [r, r, r],
        "half": {n: {"rps": 5000.0, "p50": 100.0, "p99": 300.0} for n in ("tokengate", "echo")},
        "rss": {"tokengate_idle_kib": idle_kib, "tokengate_idle_anon_kib": 1500,
                "echo_idle_kib": 4000, "tokengate_after_load_kib": 9000, "tokengate_threads": 3},
        "inflight": {"max_in_flight_upstream": 100, "rss_peak_kib": 30000},
        "inflight_uncapped": {"max_in_flight_upstream": 1000, "rss_peak_kib": 50000},
        "startup": {"tokengate": [5.0, 6.0], "echo": [1.0, 2.0]},
        "environment": {"commit": "abc", "date": "d", "cpu": "c", "nproc": 2, "kernel": "k",
                        "governor": "g", "h2load": "h"},
        "settings": harness.Settings().__dict__,
    }


GOOD_CPU = {"echo": 14.0, "translator": 20.0, "tokengate": 22.0, "hit": 16.0, "hit_redis": 17.0}
GOOD_P50 = {"echo": 50.0, "translator": 120.0, "tokengate": 130.0, "hit": 55.0,
            "hit_redis": 56.0, "direct": 30.0}


def missed_rows(md: str) -> list[str]:
    return [line for line in md.splitlines() if "**missed**" in line]


def test_table_marks_each_target():
    met = harness.table(results(GOOD_CPU, GOOD_P50))
    assert missed_rows(met) == []
    assert "not measured (bench/run --before REV)" in met
    bad_cpu = {**GOOD_CPU, "tokengate": 25.0, "hit": 18.0}  # 0.80× the translator; 0.78× echo
    bad_p50 = {**GOOD_P50, "tokengate": 140.0}  # +20 µs over the translator, +60 added
    rows = missed_rows(harness.table(results(bad_cpu, bad_p50, idle_kib=9000,
                                             redis_commands=3)))
    assert any(r.startswith("| **Forwarding**") for r in rows)
    assert any(r.startswith("| … p50 over the translator's") for r in rows)
    assert any(r.startswith("| **Cache hit**, memory backend") for r in rows)
    assert not any(r.startswith("| … with the Redis backend") for r in rows)
    assert any(r.startswith("| … Redis commands per 1,000 hits") for r in rows)
    assert any(r.startswith("| **Memory**: RSS idle") for r in rows)
    assert any(r.startswith("| … throughput per core vs echo") for r in rows)
    assert len(rows) == 6


def test_redis_commands_are_summed_over_every_hit_run():
    r = results(GOOD_CPU, GOOD_P50, redis_commands=3)
    assert harness.redis_per_hit(r["rounds"]) == (9, 360000)
    assert "3 in 360,000" not in harness.table(r)
    assert "9 in 360,000 hits" in harness.table(r)


def test_the_broker_on_a_pass_through_call_is_judged_when_measured():
    r = results(GOOD_CPU, GOOD_P50)
    for x in r["rounds"]:
        x["saturation"]["before"] = {"rps": 1.0, "calls": 1, "cpu_us_per_call": 21.5}
        x["latency"]["before"] = {"p50": 127.0, "p99": 1.0}
        harness.derive(x)
    assert r["rounds"][0]["vs_before"]["p50_delta"] == 3.0
    md = harness.table(r)
    assert missed_rows(md) == []
    assert "the broker on a pass-through call: CPU/call before it ÷ with it" in md
    for x in r["rounds"]:
        x["latency"]["before"]["p50"] = 120.0
        harness.derive(x)
    rows = missed_rows(harness.table(r))
    assert len(rows) == 1 and rows[0].startswith("| … p50 with the broker over p50 before it")


# ---------------------------------------------------------------------------------------------
# The broker's scenarios


def stats(posts: int, by_grant: dict, reused: int = 0) -> dict:
    return {"posts": posts, "by_grant": by_grant, "refresh_reused": reused,
            "refresh_unknown": 0}


def test_upstream_deltas_keep_only_grants_that_moved():
    before = stats(10, {"client_credentials": 4, "refresh_token": 6})
    after = stats(13, {"client_credentials": 4, "refresh_token": 8,
                       broker.JWT_GRANT: 1}, reused=1)
    assert broker.delta(after, before) == {
        "posts": 3, "by_grant": {"refresh_token": 2, broker.JWT_GRANT: 1},
        "refresh_reused": 1, "refresh_unknown": 0}


def test_posts_per_thousand_calls():
    assert broker.per_1000(1, 1000) == 1.0
    assert broker.per_1000(5, 300_000) == pytest.approx(0.01667, rel=1e-3)


def test_renewal_bounds_follow_the_renewal_period():
    # 20 s tokens renewed 5 s (to 5.5 s) ahead: one renewal every 14.5–15.5 s.
    assert broker.renewal_bounds(60.0, 20, 5) == (3, 4)
    assert broker.renewal_bounds(60.2, 20, 5) == (3, 4)
    assert broker.renewal_bounds(6.0, 4, 1) == (1, 2)


def test_a_driver_run_with_failed_calls_is_a_problem():
    ok = {"calls": 10, "ok": 10, "errors": {}}
    assert broker.failures(ok) == []
    bad = {"calls": 10, "ok": 9, "errors": {"Unavailable": 1}}
    assert broker.failures(bad) == ["failed calls {'Unavailable': 1}",
                                    "1 of 10 calls without a token"]


def test_the_broker_table_shows_each_miss_and_why():
    seen = stats(1, {broker.JWT_GRANT: 1})
    rows = [broker.row("burst_1", "Burst", 1000, seen, "1 POST", []),
            broker.row("burst_3", "Burst, three", 1000, stats(2, {broker.JWT_GRANT: 2}),
                       "1 POST", ["2 POSTs"])]
    md = broker.table({"scenarios": rows})
    lines = md.splitlines()
    assert lines[2] == "| Burst | 1,000 | 1 (jwt_bearer 1) | 1 | 1 POST | met |"
    assert lines[3] == ("| Burst, three | 1,000 | 2 (jwt_bearer 2) | 2 | 1 POST | "
                        "**missed**: 2 POSTs |")


def test_the_benchmarks_own_processes_are_not_foreign():
    parents = {1: 0, 10: 1, 11: 10, 12: 11, 13: 10, 20: 1, 21: 20}
    assert procs.own_tree(10, parents) == {10, 11, 12, 13}
    assert procs.own_tree(99, parents) == {99}


def test_disturbance_is_reported_per_timed_run():
    rounds = [{"foreign_cores": {"echo_latency": 0.01, "echo_saturation": 0.30}},
              {"foreign_cores": {"echo_latency": 0.00, "echo_saturation": 0.03}}]
    text = harness.disturbance(rounds)
    assert "0.02 of a core (median; at most 0.30)" in text
    assert "1 of 4 runs were above 0.05 of a core" in text
    assert harness.disturbance([{}]) == ""


class Rounds(harness.Bench):
    """The round loop alone: each round's disturbance comes from a list."""

    def __init__(self, rounds: int, extra: int, disturbance: list[float]):
        self.s = harness.Settings(rounds=rounds, extra_rounds=extra)
        self.subjects = {}
        self.disturbance = list(disturbance)
        self.restarts = 0
        self.foreign = None

    def restart(self):
        self.restarts += 1

    def one_round(self, order, r):
        return {"attempt": r, "foreign_cores": {"echo_latency": self.disturbance[r]}}, {}


def test_a_disturbed_round_is_set_aside_and_run_again():
    bench = Rounds(rounds=2, extra=1, disturbance=[0.30, 0.00, 0.20, 0.00])
    rounds, discarded, _ = bench.rounds()
    assert [r["attempt"] for r in rounds] == [1, 2]  # no attempt left: the third stays
    assert [r["attempt"] for r in discarded] == [0]
    assert bench.restarts == 2
    bench = Rounds(rounds=2, extra=3, disturbance=[0.00, 0.30, 0.20, 0.01])
    rounds, discarded, _ = bench.rounds()
    assert [r["attempt"] for r in rounds] == [0, 3]
    assert len(discarded) == 2
    md_note = harness.set_aside(discarded)
    assert "2 more round(s) were set aside" in md_note and "up to 0.30" in md_note
    assert "waited 3 min" in harness.set_aside([], 180)
    assert harness.set_aside([], 30) == ""


# ---------------------------------------------------------------------------------------------
# What metrics cost

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
EXPOSITION = (b"# TYPE grpc_server_handled counter\n"
              b'grpc_server_handled_total{grpc_code="OK"} 3\n# EOF\n')


class Exposition:
    """A local `/metrics` on 127.0.0.1 that answers `content_type` and `body`, counting GETs."""

    def __init__(self, content_type: str = OPENMETRICS, body: bytes = EXPOSITION):
        import http.server
        import threading

        outer = self
        self.gets = 0
        self.accept = None

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.gets += 1
                outer.accept = self.headers.get("Accept")
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def wait_until(predicate, timeout: float = 10) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_an_exposition_must_be_whole_openmetrics_with_the_grpc_families():
    harness.check_exposition(OPENMETRICS, EXPOSITION)
    with pytest.raises(ValueError, match="not OpenMetrics"):
        harness.check_exposition("text/plain; version=0.0.4", EXPOSITION)
    with pytest.raises(ValueError, match="EOF"):
        harness.check_exposition(OPENMETRICS, EXPOSITION[:-6])
    with pytest.raises(ValueError, match="per-RPC layer is off"):
        harness.check_exposition(OPENMETRICS, b"process_open_fds 9\n# EOF\n")


def test_the_scraper_scrapes_as_prometheus_does_until_stopped():
    target = Exposition()
    try:
        with harness.Scraper(target.addr, interval=0.01) as scraper:
            wait_until(lambda: scraper.scrapes >= 3)
        done = scraper.scrapes
        assert done == target.gets
        assert target.accept == harness.SCRAPE_ACCEPT
        scraper.verify(at_least=3)
        with pytest.raises(harness.BenchError, match="not at least"):
            scraper.verify(at_least=done + 1)
        assert target.gets == done, "no scrape after the scraper stopped"
    finally:
        target.close()


def test_a_failed_scrape_refuses_the_run():
    target = Exposition(content_type="text/plain; version=0.0.4")
    try:
        with harness.Scraper(target.addr, interval=0.01) as scraper:
            wait_until(lambda: scraper.problems)
        with pytest.raises(harness.BenchError, match="not OpenMetrics"):
            scraper.verify(at_least=0)
    finally:
        target.close()


def test_the_metrics_address_is_told_apart_from_the_grpc_one(tmp_path):
    script = ("echo 'INFO serving metrics addr=127.0.0.1:2'; "
              "echo 'INFO listening addr=127.0.0.1:1 tls=false'; sleep 5")
    server = procs.Server("sh", ["sh", "-c", script], None)
    try:
        assert (server.addr, server.metrics_addr) == ("127.0.0.1:1", "127.0.0.1:2")
    finally:
        server.stop()

    class Upstream:
        addr = "127.0.0.1:9"

    on = procs.write_config(tmp_path / "on.toml", Upstream(), metrics=True).read_text()
    assert on.startswith('[server]\nlisten = "127.0.0.1:0"\nmetrics_listen = "127.0.0.1:0"\n')
    off = procs.write_config(tmp_path / "off.toml", Upstream()).read_text()
    assert "metrics_listen" not in off


def metrics_round(cpu: dict) -> dict:
    result = {"saturation": {n: {"cpu_us_per_call": v, "scrapes": 10 if "metrics" in n else 0}
                             for n, v in cpu.items()}}
    harness.derive_metrics(result)
    return result


def test_the_cost_of_metrics_is_cpu_per_call_with_them_over_without():
    r = metrics_round({"hit": 20.0, "hit_metrics": 20.5, "tokengate": 40.0,
                       "tokengate_metrics": 41.6})
    assert r["metrics_cost"]["hit"] == pytest.approx(0.025)
    assert r["metrics_cost"]["tokengate"] == pytest.approx(0.04)


def test_the_metrics_rows_judge_each_path_against_three_per_cent():
    def m(hit_on: float, fwd_on: float) -> dict:
        r = metrics_round({"hit": 20.0, "hit_metrics": hit_on, "tokengate": 40.0,
                           "tokengate_metrics": fwd_on})
        return {"rounds": [r, r, r], "discarded_rounds": [], "waited_for_quiet_s": 0}

    rows = harness.metrics_rows(m(20.6, 41.2))  # +3.0 % each: met
    assert [row[3] for row in rows] == ["met", "met"]
    assert rows[0][1] == "+3.0 (+3.0–+3.0) %"
    assert "60 scrapes" in rows[0][0]
    rows = harness.metrics_rows(m(20.7, 40.4))  # +3.5 % on a hit, +1 % forwarding
    assert [row[3] for row in rows] == ["**missed**", "met"]
    # In the whole table, and alone (--only metrics).
    r = results(GOOD_CPU, GOOD_P50)
    r["metrics"] = m(20.7, 40.4)
    rows = missed_rows(harness.table(r))
    assert len(rows) == 1 and rows[0].startswith("| **Metrics on**")
    alone = harness.metrics_table({"metrics": m(20.2, 40.4), "settings": r["settings"],
                                   "environment": r["environment"], "smoke": True})
    assert missed_rows(alone) == [] and alone.count("| met |") == 2
    assert alone.startswith("**Smoke run")


class FakeMetricsCost(harness.MetricsCost):
    """MetricsCost's round with the timed run faked: each subject's CPU per call is given."""

    def __init__(self, cpu: dict, metrics_addr: str):
        self.s = harness.Settings(saturation_s=1, warmup_s=1)
        self.cpu = cpu
        self.foreign = None
        self.warmed = []

        class Proc:
            def __init__(self, addr):
                self.metrics_addr = addr

        off, on = Proc(None), Proc(metrics_addr)
        self.subjects = {n: harness.Subject(n, "", Path(), "", None, "none",
                                            server=on if n.endswith("_metrics") else off)
                         for n in cpu}

    def grpc(self, subject, args, log=None):
        self.warmed.append(subject.name)

    def saturate(self, subject):
        return {"cpu_us_per_call": self.cpu[subject.name], "foreign_cores": 0.0}


def test_a_metrics_round_scrapes_only_the_metrics_on_subjects():
    target = Exposition()
    try:
        cost = FakeMetricsCost({"hit": 20.0, "hit_metrics": 20.4, "tokengate": 40.0,
                                "tokengate_metrics": 40.4}, target.addr)
        assert cost.order == ["hit", "hit_metrics", "tokengate", "tokengate_metrics"]
        result, latencies = cost.one_round(cost.order, 1)
        assert latencies == {}
        assert sorted(cost.warmed) == sorted(cost.order)
        assert result["metrics_cost"] == pytest.approx({"hit": 0.02, "tokengate": 0.01})
        assert "scrapes" not in result["saturation"]["hit"]
        assert result["saturation"]["hit_metrics"]["scrapes"] >= 1
        assert target.gets == sum(x.get("scrapes", 0) for x in result["saturation"].values())
        assert set(result["foreign_cores"]) == {f"{n}_saturation" for n in cost.order}
    finally:
        target.close()
